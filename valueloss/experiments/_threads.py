"""Run a block on one torch thread, then restore the caller's setting."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """``torch.set_num_threads(1)`` inside the block: a run's numbers then do not depend on the machine's cores.

    Intra-op parallelism splits some reductions differently with more threads, which changes the last bits of
    a result and, over thousands of optimiser steps, the printed digits.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
