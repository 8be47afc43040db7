"""A network's predictions escape the clip band: how far the toy critic's values move in one PPO iteration.

A token whose clipped value loss has zero gradient is not frozen. Its prediction still moves whenever the
optimiser changes the weights it shares with the other tokens, and a single step can carry it past the band
edge. So ``clip_eps`` removes a token's own pull once it has moved past the band towards its return; it does
not bound how far the prediction moves. This module measures that on the toy critic of notebook 05
(:mod:`valueloss.experiments.toy_critic`) and draws it for notebooks 03 and 05::

    from valueloss.experiments import ToyCriticConfig
    from valueloss.lessons import escape
    moves = escape.measure_escape(ToyCriticConfig(clip_eps=0.2))          # one PPO iteration
    moves.outside_fraction, moves.mean_move, moves.max_move             # share outside, distances in eps
    escape.plot_escape(ax, moves)                                        # ax in, Axes out
    escape.escape_explorer()                                             # sliders: learning rate, epochs

Imports matplotlib, and ipywidgets inside the explorer; ``import valueloss`` does not load this module.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .. import functional as F
from ..experiments.toy_critic import ToyCriticConfig, run_toy_critic
from ..functional import Region
from ..viz.plotting import COLORS, OKABE_ITO

__all__ = ["DOT_COLORS", "Escape", "EscapeExplorer", "escape_explorer", "escape_from_run", "measure_escape",
           "plot_escape"]

DOT_COLORS = {
    Region.INSIDE: OKABE_ITO["blue"],
    Region.CLIPPED: OKABE_ITO["vermillion"],
    Region.UNCLIPPED: OKABE_ITO["bluish_green"],
}
"""Colour of a prediction's dot by its region at the end of the iteration (as in notebook 03's region map)."""

_REGION_LABELS = {
    Region.INSIDE: "inside the band",
    Region.CLIPPED: "outside, towards R: own gradient now zero",
    Region.UNCLIPPED: "outside, gradient still live",
}


@dataclass(frozen=True)
class Escape:
    """Every prediction of a critic before and after one PPO iteration, against the band ``|v - v_old| <= eps``.

    Attributes:
        clip_eps: the clip range ``eps`` of the iteration (> 0), in the units of the returns.
        iteration: which PPO iteration (1 = the first).
        old_values, values, returns: ``(N,)`` float64, the predictions at the start and at the end of the
            iteration and the targets, in the units of the returns.
        label: a short description of the setting, used in titles.
    """

    clip_eps: float
    iteration: int
    old_values: np.ndarray
    values: np.ndarray
    returns: np.ndarray
    label: str = ""

    @property
    def moved(self) -> np.ndarray:
        """``(v - v_old) / eps``: how far each prediction moved, in units of ``clip_eps`` (signed)."""
        return (self.values - self.old_values) / self.clip_eps

    @property
    def outside(self) -> np.ndarray:
        """True where the prediction ended the iteration outside its band, ``|v - v_old| > eps``."""
        return np.abs(self.values - self.old_values) > self.clip_eps

    @property
    def outside_fraction(self) -> float:
        """The share of predictions outside their band at the end of the iteration."""
        return float(self.outside.mean())

    @property
    def mean_move(self) -> float:
        """The mean of ``|v - v_old| / eps`` over the predictions."""
        return float(np.abs(self.moved).mean())

    @property
    def max_move(self) -> float:
        """The largest ``|v - v_old| / eps``."""
        return float(np.abs(self.moved).max())

    @property
    def towards_fraction(self) -> float:
        """The share of predictions that moved towards their return (``v - v_old`` has the sign of ``R - v_old``)."""
        return float((np.sign(self.values - self.old_values) == np.sign(self.returns - self.old_values)).mean())

    @property
    def regions(self) -> np.ndarray:
        """The :class:`~valueloss.Region` of each prediction at the end of the iteration (int array)."""
        as_tensor = (torch.from_numpy(a) for a in (self.values, self.old_values, self.returns))
        return F.clip_regions(*as_tensor, clip_eps=self.clip_eps).numpy()


def _check_clip_eps(clip_eps) -> float:
    if clip_eps is None or isinstance(clip_eps, bool) or not isinstance(clip_eps, (int, float)) \
            or not (math.isfinite(clip_eps) and clip_eps > 0):
        raise ValueError(f"clip_eps must be a finite number > 0 (distances are measured in units of it); "
                         f"got {clip_eps!r}")
    return float(clip_eps)


def escape_from_run(curves: dict, clip_eps: float, iteration: int = 1, *, label: str = "") -> Escape:
    """The :class:`Escape` of one iteration of a toy-critic run made with ``run_toy_critic(..., keep_values=True)``.

    Args:
        curves: the run's result; needs its ``values`` ``(iterations + 1, N)`` and ``returns`` ``(N,)``.
        clip_eps: the band's half-width to measure against, > 0, in the units of the returns.
        iteration: 1 .. the run's number of iterations.
    """
    if "values" not in curves or "returns" not in curves:
        raise ValueError("curves has no 'values' and 'returns': run the toy critic with keep_values=True")
    values = np.asarray(curves["values"], dtype=np.float64)
    if isinstance(iteration, bool) or not isinstance(iteration, int) or not 1 <= iteration < len(values):
        raise ValueError(f"iteration must be an int in [1, {len(values) - 1}] (the run's iterations); "
                         f"got {iteration!r}")
    return Escape(_check_clip_eps(clip_eps), iteration, values[iteration - 1], values[iteration],
                  np.asarray(curves["returns"], dtype=np.float64), label)


def _describe(config: ToyCriticConfig) -> str:
    units = ", returns normalised" if config.normalize_returns else ""
    return (f"scale {config.scale:g}, $\\epsilon$ = {config.clip_eps:g}, lr {config.learning_rate:.2g}, "
            f"{config.update_epochs} epochs{units}")


def measure_escape(config: ToyCriticConfig | None = None, *, iteration: int = 1) -> Escape:
    """Train the toy critic for ``iteration`` PPO iterations and measure the last one.

    Args:
        config: the toy critic's settings; ``clip_eps`` must be a number > 0 (default: the toy critic's
            defaults, returns of spread 1, with ``clip_eps=0.2``). Its ``num_iterations`` is replaced by
            ``iteration``.
        iteration: the iteration to measure (1 = the first, from the freshly initialised critic).

    Returns:
        An :class:`Escape`, in the units of the returns the critic reports (with ``normalize_returns`` the band
        is ``clip_eps * scale`` wide in those units, as the critic trains on ``returns / scale``).

    Example:
        >>> moves = measure_escape(ToyCriticConfig(clip_eps=0.2, num_samples=32, hidden=8, update_epochs=2))
        >>> moves.values.shape, moves.iteration
        ((32,), 1)
    """
    config = ToyCriticConfig(clip_eps=0.2) if config is None else config
    if not isinstance(config, ToyCriticConfig):
        raise TypeError(f"config must be a ToyCriticConfig; got {type(config).__name__}")
    clip_eps = _check_clip_eps(config.clip_eps)
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 1:
        raise ValueError(f"iteration must be a positive int; got {iteration!r}")
    curves = run_toy_critic(config.replace(num_iterations=iteration), keep_values=True)
    band = clip_eps * config.scale if config.normalize_returns else clip_eps
    return escape_from_run(curves, band, iteration, label=_describe(config))


def plot_escape(ax: Axes | None = None, escape: Escape | None = None, *, legend: bool = True) -> Axes:
    """Where each prediction went in one PPO iteration: moved ``(v - v_old)/eps`` against ``R - v_old``.

    Each dot is one prediction, coloured by its region at the end of the iteration (as in notebook 03's
    region map); the shaded strip is the band ``|v - v_old| <= eps``. A dot outside the strip escaped its band.

    Args:
        ax: where to draw (a new figure when None).
        escape: what to draw (default: :func:`measure_escape` at its defaults).
        legend: draw the legend.

    Gids: ``valueloss.escape.band`` (the strip), ``valueloss.escape.{inside,clipped,unclipped}`` (the dots of
    each region; offsets are ``(moved, R - v_old)``).
    """
    escape = measure_escape() if escape is None else escape
    if ax is None:
        import matplotlib.pyplot as plt  # only when the caller asks us to make a figure

        _, ax = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
    elif not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes or None; got {type(ax).__name__}")
    g = "valueloss.escape."
    moved, offset, regions = escape.moved, escape.returns - escape.old_values, escape.regions
    ax.axvspan(-1.0, 1.0, color=COLORS["band"], alpha=0.3, lw=0, gid=g + "band",
               label=r"trust band $|v - v_{old}| \leq \epsilon$")
    for edge in (-1.0, 1.0):
        ax.axvline(edge, color=COLORS["band"], ls="--", lw=1.0)
    ax.axhline(0.0, color="0.6", lw=0.8)
    for region in (Region.INSIDE, Region.CLIPPED, Region.UNCLIPPED):
        chosen = regions == region
        ax.scatter(moved[chosen], offset[chosen], s=14, color=DOT_COLORS[region], alpha=0.85, lw=0,
                   gid=g + region.name.lower(), label=f"{_REGION_LABELS[region]} ({int(chosen.sum())})")
    reach = max(1.5, 1.1 * float(np.abs(moved).max()))
    ax.set_xlim(-reach, reach)
    ax.set_xlabel(r"how far the prediction moved, $(v - v_{old})\,/\,\epsilon$")
    ax.set_ylabel(r"where the return is, $R - v_{old}$")
    setting = f"toy critic, PPO iteration {escape.iteration}" + (f": {escape.label}" if escape.label else "")
    ax.set_title(f"{setting}\n{escape.outside_fraction:.0%} outside the band; moved {escape.mean_move:.1f}"
                 f"$\\epsilon$ on average, at most {escape.max_move:.1f}$\\epsilon$", fontsize="medium")
    if legend:
        ax.legend(loc="best", fontsize="small", framealpha=0.9)
    return ax


class EscapeExplorer:
    """Sliders for the learning rate and the epochs of one PPO iteration of the toy critic, over :func:`plot_escape`.

    The figure is a plain matplotlib ``Figure`` rendered into a PNG ``Image`` widget, so it works in any front
    end that shows widgets; each change re-trains one iteration (well under a second at the defaults).

    Attributes:
        learning_rate: ``FloatLogSlider`` (1e-4 .. 1e-1), Adam's step size.
        epochs: ``IntSlider`` (1 .. 20), passes over the batch in the iteration.
        figure, ax: the matplotlib Figure and its Axes (redrawn by :func:`plot_escape` on each change).
        escape: the :class:`Escape` the figure shows.
        summary: an ``HTML`` widget with the share outside the band and the distances moved.
    """

    def __init__(self, learning_rate: float = 3e-2, epochs: int = 10, *, base: ToyCriticConfig | None = None) -> None:
        import ipywidgets as widgets

        self.base = ToyCriticConfig(clip_eps=0.2) if base is None else base
        _check_clip_eps(self.base.clip_eps)
        slider = dict(continuous_update=False, style={"description_width": "initial"},
                      layout=widgets.Layout(width="360px"))
        self.learning_rate = widgets.FloatLogSlider(value=learning_rate, base=10, min=-4, max=-1, step=0.1,
                                                    description="learning rate", readout_format=".2g", **slider)
        self.epochs = widgets.IntSlider(value=epochs, min=1, max=20, step=1, description="epochs", **slider)
        self.summary = widgets.HTML()
        self.image = widgets.Image(format="png")
        self.figure = Figure(figsize=(7.0, 4.4), layout="constrained")
        self.ax = self.figure.add_subplot()
        self.escape: Escape | None = None
        for control in (self.learning_rate, self.epochs):
            control.observe(self.update, names="value")
        self.update()

    def config(self) -> ToyCriticConfig:
        """The toy critic's settings that the controls show."""
        return self.base.replace(learning_rate=float(self.learning_rate.value), update_epochs=int(self.epochs.value))

    def update(self, change: object = None) -> None:
        """Re-train one iteration at the controls' settings and redraw."""
        self.escape = measure_escape(self.config())
        self.ax.clear()
        plot_escape(self.ax, self.escape)
        self.summary.value = (
            f"after one iteration <b>{self.escape.outside_fraction:.0%}</b> of the predictions lie outside their "
            f"band; they moved <b>{self.escape.mean_move:.1f} &epsilon;</b> on average and at most "
            f"<b>{self.escape.max_move:.1f} &epsilon;</b>"
        )
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=80)
        self.image.value = buffer.getvalue()

    def widget(self):
        """The controls, the summary and the figure in one box."""
        import ipywidgets as widgets

        return widgets.VBox([widgets.HBox([self.learning_rate, self.epochs]), self.summary, self.image])


def escape_explorer(learning_rate: float = 3e-2, epochs: int = 10, *, base: ToyCriticConfig | None = None):
    """The explorer widget (one call in notebook 03); questions to try are in the notebook.

    Args:
        learning_rate, epochs: the starting values of the sliders.
        base: the other toy-critic settings (default: returns of spread 1, ``clip_eps=0.2``).
    """
    return EscapeExplorer(learning_rate, epochs, base=base).widget()
