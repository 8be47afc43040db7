"""Run a test's gloo ranks as forks of one fresh interpreter, so torch is imported once and not once per rank.

``launch(test_file, "_worker", world, args, log_dir)`` starts ``python tests/gloo.py`` in a session of its
own; that process loads ``test_file`` (torch, pytest and the test's imports: once) and calls its
``_before_fork()`` if it has one (lazy imports every rank would repeat), then forks one child per rank before
any thread or process group exists, and each child calls
``test_file._worker(rank, port, *args)`` with its output in ``log_dir/rank<N>.log``. A rank that fails makes
the launcher kill the others; a launch that outlives its deadline is killed with its whole session, children
included. A port taken between the probe and rank 0's bind is retried once on a new port.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

from ports import free_port

ADDRESS_IN_USE = "ddress already in use"


def _attempt(test_file: Path, function: str, world: int, args: list[str], log_dir: Path, tag: str,
             deadline_s: float) -> tuple[int | None, list[str]]:
    """One launch on a fresh port: ``(launcher exit code or None if killed at the deadline, each rank's log)``."""
    logs = [log_dir / f"rank{rank}.{tag}.log" for rank in range(world)]
    root = str(Path(__file__).resolve().parents[1])  # this checkout's valueloss, whatever is installed
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), str(test_file), function, str(world), str(free_port()),
           *map(str, logs), "--", *map(str, args)]
    with open(log_dir / f"launcher.{tag}.log", "w+") as launcher_log:
        launcher = subprocess.Popen(cmd, stdout=launcher_log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        try:
            code = launcher.wait(timeout=deadline_s)  # it exits after every rank has exited (or been killed)
        except BaseException as stop:  # the deadline, or an interrupt: kill the launcher's session, ranks included
            os.killpg(launcher.pid, signal.SIGKILL)  # not reaped yet, so the group id is still the launcher's
            launcher.wait()
            if not isinstance(stop, subprocess.TimeoutExpired):
                raise
            code = None
        launcher_log.seek(0)
        texts = ["--- launcher:\n" + launcher_log.read()]
    texts += [f"--- rank {rank}:\n" + (log.read_text() if log.exists() else "") for rank, log in enumerate(logs)]
    return code, texts


def launch(test_file: Path, function: str, world: int, args: list, log_dir: Path, deadline_s: float = 100.0) -> None:
    """Run ``function(rank, port, *args)`` of ``test_file`` on ``world`` gloo ranks; raise with every log on failure."""
    for attempt in range(2):
        code, texts = _attempt(test_file, function, world, list(args), log_dir, str(attempt), deadline_s)
        if code == 0:
            return
        if attempt == 0 and any(ADDRESS_IN_USE in text for text in texts):
            continue  # the free port was taken between our probe and rank 0's bind
        raise AssertionError(f"gloo ranks failed (launcher exit code {code}; None = killed after {deadline_s}s):\n"
                             + "\n".join(texts))


def _fork_ranks(test_file: str, function: str, world: int, port: int, logs: list[str], args: list[str]) -> int:
    """Fork one child per rank running ``function``; 0 if every rank exits 0, else 1 (the others are killed)."""
    spec = importlib.util.spec_from_file_location(Path(test_file).stem, test_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    worker = getattr(module, function)
    if hasattr(module, "_before_fork"):  # imports every rank would otherwise repeat (once, here)
        module._before_fork()
    sys.stdout.flush()
    sys.stderr.flush()
    children = {}
    for rank in range(world):
        pid = os.fork()
        if pid == 0:  # the rank: its own log, then the worker, then out without the parent's exit handlers
            status = 1
            try:
                fd = os.open(logs[rank], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                worker(rank, port, *args)
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        children[pid] = rank
    failed = False
    while children:
        pid, status = os.wait()
        rank = children.pop(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            print(f"rank {rank} exited with {os.waitstatus_to_exitcode(status)}", flush=True)
            if not failed:
                failed = True
                for other in children:  # the others would wait for it until gloo's timeout
                    os.kill(other, signal.SIGKILL)
    return 1 if failed else 0


if __name__ == "__main__":
    test_file, function, world, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    separator = sys.argv.index("--")
    sys.exit(_fork_ranks(test_file, function, world, port, sys.argv[5:separator], sys.argv[separator + 1 :]))
