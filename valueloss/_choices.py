"""The names of the loss's settings, in a module without torch (the ``valueloss inspect`` command needs them)."""

from __future__ import annotations

__all__ = ["AGGREGATION_MODES", "LOSS_TYPES", "VARIANTS", "check_choice"]

AGGREGATION_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
VARIANTS = ("max", "clipped")
LOSS_TYPES = ("squared", "huber")


def check_choice(value: object, choices: tuple, name: str) -> str:
    """``value`` if it is one of ``choices``; else a ``ValueError`` naming ``name``, the choices and ``value``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value  # type: ignore[return-value]
