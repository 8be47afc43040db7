"""An ipywidgets explorer of the toy critic: how reward scale and ``clip_eps`` set the critic's speed.

``toy_critic_explorer()`` returns a widget with sliders for the returns' scale and ``clip_eps`` (plus "no
clipping" and "normalise returns" switches) over a figure with the relative error and the clip fraction of
the chosen setting next to the unclipped baseline at the same scale. The figure is a plain matplotlib
``Figure`` rendered into a PNG ``Image`` widget, so it works in any front end that shows widgets.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import ipywidgets as widgets
from matplotlib.figure import Figure

from .figures import OKABE_ITO
from .toy_critic import ToyCriticConfig, iterations_to_reach, run_toy_critic

__all__ = ["ToyCriticExplorer", "toy_critic_explorer"]


class ToyCriticExplorer:
    """Controls, figure and the runs behind :func:`toy_critic_explorer` (attributes for tests and tinkering).

    Attributes:
        scale, clip_eps: ``FloatLogSlider`` of the returns' spread and ``FloatLogSlider`` of the clip range.
        no_clip, normalize: ``Checkbox`` es for ``clip_eps=None`` and ``normalize_returns=True``.
        figure: the matplotlib Figure; ``lines`` maps ``"error"``, ``"baseline_error"``, ``"clip_fraction"``
            to its Line2D artists.
        summary: an ``HTML`` widget with the iterations to the target error.

    Every setting is run once: moving back to a setting shown before redraws its stored run. ``runs`` hands
    in runs made elsewhere (``{config: run_toy_critic(config)}``, as notebook 05 does with its runs at
    scale 100), which are then shown without running them again.
    """

    def __init__(self, scale: float = 100.0, clip_eps: float | None = 0.2, *, normalize_returns: bool = False,
                 threshold: float = 0.05, base: ToyCriticConfig | None = None,
                 runs: Mapping[ToyCriticConfig, Mapping] | None = None) -> None:
        self.base = base if base is not None else ToyCriticConfig()
        self.threshold = threshold
        self._runs: dict[ToyCriticConfig, Mapping] = {}
        for config, run in (runs or {}).items():
            if not isinstance(config, ToyCriticConfig) or not isinstance(run, Mapping):
                raise TypeError(f"runs must map ToyCriticConfig to a run_toy_critic result; got "
                                f"{type(config).__name__} -> {type(run).__name__}")
            missing = {"relative_error", "clip_fraction"} - set(run)
            if missing:
                raise ValueError(f"runs[{config}] is not a run_toy_critic result: it has no {sorted(missing)}")
            self._runs[config] = run
        slider = dict(continuous_update=False, style={"description_width": "initial"},
                      layout=widgets.Layout(width="360px"))
        self.scale = widgets.FloatLogSlider(value=scale, base=10, min=-1, max=3, step=0.25,
                                            description="returns' scale", readout_format=".3g", **slider)
        self.clip_eps = widgets.FloatLogSlider(value=0.2 if clip_eps is None else clip_eps, base=10, min=-2, max=2,
                                               step=0.1, description="clip_eps", readout_format=".3g", **slider)
        self.no_clip = widgets.Checkbox(value=clip_eps is None, description="no clipping (clip_eps=None)")
        self.normalize = widgets.Checkbox(value=normalize_returns, description="normalise returns")
        self.summary = widgets.HTML()
        self.image = widgets.Image(format="png")

        self.figure = Figure(figsize=(9.0, 3.4), layout="constrained")
        ax_error, ax_clip = self.figure.subplots(1, 2)
        self.axes = (ax_error, ax_clip)
        (baseline,) = ax_error.plot([], [], color=OKABE_ITO[0], linestyle="--", label="no clipping")
        (error,) = ax_error.plot([], [], color=OKABE_ITO[3], label="chosen setting")
        ax_error.axhline(threshold, color="0.4", linestyle=":", linewidth=1, label=f"target {threshold:g}")
        ax_error.set(yscale="log", xlabel="PPO iteration", ylabel="relative error ||v - R|| / ||R - mean R||")
        ax_error.legend(fontsize="small")
        (clip_fraction,) = ax_clip.plot([], [], color=OKABE_ITO[3], label="chosen setting")
        ax_clip.set(xlabel="PPO iteration", ylabel="clip fraction (zero-gradient share)", ylim=(-0.02, 1.02),
                    title="samples whose value gradient was clipped")
        ax_clip.legend(fontsize="small")
        self.lines = {"error": error, "baseline_error": baseline, "clip_fraction": clip_fraction}

        for control in (self.scale, self.clip_eps, self.no_clip, self.normalize):
            control.observe(self.update, names="value")
        self.update()

    def config(self) -> ToyCriticConfig:
        """The toy critic's settings that the controls show."""
        return self.base.replace(scale=float(self.scale.value), normalize_returns=bool(self.normalize.value),
                                 clip_eps=None if self.no_clip.value else float(self.clip_eps.value))

    def run(self, config: ToyCriticConfig) -> Mapping:
        """The toy critic's run of ``config``: run now, or the stored one if this setting was run before."""
        if config not in self._runs:
            self._runs[config] = run_toy_critic(config)
        return self._runs[config]

    def update(self, change: object = None) -> None:
        """Run the chosen setting and the unclipped baseline at its scale (or reuse their runs) and redraw."""
        config = self.config()
        self.clip_eps.disabled = self.no_clip.value
        baseline = self.run(config.replace(clip_eps=None))
        chosen = self.run(config)
        iterations = range(len(chosen["relative_error"]))
        self.lines["error"].set_data(iterations, chosen["relative_error"])
        self.lines["baseline_error"].set_data(iterations, baseline["relative_error"])
        self.lines["clip_fraction"].set_data(iterations, chosen["clip_fraction"])
        for ax in self.axes:
            ax.relim()
            ax.autoscale_view()
        self.axes[1].set_ylim(-0.02, 1.02)
        clip_text = "None" if config.clip_eps is None else f"{config.clip_eps:.3g}"
        units = " (normalised units)" if config.normalize_returns else ""
        self.axes[0].set_title(f"scale {config.scale:.3g}, clip_eps {clip_text}{units}")
        reached, reached_baseline = (
            iterations_to_reach(curves["relative_error"], self.threshold) for curves in (chosen, baseline)
        )
        self.summary.value = (
            f"iterations to {self.threshold:.0%} relative error: chosen setting <b>{_text(reached, config)}</b>, "
            f"no clipping <b>{_text(reached_baseline, config)}</b>"
        )
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=80)
        self.image.value = buffer.getvalue()

    def widget(self) -> widgets.Widget:
        sliders, switches = widgets.VBox([self.scale, self.clip_eps]), widgets.VBox([self.no_clip, self.normalize])
        controls = widgets.HBox([sliders, switches])
        return widgets.VBox([controls, self.summary, self.image])


def _text(reached: int | None, config: ToyCriticConfig) -> str:
    return f"not within {config.num_iterations}" if reached is None else str(reached)


def toy_critic_explorer(scale: float = 100.0, clip_eps: float | None = 0.2, *, normalize_returns: bool = False,
                        base: ToyCriticConfig | None = None) -> widgets.Widget:
    """The explorer widget (one call in notebook 05); questions to try are in the notebook.

    Args:
        scale, clip_eps, normalize_returns: the starting values of the controls.
        base: the other toy-critic settings (learning rate, iterations, seed, ...).
    """
    return ToyCriticExplorer(scale, clip_eps, normalize_returns=normalize_returns, base=base).widget()
