"""Slider explorers for the clipped value loss, built on :mod:`valueloss.viz.plotting`.

Three explorers, each one call in a notebook cell (the last expression displays it)::

    from valueloss.viz import widgets
    widgets.loss_curve_explorer()    # 1D: loss and gradient against v; sliders clip_eps, old_value, return
    widgets.surface_explorer()       # 2D: unclipped / clipped / difference heat maps; sliders clip_eps, extent
    widgets.gradient_explorer()      # region map + gradient field, and one slice of the gradient;
                                     # sliders clip_eps, extent, return

Public API (stable):

* ``LossCurveExplorer(clip_eps=0.2, old_value=0.0, return_=1.0, *, variant, loss_type, huber_delta,
  value_range=(-2.5, 2.5), num=401, backend="auto")``,
  ``SurfaceExplorer(clip_eps=0.2, extent=1.0, *, num=256, variant, loss_type, huber_delta, backend)``,
  ``GradientExplorer(clip_eps=0.2, return_=0.6, extent=1.0, *, num=256, arrows=15, variant, loss_type,
  huber_delta, backend)`` (and the factory functions ``loss_curve_explorer``, ``surface_explorer``,
  ``gradient_explorer`` that take the same keyword arguments) share the base class :class:`Explorer`,
  which has

  - ``controls``: dict of name -> ipywidgets control. Names: ``"clip_eps"`` (FloatSlider,
    description ``"clip_eps"``), ``"old_value"``, ``"return"`` (the return for the 1D explorer;
    ``R - v_old`` of the slice for the gradient explorer), ``"extent"`` (half-width of the plane).
    Setting ``controls[name].value = x`` in code redraws the figure at once.
  - ``figure`` (a matplotlib Figure, not registered with pyplot), ``axes`` (dict of name -> Axes),
    ``artists`` (dict of name -> the artist that shows the data, looked up afresh on each access).
  - ``params``: the current settings as a dict (what the figure shows).
  - ``backend``: ``"canvas"`` (live figure widget, JupyterLab/Voila: :class:`valueloss.viz.canvas.FigureView`),
    ``"image"`` (fallback: a static PNG re-rendered into an ``ipywidgets.Image`` on each change, with a
    note saying so) or ``"agg"`` (headless: the Agg canvas is redrawn, nothing is displayed; tests,
    benchmarks). ``backend="auto"`` (default) picks ``"canvas"`` inside a Jupyter kernel when anywidget
    imports, ``"image"`` inside a kernel without it, and ``"agg"`` outside a kernel.
  - ``canvas`` (the figure's Agg canvas), ``view`` (the :class:`~valueloss.viz.canvas.FigureView` of the
    ``"canvas"`` backend, else None), ``widget`` (the ipywidgets box holding the controls and the view),
    ``message`` (why a fallback was used, or ``""``), ``image`` (the ``ipywidgets.Image`` of the ``"image"``
    fallback, else None), ``to_png()`` (the complete figure as PNG bytes), ``update()`` (recompute and
    redraw), ``close()``.
  - display: an explorer displays as its ``widget`` (``_repr_mimebundle_``).

The explorers do no math: every number comes from :mod:`valueloss.viz.plotting` (which gets it from
:mod:`valueloss.functional`). Each figure is built once; a control change moves the existing artists
(``set_data``/``set_array``/``set_UVC``) and repaints only those artists over a cached background (the
background is re-rendered when axis or colour limits change). With the ``"canvas"`` backend the browser
does that repaint: the kernel sends the paths and images matplotlib drew for the moving artists
(:mod:`valueloss.viz.frames`), not a picture. The layout is computed once (constrained layout on the
first draw, then frozen). ``benchmarks/bench_widgets.py`` measures a change; docs/explorers.md has the
numbers end to end.
"""

from __future__ import annotations

import io

import ipywidgets
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..functional import Region
from . import plotting
from .frames import png_bytes
from .plotting import find_artist

__all__ = [
    "BACKENDS",
    "Explorer",
    "GradientExplorer",
    "LossCurveExplorer",
    "SurfaceExplorer",
    "gradient_explorer",
    "loss_curve_explorer",
    "surface_explorer",
]

BACKENDS = ("auto", "canvas", "image", "agg")


def _in_kernel() -> bool:
    """True inside a running Jupyter kernel (not in plain Python or a terminal IPython)."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython ships with ipywidgets
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _figure_view_class():
    """:class:`valueloss.viz.canvas.FigureView`, or None and why (anywidget missing or failing to import)."""
    try:
        from .canvas import FigureView
    except Exception as exc:  # ImportError, or anywidget failing against this ipywidgets
        return None, f"anywidget could not be imported ({type(exc).__name__}: {exc})"
    return FigureView, ""


def _slider(name: str, value: float, low: float, high: float, step: float) -> ipywidgets.FloatSlider:
    return ipywidgets.FloatSlider(
        value=value, min=low, max=high, step=step, description=name, continuous_update=True,
        readout_format=".2f", style={"description_width": "initial"}, layout=ipywidgets.Layout(width="32em"),
    )


class Explorer:
    """Base class: controls, one figure built once, artists updated in place (see the module docstring)."""

    figsize: tuple = (10.0, 4.0)

    def __init__(self, controls: dict, axes_names: tuple, ncols: int, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
        self.controls = controls
        self.message = ""
        self.figure = Figure(figsize=self.figsize, layout="constrained")
        self.backend, self.canvas = self._make_canvas(backend)
        axes = self.figure.subplots(1, ncols, squeeze=False)[0]
        self.axes = dict(zip(axes_names, axes, strict=False))
        self._draw_initial()
        # Lay out once, then freeze: constrained layout on every redraw would cost more than the redraw.
        self.figure.draw_without_rendering()
        self.figure.set_layout_engine("none")
        self._background = None
        self._background_key = None
        self._image: ipywidgets.Image | None = None
        self.caption = ipywidgets.HTML(self._caption())
        self.widget = self._make_widget()
        for control in self.controls.values():
            control.observe(self._on_change, names="value")
        self._dpi = self.figure.dpi
        if self.view is not None:
            self.view.observe(self._on_pixel_ratio, names="pixel_ratio")
        self._redraw()

    # ---------------------------------------------------------------- canvas and widget
    def _make_canvas(self, backend: str):
        self.view = None
        if backend == "auto":
            backend = "agg"
            if _in_kernel():
                backend = "image"
                view_class, why = _figure_view_class()
                if view_class is not None:
                    backend = "canvas"
                else:
                    self.message = f"Static view: {why}. Each change re-renders a PNG."
        if backend == "canvas":
            view_class, why = _figure_view_class()
            if view_class is None:
                raise RuntimeError(f"backend='canvas' was requested but {why}")
            self.view = view_class()
        return backend, FigureCanvasAgg(self.figure)

    def _make_widget(self) -> ipywidgets.Widget:
        controls = ipywidgets.VBox(list(self.controls.values()))
        if self.backend == "canvas":
            view = self.view
        elif self.backend == "image":
            self._image = ipywidgets.Image(format="png")
            note = self.message or "Static view: the live figure is not active, so each change re-renders a PNG."
            view = ipywidgets.VBox([ipywidgets.HTML(f"<em>{note}</em>"), self._image])
        else:
            view = ipywidgets.HTML("<em>Headless explorer (backend='agg'): nothing to display.</em>")
        return ipywidgets.VBox([controls, self.caption, view])

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    @property
    def image(self) -> ipywidgets.Image | None:
        """The ``ipywidgets.Image`` that shows the PNG in the ``"image"`` fallback (None otherwise)."""
        return self._image

    # ---------------------------------------------------------------- updating
    @property
    def params(self) -> dict:
        """The current control values, by control name."""
        return {name: control.value for name, control in self.controls.items()}

    def _on_change(self, change) -> None:
        self.update()

    def _on_pixel_ratio(self, change) -> None:
        """Draw at the screen's resolution: ``pixel_ratio`` (from the page, kept to 1-4) times the dpi."""
        ratio = change["new"]
        ratio = min(max(ratio, 1.0), 4.0) if np.isfinite(ratio) else 1.0
        if self.figure.dpi != self._dpi * ratio:
            self.figure.set_dpi(self._dpi * ratio)
            self._redraw(full=True)

    def update(self) -> None:
        """Say the new settings in the caption, move the artists to them and redraw."""
        # The caption first: the browser lays it out while the kernel draws, instead of between the
        # picture's arrival and its paint (which it delayed by several milliseconds in JupyterLab).
        if self.caption.layout.display != "none":  # hidden in the app, whose notes say the settings
            self.caption.value = self._caption()
        self._update_artists()
        self._redraw()

    def _caption(self) -> str:
        """One line above the figure with the current settings (HTML: costs no pixels to repaint).

        Drawn into the figure, this line cost as much as every curve together (Agg renders text glyph
        by glyph); the browser shows HTML text at no cost to the kernel.
        """
        settings = ", ".join(f"{name} = {value:.2f}" for name, value in self.params.items())
        return f"<span class='valueloss-settings'><b>Now:</b> {settings}</span>"

    def _redraw(self, full: bool = False) -> None:
        """Show the current artists: repaint the changing artists over a cached background.

        The background (axes, ticks, labels, legends, colour bars) is rendered once without the
        artists that change with the controls, and re-rendered only when it changes (new axis
        limits, colour limits or figure size) or when ``full=True``. With the ``"canvas"`` backend the
        background goes to the browser as a PNG (only when it changed) and the changing artists as the
        paths and images matplotlib drew for them; otherwise they are blitted onto the Agg canvas, which
        then holds the complete picture.
        """
        canvas = self.figure.canvas
        dynamic = self._in_drawing_order(self._dynamic_artists())
        key = self._current_background_key(dynamic)
        new_background = full or self._background is None or key != self._background_key
        if new_background:
            for artist in dynamic:
                artist.set_animated(True)
            try:
                canvas.draw()
            finally:
                for artist in dynamic:
                    artist.set_animated(False)
            self._background = canvas.copy_from_bbox(self.figure.bbox)
            self._background_key = key
        if self.backend == "canvas":
            png = png_bytes(np.asarray(canvas.buffer_rgba())) if new_background else None
            self.view.show(self.figure, dynamic, png, ratio=self.figure.dpi / self._dpi)
            return
        if not new_background:
            canvas.restore_region(self._background)
        for artist in dynamic:
            self.figure.draw_artist(artist)
        if self.backend == "image":
            self._image.value = self.to_png()

    def _in_drawing_order(self, artists: list) -> list:
        """``artists`` in the order a full draw paints them: by axes, then zorder, then place among the children."""
        place = {}
        for i, ax in enumerate(sorted(self.figure.axes, key=lambda a: a.get_zorder())):
            for j, child in enumerate(ax.get_children()):
                place[id(child)] = (i, child.get_zorder(), j)
        return sorted(artists, key=lambda a: place.get(id(a), (len(place), a.get_zorder(), 0)))

    def to_png(self) -> bytes:
        """The complete figure as it is now, encoded as PNG."""
        from matplotlib.image import imsave

        if self.backend == "canvas":  # the Agg canvas holds only the background: the browser paints the rest
            self.figure.canvas.draw()
        buffer = io.BytesIO()
        imsave(buffer, np.asarray(self.figure.canvas.buffer_rgba()), format="png")
        return buffer.getvalue()

    def _current_background_key(self, dynamic: list) -> tuple:
        key = [tuple(self.figure.get_size_inches()), self.figure.dpi]
        for ax in self.axes.values():
            key += [ax.get_xlim(), ax.get_ylim()]
        key += [artist.get_clim() for artist in dynamic if hasattr(artist, "get_clim")]
        return tuple(key)

    def _dynamic_artists(self) -> list:
        """The artists that change with the controls (redrawn on every change); titles and labels stay fixed."""
        return list(self.artists.values())

    def close(self) -> None:
        """Close the widgets (controls, canvas, box)."""
        for control in self.controls.values():
            control.close()
        self.widget.close()
        if self.view is not None:
            self.view.close()

    # ---------------------------------------------------------------- per explorer
    def _draw_initial(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update_artists(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def artists(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


def _legend_below(figure: Figure, axes: list, ncols: int = 4, extra: tuple = ()) -> None:
    """One figure legend under the panels, from the labelled artists of ``axes`` (first label wins)."""
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=False):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    for handle in extra:
        handles.append(handle)
        labels.append(handle.get_label())
    figure.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize="small", frameon=False)


def _y_limits(*arrays, pad: float = 0.04) -> tuple:
    low = min(float(np.nanmin(a)) for a in arrays)
    high = max(float(np.nanmax(a)) for a in arrays)
    span = max(high - low, 1e-9)
    return low - pad * span, high + pad * span


class LossCurveExplorer(Explorer):
    """Loss (left) and gradient (right) against the predicted value; sliders ``clip_eps``, ``old_value``, ``return``.

    Built on :func:`valueloss.viz.plotting.loss_curve` and :func:`valueloss.viz.plotting.gradient_curve`.
    The axes stay fixed (x: ``value_range``; y: the largest unclipped loss and gradient any slider
    setting can reach), so that moving a slider moves the curves, not the axes.

    Artists: ``"loss"``, ``"unclipped"``, ``"clipped"``, ``"band"``, ``"old_value"``, ``"return"``
    (loss panel); ``"grad"``, ``"grad_unclipped"``, ``"zeroed"``, ``"grad_band"``,
    ``"grad_old_value"``, ``"grad_return"`` (gradient panel).
    """

    figsize = (8.4, 4.4)
    ranges = {"clip_eps": (0.0, 1.0, 0.01), "old_value": (-1.5, 1.5, 0.01), "return": (-1.5, 1.5, 0.01)}

    def __init__(
        self,
        clip_eps: float = 0.2,
        old_value: float = 0.0,
        return_: float = 1.0,
        *,
        variant: str = "max",
        loss_type: str = "squared",
        huber_delta: float = 1.0,
        value_range: tuple = (-2.5, 2.5),
        num: int = 401,
        backend: str = "auto",
    ) -> None:
        self._fixed = dict(variant=variant, loss_type=loss_type, huber_delta=huber_delta, value_range=value_range)
        self._num = num
        start = {"clip_eps": clip_eps, "old_value": old_value, "return": return_}
        controls = {name: _slider(name, start[name], *self.ranges[name]) for name in self.ranges}
        super().__init__(controls, ("loss", "gradient"), 2, backend)

    def _settings(self) -> dict:
        p = self.params
        return dict(clip_eps=p["clip_eps"], old_value=p["old_value"], return_=p["return"], **self._fixed)

    def _draw_initial(self) -> None:
        loss_ax, grad_ax = self.axes["loss"], self.axes["gradient"]
        plotting.loss_curve(loss_ax, num=self._num, legend=False, **self._settings())
        plotting.gradient_curve(grad_ax, num=self._num, legend=False, **self._settings())
        # Fixed y-limits: the unclipped loss and gradient at the extreme returns bound every setting.
        low, high = self.ranges["return"][:2]
        extremes = [
            getter(clip_eps=None, return_=r, num=self._num, **self._fixed)
            for r in (low, high)
            for getter in (plotting.loss_curve_data, plotting.gradient_curve_data)
        ]
        loss_ax.set_ylim(_y_limits(0.0, *[d["loss_unclipped"] for d in extremes if "loss" in d]))
        grad_ax.set_ylim(_y_limits(*[d["grad_unclipped"] for d in extremes if "grad" in d]))
        _legend_below(self.figure, [loss_ax, grad_ax], ncols=3)
        # Fixed panel titles (background) and one short line with the settings (redrawn on change):
        # each line of text costs as much to paint as all the curves together.
        loss_ax.set_title(r"Per-token loss $\ell(v)$")
        grad_ax.set_title(r"Its gradient $\partial\ell/\partial v$")
        self.figure.suptitle(f"Clipped value loss ({self._fixed['variant']}, {self._fixed['loss_type']})")

    def _update_artists(self) -> None:
        plotting.update_loss_curve(self.axes["loss"], rescale=False, title=False, **self._settings())
        plotting.update_gradient_curve(self.axes["gradient"], rescale=False, title=False, **self._settings())

    @property
    def artists(self) -> dict:
        lc, gc = "valueloss.loss_curve.", "valueloss.gradient_curve."
        loss_ax, grad_ax = self.axes["loss"], self.axes["gradient"]
        found = {name: find_artist(loss_ax, lc + name)
                 for name in ("loss", "unclipped", "clipped", "band", "old_value", "return")}
        found.update({"grad" + ("_" + name if name != "grad" else ""): find_artist(grad_ax, gc + name)
                      for name in ("grad", "band", "old_value", "return")})
        found.update(grad_unclipped=find_artist(grad_ax, gc + "unclipped"), zeroed=find_artist(grad_ax, gc + "zeroed"))
        return found


class SurfaceExplorer(Explorer):
    """Unclipped, clipped and difference heat maps over ``(v - v_old, R - v_old)``; sliders ``clip_eps``, ``extent``.

    A ``num x num`` grid (256 x 256 by default), computed once per change for all three panels
    (:func:`valueloss.viz.plotting.surface_data`). The unclipped and clipped panels share one colour
    scale; the difference panel's scale runs up to the largest difference any ``clip_eps`` gives at
    this extent (the one of ``clip_eps=0``), so that colours compare across slider settings.
    Artists: ``"unclipped"``, ``"clipped"``, ``"difference"`` (the images), ``"<kind>_band_low"``,
    ``"<kind>_band_high"``, ``"<kind>_diagonal"`` (the guide lines of each panel).
    """

    figsize = (8.4, 3.6)
    kinds = ("unclipped", "clipped", "difference")

    def __init__(
        self,
        clip_eps: float = 0.2,
        extent: float = 1.0,
        *,
        num: int = 256,
        variant: str = "max",
        loss_type: str = "squared",
        huber_delta: float = 1.0,
        backend: str = "auto",
    ) -> None:
        self._fixed = dict(num=num, variant=variant, loss_type=loss_type, huber_delta=huber_delta)
        self._difference_top: dict = {}
        controls = {
            "clip_eps": _slider("clip_eps", clip_eps, 0.0, 1.0, 0.01),
            "extent": _slider("extent", extent, 0.25, 3.0, 0.05),
        }
        super().__init__(controls, self.kinds, 3, backend)

    def _data(self) -> tuple:
        p = self.params
        data = plotting.surface_data(clip_eps=p["clip_eps"], extent=p["extent"], parts=self.kinds, **self._fixed)
        if p["extent"] not in self._difference_top:
            widest = plotting.surface_data(clip_eps=0.0, extent=p["extent"], parts=("difference",), **self._fixed)
            widest = widest["difference"]
            self._difference_top[p["extent"]] = float(widest.max())
        vmax = {kind: float(max(data["unclipped"].max(), data["clipped"].max())) for kind in self.kinds[:2]}
        vmax["difference"] = max(self._difference_top[p["extent"]], float(data["difference"].max()))
        return data, vmax

    def _draw_initial(self) -> None:
        p = self.params
        _, vmax = self._data()
        for kind in self.kinds:
            plotting.loss_surface(self.axes[kind], kind=kind, clip_eps=p["clip_eps"], extent=p["extent"],
                                  vmax=vmax[kind], **self._fixed)
            # The panel titles stay fixed (drawn once, in the background); the settings go in one
            # figure title, so that a change re-renders one line of text instead of three.
            self.axes[kind].set_title(plotting.SURFACE_TITLES[kind], fontsize="medium")
            # Few ticks: three panels share 840 pixels, so that the figure fits a 1280-pixel JupyterLab window.
            self.axes[kind].locator_params(axis="x", nbins=3)
            self.axes[kind].locator_params(axis="y", nbins=5)
        fixed = self._fixed
        self.figure.suptitle(f"Loss over the plane ({fixed['variant']}, {fixed['loss_type']}, "
                             f"{fixed['num']}x{fixed['num']} grid)")

    def _update_artists(self) -> None:
        p = self.params
        data, vmax = self._data()
        common = {k: v for k, v in self._fixed.items() if k != "num"}
        for kind in self.kinds:
            plotting.update_loss_surface(self.axes[kind], kind=kind, clip_eps=p["clip_eps"], extent=p["extent"],
                                         vmax=vmax[kind], data=data, title=False, **common)

    @property
    def artists(self) -> dict:
        found = {}
        for kind in self.kinds:
            ax = self.axes[kind]
            found[kind] = find_artist(ax, "valueloss.loss_surface.image")
            for part in ("band_low", "band_high", "diagonal"):
                found[f"{kind}_{part}"] = find_artist(ax, "valueloss.loss_surface." + part)
        return found


class GradientExplorer(Explorer):
    """Region map with the gradient field (left) and the gradient along one slice (right).

    Sliders: ``clip_eps``; ``extent`` (half-width of the plane, also the x-range of the slice);
    ``return`` (the slice ``R - v_old`` = this value, drawn as a horizontal line on the map).
    Artists: ``"regions"`` (image of :class:`~valueloss.Region` codes), ``"field"`` (quiver),
    ``"slice"`` (the line on the map), ``"band_low"``, ``"band_high"``, ``"diagonal"`` (map guides),
    ``"grad"``, ``"grad_unclipped"``, ``"zeroed"``, ``"grad_band"``, ``"grad_return"`` (slice panel).
    """

    figsize = (8.4, 4.6)
    ranges = {"clip_eps": (0.0, 1.0, 0.01), "extent": (0.25, 3.0, 0.05), "return": (-3.0, 3.0, 0.01)}

    def __init__(
        self,
        clip_eps: float = 0.2,
        return_: float = 0.6,
        extent: float = 1.0,
        *,
        num: int = 256,
        arrows: int = 15,
        variant: str = "max",
        loss_type: str = "squared",
        huber_delta: float = 1.0,
        backend: str = "auto",
    ) -> None:
        self._num, self._arrows = num, arrows
        self._fixed = dict(variant=variant, loss_type=loss_type, huber_delta=huber_delta)
        start = {"clip_eps": clip_eps, "extent": extent, "return": return_}
        controls = {name: _slider(name, start[name], *self.ranges[name]) for name in self.ranges}
        self._limits_for = None
        super().__init__(controls, ("regions", "gradient"), 2, backend)

    def _slice_settings(self) -> dict:
        p = self.params
        return dict(clip_eps=p["clip_eps"], old_value=0.0, return_=p["return"],
                    value_range=(-p["extent"], p["extent"]), **self._fixed)

    def _set_slice_limits(self) -> None:
        """x: the plane's width; y: the unclipped gradient at the extreme returns (fixed per extent)."""
        extent = self.params["extent"]
        if self._limits_for == extent:
            return
        low, high = self.ranges["return"][:2]
        grads = [plotting.gradient_curve_data(clip_eps=None, return_=r, value_range=(-extent, extent), **self._fixed)
                 ["grad_unclipped"] for r in (low, high)]
        ax = self.axes["gradient"]
        ax.set_xlim(-extent, extent)
        ax.set_ylim(_y_limits(*grads))
        self._limits_for = extent

    def _draw_initial(self) -> None:
        p = self.params
        ax, gax = self.axes["regions"], self.axes["gradient"]
        plotting.region_map(ax, clip_eps=p["clip_eps"], extent=p["extent"], num=self._num, legend=False, **self._fixed)
        plotting.gradient_field(ax, clip_eps=p["clip_eps"], extent=p["extent"], num=self._arrows, **self._fixed)
        ax.axhline(p["return"], color=plotting.OKABE_ITO["black"], lw=1.5, gid="valueloss.viz.widgets.slice",
                   label=r"slice $R - v_{old}$ shown on the right")
        plotting.gradient_curve(gax, legend=False, **self._slice_settings())
        gax.set_xlabel(r"$v - v_{old}$ (with $v_{old}=0$)")
        # Fixed titles (background): the settings are said in the caption, which costs no pixels.
        ax.set_title(f"Where clipping zeroes the gradient ({self._fixed['variant']})")
        ax.locator_params(nbins=5)
        gax.locator_params(axis="x", nbins=5)
        gax.set_title(r"Gradient $\partial\ell/\partial v$ along the slice")
        self._set_slice_limits()
        regions = [Patch(color=plotting.REGION_COLORS[r], label=plotting.REGION_LABELS[r]) for r in Region]
        _legend_below(self.figure, [ax, gax], ncols=3, extra=tuple(regions))

    def _update_artists(self) -> None:
        p = self.params
        ax = self.axes["regions"]
        plotting.update_region_map(ax, clip_eps=p["clip_eps"], extent=p["extent"], title=False, **self._fixed)
        plotting.update_gradient_field(ax, clip_eps=p["clip_eps"], extent=p["extent"], **self._fixed)
        find_artist(ax, "valueloss.viz.widgets.slice").set_ydata([p["return"]] * 2)
        plotting.update_gradient_curve(self.axes["gradient"], rescale=False, title=False, **self._slice_settings())
        self._set_slice_limits()

    def _caption(self) -> str:
        p = self.params
        return (f"<span class='valueloss-settings'><b>Now:</b> clip_eps = {p['clip_eps']:.2f}, "
                f"extent = {p['extent']:.2f}, slice R &minus; v<sub>old</sub> = {p['return']:.2f}</span>")

    @property
    def artists(self) -> dict:
        ax, gax, gc = self.axes["regions"], self.axes["gradient"], "valueloss.gradient_curve."
        found = {
            "regions": find_artist(ax, "valueloss.region_map.image"),
            "field": find_artist(ax, "valueloss.gradient_field.quiver"),
            "slice": find_artist(ax, "valueloss.viz.widgets.slice"),
            "grad": find_artist(gax, gc + "grad"),
            "grad_unclipped": find_artist(gax, gc + "unclipped"),
            "zeroed": find_artist(gax, gc + "zeroed"),
            "grad_band": find_artist(gax, gc + "band"),
            "grad_return": find_artist(gax, gc + "return"),
            "grad_old_value": find_artist(gax, gc + "old_value"),
        }
        for part in ("band_low", "band_high", "diagonal"):
            found[part] = find_artist(ax, "valueloss.region_map." + part)
        return found


def loss_curve_explorer(**kwargs) -> LossCurveExplorer:
    """A :class:`LossCurveExplorer` (keyword arguments as its constructor)."""
    return LossCurveExplorer(**kwargs)


def surface_explorer(**kwargs) -> SurfaceExplorer:
    """A :class:`SurfaceExplorer` (keyword arguments as its constructor)."""
    return SurfaceExplorer(**kwargs)


def gradient_explorer(**kwargs) -> GradientExplorer:
    """A :class:`GradientExplorer` (keyword arguments as its constructor)."""
    return GradientExplorer(**kwargs)
