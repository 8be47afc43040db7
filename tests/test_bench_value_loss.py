"""Tests of benchmarks/bench_value_loss.py: its short mode runs end to end (times are reported, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_value_loss.py"
METHODS = {"reference", "eager", "default", "fused", "fused_recompute", "floor"}


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """The --short benchmark, run once as a user would, with its JSON output loaded."""
    out = tmp_path_factory.mktemp("bench") / "short.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--short", "--json", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_short_mode_reports_machine_and_every_method(short_run):
    """The short run prints the machine and gives one row per method for each of its configurations."""
    stdout, result = short_run
    machine = result["machine"]
    assert machine["cores"] >= 1 and machine["torch"] and "machine:" in stdout
    settings = result["settings"]
    assert settings["short"] is True
    configs = {(r["size"], r["dtype"], r["mask"], r["threads"]) for r in result["rows"]}
    assert len(configs) == len(settings["sizes"]) * len(settings["dtypes"]) * len(settings["masks"])
    for config in configs:
        rows = [r for r in result["rows"] if (r["size"], r["dtype"], r["mask"], r["threads"]) == config]
        assert {r["method"] for r in rows} == METHODS


def test_ratios_are_against_the_same_run(short_run):
    """Every ratio is computed from the medians of the same run (reference = 1x, floor = 1x floor)."""
    _, result = short_run
    for row in result["rows"]:
        assert len(row["times_s"]) == result["settings"]["repeats"] and row["median_s"] > 0
        if row["method"] == "reference":
            assert row["speedup_vs_reference"] == 1.0
        if row["method"] == "floor":
            assert row["ratio_to_floor"] == 1.0


def test_peak_memory_of_fused_path_is_the_gradient_alone(short_run):
    """Memory is deterministic: the fused step allocates only values.grad (1x), recomputing or not; reference ~9.5x."""
    _, result = short_run
    for row in result["rows"]:
        if row["method"] in ("fused", "fused_recompute"):
            assert 1.0 <= row["peak_extra_vs_input"] <= 1.01
        if row["method"] == "reference":
            assert row["peak_extra_vs_input"] >= 5.0


def test_markdown_report_has_one_row_per_configuration_with_the_files_numbers(short_run):
    """--report's table lists each configuration once, with the speed-up and peak memory of the results file."""
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_value_loss as bench

    _, result = short_run
    text = bench.markdown_report(result, sizes=("1M",))
    table = [line for line in text.splitlines() if line.startswith("| 1M")]
    fused = [r for r in result["rows"] if r["method"] == "fused" and r["size"] == "1M"]
    assert len(table) == len(fused) == 1
    assert f"| {fused[0]['speedup_vs_reference']:.1f}x |" in table[0]
    assert f"/ {fused[0]['peak_extra_vs_input']:.2f}x |" in table[0]
    recompute = [r for r in result["rows"] if r["method"] == "fused_recompute" and r["size"] == "1M"]
    assert f"| {recompute[0]['speedup_vs_reference']:.1f}x |" in table[0]
    assert "- fused speedup vs reference: met in" in text


def test_readme_table_is_the_report_of_the_shipped_results():
    """The README's performance table is --report of benchmarks/results/cpu_full.json, line for line."""
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_value_loss as bench

    report = bench.markdown_report(bench.load_results(ROOT / "benchmarks" / "results" / "cpu_full.json"))
    table = [line for line in report.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 16
    assert "\n".join(table) in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("n", range(1, 9))
def test_balanced_orders_let_every_method_follow_every_other_equally_often(n):
    """Each order is a permutation, and every ordered pair (a just before b, a != b) occurs equally often."""
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_value_loss as bench

    orders = bench.balanced_orders(n)
    assert len(orders) == (n if n % 2 == 0 else 2 * n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    pairs = {}
    for order in orders:
        for a, b in zip(order, order[1:]):
            pairs[a, b] = pairs.get((a, b), 0) + 1
    expected = {(a, b) for a in range(n) for b in range(n) if a != b}
    assert set(pairs) == expected
    assert len(set(pairs.values())) <= 1


@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_timed_calls_follow_every_method_equally_often_across_repetitions(n, monkeypatch):
    """On the executed sequence (untimed calls included), each method's timed calls have every method as
    predecessor equally often, over whole cycles of the design: no carryover from one repetition's end."""
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_value_loss as bench

    events = []
    clock = iter(range(10**6))
    def perf_counter():  # the clock is read twice per timed call: before it ("start") and after it
        tick = next(clock)
        events.append("end" if tick % 2 else "start")
        return float(tick)

    monkeypatch.setattr(bench.time, "perf_counter", perf_counter)
    steps = {name: (lambda name=name: events.append(name)) for name in range(n)}
    cycle = len(bench.balanced_orders(n))
    first, times = bench.time_methods(steps, repeats=2 * cycle)
    assert all(len(t) == 2 * cycle for t in times.values())
    calls = [(i > 0 and events[i - 1] == "start", e) for i, e in enumerate(events) if e not in ("start", "end")]
    timed = [(calls[k - 1][1], name) for k, (is_timed, name) in enumerate(calls) if is_timed and k > 0]
    timed = timed[n - 1:]  # after the first calls (timed separately, with no predecessor for the first)
    assert len(timed) == 2 * cycle * n
    counts = {}
    for pair in timed:
        counts[pair] = counts.get(pair, 0) + 1
    assert set(counts) == {(a, b) for a in range(n) for b in range(n)}
    assert len(set(counts.values())) == 1
