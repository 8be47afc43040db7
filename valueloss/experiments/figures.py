"""Figures of notebooks 05 and 06 (matplotlib only): every function takes ``ax=None`` and returns the Axes.

Colours are the Okabe-Ito palette (colour-blind safe); the IQM and its bands come from
:mod:`valueloss.experiments.stats`. The PPO figures draw notebook 06's 2x2 design so that each factor reads
off one property of a line: the colour says whether the value loss is clipped, the line style (and the
marker) whether the rewards are scaled (:func:`condition_styles`). Figures are at most 11 inches wide, so
that at 100 dpi they fit a 1280-pixel-wide window.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.axes import Axes

from .results import curve_matrix, final_scores, runs_by_condition

__all__ = [
    "OKABE_ITO", "condition_styles", "key_figure", "plot_toy_curves", "plot_learning_curves", "plot_final_scores"
]

#: Okabe & Ito (2008) colour-blind-safe colours: blue, orange, bluish green, vermillion, reddish purple, sky blue.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9")
_STYLES = ("-", "--", "-.", ":")
#: Colour of each value-clipping setting, no clipping first: blue, vermillion, then bluish green, reddish purple.
CLIP_COLORS = (OKABE_ITO[0], OKABE_ITO[3], OKABE_ITO[2], OKABE_ITO[4])
#: Line style and marker of raw (False) and scaled (True) rewards.
SCALING_STYLES = {False: "-", True: "--"}
SCALING_MARKERS = {False: "o", True: "s"}


def condition_styles(results: dict) -> dict[str, dict]:
    """Colour, line style and marker of each condition of a PPO results file, keyed by its label.

    The colour encodes ``value_clip_eps`` (no clipping first, then the clip ranges in increasing order), the
    line style and marker encode ``reward_scaling`` (solid and circles: raw rewards; dashed and squares:
    scaled), so that in a 2x2 grid the two lines of one colour differ only in the other factor.
    """
    groups = runs_by_condition(results)
    configs = {label: runs[0]["config"] for label, runs in groups.items()}
    clip_values = sorted({c["value_clip_eps"] for c in configs.values()}, key=lambda x: (x is not None, x or 0.0))
    return {
        label: {
            "color": CLIP_COLORS[clip_values.index(c["value_clip_eps"]) % len(CLIP_COLORS)],
            "linestyle": SCALING_STYLES[bool(c["reward_scaling"])],
            "marker": SCALING_MARKERS[bool(c["reward_scaling"])],
        }
        for label, c in configs.items()
    }


def _axes(ax: Axes | None) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.0), layout="constrained")[1]


def plot_toy_curves(
    curves_by_label: Mapping[str, Mapping[str, np.ndarray]],
    key: str = "relative_error",
    *,
    threshold: float | None = None,
    log_y: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """One line per run of :func:`~valueloss.experiments.run_toy_critic`: ``key`` against the iteration.

    Args:
        curves_by_label: legend label -> the dict returned by ``run_toy_critic``.
        key: ``"relative_error"``, ``"explained_variance"`` or ``"clip_fraction"``.
        threshold: draw a horizontal dotted line there (e.g. the 5% target of the relative error).
        log_y: logarithmic y axis (only for ``relative_error``).
    """
    ax = _axes(ax)
    for i, (label, curves) in enumerate(curves_by_label.items()):
        y = np.asarray(curves[key])
        ax.plot(np.arange(len(y)), y, color=OKABE_ITO[i % len(OKABE_ITO)], linestyle=_STYLES[i % 4], label=label)
    if threshold is not None:
        ax.axhline(threshold, color="0.4", linestyle=":", linewidth=1, label=f"target {threshold:g}")
    if log_y and key == "relative_error":
        ax.set_yscale("log")
    names = {"relative_error": "relative error ||v - R|| / ||R - mean R||",
             "explained_variance": "explained variance", "clip_fraction": "clip fraction (zero-gradient share)"}
    ax.set(xlabel="PPO iteration (old values refreshed)", ylabel=names.get(key, key), title=title or key)
    ax.legend(fontsize="small")
    return ax


def plot_learning_curves(
    results: dict,
    key: str = "episodic_return",
    *,
    reps: int = 1000,
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """IQM over seeds of a PPO curve against environment steps, one line per condition, with 95% bands.

    The bands are pointwise percentile bootstrap intervals over seeds
    (:func:`~valueloss.experiments.stats.curve_iqm_ci`). Colour: value clipping; line style: reward
    scaling (:func:`condition_styles`).
    """
    from . import stats  # scipy.stats, imported when a figure needs it (plot_toy_curves does not)

    ax = _axes(ax)
    styles = condition_styles(results)
    for label, runs in runs_by_condition(results).items():
        steps = curve_matrix(runs, "global_step")[0]
        matrix = curve_matrix(runs, key)
        keep = np.all(np.isfinite(matrix), axis=0)  # e.g. before the first finished episode
        center, low, high = stats.curve_iqm_ci(matrix[:, keep], reps=reps)
        color, linestyle = styles[label]["color"], styles[label]["linestyle"]
        ax.plot(steps[keep], center, color=color, linestyle=linestyle, linewidth=1.6, label=f"{label} (n={len(runs)})")
        ax.fill_between(steps[keep], low, high, color=color, alpha=0.15, linewidth=0)
    ax.set(xlabel="environment steps", ylabel=f"{key.replace('_', ' ')} (IQM over seeds)",
           title=title or f"{key.replace('_', ' ')}: IQM and 95% bootstrap band")
    ax.legend(fontsize="small")
    return ax


def plot_final_scores(
    results: dict,
    key: str = "episodic_return",
    *,
    last_fraction: float = 0.1,
    reps: int = 2000,
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Final-score IQM per condition with its 95% stratified bootstrap CI (bars), and every seed (x).

    Colour: value clipping; marker and bar style: reward scaling (:func:`condition_styles`).
    """
    from . import stats  # scipy.stats, imported when a figure needs it (plot_toy_curves does not)

    ax = _axes(ax)
    groups = runs_by_condition(results)
    styles = condition_styles(results)
    labels = []
    for i, (label, runs) in enumerate(groups.items()):
        scores = final_scores(runs, key, last_fraction)
        estimate, low, high = stats.stratified_bootstrap_ci(scores, reps=reps)
        color = styles[label]["color"]
        bar = ax.errorbar([estimate], [i], xerr=[[estimate - low], [high - estimate]], fmt=styles[label]["marker"],
                          color=color, capsize=4, markersize=8, label="IQM and 95% CI" if i == 0 else None)
        bar[2][0].set_linestyle(styles[label]["linestyle"])
        ax.plot(scores, np.full(len(scores), i + 0.2), "x", color=color, alpha=0.7,
                label="one seed" if i == 0 else None)
        labels.append(f"{label}\nIQM {estimate:.0f} [{low:.0f}, {high:.0f}]")
    ax.set_yticks(range(len(groups)), labels)
    ax.set_ylim(len(groups) - 0.5, -0.5)
    ax.set(xlabel=f"final {key.replace('_', ' ')} (last {last_fraction:.0%} of training)",
           title=title or "final return: IQM with 95% CI (bars), seeds (x)")
    ax.legend(fontsize="small", loc="best")
    return ax


def key_figure(results: dict, *, reps: int = 1000):
    """The README figure: learning curves (left) and final-return IQM with CIs (right), as a Figure."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11.0, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=(1.3, 1.0))
    num_seeds = len({run["seed"] for run in results["runs"]})
    steps = int(results["runs"][0]["config"]["total_timesteps"])
    plot_learning_curves(results, reps=reps, ax=left,
                         title=f"PPO on CartPole-v1, {num_seeds} seeds, {steps} steps: return (IQM, 95% band)")
    left.legend(fontsize="small", title="colour: value clipping; line: rewards", title_fontsize="small")
    plot_final_scores(results, reps=2 * reps, ax=right, title="final return: IQM, 95% bootstrap CI, seeds (x)")
    return figure
