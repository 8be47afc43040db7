"""The exercise checkers of valueloss.lessons.exercises: each passes the notebook's solution (written again here)
and names the first failing case of a typical wrong answer."""

from __future__ import annotations

import pytest
import torch

from valueloss.lessons import exercises as ex

# --------------------------------------------------------------------------- the notebooks' solutions


def values_clipped(values, old_values, clip_eps):
    return old_values + (values - old_values).clamp(-clip_eps, clip_eps)


def clipped_loss(values, old_values, returns, clip_eps):
    values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (values_clipped - returns) ** 2
    return torch.max(loss_clipped, loss_unclipped)


def difference(moved, return_offset, clip_eps):
    moved_clipped = moved.clamp(-clip_eps, clip_eps)
    loss_unclipped = (moved - return_offset) ** 2
    loss_clipped = (moved_clipped - return_offset) ** 2
    return torch.max(loss_clipped, loss_unclipped) - loss_unclipped


def value_grad(values, old_values, returns, clip_eps):
    values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    clipped_wins = (values_clipped - returns) ** 2 > (values - returns) ** 2
    return torch.where(clipped_wins, 0.0, 2 * (values - returns))


def token_mean(loss_mat, mask):
    total = torch.where(mask, loss_mat, 0.0).sum()
    return total / mask.sum().clamp(min=1)


def seq_mean_token_mean(loss_mat, mask):
    lengths = mask.sum(-1)
    seq_means = torch.where(mask, loss_mat, 0.0).sum(-1) / lengths.clamp(min=1)
    nonempty = lengths > 0
    return seq_means[nonempty].sum() / nonempty.sum().clamp(min=1)


def scaled_clip_eps(returns, clip_eps=0.2):
    spread = float(returns.std())
    return clip_eps * spread if spread > 0 else clip_eps


def interquartile_mean(scores):
    ordered = sorted(scores)
    cut = len(ordered) // 4
    middle = ordered[cut:len(ordered) - cut]
    return sum(middle) / len(middle)


# --------------------------------------------------------------------------- solutions pass


@pytest.mark.parametrize(
    ("check", "solutions", "count"),
    [
        (ex.check_values_clipped, (values_clipped,), 10),
        (ex.check_clipped_loss, (clipped_loss,), 13),
        (ex.check_difference, (difference,), 10),
        (ex.check_value_grad, (value_grad,), 11),
        (ex.check_reductions, (token_mean, seq_mean_token_mean), 10),
        (ex.check_scaled_clip_eps, (scaled_clip_eps,), 6),
        (ex.check_interquartile_mean, (interquartile_mean,), 7),
    ],
    ids=lambda x: getattr(x, "__name__", None),
)
def test_solution_passes_with_a_tick(check, solutions, count, capsys):
    """The notebook's solution passes every case, and the checker says how many, with a tick."""
    check(*solutions)
    out = capsys.readouterr().out
    assert out.startswith(f"all {count} cases pass") and out.rstrip().endswith("✓")


def test_unfinished_stub_raises_not_implemented():
    """A stub that still raises NotImplementedError is not turned into a failing case."""
    def stub(values, old_values, clip_eps):
        raise NotImplementedError("your turn")

    with pytest.raises(NotImplementedError, match="your turn"):
        ex.check_values_clipped(stub)


# --------------------------------------------------------------------------- typical wrong answers fail in words


def _fails(check, *fns):
    with pytest.raises(AssertionError) as info:
        check(*fns)
    return str(info.value)


def test_values_clipped_clamping_v_instead_of_the_move():
    """Clamping v itself to [-eps, eps] (a band centred on 0) fails at the first case with v_old != 0."""
    message = _fails(ex.check_values_clipped, lambda v, o, e: v.clamp(-e, e))
    assert message.startswith("at v=1.5, v_old=1, eps=0.2 your values_clipped gives 0.2, expected 1.2: ")
    assert "centred on v_old" in message


def test_clipped_loss_without_the_max():
    """The unclipped squared error alone fails where the clipped branch wins, naming the max."""
    message = _fails(ex.check_clipped_loss, lambda v, o, R, e: (v - R) ** 2)
    assert message == ("at v=0.5, v_old=0, R=1, eps=0.2 your loss gives 0.25, expected 0.64: remember the max: "
                       "beyond the band towards the return, the clipped branch (v_clip - R)**2 is larger")


def test_clipped_loss_with_only_the_clipped_branch():
    """The clipped branch alone (Stable-Baselines3's form) fails away from the return."""
    message = _fails(ex.check_clipped_loss, lambda v, o, R, e: (values_clipped(v, o, e) - R) ** 2)
    assert message.startswith("at v=-0.5, v_old=0, R=1, eps=0.2 your loss gives 1.44, expected 2.25: remember the max")


def test_clipped_loss_with_a_factor_one_half():
    """A per-token loss that already carries the 0.5 fails, naming the factor."""
    message = _fails(ex.check_clipped_loss, lambda v, o, R, e: 0.5 * clipped_loss(v, o, R, e))
    assert message.startswith("at v=0.1, v_old=0, R=1, eps=0.2 your loss gives 0.405, expected 0.81")


def test_difference_that_can_go_negative():
    """Clipped branch minus unclipped branch, without the max, is negative away from the return and fails."""
    message = _fails(ex.check_difference,
                     lambda dv, dr, e: (dv.clamp(-e, e) - dr) ** 2 - (dv - dr) ** 2)
    assert message.startswith("at value moved -0.5, return offset 1, eps=0.2 your difference gives -0.81, expected 0:")
    assert "never negative" in message


def test_value_grad_that_ignores_clipping():
    """The unclipped gradient 2(v - R) everywhere fails where clipping zeroes the gradient."""
    message = _fails(ex.check_value_grad, lambda v, o, R, e: 2 * (v - R))
    assert message.startswith("at v=0.5, v_old=0, R=1, eps=0.2 your gradient gives -1, expected 0: ")


def test_value_grad_zero_everywhere_outside_the_band():
    """Zeroing the gradient on both sides of the band fails on the side away from the return."""
    outside = lambda v, o, R, e: torch.where((v - o).abs() > e, 0.0, 2 * (v - R))  # noqa: E731
    message = _fails(ex.check_value_grad, outside)
    assert message.startswith("at v=-0.5, v_old=0, R=1, eps=0.2 your gradient gives 0, expected -3: ")


def test_value_grad_checker_avoids_edges_and_ties():
    """The gradient checker's cases hold no band edge and no tie, so its solution is exact on either torch."""
    for case in ex._grad_cases():
        v, o, R, e = case.args
        moved = (v - o).abs()
        v_clip = o + (v - o).clamp(-e, e)
        assert not (moved == e).any(), case.where
        assert not (((v_clip - R) ** 2 == (v - R) ** 2) & (moved > e)).any(), case.where


def test_reductions_plain_mean_ignoring_the_mask():
    """A mean over all B x T entries fails on the ragged batch, asking to count only the selected tokens."""
    message = _fails(ex.check_reductions, lambda loss, mask: loss.mean(), seq_mean_token_mean)
    assert message.startswith("with responses of 4, 1 and 2 tokens your token_mean gives 6.5, expected ")
    assert "count only the tokens the mask selects" in message


def test_reductions_naive_masked_mean_gives_nan_on_an_empty_batch():
    """sum(m * l) / sum(m) fails on the fully masked batch (0 / 0), the message says 0 not NaN."""
    naive = lambda loss, mask: (loss * mask).sum() / mask.sum()  # noqa: E731
    message = _fails(ex.check_reductions, naive, seq_mean_token_mean)
    assert message.startswith("with a fully masked batch your token_mean gives nan, expected 0: ")


def test_reductions_multiplying_by_the_mask_lets_nan_through():
    """A token mean that multiplies by the mask passes until the padding holds NaN."""
    guarded = lambda loss, mask: (loss * mask).sum() / mask.sum().clamp(min=1)  # noqa: E731
    message = _fails(ex.check_reductions, guarded, seq_mean_token_mean)
    assert message.startswith("with padding that holds NaN")
    assert "torch.where" in message


def test_reductions_seq_mean_counting_the_empty_row():
    """A sequence mean that divides by all B rows fails on the empty row."""
    def counts_empty(loss, mask):
        lengths = mask.sum(-1)
        return (torch.where(mask, loss, 0.0).sum(-1) / lengths.clamp(min=1)).mean()

    message = _fails(ex.check_reductions, token_mean, counts_empty)
    assert message.startswith("with responses of 3, 0 and 2 tokens (an empty row) your seq_mean_token_mean gives ")
    assert "leave it out" in message


def test_reductions_seq_mean_written_as_token_mean():
    """Using the token mean for the sequence mean fails on the ragged batch."""
    message = _fails(ex.check_reductions, token_mean, token_mean)
    assert message.startswith("with responses of 4, 1 and 2 tokens your seq_mean_token_mean gives ")
    assert "every sequence weighs the same" in message


@pytest.mark.parametrize(
    ("wrong", "start"),
    [
        (lambda returns, clip_eps=0.2: clip_eps,
         "for returns of spread 100 and clip_eps=0.2 your scaled_clip_eps gives 0.2"),
        (lambda returns, clip_eps=0.2: clip_eps * float(returns.abs().max()),
         "for returns of spread 1 and clip_eps=0.2 your scaled_clip_eps gives"),
        (lambda returns, clip_eps=0.2: clip_eps * float(returns.std()), "for returns that are all equal to 5"),
    ],
    ids=["unscaled", "largest return", "no spread"],
)
def test_scaled_clip_eps_wrong_scales(wrong, start):
    """A constant clip_eps, one scaled by the largest return, or one that is 0 for equal returns fails in words."""
    assert _fails(ex.check_scaled_clip_eps, wrong).startswith(start)


def test_scaled_clip_eps_scaled_by_the_mean():
    """clip_eps times the returns' mean fails on returns of mean 1000 (or gives 0 for centred returns)."""
    message = _fails(ex.check_scaled_clip_eps, lambda returns, clip_eps=0.2: clip_eps * float(returns.mean()))
    assert message.startswith("for returns of spread 1 and clip_eps=0.2 your scaled_clip_eps gives ")


@pytest.mark.parametrize(
    ("wrong", "start"),
    [
        (lambda s: sum(s) / len(s), "for the 4 scores [1, 2, 3, 100] your interquartile_mean gives 26.5, expected 2.5"),
        (lambda s: interquartile_mean(s) if s == sorted(s) else sum(s[1:-1]) / (len(s) - 2),
         "for the 5 unsorted scores"),
        (lambda s: float(torch.tensor(s).median()), "for the 4 scores [1, 2, 3, 100] your interquartile_mean gives 2,"),
        (lambda s: sum(sorted(s)[round(len(s) / 4):len(s) - round(len(s) / 4)]) / (len(s) - 2 * round(len(s) / 4)),
         "for the 7 scores"),
    ],
    ids=["plain mean", "unsorted", "median", "rounding"],
)
def test_interquartile_mean_wrong_answers(wrong, start):
    """The plain mean, trimming unsorted scores, the median and rounding n / 4 each fail at a named case."""
    assert _fails(ex.check_interquartile_mean, wrong).startswith(start)
