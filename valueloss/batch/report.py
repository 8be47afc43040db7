"""What value clipping does to *your* batch: the report behind ``valueloss inspect``.

:func:`inspect_batch` turns a validated :class:`~valueloss.batch.Batch` into an :class:`InspectReport`;
:func:`format_report` prints it (``valueloss inspect BATCH``); :func:`valueloss.viz.batch_plot.plot_report`
draws it. Every loss number and every region flag comes from the package's one copy of the math, on
float64 tensors: the six headline numbers (loss, loss without clipping, clip fraction, share outside the
band, explained variance, mean absolute error) are :func:`valueloss.diagnose`'s, and the per-token flags
behind the breakdowns by sequence and by position (which tokens are clipped, which are outside the band
but still trained) are :func:`valueloss.functional.clip_regions`'. So the band's edges are the installed
torch's (:data:`valueloss.functional.BAND_CLOSED`: closed up to torch 2.13, open from 2.14).

The suggested ``clip_eps`` range comes from a closed form: with ``d = v - old`` and
``r = R - old``, a token's gradient is killed by the ``max`` form exactly when
``clip_eps < min(|d|, sign(d) * (2 r - d))`` (for ``variant="clipped"``: when ``clip_eps < |d|``),
with either band convention (on an open band's edge ``v`` is its own clipped value: a tie, still trained).
So the clip fraction as a function of ``clip_eps`` is the survival function of these per-token
thresholds (:func:`clip_thresholds`), and a target clip fraction maps to a quantile.

>>> import numpy as np
>>> from valueloss.batch import validate_batch
>>> batch = validate_batch({"values": np.array([0.5, 0.1]), "old_values": np.zeros(2), "returns": np.ones(2)})
>>> report = inspect_batch(batch, clip_eps=0.2)
>>> report.clip_fraction, report.outside_band_fraction, round(report.loss, 6)
(0.5, 0.5, 0.3625)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from ..diagnostics import diagnose
from ..functional import LossConfig, Region, clip_regions
from .io import Batch

__all__ = [
    "HISTOGRAM_EDGES",
    "POSITION_BINS",
    "InspectReport",
    "SequenceStats",
    "clip_fraction_curve",
    "clip_thresholds",
    "format_report",
    "inspect_batch",
    "suggest_clip_eps",
]

HISTOGRAM_EDGES = (-math.inf, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, math.inf)
"""Bin edges of the histogram of ``(values - old_values) / clip_eps``; bins are ``[lo, hi)`` as printed.

With a closed band ``[-1, 1]`` (torch <= 2.13, :data:`valueloss.functional.BAND_CLOSED`) a token exactly at
``+clip_eps`` is inside the band but counted in ``[+1.0, +1.5)``."""
POSITION_BINS = 10


# --------------------------------------------------------------------------- checks of the arguments


def _check_target(target: object, name: str) -> tuple[float, float]:
    """``target`` as ``(low, high)`` floats with ``0 <= low <= high <= 1``, or a ValueError naming ``name``."""
    try:
        low, high = (float(x) for x in target)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high) of fractions in [0, 1]; got {target!r}") from None
    if not 0 <= low <= high <= 1:
        raise ValueError(f"{name} must be (low, high) with 0 <= low <= high <= 1; got {target!r}")
    return low, high


def _float64(*arrays: object) -> list[np.ndarray]:
    """The arrays (NumPy, or CPU torch tensors) in float64, checked to share one shape (never broadcast)."""
    out = [np.asarray(a, dtype=np.float64) for a in arrays]
    if any(a.shape != out[0].shape for a in out):
        raise ValueError(f"values, old_values and returns must have the same shape; got {[a.shape for a in out]}")
    return out


# --------------------------------------------------------------------------- choosing clip_eps


def clip_thresholds(values: object, old_values: object, returns: object, *, variant: str = "max") -> np.ndarray:
    """Per token, the largest ``clip_eps`` at which clipping kills its gradient (0 if it never does).

    For the squared loss with ``variant="max"``: ``t = max(0, min(|d|, sign(d) * (2 r - d)))`` with
    ``d = values - old_values`` and ``r = returns - old_values``; the token is in
    :attr:`valueloss.Region.CLIPPED` exactly when ``clip_eps < t``. For ``variant="clipped"``:
    ``t = |d|``. Inputs are NumPy arrays (or CPU tensors) of one shape; the result is float64.

    >>> clip_thresholds(np.array([0.5, 0.5, -0.1]), np.zeros(3), np.array([1.0, 0.3, 0.0]))
    array([0.5, 0.1, 0. ])
    """
    variant = LossConfig(variant=variant).variant  # checked as the loss checks it
    values, old_values, returns = _float64(values, old_values, returns)
    delta = values - old_values
    if variant == "clipped":
        return np.abs(delta)
    residual = returns - old_values
    threshold = np.minimum(np.abs(delta), np.sign(delta) * (2 * residual - delta))
    return np.maximum(threshold, 0.0)


def clip_fraction_curve(thresholds: object, clip_eps: object) -> np.ndarray:
    """Clip fraction at each ``clip_eps``: the share of ``thresholds`` strictly above it (float64).

    >>> clip_fraction_curve(np.array([0.0, 0.1, 0.3, 0.5]), [0.0, 0.1, 0.4])
    array([0.75, 0.5 , 0.25])
    """
    ordered = np.sort(np.asarray(thresholds, dtype=np.float64).ravel())
    above = ordered.size - np.searchsorted(ordered, np.asarray(clip_eps, dtype=np.float64), side="right")
    return above / max(ordered.size, 1)


def suggest_clip_eps(thresholds: object, target: tuple[float, float] = (0.05, 0.15)) -> tuple[float, float]:
    """The ``clip_eps`` interval whose clip fraction lies in ``target = (low, high)``.

    The clip fraction falls as ``clip_eps`` grows, so the low end of the returned interval gives
    the ``high`` fraction and vice versa. Uses quantiles of :func:`clip_thresholds` (linear
    interpolation, as ``numpy.quantile`` and ``torch.quantile`` by default). A returned bound of 0.0
    means even ``clip_eps -> 0`` does not reach that fraction (too few tokens ever clip).
    """
    low, high = _check_target(target, "target")
    flat = np.asarray(thresholds, dtype=np.float64).ravel()
    if not flat.size:
        return 0.0, 0.0
    return float(np.quantile(flat, 1 - high)), float(np.quantile(flat, 1 - low))


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class SequenceStats:
    """Where the gradients die in one sequence."""

    index: int
    tokens: int
    clipped: int
    """Tokens in :attr:`Region.CLIPPED` (gradient exactly zero)."""
    outside_unclipped: int
    """Tokens in :attr:`Region.UNCLIPPED`: outside the band, but the gradient stays live."""
    clip_fraction: float
    first_clipped_position: int | None
    """Position (column) of the first clipped token, or None."""


@dataclass(frozen=True)
class InspectReport:
    """Everything ``valueloss inspect`` reports; :meth:`to_dict` is the JSON form."""

    source: str
    shape: tuple[int, ...]
    dtype: str
    clip_eps: float
    mode: str
    num_sequences: int
    num_nonempty_sequences: int
    num_tokens: int
    tokens_per_sequence: dict[str, float]
    loss: float
    loss_unclipped: float
    clip_fraction: float
    outside_band_fraction: float
    explained_variance: float
    mean_abs_error: float
    histogram_edges: list[float]
    histogram_counts: list[int]
    clip_fraction_by_position: list[float]
    """Clip fraction in each tenth of the responses (relative position 0-10%, ..., 90-100%)."""
    sequences: list[SequenceStats]
    suggested_clip_eps: tuple[float, float]
    target_clip_fraction: tuple[float, float]
    ignored_keys: tuple[str, ...] = ()
    had_mask: bool = True
    curve_clip_eps: list[float] = field(default_factory=list, repr=False)
    curve_clip_fraction: list[float] = field(default_factory=list, repr=False)
    normalized_delta: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)
    """``(values - old_values) / clip_eps`` at unmasked tokens, float64 (for plots; not in the JSON)."""

    def to_dict(self, top: int | None = None) -> dict[str, object]:
        """The report as strict-JSON-ready Python values.

        ``sequences`` lists every sequence in index order, or with ``top`` only the ``top`` with the highest
        clip fraction (in that order, as :func:`format_report` lists them). Non-finite numbers become
        ``None`` (JSON's null), except the infinite histogram edges, which become the strings ``"-inf"``
        and ``"inf"``; so ``json.dumps(report.to_dict(), allow_nan=False)`` never fails.
        """
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "normalized_delta"}
        sequences = self.sequences if top is None else _worst(self.sequences, _check_top(top))
        out["sequences"] = [asdict(s) for s in sequences]
        out["histogram_edges"] = [e if math.isfinite(e) else ("inf" if e > 0 else "-inf") for e in self.histogram_edges]
        out["shape"] = list(self.shape)
        out["suggested_clip_eps"] = list(self.suggested_clip_eps)
        out["target_clip_fraction"] = list(self.target_clip_fraction)
        out["ignored_keys"] = list(self.ignored_keys)
        return _finite_or_none(out)


def _finite_or_none(obj: object) -> object:
    """``obj`` with every non-finite float (NaN, inf) replaced by None, through dicts and lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(value) for value in obj]
    return obj


def _check_top(top: object) -> int:
    if isinstance(top, bool) or not isinstance(top, numbers.Integral) or top < 0:
        raise ValueError(f"top must be a non-negative integer (sequences to list); got {top!r}")
    return int(top)


def _worst(sequences: list[SequenceStats], top: int | None) -> list[SequenceStats]:
    """The ``top`` sequences with the highest clip fraction (ties: lower index first); all with None."""
    ordered = sorted(sequences, key=lambda s: (-s.clip_fraction, s.index))
    return ordered if top is None else ordered[:top]


def _sequence_stats(clipped: np.ndarray, outside_live: np.ndarray, lengths: np.ndarray) -> list[SequenceStats]:
    clipped_counts = clipped.sum(axis=1)
    live_counts = outside_live.sum(axis=1)
    first = clipped.argmax(axis=1)
    return [
        SequenceStats(
            index=i,
            tokens=int(n),
            clipped=int(c),
            outside_unclipped=int(live),
            clip_fraction=int(c) / int(n) if n else 0.0,
            first_clipped_position=int(f) if c else None,
        )
        for i, (n, c, live, f) in enumerate(zip(lengths, clipped_counts, live_counts, first))
    ]


def _clip_fraction_by_position(mask: np.ndarray, clipped: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Clip fraction per tenth of the responses; a token's relative position is its rank / its row's count."""
    rank = np.cumsum(mask, axis=1) - 1
    relative = rank / np.maximum(lengths, 1)[:, None]
    position_bin = np.minimum((relative * POSITION_BINS).astype(np.int64), POSITION_BINS - 1)[mask]
    per_bin_tokens = np.bincount(position_bin, minlength=POSITION_BINS).astype(np.float64)
    per_bin_clipped = np.bincount(position_bin, weights=clipped[mask].astype(np.float64), minlength=POSITION_BINS)
    return np.where(per_bin_tokens > 0, per_bin_clipped / np.maximum(per_bin_tokens, 1), 0.0)


def inspect_batch(
    batch: Batch,
    *,
    clip_eps: float = 0.2,
    mode: str = "token-mean",
    variant: str = "max",
    target_clip_fraction: tuple[float, float] = (0.05, 0.15),
) -> InspectReport:
    """Compute the :class:`InspectReport` of a validated batch (see the module docstring).

    ``loss``, ``loss_unclipped``, ``clip_fraction``, ``outside_band_fraction``, ``explained_variance``
    and ``mean_abs_error`` are :func:`valueloss.diagnose`'s (squared loss, ``scale=0.5``) on the batch
    as float64 tensors; the per-token flags are :func:`valueloss.functional.clip_regions`'. Masked-out
    tokens are zeroed first, so NaN/inf in the padding never reach a number.
    """
    if not isinstance(batch, Batch):
        raise TypeError(
            f"batch must be a valueloss.batch.Batch (from load_batch or validate_batch); got {type(batch).__name__}"
        )
    if isinstance(clip_eps, bool) or not isinstance(clip_eps, numbers.Real) or not 0 < float(clip_eps) < math.inf:
        raise ValueError(f"clip_eps must be a positive number to inspect clipping; got {clip_eps!r}")
    clip_eps = float(clip_eps)
    config = LossConfig(clip_eps=clip_eps, mode=mode, variant=variant)  # checks mode and variant as the loss does
    target_clip_fraction = _check_target(target_clip_fraction, "target_clip_fraction")
    mask = np.asarray(batch.action_mask, dtype=bool)
    arrays = _float64(batch.values, batch.old_values, batch.returns)
    if mask.ndim != 2 or arrays[0].shape != mask.shape:
        raise ValueError(
            f"values and action_mask must have the same shape (B, T); got {arrays[0].shape} and {mask.shape}"
        )
    if not mask.any():
        raise ValueError("action_mask selects no token; nothing to inspect")

    # The math, once: diagnose for the reported numbers, clip_regions for each token (float64 CPU copies).
    keep = torch.tensor(mask, device="cpu")
    values, old_values, returns = (torch.where(keep, torch.tensor(a, device="cpu"), 0.0) for a in arrays)
    stats = diagnose(values, old_values, returns, keep, config).to_dict()
    regions = clip_regions(values, old_values, returns, config).numpy()
    clipped = mask & (regions == Region.CLIPPED)
    outside_live = mask & (regions == Region.UNCLIPPED)
    values, old_values, returns = (t.numpy() for t in (values, old_values, returns))

    normalized = ((values - old_values) / clip_eps)[mask]
    inner_edges = np.asarray(HISTOGRAM_EDGES[1:-1])
    counts = np.bincount(np.searchsorted(inner_edges, normalized, side="right"), minlength=len(HISTOGRAM_EDGES) - 1)

    lengths = mask.sum(axis=1)
    thresholds = clip_thresholds(values, old_values, returns, variant=variant)[mask]
    suggestion = suggest_clip_eps(thresholds, target_clip_fraction)
    top = max(float(thresholds.max()), 2 * clip_eps, 1e-6)
    curve_eps = np.linspace(0, top, 201)
    curve = clip_fraction_curve(thresholds, curve_eps)

    nonempty = np.sort(lengths[lengths > 0])
    return InspectReport(
        source=batch.source,
        shape=tuple(mask.shape),
        dtype=batch.dtype,
        clip_eps=clip_eps,
        mode=mode,
        num_sequences=int(mask.shape[0]),
        num_nonempty_sequences=int(nonempty.size),
        num_tokens=int(mask.sum()),
        tokens_per_sequence={
            "min": float(nonempty[0]),
            "median": float(nonempty[(nonempty.size - 1) // 2]),  # the lower middle value, as torch.median
            "max": float(nonempty[-1]),
        },
        loss=stats["loss"],
        loss_unclipped=stats["loss_unclipped"],
        clip_fraction=stats["clip_fraction"],
        outside_band_fraction=stats["outside_band_fraction"],
        explained_variance=stats["explained_variance"],
        mean_abs_error=stats["mean_abs_error"],
        histogram_edges=list(HISTOGRAM_EDGES),
        histogram_counts=[int(c) for c in counts],
        clip_fraction_by_position=[float(x) for x in _clip_fraction_by_position(mask, clipped, lengths)],
        sequences=_sequence_stats(clipped, outside_live, lengths),
        suggested_clip_eps=suggestion,
        target_clip_fraction=target_clip_fraction,
        ignored_keys=batch.ignored_keys,
        had_mask=batch.had_mask,
        curve_clip_eps=curve_eps.tolist(),
        curve_clip_fraction=curve.tolist(),
        normalized_delta=normalized,
    )


# --------------------------------------------------------------------------- text


def _edge(e: float) -> str:
    return "-inf" if e == -math.inf else ("+inf" if e == math.inf else f"{e:+.1f}")


def format_report(report: InspectReport, *, top: int | None = 8) -> str:
    """The human-readable report printed by ``valueloss inspect`` (``top`` sequences listed; None: all)."""
    if not isinstance(report, InspectReport):
        raise TypeError(f"report must be an InspectReport (from inspect_batch); got {type(report).__name__}")
    if top is not None:
        top = _check_top(top)
    lines = []
    add = lines.append
    add(f"valueloss inspect: {report.source}")
    tps = report.tokens_per_sequence
    add(
        f"  batch       shape {tuple(report.shape)} {report.dtype}; {report.num_sequences} sequences "
        f"({report.num_nonempty_sequences} non-empty), {report.num_tokens} tokens "
        f"(per sequence min {tps['min']:.0f} / median {tps['median']:.0f} / max {tps['max']:.0f})"
    )
    if not report.had_mask:
        add("  note        no action_mask in the file: every position counts")
    if report.ignored_keys:
        add(f"  note        ignored keys: {', '.join(report.ignored_keys)}")
    add(f"  settings    clip_eps={report.clip_eps:g}, mode={report.mode}")
    add(f"  loss        {report.loss:.6f} clipped   {report.loss_unclipped:.6f} unclipped")
    add(
        f"  clipping    {100 * report.clip_fraction:.2f}% of tokens have zero gradient (clip fraction); "
        f"{100 * report.outside_band_fraction:.2f}% are outside the band"
    )
    add(f"  critic      explained variance {report.explained_variance:.4f}, mean |values - returns| "
        f"{report.mean_abs_error:.4f}")
    add("")
    add("  (values - old_values) / clip_eps over unmasked tokens (band = [-1, +1]):")
    total = max(sum(report.histogram_counts), 1)
    widest = max(report.histogram_counts) or 1
    edges = report.histogram_edges
    for i, count in enumerate(report.histogram_counts):
        label = f"[{_edge(edges[i])}, {_edge(edges[i + 1])})"
        bar = "#" * round(40 * count / widest)
        add(f"    {label:>14} {count:7d} {100 * count / total:6.2f}%  {bar}".rstrip())
    add("")
    add("  clip fraction by position in the response (each tenth, start -> end):")
    add("    " + " ".join(f"{100 * x:5.1f}" for x in report.clip_fraction_by_position) + "  (%)")
    add("")
    worst = _worst(report.sequences, top)
    add(f"  where gradients die (top {len(worst)} of {report.num_sequences} sequences by clip fraction):")
    add("    seq  tokens  clipped  outside-live  clip%  first clipped at")
    for s in worst:
        first = "-" if s.first_clipped_position is None else str(s.first_clipped_position)
        add(f"    {s.index:3d}  {s.tokens:6d}  {s.clipped:7d}  {s.outside_unclipped:12d}  "
            f"{100 * s.clip_fraction:5.1f}  {first}")
    without = sum(1 for s in report.sequences if s.clipped == 0 and s.tokens > 0)
    add(f"    {without} non-empty sequence(s) have no clipped token")
    add("")
    low, high = report.suggested_clip_eps
    t_low, t_high = report.target_clip_fraction
    add(
        f"  suggestion  clip_eps in [{low:.4g}, {high:.4g}] gives a clip fraction between "
        f"{100 * t_low:.0f}% and {100 * t_high:.0f}% on this batch"
    )
    return "\n".join(lines)
