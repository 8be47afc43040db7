"""Tests of valueloss.functional against the independent loop reference in tests/reference.py."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from bands import band
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import AUTOGRAD_BAND_CLOSED, clamp_with_edge, grad_loops, loss_loops, token_grad, token_loss

from valueloss import functional as F
from valueloss import fused
from valueloss.functional import AGGREGATION_MODES, Region

CLIP_EPS = [None, 0.0, 0.05, 0.25, 0.5, 2.0, math.inf]

# Values on a grid of quarters make exact band edges and exact ties of the max frequent;
# continuous values cover the generic case.
grid_value = st.integers(-8, 8).map(lambda k: k / 4)
real_value = st.floats(-3, 3, allow_nan=False, width=64)


@st.composite
def batches(draw, dtype=torch.float64):
    """A (B, T) batch with values, old values, returns and a mask of a random kind."""
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 7))
    element = draw(st.sampled_from([grid_value, real_value]))
    arrays = [torch.tensor(draw(st.lists(element, min_size=B * T, max_size=B * T)), dtype=dtype).reshape(B, T)
              for _ in range(3)]
    kind = draw(st.sampled_from(["none", "bool", "float", "int"]))
    if kind == "none":
        mask = None
    else:
        bits = draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))
        mask = torch.tensor(bits).reshape(B, T)
        if kind == "float":
            weights = draw(st.lists(st.sampled_from([0.25, 0.5, 1.0, 2.0]), min_size=B * T, max_size=B * T))
            mask = mask.to(dtype) * torch.tensor(weights, dtype=dtype).reshape(B, T)
        elif kind == "int":
            mask = mask.long()
    return (*arrays, mask)


settings_kw = dict(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings(**settings_kw)
@given(
    batch=batches(),
    clip_eps=st.sampled_from(CLIP_EPS),
    variant=st.sampled_from(F.VARIANTS),
    mode=st.sampled_from(AGGREGATION_MODES),
    loss_type=st.sampled_from(F.LOSS_TYPES),
)
def test_value_loss_and_gradients_match_loop_reference(batch, clip_eps, variant, mode, loss_type):
    """Loss, autograd gradient and closed-form gradient equal the float64 loop reference."""
    values, old_values, returns, mask = batch
    kw = dict(clip_eps=clip_eps, variant=variant, mode=mode, loss_type=loss_type)
    values = values.clone().requires_grad_(True)
    loss = F.value_loss(values, old_values, returns, mask, huber_delta=0.75, **kw)
    (grad,) = torch.autograd.grad(loss, values)
    expected = loss_loops(values, old_values, returns, mask, delta=0.75, **kw)
    expected_grad = grad_loops(values, old_values, returns, mask, delta=0.75, **kw)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)
    closed = F.value_loss_grad(values.detach(), old_values, returns, mask, huber_delta=0.75, **kw)
    torch.testing.assert_close(closed, expected_grad, rtol=1e-12, atol=1e-14)


@settings(**settings_kw)
@given(batch=batches(), clip_eps=st.sampled_from(CLIP_EPS), variant=st.sampled_from(F.VARIANTS),
       loss_type=st.sampled_from(F.LOSS_TYPES), band_closed=st.booleans())
def test_elementwise_grad_and_regions_match_reference(batch, clip_eps, variant, loss_type, band_closed):
    """Per-token loss, closed-form gradient and region codes agree with the reference token by token,
    with the band's edges closed (torch <= 2.13) and open (torch >= 2.14) on any installed torch."""
    values, old_values, returns, _ = batch
    kw = dict(clip_eps=clip_eps, variant=variant, loss_type=loss_type, huber_delta=0.75)
    with band(band_closed):
        loss = F.elementwise_value_loss(values, old_values, returns, **kw)
        grad = F.elementwise_value_loss_grad(values, old_values, returns, **kw)
        regions = F.clip_regions(values, old_values, returns, **kw)
    for index in range(values.numel()):
        v, o, r = (float(t.reshape(-1)[index]) for t in (values, old_values, returns))
        assert loss.reshape(-1)[index].item() == token_loss(v, o, r, clip_eps, variant, loss_type, 0.75)
        assert grad.reshape(-1)[index].item() == pytest.approx(
            token_grad(v, o, r, clip_eps, variant, loss_type, 0.75, band_closed), rel=1e-15, abs=0)
        region = Region(int(regions.reshape(-1)[index]))
        outside = clip_eps is not None and (abs(v - o) > clip_eps if band_closed else abs(v - o) >= clip_eps)
        assert (region != Region.INSIDE) == outside
        if region == Region.CLIPPED:
            assert grad.reshape(-1)[index].item() == 0.0


@pytest.mark.parametrize("band_closed", [True, False], ids=["closed", "open"])
def test_closed_form_matches_autograd_at_band_edges_and_ties(band_closed):
    """At |v - old| == clip_eps the clipped branch passes the gradient as the clamp does at its bounds
    (closed band: all of it, torch <= 2.13; open band: none, torch >= 2.14), and exact ties of the max
    split the gradient 50/50. Both conventions run on any torch: autograd goes through a clamp with
    that edge gradient, and through torch's own clamp where it is the installed torch's."""
    # (values, old_values, returns): band edge from above and below, a tie outside the band,
    # a token inside the band, and a token exactly at the return but outside the band.
    values = torch.tensor([1.25, -0.25, 1.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    old_values = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.0], dtype=torch.float64)
    returns = torch.tensor([3.0, -1.0, 0.625, 1.5, 2.0], dtype=torch.float64)
    clamp = clamp_with_edge(1.0 if band_closed else 0.0)
    clipped = old_values + clamp(values - old_values, -0.25, 0.25)
    (autograd,) = torch.autograd.grad(torch.maximum((clipped - returns) ** 2, (values - returns) ** 2).sum(), values)
    with band(band_closed):
        closed = F.elementwise_value_loss_grad(values.detach(), old_values, returns, clip_eps=0.25)
        regions = F.clip_regions(values.detach(), old_values, returns, clip_eps=0.25)
    torch.testing.assert_close(closed, autograd, rtol=0, atol=0)
    if band_closed == AUTOGRAD_BAND_CLOSED:  # and torch's own autograd of the formula agrees
        loss = F.elementwise_value_loss(values, old_values, returns, clip_eps=0.25).sum()
        torch.testing.assert_close(closed, torch.autograd.grad(loss, values)[0], rtol=0, atol=0)
    # Band edge: here v_clipped == v, so the branches tie. Closed band: both pass 2 * (v - R), in full.
    # Open band: the clipped branch passes nothing, so the tie gives half of 2 * (v - R).
    edge_share = 1.0 if band_closed else 0.5
    assert closed[0].item() == edge_share * 2 * (1.25 - 3.0)
    assert closed[1].item() == edge_share * 2 * (-0.25 + 1.0)
    # Tie outside the band (v_clipped = 0.25, R = 0.625 midway between 0.25 and 1.0): the clipped
    # branch has no gradient outside the band, so the tie gives half of 2 * (v - R).
    assert closed[2].item() == 0.5 * 2 * (1.0 - 0.625)
    # A prediction exactly at the return but outside the band: the clipped branch wins, gradient zero.
    assert closed[4].item() == 0.0
    edge = Region.INSIDE if band_closed else Region.UNCLIPPED  # open: outside, and the tie is live
    assert regions.tolist() == [edge, edge, Region.UNCLIPPED, Region.INSIDE, Region.CLIPPED]


def test_band_follows_the_installed_torch():
    """BAND_CLOSED is what autograd's clamp does at its bounds here (probed independently by the
    reference), closed up to torch 2.13 and open from 2.14; the probe tells the conventions apart and
    warns about one it does not know."""
    assert F.BAND_CLOSED is AUTOGRAD_BAND_CLOSED
    assert F.BAND_CLOSED == (torch.__version__ < (2, 14)), torch.__version__
    assert F._clamp_band_closed(clamp_with_edge(1.0)) is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert F._clamp_band_closed(clamp_with_edge(0.0)) is False
    with pytest.warns(RuntimeWarning, match=r"clamp passes the gradient \[0.5, 0.5\] at its bounds"):
        assert F._clamp_band_closed(clamp_with_edge(0.5)) is False
    # Importing under no_grad, inference mode or another default device (MPS has no float64) must still probe.
    with torch.no_grad(), torch.inference_mode(), torch.device("meta"):
        assert F._clamp_band_closed() is AUTOGRAD_BAND_CLOSED


@pytest.mark.parametrize("variant", F.VARIANTS)
@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@pytest.mark.parametrize("loss_type", F.LOSS_TYPES)
def test_gradcheck_float64(variant, mode, loss_type):
    """torch.autograd.gradcheck passes away from the kinks, for every variant, mode and loss type."""
    generator = torch.Generator().manual_seed(0)
    old_values = torch.randn(3, 5, dtype=torch.float64, generator=generator)
    # Keep |v - old| away from clip_eps and |v - R| away from huber_delta so finite differences are valid.
    offsets = torch.tensor([0.05, 0.6, -0.7, 0.1, -0.12], dtype=torch.float64).repeat(3, 1)
    values = (old_values + offsets).requires_grad_(True)
    returns = old_values + torch.tensor([1.5, -1.0, 0.9, -0.4, 0.3], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 1, 1, 0]], dtype=torch.float64)

    def fn(v):
        return F.value_loss(v, old_values, returns, mask, clip_eps=0.3, variant=variant, mode=mode,
                            loss_type=loss_type, huber_delta=0.7)

    assert torch.autograd.gradcheck(fn, (values,), eps=1e-6, atol=1e-8)


def test_aggregation_weights_reproduce_aggregate():
    """For every mode, aggregate(L) == sum(aggregation_weights * L), with and without a mask and counts."""
    generator = torch.Generator().manual_seed(1)
    loss_mat = torch.rand(4, 6, dtype=torch.float64, generator=generator)
    mask = torch.rand(4, 6, generator=generator) > 0.4
    mask[2] = False
    for mode in AGGREGATION_MODES:
        for m, counts in [(mask, {}), (None, {}), (mask, dict(dp_size=3, batch_num_tokens=40, global_batch_size=7))]:
            weights = F.aggregation_weights(m, loss_mat.shape, mode=mode, dtype=torch.float64, **counts)
            expected = F.aggregate(loss_mat, m, mode=mode, **counts)
            assert (weights * loss_mat).sum().item() == pytest.approx(expected.item(), rel=1e-14)


def test_modes_on_a_hand_computed_batch():
    """Each aggregation mode gives the number worked out by hand for a small ragged batch."""
    loss_mat = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    expected = {
        "token-mean": (1 + 2 + 3 + 4) / 4,
        "token-sum": 10.0,
        "seq-mean-token-mean": (2.0 + 4.0) / 2,
        "seq-mean-token-sum": (6.0 + 4.0) / 2,
        "seq-mean-token-sum-norm": (6.0 + 4.0) / 2 / 3,
    }
    for mode, value in expected.items():
        assert F.aggregate(loss_mat, mask, mode=mode).item() == pytest.approx(value)
    assert F.aggregate(loss_mat, mask, mode="seq-mean-token-sum-norm", loss_scale_factor=10).item() == 0.5


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@pytest.mark.parametrize("shape", [(3, 4), (0, 4), (3, 0), (0,), (5,)])
def test_empty_mask_and_empty_batches_are_finite(mode, shape):
    """An all-masked batch, an empty tensor or an empty row gives loss 0 and zero gradients, never NaN."""
    values = torch.randn(shape, requires_grad=True)
    old_values, returns = torch.randn(shape), torch.randn(shape)
    for mask in (torch.zeros(shape, dtype=torch.bool), torch.zeros(shape), None if 0 in shape else "skip"):
        if isinstance(mask, str):
            continue
        loss = F.value_loss(values, old_values, returns, mask, clip_eps=0.2, mode=mode)
        (grad,) = torch.autograd.grad(loss, values)
        assert loss.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_masked_inputs_do_not_leak(mode, bad):
    """NaN/inf in values, old values or returns at masked-out tokens reach neither loss nor gradients."""
    generator = torch.Generator().manual_seed(2)
    values = torch.randn(3, 5, generator=generator)
    old_values, returns = torch.randn(3, 5, generator=generator), torch.randn(3, 5, generator=generator)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 1] = mask[1] = mask[2, 4] = False
    dirty = [t.clone() for t in (values, old_values, returns)]
    for t in dirty:
        t[~mask] = bad
    clean_values = values.clone().requires_grad_(True)
    dirty_values = dirty[0].requires_grad_(True)
    clean = F.value_loss(clean_values, old_values, returns, mask, clip_eps=0.1, mode=mode)
    leaked = F.value_loss(dirty_values, dirty[1], dirty[2], mask, clip_eps=0.1, mode=mode)
    assert leaked.item() == clean.item()
    (clean_grad,) = torch.autograd.grad(clean, clean_values)
    (dirty_grad,) = torch.autograd.grad(leaked, dirty_values)
    assert torch.equal(clean_grad, dirty_grad)
    closed = F.value_loss_grad(dirty[0], dirty[1], dirty[2], mask, clip_eps=0.1, mode=mode)
    torch.testing.assert_close(closed, clean_grad)
    with torch.no_grad():  # nothing differentiated: the loss alone is masked
        assert F.value_loss(dirty[0], dirty[1], dirty[2], mask, clip_eps=0.1, mode=mode).item() == clean.item()


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@pytest.mark.parametrize("differentiated", [(1,), (2,), (0, 1, 2)])
def test_non_finite_masked_inputs_do_not_leak_into_any_gradient(mode, differentiated):
    """Whichever inputs need a gradient, NaN at masked-out tokens of the others reaches none of them."""
    generator = torch.Generator().manual_seed(4)
    inputs = [torch.randn(3, 5, generator=generator) for _ in range(3)]
    mask = torch.rand(3, 5, generator=generator) > 0.4
    mask[1] = False
    dirty = [t.clone() for t in inputs]
    for t in dirty:
        t[~mask] = math.nan
    grads = []
    for tensors in (inputs, dirty):
        tensors = [t.clone().requires_grad_(i in differentiated) for i, t in enumerate(tensors)]
        loss = F.value_loss(*tensors, mask, clip_eps=0.1, mode=mode)
        grads.append(torch.autograd.grad(loss, [tensors[i] for i in differentiated]))
    for clean_grad, dirty_grad in zip(*grads):
        assert torch.equal(clean_grad, dirty_grad)
        assert torch.equal(dirty_grad[~mask], torch.zeros(int((~mask).sum())))


def test_non_finite_masked_inputs_do_not_leak_through_torch_func_or_double_backward():
    """torch.func.grad and a second derivative (create_graph) see the masked-out NaN as cleanly as backward does."""
    generator = torch.Generator().manual_seed(5)
    values, old_values, returns = (torch.randn(3, 5, generator=generator) for _ in range(3))
    mask = torch.rand(3, 5, generator=generator) > 0.4
    dirty = [t.clone() for t in (values, old_values, returns)]
    for t in dirty:
        t[~mask] = math.nan

    def loss(v, o, r):
        return F.value_loss(v, o, r, mask, clip_eps=0.1)

    assert torch.equal(torch.func.grad(loss)(*dirty), torch.func.grad(loss)(values, old_values, returns))
    second = []
    for v, o, r in ((values, old_values, returns), dirty):
        v = v.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(v, o, r), v, create_graph=True)
        second.append(torch.autograd.grad((grad * torch.arange(15.0).reshape(3, 5)).sum(), v)[0])
    assert torch.equal(second[0], second[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_accumulated_in_float32(dtype):
    """Half inputs give the float32 loss of the upcast inputs, and a gradient in the input dtype."""
    generator = torch.Generator().manual_seed(3)
    values, old_values, returns = (torch.randn(4, 257, generator=generator).to(dtype) for _ in range(3))
    mask = torch.rand(4, 257, generator=generator) > 0.3
    values.requires_grad_(True)
    loss = F.value_loss(values, old_values, returns, mask, clip_eps=0.2)
    assert loss.dtype == torch.float32
    expected = F.value_loss(values.detach().float(), old_values.float(), returns.float(), mask, clip_eps=0.2)
    assert loss.item() == expected.item()
    loss.backward()
    assert values.grad.dtype == dtype


def test_huber_matches_torch_huber_loss_times_two():
    """loss_type='huber' is 2 * torch's huber_loss per token, i.e. e**2 inside delta."""
    error = torch.linspace(-3, 3, 61, dtype=torch.float64)
    zeros = torch.zeros_like(error)
    ours = F.elementwise_value_loss(error, None, zeros, loss_type="huber", huber_delta=0.8)
    theirs = 2 * torch.nn.functional.huber_loss(error, zeros, reduction="none", delta=0.8)
    torch.testing.assert_close(ours, theirs)


def test_regions_without_clipping_are_all_inside():
    """clip_eps=None means an infinite band: every token is INSIDE and nothing is clipped."""
    values = torch.randn(2, 3)
    regions = F.clip_regions(values, values + 5, values - 5, clip_eps=None)
    assert regions.dtype == torch.uint8
    assert torch.all(regions == Region.INSIDE)


@pytest.mark.skipif(fused._OLD_TORCH is not None, reason="older dynamo versions break the graph on Tensor.is_complex")
def test_value_loss_traces_without_graph_breaks():
    """The whole forward compiles with fullgraph=True: no .item(), no data-dependent Python branch (no host sync)."""
    torch._dynamo.reset()
    mask = torch.rand(3, 8) > 0.5

    def fn(values, old_values, returns, mask, counts):
        return F.value_loss(values, old_values, returns, mask, clip_eps=0.2, mode="seq-mean-token-mean",
                            dp_size=2, global_batch_size=counts)

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    args = (torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8), mask, torch.tensor(3.0))
    torch.testing.assert_close(compiled(*args), fn(*args))
    compiled_token = torch.compile(lambda *a: F.value_loss(*a, clip_eps=0.2), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled_token(*args[:4]), F.value_loss(*args[:4], clip_eps=0.2))


# --------------------------------------------------------------------------- bad input

def _inputs(shape=(4, 3)):
    return torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(clip_eps=-0.1), ValueError, "clip_eps must be None or a non-negative number; got -0.1"),
        (dict(clip_eps=math.nan), ValueError, "clip_eps must be None or a non-negative number; got nan"),
        (dict(clip_eps="0.2"), TypeError, "clip_eps must be None or a non-negative number; got str"),
        (dict(clip_eps=True), TypeError, "clip_eps must be None or a non-negative number; got bool"),
        (dict(mode="mean"), ValueError, "mode must be one of 'token-mean', "),
        (dict(variant="min"), ValueError, "variant must be one of 'max', 'clipped'; got 'min'"),
        (dict(loss_type="l1"), ValueError, "loss_type must be one of 'squared', 'huber'; got 'l1'"),
        (dict(loss_type="huber", huber_delta=0), ValueError, "huber_delta must be a positive number; got 0"),
        (dict(dp_size=0), ValueError, "dp_size must be a positive integer; got 0"),
        (dict(dp_size=2), ValueError, "batch_num_tokens (the global count of unmasked tokens) is required"),
        (dict(dp_size=2, mode="seq-mean-token-mean"), ValueError, "global_batch_size (the global count"),
        (dict(batch_num_tokens=-1), ValueError, "batch_num_tokens must be a non-negative finite count; got -1"),
        (dict(batch_num_tokens=torch.ones(2)), ValueError, "batch_num_tokens must be a scalar"),
        (dict(scale=math.inf), ValueError, "scale must be a finite number; got inf"),
        (dict(loss_scale_factor=0, mode="seq-mean-token-sum-norm"), ValueError,
         "loss_scale_factor must be None or a positive"),
    ],
)
def test_bad_settings_raise_naming_the_argument(kwargs, error, message):
    """Each bad setting raises the documented error type with a message naming the argument."""
    with pytest.raises(error) as info:
        F.value_loss(*_inputs(), **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((torch.zeros(64), torch.zeros(64), torch.zeros(64, 1)), ValueError,
         "values and returns must have the same shape; got (64,) and (64, 1)"),
        ((torch.zeros(64, 1), torch.zeros(64), torch.zeros(64, 1)), ValueError,
         "values and old_values must have the same shape; got (64, 1) and (64,)"),
        ((torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(4, 1)), ValueError,
         "values and action_mask must have the same shape; got (4, 3) and (4, 1)"),
        ((torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3), torch.zeros(4, 3)), TypeError,
         "values must be a floating-point tensor; got dtype torch.int64"),
        ((torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.int32), torch.zeros(4, 3)), TypeError,
         "old_values must be a floating-point tensor; got dtype torch.int32"),
        (([0.0], torch.zeros(1), torch.zeros(1)), TypeError, "values must be a torch.Tensor; got list"),
        ((torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, 3, device="meta")), ValueError,
         "values and returns must be on the same device; got cpu and meta"),
        ((torch.zeros(()), torch.zeros(()), torch.zeros(())), ValueError, "values must have at least one dimension"),
        ((torch.zeros(2), None, torch.zeros(2)), ValueError, "old_values is required when clip_eps is set"),
    ],
)
def test_bad_tensors_raise_naming_the_argument(args, error, message):
    """Shape mismatches (also (B,) vs (B, 1)), integer tensors, mixed devices raise; nothing broadcasts."""
    with pytest.raises(error) as info:
        F.value_loss(*args, clip_eps=0.2)
    assert message in str(info.value)


def test_aggregate_rejects_mismatched_mask():
    """aggregate refuses a mask that would broadcast."""
    message = r"loss_mat and action_mask must have the same shape; got \(3, 4\) and \(3, 1\)"
    with pytest.raises(ValueError, match=message):
        F.aggregate(torch.zeros(3, 4), torch.ones(3, 1))


@pytest.mark.parametrize("count_dtype", [torch.float64, torch.int64, torch.float16])
def test_tensor_counts_do_not_change_the_loss_dtype(count_dtype):
    """A float64 or integer global count keeps a float32 loss (and gradient) in float32."""
    values, old_values, returns = _inputs()
    values = values.requires_grad_(True)
    for mode, counts in [("token-mean", dict(batch_num_tokens=torch.tensor(24, dtype=count_dtype))),
                         ("seq-mean-token-sum", dict(global_batch_size=torch.tensor(8, dtype=count_dtype)))]:
        loss = F.value_loss(values, old_values, returns, clip_eps=0.2, mode=mode, dp_size=2, **counts)
        assert loss.dtype == torch.float32
        assert F.value_loss_grad(values, old_values, returns, mode=mode, dp_size=2, **counts).dtype == torch.float32


# --------------------------------------------------------------------------- counts, huge settings, the config


def _masked_batch(seed=0, shape=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    values, old_values, returns = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(shape, generator=g) > 0.3
    mask[0, 0] = True  # the mask has tokens: a count of 0 is then a statement about the global batch
    return values, old_values, returns, mask


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@pytest.mark.parametrize("zero", [0, 0.0, torch.tensor(0), torch.tensor(0.0, dtype=torch.float64)],
                         ids=["int", "float", "int-tensor", "float-tensor"])
def test_a_count_of_zero_gives_exactly_zero_loss_and_gradient(mode, zero):
    """batch_num_tokens=0 / global_batch_size=0 mean "nothing to average": loss and gradient are exactly 0,
    never the sum, as the loop reference defines it, though the local mask has tokens."""
    values, old_values, returns, mask = _masked_batch()
    counts = dict(batch_num_tokens=zero, global_batch_size=zero)
    leaf = values.clone().requires_grad_(True)
    loss = F.value_loss(leaf, old_values, returns, mask, clip_eps=0.2, mode=mode, **counts)
    loss.backward()
    expected = loss_loops(values, old_values, returns, mask, clip_eps=0.2, mode=mode, **counts)
    expected_grad = grad_loops(values, old_values, returns, mask, clip_eps=0.2, mode=mode, **counts)
    if mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        assert expected == 0.0 and torch.count_nonzero(expected_grad) == 0
        assert loss.item() == 0.0 and torch.count_nonzero(leaf.grad) == 0
    else:  # token-sum divides by nothing
        assert loss.item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(leaf.grad, expected_grad)
    closed = F.value_loss_grad(values, old_values, returns, mask, clip_eps=0.2, mode=mode, **counts)
    torch.testing.assert_close(closed, expected_grad)


@pytest.mark.parametrize("name", ["batch_num_tokens", "global_batch_size"])
@pytest.mark.parametrize(("count", "error", "message"), [
    (-1, ValueError, "must be a non-negative finite count; got -1"),
    (math.nan, ValueError, "must be a non-negative finite count; got nan"),
    (math.inf, ValueError, "must be a non-negative finite count; got inf"),
    ([3], TypeError, "must be None, a number or a one-element tensor; got list"),
    ("3", TypeError, "must be None, a number or a one-element tensor; got str"),
])
def test_counts_given_as_numbers_are_checked(name, count, error, message):
    """Negative, NaN and infinite counts, and counts that are not numbers or tensors, raise naming the argument."""
    values, old_values, returns, mask = _masked_batch()
    with pytest.raises(error, match=f"{name} {message}"):
        F.value_loss(values, old_values, returns, mask, clip_eps=0.2, mode="token-mean", **{name: count})


def test_dp_size_beyond_any_cluster_raises_naming_it():
    """dp_size=10**30 raises a ValueError naming dp_size (it used to fail inside torch with an overflow)."""
    with pytest.raises(ValueError, match=r"dp_size must be at most 2147483647 \(a number of ranks\); got 10+$"):
        F.value_loss(*_inputs(), dp_size=10**30, batch_num_tokens=4)
    with pytest.raises(TypeError, match="dp_size must be a positive integer; got float"):
        F.value_loss(*_inputs(), dp_size=2.0, batch_num_tokens=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("huber_delta", [math.inf, 1e300, 1e39])
def test_a_huber_threshold_beyond_the_dtype_is_the_squared_loss(dtype, huber_delta):
    """huber_delta=inf (or one whose square overflows) gives the squared loss and finite gradients, not NaN."""
    values, old_values, returns, mask = (t.to(dtype) if t.is_floating_point() else t for t in _masked_batch(1))
    leaf = values.clone().requires_grad_(True)
    huber = F.value_loss(leaf, old_values, returns, mask, clip_eps=0.2, loss_type="huber", huber_delta=huber_delta)
    huber.backward()
    squared_leaf = values.clone().requires_grad_(True)
    squared = F.value_loss(squared_leaf, old_values, returns, mask, clip_eps=0.2)
    squared.backward()
    assert torch.isfinite(leaf.grad).all()
    assert huber.item() == squared.item()
    torch.testing.assert_close(leaf.grad, squared_leaf.grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_clip_range_beyond_the_dtype_never_clips(dtype):
    """clip_eps=1e39 (past float32's range) is a band wider than any finite difference, exactly as inf is, with
    no overflow error from clamp; both equal the unclipped loss up to rounding (old + (v - old) is not always v)."""
    values, old_values, returns, mask = (t.to(dtype) if t.is_floating_point() else t for t in _masked_batch(2))
    results = []
    for clip_eps in (1e39, math.inf, None):
        leaf = values.clone().requires_grad_(True)
        loss = F.value_loss(leaf, old_values, returns, mask, clip_eps=clip_eps)
        loss.backward()
        results.append((loss.item(), leaf.grad))
    assert results[0][0] == results[1][0]
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    assert results[0][0] == pytest.approx(results[2][0], rel=1e-6)
    torch.testing.assert_close(results[0][1], results[2][1])


def test_config_and_keywords_are_the_same_settings():
    """A LossConfig and its fields as keywords give the same loss; both at once, or an unknown keyword, raise."""
    values, old_values, returns, mask = _masked_batch(3)
    config = F.LossConfig(clip_eps=0.2, mode="seq-mean-token-mean", loss_type="huber", huber_delta=0.5, scale=1.0)
    keywords = dict(clip_eps=0.2, mode="seq-mean-token-mean", loss_type="huber", huber_delta=0.5, scale=1.0)
    assert F.value_loss(values, old_values, returns, mask, config).item() == F.value_loss(
        values, old_values, returns, mask, **keywords).item()
    with pytest.raises(TypeError, match="takes either config or keyword settings, not both"):
        F.value_loss(values, old_values, returns, mask, config, clip_eps=0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument.*clip_range"):
        F.value_loss(values, old_values, returns, mask, clip_range=0.1)
    with pytest.raises(TypeError, match="config must be a LossConfig or None; got dict"):
        F.value_loss(values, old_values, returns, mask, keywords)
    with pytest.raises(ValueError, match="clip_eps must be None or a non-negative number; got -1"):
        config.replace(clip_eps=-1)


@pytest.mark.parametrize("position", range(4))
def test_a_list_in_place_of_a_tensor_names_the_argument(position):
    """A list instead of any of the four tensors raises TypeError naming that argument (not AttributeError)."""
    names = ("values", "old_values", "returns", "action_mask")
    args = list(_masked_batch(4))
    args[position] = args[position].tolist()
    with pytest.raises(TypeError, match=f"^{names[position]} must be a torch.Tensor"):
        F.value_loss(*args, clip_eps=0.2)
