"""``python -m valueloss.experiments``: run a grid of PPO configurations x seeds and save the curves.

Example (the command behind ``notebooks/data/ppo_cartpole.json``, see notebook 06)::

    python -m valueloss.experiments ppo --value-clip-eps none 0.2 --reward-scaling off on \\
        --num-seeds 8 --total-timesteps 49152 --workers 2 --out notebooks/data/ppo_cartpole.json

Every (configuration, seed) run is saved in a cache directory under a key made from the full
configuration, the seed and a format version, so re-running the same command (or a larger grid that
contains it) reuses the finished runs. Each worker process uses one torch thread; a run's numbers depend
only on its configuration and seed, not on the number of workers or the order in which runs finish.

A cached file is checked before it is used: one of the wrong structure is reported (a warning naming the
file), recomputed and overwritten. Each run is computed under a lock on ``<key>.json.lock`` (``fcntl.flock``),
so two grids running at once never compute the same run twice: the second waits and then reads the
first's result. Worker processes exit when the command dies, even by ``SIGKILL`` (Linux's
``PR_SET_PDEATHSIG``, and everywhere a watchdog thread that polls the parent's pid).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import csv
import dataclasses
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import platform
import queue
import shlex
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: runs are not locked
    fcntl = None

import torch
from tqdm.auto import tqdm

from .._threads import single_thread
from .ppo import CURVE_KEYS, PPOConfig, run_ppo

__all__ = ["main", "build_parser", "run_grid", "run_key"]

#: Bump when a change to the code changes the numbers of a run: old cache entries are then ignored.
CACHE_VERSION = 1
#: Significant digits of the floats written to the results file (keeps it small and diff-friendly).
SIGNIFICANT_DIGITS = 6


def default_cache_dir() -> Path:
    """``$VALUELOSS_CACHE``, else ``$XDG_CACHE_HOME/valueloss``, else ``~/.cache/valueloss``."""
    if os.environ.get("VALUELOSS_CACHE"):
        return Path(os.environ["VALUELOSS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "valueloss"


def run_key(config: PPOConfig, seed: int) -> str:
    """The cache key of one run: a hash of the full configuration, the seed and :data:`CACHE_VERSION`."""
    payload = json.dumps(
        {"kind": "ppo", "config": config.to_dict(), "seed": seed, "version": CACHE_VERSION}, sort_keys=True
    )
    return "ppo-" + hashlib.sha256(payload.encode()).hexdigest()[:20]


def _round(x: float) -> float | None:
    """``x`` to :data:`SIGNIFICANT_DIGITS` significant digits; NaN becomes ``None`` (JSON's null)."""
    if not math.isfinite(x):
        return None
    return float(f"{x:.{SIGNIFICANT_DIGITS}g}")


def _valid_curves(entry: object, config: PPOConfig, seed: int) -> tuple[dict | None, str]:
    """The curves of a cache entry, or None and the reason it is not a valid entry of this run."""
    if not isinstance(entry, dict):
        return None, f"holds a JSON {type(entry).__name__}, expected an object"
    if entry.get("config") != config.to_dict() or entry.get("seed") != seed:
        return None, "holds another configuration or seed"
    curves = entry.get("curves")
    if not isinstance(curves, dict):
        return None, "has no 'curves' object"
    lengths = set()
    for key in CURVE_KEYS:
        curve = curves.get(key)
        if not isinstance(curve, list) or not all(
            x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in curve
        ):
            return None, f"curve {key!r} is missing or not a list of numbers"
        lengths.add(len(curve))
    if len(lengths) != 1:
        return None, f"its curves have different lengths {sorted(lengths)}"
    return curves, ""


def _read_cache(cache_file: Path, config: PPOConfig, seed: int) -> tuple[dict | None, bool]:
    """``(curves or None, writable)``: a missing entry is silent; any other unusable entry is a warning."""
    if not os.path.lexists(cache_file):
        return None, True
    if not cache_file.is_file():
        warnings.warn(f"cache entry {cache_file} is not a regular file (a directory?); the run is computed "
                      "but not cached (remove it to cache this run again)", stacklevel=3)
        return None, False
    try:
        with open(cache_file) as f:
            entry = json.load(f)
    except (OSError, ValueError) as error:
        reason = f"cannot be read as JSON ({type(error).__name__}: {error})"
    else:
        curves, reason = _valid_curves(entry, config, seed)
        if curves is not None:
            return curves, True
    warnings.warn(f"cache entry {cache_file} {reason}; recomputing the run and overwriting it", stacklevel=3)
    return None, True


def _write_cache(cache_file: str, entry: dict) -> None:
    """Write atomically (a temporary file, then rename); on failure warn and leave nothing behind."""
    tmp = f"{cache_file}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, cache_file)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        warnings.warn(f"could not write cache entry {cache_file} ({type(error).__name__}: {error}); "
                      "the run is not cached", stacklevel=2)


@contextlib.contextmanager
def _run_lock(cache_file: str | None):
    """Hold an exclusive ``flock`` on ``cache_file + ".lock"`` (nothing without a cache or without fcntl)."""
    if cache_file is None or fcntl is None:
        yield
        return
    try:
        handle = open(f"{cache_file}.lock", "a")  # noqa: SIM115 -- closed below, after the lock is released
    except OSError as error:
        warnings.warn(f"could not lock {cache_file} ({error}); running without the lock", stacklevel=3)
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed, or when the process dies
        yield
    finally:
        handle.close()


_WORKER_QUEUE: Any = None
"""The progress queue of a worker process (set by :func:`_init_worker`)."""


def _init_worker(parent_pid: int, progress_queue: Any) -> None:
    """Runs first in each worker process: the worker dies with its parent, however the parent dies."""
    global _WORKER_QUEUE
    _WORKER_QUEUE = progress_queue
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1: SIGKILL when the parent exits
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="valueloss-watchdog").start()


def _watch_parent(parent_pid: int, interval: float = 0.5) -> None:
    """Exit this process as soon as its parent is gone (it is then re-parented: the pid changes)."""
    while os.getppid() == parent_pid:
        time.sleep(interval)
    os._exit(1)


def _run_one(config_dict: dict, seed: int, cache_file: str | None, progress_queue: Any = None) -> tuple[dict, bool]:
    """Worker: one PPO run on one torch thread under the run's lock; ``(curves, read_from_cache)``.

    After the lock is taken the cache is read again: a concurrent grid may have finished this run meanwhile.
    """
    progress_queue = _WORKER_QUEUE if progress_queue is None else progress_queue
    report = None if progress_queue is None else progress_queue.put
    config = PPOConfig(**config_dict)
    with _run_lock(cache_file):
        if cache_file is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the parent has warned about this entry already
                curves, _ = _read_cache(Path(cache_file), config, seed)
            if curves is not None:
                return curves, True
        with single_thread():
            curves = run_ppo(config, seed, progress=report)
        if cache_file is not None:
            _write_cache(cache_file, {"config": config_dict, "seed": seed, "curves": curves})
    return curves, False


def run_grid(
    configs: list[PPOConfig],
    seeds: list[int],
    *,
    workers: int = 2,
    cache_dir: Path | None = None,
    show_progress: bool = True,
) -> list[dict]:
    """Run every configuration with every seed; reuse cached runs; return one dict per run, in grid order.

    Args:
        configs: the configurations (the outer loop of the grid).
        seeds: the seeds (the inner loop).
        workers: processes; ``1`` runs in this process (still on one torch thread).
        cache_dir: where finished runs are saved and looked up; ``None`` disables the cache.
        show_progress: tqdm bars over environment steps and over runs.

    Returns:
        ``[{"config": dict, "seed": int, "curves": {name: [float, ...]}, "cached": bool}, ...]``.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int; got {workers!r}")
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
    grid = list(itertools.product(configs, seeds))
    results: list[dict | None] = [None] * len(grid)
    todo = []
    for index, (config, seed) in enumerate(grid):
        cache_file = None if cache_dir is None else cache_dir / f"{run_key(config, seed)}.json"
        curves, writable = (None, False) if cache_file is None else _read_cache(cache_file, config, seed)
        if not writable:
            cache_file = None
        if curves is not None:
            results[index] = {"config": config.to_dict(), "seed": seed, "curves": curves, "cached": True}
        else:
            todo.append((index, config, seed, None if cache_file is None else str(cache_file)))

    total_steps = sum(config.num_iterations * config.batch_size for _, config, _, _ in todo)
    step_bar = tqdm(total=total_steps, desc="env steps", unit="step", unit_scale=True, disable=not show_progress)
    run_bar = tqdm(total=len(grid), initial=len(grid) - len(todo), desc="runs", unit="run", disable=not show_progress)

    def finish(index: int, config: PPOConfig, seed: int, outcome: tuple[dict, bool]) -> None:
        curves, cached = outcome
        results[index] = {"config": config.to_dict(), "seed": seed, "curves": curves, "cached": cached}
        run_bar.update(1)

    if workers == 1 or len(todo) <= 1:
        for index, config, seed, cache_file in todo:
            finish(index, config, seed, _run_one(config.to_dict(), seed, cache_file, _BarQueue(step_bar)))
    else:
        # A fresh interpreter per worker (no forked torch state); no Manager process (it would outlive a killed
        # parent): the queue reaches the workers through their initializer, which also ties them to this process.
        context = multiprocessing.get_context("spawn")
        progress_queue = context.Queue()
        with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                         initargs=(os.getpid(), progress_queue)) as pool:
            pending = {
                pool.submit(_run_one, config.to_dict(), seed, cache_file): (index, config, seed)
                for index, config, seed, cache_file in todo
            }
            while pending:
                done, _ = futures.wait(pending, timeout=0.5, return_when=futures.FIRST_COMPLETED)
                _drain(progress_queue, step_bar)
                for future in done:
                    finish(*pending.pop(future), future.result())
        _drain(progress_queue, step_bar)  # what the workers flushed while shutting down
        progress_queue.close()
        progress_queue.join_thread()
    step_bar.close()
    run_bar.close()
    return results  # type: ignore[return-value]


class _BarQueue:
    """Stands in for the progress queue when running in-process: ``put`` advances the bar."""

    def __init__(self, bar: tqdm) -> None:
        self.put = bar.update


def _drain(progress_queue: Any, bar: tqdm) -> None:
    while True:
        try:
            bar.update(progress_queue.get_nowait())
        except queue.Empty:
            return


def _parse_clip(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'none' or a number >= 0; got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected 'none' or a number >= 0; got {text!r}")
    return value


def _parse_on_off(text: str) -> bool:
    if text.lower() in ("on", "true", "1", "yes"):
        return True
    if text.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off; got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m valueloss.experiments", description="Grids of small value-loss experiments."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    ppo = commands.add_parser(
        "ppo",
        help="PPO on CartPole-v1: value clipping x reward scaling x seeds",
        description="Run every combination of --value-clip-eps and --reward-scaling with every seed.",
    )
    ppo.add_argument("--value-clip-eps", type=_parse_clip, nargs="+", default=[None, 0.2],
                     help="value clip ranges; 'none' = no value clipping (default: none 0.2)")
    ppo.add_argument("--reward-scaling", type=_parse_on_off, nargs="+", default=[False, True],
                     help="on/off: divide rewards by the running std of the discounted return (default: off on)")
    ppo.add_argument("--num-seeds", type=int, default=5, help="seeds first-seed .. first-seed+N-1 (default 5)")
    ppo.add_argument("--first-seed", type=int, default=0)
    ppo.add_argument("--total-timesteps", type=int, default=PPOConfig.total_timesteps)
    ppo.add_argument("--num-envs", type=int, default=PPOConfig.num_envs)
    ppo.add_argument("--num-steps", type=int, default=PPOConfig.num_steps)
    ppo.add_argument("--learning-rate", type=float, default=PPOConfig.learning_rate)
    ppo.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ppo.add_argument("--out", type=Path, required=True, help="results file (.json)")
    ppo.add_argument("--csv", type=Path, default=None, help="also write the curves as a long-format CSV")
    ppo.add_argument("--cache-dir", type=Path, default=None,
                     help="where runs are cached (default $VALUELOSS_CACHE or ~/.cache/valueloss)")
    ppo.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    ppo.add_argument("--quiet", action="store_true", help="no progress bars")
    figure = commands.add_parser(
        "figure", help="draw the key figure (learning curves + final-return IQM) of a results file as a PNG"
    )
    figure.add_argument("results", type=Path, help="a results file written by the ppo command")
    figure.add_argument("--out", type=Path, required=True, help="the image file (.png)")
    return parser


def _draw_figure(results_path: Path, out: Path) -> None:
    from .figures import key_figure  # matplotlib only when a figure is wanted
    from .results import load_results

    out.parent.mkdir(parents=True, exist_ok=True)
    key_figure(load_results(results_path)).savefig(out, dpi=100)


def _command_line(argv: list[str]) -> str:
    return " ".join(["python -m valueloss.experiments"] + [shlex.quote(a) for a in argv])


def main(argv: list[str] | None = None) -> dict:
    """Entry point; returns the results dict that was written to ``--out``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "figure":
        try:
            _draw_figure(args.results, args.out)
        except (OSError, ValueError, KeyError) as error:  # a missing or malformed results file, an unwritable image
            message = " ".join(str(error).splitlines()) or type(error).__name__
            print(f"python -m valueloss.experiments figure: error: {message}", file=sys.stderr)
            raise SystemExit(2) from None
        return {"figure": str(args.out)}
    if args.num_seeds < 1:
        raise SystemExit(f"--num-seeds must be >= 1; got {args.num_seeds}")
    base = PPOConfig(
        total_timesteps=args.total_timesteps,
        num_envs=args.num_envs,
        num_steps=args.num_steps,
        learning_rate=args.learning_rate,
    )
    configs = [
        dataclasses.replace(base, value_clip_eps=clip, reward_scaling=scaling)
        for clip, scaling in itertools.product(args.value_clip_eps, args.reward_scaling)
    ]
    seeds = list(range(args.first_seed, args.first_seed + args.num_seeds))
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    start = time.perf_counter()
    runs = run_grid(configs, seeds, workers=args.workers, cache_dir=cache_dir, show_progress=not args.quiet)
    elapsed = time.perf_counter() - start

    results = {
        "command": _command_line(argv),
        "experiment": "ppo",
        "curve_keys": list(CURVE_KEYS),
        "runs": [
            {
                "config": run["config"],
                "seed": run["seed"],
                "curves": {key: [_round(x) for x in run["curves"][key]] for key in CURVE_KEYS},
            }
            for run in runs
        ],
        # Provenance; not part of the reproducible numbers above.
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gymnasium": _version("gymnasium"),
            "valueloss": _version("valueloss"),
            "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
            "wall_time_seconds": round(elapsed, 1),
            "runs_from_cache": sum(run["cached"] for run in runs),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, separators=(",", ":"))
        f.write("\n")
    if args.csv is not None:
        _write_csv(args.csv, results)
    if not args.quiet:
        print(f"wrote {len(runs)} runs to {args.out} in {elapsed:.0f} s ({results['environment']['runs_from_cache']} "
              "from the cache)", file=sys.stderr)
    return results


def _write_csv(path: Path, results: dict) -> None:
    """Long format: one row per run and iteration, with the two switches and the seed as columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["value_clip_eps", "reward_scaling", "seed", "iteration", *CURVE_KEYS])
        for run in results["runs"]:
            clip, scaling = run["config"]["value_clip_eps"], run["config"]["reward_scaling"]
            columns = [run["curves"][key] for key in CURVE_KEYS]
            for iteration, row in enumerate(zip(*columns, strict=True)):
                writer.writerow(["none" if clip is None else clip, scaling, run["seed"], iteration,
                                 *("" if x is None else x for x in row)])


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
