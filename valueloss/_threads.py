"""Run a block on one torch thread, then restore the caller's setting (used by plotting and experiments)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """``torch.set_num_threads(1)`` inside the block, then the caller's setting again.

    Two uses: experiments get the same digits on every machine (intra-op parallelism splits some
    reductions differently with more threads, which changes the last bits of a result and, over
    thousands of optimiser steps, the printed digits); plotting's small grids (<= 256 x 256) run
    faster, since splitting each elementwise op across threads costs more than it saves (on a busy
    2-core machine a 256 x 256 surface took 120 ms instead of 2.4 ms, measured 2026-11-25).
    Does nothing when torch already runs on one thread.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
