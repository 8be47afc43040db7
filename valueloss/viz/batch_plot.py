"""The figure of a batch report (``valueloss inspect BATCH --plot out.png``, notebook 08).

matplotlib is imported here, never by :mod:`valueloss.batch`; the numbers all come from the
:class:`~valueloss.batch.InspectReport`. Colours are Okabe-Ito (colour-blind safe).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..batch.report import POSITION_BINS, InspectReport

__all__ = ["plot_report"]


def plot_report(report: InspectReport, path: str | os.PathLike | None = None) -> Figure:
    """A 2x2 figure: histogram of ``(v - old)/clip_eps``, clip fraction vs ``clip_eps``, by position, per sequence.

    Args:
        report: an :class:`~valueloss.batch.InspectReport` from :func:`~valueloss.batch.inspect_batch`.
        path: where to save a PNG, or None.

    Returns the Figure (not registered with pyplot, so saving it needs no backend and changes none).
    """
    if not isinstance(report, InspectReport):
        raise TypeError(f"report must be an InspectReport (from inspect_batch); got {type(report).__name__}")
    colors = ("#0072B2", "#D55E00", "#009E73", "#CC79A7")  # Okabe-Ito, colour-blind safe
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    ax_hist, ax_curve, ax_pos, ax_seq = fig.subplots(2, 2).flatten()

    data = np.asarray(report.normalized_delta)
    limit = max(3.0, float(np.percentile(np.abs(data), 99.5))) if data.size else 3.0
    bins = np.linspace(-limit, limit, 61)
    ax_hist.hist(np.clip(data, -limit, limit), bins=bins, color=colors[0], label="unmasked tokens")
    for x in (-1, 1):
        ax_hist.axvline(x, color=colors[1], linestyle="--", label="clip band" if x == 1 else None)
    ax_hist.set_xlabel(r"$(v - v_{old}) / \epsilon$")
    ax_hist.set_ylabel("tokens")
    ax_hist.set_title(f"Value drift in units of clip_eps = {report.clip_eps:g}")
    ax_hist.legend()

    ax_curve.plot(report.curve_clip_eps, report.curve_clip_fraction, color=colors[0], label="clip fraction")
    ax_curve.axvline(report.clip_eps, color=colors[1], linestyle="--", label=f"clip_eps = {report.clip_eps:g}")
    low, high = report.suggested_clip_eps
    ax_curve.axvspan(low, high, color=colors[2], alpha=0.25, label="suggested range")
    ax_curve.set_xlabel(r"clip_eps $\epsilon$")
    ax_curve.set_ylabel("share of tokens with zero gradient")
    t_low, t_high = report.target_clip_fraction
    ax_curve.set_title(f"Clip fraction vs clip_eps (target {t_low:g}-{t_high:g})")
    ax_curve.legend()

    centers = (np.arange(POSITION_BINS) + 0.5) / POSITION_BINS
    ax_pos.bar(centers, report.clip_fraction_by_position, width=0.9 / POSITION_BINS, color=colors[3],
               label="clip fraction")
    ax_pos.set_xlabel("relative position in the response")
    ax_pos.set_ylabel("clip fraction")
    ax_pos.set_title(f"Where in the response gradients die (clip_eps = {report.clip_eps:g})")
    ax_pos.legend()

    index = [s.index for s in report.sequences]
    ax_seq.bar(index, [s.clip_fraction for s in report.sequences], color=colors[1], label="clipped (zero gradient)")
    ax_seq.bar(index, [s.outside_unclipped / max(s.tokens, 1) for s in report.sequences],
               bottom=[s.clip_fraction for s in report.sequences], color=colors[0], label="outside band, live")
    ax_seq.set_xlabel("sequence")
    ax_seq.set_ylabel("share of its tokens")
    ax_seq.set_title(f"Per sequence (mode = {report.mode})")
    ax_seq.legend()
    fig.suptitle(f"valueloss inspect: {Path(report.source).name}")
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
