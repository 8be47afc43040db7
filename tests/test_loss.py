"""Tests of valueloss.ValueLoss: a drop-in for OpenRLHF's ValueLoss, on every available device."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import grad_loops, loss_loops, openrlhf_formula

from valueloss import ValueLoss
from valueloss.functional import AGGREGATION_MODES

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="no CUDA device on this machine")]),
]


def _batch(B, T, seed, device="cpu", dtype=torch.float32, empty_row=True):
    generator = torch.Generator().manual_seed(seed)
    old_values = torch.randn(B, T, generator=generator, dtype=torch.float64)
    values = old_values + 0.4 * torch.randn(B, T, generator=generator, dtype=torch.float64)
    returns = old_values + torch.randn(B, T, generator=generator, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,), generator=generator)
    if empty_row:
        lengths[0] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return [t.to(device=device, dtype=dtype) for t in (values, old_values, returns)] + [mask.to(device)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 6), T=st.integers(1, 41), seed=st.integers(0, 2**31 - 1),
    clip_eps=st.sampled_from([None, 0.0, 0.1, 0.2, 1.0]), token_level_loss=st.booleans(),
    mask_dtype=st.sampled_from([torch.bool, torch.float32, torch.int64]), dp_counts=st.booleans(),
)
def test_matches_openrlhf_in_float32(B, T, seed, clip_eps, token_level_loss, mask_dtype, dp_counts):
    """Same loss (1e-6 relative) and same gradients as OpenRLHF's ValueLoss for the same fp32 inputs."""
    values, old_values, returns, mask = _batch(B, T, seed)
    mask = mask.to(mask_dtype)
    if mask.sum() == 0:  # OpenRLHF returns NaN there; covered by test_empty_mask_differs_from_openrlhf
        mask[-1, 0] = 1
    counts = {}
    if dp_counts:  # a rank of a 2-rank group that sees part of the global batch
        counts = dict(dp_size=2, batch_num_tokens=torch.tensor(float(mask.sum() * 2 + 3)),
                      global_batch_size=torch.tensor(float((mask.sum(-1) > 0).sum() + 2)))
    ours_values = values.clone().requires_grad_(True)
    theirs_values = values.clone().requires_grad_(True)
    ours = ValueLoss(clip_eps, token_level_loss)(ours_values, old_values, returns, mask, **counts)
    theirs = openrlhf_formula(theirs_values, old_values, returns, mask, clip_eps, token_level_loss, **counts)
    assert ours.dtype == theirs.dtype == torch.float32
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-12)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_values.grad, theirs_values.grad, rtol=1e-6, atol=1e-9)


def test_token_mean_is_bitwise_openrlhf():
    """For token-mean with a bool mask the fp32 loss is bitwise OpenRLHF's."""
    values, old_values, returns, mask = _batch(8, 301, seed=7)
    mask[0, :5] = True
    ours = ValueLoss(0.2)(values, old_values, returns, mask)
    theirs = openrlhf_formula(values, old_values, returns, mask, 0.2)
    assert ours.item() == theirs.item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@pytest.mark.parametrize("variant", ["max", "clipped"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (41, 401), (5,)])
def test_module_matches_loop_reference(device, mode, variant, shape):
    """Loss and gradients of the module equal the float64 loop reference, at awkward sizes and on each device."""
    generator = torch.Generator().manual_seed(sum(shape))
    values, old_values, returns = (torch.randn(shape, dtype=torch.float64, generator=generator) for _ in range(3))
    mask = torch.rand(shape, generator=generator) > 0.3
    module = ValueLoss(0.2, variant=variant, loss_agg_mode=mode)
    on_device = [t.to(device) for t in (values, old_values, returns, mask)]
    on_device[0].requires_grad_(True)
    loss = module(*on_device)
    loss.backward()
    expected = loss_loops(values, old_values, returns, mask, clip_eps=0.2, variant=variant, mode=mode)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    expected_grad = grad_loops(values, old_values, returns, mask, clip_eps=0.2, variant=variant, mode=mode)
    torch.testing.assert_close(on_device[0].grad.cpu(), expected_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_forward_has_no_host_sync():
    """On CUDA, forward and backward run with sync debug mode set to error (no host synchronisation)."""
    values, old_values, returns, mask = _batch(4, 64, seed=0, device="cuda")
    values.requires_grad_(True)
    module = ValueLoss(0.2, loss_agg_mode="seq-mean-token-mean")
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = module(values, old_values, returns, mask, dp_size=2,
                      global_batch_size=torch.tensor(6.0, device="cuda"))
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(loss.item())


def test_empty_mask_differs_from_openrlhf():
    """Where OpenRLHF returns NaN (no unmasked token), ValueLoss returns 0 with zero gradients."""
    values, old_values, returns, _ = _batch(3, 5, seed=4)
    values.requires_grad_(True)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    for token_level_loss in (True, False):
        theirs = openrlhf_formula(values, old_values, returns, mask, 0.2, token_level_loss)
        assert math.isnan(theirs.item())
        ours = ValueLoss(0.2, token_level_loss)(values, old_values, returns, mask)
        (grad,) = torch.autograd.grad(ours, values)
        assert ours.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_mask_none_counts_every_token():
    """action_mask=None gives the plain mean (and the mean of row means) over all tokens."""
    values, old_values, returns, _ = _batch(4, 6, seed=5)
    ones = torch.ones(4, 6, dtype=torch.bool)
    for token_level_loss in (True, False):
        module = ValueLoss(0.3, token_level_loss)
        assert module(values, old_values, returns).item() == pytest.approx(
            module(values, old_values, returns, ones).item(), rel=1e-7)


def test_global_counts_and_alias():
    """dp_size multiplies and batch_num_tokens divides as in OpenRLHF; global_num_tokens is its alias."""
    values, old_values, returns, mask = _batch(4, 6, seed=6, empty_row=False)
    module = ValueLoss(0.2)
    local = module(values, old_values, returns, mask)
    n = mask.sum()
    scaled = module(values, old_values, returns, mask, 4, n * 2)
    assert scaled.item() == pytest.approx(local.item() * 4 / 2, rel=1e-6)
    alias = module(values, old_values, returns, mask, 4, global_num_tokens=n * 2)
    assert alias.item() == scaled.item()
    with pytest.raises(ValueError, match="batch_num_tokens .* is required when dp_size > 1"):
        module(values, old_values, returns, mask, dp_size=2)


def test_half_precision_inputs():
    """bf16 inputs give a float32 loss equal to the float32 computation, and bf16 gradients."""
    values, old_values, returns, mask = _batch(4, 128, seed=8, dtype=torch.bfloat16)
    values.requires_grad_(True)
    loss = ValueLoss(0.2)(values, old_values, returns, mask)
    assert loss.dtype == torch.float32
    reference = ValueLoss(0.2)(values.detach().float(), old_values.float(), returns.float(), mask)
    assert loss.item() == reference.item()
    loss.backward()
    assert values.grad.dtype == torch.bfloat16


def test_constructor_validates_and_maps_token_level_loss():
    """token_level_loss picks the mode; contradictions and bad settings raise naming the argument."""
    assert ValueLoss().loss_agg_mode == "token-mean"
    assert ValueLoss(0.2, False).loss_agg_mode == "seq-mean-token-mean"
    assert ValueLoss(loss_agg_mode="token-sum").loss_agg_mode == "token-sum"
    with pytest.raises(ValueError, match="token_level_loss=False means loss_agg_mode='seq-mean-token-mean'"):
        ValueLoss(0.2, False, loss_agg_mode="token-mean")
    with pytest.raises(ValueError, match="clip_eps must be None or a non-negative number; got -1"):
        ValueLoss(-1)
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        ValueLoss(loss_agg_mode="seq-mean")
    with pytest.raises(TypeError, match="token_level_loss must be a bool; got str"):
        ValueLoss(0.2, "yes")
    with pytest.raises(ValueError, match="variant must be one of"):
        ValueLoss(variant="sb3")


def test_module_has_no_state_and_a_readable_repr():
    """The module holds settings only: no parameters or buffers, and its repr shows them."""
    module = ValueLoss(0.2, variant="clipped", scale=1.0)
    assert list(module.parameters()) == [] and module.state_dict() == {}
    assert repr(module) == "ValueLoss(clip_eps=0.2, loss_agg_mode='token-mean', variant='clipped', scale=1.0)"


def test_sb3_variant_and_scale():
    """variant='clipped' with scale=1 is Stable-Baselines3's F.mse_loss(returns, values_clipped)."""
    values, old_values, returns, _ = _batch(1, 50, seed=9)
    values = values.reshape(-1)
    old_values, returns = old_values.reshape(-1), returns.reshape(-1)
    ours = ValueLoss(0.2, variant="clipped", scale=1.0)(values, old_values, returns)
    values_pred = old_values + torch.clamp(values - old_values, -0.2, 0.2)
    assert ours.item() == pytest.approx(torch.nn.functional.mse_loss(returns, values_pred).item(), rel=1e-6)


def test_fused_is_a_bool_and_off_by_default():
    """fused defaults to False (the eager formula at every size); anything but a bool raises naming fused."""
    assert ValueLoss(0.2).fused is False
    assert "fused" not in repr(ValueLoss(0.2))
    with pytest.raises(TypeError, match="fused must be True or False; got str 'auto'"):
        ValueLoss(0.2, fused="auto")


def test_clip_eps_is_a_checked_attribute():
    """clip_eps can be read and annealed like OpenRLHF's attribute; a bad value raises and leaves the old one."""
    loss_fn = ValueLoss(0.2)
    loss_fn.clip_eps = 0.1
    assert loss_fn.clip_eps == 0.1 and loss_fn.config.clip_eps == 0.1
    with pytest.raises(ValueError, match="clip_eps must be None or a non-negative number; got -0.5"):
        loss_fn.clip_eps = -0.5
    assert loss_fn.clip_eps == 0.1


def test_a_list_batch_raises_a_type_error_naming_it():
    """ValueLoss called with a list raises TypeError naming the argument, before anything else touches it."""
    values = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="^values must be a torch.Tensor; got list"):
        ValueLoss(0.2)(values.tolist(), values, values)
    with pytest.raises(TypeError, match="^batch_num_tokens must be None, a number or a one-element tensor; got list"):
        ValueLoss(0.2)(values, values, values, torch.ones(2, 3, dtype=torch.bool), batch_num_tokens=[6])
