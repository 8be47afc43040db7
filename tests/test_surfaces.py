"""valueloss.viz.surfaces: notebook 02's contour pictures show the data they claim to, at a width that fits."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.path import Path  # noqa: E402
from reference import token_loss  # noqa: E402

from valueloss.viz import plotting, surfaces  # noqa: E402


def _axes(n=1):
    return Figure(figsize=(4.0 * n, 3.5)).subplots(1, n)


def _contours(ax):
    return next(c for c in ax.collections if c.get_gid() == "valueloss.surfaces.contours")


def _flat_length(path) -> float:
    """Total length of the path's segments that run parallel to the v - v_old axis (constant R - v_old)."""
    steps = np.diff(path.vertices, axis=0)
    joined = np.ones(len(steps), bool) if path.codes is None else path.codes[1:] != Path.MOVETO  # not a new piece
    flat = joined & (np.abs(steps[:, 1]) < 1e-9)
    return float(np.abs(steps[flat, 0]).sum())


def test_contours_lie_at_the_requested_loss_levels():
    """The contour set holds the levels inside the data's range; its points have that loss (reference formula)."""
    ax = surfaces.loss_contours(_axes(), kind="clipped", clip_eps=0.2, extent=1.0, num=101)
    contours = _contours(ax)
    np.testing.assert_allclose(contours.levels, surfaces.CONTOUR_LEVELS)  # every default level is within 0..4
    level_index = list(contours.levels).index(0.5)
    points = contours.get_paths()[level_index].vertices[::7]
    losses = [token_loss(float(dv), 0.0, float(dr), clip_eps=0.2) for dv, dr in points]
    np.testing.assert_allclose(losses, 0.5, atol=0.03)  # up to the grid's linear interpolation


def test_clipped_contours_turn_flat_where_unclipped_ones_do_not():
    """The 0.25 contour of the clipped loss has flat stretches (the wedges); the unclipped one has none."""
    flat = {}
    for kind in ("unclipped", "clipped"):
        ax = surfaces.loss_contours(_axes(), kind=kind, clip_eps=0.2, extent=1.0, num=129, levels=(0.25,))
        flat[kind] = sum(_flat_length(path) for path in _contours(ax).get_paths())
    assert flat["unclipped"] < 0.05 < flat["clipped"], flat


def test_surface_panels_share_one_scale_and_fit_eleven_inches():
    """The two loss panels share the colour scale 0..vmax; the figure is at most 11 inches wide; titles name eps."""
    axes = surfaces.surface_panels(clip_eps=0.3, num=64, axes=_axes(3))
    images = [plotting.find_artist(ax, "valueloss.loss_surface.image") for ax in axes]
    assert images[0].get_clim() == images[1].get_clim() == (0.0, 4.0)
    np.testing.assert_allclose(images[2].get_array(), plotting.surface_data(clip_eps=0.3, num=64)["difference"])
    assert all("0.3" in ax.get_title() for ax in axes)
    made = surfaces.surface_panels(num=32)
    assert made[0].figure.get_figwidth() <= 11.0
    with pytest.raises(ValueError, match="three Axes"):
        surfaces.surface_panels(axes=_axes(2))


def test_wide_difference_frames_a_window_inside_the_band():
    """The frame spans [-window, window]^2; the difference is 0 inside the band and positive beyond it."""
    ax = surfaces.wide_difference(_axes(), clip_eps=2.0, extent=4.0, window=1.0)
    frame = plotting.find_artist(ax, "valueloss.surfaces.window")
    assert (frame.get_x(), frame.get_y(), frame.get_width(), frame.get_height()) == (-1.0, -1.0, 2.0, 2.0)
    image = plotting.find_artist(ax, "valueloss.loss_surface.image")
    z = np.asarray(image.get_array())
    x = np.linspace(-4.0, 4.0, z.shape[1])
    assert (z[:, np.abs(x) <= 2.0] == 0).all() and (z[:, np.abs(x) > 2.0] > 0).any()
    assert tuple(image.get_extent()) == (-4.0, 4.0, -4.0, 4.0)
