"""benchmarks/bench_widgets.py runs end to end in its quick mode (a smoke run: times are not asserted)."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_widgets", ROOT / "benchmarks" / "bench_widgets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_widgets_quick_run_reports_machine_and_medians(capsys):
    """The benchmark prints the machine, torch/matplotlib versions and a median line per explorer (run in
    this process: the same main() the command line calls, without a second interpreter importing torch)."""
    assert _load_benchmark().main(["--quick"]) == 0
    out = capsys.readouterr().out
    for needle in ("cpu", "cores", "torch", "matplotlib", "1D explorer", "surface explorer 256x256",
                   "gradient explorer 256x256", "live frame", "dashboard (all three)"):
        assert needle in out, f"{needle!r} missing from:\n{out}"
    rows = [line for line in out.splitlines()
            if line.startswith(("1D explorer", "surface explorer", "gradient explorer"))]
    assert len(rows) == 3 and all(row.count(" ms") >= 4 for row in rows), rows
    dashboard = next(line for line in out.splitlines() if line.startswith("dashboard"))
    assert dashboard.rstrip().endswith(" ms"), dashboard
