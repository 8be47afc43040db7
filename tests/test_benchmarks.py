"""benchmarks/bench_widgets.py runs end to end in its quick mode (a smoke run: times are not asserted)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_widgets_quick_run_reports_machine_and_medians():
    """The benchmark prints the machine, torch/matplotlib versions and a median line per explorer."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_widgets.py"), "--quick"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    out = result.stdout
    for needle in ("cpu", "cores", "torch", "matplotlib", "1D explorer", "surface explorer 256x256"):
        assert needle in out, f"{needle!r} missing from:\n{out}"
    rows = [line for line in out.splitlines() if line.startswith(("1D explorer", "surface explorer"))]
    assert len(rows) == 2 and all(" ms" in row for row in rows)
