"""valueloss.viz.widgets: moving each control in code changes what the figure shows, correctly."""


import matplotlib

matplotlib.use("Agg")

import ipywidgets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from reference import token_grad, token_loss, token_region  # noqa: E402

from valueloss.viz import frames, plotting, widgets  # noqa: E402


def _per_token(fn, *arrays, **kwargs):
    """``fn`` of the reference, applied token by token over broadcast arrays (float64 numpy)."""
    return np.vectorize(lambda v, o, r: fn(float(v), float(o), float(r), **kwargs), otypes=[float])(*arrays)


def ref_losses(v, old, ret, eps):
    """(unclipped, max) per-token squared losses from the reference."""
    return _per_token(token_loss, v, old, ret, clip_eps=None), _per_token(token_loss, v, old, ret, clip_eps=eps)


def ref_grad(v, old, ret, eps):
    """d max-loss / dv from the reference: the band's edges as the installed torch's clamp, ties halved."""
    return _per_token(token_grad, v, old, ret, clip_eps=eps)


def ref_regions(v, old, ret, eps):
    """Region codes from the reference: 0 inside, 1 clipped branch strictly larger outside, 2 otherwise."""
    return _per_token(token_region, v, old, ret, clip_eps=eps).astype(int)


def controls_description(explorer):
    """The descriptions of the explorer's sliders, in order."""
    return [control.description for control in explorer.controls.values()]


def pixels(explorer):
    """A copy of the canvas pixels as they are now."""
    return np.asarray(explorer.figure.canvas.buffer_rgba()).copy()


@pytest.fixture
def loss_explorer():
    explorer = widgets.LossCurveExplorer(backend="agg", num=201)
    yield explorer
    explorer.close()


def test_loss_curve_explorer_controls(loss_explorer):
    """The 1D explorer exposes FloatSliders named clip_eps, old_value and return (the browser test finds clip_eps)."""
    assert list(loss_explorer.controls) == ["clip_eps", "old_value", "return"]
    for name, control in loss_explorer.controls.items():
        assert isinstance(control, ipywidgets.FloatSlider) and control.description == name
    assert loss_explorer.backend == "agg"  # outside a kernel, "auto" would pick agg as well
    assert isinstance(loss_explorer.widget, ipywidgets.VBox)


@pytest.mark.parametrize("name, value", [("clip_eps", 0.55), ("old_value", -0.8), ("return", 1.4)])
def test_loss_curve_explorer_each_control_moves_the_curves(loss_explorer, name, value):
    """Setting one slider in code redraws loss, gradient, band and markers at the new settings."""
    before = pixels(loss_explorer)
    loss_explorer.controls[name].value = value
    p = loss_explorer.params
    eps, old, ret = p["clip_eps"], p["old_value"], p["return"]
    assert p[name] == value
    art = loss_explorer.artists
    x = art["loss"].get_xdata()
    np.testing.assert_allclose(x, np.linspace(-2.5, 2.5, 201), atol=1e-12)
    lu, lmax = ref_losses(x, old, ret, eps)
    np.testing.assert_allclose(art["loss"].get_ydata(), lmax, atol=1e-12)
    np.testing.assert_allclose(art["unclipped"].get_ydata(), lu, atol=1e-12)
    np.testing.assert_allclose(art["grad"].get_ydata(), ref_grad(x, old, ret, eps), atol=1e-12)
    assert (art["band"].get_x(), art["band"].get_width()) == pytest.approx((old - eps, 2 * eps))
    assert art["old_value"].get_xdata()[0] == pytest.approx(old)
    assert art["return"].get_xdata()[0] == pytest.approx(ret)
    assert art["grad_return"].get_xdata()[0] == pytest.approx(ret)
    assert f"clip_eps = {eps:.2f}, old_value = {old:.2f}, return = {ret:.2f}" in loss_explorer.caption.value
    assert not np.array_equal(before, pixels(loss_explorer)), "the canvas pixels did not change"


def test_blitted_frame_equals_a_full_redraw(loss_explorer):
    """The fast path (cached background + changed artists) paints what a full redraw paints."""
    loss_explorer.controls["clip_eps"].value = 0.45
    loss_explorer.controls["return"].value = -0.6
    fast = pixels(loss_explorer)
    loss_explorer.figure.canvas.draw()  # a plain full Agg draw of the same figure
    full = pixels(loss_explorer)
    differing = np.any(fast != full, axis=-1).mean()
    assert differing < 0.01, f"{differing:.2%} of the pixels differ"


def test_surface_explorer_controls_update_images():
    """clip_eps and extent move the three 256x256 images (data, extent) to the new settings."""
    explorer = widgets.SurfaceExplorer(backend="agg")
    try:
        assert explorer.artists["clipped"].get_array().shape == (256, 256)
        for name, value in (("clip_eps", 0.5), ("extent", 2.0)):
            before = pixels(explorer)
            explorer.controls[name].value = value
            eps, extent = explorer.params["clip_eps"], explorer.params["extent"]
            offsets = np.linspace(-extent, extent, 256)
            dv, dr = np.meshgrid(offsets, offsets)
            lu, lmax = ref_losses(dv, 0.0, dr, eps)
            art = explorer.artists
            np.testing.assert_allclose(np.asarray(art["unclipped"].get_array()), lu, atol=1e-12)
            np.testing.assert_allclose(np.asarray(art["clipped"].get_array()), lmax, atol=1e-12)
            np.testing.assert_allclose(np.asarray(art["difference"].get_array()), lmax - lu, atol=1e-12)
            assert art["clipped"].get_extent() == pytest.approx([-extent, extent, -extent, extent])
            assert art["clipped_band_high"].get_xdata()[0] == pytest.approx(eps)
            # unclipped and clipped panels share one colour scale
            assert art["unclipped"].get_clim() == art["clipped"].get_clim()
            assert f"clip_eps = {eps:.2f}, extent = {extent:.2f}" in explorer.caption.value
            assert not np.array_equal(before, pixels(explorer))
    finally:
        explorer.close()


def test_gradient_explorer_controls_update_map_field_and_slice():
    """clip_eps, extent and return move the region map, the arrows, the slice line and the slice gradient."""
    explorer = widgets.GradientExplorer(backend="agg", num=64, arrows=9)
    try:
        for name, value in (("clip_eps", 0.4), ("return", -0.7), ("extent", 1.5)):
            before = pixels(explorer)
            explorer.controls[name].value = value
            p = explorer.params
            eps, ret, extent = p["clip_eps"], p["return"], p["extent"]
            art = explorer.artists
            offsets = np.linspace(-extent, extent, 64)
            dv, dr = np.meshgrid(offsets, offsets)
            np.testing.assert_array_equal(np.asarray(art["regions"].get_array()), ref_regions(dv, 0.0, dr, eps))
            coarse = np.linspace(-extent, extent, 9)
            cv, cr = np.meshgrid(coarse, coarse)
            np.testing.assert_allclose(np.asarray(art["field"].U).reshape(9, 9), -ref_grad(cv, 0.0, cr, eps),
                                       atol=1e-12)
            assert art["slice"].get_ydata()[0] == pytest.approx(ret)
            x = art["grad"].get_xdata()
            assert (x[0], x[-1]) == pytest.approx((-extent, extent))
            np.testing.assert_allclose(art["grad"].get_ydata(), ref_grad(x, 0.0, ret, eps), atol=1e-12)
            assert not np.array_equal(before, pixels(explorer))
    finally:
        explorer.close()


def test_image_fallback_rerenders_png():
    """backend='image' shows a note and re-renders the PNG of the Image widget on each change."""
    explorer = widgets.LossCurveExplorer(backend="image", num=101)
    try:
        png = bytes(explorer.image.value)
        assert png.startswith(b"\x89PNG")
        explorer.controls["clip_eps"].value = 0.7
        assert bytes(explorer.image.value) != png
        assert "Static view" in explorer.widget.children[2].children[0].value
    finally:
        explorer.close()


def test_canvas_backend_sends_one_frame_per_change_and_the_background_only_when_it_changes():
    """backend='canvas' shows a FigureView; a slider change sends exactly one new frame (and the artist data
    move); the background PNG is re-sent only when the axes change (the surface explorer's extent)."""
    pytest.importorskip("anywidget")
    from valueloss.viz.canvas import FigureView

    explorer = widgets.LossCurveExplorer(backend="canvas", num=101)
    surface = widgets.SurfaceExplorer(backend="canvas", num=32)
    try:
        view = explorer.view
        assert isinstance(view, FigureView) and view in explorer.widget.children
        assert view.background.startswith(b"\x89PNG") and view.frame
        frames, backgrounds = [], []
        view.observe(lambda change: frames.append(change["new"]), names="frame")
        view.observe(lambda change: backgrounds.append(change["new"]), names="background")
        explorer.controls["old_value"].value = 0.9
        assert explorer.artists["old_value"].get_xdata()[0] == pytest.approx(0.9)
        assert len(frames) == 1 and backgrounds == [], "one change: one frame, the same background"
        assert controls_description(explorer) == ["clip_eps", "old_value", "return"]

        first = surface.view.background_id
        surface.controls["clip_eps"].value = 0.5
        assert surface.view.background_id == first, "clip_eps moves no axis: the background stays"
        surface.controls["extent"].value = 2.0
        assert surface.view.background_id == first + 1, "a new extent means new axes: a new background"
    finally:
        explorer.close()
        surface.close()


def test_canvas_background_is_the_figure_without_its_moving_artists():
    """The background PNG is Agg's picture with the moving artists left out, and to_png() the whole figure."""
    pytest.importorskip("anywidget")
    import io

    from PIL import Image

    live = widgets.GradientExplorer(backend="canvas", num=32, clip_eps=0.3)
    still = widgets.GradientExplorer(backend="agg", num=32, clip_eps=0.3)
    try:
        background = np.asarray(Image.open(io.BytesIO(live.view.background)).convert("RGBA"))
        for artist in still.artists.values():
            artist.set_visible(False)
        still.figure.canvas.draw()
        np.testing.assert_array_equal(background, pixels(still))
        for artist in still.artists.values():
            artist.set_visible(True)
        still.figure.canvas.draw()
        whole = np.asarray(Image.open(io.BytesIO(live.to_png())).convert("RGBA"))
        np.testing.assert_array_equal(whole, pixels(still))
    finally:
        live.close()
        still.close()


def test_bad_backend_is_rejected():
    """An unknown backend name raises ValueError listing the choices."""
    with pytest.raises(ValueError, match="backend must be one of"):
        widgets.LossCurveExplorer(backend="qt")


def test_factories_return_explorers():
    """The one-call factories build the matching explorer with the given settings."""
    explorer = widgets.loss_curve_explorer(clip_eps=0.3, backend="agg")
    assert isinstance(explorer, widgets.LossCurveExplorer) and explorer.params["clip_eps"] == 0.3
    assert isinstance(widgets.surface_explorer(backend="agg", num=16), widgets.SurfaceExplorer)
    assert isinstance(widgets.gradient_explorer(backend="agg", num=16), widgets.GradientExplorer)


def _artist_data(artist):
    """What an artist shows, as arrays: line points, rectangle corners, image values and extent, arrows."""
    from matplotlib.image import AxesImage
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle
    from matplotlib.quiver import Quiver

    if isinstance(artist, Line2D):
        return [np.asarray(artist.get_xydata(), dtype=float)]
    if isinstance(artist, Rectangle):
        return [np.array([artist.get_x(), artist.get_y(), artist.get_width(), artist.get_height()])]
    if isinstance(artist, AxesImage):
        return [np.asarray(artist.get_array(), dtype=float), np.asarray(artist.get_extent(), dtype=float),
                np.asarray(artist.get_clim(), dtype=float)]
    if isinstance(artist, Quiver):
        return [np.asarray(a, dtype=float) for a in (artist.X, artist.Y, artist.U, artist.V)]
    raise TypeError(f"no comparison for {type(artist).__name__}")


def _assert_same_artists(live_ax, static_ax, prefixes):
    """Every artist the plotting functions drew (gid under ``prefixes``) is in the live figure with equal data."""
    gids = [a.get_gid() for a in static_ax.get_children() if (a.get_gid() or "").startswith(prefixes)]
    assert len(gids) >= 4, gids
    for gid in gids:
        live, static = plotting.find_artist(live_ax, gid), plotting.find_artist(static_ax, gid)
        for got, want in zip(_artist_data(live), _artist_data(static), strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=gid)


def _static_axes(n):
    from matplotlib.figure import Figure

    return Figure().subplots(1, n, squeeze=False)[0]


def test_live_figures_draw_what_the_plotting_functions_draw():
    """After slider moves, each explorer's artists hold the data of a static figure drawn by valueloss.viz.plotting."""
    loss = widgets.LossCurveExplorer(backend="agg", num=101)
    surface = widgets.SurfaceExplorer(backend="agg", num=48)
    grad = widgets.GradientExplorer(backend="agg", num=48, arrows=7)
    try:
        for explorer, moves in ((loss, {"clip_eps": 0.35, "old_value": -0.4, "return": 1.3}),
                                (surface, {"clip_eps": 0.45, "extent": 1.75}),
                                (grad, {"clip_eps": 0.15, "extent": 2.0, "return": -0.8})):
            for name, value in moves.items():
                explorer.controls[name].value = value

        p = loss.params
        curve = dict(clip_eps=p["clip_eps"], old_value=p["old_value"], return_=p["return"], value_range=(-2.5, 2.5),
                     num=101)
        ax_loss, ax_grad = _static_axes(2)
        plotting.loss_curve(ax_loss, **curve)
        plotting.gradient_curve(ax_grad, **curve)
        _assert_same_artists(loss.axes["loss"], ax_loss, ("valueloss.loss_curve.",))
        _assert_same_artists(loss.axes["gradient"], ax_grad, ("valueloss.gradient_curve.",))

        p = surface.params
        top = plotting.surface_data(clip_eps=0.0, extent=p["extent"], num=48, parts=("difference",))["difference"].max()
        both = plotting.surface_data(clip_eps=p["clip_eps"], extent=p["extent"], num=48, parts=("clipped", "unclipped"))
        vmax = {"unclipped": max(both["unclipped"].max(), both["clipped"].max()), "difference": float(top)}
        vmax["clipped"] = vmax["unclipped"]
        for kind, ax in zip(surface.kinds, _static_axes(3), strict=True):
            plotting.loss_surface(ax, kind=kind, clip_eps=p["clip_eps"], extent=p["extent"], num=48, vmax=vmax[kind])
            _assert_same_artists(surface.axes[kind], ax, ("valueloss.loss_surface.",))

        p = grad.params
        ax_map, ax_slice = _static_axes(2)
        plotting.region_map(ax_map, clip_eps=p["clip_eps"], extent=p["extent"], num=48)
        plotting.gradient_field(ax_map, clip_eps=p["clip_eps"], extent=p["extent"], num=7)
        plotting.gradient_curve(ax_slice, clip_eps=p["clip_eps"], old_value=0.0, return_=p["return"],
                                value_range=(-p["extent"], p["extent"]))
        _assert_same_artists(grad.axes["regions"], ax_map, ("valueloss.region_map.", "valueloss.gradient_field."))
        _assert_same_artists(grad.axes["gradient"], ax_slice, ("valueloss.gradient_curve.",))
    finally:
        for explorer in (loss, surface, grad):
            explorer.close()


def test_fast_png_frames_decode_to_the_same_pixels():
    """The explorers' own PNG encoder (the live figure's background) round-trips through PIL pixel for pixel."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    for shape in ((1, 1, 4), (7, 41, 4), (440, 840, 4)):
        rgba = rng.integers(0, 256, size=shape, dtype=np.uint8)
        rgba[: shape[0] // 2, :, :] = 0  # transparent black survives too
        decoded = np.asarray(Image.open(io.BytesIO(frames.png_bytes(rgba))).convert("RGBA"))
        np.testing.assert_array_equal(decoded, rgba)


def test_canvas_draws_at_the_screens_pixel_ratio():
    """A page on a 2x screen sets pixel_ratio=2: the figure is redrawn at twice the dpi (background and frame);
    odd values are kept to 1-4 (a page cannot ask for a 100x figure)."""
    pytest.importorskip("anywidget")
    import io

    from PIL import Image

    explorer = widgets.LossCurveExplorer(backend="canvas", num=101)
    try:
        view, dpi = explorer.view, explorer.figure.dpi
        width, height = Image.open(io.BytesIO(view.background)).size
        view.pixel_ratio = 2.0
        assert explorer.figure.dpi == 2 * dpi
        assert Image.open(io.BytesIO(view.background)).size == (2 * width, 2 * height)
        header = view.frame[4:4 + int.from_bytes(view.frame[:4], "little")].decode()
        assert f'"width":{2 * width}' in header.replace(".0", "")
        assert '"ratio":2.0' in header  # the page shows it at half its pixels: the same size, sharper
        view.pixel_ratio = 100.0
        assert explorer.figure.dpi == 4 * dpi
        view.pixel_ratio = float("nan")
        assert explorer.figure.dpi == dpi
    finally:
        explorer.close()
