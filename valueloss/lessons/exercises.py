"""Checkers for the "implement it" exercises of the Learn notebooks (00-06).

Each ``check_*`` function calls the learner's function on a fixed list of cases, compares the result with
:mod:`valueloss.functional` (the single source of truth for the math; :func:`valueloss.experiments.iqm` for
notebook 06), and raises ``AssertionError`` naming the first failing case in words, with a hint. When every
case passes it prints ``all N cases pass: ✓``. A ``NotImplementedError`` from an unfinished stub passes through
unchanged.

The cases include the awkward ones: the band's edges ``|v - v_old| == clip_eps`` (where the loss is the same
whichever convention the installed torch has, :data:`valueloss.functional.BAND_CLOSED`), masked tokens,
padding that holds NaN, empty rows and fully masked batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import functional as F

__all__ = [
    "check_clipped_loss",
    "check_difference",
    "check_interquartile_mean",
    "check_reductions",
    "check_scaled_clip_eps",
    "check_value_grad",
    "check_values_clipped",
]

_DTYPE = torch.float64


@dataclass(frozen=True)
class _Case:
    """One case: where it is (in words), the inputs, and the hint shown if the learner's answer is wrong."""

    where: str
    args: tuple
    hint: str


def _t(x) -> Tensor:
    return torch.as_tensor(x, dtype=_DTYPE)


def _number(x) -> str:
    """A number or a small tensor the way a learner would write it."""
    if isinstance(x, Tensor):
        if x.numel() == 1:
            x = x.item()
        else:
            return str([round(v, 4) if math.isfinite(v) else v for v in x.flatten().tolist()])
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    return str(x)


def _as_tensor(result, name: str, expected: Tensor) -> Tensor:
    if not isinstance(result, (Tensor, float, int)):
        raise AssertionError(f"{name} should return a tensor (or a number), got {type(result).__name__}")
    result = torch.as_tensor(result, dtype=_DTYPE)
    if result.shape != expected.shape:
        raise AssertionError(f"{name} should return shape {tuple(expected.shape)}, got {tuple(result.shape)}")
    return result


def _close(got: Tensor, expected: Tensor, rtol: float = 1e-7, atol: float = 1e-9) -> bool:
    return bool(torch.allclose(got, expected, rtol=rtol, atol=atol, equal_nan=False)) and bool(got.isfinite().all())


def _run(name: str, fn: Callable, cases: Sequence[_Case], expected: Callable, *, rtol: float = 1e-7) -> int:
    """Call ``fn`` on every case and compare with ``expected``; raise at the first mismatch, else return the count."""
    for case in cases:
        want = torch.as_tensor(expected(*case.args), dtype=_DTYPE)
        got = _as_tensor(fn(*case.args), name, want)
        if not _close(got, want, rtol=rtol):
            raise AssertionError(
                f"{case.where} your {name} gives {_number(got)}, expected {_number(want)}: {case.hint}"
            )
    return len(cases)


def _passed(count: int) -> None:
    print(f"all {count} cases pass: ✓")


# --------------------------------------------------------------------------- 00: the clipped value


def _point(v, v_old, eps, R=None) -> str:
    text = f"at v={_number(v)}, v_old={_number(v_old)}"
    if R is not None:
        text += f", R={_number(R)}"
    return text + f", eps={_number(eps)}"


_CLIP_HINTS = {
    "inside": "inside the band |v - v_old| <= eps the clamp does nothing, so the clipped value is v itself",
    "above": "beyond the band the clipped value stops at the band edge v_old + eps",
    "below": "below the band the clipped value stops at the band edge v_old - eps",
    "centred": "the band is centred on v_old, not on 0: clamp the move v - v_old to [-eps, eps], then add v_old back",
    "edge": "on the band edge the clipped value is v, which is also the edge",
    "zero": "with eps = 0 the clipped value is v_old, wherever v is",
    "batch": "it should work token by token on a whole batch of any shape",
}


def _clip_cases() -> list[_Case]:
    rows = [
        (0.1, 0.0, 0.2, "inside"),
        (0.5, 0.0, 0.2, "above"),
        (-0.5, 0.0, 0.2, "below"),
        (1.5, 1.0, 0.2, "centred"),
        (0.3, 1.0, 0.2, "centred"),
        (-3.0, 2.0, 1.0, "centred"),
        (0.25, 0.0, 0.25, "edge"),
        (-0.25, 0.0, 0.25, "edge"),
        (0.7, 0.5, 0.0, "zero"),
    ]
    cases = [_Case(_point(v, o, e), (_t([v]), _t([o]), e), _CLIP_HINTS[kind]) for v, o, e, kind in rows]
    v = _t([[0.1, 0.5, -0.5], [1.5, 0.3, 2.0]])
    old = _t([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    cases.append(_Case("on a batch of shape (2, 3) with eps=0.2", (v, old, 0.2), _CLIP_HINTS["batch"]))
    return cases


def _values_clipped(values: Tensor, old_values: Tensor, clip_eps: float) -> Tensor:
    """The clipped value, read off valueloss.functional: its "clipped" variant is (values_clipped - R)**2, and
    with R below the whole band the square root gives values_clipped - R back."""
    below = old_values - clip_eps - 1.0
    loss = F.elementwise_value_loss(values, old_values, below, clip_eps=clip_eps, variant="clipped")
    return below + loss.sqrt()


def check_values_clipped(values_clipped: Callable[[Tensor, Tensor, float], Tensor]) -> None:
    """Check ``values_clipped(values, old_values, clip_eps)`` (notebook 00) on 10 cases."""
    _passed(_run("values_clipped", values_clipped, _clip_cases(), _values_clipped))


# --------------------------------------------------------------------------- 01: the per-token loss


_LOSS_HINTS = {
    "inside": "inside the band the loss is the plain squared error (v - R)**2",
    "towards": "remember the max: beyond the band towards the return, the clipped branch (v_clip - R)**2 is larger",
    "away": "remember the max: beyond the band away from the return, the unclipped branch (v - R)**2 is larger",
    "small overshoot": "a small overshoot past the return: the clipped branch is still the larger one",
    "large overshoot": "a large overshoot: the unclipped branch (v - R)**2 is the larger one again",
    "centred": "the band is centred on v_old: v_clip = v_old + clamp(v - v_old, -eps, eps)",
    "below": "the return may lie below v_old; nothing in the formula assumes R > v_old",
    "zero": "with eps = 0, v_clip = v_old: the loss is max((v_old - R)**2, (v - R)**2)",
    "edge": "on the band edge v_clip = v and both branches agree",
    "no factor": "the per-token loss has no factor 0.5 (that comes with the reduction)",
    "batch": "it should work token by token on a whole batch of any shape",
}


def _loss_rows() -> list[tuple]:
    return [
        (0.1, 0.0, 1.0, 0.2, "inside"),
        (0.5, 0.0, 1.0, 0.2, "towards"),
        (-0.5, 0.0, 1.0, 0.2, "away"),
        (1.5, 0.0, 1.0, 0.2, "small overshoot"),
        (2.5, 0.0, 1.0, 0.2, "large overshoot"),
        (2.5, 2.0, 3.0, 0.2, "centred"),
        (-0.5, 0.0, -1.0, 0.2, "below"),
        (0.5, 0.0, -1.0, 0.2, "below"),
        (0.5, 0.0, 1.0, 0.0, "zero"),
        (0.25, 0.0, 1.0, 0.25, "edge"),
        (-0.25, 0.0, 1.0, 0.25, "edge"),
        (3.0, 0.0, 0.0, 0.5, "no factor"),
    ]


def _loss_cases() -> list[_Case]:
    cases = [
        _Case(_point(v, o, e, R), (_t([v]), _t([o]), _t([R]), e), _LOSS_HINTS[kind])
        for v, o, R, e, kind in _loss_rows()
    ]
    generator = torch.Generator().manual_seed(0)
    v, old, R = torch.randn(3, 4, 7, generator=generator, dtype=_DTYPE).unbind(0)
    cases.append(_Case("on a random batch of shape (4, 7) with eps=0.2", (v, old, R, 0.2), _LOSS_HINTS["batch"]))
    return cases


def check_clipped_loss(clipped_loss: Callable[[Tensor, Tensor, Tensor, float], Tensor]) -> None:
    """Check ``clipped_loss(values, old_values, returns, clip_eps)`` (notebook 01), the per-token loss
    ``max((v_clip - R)**2, (v - R)**2)``, against :func:`valueloss.functional.elementwise_value_loss`."""
    _passed(_run("loss", clipped_loss, _loss_cases(), lambda v, o, R, e: F.elementwise_value_loss(v, o, R, clip_eps=e)))


# --------------------------------------------------------------------------- 02: the difference surface


_DIFFERENCE_HINTS = {
    "inside": "inside the band clipping changes nothing: the difference is 0",
    "towards": "beyond the band towards the return the clipped branch wins: "
               "the difference is (v_clip - R)**2 - (v - R)**2",
    "away": "the max never lowers the loss: where the unclipped branch wins the difference is 0, never negative",
    "below": "the return may lie below the old value (a negative return offset)",
    "zero": "with eps = 0 the clipped value is v_old itself",
    "edge": "on the band edge v_clip = v: the difference is 0",
    "grid": "it should work point by point on a whole grid",
}


def _difference_cases() -> list[_Case]:
    rows = [
        (0.1, 1.0, 0.2, "inside"),
        (0.5, 1.0, 0.2, "towards"),
        (-0.5, 1.0, 0.2, "away"),
        (1.5, 1.0, 0.2, "towards"),
        (2.5, 1.0, 0.2, "away"),
        (-0.5, -1.0, 0.2, "below"),
        (0.5, -1.0, 0.2, "below"),
        (0.5, 1.0, 0.0, "zero"),
        (0.25, 1.0, 0.25, "edge"),
    ]
    cases = [
        _Case(f"at value moved {_number(dv)}, return offset {_number(dr)}, eps={_number(e)}", (_t([dv]), _t([dr]), e),
              _DIFFERENCE_HINTS[kind])
        for dv, dr, e, kind in rows
    ]
    axis = torch.linspace(-1, 1, 9, dtype=_DTYPE)
    dv, dr = torch.meshgrid(axis, axis, indexing="xy")
    cases.append(_Case("on a 9 x 9 grid over [-1, 1]^2 with eps=0.2", (dv, dr, 0.2), _DIFFERENCE_HINTS["grid"]))
    return cases


def _difference(moved: Tensor, return_offset: Tensor, clip_eps: float) -> Tensor:
    zero = torch.zeros_like(moved)
    clipped = F.elementwise_value_loss(moved, zero, return_offset, clip_eps=clip_eps)
    return clipped - F.elementwise_value_loss(moved, zero, return_offset, clip_eps=None)


def check_difference(difference: Callable[[Tensor, Tensor, float], Tensor]) -> None:
    """Check ``difference(moved, return_offset, clip_eps)`` (notebook 02): the clipped minus the unclipped loss
    at the point ``(v - v_old, R - v_old)`` of the plane."""
    _passed(_run("difference", difference, _difference_cases(), _difference))


# --------------------------------------------------------------------------- 03: the per-token gradient


_GRAD_HINTS = {
    "inside": "inside the band the gradient is that of (v - R)**2, that is 2(v - R)",
    "towards": "beyond the band towards the return the clipped branch wins, and it does not depend on v: gradient 0",
    "away": "beyond the band away from the return the unclipped branch wins: the full 2(v - R)",
    "small overshoot": "a small overshoot (before the mirror point): the clipped branch still wins, gradient 0",
    "large overshoot": "past the mirror point the unclipped branch wins again: 2(v - R), pulling back",
    "centred": "the band is centred on v_old, not on 0",
    "below": "the return may lie below v_old: the zero stretch is then on the left of the band",
    "zero": "with eps = 0 the gradient is 0 wherever v is closer to R than v_old is",
    "batch": "it should work token by token on a whole batch of any shape",
}


def _grad_cases() -> list[_Case]:
    rows = [
        (0.1, 0.0, 1.0, 0.2, "inside"),
        (0.5, 0.0, 1.0, 0.2, "towards"),
        (-0.5, 0.0, 1.0, 0.2, "away"),
        (1.5, 0.0, 1.0, 0.2, "small overshoot"),
        (2.5, 0.0, 1.0, 0.2, "large overshoot"),
        (2.5, 2.0, 3.0, 0.2, "centred"),
        (-0.5, 0.0, -1.0, 0.2, "below"),
        (0.5, 0.0, -1.0, 0.2, "below"),
        (0.5, 0.0, 1.0, 0.0, "zero"),
        (-0.5, 0.0, 1.0, 0.0, "zero"),
    ]
    cases = [
        _Case(_point(v, o, e, R), (_t([v]), _t([o]), _t([R]), e), _GRAD_HINTS[kind]) for v, o, R, e, kind in rows
    ]
    # a random batch off the band edges and the exact ties (their conventions are in notebook 07, section 4.4)
    v, old, R = (torch.arange(28, dtype=_DTYPE).reshape(4, 7) * c % 2.3 - 1.1 for c in (0.37, 0.61, 0.83))
    cases.append(_Case("on a batch of shape (4, 7) with eps=0.2", (v, old, R, 0.2), _GRAD_HINTS["batch"]))
    return cases


def check_value_grad(value_grad: Callable[[Tensor, Tensor, Tensor, float], Tensor]) -> None:
    """Check ``value_grad(values, old_values, returns, clip_eps)`` (notebook 03), the derivative of the per-token
    loss with respect to ``v``, against :func:`valueloss.functional.elementwise_value_loss_grad`.

    The cases avoid the band edges and exact ties between the branches, whose conventions notebook 07
    explains (section 4.4)."""
    _passed(_run("gradient", value_grad, _grad_cases(),
                 lambda v, o, R, e: F.elementwise_value_loss_grad(v, o, R, clip_eps=e)))


# --------------------------------------------------------------------------- 04: the two means


def _mask_rows(*lengths: int, width: int) -> Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def _reduction_cases(seq: bool) -> list[_Case]:
    loss = torch.arange(1, 13, dtype=_DTYPE).reshape(3, 4)
    full = torch.ones(3, 4, dtype=torch.bool)
    ragged = _mask_rows(4, 1, 2, width=4)
    empty_row = _mask_rows(3, 0, 2, width=4)
    nan_padding = torch.where(ragged, loss, torch.nan)
    spread = "every sequence weighs the same: average each sequence over its own tokens first, then the sequences"
    cases = [
        _Case("with every token counted (3 x 4, mask all True)", (loss, full),
              "with a full mask both means are the plain mean"),
        _Case("with responses of 4, 1 and 2 tokens", (loss, ragged),
              spread if seq else "count only the tokens the mask selects: divide by their number, not by B x T"),
        _Case("with responses of 3, 0 and 2 tokens (an empty row)", (loss, empty_row),
              "an empty sequence has no mean: leave it out, and average over the 2 non-empty sequences"
              if seq else "an empty row just adds no tokens"),
        _Case("with a fully masked batch", (loss, torch.zeros(3, 4, dtype=torch.bool)),
              "nothing to average: the loss is 0, not 0 / 0 = NaN"),
        _Case("with padding that holds NaN (responses of 4, 1 and 2 tokens)", (nan_padding, ragged),
              "NaN * 0 is NaN: select the counted tokens with torch.where(mask, loss, 0) instead of multiplying"),
    ]
    return cases


def check_reductions(token_mean: Callable[[Tensor, Tensor], Tensor],
                     seq_mean_token_mean: Callable[[Tensor, Tensor], Tensor]) -> None:
    """Check ``token_mean(loss_mat, mask)`` and ``seq_mean_token_mean(loss_mat, mask)`` (notebook 04) against
    :func:`valueloss.functional.aggregate` on 10 cases (empty rows, a fully masked batch, NaN in the padding)."""
    count = 0
    for name, fn, mode, seq in (("token_mean", token_mean, "token-mean", False),
                                ("seq_mean_token_mean", seq_mean_token_mean, "seq-mean-token-mean", True)):
        count += _run(name, fn, _reduction_cases(seq), lambda loss, mask, mode=mode: F.aggregate(loss, mask, mode=mode))
    _passed(count)


# --------------------------------------------------------------------------- 05: clip_eps in return units


def _spread_batch(scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """A batch like notebook 03's: old values miss the returns, new values moved 30% of the way, times scale."""
    generator = torch.Generator().manual_seed(0)
    returns = torch.randn(4096, generator=generator, dtype=_DTYPE)
    old = returns + 0.5 * torch.randn(4096, generator=generator, dtype=_DTYPE)
    values = old + 0.3 * (returns - old)
    return values * scale, old * scale, returns * scale


def _clip_fraction(values: Tensor, old: Tensor, returns: Tensor, clip_eps: float) -> float:
    return float((F.clip_regions(values, old, returns, clip_eps=clip_eps) == F.Region.CLIPPED).double().mean())


def check_scaled_clip_eps(scaled_clip_eps: Callable[..., float]) -> None:
    """Check ``scaled_clip_eps(returns, clip_eps)`` (notebook 05): ``clip_eps`` times the returns' standard
    deviation (``clip_eps`` itself when the returns do not spread), and that with it the share of tokens whose
    gradient clipping zeroes (:func:`valueloss.functional.clip_regions`) no longer depends on the returns' scale."""
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(256, generator=generator, dtype=_DTYPE)
    z = (z - z.mean()) / z.std()
    rows = [
        ("for returns of spread 1 and clip_eps=0.2", z, 0.2, "returns of spread 1 keep clip_eps as it is"),
        ("for returns of spread 100 and clip_eps=0.2", 100 * z, 0.2,
         "the band must grow with the returns: multiply clip_eps by their standard deviation"),
        ("for returns of spread 0.01 and clip_eps=0.5", 0.01 * z, 0.5, "small returns need a small band too"),
        ("for returns of mean 1000 and spread 1, clip_eps=0.2", 1000 + z, 0.2,
         "the band is about how far predictions move, so it follows the returns' spread, not their mean or size"),
        ("for returns that are all equal to 5", torch.full((8,), 5.0, dtype=_DTYPE), 0.2,
         "returns that do not spread give no scale: keep clip_eps as it is"),
    ]
    for where, returns, eps, hint in rows:
        std = float(returns.std())
        want = eps * std if std > 0 else eps
        got = scaled_clip_eps(returns, eps)
        got = float(got) if isinstance(got, (Tensor, float, int)) else got
        if not isinstance(got, float) or not math.isfinite(got) or not math.isclose(got, want, rel_tol=0.01):
            raise AssertionError(f"{where} your scaled_clip_eps gives {_number(got)}, expected {_number(want)}: {hint}")
    fractions = []
    for scale in (1.0, 100.0):
        values, old, returns = _spread_batch(scale)
        fractions.append(_clip_fraction(values, old, returns, float(scaled_clip_eps(returns, 0.2))))
    if abs(fractions[0] - fractions[1]) > 0.01:
        raise AssertionError(f"with your clip_eps the gradient is zeroed on {fractions[0]:.1%} of the tokens "
                             f"at returns' scale 1 and on {fractions[1]:.1%} at scale 100: "
                             "the band should scale with the returns")
    print(f"all {len(rows) + 1} cases pass (clip fraction {fractions[0]:.1%} at scale 1 and at scale 100): ✓")


# --------------------------------------------------------------------------- 06: the interquartile mean


def check_interquartile_mean(interquartile_mean: Callable[[Sequence[float]], float]) -> None:
    """Check ``interquartile_mean(scores)`` (notebook 06): the mean after dropping the lowest and the highest
    ``floor(n / 4)`` scores, against :func:`valueloss.experiments.iqm`."""
    from ..experiments import iqm

    rows = [
        ("for the 4 scores [1, 2, 3, 100]", [1.0, 2.0, 3.0, 100.0],
         "drop the lowest and the highest quarter (one score each here), then take the mean"),
        ("for the 5 unsorted scores [100, 3, 1, 4, 2]", [100.0, 3.0, 1.0, 4.0, 2.0],
         "sort the scores first, so that the dropped ones are the lowest and the highest"),
        ("for the 6 scores [10, 500, 20, 30, 40, 0] (6 seeds, as in this notebook)",
         [10.0, 500.0, 20.0, 30.0, 40.0, 0.0],
         "with 6 scores floor(6 / 4) = 1 is dropped at each end, the mean of the middle 4 remains"),
        ("for the 7 scores [1, 2, 3, 4, 5, 60, 70]", [1.0, 2.0, 3.0, 4.0, 5.0, 60.0, 70.0],
         "floor(7 / 4) = 1: round down the number of scores to drop"),
        ("for the 8 scores [-5, 1, 2, 3, 4, 5, 6, 50]", [-5.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 50.0],
         "floor(8 / 4) = 2 are dropped at each end"),
        ("for the 3 scores [1, 2, 30]", [1.0, 2.0, 30.0],
         "with fewer than 4 scores nothing is dropped: the plain mean"),
        ("for the 6 scores [2, 2, 2, 2, 2, 9] (ties)", [2.0, 2.0, 2.0, 2.0, 2.0, 9.0],
         "ties are dropped like any score"),
    ]
    for where, scores, hint in rows:
        want = iqm(scores)
        got = interquartile_mean(list(scores))
        got = float(got) if isinstance(got, (Tensor, float, int)) or hasattr(got, "__float__") else got
        if not isinstance(got, float) or not math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12):
            raise AssertionError(
                f"{where} your interquartile_mean gives {_number(got)}, expected {_number(want)}: {hint}")
    print(f"all {len(rows)} cases pass: ✓")
