"""Tests of valueloss.diagnose against statistics computed independently with plain loops."""

from __future__ import annotations

import math

import pytest
import torch
from reference import loss_loops, token_grad

from valueloss import ValueLossDiagnostics, diagnose


def _batch(seed, B=6, T=9):
    generator = torch.Generator().manual_seed(seed)
    old_values = torch.randn(B, T, dtype=torch.float64, generator=generator)
    values = old_values + 0.3 * torch.randn(B, T, dtype=torch.float64, generator=generator)
    returns = old_values + torch.randn(B, T, dtype=torch.float64, generator=generator)
    mask = torch.rand(B, T, generator=generator) > 0.35
    mask[1] = False
    return values, old_values, returns, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("clip_eps", [None, 0.1, 0.3])
def test_statistics_match_loops(seed, clip_eps):
    """Every field equals its definition evaluated token by token over the unmasked tokens."""
    values, old_values, returns, mask = _batch(seed)
    stats = diagnose(values, old_values, returns, mask, clip_eps=clip_eps)
    tokens = [(float(v), float(o), float(r)) for v, o, r, m in
              zip(values.flatten(), old_values.flatten(), returns.flatten(), mask.flatten()) if m]
    n = len(tokens)
    outside = [clip_eps is not None and abs(v - o) > clip_eps for v, o, _ in tokens]
    dead = [out and token_grad(v, o, r, clip_eps) == 0.0 for (v, o, r), out in zip(tokens, outside)]
    mean_r = sum(r for _, _, r in tokens) / n
    var_r = sum((r - mean_r) ** 2 for _, _, r in tokens) / n
    residuals = [r - v for v, _, r in tokens]
    mean_e = sum(residuals) / n
    var_e = sum((e - mean_e) ** 2 for e in residuals) / n
    assert stats.num_tokens.item() == n
    assert stats.clip_fraction.item() == pytest.approx(sum(dead) / n)
    assert stats.outside_band_fraction.item() == pytest.approx(sum(outside) / n)
    assert stats.explained_variance.item() == pytest.approx(1 - var_e / var_r, rel=1e-12)
    assert stats.mean_abs_error.item() == pytest.approx(sum(abs(e) for e in residuals) / n, rel=1e-12)
    assert stats.loss.item() == pytest.approx(loss_loops(values, old_values, returns, mask, clip_eps=clip_eps))
    assert stats.loss_unclipped.item() == pytest.approx(loss_loops(values, old_values, returns, mask))
    if clip_eps is not None:
        assert 0 < stats.clip_fraction.item() <= stats.outside_band_fraction.item()


def test_empty_and_constant_batches_are_finite():
    """An empty mask gives zeros; constant returns give explained variance 0 instead of NaN."""
    values, old_values, returns, mask = _batch(3)
    empty = diagnose(values, old_values, returns, torch.zeros_like(mask), clip_eps=0.2).to_dict()
    assert all(math.isfinite(x) for x in empty.values())
    assert empty["num_tokens"] == 0 and empty["loss"] == 0 and empty["clip_fraction"] == 0
    constant = diagnose(values, old_values, torch.ones_like(returns), mask, clip_eps=0.2)
    assert constant.explained_variance.item() == 0.0


def test_no_graph_and_tensor_fields():
    """Outputs are detached 0-dim tensors on the inputs' device, whatever requires grad; to_dict gives floats."""
    values, old_values, returns, mask = _batch(4)
    values.requires_grad_(True)
    stats = diagnose(values, old_values, returns, mask, clip_eps=0.2)
    assert isinstance(stats, ValueLossDiagnostics)
    for name, value in vars(stats).items():
        assert value.dim() == 0 and not value.requires_grad, name
    as_dict = stats.to_dict()
    assert set(as_dict) == set(vars(stats)) and all(isinstance(x, float) for x in as_dict.values())


def test_masked_nan_is_ignored():
    """NaN at masked-out tokens does not change any statistic."""
    values, old_values, returns, mask = _batch(5)
    dirty = values.clone()
    dirty[~mask] = math.nan
    assert diagnose(dirty, old_values, returns, mask, clip_eps=0.2).to_dict() == \
        diagnose(values, old_values, returns, mask, clip_eps=0.2).to_dict()
