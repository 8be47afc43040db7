"""What the value loss did to a batch: clip fraction, explained variance and friends, in one call."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from . import functional as F
from .functional import Region

__all__ = ["ValueLossDiagnostics", "diagnose"]


@dataclass(frozen=True)
class ValueLossDiagnostics:
    """Statistics of one batch; every field is a 0-dim tensor on the inputs' device (no host sync).

    Call :meth:`to_dict` to get Python floats (that synchronises once).
    """

    loss: Tensor
    """The value loss with the given settings (``ValueLoss``'s result, detached)."""
    loss_unclipped: Tensor
    """The same loss with ``clip_eps=None``: what the critic would have been trained on without clipping."""
    clip_fraction: Tensor
    """Share of unmasked tokens in :attr:`Region.CLIPPED`: clipping set their gradient to exactly zero."""
    outside_band_fraction: Tensor
    """Share of unmasked tokens with ``|values - old_values| > clip_eps`` (0 without clipping)."""
    explained_variance: Tensor
    """``1 - Var(returns - values) / Var(returns)`` over unmasked tokens (mask-weighted); 0 when
    ``Var(returns)`` is 0 or there are no tokens, so that it is never NaN."""
    mean_abs_error: Tensor
    """Mask-weighted mean of ``|values - returns|`` (0 for an empty mask)."""
    num_tokens: Tensor
    """Sum of the mask (the number of unmasked tokens for a 0/1 mask)."""

    def to_dict(self) -> dict[str, float]:
        """All fields as Python floats."""
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


@torch.no_grad()
def diagnose(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    action_mask: Tensor | None = None,
    config: F.LossConfig | None = None,
    **settings,
) -> ValueLossDiagnostics:
    """Loss, clip fraction, share outside the band, explained variance, MAE and token count of a batch.

    Settings: a :class:`valueloss.functional.LossConfig` or its fields as keywords, meaning what they mean
    for :class:`valueloss.ValueLoss`. Fractions and means are over the unmasked tokens, weighted by the
    mask; masked-out NaN/inf are ignored.
    """
    config = F._config(config, settings, "diagnose")
    loss = F.value_loss(values, old_values, returns, action_mask, config)
    loss_unclipped = F.value_loss(values, old_values, returns, action_mask, config.replace(clip_eps=None))
    values, old_values, returns, per_token = F._per_token_inputs(values, old_values, returns, action_mask, config)
    dtype = values.dtype
    if action_mask is None:
        weights = torch.ones_like(values)
    else:
        weights = action_mask.to(dtype)
        keep = weights != 0
        values, old_values, returns = (torch.where(keep, t, 0.0) for t in (values, old_values, returns))
    regions = F._regions(values, old_values, returns, *per_token)
    num_tokens = weights.sum()
    denominator = F._safe_denominator(num_tokens)

    def share(flags: Tensor) -> Tensor:
        return (weights * flags.to(dtype)).sum() / denominator

    mean_returns = (weights * returns).sum() / denominator
    var_returns = (weights * (returns - mean_returns) ** 2).sum() / denominator
    residual = returns - values
    mean_residual = (weights * residual).sum() / denominator
    var_residual = (weights * (residual - mean_residual) ** 2).sum() / denominator
    has_variance = var_returns > 0
    explained_variance = torch.where(
        has_variance, 1.0 - var_residual / torch.where(has_variance, var_returns, 1.0), 0.0
    )
    return ValueLossDiagnostics(
        loss=loss.detach(),
        loss_unclipped=loss_unclipped.detach(),
        clip_fraction=share(regions == Region.CLIPPED),
        outside_band_fraction=share(regions != Region.INSIDE),
        explained_variance=explained_variance,
        mean_abs_error=(weights * residual.abs()).sum() / denominator,
        num_tokens=num_tokens,
    )
