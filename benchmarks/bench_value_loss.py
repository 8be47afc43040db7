"""Forward+backward time and peak extra memory of PPO's value loss: the reference, ours (eager and fused), a floor.

Methods (all with ``clip_eps=0.2``, token-mean over the mask, ``variant="max"``):

* ``reference``: OpenRLHF's formula written out here (``openrlhf/models/loss.py::ValueLoss`` with
  ``token_level_loss=True``, checked 2026-11-25), under autograd, in the inputs' dtype;
* ``default``: ``ValueLoss(0.2)``, what users get: our eager path under autograd (float32 accumulation,
  NaN-safe masking);
* ``fused``: ``ValueLoss(0.2, fused=True)`` under ``loss.backward()``: one compiled function computes the loss
  and its gradient (inductor's C++/OpenMP code on CPU); backward multiplies that gradient by the incoming one;
* ``floor``: a streaming pass that reads the four inputs once and writes one tensor
  (``values + old_values + returns * mask``, compiled into one loop with ``torch.compile``, called like the
  fused path's function: dynamo's guards on every call): no loss can be cheaper. A bool mask is read as
  bytes converted to float32, as the fused path reads it (inductor's vectorised CPU load of bool is several
  times slower, and a floor that paid for it would not be a floor).

Timing: every repetition runs each method once, in turn (interleaved, so that load on the
machine hits all methods alike), in the orders of a Williams design (:func:`balanced_orders`):
across the repetitions each method follows every other method (and, through an untimed call that
opens each repetition, itself) equally often (:func:`time_methods`). What ran just before
matters (the reference leaves the caches cold and the allocator busy; a method that reads the same
inputs leaves them warm). We report medians and their ratios to ``reference`` from the same
run. The first call of each method and shape is timed separately (``first_call_s``: compilation
for ``fused``/``floor``) and excluded from the medians.

Peak extra memory: each method runs once more under ``torch.profiler`` with
``profile_memory=True``, which records every allocation and free of the CPU (or CUDA) allocator
with its size; the running sum of those events, started with the inputs already allocated, peaks
at ``peak_extra_bytes``. It counts everything the step allocates and holds at that moment: tensors
saved for backward, temporaries, and the gradient ``values.grad`` itself (1x the input for fp32).
Ratios are to the size of one input tensor (``values``).

Usage: ``python benchmarks/bench_value_loss.py [--short] [--json out.json]``; ``--report out.json`` prints
the docs page's table and target summary of a results file (docs/fused.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from valueloss import ValueLoss

SIZES = {"4K": 4096, "128K": 131072, "1M": 1 << 20, "4M": 1 << 22}
TOKENS_PER_SEQUENCE = 1024
CLIP_EPS = 0.2
METHODS = ("reference", "default", "fused", "floor")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def openrlhf_value_loss(values, old_values, returns, action_mask, clip_eps=CLIP_EPS):
    """OpenRLHF's ``ValueLoss.forward`` with ``token_level_loss=True`` (masked_mean over all tokens)."""
    values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    surr1 = (values_clipped - returns) ** 2
    surr2 = (values - returns) ** 2
    loss = torch.max(surr1, surr2)
    loss = (loss * action_mask).sum() / action_mask.sum()
    return 0.5 * loss


def _streaming_pass(values, old_values, returns, action_mask):
    if action_mask.dtype == torch.uint8:  # a bool mask's bytes, converted as the fused path converts them
        action_mask = action_mask.to(values.dtype)
    return values + old_values + returns * action_mask


def make_inputs(numel, dtype, mask_kind, device="cpu", seed=0):
    """(values, old_values, returns, action_mask) of shape (numel // 1024, 1024); values needs a gradient."""
    g = torch.Generator().manual_seed(seed)
    shape = (numel // TOKENS_PER_SEQUENCE, TOKENS_PER_SEQUENCE)
    values = torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    old_values = (values.detach().float() + 0.3 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)
    returns = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    mask = torch.rand(shape, generator=g) > 0.2
    action_mask = mask.to(device) if mask_kind == "bool" else mask.to(device=device, dtype=dtype)
    return values, old_values, returns, action_mask


def make_steps(inputs):
    """One callable per method, each a full forward + backward (the floor: its one pass).

    The gradient of the previous call is dropped before each call (see :func:`time_methods`), so
    that neither its freeing nor its memory is counted.
    """
    values, old_values, returns, action_mask = inputs
    floor = torch.compile(_streaming_pass, dynamic=True, fullgraph=True)
    modules = {"default": ValueLoss(CLIP_EPS), "fused": ValueLoss(CLIP_EPS, fused=True)}

    def loss_step(loss_fn):
        def step():
            loss_fn(values, old_values, returns, action_mask).backward()

        return step

    steps = {"reference": loss_step(openrlhf_value_loss)}
    steps.update({name: loss_step(module) for name, module in modules.items()})
    mask_bytes = action_mask.view(torch.uint8) if action_mask.dtype == torch.bool else action_mask

    def floor_step():
        return floor(values.detach(), old_values, returns, mask_bytes)

    steps["floor"] = floor_step
    return steps


def drop_grad(inputs):
    """Forget ``values.grad`` (called before every timed or profiled step, outside the measurement)."""
    inputs[0].grad = None


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def balanced_orders(n):
    """A Williams design: ``n`` orders of ``range(n)`` in which every element follows every other one
    equally often (exactly once for even ``n``, twice over the 2n orders returned for odd ``n``).

    Williams, E. J. (1949), *Experimental designs balanced for the estimation of residual effects of
    treatments*, Australian Journal of Scientific Research A 2(3): the first row 0, 1, n-1, 2, n-2, ...,
    each further row adds 1 modulo n; for odd ``n`` the mirrored rows are added.
    """
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    rows = [[(x + i) % n for x in first] for i in range(n)]
    return rows if n % 2 == 0 else rows + [row[::-1] for row in rows]


def time_methods(steps, repeats, device="cpu", reset=lambda: None):
    """(first-call seconds, list of timings) per method, interleaved in every repetition in the
    carryover-balanced orders of :func:`balanced_orders` (cycled through as the repetitions go).

    Each repetition starts with an untimed call of its first method. Without it, the last call of
    one order would precede the first call of the next, one more predecessor per method and cycle,
    and an unbalanced one (with six methods ``fused`` followed ``default``, warm, and ``default``
    the reference, cold; with four, an identical copy of a method measured 5-20% slower than the
    original). With it, every timed call of a method is preceded by each other method, and by
    itself, equally often.
    """
    first, times = {}, {name: [] for name in steps}
    for name, step in steps.items():
        reset()
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        first[name] = time.perf_counter() - start
    for step in steps.values():  # one more warm-up call each
        reset()
        step()
    names, orders = list(steps), balanced_orders(len(steps))
    for rep in range(repeats):
        order = [names[i] for i in orders[rep % len(orders)]]
        reset()
        steps[order[0]]()  # untimed: the first timed call follows its own method (see above)
        for name in order:
            reset()
            _sync(device)
            start = time.perf_counter()
            steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return first, times


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler library's start/stop lines, which it writes straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(step, device="cpu", reset=lambda: None):
    """Peak of (allocated - freed) bytes during one call of ``step``, from the profiler's memory events."""
    reset()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def saved_for_backward_bytes(loss_fn, inputs):
    """Bytes of the tensors autograd keeps for backward after ``loss_fn(*inputs)``, inputs not counted.

    Counted with ``torch.autograd.graph.saved_tensors_hooks``: every tensor an operation (or our
    ``autograd.Function``) saves passes through the pack hook; distinct storages are summed once.
    """
    input_storages = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in input_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(*inputs)
    return sum(saved.values())


def load_results(path):
    """A results file written by ``--json``."""
    with open(path) as f:
        return json.load(f)


def series(result, method, key="median_s", dtype="fp32", mask="bool", threads=1):
    """(numels, values of ``key``) of one method over the sizes, for one dtype, mask kind and thread count."""
    rows = [
        r for r in result["rows"]
        if r["method"] == method and r["dtype"] == dtype and r["mask"] == mask and r["threads"] == threads
    ]
    rows.sort(key=lambda r: r["numel"])
    return [r["numel"] for r in rows], [r[key] for r in rows]


TARGETS = ("fused speed-up vs reference >= 10", "fused time / floor <= 3", "fused peak extra / input <= 2",
           "default time / reference <= 1.3", "default peak / reference peak <= 1")
TARGET_CONFIG = ("fp32", "bool", 1)
"""(dtype, mask, threads) of the issue's targets; the other configurations are reported, not judged."""


def targets(result):
    """The issue's targets as ``(configuration, target, measured, met?)`` tuples, for the rows the run has.

    In fp32 with a bool mask on one thread: ``fused`` at least 10x faster than the reference at 1M and 4M
    tokens, within 3x of the floor there, with a peak extra memory of at most 2x the input; ``default`` (the
    eager path) at most 1.3x the reference's time at 4K tokens. In fp32 (every mask, thread count and size):
    ``default``'s peak extra memory no larger than the reference's.
    """
    rows = {config_key(r) + (r["method"],): r for r in result["rows"]}
    checks = []
    for (size, dtype, mask, threads, method), r in sorted(rows.items(), key=lambda item: (item[1]["numel"], item[0])):
        config = f"{size} {dtype} {mask} {threads}t"
        judged = (dtype, mask, threads) == TARGET_CONFIG
        if method == "fused" and judged and size in ("1M", "4M"):
            checks.append((config, "fused speed-up vs reference >= 10", r["speedup_vs_reference"],
                           r["speedup_vs_reference"] >= 10))
            checks.append((config, "fused time / floor <= 3", r["ratio_to_floor"], r["ratio_to_floor"] <= 3))
            checks.append((config, "fused peak extra / input <= 2", r["peak_extra_vs_input"],
                           round(r["peak_extra_vs_input"], 2) <= 2))
        if method == "default" and judged and size == "4K":
            ratio = 1 / r["speedup_vs_reference"]
            checks.append((config, "default time / reference <= 1.3", ratio, ratio <= 1.3))
        if method == "default" and dtype == "fp32":
            ratio = r["peak_extra_bytes"] / rows[(size, dtype, mask, threads, "reference")]["peak_extra_bytes"]
            checks.append((config, "default peak / reference peak <= 1", ratio, round(ratio, 2) <= 1))
    return checks


def config_key(row):
    """``(size, dtype, mask, threads)``: the configuration a results row belongs to (all methods share it)."""
    return row["size"], row["dtype"], row["mask"], row["threads"]


def markdown_report(result):
    """The docs page's table of a results file (one row per configuration) and its target summary."""
    rows = {config_key(r) + (r["method"],): r for r in result["rows"]}
    configs = sorted(
        {key[:4] for key in rows},
        key=lambda c: (SIZES[c[0]], c[3], list(DTYPES).index(c[1]), c[2]),
    )
    lines = [
        "| tokens | dtype | mask | threads | reference | default | fused | fused speed-up | fused / floor "
        "| default / reference | peak extra: reference / default / fused |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config in configs:
        ref, default, fus = (rows[config + (m,)] for m in ("reference", "default", "fused"))
        peaks = [ref["peak_extra_vs_input"], default["peak_extra_vs_input"], fus["peak_extra_vs_input"]]
        lines.append(
            f"| {' | '.join(map(str, config))} | {_ms(ref['median_s'])} | {_ms(default['median_s'])} "
            f"| {_ms(fus['median_s'])} | {fus['speedup_vs_reference']:.1f}x | {fus['ratio_to_floor']:.2f} "
            f"| {1 / default['speedup_vs_reference']:.2f} | {peaks[0]:.2f}x / {peaks[1]:.2f}x / {peaks[2]:.2f}x |"
        )
    lines.append("")
    checks = targets(result)
    for name in TARGETS:
        rows_ = [c for c in checks if c[1] == name]
        if not rows_:
            continue
        met, missed = [c for c in rows_ if c[3]], [c for c in rows_ if not c[3]]
        listed = lambda cs: ", ".join(f"{c[0]}: {c[2]:.2f}" for c in cs)  # noqa: E731
        if not missed:
            lines.append(f"- {name}: met ({listed(met)})")
        elif not met:
            lines.append(f"- {name}: NOT met ({listed(missed)})")
        else:
            lines.append(f"- {name}: met in {len(met)} of {len(rows_)}; NOT met in {listed(missed)}")
    return "\n".join(lines)


def _ms(seconds):
    """A time in milliseconds with three significant digits."""
    ms = seconds * 1e3
    return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"


def machine_info():
    """CPU model, core count, torch version and load: where and under what conditions this ran."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def record_load_end(machine):
    """Add the load average at the end of a run to ``machine`` (a :func:`machine_info` taken at its start)."""
    if hasattr(os, "getloadavg"):
        machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]


def print_machine(info):
    """The first line of every benchmark's output: where it runs, and under what load."""
    load = info.get("load_average_start")
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, load average {load}")


def write_json(result, path):
    """Write a benchmark's results as JSON to ``path`` and say so."""
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


def run(short=False, device="cpu", repeats=None, sizes=None, dtypes=None, masks=None, threads=None, log=print):
    """Run the benchmark; returns a JSON-ready dict (machine, settings, one row per configuration and method)."""
    sizes = sizes or (["4K", "1M"] if short else list(SIZES))
    dtypes = dtypes or (["fp32"] if short else list(DTYPES))
    masks = masks or (["bool"] if short else ["float", "bool"])
    threads = threads or ([1] if short else [1, 2])
    repeats = repeats or (8 if short else 20)  # whole Williams squares: 4 methods, 4 orders
    result = {
        "machine": machine_info(),
        "settings": {
            "short": short, "device": device, "repeats": repeats, "sizes": sizes, "dtypes": dtypes, "masks": masks,
            "threads": threads, "tokens_per_sequence": TOKENS_PER_SEQUENCE, "clip_eps": CLIP_EPS,
        },
        "rows": [],
    }
    threads_before = torch.get_num_threads()
    try:
        # Compile with the machine's thread count first (inductor sizes its OpenMP code then).
        for n_threads in sorted(threads, reverse=True):
            torch.set_num_threads(n_threads)
            for dtype_name in dtypes:
                for mask_kind in masks:
                    for size in sizes:
                        rows = _run_config(size, dtype_name, mask_kind, n_threads, device, repeats)
                        result["rows"].extend(rows)
                        log(_format_rows(rows))
    finally:
        torch.set_num_threads(threads_before)
    record_load_end(result["machine"])
    return result


def _run_config(size, dtype_name, mask_kind, n_threads, device, repeats):
    numel = SIZES[size]
    inputs = make_inputs(numel, DTYPES[dtype_name], mask_kind, device)
    steps = make_steps(inputs)
    reset = lambda: drop_grad(inputs)  # noqa: E731
    first, times = time_methods(steps, repeats, device, reset)
    input_bytes = inputs[0].numel() * inputs[0].element_size()
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    rows = []
    for name in METHODS:
        peak = peak_extra_bytes(steps[name], device, reset)
        rows.append({
            "size": size, "numel": numel, "dtype": dtype_name, "mask": mask_kind, "threads": n_threads,
            "method": name, "median_s": medians[name], "times_s": times[name], "first_call_s": first[name],
            "speedup_vs_reference": medians["reference"] / medians[name],
            "ratio_to_floor": medians[name] / medians["floor"],
            "peak_extra_bytes": peak, "peak_extra_vs_input": peak / input_bytes,
        })
    return rows


def _format_rows(rows):
    head = rows[0]
    lines = [f"{head['size']:>5} {head['dtype']} {head['mask']:<5} threads={head['threads']}"]
    for row in rows:
        lines.append(
            f"    {row['method']:<10} {row['median_s'] * 1e3:9.3f} ms  x{row['speedup_vs_reference']:7.2f} vs reference"
            f"  {row['ratio_to_floor']:6.2f} x floor  peak extra {row['peak_extra_vs_input']:5.2f} x input"
            f"  (first call {row['first_call_s']:.2f} s)"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="fp32, bool mask, 4K and 1M tokens, 1 thread, 8 repeats")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--report", metavar="RESULTS.json", help="print the docs table of a results file and exit")
    args = parser.parse_args(argv)
    if args.report:
        print(markdown_report(load_results(args.report)))
        return None
    print_machine(machine_info())
    result = run(short=args.short, device=args.device, repeats=args.repeats)
    if args.json:
        write_json(result, args.json)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
