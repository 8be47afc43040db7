"""The names of the loss's settings, in a module without torch (the ``valueloss inspect`` command needs them)."""

from __future__ import annotations

__all__ = ["AGGREGATION_MODES", "LOSS_TYPES", "VARIANTS"]

AGGREGATION_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
VARIANTS = ("max", "clipped")
LOSS_TYPES = ("squared", "huber")
