"""Every check of an argument, in one place: a ``TypeError`` for a wrong type, a ``ValueError`` for a bad
value, both naming the argument and saying what was expected and what arrived.

Nothing here reads a tensor's values (that would synchronise with the host on a GPU): tensors are checked
by type, dtype, shape and device only.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = [
    "AGGREGATION_MODES",
    "LOSS_TYPES",
    "MAX_DP_SIZE",
    "VARIANTS",
    "check_choice",
    "check_count",
    "check_dp_size",
    "check_inputs",
    "check_number",
]

AGGREGATION_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
VARIANTS = ("max", "clipped")
LOSS_TYPES = ("squared", "huber")
MAX_DP_SIZE = 2**31 - 1
"""The largest ``dp_size`` accepted (an int32's range; far above any real number of ranks)."""


def _type_name(value: object) -> str:
    return type(value).__name__


def check_choice(value: object, choices: tuple, name: str) -> str:
    """``value`` if it is one of ``choices``; else a ``ValueError`` naming ``name``, the choices and ``value``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {', '.join(map(repr, choices))}; got {_type_name(value)} {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_number(
    value: object, name: str, expected: str, *, minimum: float = -math.inf, strict: bool = False,
    finite: bool = True, allow_none: bool = False,
) -> float | None:
    """``value`` as a float: a real number (not a bool) ``>= minimum`` (``>`` if ``strict``), finite if ``finite``,
    or None if ``allow_none``. The errors say ``{name} must be {expected}; got ...``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}; got {_type_name(value)}")
    number = float(value)
    if math.isnan(number) or (finite and math.isinf(number)) or number < minimum or (strict and number == minimum):
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    return number


def check_dp_size(dp_size: object) -> int:
    """``dp_size`` as an int in ``[1, MAX_DP_SIZE]``."""
    if isinstance(dp_size, bool) or not isinstance(dp_size, numbers.Integral):
        raise TypeError(f"dp_size must be a positive integer; got {_type_name(dp_size)}")
    if dp_size < 1:
        raise ValueError(f"dp_size must be a positive integer; got {dp_size!r}")
    if dp_size > MAX_DP_SIZE:
        raise ValueError(f"dp_size must be at most {MAX_DP_SIZE} (a number of ranks); got {dp_size!r}")
    return int(dp_size)


def check_count(count: object, name: str, device: torch.device) -> Tensor | float | None:
    """A global count: None, a finite number ``>= 0``, or a one-element real tensor on ``device`` or the CPU.

    A tensor count is not read (that would synchronise with the host): a negative or NaN value in it
    cannot be caught here and gives what the formula gives. A count of 0, number or tensor, means
    "nothing to average": the loss and its gradient are exactly 0.
    """
    if count is None:
        return None
    if isinstance(count, Tensor):
        if count.numel() != 1:
            raise ValueError(
                f"{name} must be a scalar (a number or a one-element tensor); got shape {tuple(count.shape)}"
            )
        if count.device != device and count.device.type != "cpu":
            raise ValueError(f"{name} must be on {device} (or a CPU scalar); got {count.device}")
        if count.is_complex() or count.dtype == torch.bool:
            raise TypeError(f"{name} must be a real-valued tensor; got dtype {count.dtype}")
        return count.reshape(())
    if isinstance(count, bool) or not isinstance(count, numbers.Real):
        raise TypeError(f"{name} must be None, a number or a one-element tensor; got {_type_name(count)}")
    return check_number(count, name, "a non-negative finite count", minimum=0.0)


def _check_float_tensor(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {_type_name(t)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
    return t


def check_inputs(values: object, old_values: object, returns: object, action_mask: object = None) -> None:
    """The tensors of a call: floating point (the mask: bool, integer or float), same shape, same device.

    Never broadcasts: a ``(64,)`` against a ``(64, 1)`` is an error, not a ``(64, 64)`` loss.
    """
    _check_float_tensor(values, "values")
    _check_float_tensor(returns, "returns")
    others = [("returns", returns)]
    if old_values is not None:
        _check_float_tensor(old_values, "old_values")
        others.insert(0, ("old_values", old_values))
    if action_mask is not None:
        if not isinstance(action_mask, Tensor):
            raise TypeError(f"action_mask must be a torch.Tensor or None; got {_type_name(action_mask)}")
        if action_mask.is_complex():
            raise TypeError(f"action_mask must be a bool, integer or floating-point tensor; got {action_mask.dtype}")
        others.append(("action_mask", action_mask))
    if values.dim() == 0:
        raise ValueError("values must have at least one dimension (tokens); got a 0-dim tensor")
    for name, t in others:
        if t.shape != values.shape:
            raise ValueError(
                f"values and {name} must have the same shape; got {tuple(values.shape)} and {tuple(t.shape)}"
            )
        if t.device != values.device:
            raise ValueError(f"values and {name} must be on the same device; got {values.device} and {t.device}")
