"""Fixtures of the browser tests: JupyterLab and Voilà servers, and Debian's Chromium driven by Playwright.

Each server runs on a free loopback port with a random token, in a temporary root directory holding
copies of ``notebooks/`` (the tests may execute and save them there). Teardown always stops the browser,
the servers and every kernel they started, then checks that no process is alive and no port is still
listening; a leftover makes the teardown fail.

Chromium is Debian's (``make test`` installs it when root with apt-get); ``playwright install`` is never
used. Without the executable the tests marked ``browser`` are skipped with a message saying how to enable
them. Screenshots go to ``test-artifacts/browser/`` (gitignored); slider latencies are printed in the
terminal summary and written to ``test-artifacts/browser/latency.txt``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM = Path(os.environ.get("VALUELOSS_CHROMIUM") or "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SKIP_REASON = (
    f"browser tests need Chromium at {CHROMIUM}; enable them with `make test` as root on Debian "
    "(it runs `apt-get install -y chromium`), or `sudo apt-get install -y chromium`, "
    "or point VALUELOSS_CHROMIUM at a Chromium executable"
)
SERVER_START_TIMEOUT = 120.0  # seconds; the machine may be busy
STOP_TIMEOUT = 20.0

# JupyterLab user settings of the test server: no news/update pop-ups, every cell rendered.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}

LATENCIES: list[tuple[str, float, int]] = []  # (what, median ms, number of samples)
DRAGS: list[str] = []  # one line per dragged figure: settle time and frames
# The goals of issue 22 (medians, ms) and the ceilings the tests assert: three times the goal, so that they
# catch a regression and still hold on a loaded 2-core machine.
GOALS_MS = {"1D": 50.0, "plane": 100.0, "drag settle": 250.0, "first paint": 1500.0}
CEILING = 3.0
WINDOW = {"width": 1280, "height": 800}  # the JupyterLab window the figures must fit
RETRIES: list[str] = []  # slider steps that needed a second key press


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked ``browser`` when Chromium or Playwright is missing, saying how to enable them."""
    reason = SKIP_REASON if not CHROMIUM.exists() else None
    if reason is None:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "browser tests need Playwright for Python: `make venv` installs it (extra `test`)"
    if reason is None:
        return
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_terminal_summary(terminalreporter):
    """Print the slider -> figure latencies measured in the browser (reported, not asserted)."""
    for line in RETRIES:
        terminalreporter.write_line(f"browser: {line}")
    if not LATENCIES and not DRAGS:
        return
    terminalreporter.section("browser: slider change -> updated figure (median, ms)")
    lines = [f"{what}: {ms:.0f} ms (n={n})" for what, ms, n in LATENCIES] + DRAGS
    for line in lines:
        terminalreporter.write_line(line)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "latency.txt").write_text("\n".join(lines) + "\n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item so that fixtures can save a screenshot on failure."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _stop_processes(leader: subprocess.Popen, extra: list) -> list[str]:
    """SIGTERM the process group of ``leader`` (then SIGKILL), kill ``extra`` leftovers; return survivors."""
    import psutil

    procs = [p for p in extra if p.is_running()]
    if leader.poll() is None:
        try:
            os.killpg(leader.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            leader.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(leader.pid, signal.SIGKILL)
            leader.wait(STOP_TIMEOUT)
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:  # kernels run in process groups of their own
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    return [f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in alive if p.is_running()]


@dataclass
class Server:
    """A Jupyter server process (JupyterLab or Voilà) on a loopback port with a token."""

    name: str
    argv: list[str]
    root: Path
    port: int
    token: str
    log_path: Path
    env: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        """Absolute URL of ``path`` carrying the token (the browser keeps it as a cookie)."""
        sep = "&" if "?" in path else "?"
        return f"{self.base_url}{path}{sep}token={self.token}"

    def start(self, ready_path: str) -> None:
        """Start the process and wait until ``ready_path`` answers 200 (with the token)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url(ready_path), timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {SERVER_START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the server and everything it started; raise if a process or the port survives."""
        if self.proc is None:
            return
        survivors = _stop_processes(self.proc, _descendants(self.proc.pid))
        self.proc = None
        deadline = time.monotonic() + 10
        while port_is_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.2)
        problems = [f"process left behind: {s}" for s in survivors]
        if port_is_open(self.port):
            problems.append(f"port {self.port} still listening")
        if problems:
            raise RuntimeError(f"{self.name} did not shut down cleanly: {problems}")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def _server_env(home: Path) -> dict:
    """Environment of a test server: isolated Jupyter/IPython config, the user's backend choice dropped."""
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "JUPYTER_CONFIG_DIR")}
    env.update(
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        IPYTHONDIR=str(home / "ipython"),
        MPLCONFIGDIR=str(home / "mpl"),
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    return env


def _start(server: Server, ready_path: str, attempts: int = 3) -> Server:
    """Start ``server``; if its port was taken meanwhile, retry on another free port."""
    for attempt in range(attempts):
        try:
            server.start(ready_path)
            return server
        except RuntimeError:
            if attempt == attempts - 1 or "already in use" not in server.log_tail():
                raise
            old, server.port = server.port, free_port()
            server.argv = [a.replace(f"={old}", f"={server.port}") for a in server.argv]
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def served_root(tmp_path_factory) -> Path:
    """A temporary notebook directory: copies of notebooks/*.ipynb that servers may run and save."""
    root = tmp_path_factory.mktemp("served")
    for nb in sorted((REPO / "notebooks").glob("*.ipynb")):
        shutil.copy2(nb, root / nb.name)
    return root


@pytest.fixture(scope="session")
def jupyterlab_server(served_root, tmp_path_factory):
    """JupyterLab on a free loopback port with a token, serving ``served_root``; stopped at the end."""
    home = tmp_path_factory.mktemp("lab-home")
    settings = home / "settings"
    for name, values in LAB_SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = free_port(), secrets.token_hex(16)
    argv = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--allow-root",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={served_root}",
        "--ServerApp.terminals_enabled=False",
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={home / 'workspaces'}",
        "--LabApp.extension_manager=readonly",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    server = Server("JupyterLab", argv, served_root, port, token, home / "server.log", _server_env(home))
    _start(server, "/api/status")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def voila_server(served_root, tmp_path_factory):
    """Voilà (no code shown, as ``make app``) on a free loopback port with a token, serving ``served_root``."""
    home = tmp_path_factory.mktemp("voila-home")
    port, token = free_port(), secrets.token_hex(16)
    argv = [
        sys.executable,
        "-m",
        "voila",
        str(served_root),
        "--no-browser",
        "--Voila.ip=127.0.0.1",
        f"--port={port}",
        f"--Voila.token={token}",
        "--strip_sources=True",
        "--show_tracebacks=True",
        "--theme=light",
        f"--Voila.config_file_paths={REPO / 'notebooks'}",  # make app's kernel cap and culling (voila.json)
    ]
    server = Server("Voilà", argv, served_root, port, token, home / "server.log", _server_env(home))
    _start(server, "/")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def browser_context(tmp_path_factory):
    """Headless Debian Chromium with a fresh profile, driven by Playwright; closed at the end."""
    from playwright.sync_api import sync_playwright

    before = {p.pid for p in _descendants(os.getpid())}
    profile = tmp_path_factory.mktemp("chromium-profile")
    playwright = sync_playwright().start()
    try:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1920, "height": 1080},
            device_scale_factor=1,
        )
        context.set_default_timeout(60_000)
        try:
            yield context
        finally:
            context.close()
    finally:
        playwright.stop()
        leftovers = [p for p in _descendants(os.getpid()) if p.pid not in before]
        import psutil

        _, alive = psutil.wait_procs(leftovers, timeout=10)
        for proc in alive:
            proc.kill()
        if alive:
            raise RuntimeError(f"browser processes left behind: {[p.pid for p in alive]}")


@pytest.fixture
def page(browser_context, request):
    """A fresh browser tab; on failure its screenshot goes to test-artifacts/browser/."""
    tab = browser_context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.page_errors = errors
    try:
        yield tab
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            try:
                tab.screenshot(path=str(ARTIFACTS / f"FAILED-{request.node.name}.png"), full_page=True)
            except Exception as exc:  # the tab may be gone; the failure itself is what matters
                print(f"no failure screenshot: {exc}")
        tab.close()


# --- driving widgets in a page ------------------------------------------------------------------------
# A figure is a live canvas (pixels) or an <img> (e.g. a PNG in an Output widget); its signature is a
# hash of what the browser shows, so it changes exactly when the displayed figure does.
# Hashing a 1100x480 canvas costs 10-30 ms of the page's main thread here, the thread that also receives
# and paints the figures: a watcher that hashed every animation frame slowed the page it measured by about
# 3x (issue 22). So every canvas drawing call marks its canvas as touched, and the watchers hash a figure
# only in frames after something drew on one of its canvases (or an image's source changed): the signature
# stays exact, and a quiet figure costs nothing to watch.
_JS_HELPERS = """
() => {
  if (window.__vl) return;
  // Every drawing call on a 2D canvas bumps that canvas's counter.
  const proto = CanvasRenderingContext2D.prototype;
  for (const name of ['drawImage', 'putImageData', 'fill', 'stroke', 'fillRect', 'clearRect', 'fillText',
                      'strokeText', 'strokeRect']) {
    const original = proto[name];
    proto[name] = function (...args) { this.canvas.__vlTouched = (this.canvas.__vlTouched || 0) + 1;
                                       return original.apply(this, args); };
  }
  const touched = (el) => [...el.querySelectorAll('canvas')].reduce((n, c) => n + (c.__vlTouched || 0), 0);
  const signature = (el) => {
    let h = -2128831035;
    for (const c of el.querySelectorAll('canvas')) {
      if (!c.width || !c.height) continue;
      const d = new Uint32Array(c.getContext('2d').getImageData(0, 0, c.width, c.height).data.buffer);
      for (let i = 0; i < d.length; i++) h = Math.imul(h ^ d[i], 16777619);
    }
    for (const img of el.querySelectorAll('img')) {
      const src = img.currentSrc || img.src;
      for (let i = 0; i < src.length; i++) h = Math.imul(h ^ src.charCodeAt(i), 16777619);
    }
    return h;
  };
  const sources = (el) => [...el.querySelectorAll('img')].map(i => i.currentSrc || i.src).join('|');
  // Calls onFrame(now, signature) once per animation frame in which el may have changed, until it returns true.
  const follow = (el, onFrame) => {
    let seen = touched(el), src = sources(el);
    const tick = () => {
      const now = performance.now();
      const s = sources(el), t = touched(el);
      if (t !== seen || s !== src) {
        seen = t; src = s;
        if (onFrame(now, signature(el))) return;
      } else if (onFrame(now, null)) return;
      requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
  };
  // Latency watch: time from the next keydown/pointerup to the first frame whose figure differs.
  const watch = (el, timeoutMs) => {
    const state = { done: false, ms: null };
    const base = signature(el);
    let t0 = null;
    const start = () => { if (t0 === null) t0 = performance.now(); };
    document.addEventListener('keydown', start, { once: true, capture: true });
    document.addEventListener('pointerup', start, { once: true, capture: true });
    const t_end = performance.now() + timeoutMs;
    follow(el, (now, sig) => {
      if (t0 !== null && sig !== null && sig !== base) { state.ms = now - t0; state.done = true; return true; }
      if (now > t_end) { state.done = true; return true; }
      return false;
    });
    return state;
  };
  // Recorder: every keydown and every frame in which a figure's signature changed, until stop() is called.
  const record = (els) => {
    const rec = { keys: [], frames: els.map(() => []), stopped: false };
    const key = () => { if (!rec.stopped) rec.keys.push(performance.now()); };
    document.addEventListener('keydown', key, { capture: true });
    els.forEach((el, i) => {
      let last = signature(el);
      rec.frames[i].push([performance.now(), last]);
      follow(el, (now, sig) => {
        if (sig !== null && sig !== last) { last = sig; rec.frames[i].push([now, sig]); }
        return rec.stopped;
      });
    });
    rec.stop = () => { rec.stopped = true; document.removeEventListener('keydown', key, { capture: true }); };
    return rec;
  };
  window.__vl = { signature, watch, record, state: null, recording: null };
}
"""


def analyse_drag(keys: list[float], figures: list[list]) -> dict:
    """Key press times and, per figure, its recorded ``[time, signature]`` frames (the first: before the drag)
    -> ``keys``, and per figure ``settle_ms``, ``during``, ``after``, ``replayed`` (see ``WidgetDriver.drag``)."""
    first, last = keys[0], keys[-1]
    result = {"keys": len(keys), "settle_ms": [], "during": [], "after": [], "replayed": []}
    for frames in figures:
        final = frames[-1][1]
        t_final = next(t for t, sig in frames if sig == final and t > first) if len(frames) > 1 else None
        result["settle_ms"].append(None if t_final is None else t_final - last)
        result["during"].append(sum(first < t <= last for t, _ in frames))
        result["after"].append(sum(t > last for t, _ in frames))
        result["replayed"].append(0 if t_final is None else sum(t > t_final for t, _ in frames))
    return result


class WidgetDriver:
    """Finds sliders and figures in a page, moves sliders with the keyboard, watches figure pixels."""

    def __init__(self, page):
        self.page = page

    def _js(self):
        self.page.evaluate(_JS_HELPERS)

    @staticmethod
    def slider(scope, description: str):
        """The visible ipywidgets slider whose label reads ``description`` (exactly) inside ``scope``."""
        import re

        page = getattr(scope, "page", scope)  # 'has' locators are relative: build them from the page
        label = page.locator(".widget-label").filter(has_text=re.compile(rf"^\s*{re.escape(description)}\s*$"))
        return scope.locator(".widget-slider").filter(has=label, visible=True)

    @staticmethod
    def readout(slider) -> str:
        """The value the slider shows next to it."""
        return slider.locator(".widget-readout").inner_text().strip()

    def signature(self, figure) -> int:
        """Hash of the pixels (canvas) or image source (img) that ``figure`` shows right now."""
        self._js()
        return figure.evaluate("el => window.__vl.signature(el)")

    def press(self, slider, key: str) -> None:
        """Focus the slider's handle and press ``key`` (ArrowRight/ArrowLeft move it by one step)."""
        slider.locator(".noUi-handle").focus()
        self.page.keyboard.press(key)

    def step_key(self, slider) -> str:
        """ArrowRight unless the slider is at its maximum."""
        handle = slider.locator(".noUi-handle")
        now, top = handle.get_attribute("aria-valuenow"), handle.get_attribute("aria-valuemax")
        return "ArrowLeft" if now is not None and top is not None and float(now) >= float(top) else "ArrowRight"

    def wait_for_change(self, figure, before: int, timeout: float = 20.0) -> bool:
        """Poll until the figure's signature differs from ``before``; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.signature(figure) != before:
                return True
            time.sleep(0.05)
        return False

    def step_and_wait(self, slider, figures: list, befores: list, timeout: float = 20.0, first: float = 8.0) -> int:
        """Step the slider until every figure differs from its ``before``; return the number of key presses.

        A second press is made only if nothing changed within ``first`` seconds of the first (a redraw takes
        0.1-0.5 s here; on the loaded 2-core machine a few slider steps reached the browser but never the
        kernel, twice in the last dozen runs of the Voila tests); the second waits up to ``timeout``. Each retry
        is reported in the terminal summary. A slider that never redraws still fails after two presses.
        """
        for attempt, wait in ((1, min(first, timeout)), (2, timeout)):
            shown = self.readout(slider)
            self.press(slider, self.step_key(slider))
            assert self.readout(slider) != shown, "the slider did not move"
            if all(self.wait_for_change(f, b, timeout=wait) for f, b in zip(figures, befores, strict=True)):
                if attempt > 1:
                    RETRIES.append(f"{self.page.url.split('?')[0]}: figure redrawn only after a second key press")
                return attempt
        return 0

    def wait_until_stable(self, figure, quiet: float = 0.5, timeout: float = 20.0) -> int:
        """Wait until the figure has not changed for ``quiet`` seconds; return its signature."""
        (signature,) = self.wait_until_all_stable([figure], quiet=quiet, timeout=timeout)
        return signature

    def wait_until_all_stable(self, figures: list, quiet: float = 0.5, timeout: float = 20.0) -> list[int]:
        """Wait until none of the figures has changed for ``quiet`` seconds; return their signatures.

        The figures are watched together, so a page of three figures is settled in one quiet period, not three.
        """
        deadline = time.monotonic() + timeout
        last, since = [self.signature(f) for f in figures], time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = [self.signature(f) for f in figures]
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return now
        return last

    def latency_ms(self, slider, figure, key: str, timeout: float = 10.0) -> float | None:
        """Milliseconds from pressing ``key`` on the slider to the first frame showing a changed figure."""
        self._js()
        self.wait_until_stable(figure)
        figure.evaluate(f"el => {{ window.__vl.state = window.__vl.watch(el, {timeout * 1000}); }}")
        self.press(slider, key)
        self.page.wait_for_function("() => window.__vl.state.done", timeout=(timeout + 5) * 1000)
        return self.page.evaluate("() => window.__vl.state.ms")

    def drag(self, slider, figures: list, key: str = "ArrowRight", presses: int = 60, rate: float = 30.0,
             quiet: float = 0.5, timeout: float = 20.0) -> dict:
        """Hold ``key`` on the slider: ``presses`` key presses at ``rate`` a second, as a keyboard repeat does.

        Every figure's frames are recorded in the page (time and signature of each changed frame) until none
        has changed for ``quiet`` seconds. Returns, per figure (lists in the order of ``figures``):
        ``settle_ms`` (last key press -> first frame of the final picture), ``during`` (frames shown between
        the first and the last key press), ``after`` (frames shown after the last key press, the final one
        included) and ``replayed`` (frames shown after the final picture first appeared: a backlog replaying);
        and ``rate`` (the key presses a second actually sent).
        """
        self._js()
        handles = [f.element_handle() for f in figures]
        self.page.evaluate("els => { window.__vl.recording = window.__vl.record(els); }", handles)
        slider.locator(".noUi-handle").focus()
        start = time.monotonic()
        for i in range(presses):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.page.keyboard.press(key)
        sent = time.monotonic() - start
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # quiet = no frame for `quiet` s (asked of the page: no hashing here)
            time.sleep(0.1)
            idle = self.page.evaluate("""() => { const r = window.__vl.recording;
                const last = Math.max(r.keys[r.keys.length - 1], ...r.frames.map(f => f[f.length - 1][0]));
                return performance.now() - last; }""")
            if idle >= quiet * 1000:
                break
        rec = self.page.evaluate(
            "() => { const r = window.__vl.recording; r.stop(); return {keys: r.keys, frames: r.frames}; }")
        result = analyse_drag(rec["keys"], rec["frames"])
        result["rate"] = (presses - 1) / sent if sent > 0 else float("inf")
        return result

    @staticmethod
    def changed_pixels(png_before: bytes, png_after: bytes) -> int:
        """Number of pixels that differ between two same-size screenshots."""
        import io

        from PIL import Image, ImageChops

        a = Image.open(io.BytesIO(png_before)).convert("RGB")
        b = Image.open(io.BytesIO(png_after)).convert("RGB")
        if a.size != b.size:
            return a.size[0] * a.size[1]
        diff = ImageChops.difference(a, b).convert("L").point(lambda v: 255 if v else 0)
        return diff.histogram()[255]


@pytest.fixture
def widgets(page) -> WidgetDriver:
    """A WidgetDriver on the test's tab."""
    return WidgetDriver(page)


@pytest.fixture(scope="session")
def widget_driver():
    """The WidgetDriver class, for tabs that live longer than one test."""
    return WidgetDriver


def record_latency(what: str, samples: list[float]) -> float:
    """Keep the median latency for the terminal summary; return it."""
    import statistics

    median = statistics.median(samples)
    LATENCIES.append((what, median, len(samples)))
    print(f"{what}: median {median:.0f} ms over {len(samples)} slider steps: {[round(s) for s in samples]}")
    return median


def record_first_paints(what: str, paints: list[dict]) -> list[float]:
    """Keep one line per explorer cell (cell finished -> all its figures painted) for the summary."""
    delays = []
    for p in paints:
        delay = max(0.0, p["paint"] - p["done"])  # 0: painted before the prompt showed its number
        line = f"{what}, cell {p['cell']} finished -> its {p['figures']} figure(s) painted: {delay:.0f} ms"
        DRAGS.append(line)
        print(line)
        delays.append(delay)
    return delays


def record_drag(what: str, result: dict, names: list[str]) -> None:
    """Keep one line per dragged figure for the terminal summary."""
    for i, name in enumerate(names):
        settle = result["settle_ms"][i]
        line = (f"{what}, drag ({result['keys']} keys at {result['rate']:.0f}/s) -> {name}: final picture "
                f"{'never' if settle is None else f'{settle:.0f} ms'} after the last key; frames during the drag "
                f"{result['during'][i]}, after it {result['after'][i]}, "
                f"replayed after the final one {result['replayed'][i]}")
        DRAGS.append(line)
        print(line)


def check_drag(result: dict, names: list[str]) -> None:
    """The drag goals, asserted at their ceilings: final picture soon after the last key, no backlog, live frames."""
    ceiling = CEILING * GOALS_MS["drag settle"]
    for i, name in enumerate(names):
        settle = result["settle_ms"][i]
        assert settle is not None and 0 <= settle <= ceiling, f"{name}: final picture {settle} ms after the last key"
        assert result["replayed"][i] == 0, f"{name}: {result['replayed'][i]} stale frame(s) after the final one"
        # After the last key: the picture of the value the kernel was busy with, then the final one (2-3 seen
        # here); a backlog would replay most of the 60 values the drag went through.
        assert result["after"][i] <= 5, f"{name}: {result['after'][i]} frames after the last key (a backlog)"
        assert result["during"][i] >= 3, f"{name}: only {result['during'][i]} frame(s) during a 2 s drag"


@pytest.fixture(scope="session")
def drag_log():
    """``(record, check)``: report a drag in the terminal summary; assert its ceilings."""
    return record_drag, check_drag


def check_fits(page, figures, container: str) -> list[dict]:
    """Every figure lies inside ``container``'s box and no output area scrolls sideways; returns the boxes."""
    outer = page.locator(container).first.bounding_box()
    boxes = []
    for figure in figures:
        box = figure.bounding_box()
        assert box is not None and box["width"] > 300, f"figure not drawn: {box}"
        assert outer["x"] - 1 <= box["x"] and box["x"] + box["width"] <= outer["x"] + outer["width"] + 1, (
            f"figure {box} cut off by the {container} {outer}")
        boxes.append(box)
    wide = page.evaluate("""() => [...document.querySelectorAll(
          '.jp-OutputArea-output, .jp-Notebook, .jp-WindowedPanel-outer')]
        .filter(e => e.offsetParent !== null && e.scrollWidth > e.clientWidth + 1).map(e => e.className)""")
    assert wide == [], f"these scroll sideways at {WINDOW}: {wide}"
    return boxes


@pytest.fixture(scope="session")
def goals():
    """The goals, ceiling factor, window size and ``fits(page, figures, container)`` check of issue 22."""
    from types import SimpleNamespace

    return SimpleNamespace(ms=GOALS_MS, ceiling=CEILING, window=WINDOW, fits=check_fits,
                           first_paints=record_first_paints, analyse_drag=analyse_drag, check_drag=check_drag)


@pytest.fixture(scope="session")
def latency_log():
    """``record(what, samples_ms)``: report slider latencies in the terminal summary (not asserted)."""
    return record_latency


def save_artifact(name: str, data: bytes) -> Path:
    """Write ``data`` to test-artifacts/browser/``name``."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(data)
    return path


@pytest.fixture(scope="session")
def artifacts():
    """``save(name, bytes)`` into test-artifacts/browser/."""
    return save_artifact


# --- JupyterLab -----------------------------------------------------------------------------------------
_ALL_CELLS_RAN = """
() => {
  const panel = '.jp-NotebookPanel:not(.lm-mod-hidden)';
  const prompts = [...document.querySelectorAll(`${panel} .jp-CodeCell .jp-InputArea-prompt`)]
    .map(p => p.textContent.trim());
  if (prompts.length === 0 || prompts.some(p => p.includes('*'))) return false;
  const errored = document.querySelector('.jp-Notebook [data-mime-type="application/vnd.jupyter.error"],'
    + ' .jp-Notebook .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]');
  return errored !== null || prompts.every(p => /\\[\\d+\\]/.test(p));
}
"""


# Polls every 20 ms (cheap: no pixel hashing): a cell is done when its prompt turns from [*] to a number; a
# cell's figures are painted when each canvas has a size and a non-transparent pixel on its middle row.
_FIRST_PAINTS = """
() => {
  const state = window.__vlPaints = { cells: [], timer: null };
  const byCell = new Map();
  state.timer = setInterval(() => { try { tick(); } catch (e) { state.error = String(e); } }, 20);
  const tick = () => {
    const now = performance.now();
    const cells = document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell');
    cells.forEach((cell, index) => {
      const prompt = (cell.querySelector('.jp-InputArea-prompt') || {}).textContent || '';
      let entry = byCell.get(cell);
      if (!entry) {
        if (!prompt.includes('*')) return;
        entry = { cell: index, done: null, paint: null };
        byCell.set(cell, entry);
      }
      if (entry.done === null && /\\[\\d+\\]/.test(prompt)) entry.done = now;
      const canvases = [...cell.querySelectorAll('.valueloss-figure')].map(d => d.querySelector('canvas'));
      const inked = (canvas) => {
        if (!canvas || !canvas.width || !canvas.height) return false;
        if (canvas.__vlInked) return true;
        const row = canvas.getContext('2d').getImageData(0, canvas.height >> 1, canvas.width, 1).data;
        for (let i = 3; i < row.length; i += 4) if (row[i]) return (canvas.__vlInked = true);
        return false;
      };
      entry.figures = canvases.length;
      const all = canvases.length > 0 && canvases.every(inked);
      if (all && entry.paint === null) entry.paint = now;
      if (!all) entry.paint = null;  // a figure appeared that has not painted yet
      if (canvases.length && !state.cells.includes(entry)) state.cells.push(entry);
    });
  };
}
"""


class JupyterLabDriver:
    """Opens a notebook in JupyterLab, runs all cells through the menu, saves, reports errors."""

    def __init__(self, page, server: Server):
        self.page, self.server = page, server

    def open(self, name: str) -> None:
        """Open ``name`` alone (fresh workspace) and wait until its kernel is idle."""
        self.page.goto(self.server.url(f"/lab/tree/{name}?reset"))  # reset: no tabs left from earlier tests
        self.page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
        self.page.wait_for_selector("#jp-main-statusbar >> text=Idle", timeout=90_000)

    def watch_first_paints(self) -> None:
        """From now on, note when each code cell finishes and when each figure canvas in it first shows ink."""
        self.page.evaluate(_FIRST_PAINTS)

    def first_paints(self, quiet: float = 0.5, timeout: float = 30.0) -> list[dict]:
        """``[{"cell", "done", "paint", "figures"}]`` (page times, ms) of the cells that ran and hold figures.

        A widget's view is built after its cell's prompt shows a number: this waits until a figure has
        appeared, every figure that appeared has painted and nothing new came for ``quiet`` seconds.
        """
        deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
        while time.monotonic() < deadline:
            cells = self.page.evaluate("() => JSON.stringify(window.__vlPaints.cells)")
            if cells != last:
                last, since = cells, time.monotonic()
            done = json.loads(cells)
            if done and all(c["paint"] is not None for c in done) and time.monotonic() - since >= quiet:
                break
            time.sleep(0.1)
        return self.page.evaluate("() => { clearInterval(window.__vlPaints.timer); return window.__vlPaints.cells; }")

    def run_all(self, timeout: float = 120.0) -> None:
        """Run > Run All Cells, then wait until every code cell has run (or one failed)."""
        self.page.get_by_role("menuitem", name="Run", exact=True).click()
        self.page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        self.page.wait_for_function(_ALL_CELLS_RAN, timeout=timeout * 1000, polling=250)
        self.page.wait_for_selector("#jp-main-statusbar >> text=Idle", timeout=timeout * 1000)

    def save(self) -> None:
        """File > Save (Ctrl+S) and wait until the tab is no longer dirty."""
        self.page.locator(".jp-Notebook").first.click(position={"x": 5, "y": 5})
        self.page.keyboard.press("Control+s")
        self.page.wait_for_function(
            "() => !document.querySelector('.jp-mod-current.jp-mod-dirty, .lm-TabBar-tab.jp-mod-current.jp-mod-dirty')",
            timeout=30_000,
        )

    def error_texts(self) -> list[str]:
        """Texts of error outputs and of widgets that failed to display, as the browser shows them."""
        return self.page.evaluate(
            """() => [...document.querySelectorAll(
                 '.jp-Notebook [data-mime-type="application/vnd.jupyter.error"],'
               + ' .jp-Notebook .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
               .map(e => e.innerText.slice(0, 2000))
               .concat([...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output')]
               .filter(e => /Error displaying widget|model not found|Failed to load model/i.test(e.innerText))
               .map(e => e.innerText.slice(0, 2000)))"""
        )


@pytest.fixture
def lab(page, jupyterlab_server) -> JupyterLabDriver:
    """A JupyterLabDriver on the test's tab and the session's JupyterLab server."""
    return JupyterLabDriver(page, jupyterlab_server)
