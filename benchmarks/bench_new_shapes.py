"""Per-call time of the fused step when the batch's shape changes from call to call, as in RLHF.

``valueloss.fused`` calls its compiled graphs directly (``valueloss.fused._DirectCall``): dynamo's
guards are checked once per call *signature* (shape, strides, dtype, ... of every argument), not on
every call. RLHF batches change shape from one step to the next, so there most calls bring a
signature the memo has not seen and pay one guard check. Three methods, each
``ValueLoss(0.2, fused=True)`` forward and ``loss.backward()`` on fp32 inputs with a bool mask of shape
``(8, T)``, created just before the call (not timed), one thread:

* ``same_shape``: ``T = tokens / 8`` on every call: the memo answers;
* ``new_shape``: a ``T`` not seen before on every call (``T`` walks away from ``tokens / 8`` by one
  token per call, in both directions): one guard check per call;
* ``dynamo``: the same new shapes through ``torch.compile``'s own guarded call (the direct call
  switched off for these calls).

Each call index runs the three in an order of :func:`bench_value_loss.balanced_orders`, opened by
an untimed call of its first method (so each follows each, and itself, equally often; see
:func:`bench_value_loss.time_methods`), every call on fresh tensors (``new_shape`` and ``dynamo``
each on a shape of its own). We report medians and their ratios to ``dynamo`` from the same run, and
how many signatures the direct call's memo added per ``new_shape`` call (1 if every call missed it).

Usage: ``python benchmarks/bench_new_shapes.py [--tokens 16384 131072] [--calls 150] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_value_loss as bench  # noqa: E402 - the benchmark next to this file

from valueloss import ValueLoss, fused  # noqa: E402

ROWS = 8
METHODS = ("same_shape", "new_shape", "dynamo")


def make_inputs(tokens_per_row: int, seed: int):
    """(values, old_values, returns, bool mask) of shape (ROWS, tokens_per_row); values needs a gradient."""
    g = torch.Generator().manual_seed(seed)
    shape = (ROWS, tokens_per_row)
    values = torch.randn(shape, generator=g).requires_grad_(True)
    old_values = values.detach() + 0.3 * torch.randn(shape, generator=g)
    return values, old_values, torch.randn(shape, generator=g), torch.rand(shape, generator=g) > 0.2


def _direct_calls() -> list:
    return [kernel for kernel in fused._KERNELS.values() if isinstance(kernel, fused._DirectCall)]


@contextlib.contextmanager
def dynamos_guarded_calls():
    """Within: every compiled graph of the fused path is called through dynamo's guards (the direct call off)."""
    kernels = _direct_calls()
    before = [kernel.direct for kernel in kernels]
    for kernel in kernels:
        kernel.direct = False
    try:
        yield
    finally:
        for kernel, direct in zip(kernels, before):
            kernel.direct = direct


def _memo_size() -> int:
    return sum(len(kernel.by_signature) for kernel in _direct_calls())


def measure(tokens: int, calls: int, warmup: int = 5, seed: int = 0) -> dict:
    """Medians (seconds) of the three methods at ``tokens`` tokens, their ratios to ``dynamo``, and memo growth."""
    loss_fn = ValueLoss(0.2, fused=True)
    base = tokens // ROWS
    new_shapes_needed = 3 * (calls + warmup)
    if base <= new_shapes_needed // 2 + 1:
        raise ValueError(f"tokens must exceed {ROWS * (new_shapes_needed // 2 + 2)} for {calls} calls; got {tokens}")
    # T = base + 1, base - 1, base + 2, base - 2, ...: every new_shape or dynamo call gets a T of its own
    new_lengths = iter(base + k for step in range(1, new_shapes_needed // 2 + 2) for k in (step, -step))
    seeds = iter(range(seed, seed + 10 * new_shapes_needed))

    def fresh(name):
        return make_inputs(base if name == "same_shape" else next(new_lengths), next(seeds))

    def timed(name):
        inputs = fresh(name)
        context = dynamos_guarded_calls() if name == "dynamo" else contextlib.nullcontext()
        with context:
            start = time.perf_counter()
            loss_fn(*inputs).backward()
            return time.perf_counter() - start

    first_call = timed("same_shape")  # compiles (or loads) the kernels
    times = {name: [] for name in METHODS}
    orders = bench.balanced_orders(len(METHODS))
    memo_added = 0
    for index in range(warmup + calls):
        order = [METHODS[i] for i in orders[index % len(orders)]]
        timed(order[0])  # untimed: the first timed call follows its own method
        for name in order:
            memo_before = _memo_size()
            elapsed = timed(name)
            if index >= warmup:
                times[name].append(elapsed)
                if name == "new_shape":
                    memo_added += _memo_size() - memo_before
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "tokens": tokens,
        "calls": calls,
        "first_call_s": first_call,
        "median_s": medians,
        "vs_dynamo": {name: medians[name] / medians["dynamo"] for name in METHODS},
        "new_signatures_per_new_shape_call": memo_added / calls,
    }


def run(tokens=(16384, 131072), calls: int = 150, log=print) -> dict:
    machine = bench.machine_info()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        for n in tokens:
            row = measure(n, calls)
            rows.append(row)
            median, ratio = row["median_s"], row["vs_dynamo"]
            cells = [f"{name} {median[name] * 1e6:7.1f} us ({ratio[name]:.2f}x)" for name in METHODS]
            new_signatures = row["new_signatures_per_new_shape_call"]
            log(f"{n:>8} tokens: " + "  ".join(cells) + f"  new signatures per new_shape call {new_signatures:.2f}")
    finally:
        torch.set_num_threads(previous)
    bench.record_load_end(machine)
    return {"machine": machine, "threads": 1, "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 131072])
    parser.add_argument("--calls", type=int, default=150)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    bench.print_machine(bench.machine_info())
    result = run(args.tokens, args.calls)
    if args.json:
        bench.write_json(result, args.json)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
