"""The math of PPO's value-function loss, as plain functions of tensors.

Everything the package computes is defined here once: the per-token loss (with or without
value clipping), its closed-form gradient, the region map that says where clipping kills the
gradient, and the aggregation modes that reduce a ``(B, T)`` loss matrix to a scalar.
:class:`valueloss.ValueLoss` holds the full documentation of the combined loss; each function
here documents only its own step.

Sources of the formulas:

* clipped value loss with ``max``: OpenAI baselines ``ppo2/model.py`` (2017), OpenRLHF
  ``openrlhf/models/loss.py::ValueLoss``, verl ``verl/trainer/ppo/core_algos.py::compute_value_loss``;
* MSE of the clipped prediction: Stable-Baselines3 ``stable_baselines3/ppo/ppo.py::PPO.train``;
* aggregation modes and global counts: verl ``core_algos.py::agg_loss`` (its five modes, release 0.9.1,
  :data:`valueloss.peers.VERL_RELEASE`; verl divides by a count of 0, where we return 0) and OpenRLHF
  ``agg_loss`` (checked 2026-11-25).

Nothing here synchronises with the host: validation reads only shapes, dtypes and devices, and
empty masks are handled with ``torch.where`` on safe denominators.

The band's edges follow the installed torch (:data:`BAND_CLOSED`): up to torch 2.13 ``torch.clamp``
passes the gradient at its bounds, so the band ``|values - old_values| <= clip_eps`` is closed; from
torch 2.14 it passes none there (the minimum-norm subgradient, pytorch/pytorch#184574), so
the band is open, ``|values - old_values| < clip_eps``. The closed-form gradient and the region map
follow suit, and so stay equal to autograd of the formula on either side of that change.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import torch
from torch import Tensor

from ._validate import (
    AGGREGATION_MODES,
    LOSS_TYPES,
    VARIANTS,
    check_choice,
    check_count,
    check_dp_size,
    check_inputs,
    check_number,
)

__all__ = [
    "AGGREGATION_MODES",
    "BAND_CLOSED",
    "LOSS_TYPES",
    "VARIANTS",
    "LossConfig",
    "Region",
    "aggregate",
    "aggregation_weights",
    "clip_regions",
    "elementwise_value_loss",
    "elementwise_value_loss_grad",
    "value_loss",
    "value_loss_grad",
]

Count = Tensor | int | float | None


def _clamp_band_closed(clamp=torch.clamp) -> bool:
    """Whether ``clamp`` (autograd's, by default) passes the gradient at its bounds: True for a closed
    band (torch <= 2.13 passes 1), False for an open one (torch >= 2.14 passes 0 with number bounds).

    Any other value (a tie split, say) is not a convention the closed form knows: warn, and take the
    open band, the nearer of the two.
    """
    with torch.inference_mode(False), torch.enable_grad():  # on the CPU whatever the default device
        x = torch.tensor([-0.5, 0.5], dtype=torch.float64, device="cpu", requires_grad=True)
        (grad,) = torch.autograd.grad(clamp(x, -0.5, 0.5).sum(), x)
    edge = grad.tolist()
    if edge not in ([1.0, 1.0], [0.0, 0.0]):
        warnings.warn(
            f"valueloss: torch {torch.__version__}'s clamp passes the gradient {edge} at its bounds, expected "
            "1 (torch <= 2.13) or 0 (torch >= 2.14); where |values - old_values| == clip_eps exactly, the "
            "closed-form gradient (open band) may differ from autograd's",
            RuntimeWarning,
            stacklevel=2,
        )
    return edge == [1.0, 1.0]


BAND_CLOSED: bool = _clamp_band_closed()
"""True when the installed torch's ``clamp`` passes the gradient at ``|values - old_values| ==
clip_eps`` (torch <= 2.13: the band is closed), False when it passes none (torch >= 2.14: open).
Probed once at import; the closed-form gradient, the region map and the fused kernels follow it."""


class Region(IntEnum):
    """Where a token sits relative to the clip band, as returned by :func:`clip_regions`."""

    INSIDE = 0
    """``|values - old_values| <= clip_eps`` (``<`` from torch 2.14, :data:`BAND_CLOSED`): the unclipped
    error drives the gradient."""
    CLIPPED = 1
    """Outside the band and the clipped branch wins: the gradient with respect to ``values`` is zero."""
    UNCLIPPED = 2
    """Outside the band but the unclipped branch wins (or ties): the gradient stays live."""


# --------------------------------------------------------------------------- settings


def check_clip_eps(clip_eps: object, name: str = "clip_eps") -> float | None:
    """``clip_eps`` as a float, or None (no clipping); raise if it is not a number ``>= 0``.

    ``inf`` is allowed and means a band wider than any finite difference (the clipped branch never acts).
    """
    return check_number(clip_eps, name, "None or a non-negative number", minimum=0.0, finite=False, allow_none=True)


def _check_loss_scale_factor(value: object) -> float | None:
    return check_number(value, "loss_scale_factor", "None or a positive finite number", minimum=0.0, strict=True,
                        allow_none=True)


@dataclass(frozen=True)
class LossConfig:
    """The settings of a value loss, checked once: what :class:`valueloss.ValueLoss` stores and what every
    function here takes (as ``config=`` or as keywords of the same names). See :class:`valueloss.ValueLoss`.

    ``clip_eps`` and ``huber_delta`` may be ``inf`` (no band, no Huber threshold). A ``clip_eps`` larger than
    the compute dtype's largest number acts as that number, and a ``huber_delta`` whose square overflows
    the compute dtype gives the squared loss: neither changes anything for finite inputs. ``scale`` and
    ``loss_scale_factor`` must be finite.

    Example:
        >>> from valueloss.functional import LossConfig
        >>> config = LossConfig(clip_eps=0.2, mode="seq-mean-token-mean")
        >>> config.clip_eps, config.variant, config.mode, config.scale
        (0.2, 'max', 'seq-mean-token-mean', 0.5)
    """

    clip_eps: float | None = None
    variant: str = "max"
    mode: str = "token-mean"
    loss_type: str = "squared"
    huber_delta: float = 1.0
    scale: float = 0.5
    loss_scale_factor: float | None = None

    def __post_init__(self) -> None:
        checked = dict(
            clip_eps=check_clip_eps(self.clip_eps),
            variant=check_choice(self.variant, VARIANTS, "variant"),
            mode=check_choice(self.mode, AGGREGATION_MODES, "mode"),
            loss_type=check_choice(self.loss_type, LOSS_TYPES, "loss_type"),
            huber_delta=check_number(self.huber_delta, "huber_delta", "a positive number", minimum=0.0, strict=True,
                                     finite=False),
            scale=check_number(self.scale, "scale", "a finite number"),
            loss_scale_factor=_check_loss_scale_factor(self.loss_scale_factor),
        )
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def replace(self, **changes) -> LossConfig:
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)


_SETTINGS = frozenset(field.name for field in dataclasses.fields(LossConfig))


def _config(config: LossConfig | None, settings: dict, caller: str) -> LossConfig:
    """``config``, or a :class:`LossConfig` built from keyword ``settings``; never both."""
    unknown = set(settings) - _SETTINGS
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword argument(s) {', '.join(sorted(unknown))}; "
                        f"settings are {', '.join(sorted(_SETTINGS))}")
    if config is None:
        return LossConfig(**settings)
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be a LossConfig or None; got {type(config).__name__}")
    if settings:
        raise TypeError(f"{caller}() takes either config or keyword settings, not both; got config and "
                        f"{', '.join(sorted(settings))}")
    return config


class _Counts(NamedTuple):
    """The per-call counts of a reduction, checked: see :class:`valueloss.ValueLoss`."""

    dp_size: int
    batch_num_tokens: Count
    global_batch_size: Count


def _counts(dp_size: object, batch_num_tokens: object, global_batch_size: object, mode: str, device) -> _Counts:
    counts = _Counts(
        check_dp_size(dp_size),
        check_count(batch_num_tokens, "batch_num_tokens", device),
        check_count(global_batch_size, "global_batch_size", device),
    )
    if counts.dp_size > 1:
        if mode == "token-mean" and counts.batch_num_tokens is None:
            raise ValueError(
                "batch_num_tokens (the global count of unmasked tokens) is required when dp_size > 1 "
                "with mode='token-mean'; got None (see valueloss.distributed)"
            )
        if mode.startswith("seq-mean") and counts.global_batch_size is None:
            raise ValueError(
                f"global_batch_size (the global count of non-empty sequences) is required when dp_size > 1 "
                f"with mode={mode!r}; got None (see valueloss.distributed)"
            )
    return counts


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """Promote the inputs' float dtypes, and accumulate half precision in float32."""
    dtypes = {t.dtype for t in tensors if t is not None}
    dtype = dtypes.pop()
    for other in dtypes:
        dtype = torch.promote_types(dtype, other)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _threshold(value: float, dtype: torch.dtype) -> float:
    """A threshold no larger than ``dtype``'s largest number: the same clamp of every finite input, and no
    overflow when torch converts it to ``dtype``."""
    return min(value, torch.finfo(dtype).max)


# --------------------------------------------------------------------------- per-token math
# _elementwise and _elementwise_grad are also the math of valueloss.fused, whose compiled graph calls them with
# clip_eps and huber_delta as 0-dim tensors.


def _error_loss(error: Tensor, loss_type: str, huber_delta) -> Tensor:
    """Per-token penalty of a prediction error: ``error**2``, or twice the Huber loss."""
    if loss_type == "squared":
        return error**2
    abs_error = error.abs()
    return torch.where(abs_error <= huber_delta, error**2, 2.0 * huber_delta * abs_error - huber_delta**2)


def _error_loss_grad(error: Tensor, loss_type: str, huber_delta) -> Tensor:
    if loss_type == "squared":
        return 2.0 * error
    return 2.0 * error.clamp(-huber_delta, huber_delta)


def _elementwise(values: Tensor, old_values: Tensor | None, returns: Tensor, clip_eps, variant: str, loss_type: str,
                 huber_delta) -> Tensor:
    loss_unclipped = _error_loss(values - returns, loss_type, huber_delta)
    if clip_eps is None:
        return loss_unclipped
    values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    loss_clipped = _error_loss(values_clipped - returns, loss_type, huber_delta)
    if variant == "clipped":
        return loss_clipped
    return torch.max(loss_clipped, loss_unclipped)


def _elementwise_grad(values: Tensor, old_values: Tensor | None, returns: Tensor, clip_eps, variant: str,
                      loss_type: str, huber_delta) -> Tensor:
    grad_unclipped = _error_loss_grad(values - returns, loss_type, huber_delta)
    if clip_eps is None:
        return grad_unclipped
    delta = values - old_values
    delta_clipped = delta.clamp(-clip_eps, clip_eps)
    # Inside the closed band exactly when the clamp left delta unchanged (False for NaN, like the comparisons);
    # the open band also drops the edges, compared in delta's dtype like torch's clamp backward does.
    inside = delta_clipped == delta
    if not BAND_CLOSED:
        inside = inside & (delta.abs() != clip_eps)
    values_clipped = old_values + delta_clipped
    grad_clipped = torch.where(inside, _error_loss_grad(values_clipped - returns, loss_type, huber_delta), 0.0)
    if variant == "clipped":
        return grad_clipped
    loss_unclipped = _error_loss(values - returns, loss_type, huber_delta)
    loss_clipped = _error_loss(values_clipped - returns, loss_type, huber_delta)
    tie = 0.5 * (grad_clipped + grad_unclipped)
    return torch.where(
        loss_unclipped > loss_clipped,
        grad_unclipped,
        torch.where(loss_clipped > loss_unclipped, grad_clipped, tie),
    )


def _regions(values: Tensor, old_values: Tensor | None, returns: Tensor, clip_eps, variant: str, loss_type: str,
             huber_delta) -> Tensor:
    if clip_eps is None:
        return torch.full(values.shape, int(Region.INSIDE), dtype=torch.uint8, device=values.device)
    delta = values - old_values
    if BAND_CLOSED:
        outside = (delta < -clip_eps) | (delta > clip_eps)
    else:
        outside = (delta <= -clip_eps) | (delta >= clip_eps)
    if variant == "clipped":
        clipped_wins = torch.ones_like(outside)
    else:
        values_clipped = old_values + delta.clamp(-clip_eps, clip_eps)
        clipped_wins = _error_loss(values_clipped - returns, loss_type, huber_delta) > _error_loss(
            values - returns, loss_type, huber_delta
        )
    region = torch.where(clipped_wins, int(Region.CLIPPED), int(Region.UNCLIPPED)).to(torch.uint8)
    return torch.where(outside, region, torch.zeros_like(region))


def _per_token_inputs(values, old_values, returns, action_mask, config: LossConfig, cast: bool = True) -> tuple:
    """Check the tensors against ``config``, cast them to the compute dtype (unless ``cast`` is False), and cap
    the thresholds to it: ``(values, old_values, returns, (clip_eps, variant, loss_type, huber_delta))``."""
    check_inputs(values, old_values, returns, action_mask)
    if config.clip_eps is not None and old_values is None:
        raise ValueError("old_values is required when clip_eps is set; got None")
    dtype = _compute_dtype(values, old_values, returns)
    tensors = (values, old_values, returns)
    if cast:
        tensors = tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)
    clip_eps = None if config.clip_eps is None else _threshold(config.clip_eps, dtype)
    loss_type, huber_delta = config.loss_type, config.huber_delta
    if loss_type == "huber" and huber_delta >= math.sqrt(torch.finfo(dtype).max):
        # delta**2 would overflow (inf - inf = NaN in the formula's other branch), and no error whose square
        # is finite in this dtype reaches delta: the Huber loss is the squared loss here
        loss_type, huber_delta = "squared", 1.0
    return (*tensors, (clip_eps, config.variant, loss_type, huber_delta))


def elementwise_value_loss(
    values: Tensor, old_values: Tensor | None, returns: Tensor, config: LossConfig | None = None, **settings
) -> Tensor:
    """Per-token value loss, before masking, aggregation and the factor ``scale``.

    With ``clip_eps=None``: ``(values - returns)**2``. With ``clip_eps`` and ``variant="max"``
    (ppo2, OpenRLHF, verl): ``max((values_clipped - returns)**2, (values - returns)**2)`` where
    ``values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)``. With
    ``variant="clipped"`` (Stable-Baselines3): ``(values_clipped - returns)**2``.
    ``loss_type="huber"`` replaces ``e**2`` by ``2 * huber(e, huber_delta)`` (equal to ``e**2`` for
    ``|e| <= huber_delta``). Half-precision inputs are computed in float32. Settings: a :class:`LossConfig`
    or its fields as keywords; see :class:`valueloss.ValueLoss` for the full documentation.
    """
    values, old_values, returns, per_token = _per_token_inputs(
        values, old_values, returns, None, _config(config, settings, "elementwise_value_loss")
    )
    return _elementwise(values, old_values, returns, *per_token)


def elementwise_value_loss_grad(
    values: Tensor, old_values: Tensor | None, returns: Tensor, config: LossConfig | None = None, **settings
) -> Tensor:
    """Closed-form derivative of :func:`elementwise_value_loss` with respect to ``values``.

    Follows autograd's conventions exactly: at the band's edges ``|values - old_values| == clip_eps``
    the clipped branch passes the gradient where the installed torch's ``clamp`` does (torch <= 2.13, a
    closed band) and none where it does not (torch >= 2.14, open; :data:`BAND_CLOSED`), and where the
    two branches of the ``max`` tie the gradient is split 50/50 (as ``torch.max``/``torch.maximum``
    do). Tokens in :attr:`Region.CLIPPED` get exactly zero.
    """
    values, old_values, returns, per_token = _per_token_inputs(
        values, old_values, returns, None, _config(config, settings, "elementwise_value_loss_grad")
    )
    with torch.no_grad():
        return _elementwise_grad(values, old_values, returns, *per_token)


def clip_regions(
    values: Tensor, old_values: Tensor | None, returns: Tensor, config: LossConfig | None = None, **settings
) -> Tensor:
    """Region of each token as a ``uint8`` tensor of :class:`Region` codes.

    ``INSIDE`` (0): ``|values - old_values| <= clip_eps`` (``<`` where the band is open, from torch 2.14:
    :data:`BAND_CLOSED`), or no clipping at all (``clip_eps=None``).
    ``CLIPPED`` (1): outside the band and the clipped branch is strictly larger (for
    ``variant="clipped"``: every token outside the band) -- the gradient is exactly zero there.
    ``UNCLIPPED`` (2): outside the band and the unclipped branch is larger or equal -- the gradient is
    live (halved on an exact tie).
    """
    values, old_values, returns, per_token = _per_token_inputs(
        values, old_values, returns, None, _config(config, settings, "clip_regions")
    )
    with torch.no_grad():
        return _regions(values, old_values, returns, *per_token)


# --------------------------------------------------------------------------- aggregation


def _safe_denominator(count: Tensor | float | int) -> Tensor | float | int:
    """A count that is 1 where it was 0, so that ``0 / count`` is 0 and never NaN (no host sync)."""
    if isinstance(count, Tensor):
        return torch.where(count > 0, count, torch.ones_like(count))
    return count if count > 0 else 1


def _mean(total: Tensor, count: Tensor | float) -> Tensor:
    """``total / count``, and exactly 0 (value and gradient) where ``count`` is 0: nothing to average.

    Selected by ``torch.where`` on the count, so a tensor count is never read on the host.
    """
    if not isinstance(count, Tensor):
        count = torch.tensor(float(count), dtype=total.dtype, device=total.device)
    return torch.where(count > 0, total / _safe_denominator(count), 0.0)


def _mask_sum(action_mask: Tensor, dtype: torch.dtype, dim: int | None = None) -> Tensor:
    """The sum of the mask's weights in ``dtype`` (a bool or integer mask counted exactly in int64 first)."""
    if action_mask.is_floating_point():
        mask = action_mask.to(dtype)
        return mask.sum() if dim is None else mask.sum(dim=dim)
    count = action_mask.sum() if dim is None else action_mask.sum(dim=dim)
    return count.to(dtype)


def _keep(action_mask: Tensor | None) -> Tensor | None:
    """The tokens that count, as a bool tensor (the mask itself if it is one)."""
    if action_mask is None or action_mask.dtype == torch.bool:
        return action_mask
    return action_mask != 0


def _masked(loss_mat: Tensor, action_mask: Tensor | None, keep: Tensor | None) -> Tensor:
    """``loss_mat * mask`` with masked-out entries forced to zero, so NaN/inf there cannot leak."""
    if action_mask is None:
        return loss_mat
    masked = torch.where(keep, loss_mat, 0.0)
    return masked if action_mask.dtype == torch.bool else masked * action_mask.to(loss_mat.dtype)


def _check_mask(loss_mat: object, action_mask: object, name: str = "loss_mat") -> None:
    if not isinstance(loss_mat, Tensor) or not loss_mat.is_floating_point():
        got = getattr(loss_mat, "dtype", type(loss_mat).__name__)
        raise TypeError(f"{name} must be a floating-point tensor; got {got}")
    if action_mask is None:
        return
    if not isinstance(action_mask, Tensor):
        raise TypeError(f"action_mask must be a torch.Tensor or None; got {type(action_mask).__name__}")
    if action_mask.shape != loss_mat.shape:
        raise ValueError(f"{name} and action_mask must have the same shape; "
                         f"got {tuple(loss_mat.shape)} and {tuple(action_mask.shape)}")
    if action_mask.device != loss_mat.device:
        raise ValueError(f"{name} and action_mask must be on the same device; "
                         f"got {loss_mat.device} and {action_mask.device}")


def aggregate(
    loss_mat: Tensor,
    action_mask: Tensor | None = None,
    *,
    mode: str = "token-mean",
    dp_size: int = 1,
    batch_num_tokens: Count = None,
    global_batch_size: Count = None,
    loss_scale_factor: float | None = None,
) -> Tensor:
    """Reduce a per-token loss ``(..., T)`` to a scalar, following verl's ``agg_loss`` contract.

    With ``m`` the mask (all ones when None; a bool mask selects, an integer or float mask weighs each
    token by its value), ``L`` the loss, ``n_s = sum_t m[s, t]``:

    * ``token-mean``: ``sum(m * L) / N * dp_size`` with ``N = batch_num_tokens`` (default ``sum(m)``);
    * ``token-sum``: ``sum(m * L) * dp_size``;
    * ``seq-mean-token-mean``: ``sum_s [n_s > 0] (sum_t m L) / n_s / S * dp_size``;
    * ``seq-mean-token-sum``: ``sum_s (sum_t m L) / S * dp_size``;
    * ``seq-mean-token-sum-norm``: ``seq-mean-token-sum / loss_scale_factor`` (default ``T``),

    where ``S = global_batch_size`` (default: the number of sequences with ``n_s > 0``). The factor
    ``dp_size`` undoes the averaging of gradients over data-parallel ranks, so the result is the
    global loss when the counts are global. A count of 0 (given, or an empty mask) means nothing to
    average: the result and its gradient are exactly 0, never NaN and never the sum. Masked-out
    NaN/inf never leak. Needs no host synchronisation.
    """
    _check_mask(loss_mat, action_mask)
    check_choice(mode, AGGREGATION_MODES, "mode")
    counts = _counts(dp_size, batch_num_tokens, global_batch_size, mode, loss_mat.device)
    loss_scale_factor = _check_loss_scale_factor(loss_scale_factor)
    return _aggregate(loss_mat, action_mask, mode, *counts, loss_scale_factor)


def _count_as(count: Count, dtype: torch.dtype) -> Count:
    """A tensor count in the loss's dtype, so that a float64 or integer count does not promote the loss."""
    return count.to(dtype) if isinstance(count, Tensor) else count


def _aggregate(loss_mat, action_mask, mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor,
               keep=None):
    """The reduction; ``keep`` is :func:`_keep` of the mask, if the caller has it already."""
    batch_num_tokens = _count_as(batch_num_tokens, loss_mat.dtype)
    global_batch_size = _count_as(global_batch_size, loss_mat.dtype)
    masked = _masked(loss_mat, action_mask, _keep(action_mask) if keep is None else keep)
    if mode in ("token-mean", "token-sum"):
        total = masked.sum()
        if mode == "token-sum":
            return total * float(dp_size)
        if batch_num_tokens is not None:
            return _mean(total, batch_num_tokens) * float(dp_size)
        if action_mask is None:
            return total / max(loss_mat.numel(), 1) * float(dp_size)
        if action_mask.dtype == torch.bool:  # a count of selected tokens: 0 only where every token, so the
            # total, is masked out, and then 0 / 1 is the 0 a count of 0 gives
            return total / _mask_sum(action_mask, loss_mat.dtype).clamp(min=1) * float(dp_size)
        return _mean(total, _mask_sum(action_mask, loss_mat.dtype)) * float(dp_size)

    seq_sums = masked.sum(dim=-1)
    if action_mask is None:
        seq_counts = torch.full_like(seq_sums, float(loss_mat.shape[-1]))
    else:
        seq_counts = _mask_sum(action_mask, loss_mat.dtype, dim=-1)
    nonempty = seq_counts > 0
    if mode == "seq-mean-token-mean":
        seq_losses = seq_sums / _safe_denominator(seq_counts)
    else:
        seq_losses = seq_sums
    if global_batch_size is None:
        global_batch_size = nonempty.to(loss_mat.dtype).sum()
    loss = _mean(torch.where(nonempty, seq_losses, 0.0).sum(), global_batch_size) * float(dp_size)
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_scale_factor if loss_scale_factor is not None else max(loss_mat.shape[-1], 1))
    return loss


def aggregation_weights(
    action_mask: Tensor | None,
    shape: torch.Size | None = None,
    *,
    mode: str = "token-mean",
    dp_size: int = 1,
    batch_num_tokens: Count = None,
    global_batch_size: Count = None,
    loss_scale_factor: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor:
    """Per-token weights ``w`` with ``aggregate(L, mask, mode=...) == sum(w * L)`` for every finite ``L``.

    Every aggregation mode is linear in the per-token loss, so the gradient of the reduced loss is
    ``w * dL/dvalues``. ``shape`` is needed only when ``action_mask`` is None.
    """
    if action_mask is None:
        if shape is None:
            raise ValueError("shape is required when action_mask is None; got None")
        ref = torch.zeros(shape, dtype=dtype, device=device)
    else:
        if not isinstance(action_mask, Tensor):
            raise TypeError(f"action_mask must be a torch.Tensor or None; got {type(action_mask).__name__}")
        ref = torch.zeros(action_mask.shape, dtype=dtype, device=action_mask.device)
    check_choice(mode, AGGREGATION_MODES, "mode")
    counts = _counts(dp_size, batch_num_tokens, global_batch_size, mode, ref.device)
    loss_scale_factor = _check_loss_scale_factor(loss_scale_factor)
    return _weights(ref, action_mask, mode, *counts, loss_scale_factor)


def _weights(ref, action_mask, mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor):
    batch_num_tokens = _count_as(batch_num_tokens, ref.dtype)
    global_batch_size = _count_as(global_batch_size, ref.dtype)
    mask = torch.ones_like(ref) if action_mask is None else action_mask.to(ref.dtype)
    if mode == "token-sum":
        return mask * float(dp_size)
    if mode == "token-mean":
        count = mask.sum() if batch_num_tokens is None else batch_num_tokens
        return _mean(mask, count) * float(dp_size)
    seq_counts = mask.sum(dim=-1, keepdim=True)
    nonempty = seq_counts > 0
    if global_batch_size is None:
        global_batch_size = nonempty.to(ref.dtype).sum()
    per_seq = mask / _safe_denominator(seq_counts) if mode == "seq-mean-token-mean" else mask
    weights = _mean(torch.where(nonempty, per_seq, 0.0), global_batch_size) * float(dp_size)
    if mode == "seq-mean-token-sum-norm":
        weights = weights / (loss_scale_factor if loss_scale_factor is not None else max(ref.shape[-1], 1))
    return weights


# --------------------------------------------------------------------------- the whole loss


def _prepare(values, old_values, returns, action_mask, config, settings, dp_size, batch_num_tokens,
             global_batch_size, caller: str, cast: bool = True):
    """Check everything at the entry point: ``(config, counts, values, old_values, returns, per-token settings)``
    with the tensors in the compute dtype (as given if ``cast`` is False: the fused graph casts them itself)."""
    config = _config(config, settings, caller)
    values, old_values, returns, per_token = _per_token_inputs(
        values, old_values, returns, action_mask, config, cast=cast
    )
    counts = _counts(dp_size, batch_num_tokens, global_batch_size, config.mode, values.device)
    return config, counts, values, old_values, returns, per_token


def _aggregation(config: LossConfig, counts: _Counts) -> tuple:
    """The trailing arguments of :func:`_aggregate` and :func:`_weights`."""
    return config.mode, *counts, config.loss_scale_factor


def _zero_masked_differentiated(tensors: tuple, keep: Tensor | None) -> tuple:
    """``tensors`` with the masked-out tokens zeroed in those that autograd will differentiate.

    Masking only the loss would still send 0 * NaN = NaN back through the square to their gradients.
    The where's own backward zeroes those tokens whatever reaches it (NaN from the other inputs
    included), and the loss itself is masked by a where as well, so inputs without a gradient need no copy.
    """
    differentiated = [t is not None and t.requires_grad for t in tensors]
    if keep is None or not torch.is_grad_enabled() or not any(differentiated):
        return tensors
    return tuple(torch.where(keep, t, 0.0) if grad else t for t, grad in zip(tensors, differentiated))


def value_loss(
    values: Tensor,
    old_values: Tensor | None,
    returns: Tensor,
    action_mask: Tensor | None = None,
    config: LossConfig | None = None,
    *,
    dp_size: int = 1,
    batch_num_tokens: Count = None,
    global_batch_size: Count = None,
    **settings,
) -> Tensor:
    """``scale * aggregate(elementwise_value_loss(...), action_mask, mode=...)``; see :class:`valueloss.ValueLoss`.

    Settings: a :class:`LossConfig`, or its fields (``clip_eps``, ``variant``, ``mode``, ``loss_type``,
    ``huber_delta``, ``scale``, ``loss_scale_factor``) as keywords.

    Example:
        >>> import torch
        >>> from valueloss.functional import value_loss
        >>> values, old_values, returns = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0]), torch.tensor([2.0, 1.0])
        >>> value_loss(values, old_values, returns, clip_eps=0.2)  # 0.5 * mean(max(1.3**2, 1**2), 1**2)
        tensor(0.6725)
    """
    config, counts, *tensors, per_token = _prepare(
        values, old_values, returns, action_mask, config, settings, dp_size, batch_num_tokens, global_batch_size,
        "value_loss",
    )
    keep = _keep(action_mask)  # once: a float mask's comparison is a tensor of the batch's size
    loss_mat = _elementwise(*_zero_masked_differentiated(tuple(tensors), keep), *per_token)
    return config.scale * _aggregate(loss_mat, action_mask, *_aggregation(config, counts), keep=keep)


def value_loss_grad(
    values: Tensor,
    old_values: Tensor | None,
    returns: Tensor,
    action_mask: Tensor | None = None,
    config: LossConfig | None = None,
    *,
    dp_size: int = 1,
    batch_num_tokens: Count = None,
    global_batch_size: Count = None,
    **settings,
) -> Tensor:
    """Closed-form gradient of :func:`value_loss` with respect to ``values`` (no autograd).

    ``scale * aggregation_weights(...) * elementwise_value_loss_grad(...)``, zero at masked-out
    tokens whatever they hold. Returned in the compute dtype (float32 for half inputs).
    """
    config, counts, values, old_values, returns, per_token = _prepare(
        values, old_values, returns, action_mask, config, settings, dp_size, batch_num_tokens, global_batch_size,
        "value_loss_grad",
    )
    with torch.no_grad():
        grad = _elementwise_grad(values, old_values, returns, *per_token)
        weights = _weights(torch.empty_like(values), action_mask, *_aggregation(config, counts))
        return config.scale * weights * torch.where(weights != 0, grad, 0.0)
