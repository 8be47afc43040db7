"""Tests of valueloss.peers: each peer against a plain-Python reference, and ValueLoss against each peer."""

import math

import pytest
import torch
from reference import AUTOGRAD_BAND_CLOSED

from valueloss import ValueLoss, diagnose
from valueloss import peers as P

# --------------------------------------------------------------------------- independent references


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


def _token_loss(v, o, r, eps, form="max"):
    """max((clip(v) - r)^2, (v - r)^2) for one token, in Python floats."""
    vc = min(max(v, o - eps), o + eps)
    if form == "clipped":
        return (vc - r) ** 2
    return max((vc - r) ** 2, (v - r) ** 2)


def _rows(*tensors):
    return [[[float(x) for x in row] for row in t.tolist()] for t in tensors]


def ref_masked_mean(values, old, returns, mask, eps, scale=0.5, form="max"):
    """scale * sum over unmasked tokens of the token loss / their number (NaN when there are none)."""
    total, count = 0.0, 0
    for vr, orow, rr, mr in zip(*_rows(values, old, returns, mask.double()), strict=True):
        for v, o, r, m in zip(vr, orow, rr, mr, strict=True):
            if m:
                total += _token_loss(v, o, r, eps, form)
                count += 1
    return scale * total / count if count else math.nan


def ref_seq_mean(values, old, returns, mask, eps, skip_empty=False, row_eps=0.0):
    """0.5 * mean over rows of per-row masked means (empty rows: NaN, or skipped)."""
    row_means = []
    for vr, orow, rr, mr in zip(*_rows(values, old, returns, mask.double()), strict=True):
        tokens = [_token_loss(v, o, r, eps) for v, o, r, m in zip(vr, orow, rr, mr, strict=True) if m]
        if not tokens and skip_empty:
            continue
        row_means.append(sum(tokens) / (len(tokens) + row_eps) if tokens or row_eps else math.nan)
    return 0.5 * sum(row_means) / len(row_means) if row_means else 0.0


# --------------------------------------------------------------------------- each peer vs its reference


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ppo2_and_cleanrl_match_reference(seed):
    """ppo2 and CleanRL are 0.5 * the plain mean of the max-form token loss."""
    values, old, returns, _ = _batch(seed, dtype=torch.float64)
    ones = torch.ones_like(values, dtype=torch.bool)
    expected = ref_masked_mean(values, old, returns, ones, 0.2)
    assert P.baselines_ppo2_value_loss(values, old, returns, clip_eps=0.2).item() == pytest.approx(expected, rel=1e-12)
    assert P.cleanrl_value_loss(values, old, returns, clip_eps=0.2).item() == pytest.approx(expected, rel=1e-12)


def test_cleanrl_without_clip_vloss_is_plain_half_mse():
    """clip_vloss=False gives 0.5 * mean((v - R)^2) whatever clip_eps is."""
    values, old, returns, _ = _batch(3, dtype=torch.float64)
    pairs = zip(values.flatten().tolist(), returns.flatten().tolist(), strict=True)
    expected = 0.5 * sum((v - r) ** 2 for v, r in pairs)
    expected /= values.numel()
    got = P.cleanrl_value_loss(values, old, returns, clip_eps=0.01, clip_vloss=False)
    assert got.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 4])
def test_masked_token_mean_peers_match_reference(seed):
    """OpenRLHF, TRL, DeepSpeed-Chat and ColossalChat are 0.5 * the masked token mean."""
    values, old, returns, mask = _batch(seed, dtype=torch.float64)
    expected = ref_masked_mean(values, old, returns, mask, 0.2)
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
    assert plain.item() == pytest.approx(ref_masked_mean(values, old, returns, mask, math.inf), rel=1e-12)
    seq = P.openrlhf_value_loss(values, old, returns, mask, clip_eps=0.2, token_level_loss=False)
    assert seq.item() == pytest.approx(ref_seq_mean(values, old, returns, mask, 0.2), rel=1e-12)


def test_openrlhf_seq_mean_empty_row_is_nan():
    """OpenRLHF's mean of row means includes empty rows, so one empty row makes the loss NaN."""
    values, old, returns, mask = _batch(6, empty_rows=True)
    assert math.isnan(P.openrlhf_value_loss(values, old, returns, mask, clip_eps=0.2, token_level_loss=False))


def test_sb3_is_mse_of_clipped_prediction_without_half():
    """SB3: mean((R - clip(v))^2), no max, no 0.5; None means no clipping."""
    values, old, returns, _ = _batch(7, dtype=torch.float64)
    ones = torch.ones_like(values, dtype=torch.bool)
    clipped = P.sb3_value_loss(values, old, returns, clip_range_vf=0.2)
    assert clipped.item() == pytest.approx(ref_masked_mean(values, old, returns, ones, 0.2, 1.0, "clipped"), rel=1e-12)
    plain = P.sb3_value_loss(values, old, returns)
    assert plain.item() == pytest.approx(ref_masked_mean(values, old, returns, ones, math.inf, 1.0), rel=1e-12)


def test_sb3_gradient_is_zero_outside_band_on_both_sides():
    """SB3 kills the gradient outside the band even when the return lies beyond the new value."""
    old = torch.zeros(2, dtype=torch.float64)
    values = torch.tensor([0.5, 0.5], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([1.0, -1.0], dtype=torch.float64)
    P.sb3_value_loss(values, old, returns, clip_range_vf=0.2).backward()
    assert values.grad.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_verl_agg_loss_modes_match_reference(mode):
    """verl's four modes, written out by hand over Python lists (empty rows excluded from S)."""
    values, old, returns, mask = _batch(8, shape=(4, 6), empty_rows=True, dtype=torch.float64)
    loss_mat = torch.tensor([[_token_loss(v, o, r, 0.2) for v, o, r in zip(*rows, strict=True)]
                             for rows in zip(*_rows(values, old, returns), strict=True)], dtype=torch.float64)
    m = mask.double().tolist()
    rows = [[x for x, keep in zip(lr, mr, strict=True) if keep] for lr, mr in zip(loss_mat.tolist(), m, strict=True)]
    nonempty = [r for r in rows if r]
    expected = {
        "token-mean": sum(map(sum, rows)) / sum(map(len, rows)),
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
    assert P.verl_agg_loss(loss_mat, mask, "seq-mean-token-sum", dp_size=2, global_batch_size=4).item() == 3.0
    with pytest.raises(ValueError, match="batch_num_tokens"):
        P.verl_agg_loss(loss_mat, mask, "token-mean", dp_size=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        P.verl_agg_loss(loss_mat, mask, "seq-mean-token-mean", dp_size=2)
    for mode in ("mean", "token-sum"):
        with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
            P.verl_agg_loss(loss_mat, mask, mode)


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
    terms = [max((min(max(v[i], lo[i]), hi[i]) - r[i]) ** 2, (v[i] - r[i]) ** 2) for i in range(len(v)) if m[i]]
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


def test_the_two_clip_forms_at_band_edges_follow_the_installed_torch():
    """On an edge with v_clip == v (a tie): both forms pass the full 2 (v - R) up to torch 2.13; from 2.14
    the offset form's number-bound clamp passes half (its clipped branch none), the clamp form's
    tensor-bound clamp three quarters (its clipped branch half)."""
    values = torch.tensor([0.25, -0.25], dtype=torch.float64, requires_grad=True)
    old_values, returns = torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64)
    full = 2 * (values.detach() - returns)
    for clip, share in ((P._clip_offset, 1.0 if AUTOGRAD_BAND_CLOSED else 0.5),
                        (P._clip_clamp, 1.0 if AUTOGRAD_BAND_CLOSED else 0.75)):
        clipped = clip(values, old_values, 0.25)
        assert torch.equal(clipped, values.detach())
        (grad,) = torch.autograd.grad(torch.maximum((clipped - returns) ** 2, (values - returns) ** 2).sum(), values)
        assert torch.equal(grad, share * full), (clip.__name__, grad)


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
    token_mean = ref_masked_mean(values, old, returns, mask, 0.2)
    for name in ("baselines ppo2", "OpenRLHF", "verl", "TRL", "DeepSpeed-Chat", "CleanRL", "ColossalChat"):
        assert results[name].loss == pytest.approx(token_mean, rel=1e-12), name
    sb3 = ref_masked_mean(values, old, returns, mask, 0.2, scale=1.0, form="clipped")
    assert results["Stable-Baselines3"].loss == pytest.approx(sb3, rel=1e-12)


def test_empty_mask_behaviour():
    """Empty mask: verl and ValueLoss give 0, every other peer NaN."""
    got = P.empty_mask_behaviour()
    assert got["ValueLoss"] == "0" and got["verl"] == "0"
    assert all(got[name] == "nan" for name in P.PEERS if name != "verl")


def test_peer_table_is_complete():
    """Every peer entry names a source and, when only within tolerance, says why."""
    assert len(P.PEERS) == 9
    for peer in P.PEERS.values():
        assert peer.checked == "2026-11-25" and "/" in peer.source
        assert peer.clip_form in ("offset", "clamp")
        assert peer.agreement in ("exact", "tolerance")
        assert (peer.agreement == "tolerance") == bool(peer.why)
        ValueLoss(0.2, **peer.valueloss_settings)  # the settings are valid


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
