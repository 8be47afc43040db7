"""Tests of valueloss.fused: the one-pass loss + gradient, against an independent float64 reference.

Compilation is slow (seconds per kernel), so only a handful of configurations go through
``torch.compile`` (each compiled once per session, shapes dynamic); the full matrix of variants,
loss types, modes, masks and dtypes runs the *same* kernel source uncompiled (``_COMPILE`` replaced
by the identity), which exercises everything except inductor's code generation.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import AUTOGRAD_BAND_CLOSED, grad_loops

from valueloss import ValueLoss, fused
from valueloss import functional as F
from valueloss.fused import fused_value_loss

MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


# --------------------------------------------------------------------------- independent reference


def _reference_loss(values, old_values, returns, mask, *, clip_eps, variant="max", loss_type="squared",
                    huber_delta=1.0, mode="token-mean", scale=0.5, dp_size=1, batch_num_tokens=None,
                    global_batch_size=None, loss_scale_factor=None):
    """The loss in float64, written from the formulas (ppo2 / OpenRLHF / SB3 / verl agg_loss), per sequence."""
    v, r = values.double(), returns.double()
    ov = None if old_values is None else old_values.double()
    m = torch.ones_like(v) if mask is None else mask.double()
    keep = m != 0
    v, r = torch.where(keep, v, 0.0), torch.where(keep, r, 0.0)
    ov = None if ov is None else torch.where(keep, ov, 0.0)

    def penalty(e):
        if loss_type == "squared":
            return e * e
        return torch.where(e.abs() <= huber_delta, e * e, 2 * huber_delta * e.abs() - huber_delta**2)

    if clip_eps is None:
        loss = penalty(v - r)
    else:
        v_clip = ov + torch.clamp(v - ov, -clip_eps, clip_eps)
        loss = penalty(v_clip - r) if variant == "clipped" else torch.maximum(penalty(v_clip - r), penalty(v - r))
    loss = torch.where(keep, loss, 0.0) * m
    rows = loss.reshape(-1, loss.shape[-1])
    row_w = m.reshape(-1, m.shape[-1])
    if mode == "token-sum":
        return scale * rows.sum() * dp_size
    if mode == "token-mean":
        n = row_w.sum() if batch_num_tokens is None else torch.as_tensor(float(batch_num_tokens), dtype=torch.float64)
        return scale * (rows.sum() / n if n > 0 else rows.sum() * 0) * dp_size
    total, sequences = 0.0, 0
    for row, w in zip(rows, row_w, strict=True):
        if w.sum() > 0:
            sequences += 1
            total = total + (row.sum() / w.sum() if mode == "seq-mean-token-mean" else row.sum())
    s = sequences if global_batch_size is None else float(global_batch_size)
    out = (total / s if s > 0 else rows.sum() * 0) * dp_size
    if mode == "seq-mean-token-sum-norm":
        out = out / (loss_scale_factor or loss.shape[-1])
    return scale * out


def _reference(values, *args, **kwargs):
    """(loss, d loss / d values) of the float64 reference, by autograd."""
    leaf = values.detach().double().requires_grad_(True)
    loss = _reference_loss(leaf, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    return loss.detach(), torch.zeros_like(leaf) if grad is None else grad


def _inputs(shape, dtype=torch.float32, mask="bool", seed=0):
    """Random values/old_values/returns with many tokens outside the band, and a mask of the given kind."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g).to(dtype)
    old_values = (values.float() + 0.5 * torch.randn(shape, generator=g)).to(dtype)
    returns = torch.randn(shape, generator=g).to(dtype)
    keep = torch.rand(shape, generator=g) > 0.3
    if mask == "bool":
        action_mask = keep
    elif mask == "float":
        action_mask = keep.float() * torch.rand(shape, generator=g).add(0.5)
    else:
        action_mask = None
    return values, old_values, returns, action_mask


def _fused_and_grad(values, old_values, returns, action_mask, **kwargs):
    leaf = values.detach().clone().requires_grad_(True)
    loss = fused_value_loss(leaf, old_values, returns, action_mask, **kwargs)
    loss.backward()
    return loss.detach(), leaf.grad


def _eager_and_grad(values, old_values, returns, action_mask, **kwargs):
    leaf = values.detach().clone().requires_grad_(True)
    loss = F.value_loss(leaf, old_values, returns, action_mask, **kwargs)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.fixture
def uncompiled(monkeypatch):
    """Run the fused kernel's source without torch.compile (fresh kernel cache, restored afterwards)."""
    monkeypatch.setattr(fused, "_KERNELS", {})
    monkeypatch.setattr(fused, "_COMPILE", lambda fn: fn)
    monkeypatch.setattr(fused, "_COMPILE_ERROR", None)
    monkeypatch.setattr(fused, "_OLD_TORCH", None)  # the kernels' source runs on any torch, uncompiled


@pytest.fixture
def fresh_state(monkeypatch):
    """An empty kernel cache and no remembered failure; the module state is restored afterwards."""
    monkeypatch.setattr(fused, "_KERNELS", {})
    monkeypatch.setattr(fused, "_COMPILE_ERROR", None)
    monkeypatch.setattr(fused, "_WARNED", False)


needs_compiler = pytest.mark.skipif(not fused.compile_available("cpu"), reason="no C++ compiler for inductor")
needs_global_state_guard = pytest.mark.skipif(
    fused._GlobalStateGuard is None, reason="this torch has no GlobalStateGuard: the direct call is never direct"
)
needs_aot_compile = pytest.mark.skipif(
    not hasattr(torch.compile(lambda x: x), "aot_compile"), reason="this torch has no aot_compile (torch >= 2.10)"
)


# --------------------------------------------------------------------------- the full matrix, uncompiled

CONFIGS = [
    dict(clip_eps=0.2, variant="max", loss_type="squared"),
    dict(clip_eps=0.2, variant="clipped", loss_type="squared"),
    dict(clip_eps=0.3, variant="max", loss_type="huber", huber_delta=0.7),
    dict(clip_eps=0.3, variant="clipped", loss_type="huber", huber_delta=1.5),
    dict(clip_eps=None, variant="max", loss_type="squared"),
    dict(clip_eps=0.0, variant="max", loss_type="squared"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['variant']}-{c['loss_type']}-{c['clip_eps']}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask", ["bool", "float", "none"])
def test_every_configuration_matches_float64_reference(uncompiled, config, mode, mask):
    """Every variant x loss type x mode x mask kind gives the float64 reference's loss and gradient."""
    values, old_values, returns, action_mask = _inputs((5, 41), mask=mask)
    loss, grad = _fused_and_grad(values, old_values, returns, action_mask, mode=mode, **config)
    ref_loss, ref_grad = _reference(values, old_values, returns, action_mask, mode=mode, **config)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-8)
    assert grad.dtype == values.dtype and grad.shape == values.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_other_dtypes_accumulate_in_float32_and_return_input_dtype(uncompiled, dtype, mode):
    """Half inputs: fp32 loss equal to the eager path's, gradient in the input dtype equal to eager autograd's."""
    values, old_values, returns, action_mask = _inputs((4, 300), dtype=dtype)
    loss, grad = _fused_and_grad(values, old_values, returns, action_mask, clip_eps=0.2, mode=mode)
    eager_loss, eager_grad = _eager_and_grad(values, old_values, returns, action_mask, clip_eps=0.2, mode=mode)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, eager_grad)


@pytest.mark.parametrize("mode", MODES)
def test_global_counts_match_reference(uncompiled, mode):
    """dp_size with the global counts and loss_scale_factor (numbers and tensors) as in the reference."""
    values, old_values, returns, action_mask = _inputs((3, 2, 50), mask="bool")
    counts = dict(dp_size=4, batch_num_tokens=torch.tensor(1234.0), global_batch_size=17, loss_scale_factor=64.0)
    loss, grad = _fused_and_grad(values, old_values, returns, action_mask, clip_eps=0.2, mode=mode, scale=1.0, **counts)
    ref_loss, ref_grad = _reference(values, old_values, returns, action_mask, clip_eps=0.2, variant="max",
                                    loss_type="squared", huber_delta=1.0, mode=mode, scale=1.0, **counts)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 4),
    tokens=st.integers(1, 9),
    clip_eps=st.sampled_from([None, 0.0, 0.1, 0.5]),
    mode=st.sampled_from(MODES),
    keep_fraction=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 1000),
)
def test_random_shapes_and_masks_match_eager(rows, tokens, clip_eps, mode, keep_fraction, seed):
    """Shapes including 1, empty and full masks: the fused result equals eager autograd of the formula."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "_KERNELS", {})
        mp.setattr(fused, "_COMPILE", lambda fn: fn)
        mp.setattr(fused, "_COMPILE_ERROR", None)
        mp.setattr(fused, "_OLD_TORCH", None)
        values, old_values, returns, _ = _inputs((rows, tokens), seed=seed)
        action_mask = torch.rand((rows, tokens), generator=torch.Generator().manual_seed(seed)) < keep_fraction
        loss, grad = _fused_and_grad(values, old_values, returns, action_mask, clip_eps=clip_eps, mode=mode)
        eager_loss, eager_grad = _eager_and_grad(values, old_values, returns, action_mask, clip_eps=clip_eps, mode=mode)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-6, atol=1e-7)


def test_gradcheck_float64(uncompiled):
    """torch.autograd.gradcheck passes in float64 away from the band edges and ties."""
    values, old_values, returns, action_mask = (t.double() if t.is_floating_point() else t for t in _inputs((3, 11)))
    leaf = values.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v: fused_value_loss(v, old_values, returns, action_mask, clip_eps=0.2, mode="seq-mean-token-mean"),
        (leaf,),
    )


# --------------------------------------------------------------------------- compiled kernels (a few configs)


def _edge_and_tie_inputs():
    """Dyadic inputs (exact in fp32 and fp64), one situation per column, repeated over 700 rows.

    Columns 0, 1, 2, 6: ``|values - old_values| == clip_eps`` exactly (band edges; the band is closed);
    3: outside the band, the unclipped branch wins; 4: inside; 5: outside and the two branches tie
    exactly; 7: outside, the clipped branch wins (gradient zero).
    """
    values = torch.tensor([1.0, 1.0, -0.5, 2.0, 0.25, 1.0, 3.0, -2.0]).repeat(700, 1)
    old_values = torch.tensor([0.75, 1.25, -0.25, 0.0, 0.0, 0.0, 2.75, -1.0]).repeat(700, 1)
    returns = torch.tensor([3.0, -1.0, 2.0, 1.0, 1.0, 0.625, 0.0, -3.0]).repeat(700, 1)
    return values, old_values, returns


@needs_compiler
@pytest.mark.parametrize("mask", ["bool", "float", "none"])
@pytest.mark.parametrize("mode", ["token-sum", "seq-mean-token-mean"])
def test_compiled_matches_eager_within_one_ulp(mask, mode):
    """Compiled fp32: loss within 1e-6 relative of eager, gradient autograd's to 1 ulp (4 with float weights)."""
    values, old_values, returns, action_mask = _inputs((41, 401), mask=mask)
    loss, grad = _fused_and_grad(values, old_values, returns, action_mask, clip_eps=0.2, mode=mode)
    eager_loss, eager_grad = _eager_and_grad(values, old_values, returns, action_mask, clip_eps=0.2, mode=mode)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
    # Float masks: the weight multiplies in another order than autograd's (c * m) * g, hence a few ulp.
    torch.testing.assert_close(grad, eager_grad, rtol=2**-23 * (4 if mask == "float" else 1), atol=1e-12)
    assert torch.equal(grad == 0, eager_grad == 0)


def _scaled_grads(loss_fn, values, old_values, returns, action_mask, coefficients, **kwargs):
    """``d (c * loss) / d values`` for each ``c``, one forward each, by autograd through ``loss_fn``."""
    grads = []
    for c in coefficients:
        leaf = values.detach().clone().requires_grad_(True)
        loss = loss_fn(leaf, old_values, returns, action_mask, **kwargs)
        (loss if c == 1 else c * loss).backward()
        grads.append(leaf.grad)
    return grads


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_forward_gradient_and_recomputed_gradient_both_match_eager(dtype, mode):
    """grad_output 1 (the forward's gradient) and 0.3 (recomputed) both give eager's gradient.

    bf16 bit for bit, fp32 to 1 ulp.
    """
    values, old_values, returns, action_mask = _inputs((23, 301), dtype=dtype)
    action_mask[3] = False  # an empty sequence
    counts = {"batch_num_tokens": 5000} if mode == "token-mean" else {"global_batch_size": 30}
    kwargs = dict(clip_eps=0.2, mode=mode, dp_size=2, **(counts if mode != "token-sum" else {}))
    ours = _scaled_grads(fused_value_loss, values, old_values, returns, action_mask, (1.0, 0.3), **kwargs)
    eager = _scaled_grads(F.value_loss, values, old_values, returns, action_mask, (1.0, 0.3), **kwargs)
    for grad, eager_grad in zip(ours, eager, strict=True):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad, eager_grad, rtol=0 if dtype == torch.bfloat16 else 2**-23, atol=1e-12)
        assert torch.equal(grad == 0, eager_grad == 0)


@needs_compiler
@pytest.mark.parametrize("band_closed", [True, False], ids=["closed", "open"])
def test_compiled_band_edges_and_ties_are_exact(monkeypatch, band_closed):
    """On band edges (closed band as torch <= 2.13's clamp, open as 2.14's) and exact ties (50/50 split)
    the compiled gradient is autograd's, bit for bit: the float64 reference's where the convention is
    the installed torch's, the loop reference's (the same conventions spelled out by hand) for both."""
    values, old_values, returns = _edge_and_tie_inputs()
    action_mask = torch.ones_like(values, dtype=torch.bool)
    kwargs = dict(clip_eps=0.25, variant="max", loss_type="squared", huber_delta=1.0, mode="token-sum")
    monkeypatch.setattr(F, "BAND_CLOSED", band_closed)  # part of the kernels' key: its own compiled kernel
    loss, grad = _fused_and_grad(values, old_values, returns, action_mask, **kwargs)
    if band_closed == AUTOGRAD_BAND_CLOSED:
        ref_loss, ref_grad = _reference(values, old_values, returns, action_mask, **kwargs)
        assert torch.equal(grad.double(), ref_grad)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-7, atol=0)
    loop_grad = grad_loops(values[:2], old_values[:2], returns[:2], clip_eps=0.25, mode="token-sum",
                           band_closed=band_closed)
    assert torch.equal(grad[:2].double(), loop_grad)
    # scale 0.5 times: column 0, on the edge where v_clipped == v, full 2 (v - R) = -4 with a closed band,
    # half of it with an open one (a tie whose clipped share is zero); column 5, a tie outside the band:
    # half of the unclipped 2 (1 - 0.625) plus half of zero; column 7: zero.
    assert grad[0, 0] == 0.5 * -4.0 * (1.0 if band_closed else 0.5)
    assert grad[0, 5] == 0.5 * 0.5 * 0.75 and grad[0, 7] == 0.0


@needs_compiler
def test_compiled_huber_and_clipped_variant_match_reference():
    """The compiled Huber loss and the SB3 'clipped' variant give the float64 reference's results."""
    values, old_values, returns, action_mask = _inputs((41, 401), mask="float")
    configs = (dict(variant="max", loss_type="huber", huber_delta=0.5), dict(variant="clipped", loss_type="squared"))
    for config in configs:
        kwargs = dict(clip_eps=0.2, mode="seq-mean-token-sum", huber_delta=1.0) | config
        loss, grad = _fused_and_grad(values, old_values, returns, action_mask, **kwargs)
        ref_loss, ref_grad = _reference(values, old_values, returns, action_mask, **kwargs)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-9)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_half_precision_matches_eager(dtype):
    """Compiled bf16/fp16: fp32 loss equal to eager's (1e-6 relative), gradient in the input dtype bit for bit."""
    values, old_values, returns, action_mask = _inputs((41, 401), dtype=dtype)
    loss, grad = _fused_and_grad(values, old_values, returns, action_mask, clip_eps=0.2)
    eager_loss, eager_grad = _eager_and_grad(values, old_values, returns, action_mask, clip_eps=0.2)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, eager_grad, rtol=0, atol=0)


@needs_compiler
def test_masked_out_nan_and_inf_never_leak():
    """NaN/inf in masked-out positions of every input leave the loss and gradient finite and exact."""
    values, old_values, returns, action_mask = _inputs((41, 401), mask="bool")
    dirty = [t.clone() for t in (values, old_values, returns)]
    for t, bad in zip(dirty, (math.nan, math.inf, -math.inf), strict=True):
        t[~action_mask] = bad
    loss, grad = _fused_and_grad(*dirty, action_mask, clip_eps=0.2, mode="token-sum")
    clean_loss, clean_grad = _fused_and_grad(values, old_values, returns, action_mask, clip_eps=0.2, mode="token-sum")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.equal(loss, clean_loss) and torch.equal(grad, clean_grad)
    assert (grad[~action_mask] == 0).all()


@needs_compiler
@pytest.mark.parametrize("mode", ["token-sum", "seq-mean-token-mean"])
def test_empty_mask_gives_zero_not_nan(mode):
    """An all-False mask gives loss 0 and gradient 0; empty rows contribute nothing in sequence modes."""
    values, old_values, returns, _ = _inputs((41, 401))
    empty = torch.zeros_like(values, dtype=torch.bool)
    loss, grad = _fused_and_grad(values, old_values, returns, empty, clip_eps=0.2, mode=mode)
    assert loss.item() == 0.0 and not grad.any()
    half = empty.clone()
    half[:20] = True
    loss, grad = _fused_and_grad(values, old_values, returns, half, clip_eps=0.2, mode=mode)
    ref_loss, ref_grad = _reference(values, old_values, returns, half, clip_eps=0.2, variant="max",
                                    loss_type="squared", huber_delta=1.0, mode=mode)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
    assert not grad[20:].any()


@needs_compiler
def test_new_shapes_do_not_recompile():
    """Once a configuration is compiled for a large input, other (B, T) shapes reuse the kernel (dynamic shapes)."""
    from torch._dynamo.utils import counters

    _fused_and_grad(*_inputs((41, 401)), clip_eps=0.2, mode="token-sum")
    before = counters["stats"]["unique_graphs"]
    for shape in [(37, 409), (64, 1000), (3, 5, 777)]:
        _fused_and_grad(*_inputs(shape), clip_eps=0.2, mode="token-sum")
    assert counters["stats"]["unique_graphs"] == before


def _row_sums(x):
    """A graph whose loops depend on both sizes of ``x``: a kernel run on the wrong sizes reads the wrong numbers."""
    return (x * 2.0).sum(dim=-1)


def _small_integers(shape):
    """float32 small integers: every summation order gives the same, exact, row sums."""
    return torch.randint(-8, 8, shape).float()


def _direct_call(name):
    """A _DirectCall of its own copy of _row_sums: dynamo keeps what it learnt about sizes per code object."""
    return fused._DirectCall(torch.compile(fused._new_function(_row_sums, name), fullgraph=True, dynamic=True))


@needs_compiler
@needs_aot_compile
def test_direct_call_gives_each_specialisation_its_variant_and_checks_guards_once_per_signature():
    """Dynamo specialises equal sizes to one symbol, and sizes 1: such inputs get a variant, never a wrong one."""
    call = _direct_call("variants")
    square, wide, one_row = (_small_integers(shape) for shape in [(6, 6), (5, 7), (1, 9)])
    for x in (square, wide, one_row, square, wide):
        torch.testing.assert_close(call(x), _row_sums(x), rtol=0, atol=0)
    assert call.direct and len(call.variants) == 3
    # each variant's fast check says what its guard_check says, for inputs it accepts and ones it rejects
    others = [_small_integers(shape) for shape in [(8, 11), (3, 3), (1, 4), (0, 5)]] + [square.double(), square.t()]
    for variant, check in zip(call.variants, call.checks):
        verdicts = [check((x,)) for x in (square, wide, one_row, *others)]
        assert verdicts == [bool(variant.guard_check(x)) for x in (square, wide, one_row, *others)]
        assert any(verdicts) and not all(verdicts)
    checks = []
    call.checks = [lambda args, _check=check: checks.append(1) or _check(args) for check in call.checks]
    for x in (square, wide, one_row):
        call(x)
    assert checks == []  # memoised per signature
    call(_small_integers((8, 11)))  # a new signature: checked once, accepted by the (5, 7) variant
    call(_small_integers((8, 11)))
    assert len(call.variants) == 3 and 1 <= len(checks) <= 3


def test_guard_check_falls_back_to_the_variants_own():
    """Without the artifacts the fast check reads (another torch), or with parameters it cannot zip, a
    variant's own guard_check decides."""

    class Variant:
        def __init__(self, artifacts=None):
            if artifacts is not None:
                self._artifacts = artifacts
            self.calls = []

        def guard_check(self, *args):
            self.calls.append(args)
            return args[0] > 0

    def with_default(x, y=1):
        return x

    artifacts = types.SimpleNamespace(
        guard_manager=types.SimpleNamespace(check=lambda f_locals: pytest.fail("zipped a defaulted signature")),
        signature=inspect.signature(with_default), runtime_env=types.SimpleNamespace(closure=()),
    )
    for variant in (Variant(), Variant(artifacts)):
        check = fused._guard_check(variant)
        assert check((1,)) and not check((-1,)) and variant.calls == [(1,), (-1,)]
        assert not fused._accepts(check, ("not a number",))  # an error in a check is a rejection


@needs_compiler
@needs_aot_compile
def test_direct_call_generates_code_only_inside_its_codegen_context():
    """Compiling a variant and dynamo's path run inside ``codegen()``; calls of a compiled variant do not, even
    for a signature it has not seen (inductor writes the code in aot_compile)."""
    entered = []

    @contextlib.contextmanager
    def codegen():
        entered.append(1)
        yield

    call = _direct_call("codegen")
    x, y = _small_integers((5, 7)), _small_integers((6, 8))
    for args, expected in [(x, 1), (x, 1), (y, 1), (x, 1), (y, 1)]:
        torch.testing.assert_close(call.call((args,), codegen), _row_sums(args), rtol=0, atol=0)
        assert len(entered) == expected
    assert len(call.variants) == 1
    call.MAX_VARIANTS = 1
    one_row = _small_integers((1, 9))  # size 1: a specialisation of its own, beyond the cap
    for expected in (2, 3):
        torch.testing.assert_close(call.call((one_row,), codegen), _row_sums(one_row), rtol=0, atol=0)
        assert len(entered) == expected and call.by_signature[fused._signature(one_row),][0] is call.compiled


@needs_compiler
@needs_aot_compile
def test_direct_call_chooses_again_when_the_number_of_threads_changes():
    """Inductor bakes the thread count into its C++ loops and dynamo guards on it: so does the memo."""
    call = _direct_call("threads")
    x = _small_integers((5, 70000))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.testing.assert_close(call(x), _row_sums(x), rtol=0, atol=0)
        torch.set_num_threads(2)
        torch.testing.assert_close(call(x), _row_sums(x), rtol=0, atol=0)
        assert len(call.variants) == 2
        assert not call.variants[0].guard_check(x) and call.variants[1].guard_check(x)
        torch.set_num_threads(1)
        call(x)
        assert len(call.variants) == 2 and call.by_signature[fused._signature(x),][0] is call.variants[0]
    finally:
        torch.set_num_threads(previous)


@needs_compiler
@needs_aot_compile
def test_direct_call_tells_inference_tensors_apart():
    """An inference tensor has other dispatch keys than a normal one: the guards tell them apart, so must the memo."""
    call = _direct_call("inference")
    x = _small_integers((5, 9))
    torch.testing.assert_close(call(x), _row_sums(x), rtol=0, atol=0)
    with torch.inference_mode():
        y = _small_integers((5, 9))
        torch.testing.assert_close(call(y), _row_sums(y), rtol=0, atol=0)
    assert fused._signature(x) != fused._signature(y)
    assert len(call.by_signature) == 2


@needs_compiler
@needs_aot_compile
def test_direct_call_beyond_its_variants_uses_dynamos_guarded_call():
    call = _direct_call("cap")
    call.MAX_VARIANTS = 1
    square, wide = _small_integers((6, 6)), _small_integers((5, 7))
    for x in (square, wide, wide):
        torch.testing.assert_close(call(x), _row_sums(x), rtol=0, atol=0)
    assert len(call.variants) == 1 and call.by_signature[fused._signature(wide),][0] is call.compiled


@needs_global_state_guard
def test_direct_call_with_an_unhashable_argument_calls_the_compiled_function():
    calls = []

    def compiled(xs):
        calls.append(xs)
        return xs[0] + xs[1]

    compiled.aot_compile = lambda example: pytest.fail("no signature, so no variant")
    call = fused._DirectCall(compiled)
    assert call.direct
    assert torch.equal(call([torch.ones(2), torch.ones(2)]), torch.full((2,), 2.0))
    assert len(calls) == 1 and call.by_signature == {} and call.variants == []


@needs_global_state_guard
def test_direct_call_without_or_with_a_failing_aot_compile_calls_the_compiled_function():
    calls = []

    def compiled(x):
        calls.append(x)
        return x + 1

    plain = fused._DirectCall(compiled)  # no aot_compile attribute (older torch)
    assert not plain.direct and plain(1) == 2

    def broken_aot_compile(example):
        raise RuntimeError("simulated")

    compiled.aot_compile = broken_aot_compile
    failing = fused._DirectCall(compiled)
    assert failing.direct
    assert failing(torch.tensor(1.0)) == 2 and not failing.direct and failing.variants == []
    assert failing(torch.tensor(2.0)) == 3 and len(calls) == 3


@needs_compiler
def test_fused_sequence_modes_on_square_then_other_shapes():
    """Square (B, T) inputs share one size symbol in dynamo; other shapes must not run that variant."""
    for shape in [(33, 33), (20, 33), (33, 20), (1, 33)]:
        values, old_values, returns, action_mask = _inputs(shape, seed=shape[0])
        loss, grad = _fused_and_grad(values, old_values, returns, action_mask, clip_eps=0.2, mode="seq-mean-token-mean")
        ref_loss, ref_grad = _reference(
            values, old_values, returns, action_mask, clip_eps=0.2, mode="seq-mean-token-mean"
        )
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


@needs_compiler
def test_forward_never_reads_tensor_values_on_host(monkeypatch):
    """No host synchronisation in forward: reading any tensor's value on the host raises during the call."""
    values, old_values, returns, action_mask = _inputs((41, 401))
    counts = dict(dp_size=2, batch_num_tokens=torch.tensor(9000.0), global_batch_size=torch.tensor(80.0))
    for mode in ("token-mean", "seq-mean-token-mean"):
        _fused_and_grad(values, old_values, returns, action_mask, clip_eps=0.2, mode=mode, **counts)  # warm up

    def host_read(*args, **kwargs):
        raise AssertionError("host synchronisation")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    leaf = values.clone().requires_grad_(True)
    losses = [fused_value_loss(leaf, old_values, returns, action_mask, clip_eps=0.2, mode=mode, **counts)
              for mode in ("token-mean", "seq-mean-token-mean")]
    monkeypatch.undo()
    for mode, loss in zip(("token-mean", "seq-mean-token-mean"), losses, strict=True):  # and the global counts count
        ref_loss, _ = _reference(values, old_values, returns, action_mask, clip_eps=0.2, mode=mode, **counts)
        torch.testing.assert_close(loss.detach().double(), ref_loss, rtol=1e-6, atol=0)


@needs_compiler
def test_backward_scales_by_grad_output_and_supports_retain_graph():
    """backward multiplies by grad_output; retain_graph=True lets it run twice with the same result."""
    values, old_values, returns, action_mask = _inputs((41, 401))
    leaf = values.clone().requires_grad_(True)
    loss = fused_value_loss(leaf, old_values, returns, action_mask, clip_eps=0.2, mode="token-sum")
    (3.0 * loss).backward(retain_graph=True)
    first = leaf.grad.clone()
    loss.backward()
    _, eager_grad = _eager_and_grad(values, old_values, returns, action_mask, clip_eps=0.2, mode="token-sum")
    torch.testing.assert_close(first, 3.0 * eager_grad)
    torch.testing.assert_close(leaf.grad, 4.0 * eager_grad)


def _peak_extra_bytes(step):
    """Peak of (allocated - freed) bytes while ``step`` runs, from the profiler's CPU memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    current = peak = 0
    for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if event.name() == "[memory]":
            current += event.nbytes()
            peak = max(peak, current)
    return peak


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_a_step_allocates_one_gradient_and_nothing_else_of_its_size(dtype, mode):
    """Forward + backward hold at most the gradient itself (1x the input) at any moment, for fp32 and bf16."""
    values, old_values, returns, action_mask = _inputs((64, 1024), dtype=dtype)
    leaf = values.clone().requires_grad_(True)

    def step():
        fused_value_loss(leaf, old_values, returns, action_mask, clip_eps=0.2, mode=mode).backward()

    step()  # compile outside the measurement
    leaf.grad = None
    peak = _peak_extra_bytes(step)
    input_bytes = leaf.numel() * leaf.element_size()
    assert input_bytes <= peak <= 1.01 * input_bytes + 4096, (peak, input_bytes)
    assert leaf.grad.dtype == dtype
    _, eager_grad = _eager_and_grad(values, old_values, returns, action_mask, clip_eps=0.2, mode=mode)
    torch.testing.assert_close(leaf.grad, eager_grad, rtol=0 if dtype == torch.bfloat16 else 1e-6, atol=1e-12)


@needs_compiler
def test_half_precision_retain_graph_recomputes_the_same_gradient():
    """bf16 backward recomputes from the saved inputs, so a second backward gives the same gradient again."""
    values, old_values, returns, action_mask = _inputs((41, 401), dtype=torch.bfloat16)
    leaf = values.clone().requires_grad_(True)
    loss = fused_value_loss(leaf, old_values, returns, action_mask, clip_eps=0.2)
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    leaf.grad = None
    loss.backward()
    _, eager_grad = _eager_and_grad(values, old_values, returns, action_mask, clip_eps=0.2)
    assert torch.equal(first, eager_grad) and torch.equal(leaf.grad, eager_grad)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_modified_in_place_after_forward(dtype):
    """loss.backward() hands over the forward's gradient (in-place edits do not change it).

    A recomputation (another grad_output) is refused.
    """
    values, old_values, returns, action_mask = _inputs((41, 401), dtype=dtype)
    leaf = values.clone().requires_grad_(True)
    loss = fused_value_loss(leaf, old_values.clone(), returns, action_mask, clip_eps=0.2)
    loss.backward()
    expected = leaf.grad.clone()
    leaf.grad = None
    edited = old_values.clone()
    loss = fused_value_loss(leaf, edited, returns, action_mask, clip_eps=0.2)
    edited.add_(1.0)
    loss.backward()
    assert torch.equal(leaf.grad, expected)

    edited = old_values.clone()
    loss = fused_value_loss(leaf, edited, returns, action_mask, clip_eps=0.2)
    edited.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (2.0 * loss).backward()  # grad_output 2: backward recomputes from the saved inputs


@needs_compiler
def test_double_backward_is_refused_clearly():
    """A second-order gradient through the fused loss raises instead of returning a wrong zero."""
    values, old_values, returns, action_mask = _inputs((41, 401))
    leaf = values.clone().requires_grad_(True)
    loss = fused_value_loss(leaf, old_values, returns, action_mask, clip_eps=0.2, mode="token-sum")
    with pytest.raises(RuntimeError, match="create_graph=True is not supported"):
        torch.autograd.grad(loss, leaf, create_graph=True)


def test_other_inputs_requiring_grad_are_refused():
    """The fused path differentiates values only and says so when returns needs a gradient."""
    values, old_values, returns, action_mask = _inputs((3, 5))
    with pytest.raises(ValueError, match="returns with requires_grad=True"):
        fused_value_loss(values.requires_grad_(), old_values, returns.requires_grad_(), action_mask, clip_eps=0.2)


def test_bad_arguments_are_validated_like_the_eager_path():
    """Shape mismatches and bad settings raise the eager path's errors, naming the argument."""
    values, old_values, returns, action_mask = _inputs((3, 5))
    with pytest.raises(ValueError, match="values and returns must have the same shape"):
        fused_value_loss(values, old_values, returns[:, :4], action_mask, clip_eps=0.2)
    with pytest.raises(ValueError, match="mode must be one of"):
        fused_value_loss(values, old_values, returns, action_mask, clip_eps=0.2, mode="mean")
    with pytest.raises(ValueError, match="batch_num_tokens"):
        fused_value_loss(values, old_values, returns, action_mask, clip_eps=0.2, dp_size=2)


# --------------------------------------------------------------------------- fallback when compilation fails


def test_compile_failure_falls_back_with_one_warning(fresh_state, monkeypatch):
    """When compilation fails, the eager closed form runs (same results) and one RuntimeWarning is shown."""

    def broken_compile(fn):
        def compiled(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return compiled

    monkeypatch.setattr(fused, "_COMPILE", broken_compile)
    monkeypatch.setattr(fused, "_OLD_TORCH", None)  # a torch new enough, whose compilation fails
    values, old_values, returns, action_mask = _inputs((6, 50), mask="float")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [
            _fused_and_grad(values, old_values, returns, action_mask, clip_eps=0.2, mode=mode) for mode in MODES
        ]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "InvalidCxxCompiler" in messages[0]
    assert not fused.compile_available("cpu")
    for mode, (loss, grad) in zip(MODES, results, strict=True):
        eager_loss, eager_grad = _eager_and_grad(values, old_values, returns, action_mask, clip_eps=0.2, mode=mode)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, eager_grad)


def test_torch_older_than_the_tested_minimum_runs_the_eager_closed_form(fresh_state, monkeypatch):
    """With a torch older than MIN_COMPILE_TORCH nothing is compiled: "auto" stays eager, fused=True warns
    once (naming the version) and gives eager's results; the check itself compares versions correctly."""
    assert fused._OLD_TORCH is None if torch.__version__ >= fused.MIN_COMPILE_TORCH else fused._OLD_TORCH
    monkeypatch.setattr(fused, "_OLD_TORCH", "torch 2.1.2 is older than 2.6, the oldest whose compiled kernels ...")
    monkeypatch.setattr(fused, "_COMPILE", lambda fn: pytest.fail("nothing may be compiled"))
    values, old_values, returns, action_mask = _inputs((6, 50))
    assert not fused.compile_available("cpu")
    assert not fused.use_fused("auto", values.expand(400, 6, 50).requires_grad_(True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [_fused_and_grad(values, old_values, returns, action_mask, clip_eps=0.2, mode=m) for m in MODES]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "torch 2.1.2 is older than 2.6" in messages[0]
    for mode, (loss, grad) in zip(MODES, results, strict=True):
        eager_loss, eager_grad = _eager_and_grad(values, old_values, returns, action_mask, clip_eps=0.2, mode=mode)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, eager_grad)
    fused.reset()  # forgets compilation failures, not the version
    assert not fused.compile_available("cpu")


_NO_COMPILER_SCRIPT = """
import warnings, torch
from valueloss import ValueLoss, fused, functional as F
values = torch.randn(8, 700, requires_grad=True)
old_values, returns, mask = torch.randn(8, 700), torch.randn(8, 700), torch.rand(8, 700) > 0.3
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
        values.grad = None
        fused.fused_value_loss(values, old_values, returns, mask, clip_eps=0.2).backward()
grad = values.grad.clone()
values.grad = None
F.value_loss(values, old_values, returns, mask, clip_eps=0.2).backward()
print("available", fused.compile_available(), "auto", fused.use_fused("auto", values.expand(100, 8, 700)))
print("warnings", sum(issubclass(w.category, RuntimeWarning) for w in caught))
print("message", [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)][0][:80])
print("equal", torch.allclose(grad, values.grad, rtol=1e-6, atol=0))
"""


def test_without_a_cpp_compiler_falls_back_in_a_fresh_process():
    """With CXX pointing nowhere (and no compiled cache), the real inductor error leads to the eager fallback."""
    env = dict(os.environ, CXX="/nonexistent/g++", TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    proc = subprocess.run([sys.executable, "-c", _NO_COMPILER_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert lines["available"] == "False auto False"
    assert lines["warnings"] == "1" and "torch.compile is unavailable" in lines["message"]
    assert lines["equal"] == "True"


def test_plans_keep_configurations_apart(uncompiled, monkeypatch):
    """The per-configuration plans (settings, constants) never leak into another configuration: interleaved
    calls that differ in one setting each equal the eager formula, before and after reset()."""
    monkeypatch.setattr(fused, "_WARNED", fused._WARNED)  # reset() below clears it
    values, old_values, returns, action_mask = _inputs((3, 7))
    configs = [
        dict(clip_eps=0.1), dict(clip_eps=0.5), dict(clip_eps=0.1, scale=2.0), dict(clip_eps=0.1, dp_size=2,
        batch_num_tokens=9), dict(clip_eps=0.1, dp_size=2, batch_num_tokens=torch.tensor(5.0)),
        dict(clip_eps=0.1, mode="seq-mean-token-sum-norm"), dict(clip_eps=0.1, loss_type="huber", huber_delta=0.3),
        dict(clip_eps=0.1, mode="seq-mean-token-sum-norm", loss_scale_factor=3.0),
    ]
    for _ in range(2):  # the second round after reset()
        for kwargs in configs + configs[::-1]:
            loss, grad = _fused_and_grad(values, old_values, returns, action_mask, **kwargs)
            eager_loss, eager_grad = _eager_and_grad(values, old_values, returns, action_mask, **kwargs)
            torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0, msg=str(kwargs))
            assert torch.equal(grad, eager_grad), kwargs
        # a different number of tokens per sequence changes the default norm of seq-mean-token-sum-norm
        short = [t[:, :5] for t in (values, old_values, returns, action_mask)]
        loss, _ = _fused_and_grad(*short, clip_eps=0.1, mode="seq-mean-token-sum-norm")
        eager_loss, _ = _eager_and_grad(*short, clip_eps=0.1, mode="seq-mean-token-sum-norm")
        torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
        assert fused._PLANS
        fused.reset()
        assert not fused._PLANS



@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_bool_mask_is_counted_in_int32_unless_the_count_could_overflow_it(uncompiled, monkeypatch, mode):
    """The graph sums a bool mask's bytes into an int32 count (``torch.sum``'s default for integers, int64,
    took 3-4x as long at 1M tokens), and into int64 only where int32 could overflow; the loss is the same."""
    assert fused._count_dtype(2**31 - 1) == torch.int32 and fused._count_dtype(2**31) == torch.int64
    values, old_values, returns, action_mask = _inputs((5, 37))
    eager_loss, eager_grad = _eager_and_grad(values, old_values, returns, action_mask, clip_eps=0.2, mode=mode)

    class IntegerSums(torch.utils._python_dispatch.TorchDispatchMode):
        """Records the result dtype of every sum of an integer tensor."""

        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket is torch.ops.aten.sum and not args[0].is_floating_point():
                self.dtypes.append(out.dtype)
            return out

    for count_dtype in (torch.int32, torch.int64):
        monkeypatch.setattr(fused, "_count_dtype", lambda numel, count_dtype=count_dtype: count_dtype)
        with IntegerSums() as sums:
            loss, grad = _fused_and_grad(values, old_values, returns, action_mask, clip_eps=0.2, mode=mode)
        assert sums.dtypes == [count_dtype]
        torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
        assert torch.equal(grad, eager_grad)

def test_reset_forgets_a_failure(fresh_state, monkeypatch):
    """reset() clears a remembered compilation failure and the compiled kernels."""
    monkeypatch.setattr(fused, "_COMPILE_ERROR", "RuntimeError: simulated")
    monkeypatch.setattr(fused, "_KERNELS", {"key": None})
    assert not fused.compile_available("cpu")
    fused.reset()
    assert fused._COMPILE_ERROR is None and fused._KERNELS == {}


# --------------------------------------------------------------------------- ValueLoss(fused=...)


def test_valueloss_fused_true_equals_fused_false(uncompiled):
    """ValueLoss(fused=True) and ValueLoss(fused=False) give the same loss and gradient in every mode."""
    values, old_values, returns, action_mask = _inputs((4, 3, 20))
    for mode, variant in itertools.product(MODES, ("max", "clipped")):
        results = []
        for setting in (True, False):
            leaf = values.clone().requires_grad_(True)
            loss_fn = ValueLoss(0.2, loss_agg_mode=mode, variant=variant, fused=setting)
            loss = loss_fn(leaf, old_values, returns, action_mask)
            loss.backward()
            results.append((loss.detach(), leaf.grad))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
        torch.testing.assert_close(results[0][1], results[1][1])


def test_valueloss_auto_stays_eager_for_small_inputs(fresh_state, monkeypatch):
    """fused='auto' (the default) never compiles for inputs below AUTO_MIN_NUMEL, nor when grads are off."""

    def no_compile(fn):
        raise AssertionError("compiled")

    monkeypatch.setattr(fused, "_COMPILE", no_compile)
    loss_fn = ValueLoss(0.2)
    assert loss_fn.fused == "auto"
    values, old_values, returns, action_mask = _inputs((8, 128))
    leaf = values.clone().requires_grad_(True)
    loss_fn(leaf, old_values, returns, action_mask).backward()
    assert fused._KERNELS == {} and leaf.grad is not None
    big = _inputs((fused.AUTO_MIN_NUMEL // 64, 64))
    with torch.no_grad():
        loss_fn(*big)
    assert fused._KERNELS == {}


def test_valueloss_auto_uses_fused_for_large_inputs(uncompiled, monkeypatch):
    """fused='auto' takes the fused path from AUTO_MIN_NUMEL tokens on, unless another input needs a gradient."""
    monkeypatch.setattr(fused, "AUTO_MIN_NUMEL", 100)
    values, old_values, returns, action_mask = _inputs((4, 30))
    loss = ValueLoss(0.2)(values.clone().requires_grad_(True), old_values, returns, action_mask)
    assert type(loss.grad_fn).__name__ == "FusedValueLossBackward"
    loss = ValueLoss(0.2)(values.clone().requires_grad_(True), old_values, returns.clone().requires_grad_(True))
    assert type(loss.grad_fn).__name__ != "FusedValueLossBackward"
    loss = ValueLoss(0.2)(values.clone().requires_grad_(True)[:, :20], old_values[:, :20], returns[:, :20])
    assert type(loss.grad_fn).__name__ != "FusedValueLossBackward"


def test_valueloss_rejects_bad_fused_setting():
    """fused must be True, False or 'auto'; anything else raises naming the argument."""
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="fused must be True, False or 'auto'"):
            ValueLoss(0.2, fused=bad)
    assert "fused=False" in repr(ValueLoss(0.2, fused=False))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_eager():
    """On CUDA (Triton kernel) the fused loss and gradient equal the eager path's."""
    values, old_values, returns, action_mask = (t.cuda() for t in _inputs((41, 401)))
    loss, grad = _fused_and_grad(values, old_values, returns, action_mask, clip_eps=0.2)
    eager_loss, eager_grad = _eager_and_grad(values, old_values, returns, action_mask, clip_eps=0.2)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, eager_grad)
