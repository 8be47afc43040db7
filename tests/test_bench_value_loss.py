"""Tests of benchmarks/bench_value_loss.py: a small run in-process (times are reported, never asserted), its
report, and the design that orders the methods."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from valueloss import fused

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_value_loss as bench  # noqa: E402 - the benchmark under test

METHODS = {"reference", "default", "fused", "floor"}


@pytest.fixture(scope="module")
def small_run():
    """The benchmark at 4K and 128K tokens, fp32, bool mask, one thread, 4 repeats, run once in this process."""
    if fused._OLD_TORCH is not None:
        pytest.skip(fused._OLD_TORCH)
    return bench.run(sizes=["4K", "128K"], dtypes=["fp32"], masks=["bool"], threads=[1], repeats=4,
                     log=lambda text: None)


@pytest.mark.compile
def test_a_run_reports_machine_settings_and_every_method(small_run):
    """The results name the machine and its load, and hold one row per method and configuration, JSON-ready."""
    machine, settings = small_run["machine"], small_run["settings"]
    assert machine["cores"] >= 1 and machine["torch"] and "load_average_start" in machine
    assert settings["sizes"] == ["4K", "128K"] and settings["repeats"] == 4
    for size in settings["sizes"]:
        assert {r["method"] for r in small_run["rows"] if r["size"] == size} == METHODS
    assert json.loads(json.dumps(small_run)) == small_run


@pytest.mark.compile
def test_ratios_are_against_the_same_run(small_run):
    """Every ratio comes from the medians of the same run (reference = 1x, floor = 1x floor)."""
    for row in small_run["rows"]:
        assert len(row["times_s"]) == small_run["settings"]["repeats"] and row["median_s"] > 0
        if row["method"] == "reference":
            assert row["speedup_vs_reference"] == 1.0
        if row["method"] == "floor":
            assert row["ratio_to_floor"] == 1.0


@pytest.mark.compile
def test_peak_memory_of_the_fused_step_is_the_gradient_alone(small_run):
    """Memory is deterministic: the fused step allocates values.grad (1x) and a few scalars; the reference
    holds several input-sized tensors."""
    for row in small_run["rows"]:
        if row["method"] == "fused" and row["size"] == "128K":
            assert 1.0 <= row["peak_extra_vs_input"] <= 1.01
        if row["method"] == "reference":
            assert row["peak_extra_vs_input"] >= 5.0


@pytest.mark.compile
def test_report_has_one_row_per_configuration_and_every_target(small_run):
    """--report's table lists each configuration once, with the run's numbers, then one line per target."""
    text = bench.markdown_report(small_run)
    table = [line for line in text.splitlines() if line.startswith("| 128K")]
    fused_row = next(r for r in small_run["rows"] if r["method"] == "fused" and r["size"] == "128K")
    assert len(table) == 1 and f"| {fused_row['speedup_vs_reference']:.1f}x |" in table[0]
    assert f"/ {fused_row['peak_extra_vs_input']:.2f}x |" in table[0]
    assert "- default time / reference <= 1.3: " in text  # 4K; the fused targets are at 1M and 4M only
    assert "- default peak / reference peak <= 1: " in text


def test_targets_judge_the_issues_configuration_only():
    """The fused targets apply at 1M and 4M tokens in fp32 with a bool mask on one thread; the default's time
    target at 4K there; its memory target in fp32 everywhere."""
    def row(size, method, dtype="fp32", mask="bool", threads=1, speedup=1.0, floor=1.0, peak=1.0, peak_bytes=1):
        return dict(size=size, numel=bench.SIZES[size], dtype=dtype, mask=mask, threads=threads, method=method,
                    speedup_vs_reference=speedup, ratio_to_floor=floor, peak_extra_vs_input=peak,
                    peak_extra_bytes=peak_bytes)

    result = {"rows": [
        row("1M", "fused", speedup=12, floor=2.5, peak=1.0), row("1M", "reference", peak_bytes=10),
        row("1M", "default", peak_bytes=9),
        row("4M", "fused", mask="float", speedup=2), row("4M", "reference", mask="float", peak_bytes=10),
        row("4M", "default", mask="float", peak_bytes=11),
        row("4K", "default", speedup=1 / 1.4, peak_bytes=5), row("4K", "reference", peak_bytes=5),
    ]}
    checks = {(c[0], c[1]): c[3] for c in bench.targets(result)}
    assert checks == {
        ("1M fp32 bool 1t", "fused speed-up vs reference >= 10"): True,
        ("1M fp32 bool 1t", "fused time / floor <= 3"): True,
        ("1M fp32 bool 1t", "fused peak extra / input <= 2"): True,
        ("1M fp32 bool 1t", "default peak / reference peak <= 1"): True,
        ("4M fp32 float 1t", "default peak / reference peak <= 1"): False,
        ("4K fp32 bool 1t", "default time / reference <= 1.3"): False,
        ("4K fp32 bool 1t", "default peak / reference peak <= 1"): True,
    }


def test_docs_table_is_the_report_of_the_shipped_results():
    """docs/fused.md's benchmark table and target lines are --report of benchmarks/results/cpu_full.json."""
    report = bench.markdown_report(bench.load_results(ROOT / "benchmarks" / "results" / "cpu_full.json"))
    assert report in (ROOT / "docs" / "fused.md").read_text()


@pytest.mark.parametrize("n", range(1, 9))
def test_balanced_orders_let_every_method_follow_every_other_equally_often(n):
    """Each order is a permutation, and every ordered pair (a just before b, a != b) occurs equally often."""
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
