"""The Voilà app's kernel cap and culling (notebooks/voila.json), without a browser.

In ``make test``: the cap of :class:`valueloss.viz.server.CappedKernelManager` under concurrent starts (kernel
starts replaced by a stand-in) and the ``make app`` command's use of the config file. In the slow tier (~10 s):
Voilà started as ``make app`` starts it (the same config file, loopback only), on a one-cell notebook so that
each kernel is cheap, with the cap lowered to 2 and the culling timeouts shortened on the command line, under
a loop of plain GETs; kernels are counted as the server's child processes (Linux /proc).
"""

import asyncio
import concurrent.futures
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from ports import free_port

pytest.importorskip("voila")

ROOT = Path(__file__).resolve().parents[1]
LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts kernels in Linux's /proc")


def _kernels(pid):
    """The kernel processes started by the server ``pid``."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                if b"ipykernel" in cmdline:
                    found.append(int(child))
    return found


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_app_command_uses_the_config_file():
    """`make app` passes notebooks/voila.json to Voilà, and the file names the capped kernel manager."""
    recipe = re.search(r"^app:.*?(?=^\S)", (ROOT / "Makefile").read_text(), re.S | re.M).group(0)
    assert "--Voila.config_file_paths=notebooks" in recipe and "notebooks/explorer.ipynb" in recipe
    config = (ROOT / "notebooks" / "voila.json").read_text()
    assert "valueloss.viz.server.CappedKernelManager" in config and '"cull_idle_timeout"' in config


def _run(coroutine):
    """``asyncio.run`` in a thread of its own: the browser tests' Playwright keeps an event loop running in
    this one for the whole session, and ``asyncio.run`` refuses to start inside a running loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()

def test_the_cap_refuses_the_kernel_beyond_max_kernels_even_when_requests_overlap(monkeypatch):
    """Five overlapping starts with max_kernels=2: two kernels start, three get HTTP 503; a stopped one frees a slot."""
    from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
    from tornado.web import HTTPError

    from valueloss.viz.server import CappedKernelManager

    running = []

    async def fake_start(self, *args, **kwargs):  # a kernel takes a while to start, as a real one does
        await asyncio.sleep(0.05)
        running.append(f"k{len(running)}")
        return running[-1]

    monkeypatch.setattr(AsyncMappingKernelManager, "start_kernel", fake_start)
    monkeypatch.setattr(CappedKernelManager, "list_kernel_ids", lambda self: list(running))
    manager = CappedKernelManager(max_kernels=2)

    async def five():
        return await asyncio.gather(*(manager.start_kernel() for _ in range(5)), return_exceptions=True)

    outcomes = _run(five())
    assert sorted(o for o in outcomes if isinstance(o, str)) == ["k0", "k1"] and running == ["k0", "k1"]
    refused = [o for o in outcomes if isinstance(o, HTTPError)]
    assert len(refused) == 3 and all(o.status_code == 503 and "too many open sessions" in o.log_message
                                     for o in refused)
    running.pop()
    assert _run(manager.start_kernel()) == "k1"


@LINUX_PROC
@pytest.mark.slow
def test_kernel_cap_holds_under_a_loop_of_gets_and_idle_kernels_are_culled(tmp_path):
    """Six GETs: two kernels start, the other four get HTTP 503; once culled, no kernel is left and a GET works."""
    notebook = tmp_path / "tiny.ipynb"
    notebook.write_text('{"cells": [{"cell_type": "code", "execution_count": null, "id": "a", "metadata": {}, '
                        '"outputs": [], "source": ["1 + 1"]}], "metadata": {"kernelspec": {"name": "python3", '
                        '"display_name": "Python 3", "language": "python"}}, "nbformat": 4, "nbformat_minor": 5}')
    port = free_port()
    argv = [sys.executable, "-m", "voila", str(notebook), "--no-browser", "--Voila.ip=127.0.0.1", f"--port={port}",
            f"--Voila.config_file_paths={ROOT / 'notebooks'}", "--strip_sources=True", "--theme=light",
            "--CappedKernelManager.max_kernels=2", "--MappingKernelManager.cull_idle_timeout=3",
            "--MappingKernelManager.cull_interval=1"]
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_DATA_DIR": str(tmp_path / "data"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = open(tmp_path / "voila.log", "w")
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "voila.log").read_text()
            time.sleep(0.2)
        statuses, counts = [], []
        for _ in range(6):
            statuses.append(_get(url))
            counts.append(len(_kernels(server.pid)))
        assert statuses == [200, 200, 503, 503, 503, 503], (statuses, (tmp_path / "voila.log").read_text()[-2000:])
        assert max(counts) == 2, counts
        deadline = time.monotonic() + 30
        while _kernels(server.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _kernels(server.pid) == [], "idle kernels were not culled"
        assert _get(url) == 200
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()
