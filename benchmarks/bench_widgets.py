"""Latency of the slider explorers in-process: slider change -> recomputed artists -> canvas painted / frame recorded.

Run from the repository root::

    .venv/bin/python benchmarks/bench_widgets.py            # 31 changes per explorer
    .venv/bin/python benchmarks/bench_widgets.py --quick    # 3 changes (a smoke run, used by tests)

For each explorer (the 1D loss/gradient explorer, the 256 x 256 surface explorer and the gradient
explorer, with the headless Agg backend) it times ``controls["clip_eps"].value = x`` for alternating
values: that runs the observer, recomputes every array through ``valueloss.functional``, moves the
artists and paints the Agg canvas (the explorer's fast path: changed artists blitted onto the cached
background; the canvas then holds the full picture, as a test checks). Then the same with the live
figure that JupyterLab and Voilà show (``live frame``, the ``"canvas"`` backend): the change plus writing
down the paths and images of the moving artists as the message the browser replays (the sending itself
is left out: there is no browser). ``dashboard`` is one change of the app's shared ``clip_eps``, which
updates all three live figures in turn. As baselines, measured in the same process:

* ``full redraw``: the same change followed by a complete ``canvas.draw()`` of the figure (what a
  naive explorer would pay);
* ``empty figure``: a full draw of a figure of the same size with the same number of empty axes
  (how fast matplotlib is on this machine right now).

Targets (issue 3, in-process): 1D <= 50 ms, planes <= 150 ms median. What the user waits for (kernel
messages, the browser decoding and painting) is measured end to end by tests/browser (issue 22); the
docs/explorers.md table puts both side by side. The machine (CPU, cores, load) is printed, because on a
shared machine the numbers move with the load.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from valueloss.viz import widgets  # noqa: E402

TARGETS_MS = {"1D explorer": 50.0, "surface explorer 256x256": 150.0, "gradient explorer 256x256": 150.0}


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """What the numbers were measured on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu_model(),
        "cores": f"{os.cpu_count()} (usable: {usable})",
        "load average (1/5/15 min)": " ".join(f"{x:.2f}" for x in load),
        "python": platform.python_version(),
        "torch": f"{torch.__version__} ({torch.get_num_threads()} threads)",
        "matplotlib": matplotlib.__version__,
        "numpy": np.__version__,
    }


def _median_ms(samples: list) -> float:
    return 1e3 * statistics.median(samples)


def _changes_ms(control, values: list, repeats: int, after=lambda: None) -> float:
    """Median ms of ``repeats`` changes of ``control`` through ``values`` (each followed by ``after()``)."""
    samples = []
    for i in range(repeats):
        start = time.perf_counter()
        control.value = values[i % len(values)]
        after()
        samples.append(time.perf_counter() - start)
    return _median_ms(samples)


def time_explorer(explorer, values: list, repeats: int) -> dict:
    """Median ms of a clip_eps change (fast path) and of a change + full canvas.draw()."""
    control = explorer.controls["clip_eps"]
    fast = _changes_ms(control, values, repeats)
    shifted = values[1:] + values[:1]  # every change moves the value, also from where the first loop ended
    full = _changes_ms(control, shifted, repeats, after=explorer.figure.canvas.draw)
    return {"fast": fast, "full": full}


def time_live(make, values: list, repeats: int) -> float | None:
    """Median ms of a clip_eps change on the live figure, its frame included (None without anywidget)."""
    try:
        explorer = make("canvas")
    except RuntimeError:  # anywidget missing: the explorer says so
        return None
    frames = []
    explorer.view.observe(lambda change: frames.append(len(change["new"])), names="frame")
    control = explorer.controls["clip_eps"]
    control.value = 0.5  # warm-up
    median = _changes_ms(control, values, repeats)
    explorer.close()
    assert len(frames) == repeats + 1, "the live figure did not get one frame per change"
    return median


def time_dashboard(values: list, repeats: int) -> float | None:
    """Median ms of one change of the app's shared clip_eps: three live frames (None without anywidget)."""
    from valueloss.viz import app

    try:
        board = app.Dashboard(backend="canvas")
    except RuntimeError:
        return None
    control = board.controls["clip_eps"]
    control.value = 0.5  # warm-up
    median = _changes_ms(control, values, repeats)
    board.close()
    return median


def time_empty_figure(figsize: tuple, ncols: int, repeats: int) -> float:
    """Median milliseconds of a full Agg draw of an empty figure with ``ncols`` axes."""
    figure = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(figure)
    figure.subplots(1, ncols)
    figure.canvas.draw()
    figure.set_layout_engine("none")
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        figure.canvas.draw()
        samples.append(time.perf_counter() - start)
    return _median_ms(samples)


def run(repeats: int) -> dict:
    """Measure the explorers; returns {name: {"fast", "live", "full", "empty", "target"}} in milliseconds."""
    # 0.05 and 0.95 alternate so that every change really changes the picture; a few more values
    # keep the sequence from being a two-state toggle.
    values = [0.05, 0.95, 0.3, 0.7, 0.15]
    results = {}
    for name, make in (
        ("1D explorer", lambda backend: widgets.LossCurveExplorer(backend=backend)),
        ("surface explorer 256x256", lambda backend: widgets.SurfaceExplorer(backend=backend, num=256)),
        ("gradient explorer 256x256", lambda backend: widgets.GradientExplorer(backend=backend, num=256)),
    ):
        explorer = make("agg")
        explorer.controls["clip_eps"].value = 0.5  # warm-up: first change pays one-off costs
        timing = time_explorer(explorer, values, repeats)
        timing["live"] = time_live(make, values, repeats)
        timing["empty"] = time_empty_figure(explorer.figsize, len(explorer.axes), repeats)
        timing["target"] = TARGETS_MS[name]
        explorer.close()
        results[name] = timing
    results["dashboard"] = {"live": time_dashboard(values, repeats)}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31, help="slider changes per explorer (default 31)")
    parser.add_argument("--quick", action="store_true", help="3 changes per explorer: a smoke run, not a measurement")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    print("valueloss widget latency, in-process: slider change -> recompute -> canvas painted (or live frame recorded)")
    for key, value in machine_info().items():
        print(f"  {key:<26} {value}")
    print(f"  {'changes per explorer':<26} {repeats}{' (quick: not a measurement)' if args.quick else ''}")
    results = run(repeats)
    print()
    def ms(value) -> str:
        return "n/a" if value is None else f"{value:.1f} ms"

    print(f"{'explorer':<26} {'median':>9} {'target':>8} {'met':>4} {'live frame':>13} {'full redraw':>12}"
          f" {'empty figure':>13} {'full/median':>12}")
    for name, t in results.items():
        if name == "dashboard":
            print(f"{'dashboard (all three)':<26} {'':>9} {'':>8} {'':>4} {ms(t['live']):>13}")
            continue
        met = "yes" if t["fast"] <= t["target"] else "no"
        print(f"{name:<26} {t['fast']:>6.1f} ms {t['target']:>5.0f} ms {met:>4} {ms(t['live']):>13}"
              f" {t['full']:>9.1f} ms {t['empty']:>10.1f} ms {t['full'] / t['fast']:>11.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
