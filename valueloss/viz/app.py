"""The explorer dashboard: the three explorers of :mod:`valueloss.viz.widgets` under one set of shared controls.

``notebooks/explorer.ipynb`` is a single call into this module; ``make app`` serves that notebook with
Voilà (no code shown) on ``http://127.0.0.1:8866``::

    from valueloss.viz import app
    app.dashboard()          # displays: shared sliders, then each figure with a short explanation beside it

Shared controls and what they drive (the explorers' own sliders are hidden and follow these):

=============  ==========================================================================================
``clip_eps``   all three explorers
``old_value``  the loss curve's ``old_value``; the gradient slice's ``R - v_old``
``return``     the loss curve's ``return``; the gradient slice's ``R - v_old``
``extent``     the half-width of the plane of the surface and the gradient explorers
=============  ==========================================================================================

The surface and gradient pictures live on the plane ``(v - v_old, R - v_old)``, so ``old_value`` and
``return`` reach them only through their difference. This module does no math of its own: it wires
controls (``R - v_old`` is a subtraction) and lays out the explorers of :mod:`valueloss.viz.widgets`.
"""

from __future__ import annotations

import base64
import html
import io

import ipywidgets
import numpy as np

from . import widgets

__all__ = ["CONTROL_RANGES", "Dashboard", "dashboard"]

CONTROL_RANGES = {
    "clip_eps": widgets.LossCurveExplorer.ranges["clip_eps"],
    "old_value": widgets.LossCurveExplorer.ranges["old_value"],
    "return": widgets.LossCurveExplorer.ranges["return"],
    "extent": widgets.GradientExplorer.ranges["extent"],
}
"""``(min, max, step)`` of each shared control: the ranges of the explorers they drive."""

_NOTES = {
    "loss_curve": (
        "Loss and gradient against the new prediction v",
        "Inside the shaded trust band |v &minus; v<sub>old</sub>| &le; &epsilon; the clipped and unclipped "
        "losses agree. Outside it, where the clipped prediction is farther from the return than v itself, "
        "the max picks the clipped branch, which no longer depends on v: the gradient is exactly zero "
        "(thick vermillion stretch): the token's own pull stops there. Its prediction can still move, through "
        "the weights it shares with other tokens and by the size of a step (notebook 03).",
    ),
    "surface": (
        "The loss over every old value and return at once",
        "Each point is a pair (v &minus; v<sub>old</sub>, R &minus; v<sub>old</sub>). Left: the unclipped loss "
        "(v &minus; R)&sup2;; middle: the clipped loss that PPO uses; right: what clipping adds. The difference "
        "is zero inside the band (dashed lines) and grows where v moved past the band towards R.",
    ),
    "gradient": (
        "Where clipping kills the gradient",
        "Left: the plane coloured by region (inside the band; outside with the clipped branch winning, "
        "gradient exactly zero; outside with the unclipped branch winning, gradient live), with arrows "
        "showing where gradient descent pushes v. Right: the gradient along the black line on the left.",
    ),
}


def _check_in_range(name: str, value: float) -> float:
    low, high, _ = CONTROL_RANGES[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}] (the slider's range); got {value}")
    return float(value)


class Dashboard:
    """The loss-curve, surface and gradient explorers driven by one row of shared sliders.

    Args:
        clip_eps: starting clip range epsilon, in ``CONTROL_RANGES["clip_eps"]``.
        old_value: starting old value ``v_old`` of the loss curve.
        return_: starting return ``R`` of the loss curve.
        extent: starting half-width of the plane of the surface and gradient explorers.
        backend: passed to every explorer (``"auto"``, ``"canvas"``, ``"image"`` or ``"agg"``,
            see :mod:`valueloss.viz.widgets`).

    Attributes:
        controls: dict of name -> shared ``FloatSlider`` (``clip_eps``, ``old_value``, ``return``,
            ``extent``); setting ``controls[name].value`` in code updates the explorers it drives.
        explorers: dict ``loss_curve``/``surface``/``gradient`` -> the explorer of
            :mod:`valueloss.viz.widgets` (its own controls are hidden and follow the shared ones).
        notes: dict of the same keys -> the ``ipywidgets.HTML`` explanation beside each figure.
        widget: the ``ipywidgets.VBox`` holding everything; a dashboard displays as this widget.

    Example:
        >>> board = Dashboard(backend="agg")
        >>> board.controls["old_value"].value = 0.5
        >>> board.explorers["gradient"].params["return"]   # the slice R - v_old = 1.0 - 0.5
        0.5
    """

    def __init__(
        self,
        clip_eps: float = 0.2,
        old_value: float = 0.0,
        return_: float = 1.0,
        extent: float = 1.5,
        *,
        backend: str = "auto",
    ) -> None:
        start = {
            "clip_eps": _check_in_range("clip_eps", clip_eps),
            "old_value": _check_in_range("old_value", old_value),
            "return": _check_in_range("return", return_),
            "extent": _check_in_range("extent", extent),
        }
        self.explorers = {
            "loss_curve": widgets.LossCurveExplorer(start["clip_eps"], start["old_value"], start["return"],
                                                    backend=backend),
            "surface": widgets.SurfaceExplorer(start["clip_eps"], start["extent"], backend=backend),
            "gradient": widgets.GradientExplorer(start["clip_eps"], _slice(start["old_value"], start["return"]),
                                                 start["extent"], backend=backend),
        }
        for explorer in self.explorers.values():
            for control in explorer.controls.values():
                control.layout.display = "none"  # driven by the shared controls
            explorer.caption.layout.display = "none"  # the notes beside the figures say the settings
        self.controls = {name: _shared_slider(name, start[name]) for name in CONTROL_RANGES}
        self.notes = {name: ipywidgets.HTML() for name in self.explorers}
        for note in self.notes.values():
            note.add_class("valueloss-note")
        for control in self.controls.values():
            control.observe(self._on_change, names="value")
        self._write_notes()
        self.widget = self._layout()

    @property
    def params(self) -> dict:
        """The shared settings, by control name."""
        return {name: control.value for name, control in self.controls.items()}

    def _on_change(self, change) -> None:
        p = self.params
        # Loss curve first: it is the fastest to redraw, so it answers a slider move first.
        targets = {
            "loss_curve": {"clip_eps": p["clip_eps"], "old_value": p["old_value"], "return": p["return"]},
            "surface": {"clip_eps": p["clip_eps"], "extent": p["extent"]},
            "gradient": {"clip_eps": p["clip_eps"], "extent": p["extent"],
                         "return": _slice(p["old_value"], p["return"])},
        }
        for name, values in targets.items():
            for control_name, value in values.items():
                self.explorers[name].controls[control_name].value = value  # redraws only if it changed
            if name == "loss_curve":
                # The notes right after the first figure: the browser lays them out while the kernel draws
                # the other two (written last, their layout delayed the last figure's paint).
                self._write_notes()

    def _write_notes(self) -> None:
        p = self.params
        live = {
            "loss_curve": f"Now: &epsilon; = {p['clip_eps']:.2f}, band [{p['old_value'] - p['clip_eps']:.2f}, "
            f"{p['old_value'] + p['clip_eps']:.2f}], return R = {p['return']:.2f}.",
            "surface": f"Now: your old value and return sit on the row R &minus; v<sub>old</sub> = "
            f"{_slice(p['old_value'], p['return']):.2f}.",
            "gradient": f"Now: the slice R &minus; v<sub>old</sub> = {_slice(p['old_value'], p['return']):.2f}.",
        }
        for name, (title, text) in _NOTES.items():
            self.notes[name].value = (
                "<div style='max-width: 21em; margin-left: 1em; line-height: 1.35'>"
                f"<h3 style='margin-top: 0'>{html.escape(title)}</h3>"
                f"<p>{text}</p><p><b>{live[name]}</b></p></div>"
            )

    def _layout(self) -> ipywidgets.VBox:
        header = ipywidgets.HTML(
            "<p style='margin-top: 0'>Move a slider (or focus it and use the arrow keys): every figure follows. "
            "Per token, v<sup>clip</sup> = v<sub>old</sub> + clamp(v &minus; v<sub>old</sub>, &minus;&epsilon;, "
            "&epsilon;) and the loss is max((v<sup>clip</sup> &minus; R)&sup2;, (v &minus; R)&sup2;).</p>"
        )
        controls = ipywidgets.HBox(
            list(self.controls.values()), layout=ipywidgets.Layout(flex_flow="row wrap", margin="0 0 1em 0")
        )
        controls.add_class("valueloss-shared-controls")
        panels = []
        for name, explorer in self.explorers.items():
            panel = ipywidgets.HBox(
                [explorer.widget, self.notes[name]],
                layout=ipywidgets.Layout(flex_flow="row wrap", align_items="flex-start", margin="0 0 1.5em 0"),
            )
            panel.add_class(f"valueloss-panel-{name.replace('_', '-')}")
            panels.append(panel)
        box = ipywidgets.VBox([header, controls, *panels])
        box.add_class("valueloss-dashboard")
        return box

    def __repr__(self) -> str:
        p = self.params
        return (
            f"valueloss dashboard: clip_eps={p['clip_eps']:.2f}, old_value={p['old_value']:.2f}, "
            f"return={p['return']:.2f}, extent={p['extent']:.2f}; explorers: {', '.join(self.explorers)}"
        )

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = repr(self)  # stable text where widgets do not render (and for nbval)
        # A still picture for readers without a running kernel (GitHub, nbviewer); JupyterLab and Voila
        # prefer the widget and never show it.
        bundle["image/png"] = base64.b64encode(self.to_png()).decode("ascii")
        return bundle

    def to_png(self, dpi: float = 80) -> bytes:
        """The three figures at the current settings, one below the other, as one PNG image."""
        from matplotlib.image import imread, imsave

        images = []
        for explorer in self.explorers.values():
            buffer = io.BytesIO()
            explorer.figure.savefig(buffer, format="png", dpi=dpi, facecolor="white")
            buffer.seek(0)
            images.append(imread(buffer)[..., :3])
        width = max(image.shape[1] for image in images)
        stacked = np.concatenate([np.pad(image, ((0, 0), (0, width - image.shape[1]), (0, 0)), constant_values=1.0)
                                  for image in images])
        out = io.BytesIO()
        imsave(out, stacked, format="png")
        return out.getvalue()

    def close(self) -> None:
        """Close the shared controls, the notes, the explorers and the layout widgets."""
        for control in self.controls.values():
            control.close()
        for note in self.notes.values():
            note.close()
        for explorer in self.explorers.values():
            explorer.close()
        self.widget.close()


def _slice(old_value: float, return_: float) -> float:
    """``R - v_old``, rounded to 9 decimals so that float noise (1.0 - 0.3 = 0.7000000000000001) never shows."""
    return round(return_ - old_value, 9)


def _shared_slider(name: str, value: float) -> ipywidgets.FloatSlider:
    low, high, step = CONTROL_RANGES[name]
    return ipywidgets.FloatSlider(
        value=value, min=low, max=high, step=step, description=name, continuous_update=True, readout_format=".2f",
        style={"description_width": "initial"}, layout=ipywidgets.Layout(width="24em", margin="0 2em 0 0"),
    )


def dashboard(**kwargs) -> Dashboard:
    """A :class:`Dashboard` (keyword arguments as its constructor)."""
    return Dashboard(**kwargs)
