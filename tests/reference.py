"""Independent references for the tests: plain Python floats and loops, written from the formulas.

Nothing here imports valueloss. Two references:

* ``loss_loops`` / ``grad_loops``: the per-token loss, its derivative and every aggregation mode with
  Python floats (IEEE double) and explicit loops, with the conventions spelled out by hand
  (the clip band closed or open as autograd's ``clamp`` has it, ties of the max split 50/50, empty rows
  and batches contribute 0).
* ``openrlhf_formula``: OpenRLHF's ValueLoss as published (openrlhf/models/loss.py, ValueLoss and
  agg_loss, checked 2026-11-25), re-expressed with torch ops so autograd gives its gradients.
"""

from __future__ import annotations

import torch


def _penalty(error: float, loss_type: str, delta: float) -> float:
    if loss_type == "squared" or abs(error) <= delta:
        return error * error
    return 2.0 * delta * abs(error) - delta * delta


def _penalty_slope(error: float, loss_type: str, delta: float) -> float:
    if loss_type == "squared":
        return 2.0 * error
    return 2.0 * min(max(error, -delta), delta)


def autograd_band_closed() -> bool:
    """Whether the installed torch's ``clamp`` passes the gradient at its bounds: torch <= 2.13 does
    (subgradient 1, a closed band), torch >= 2.14 does not with number bounds (0, an open band)."""
    x = torch.tensor([-0.25, 0.25], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(torch.clamp(x, -0.25, 0.25).sum(), x)
    assert grad.tolist() in ([1.0, 1.0], [0.0, 0.0]), f"a clamp convention the reference does not know: {grad}"
    return grad.tolist() == [1.0, 1.0]


AUTOGRAD_BAND_CLOSED = autograd_band_closed()


class ClampWithEdge(torch.autograd.Function):
    """``x.clamp(lo, hi)`` (number bounds) whose gradient at ``x == lo`` or ``x == hi`` is ``edge``:
    1 as torch <= 2.13's clamp, 0 as torch >= 2.14's; 1 strictly inside, 0 outside and for NaN."""

    @staticmethod
    def forward(ctx, x, lo, hi, edge):
        ctx.save_for_backward(x)
        ctx.bounds = (lo, hi, edge)
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        lo, hi, edge = ctx.bounds
        inside = (x > lo) & (x < hi)
        on_edge = (x == lo) | (x == hi)
        return torch.where(inside, grad, torch.where(on_edge, edge * grad, 0.0)), None, None, None


def clamp_with_edge(edge: float):
    """A ``clamp(x, lo, hi)`` function whose gradient at the bounds is ``edge`` (see :class:`ClampWithEdge`)."""
    return lambda x, lo, hi: ClampWithEdge.apply(x, lo, hi, edge)


def token_loss(v, o, r, clip_eps, variant="max", loss_type="squared", delta=1.0) -> float:
    """The per-token loss of one prediction."""
    unclipped = _penalty(v - r, loss_type, delta)
    if clip_eps is None:
        return unclipped
    v_clipped = o + min(max(v - o, -clip_eps), clip_eps)
    clipped = _penalty(v_clipped - r, loss_type, delta)
    return clipped if variant == "clipped" else max(clipped, unclipped)


def token_grad(v, o, r, clip_eps, variant="max", loss_type="squared", delta=1.0, band_closed=None) -> float:
    """d token_loss / d v with autograd's conventions: the band closed or open (``band_closed``; by
    default as the installed torch's ``clamp``), ties split in half."""
    if band_closed is None:
        band_closed = AUTOGRAD_BAND_CLOSED
    slope_unclipped = _penalty_slope(v - r, loss_type, delta)
    if clip_eps is None:
        return slope_unclipped
    d = v - o
    v_clipped = o + min(max(d, -clip_eps), clip_eps)
    in_band = -clip_eps <= d <= clip_eps if band_closed else -clip_eps < d < clip_eps
    slope_clipped = _penalty_slope(v_clipped - r, loss_type, delta) if in_band else 0.0
    if variant == "clipped":
        return slope_clipped
    unclipped = _penalty(v - r, loss_type, delta)
    clipped = _penalty(v_clipped - r, loss_type, delta)
    if unclipped > clipped:
        return slope_unclipped
    if clipped > unclipped:
        return slope_clipped
    return 0.5 * (slope_clipped + slope_unclipped)


def _rows(t):
    """A tensor of shape (..., T) as a list of rows of floats."""
    t = t.detach().to("cpu", torch.float64)
    return t.reshape(-1, t.shape[-1]).tolist() if t.dim() > 0 else [[t.item()]]


def weights_loops(mask_rows, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """Per-token weights of each mode, from the mode's definition."""
    T = len(mask_rows[0]) if mask_rows else 0
    total = sum(sum(row) for row in mask_rows)
    nonempty = sum(1 for row in mask_rows if sum(row) > 0)
    out = []
    for row in mask_rows:
        n = sum(row)
        if mode == "token-sum":
            out.append([m * dp_size for m in row])
        elif mode == "token-mean":
            N = total if batch_num_tokens is None else float(batch_num_tokens)
            out.append([m / N * dp_size if N > 0 else 0.0 for m in row])
        else:
            S = nonempty if global_batch_size is None else float(global_batch_size)
            if n <= 0 or S <= 0:
                out.append([0.0] * len(row))
                continue
            per = [m / n for m in row] if mode == "seq-mean-token-mean" else list(row)
            w = [x / S * dp_size for x in per]
            if mode == "seq-mean-token-sum-norm":
                w = [x / (loss_scale_factor if loss_scale_factor is not None else T) for x in w]
            out.append(w)
    return out


def loss_loops(values, old_values, returns, mask=None, *, clip_eps=None, variant="max", mode="token-mean",
               loss_type="squared", delta=1.0, scale=0.5, **counts) -> float:
    """The reduced loss as a Python float."""
    V, O, R = _rows(values), _rows(old_values), _rows(returns)
    M = _rows(mask) if mask is not None else [[1.0] * len(row) for row in V]
    W = weights_loops(M, mode, **counts)
    total = 0.0
    for vr, orow, rr, wr, mr in zip(V, O, R, W, M):
        for v, o, r, w, m in zip(vr, orow, rr, wr, mr):
            if m != 0:
                total += w * token_loss(v, o, r, clip_eps, variant, loss_type, delta)
    return scale * total


def grad_loops(values, old_values, returns, mask=None, *, clip_eps=None, variant="max", mode="token-mean",
               loss_type="squared", delta=1.0, scale=0.5, band_closed=None, **counts) -> torch.Tensor:
    """d loss / d values as a float64 tensor of the values' shape (``band_closed`` as in :func:`token_grad`)."""
    V, O, R = _rows(values), _rows(old_values), _rows(returns)
    M = _rows(mask) if mask is not None else [[1.0] * len(row) for row in V]
    W = weights_loops(M, mode, **counts)
    out = []
    for vr, orow, rr, wr, mr in zip(V, O, R, W, M):
        out.append([
            scale * w * token_grad(v, o, r, clip_eps, variant, loss_type, delta, band_closed) if m != 0 else 0.0
            for v, o, r, w, m in zip(vr, orow, rr, wr, mr)
        ])
    return torch.tensor(out, dtype=torch.float64).reshape(values.shape)


def explained_variance_loops(values, returns, mask=None) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over the unmasked tokens (population variances), 0 when
    ``Var(returns)`` is 0 so that it is never NaN."""
    V, R = _rows(values), _rows(returns)
    M = _rows(mask) if mask is not None else [[1.0] * len(row) for row in V]
    kept = [(v, r) for vr, rr, mr in zip(V, R, M) for v, r, m in zip(vr, rr, mr) if m != 0]
    n = len(kept)
    if n == 0:
        return 0.0
    mean_r = sum(r for _, r in kept) / n
    var_r = sum((r - mean_r) ** 2 for _, r in kept) / n
    residuals = [r - v for v, r in kept]
    mean_e = sum(residuals) / n
    var_e = sum((e - mean_e) ** 2 for e in residuals) / n
    return 1.0 - var_e / var_r if var_r > 0 else 0.0


def openrlhf_formula(values, old_values, returns, action_mask, clip_eps=None, token_level_loss=True,
                     dp_size=1, batch_num_tokens=None, global_batch_size=None):
    """OpenRLHF's ValueLoss.forward, from its published definition (mask required, as there)."""
    if clip_eps is not None:
        values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        loss = torch.max((values_clipped - returns) ** 2, (values - returns) ** 2)
    else:
        loss = (values - returns) ** 2
    mask = action_mask
    if token_level_loss:
        denominator = mask.sum() if batch_num_tokens is None else batch_num_tokens
        reduced = (torch.where(mask.bool(), loss, 0.0) * mask).sum() / denominator * dp_size
    else:
        counts = mask.sum(dim=-1)
        row_means = (loss * mask).sum(dim=-1) / (counts + 1e-8)
        row_kept = (counts > 0).float()
        denominator = row_kept.sum() if global_batch_size is None else global_batch_size
        reduced = (torch.where(row_kept.bool(), row_means, 0.0) * row_kept).sum() / denominator * dp_size
    return 0.5 * reduced


# --------------------------------------------------------------------------- regions, and verl's min-max clip


def token_region(v, o, r, clip_eps, variant="max", loss_type="squared", delta=1.0, band_closed=None) -> int:
    """Region code of one token: 0 inside the band (closed or open as in :func:`token_grad`), or no clipping;
    1 outside with the clipped branch strictly larger (every token outside for ``variant="clipped"``),
    where the gradient is zero; 2 outside otherwise (the unclipped branch larger or tied)."""
    if band_closed is None:
        band_closed = AUTOGRAD_BAND_CLOSED
    if clip_eps is None:
        return 0
    d = v - o
    outside = abs(d) > clip_eps if band_closed else abs(d) >= clip_eps
    if not outside:
        return 0
    if variant == "clipped":
        return 1
    v_clipped = o + min(max(d, -clip_eps), clip_eps)
    return 1 if _penalty(v_clipped - r, loss_type, delta) > _penalty(v - r, loss_type, delta) else 2


def _tie_share(x: float, other: float, wins: bool) -> float:
    """d max(x, other) / dx (or min, ``wins`` saying whether x is the one picked): 1, 0, or 1/2 on a tie."""
    return 0.5 if x == other else (1.0 if wins else 0.0)


def clip_by_value(x: float, lo: float, hi: float) -> tuple[float, float]:
    """``max(min(x, hi), lo)`` and its derivative in ``x`` with autograd's rule for ``torch.min`` and
    ``torch.max``: equal inputs share the gradient evenly. So ``x`` gets 1 strictly inside, 1/2 at
    ``x == hi`` (from the min) or ``x == lo`` (from the max), 1/4 at ``x == lo == hi``, 0 outside."""
    smaller = min(x, hi)
    d_smaller = _tie_share(x, hi, x < hi)
    clipped = max(smaller, lo)
    return clipped, d_smaller * _tie_share(smaller, lo, smaller > lo)


def token_loss_min_max(v, r, lo, hi) -> float:
    """The per-token loss ``max((clip_by_value(v, lo, hi) - r)^2, (v - r)^2)``; verl's form has
    ``lo = old - eps`` and ``hi = old + eps``."""
    v_clipped, _ = clip_by_value(v, lo, hi)
    return max((v_clipped - r) ** 2, (v - r) ** 2)


def token_grad_min_max(v, r, lo, hi) -> float:
    """d token_loss_min_max / d v: min-then-max tie splitting in the clip, ties of the outer max split in half."""
    v_clipped, d_clipped = clip_by_value(v, lo, hi)
    unclipped, clipped = (v - r) ** 2, (v_clipped - r) ** 2
    slope_unclipped, slope_clipped = 2.0 * (v - r), 2.0 * (v_clipped - r) * d_clipped
    if unclipped > clipped:
        return slope_unclipped
    if clipped > unclipped:
        return slope_clipped
    return 0.5 * (slope_clipped + slope_unclipped)


def grad_loops_min_max(values, old_values, returns, mask=None, *, clip_eps, mode="token-mean", scale=0.5,
                       **counts) -> torch.Tensor:
    """d loss / d values of ``scale * aggregate(token_loss_min_max)`` with the band ``[old - eps, old + eps]``,
    as a float64 tensor of the values' shape."""
    V, O, R = _rows(values), _rows(old_values), _rows(returns)
    M = _rows(mask) if mask is not None else [[1.0] * len(row) for row in V]
    W = weights_loops(M, mode, **counts)
    out = []
    for vr, orow, rr, wr, mr in zip(V, O, R, W, M):
        out.append([scale * w * token_grad_min_max(v, r, o - clip_eps, o + clip_eps) if m != 0 else 0.0
                    for v, o, r, w, m in zip(vr, orow, rr, wr, mr)])
    return torch.tensor(out, dtype=torch.float64).reshape(values.shape)


def on_band_edge(v, o, clip_eps) -> bool:
    """Whether ``v`` sits exactly on an edge of the band around ``o``: ``v == o - eps`` or ``v == o + eps``."""
    return v == o - clip_eps or v == o + clip_eps
