"""Tests of benchmarks/bench_new_shapes.py: it runs as a user runs it, and measures what it says (times are
reported, never asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from valueloss import fused

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_new_shapes.py"
sys.path.insert(0, str(SCRIPT.parent))
import bench_new_shapes  # noqa: E402 - the benchmark under test

needs_compiler = pytest.mark.skipif(not fused.compile_available("cpu"), reason="no C++ compiler for inductor")


@needs_compiler
def test_command_line_run_measures_misses_and_hits(tmp_path):
    """Every new_shape call adds one signature to the direct call's memo (a miss); the JSON has every method."""
    out = tmp_path / "new_shapes.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tokens", "2048", "--calls", "12", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["cores"] >= 1 and "machine:" in proc.stdout and result["threads"] == 1
    (row,) = result["rows"]
    assert row["tokens"] == 2048 and row["calls"] == 12
    assert set(row["median_s"]) == set(bench_new_shapes.METHODS)
    assert all(math.isfinite(t) and t > 0 for t in row["median_s"].values())
    assert row["vs_dynamo"]["dynamo"] == 1.0
    assert row["new_signatures_per_new_shape_call"] == 1.0
    assert "2048 tokens" in proc.stdout


@needs_compiler
def test_dynamos_guarded_calls_switches_the_direct_call_off_and_back():
    """Inside the context no fused kernel is called directly, and the memo does not grow; afterwards it is."""
    loss_fn = bench_new_shapes.ValueLoss(0.2, fused=True)
    loss_fn(*bench_new_shapes.make_inputs(100, seed=0)).backward()
    kernels = bench_new_shapes._direct_calls()
    assert kernels and all(kernel.direct for kernel in kernels)
    before = bench_new_shapes._memo_size()
    with bench_new_shapes.dynamos_guarded_calls():
        assert not any(kernel.direct for kernel in kernels)
        loss_fn(*bench_new_shapes.make_inputs(101, seed=1)).backward()
        assert bench_new_shapes._memo_size() == before
    assert all(kernel.direct for kernel in kernels)
    loss_fn(*bench_new_shapes.make_inputs(102, seed=2)).backward()
    assert bench_new_shapes._memo_size() == before + 1


def test_too_few_tokens_for_the_calls_is_refused():
    with pytest.raises(ValueError, match="tokens must exceed"):
        bench_new_shapes.measure(tokens=64, calls=50)
