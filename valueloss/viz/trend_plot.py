"""The figure of clipping over a run (``valueloss inspect DIR --plot out.png``, notebook 08).

matplotlib is imported here, never by :mod:`valueloss.batch`; every number comes from the
:class:`~valueloss.batch.trend.Trend`. Colours are Okabe-Ito (colour-blind safe).
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from ..batch.trend import Trend

__all__ = ["plot_trend"]

COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00")


def plot_trend(trend: Trend, path: str | os.PathLike | None = None) -> Figure:
    """Three panels over the recorded steps: clipping, the critic's fit, and the ``clip_eps`` range for the target.

    * left: clip fraction and share outside the band (in %);
    * middle: the loss with and without clipping, and the explained variance (right axis);
    * right: the ``clip_eps`` interval giving the target clip fraction at each step, and the ``clip_eps`` measured.

    Returns the Figure (not registered with pyplot); with ``path``, also saves it as an image there.
    """
    if not isinstance(trend, Trend):
        raise TypeError(f"trend must be a Trend (from inspect_directory); got {type(trend).__name__}")
    steps = trend.column("step")
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    ax_clip, ax_loss, ax_eps = fig.subplots(1, 3)

    ax_clip.plot(steps, 100 * trend.column("clip_fraction"), "o-", color=COLORS[0],
                 label="clip fraction (zero gradient)")
    ax_clip.plot(steps, 100 * trend.column("outside_band_fraction"), "s--", color=COLORS[1], label="outside the band")
    ax_clip.set(xlabel="step", ylabel="share of unmasked tokens (%)", title=f"Clipping at clip_eps={trend.clip_eps:g}")
    ax_clip.set_ylim(bottom=0)
    ax_clip.legend()

    ax_loss.plot(steps, trend.column("loss"), "o-", color=COLORS[0], label="loss (clipped)")
    ax_loss.plot(steps, trend.column("loss_unclipped"), "s--", color=COLORS[1], label="loss without clipping")
    ax_loss.set(xlabel="step", ylabel=f"value loss ({trend.mode})", title="The critic's fit")
    ax_ev = ax_loss.twinx()
    ax_ev.plot(steps, trend.column("explained_variance"), "^:", color=COLORS[2], label="explained variance")
    ax_ev.set_ylabel("explained variance")
    handles = ax_loss.get_legend_handles_labels()[0] + ax_ev.get_legend_handles_labels()[0]
    ax_loss.legend(handles, [h.get_label() for h in handles])

    low, high = trend.target_clip_fraction
    suggested = trend.column("suggested_clip_eps").reshape(-1, 2)
    ax_eps.fill_between(steps, suggested[:, 0], suggested[:, 1], color=COLORS[3], alpha=0.35,
                        label=f"clip_eps giving {100 * low:.0f}-{100 * high:.0f}% clipped")
    ax_eps.axhline(trend.clip_eps, color="black", linestyle="--", label=f"clip_eps={trend.clip_eps:g} (measured)")
    ax_eps.set(xlabel="step", ylabel="clip_eps (units of the returns)", title="Which clip_eps hits the target")
    ax_eps.set_ylim(bottom=0)
    ax_eps.legend()
    fig.suptitle(f"Value clipping over the run: {Path(trend.directory).name or trend.directory}")
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
