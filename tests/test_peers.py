"""Tests of valueloss.peers: each peer against a plain-Python reference, and ValueLoss against each peer."""

import math

import pytest
import torch
from reference import (
    AUTOGRAD_BAND_CLOSED,
    clip_by_value,
    grad_loops,
    grad_loops_min_max,
    loss_loops,
    on_band_edge,
    token_grad,
    token_grad_min_max,
    token_loss,
    token_loss_min_max,
)

from valueloss import ValueLoss, diagnose
from valueloss import peers as P

# --------------------------------------------------------------------------- batches


def _batch(seed, shape=(5, 9), empty_rows=False, dtype=torch.float32):
    """A ragged batch with drift large enough that every region occurs."""
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(shape, generator=g, dtype=torch.float64)
    values = (old + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    returns = (old + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    mask = torch.rand(shape, generator=g) < 0.7
    mask[:, 0] = True
    if empty_rows and shape[0] > 1:
        mask[1] = False
    return values, old.to(dtype), returns, mask


def _bf16_grid_batch(seed, shape=(41, 401), scale=2.0, drift=0.5, dtype=torch.float64):
    """A batch whose values, old values and returns all lie on the bfloat16 grid (as a bf16 critic's do)."""
    g = torch.Generator().manual_seed(seed)
    old = (scale * torch.randn(shape, generator=g)).bfloat16()
    values = (old.float() + drift * torch.randn(shape, generator=g)).bfloat16()
    returns = (old.float() + torch.randn(shape, generator=g)).bfloat16()
    mask = torch.rand(shape, generator=g) < 0.8
    mask[:, 0] = True
    return values.to(dtype), old.to(dtype), returns.to(dtype), mask


def _grad(fn, values):
    """d fn(values) / d values by autograd (the first element of a tuple result is the loss)."""
    leaf = values.detach().clone().requires_grad_(True)
    out = fn(leaf)
    (grad,) = torch.autograd.grad(out[0] if isinstance(out, tuple) else out, leaf)
    return grad


# --------------------------------------------------------------------------- each peer vs its reference


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ppo2_and_cleanrl_match_reference(seed):
    """ppo2 and CleanRL are 0.5 * the plain mean of the max-form token loss."""
    values, old, returns, _ = _batch(seed, dtype=torch.float64)
    expected = loss_loops(values, old, returns, clip_eps=0.2)
    assert P.baselines_ppo2_value_loss(values, old, returns, clip_eps=0.2).item() == pytest.approx(expected, rel=1e-12)
    assert P.cleanrl_value_loss(values, old, returns, clip_eps=0.2).item() == pytest.approx(expected, rel=1e-12)


def test_cleanrl_without_clip_vloss_is_plain_half_mse():
    """clip_vloss=False gives 0.5 * mean((v - R)^2) whatever clip_eps is."""
    values, old, returns, _ = _batch(3, dtype=torch.float64)
    expected = loss_loops(values, old, returns, clip_eps=None)
    got = P.cleanrl_value_loss(values, old, returns, clip_eps=0.01, clip_vloss=False)
    assert got.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 4])
def test_masked_token_mean_peers_match_reference(seed):
    """OpenRLHF, TRL, DeepSpeed-Chat and ColossalChat are 0.5 * the masked token mean."""
    values, old, returns, mask = _batch(seed, dtype=torch.float64)
    expected = loss_loops(values, old, returns, mask, clip_eps=0.2)
    got = {
        "openrlhf": P.openrlhf_value_loss(values, old, returns, mask, clip_eps=0.2),
        "trl": P.trl_value_loss(values, old, returns, mask, clip_eps=0.2),
        "dschat": P.deepspeed_chat_value_loss(values, old, returns, mask, clip_eps=0.2),
        "colossal": P.colossalchat_value_loss(values, old, returns - old, mask, clip_eps=0.2),
    }
    for name, loss in got.items():
        assert loss.item() == pytest.approx(expected, rel=1e-12), name


def test_openrlhf_without_clip_and_seq_mean():
    """OpenRLHF: clip_eps=None is the plain masked MSE; token_level_loss=False averages row means."""
    values, old, returns, mask = _batch(5, dtype=torch.float64)
    plain = P.openrlhf_value_loss(values, old, returns, mask, clip_eps=None)
    assert plain.item() == pytest.approx(loss_loops(values, old, returns, mask, clip_eps=None), rel=1e-12)
    seq = P.openrlhf_value_loss(values, old, returns, mask, clip_eps=0.2, token_level_loss=False)
    # no empty row here, so the mean over all rows is the mean over the non-empty ones
    expected = loss_loops(values, old, returns, mask, clip_eps=0.2, mode="seq-mean-token-mean")
    assert seq.item() == pytest.approx(expected, rel=1e-12)


def test_openrlhf_seq_mean_empty_row_is_nan():
    """OpenRLHF's mean of row means includes empty rows, so one empty row makes the loss NaN."""
    values, old, returns, mask = _batch(6, empty_rows=True)
    assert math.isnan(P.openrlhf_value_loss(values, old, returns, mask, clip_eps=0.2, token_level_loss=False))


def test_sb3_is_mse_of_clipped_prediction_without_half():
    """SB3: mean((R - clip(v))^2), no max, no 0.5; None means no clipping."""
    values, old, returns, _ = _batch(7, dtype=torch.float64)
    clipped = P.sb3_value_loss(values, old, returns, clip_range_vf=0.2)
    expected = loss_loops(values, old, returns, clip_eps=0.2, variant="clipped", scale=1.0)
    assert clipped.item() == pytest.approx(expected, rel=1e-12)
    plain = P.sb3_value_loss(values, old, returns)
    assert plain.item() == pytest.approx(loss_loops(values, old, returns, clip_eps=None, scale=1.0), rel=1e-12)


def test_sb3_gradient_is_zero_outside_band_on_both_sides():
    """SB3 kills the gradient outside the band even when the return lies beyond the new value."""
    old = torch.zeros(2, dtype=torch.float64)
    values = torch.tensor([0.5, 0.5], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([1.0, -1.0], dtype=torch.float64)
    P.sb3_value_loss(values, old, returns, clip_range_vf=0.2).backward()
    assert values.grad.tolist() == [0.0, 0.0]


VERL_MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("mode", VERL_MODES)
def test_verl_agg_loss_modes_match_reference(mode):
    """verl 0.9.1's five modes, written out by hand over Python lists (empty rows excluded from S, 1e-8 per row)."""
    values, old, returns, mask = _batch(8, shape=(4, 6), empty_rows=True, dtype=torch.float64)
    loss_mat = torch.tensor([[token_loss(v, o, r, 0.2) for v, o, r in zip(*rows, strict=True)]
                             for rows in zip(values.tolist(), old.tolist(), returns.tolist(), strict=True)],
                            dtype=torch.float64)
    rows = [[x for x, keep in zip(lr, mr, strict=True) if keep] for lr, mr in zip(loss_mat.tolist(), mask.tolist(),
                                                                                    strict=True)]
    nonempty = [r for r in rows if r]
    expected = {
        "token-mean": sum(map(sum, rows)) / sum(map(len, rows)),
        "token-sum": sum(map(sum, rows)),
        "seq-mean-token-mean": sum(sum(r) / (len(r) + 1e-8) for r in nonempty) / len(nonempty),
        "seq-mean-token-sum": sum(map(sum, nonempty)) / len(nonempty),
        "seq-mean-token-sum-norm": sum(map(sum, nonempty)) / len(nonempty) / 6,
    }[mode]
    assert P.verl_agg_loss(loss_mat, mask, mode).item() == pytest.approx(expected, rel=1e-12)
    loss, _ = P.verl_value_loss(values, old, returns, mask, clip_eps=0.2, loss_agg_mode=mode)
    assert loss.item() == pytest.approx(0.5 * expected, rel=1e-12)


def test_verl_agg_loss_global_counts_and_errors():
    """verl: global counts replace the local ones times dp_size; missing counts with dp_size > 1 raise."""
    loss_mat = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]])
    assert P.verl_agg_loss(loss_mat, mask, "token-mean", dp_size=2, batch_num_tokens=6).item() == pytest.approx(2.0)
    assert P.verl_agg_loss(loss_mat, mask, "token-sum", dp_size=2).item() == 12.0
    assert P.verl_agg_loss(loss_mat, mask, "seq-mean-token-sum", dp_size=2, global_batch_size=4).item() == 3.0
    with pytest.raises(ValueError, match="batch_num_tokens"):
        P.verl_agg_loss(loss_mat, mask, "token-mean", dp_size=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        P.verl_agg_loss(loss_mat, mask, "seq-mean-token-mean", dp_size=2)
    for mode in ("mean", "seq-mean"):
        with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
            P.verl_agg_loss(loss_mat, mask, mode)


def test_verl_agg_loss_empty_mask_is_nan_except_token_sum():
    """verl 0.9.1 has no zero-count guard: an empty mask gives 0/0 = NaN, token-sum a plain 0."""
    loss_mat, mask = torch.ones(2, 3), torch.zeros(2, 3)
    for mode in VERL_MODES:
        loss = P.verl_agg_loss(loss_mat, mask, mode).item()
        assert loss == 0.0 if mode == "token-sum" else math.isnan(loss), (mode, loss)


def test_verl_agg_loss_masked_nan_stays_out_of_token_modes():
    """token-mean and token-sum replace masked-out entries by 0 before multiplying (verl's masked_sum)."""
    loss_mat = torch.tensor([[1.0, float("nan")], [3.0, 5.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    assert P.verl_agg_loss(loss_mat, mask, "token-mean").item() == 3.0
    assert P.verl_agg_loss(loss_mat, mask, "token-sum").item() == 9.0
    assert math.isnan(P.verl_agg_loss(loss_mat, mask, "seq-mean-token-sum").item())  # loss_mat * mask per row


def test_verl_clip_fraction_is_strict_and_matches_diagnose():
    """verl's vf_clipfrac counts only strictly larger clipped losses; equal to diagnose's clip_fraction here."""
    old = torch.zeros(4, dtype=torch.float64)
    values = torch.tensor([0.5, 0.75, 0.1, -0.5], dtype=torch.float64)
    # token 0: the clipped branch is strictly larger; token 1: an exact tie, (0.25-0.5)^2 == (0.75-0.5)^2,
    # which a strict > does not count; token 2 is inside the band; token 3: the unclipped branch wins.
    returns = torch.tensor([1.0, 0.5, 0.0, 1.0], dtype=torch.float64)
    mask = torch.ones(4)
    _, clipfrac = P.verl_value_loss(values, old, returns, mask, clip_eps=0.25)
    assert clipfrac.item() == pytest.approx(1 / 4)
    values, old, returns, mask = _batch(9, dtype=torch.float64)
    _, clipfrac = P.verl_value_loss(values, old, returns, mask, clip_eps=0.2)
    ours = diagnose(values, old, returns, mask, clip_eps=0.2).clip_fraction
    assert clipfrac.item() == pytest.approx(ours.item(), abs=1e-7)


def test_deepspeed_chat_fp32_cast():
    """compute_fp32_loss computes the squares in float32 from bfloat16 inputs."""
    values, old, returns, mask = _batch(10)
    low = [t.to(torch.bfloat16) for t in (values, old, returns)]
    loss = P.deepspeed_chat_value_loss(*low, mask, clip_eps=0.2, compute_fp32_loss=True)
    assert loss.dtype == torch.float32
    # the band edges old -/+ eps are rounded to bfloat16 before the clamp, as in the peer
    lo, hi = (low[1] - 0.2).double().flatten().tolist(), (low[1] + 0.2).double().flatten().tolist()
    v, r, m = low[0].double().flatten().tolist(), low[2].double().flatten().tolist(), mask.flatten().tolist()
    terms = [token_loss_min_max(v[i], r[i], lo[i], hi[i]) for i in range(len(v)) if m[i]]
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms), rel=1e-5)


def test_colossalchat_requires_mask_and_peers_check_shapes():
    """ColossalChat needs a mask; every peer names mismatched shapes instead of broadcasting."""
    values, old, returns, mask = _batch(11)
    with pytest.raises(ValueError, match="action_mask is required"):
        P.colossalchat_value_loss(values, old, returns - old, None)
    with pytest.raises(ValueError, match=r"values and returns must have the same shape; got \(5, 9\) and \(5, 1\)"):
        P.trl_value_loss(values, old, returns[:, :1], mask, clip_eps=0.2)
    with pytest.raises(ValueError, match="clip_eps"):
        P.verl_value_loss(values, old, returns, mask, clip_eps=None)


# --------------------------------------------------------------------------- ValueLoss reproduces every peer


SHAPES = [(1, 1), (1, 7), (7, 5), (41, 401)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(P.PEERS))
def test_valueloss_reproduces_each_peer(name, shape):
    """ValueLoss(clip_eps, **peer.valueloss_settings) gives the peer's loss and gradient (bitwise if 'exact')."""
    peer = P.PEERS[name]
    for seed, dtype in ((0, torch.float32), (1, torch.float64)):
        values, old, returns, mask = _batch(seed, shape=shape, dtype=dtype)
        (result,) = P.run_peers(values, old, returns, mask, clip_eps=0.2, peers=[name])
        if peer.agreement == "exact":
            assert result.bitwise_equal, (name, shape, dtype, result)
        else:
            assert result.loss == pytest.approx(result.valueloss_loss, rel=1e-6, abs=1e-12)
            assert result.max_abs_grad_diff <= 1e-6 * max(result.grad_norm, 1e-12) + 1e-12


def test_the_three_clip_forms_at_band_edges():
    """On an edge v_clip == v, so the max ties. Up to torch 2.13 the offset and clamp forms pass the full
    2 (v - R); from 2.14 the offset form's number-bound clamp passes half (its clipped branch none), the
    clamp form's tensor-bound clamp three quarters (its clipped branch half). verl's min-max form passes
    three quarters on any torch (torch.min/max split ties), as the float64 reference says."""
    values = torch.tensor([0.25, -0.25], dtype=torch.float64, requires_grad=True)
    old_values, returns = torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64)
    offset_edge = [token_grad(v, 0.0, r, 0.25) for v, r in ((0.25, 1.0), (-0.25, -1.0))]
    min_max_edge = [token_grad_min_max(v, r, -0.25, 0.25) for v, r in ((0.25, 1.0), (-0.25, -1.0))]
    full = 2 * (values.detach() - returns)
    for clip, expected in ((P._clip_offset, torch.tensor(offset_edge, dtype=torch.float64)),
                           (P._clip_clamp, (1.0 if AUTOGRAD_BAND_CLOSED else 0.75) * full),
                           (P._clip_min_max, torch.tensor(min_max_edge, dtype=torch.float64))):
        clipped = clip(values, old_values, 0.25)
        assert torch.equal(clipped, values.detach())
        (grad,) = torch.autograd.grad(torch.maximum((clipped - returns) ** 2, (values - returns) ** 2).sum(), values)
        assert torch.equal(grad, expected), (clip.__name__, grad)
    assert torch.equal(torch.tensor(offset_edge), (1.0 if AUTOGRAD_BAND_CLOSED else 0.5) * full)
    assert torch.equal(torch.tensor(min_max_edge), 0.75 * full)


def test_clip_by_value_reference_is_torch_min_then_max():
    """The reference's clip_by_value and its derivative equal autograd of torch.max(torch.min(x, hi), lo)
    inside, outside, on each edge and on a zero-width band."""
    cases = [(0.1, -0.25, 0.25), (0.25, -0.25, 0.25), (-0.25, -0.25, 0.25), (0.5, -0.25, 0.25), (-0.5, -0.25, 0.25),
             (0.0, 0.0, 0.0), (0.5, 0.0, 0.0)]
    for x, lo, hi in cases:
        leaf = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        out = torch.max(torch.min(leaf, torch.tensor(hi, dtype=torch.float64)), torch.tensor(lo, dtype=torch.float64))
        (grad,) = torch.autograd.grad(out, leaf)
        assert (out.item(), grad.item()) == clip_by_value(x, lo, hi), (x, lo, hi)


def test_verl_gradient_at_exact_band_edges_matches_the_min_max_reference():
    """Tokens exactly on v = old -/+ eps (representable), inside, outside, on both sides of the return: verl's
    gradient equals the float64 min-then-max reference; on the edges it is 3/4 of ValueLoss's up to torch
    2.13 (which passes all of 2 (v - R) there) and 3/2 of it from 2.14 (which passes half); elsewhere equal."""
    eps = 0.25
    old = torch.tensor([[1.0, 1.0, -0.5, -0.5, 0.0, 2.0, 2.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[1.25, 1.25, -0.75, -0.75, 0.125, 2.5, 1.5, 0.25]], dtype=torch.float64)
    returns = torch.tensor([[3.0, -1.0, 0.5, -2.0, 1.0, 3.0, 3.0, 0.25]], dtype=torch.float64)
    mask = torch.ones_like(values)
    edges = torch.tensor([[on_band_edge(v, o, eps) for v, o in zip(values[0].tolist(), old[0].tolist(), strict=True)]])
    assert edges.tolist() == [[True, True, True, True, False, False, False, True]]
    verl = _grad(lambda v: P.verl_value_loss(v, old, returns, mask, clip_eps=eps), values)
    ours = _grad(lambda v: ValueLoss(eps)(v, old, returns, mask), values)
    torch.testing.assert_close(verl, grad_loops_min_max(values, old, returns, mask, clip_eps=eps), rtol=1e-15, atol=0)
    torch.testing.assert_close(ours, grad_loops(values, old, returns, mask, clip_eps=eps), rtol=1e-15, atol=0)
    factor = 0.75 / (1.0 if AUTOGRAD_BAND_CLOSED else 0.5)
    torch.testing.assert_close(verl[edges], factor * ours[edges], rtol=1e-15, atol=0)
    torch.testing.assert_close(verl[~edges], ours[~edges], rtol=1e-15, atol=0)
    assert verl[0, -1] == 0 == ours[0, -1]  # an edge token at its return has no gradient either way


@pytest.mark.parametrize("seed", [0, 1])
def test_verl_gradient_on_the_bf16_grid_with_clip_half(seed):
    """Random values on the bfloat16 grid, verl's default clip 0.5: verl's gradient equals the min-then-max
    reference everywhere, and differs from ValueLoss's exactly on the edge tokens, by the tie rule's factor."""
    values, old, returns, mask = _bf16_grid_batch(seed)
    verl = _grad(lambda v: P.verl_value_loss(v, old, returns, mask, clip_eps=0.5), values)
    ours = _grad(lambda v: ValueLoss(0.5)(v, old, returns, mask), values)
    torch.testing.assert_close(verl, grad_loops_min_max(values, old, returns, mask, clip_eps=0.5),
                               rtol=1e-14, atol=0)
    edges = torch.tensor([[on_band_edge(v, o, 0.5) for v, o in zip(vr, orow, strict=True)]
                          for vr, orow in zip(values.tolist(), old.tolist(), strict=True)]) & mask
    live = edges & (values != returns)
    assert live.sum() > 10
    factor = 0.75 / (1.0 if AUTOGRAD_BAND_CLOSED else 0.5)
    torch.testing.assert_close(verl[edges], factor * ours[edges], rtol=1e-14, atol=0)
    torch.testing.assert_close(verl[~edges], ours[~edges], rtol=1e-14, atol=0)
    assert not torch.equal(verl[live], ours[live])


def test_share_of_bf16_grid_tokens_on_a_band_edge_is_not_zero():
    """A bf16 critic with verl's default clip 0.5: a few tokens in a thousand sit exactly on a band edge
    (measured in float32, the clip's own arithmetic, and counted again in float64 by the reference)."""
    shares = []
    for seed, scale in ((0, 1.0), (1, 2.0)):
        values, old, _, _ = _bf16_grid_batch(seed, shape=(1000, 100), scale=scale, dtype=torch.float32)
        on_edge = (values == old + 0.5) | (values == old - 0.5)
        counted = sum(on_band_edge(v, o, 0.5) for v, o in zip(values.double().flatten().tolist(),
                                                               old.double().flatten().tolist(), strict=True))
        assert int(on_edge.sum()) == counted
        shares.append(counted / values.numel())
    assert all(0.001 < share < 0.02 for share in shares), shares


def test_tolerance_peers_are_not_all_bitwise():
    """The 'tolerance' entries are honest: on float32 the clamp-form peers differ from ValueLoss in the last bits."""
    values, old, returns, mask = _batch(0, shape=(41, 401))
    results = {r.name: r for r in P.run_peers(values, old, returns, mask, clip_eps=0.2)}
    assert not results["verl"].bitwise_equal
    assert not results["TRL"].bitwise_equal
    assert all(results[n].bitwise_equal for n, p in P.PEERS.items() if p.agreement == "exact")


def test_run_peers_loss_values_match_references():
    """run_peers reports the peer's loss itself (checked against the plain-Python reference)."""
    values, old, returns, mask = _batch(12, dtype=torch.float64)
    results = {r.name: r for r in P.run_peers(values, old, returns, mask, clip_eps=0.2)}
    token_mean = loss_loops(values, old, returns, mask, clip_eps=0.2)
    for name in ("baselines ppo2", "OpenRLHF", "verl", "TRL", "DeepSpeed-Chat", "CleanRL", "ColossalChat"):
        assert results[name].loss == pytest.approx(token_mean, rel=1e-12), name
    sb3 = loss_loops(values, old, returns, mask, clip_eps=0.2, variant="clipped", scale=1.0)
    assert results["Stable-Baselines3"].loss == pytest.approx(sb3, rel=1e-12)


def test_empty_mask_behaviour():
    """Empty mask: ValueLoss gives 0, every peer NaN (verl too, in its default token-mean)."""
    got = P.empty_mask_behaviour()
    assert got["ValueLoss"] == "0"
    assert all(got[name] == "nan" for name in P.PEERS)


def test_peer_table_is_complete():
    """Every peer entry names a source and when it was read and, when not exact, says why."""
    assert len(P.PEERS) == 9
    for peer in P.PEERS.values():
        assert "/" in peer.source
        assert peer.checked == (f"v{P.VERL_RELEASE}, {P.VERL_CHECKED}" if peer.name == "verl" else P.CHECKED)
        assert peer.clip_form in ("offset", "clamp", "min-max")
        assert peer.agreement in ("exact", "tolerance", "edges")
        assert (peer.agreement != "exact") == bool(peer.why)
        assert peer.regresses_on in ("returns", "advantages")
        ValueLoss(0.2, **peer.valueloss_settings)  # the settings are valid
    assert P.PEERS["verl"].clip_form == "min-max" and P.PEERS["verl"].agreement == "edges"
    assert P.VERL_RELEASE in P.PEERS["verl"].source


# --------------------------------------------------------------------------- the bitwise claim


def test_clamp_form_is_bitwise_values_inside_band():
    """clamp(v, old - eps, old + eps) returns v itself for every in-band element."""
    g = torch.Generator().manual_seed(0)
    old64 = 10 * torch.randn(10**5, generator=g, dtype=torch.float64)
    values = (old64 + 0.1 * torch.randn(10**5, generator=g, dtype=torch.float64)).float()
    old = old64.float()
    inside = (values - old).abs() <= 0.2
    clamped = torch.clamp(values, old - 0.2, old + 0.2)
    assert inside.sum() > 0.9 * values.numel()
    assert torch.equal(clamped[inside], values[inside])


def test_offset_form_mismatch_fraction_matches_loop_count():
    """offset_clip_mismatch_fraction equals a count done element by element with numpy float32."""
    import numpy as np

    g = torch.Generator().manual_seed(1)
    old = (3 * torch.randn(2000, generator=g, dtype=torch.float64)).float()
    values = (old.double() + 0.1 * torch.randn(2000, generator=g, dtype=torch.float64)).float()
    inside = mismatch = 0
    for v, o in zip(values.numpy(), old.numpy(), strict=True):
        d = np.float32(v - o)
        if abs(d) <= np.float32(0.2):
            inside += 1
            mismatch += np.float32(o + d) != v
    assert mismatch > 0
    assert P.offset_clip_mismatch_fraction(values, old, 0.2) == pytest.approx(mismatch / inside)


def test_offset_form_mismatch_is_about_a_third_of_a_percent_for_values_near_ten():
    """Seeded: |old| ~ 10, drift sd 0.1-0.2 in float32 gives ~0.3-0.4% mismatches; float64 arithmetic gives none."""
    g = torch.Generator().manual_seed(0)
    old64 = 10 * torch.randn(10**6, generator=g, dtype=torch.float64)
    values64 = old64 + 0.2 * torch.randn(10**6, generator=g, dtype=torch.float64)
    share = P.offset_clip_mismatch_fraction(values64.float(), old64.float(), 0.2)
    assert 0.002 < share < 0.005
    assert P.offset_clip_mismatch_fraction(values64.float().double(), old64.float().double(), 0.2) == 0.0


def test_peer_gradient_map_regions():
    """The per-token gradient map: max form dies where R is beyond v, SB3 is zero everywhere outside the band."""
    delta, residual, grad_max = P.peer_gradient_map("OpenRLHF", clip_eps=0.2, num=41)
    _, _, grad_sb3 = P.peer_gradient_map("Stable-Baselines3", clip_eps=0.2, num=41)
    outside = delta.abs() > 0.2 + 1e-9
    assert torch.all(grad_sb3[outside] == 0)
    # max form, v above the band: R beyond v -> the clipped branch is larger -> zero gradient;
    # R below old (v moved away from R) -> the unclipped branch wins -> gradient 0.5 * 2 (v - R)
    up = outside & (delta > 0)
    assert torch.all(grad_max[up & (residual > delta + 1e-9)] == 0)
    live = up & (residual < -1e-9)
    assert live.sum() > 100
    torch.testing.assert_close(grad_max[live], (delta - residual)[live])
    inside = delta.abs() < 0.2 - 1e-9
    torch.testing.assert_close(grad_sb3[inside], 2 * (delta - residual)[inside])


def test_pairwise_agreement_groups():
    """ppo2 == CleanRL and verl == TRL == DeepSpeed-Chat bitwise; SB3 and the seq-mean differ from the rest."""
    values, old, returns, mask = _batch(13, shape=(7, 33))
    verdicts = P.pairwise_agreement(values, old, returns, mask, clip_eps=0.2)
    assert verdicts[("baselines ppo2", "CleanRL")] == "bitwise"
    assert verdicts[("verl", "TRL")] == verdicts[("TRL", "DeepSpeed-Chat")] == "bitwise"
    assert verdicts[("OpenRLHF", "verl")] in ("bitwise", "close")
    assert all(v == "differs" for k, v in verdicts.items() if "Stable-Baselines3" in k)
    assert len(verdicts) == 9 * 8 // 2


def test_format_tables_show_every_peer():
    """The text tables list each peer once, with its settings and rounded numbers."""
    table = P.format_peer_table()
    assert all(name in table for name in P.PEERS) and "variant='clipped', scale=1.0 on values[mask]" in table
    values, old, returns, mask = _batch(14)
    results = P.run_peers(values, old, returns, mask, clip_eps=0.2)
    text = P.format_results(results, digits=4)
    assert f"{results[0].loss:.4f}" in text and len(text.splitlines()) == 1 + len(results)
