"""valueloss.viz.plotting: the artists hold the numbers of independently written reference formulas."""


import fresh
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from bands import band  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from reference import token_grad, token_loss, token_region  # noqa: E402

from valueloss.viz import plotting  # noqa: E402

# --------------------------------------------------------------------------- the reference, token by token


def _per_token(fn, *arrays, **kwargs):
    """``fn`` of the reference, applied token by token over broadcast arrays (float64 numpy)."""
    return np.vectorize(lambda v, o, r: fn(float(v), float(o), float(r), **kwargs), otypes=[float])(*arrays)


def ref_branches(v, old, ret, eps):
    """Unclipped, clipped and max per-token squared losses from the reference."""
    return (_per_token(token_loss, v, old, ret, clip_eps=None),
            _per_token(token_loss, v, old, ret, clip_eps=eps, variant="clipped"),
            _per_token(token_loss, v, old, ret, clip_eps=eps))


def ref_grad(v, old, ret, eps, band_closed=None):
    """d max-loss / dv from the reference: the live branch's slope, ties halved, the band's edges closed or open
    (by default as the installed torch's clamp, :data:`reference.AUTOGRAD_BAND_CLOSED`)."""
    return _per_token(token_grad, v, old, ret, clip_eps=eps, band_closed=band_closed)


def ref_regions(v, old, ret, eps, band_closed=None):
    """Region codes from the reference: 0 inside the band (as in :func:`ref_grad`), 1 outside with the clipped
    branch strictly larger, 2 otherwise."""
    return _per_token(token_region, v, old, ret, clip_eps=eps, band_closed=band_closed).astype(int)


def new_ax(ncols=1):
    fig = Figure()
    axes = fig.subplots(1, ncols)
    return axes


# --------------------------------------------------------------------------- 1D


def test_loss_curve_lines_match_reference():
    """loss_curve draws the unclipped, clipped and max branches and the band exactly where they are."""
    ax = plotting.loss_curve(new_ax(), old_value=0.3, return_=1.2, clip_eps=0.25, value_range=(-1, 2), num=301)
    x = np.linspace(-1, 2, 301)
    lu, lc, lmax = ref_branches(x, 0.3, 1.2, 0.25)
    for gid, expected in (("unclipped", lu), ("clipped", lc), ("loss", lmax)):
        line = plotting.find_artist(ax, "valueloss.loss_curve." + gid)
        np.testing.assert_allclose(line.get_xdata(), x, atol=1e-12)
        np.testing.assert_allclose(line.get_ydata(), expected, atol=1e-12)
    band = plotting.find_artist(ax, "valueloss.loss_curve.band")
    assert band.get_x() == pytest.approx(0.05) and band.get_width() == pytest.approx(0.5)
    assert plotting.find_artist(ax, "valueloss.loss_curve.return").get_xdata()[0] == pytest.approx(1.2)
    assert "0.25" in ax.get_title() and ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() is not None


def test_update_loss_curve_moves_the_same_artists():
    """update_loss_curve changes the data of the existing lines (no new artists) to the new settings."""
    ax = plotting.loss_curve(new_ax(), clip_eps=0.2, value_range=(-2, 2), num=201)
    line = plotting.find_artist(ax, "valueloss.loss_curve.loss")
    count = len(ax.get_children())
    plotting.update_loss_curve(ax, old_value=-0.5, return_=0.7, clip_eps=0.6)
    assert plotting.find_artist(ax, "valueloss.loss_curve.loss") is line
    assert len(ax.get_children()) == count
    x = np.linspace(-2, 2, 201)
    np.testing.assert_allclose(line.get_ydata(), ref_branches(x, -0.5, 0.7, 0.6)[2], atol=1e-12)
    band = plotting.find_artist(ax, "valueloss.loss_curve.band")
    assert (band.get_x(), band.get_width()) == pytest.approx((-1.1, 1.2))
    assert "0.60" in ax.get_title()


def test_loss_curve_variant_clipped_draws_the_clipped_branch():
    """With variant='clipped' the loss used is the clipped branch (Stable-Baselines3)."""
    ax = plotting.loss_curve(new_ax(), clip_eps=0.2, variant="clipped", value_range=(-1, 2), num=51)
    x = np.linspace(-1, 2, 51)
    np.testing.assert_allclose(plotting.find_artist(ax, "valueloss.loss_curve.loss").get_ydata(),
                               ref_branches(x, 0.0, 1.0, 0.2)[1], atol=1e-12)


def test_gradient_curve_matches_reference_and_marks_zeroed_stretch():
    """gradient_curve's line is the closed-form gradient; the zeroed segment covers exactly the clipped region."""
    ax = plotting.gradient_curve(new_ax(), old_value=0.0, return_=1.0, clip_eps=0.2, value_range=(-1, 3), num=401)
    line = plotting.find_artist(ax, "valueloss.gradient_curve.grad")
    grad, x = line.get_ydata(), line.get_xdata()  # the drawn grid (torch.linspace), so that ties match
    np.testing.assert_allclose(x, np.linspace(-1, 3, 401), atol=1e-12)
    np.testing.assert_allclose(grad, ref_grad(x, 0.0, 1.0, 0.2), atol=1e-12)
    zeroed = plotting.find_artist(ax, "valueloss.gradient_curve.zeroed").get_ydata()
    clipped = ref_regions(x, 0.0, 1.0, 0.2) == 1
    assert clipped.any()
    np.testing.assert_array_equal(~np.isnan(zeroed), clipped)
    assert np.all(grad[clipped] == 0.0)
    # the clipped region for v_old=0, R=1, eps=0.2 is (0.2, 1.8): between the band edge and its mirror image
    assert x[clipped].min() > 0.2 and x[clipped].max() < 1.8 and x[clipped].min() < 0.22 and x[clipped].max() > 1.78


def test_update_gradient_curve_keeps_limits_when_asked():
    """update_gradient_curve(rescale=False) changes the data but not the axis limits."""
    ax = plotting.gradient_curve(new_ax(), value_range=(-2, 2), num=101)
    limits = ax.get_ylim()
    plotting.update_gradient_curve(ax, return_=-1.5, clip_eps=0.5, rescale=False)
    assert ax.get_ylim() == limits
    x = np.linspace(-2, 2, 101)
    np.testing.assert_allclose(plotting.find_artist(ax, "valueloss.gradient_curve.grad").get_ydata(),
                               ref_grad(x, 0.0, -1.5, 0.5), atol=1e-12)


# --------------------------------------------------------------------------- 2D


@pytest.mark.parametrize("kind", ["unclipped", "clipped", "difference"])
def test_loss_surface_image_matches_reference(kind):
    """loss_surface's image is the loss over (v - v_old, R - v_old), rows = return offsets, origin lower."""
    ax = plotting.loss_surface(new_ax(), kind=kind, clip_eps=0.3, extent=1.5, num=41)
    image = plotting.find_artist(ax, "valueloss.loss_surface.image")
    offsets = np.linspace(-1.5, 1.5, 41)
    dv, dr = np.meshgrid(offsets, offsets)
    lu, _, lmax = ref_branches(dv, 0.0, dr, 0.3)
    expected = {"unclipped": lu, "clipped": lmax, "difference": lmax - lu}[kind]
    np.testing.assert_allclose(np.asarray(image.get_array()), expected, atol=1e-12)
    assert image.get_extent() == pytest.approx([-1.5, 1.5, -1.5, 1.5]) and image.origin == "lower"
    assert image.get_clim()[1] == pytest.approx(expected.max())
    assert plotting.find_artist(ax, "valueloss.loss_surface.band_high").get_xdata()[0] == pytest.approx(0.3)


def test_difference_is_nonnegative_and_zero_inside_band():
    """For variant='max' clipping only adds loss, and adds none inside the band."""
    data = plotting.surface_data(clip_eps=0.25, extent=1.0, num=101, parts=("difference",))
    dv = data["value_offsets"][None, :].repeat(101, 0)
    assert data["difference"].min() >= 0.0
    assert np.all(data["difference"][np.abs(dv) <= 0.25] == 0.0)


def test_update_loss_surface_new_eps_and_extent():
    """update_loss_surface replaces the image data, extent and guides in place."""
    ax = plotting.loss_surface(new_ax(), kind="difference", clip_eps=0.2, extent=1.0, num=33)
    image = plotting.find_artist(ax, "valueloss.loss_surface.image")
    plotting.update_loss_surface(ax, kind="difference", clip_eps=0.5, extent=2.0)
    assert plotting.find_artist(ax, "valueloss.loss_surface.image") is image
    offsets = np.linspace(-2, 2, 33)
    dv, dr = np.meshgrid(offsets, offsets)
    lu, _, lmax = ref_branches(dv, 0.0, dr, 0.5)
    np.testing.assert_allclose(np.asarray(image.get_array()), lmax - lu, atol=1e-12)
    assert image.get_extent() == pytest.approx([-2, 2, -2, 2]) and ax.get_xlim() == pytest.approx((-2, 2))
    assert plotting.find_artist(ax, "valueloss.loss_surface.band_low").get_xdata()[0] == pytest.approx(-0.5)


def test_region_map_codes_and_colours():
    """region_map shows clip_regions' codes; the clipped region is vermillion (Okabe-Ito)."""
    ax = plotting.region_map(new_ax(), clip_eps=0.2, extent=1.0, num=57)
    image = plotting.find_artist(ax, "valueloss.region_map.image")
    offsets = np.linspace(-1, 1, 57)
    dv, dr = np.meshgrid(offsets, offsets)
    np.testing.assert_array_equal(np.asarray(image.get_array()), ref_regions(dv, 0.0, dr, 0.2))
    rgba = image.to_rgba(np.array([0, 1, 2]))
    assert matplotlib.colors.to_hex(rgba[1]) == plotting.OKABE_ITO["vermillion"].lower()
    assert len(ax.get_legend().get_texts()) == 4
    plotting.update_region_map(ax, clip_eps=0.6)
    np.testing.assert_array_equal(np.asarray(image.get_array()), ref_regions(dv, 0.0, dr, 0.6))


def test_gradient_field_arrows_are_minus_the_gradient():
    """gradient_field's quiver holds U = -d loss/dv and V = 0 on the coarse grid; update follows clip_eps and extent."""
    ax = plotting.gradient_field(new_ax(), clip_eps=0.2, extent=1.0, num=9)
    quiver = plotting.find_artist(ax, "valueloss.gradient_field.quiver")
    offsets = np.linspace(-1, 1, 9)
    dv, dr = np.meshgrid(offsets, offsets)
    np.testing.assert_allclose(np.asarray(quiver.U).reshape(9, 9), -ref_grad(dv, 0.0, dr, 0.2), atol=1e-12)
    assert np.all(np.asarray(quiver.V) == 0)
    plotting.update_gradient_field(ax, clip_eps=0.5)
    np.testing.assert_allclose(np.asarray(quiver.U).reshape(9, 9), -ref_grad(dv, 0.0, dr, 0.5), atol=1e-12)
    plotting.update_gradient_field(ax, clip_eps=0.5, extent=2.0)
    quiver = plotting.find_artist(ax, "valueloss.gradient_field.quiver")
    assert np.asarray(quiver.X).max() == pytest.approx(2.0)
    assert len([c for c in ax.get_children() if c.get_gid() == "valueloss.gradient_field.quiver"]) == 1


# --------------------------------------------------------------------------- descent


def test_descent_trajectories_follow_a_plain_loop():
    """descent_trajectories draws the values of a hand-written descent loop with refreshed old values."""
    ax = plotting.descent_trajectories(new_ax(), value=0.0, return_=1.0, clip_eps=0.2, lr=0.3, steps=12,
                                       refresh_every=4)
    v, old, clipped, plain, p = 0.0, 0.0, [0.0], [0.0], 0.0
    for k in range(12):
        if k % 4 == 0:
            old = v
        v -= 0.3 * 0.5 * float(ref_grad(v, old, 1.0, 0.2))
        p -= 0.3 * (p - 1.0)
        clipped.append(v)
        plain.append(p)
    np.testing.assert_allclose(plotting.find_artist(ax, "valueloss.descent.clipped").get_ydata(), clipped, atol=1e-12)
    np.testing.assert_allclose(plotting.find_artist(ax, "valueloss.descent.unclipped").get_ydata(), plain, atol=1e-12)


# --------------------------------------------------------------------------- conventions


def test_every_function_returns_its_axes_and_makes_one_when_none():
    """Each plot function returns the Axes it was given, and a new Axes (via pyplot) when ax=None."""
    import matplotlib.pyplot as plt

    for function in (plotting.loss_curve, plotting.gradient_curve, plotting.loss_surface, plotting.region_map,
                     plotting.gradient_field, plotting.descent_trajectories):
        ax = new_ax()
        assert function(ax) is ax
        made = function()
        assert isinstance(made, matplotlib.axes.Axes) and made is not ax
        plt.close(made.figure)


def test_colours_are_okabe_ito():
    """Every line of the 1D pictures uses an Okabe-Ito colour."""
    ax = plotting.gradient_curve(plotting.loss_curve(new_ax()))
    allowed = {c.lower() for c in plotting.OKABE_ITO.values()} | {matplotlib.colors.to_hex("0.6")}
    for line in ax.get_lines():
        assert matplotlib.colors.to_hex(line.get_color()) in allowed


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: plotting.loss_surface(new_ax(), kind="ratio"), "kind must be one of"),
        (lambda: plotting.region_map(new_ax(), extent=0.0), "extent must be positive"),
        (lambda: plotting.loss_curve(new_ax(), clip_eps=-0.1), "clip_eps"),
        (lambda: plotting.loss_curve(new_ax(), value_range=(1.0, 0.0)), "value_range"),
        (lambda: plotting.surface_data(parts=("grads",)), "parts"),
        (lambda: plotting.find_artist(new_ax(), "nothing"), "no artist"),
    ],
)
def test_bad_arguments_are_named(call, match):
    """Bad arguments raise an error that names the argument."""
    with pytest.raises((ValueError, KeyError), match=match):
        call()


def test_ax_must_be_an_axes():
    """Passing something else than an Axes as ax is a TypeError naming ax."""
    with pytest.raises(TypeError, match="ax must be a matplotlib Axes"):
        plotting.loss_curve("left")


def test_import_does_not_touch_pyplot():
    """Importing valueloss.viz.plotting and valueloss.viz.widgets loads neither pyplot nor anywidget; rcParams stay
    (in a fresh interpreter, tests/fresh.py)."""
    result = fresh.stage("import valueloss.viz")
    assert "valueloss.viz.widgets" in result["modules"]
    assert "matplotlib.pyplot" not in result["modules"], "pyplot imported"
    assert "anywidget" not in result["modules"], "anywidget imported"
    assert result["stdout"] == "rcParams unchanged\n"


@settings(max_examples=40, deadline=None)
@given(
    old=st.floats(-3, 3), ret=st.floats(-3, 3), eps=st.floats(0, 2), num=st.sampled_from([2, 7, 41]),
    band_closed=st.booleans(),
)
def test_curve_data_matches_reference_for_any_setting(old, ret, eps, num, band_closed):
    """loss_curve_data and gradient_curve_data agree with the reference for any old value, return, eps, grid,
    with the band's edges closed (torch <= 2.13) and open (torch >= 2.14) on any installed torch."""
    with band(band_closed):
        loss = plotting.loss_curve_data(old_value=old, return_=ret, clip_eps=eps, num=num)
        grad = plotting.gradient_curve_data(old_value=old, return_=ret, clip_eps=eps, num=num)
    x = loss["values"]
    lu, lc, lmax = ref_branches(x, old, ret, eps)
    np.testing.assert_allclose(loss["loss_unclipped"], lu, atol=1e-12)
    np.testing.assert_allclose(loss["loss_clipped"], lc, atol=1e-12)
    np.testing.assert_allclose(loss["loss"], lmax, atol=1e-12)
    np.testing.assert_array_equal(loss["regions"], ref_regions(x, old, ret, eps, band_closed))
    np.testing.assert_allclose(grad["grad"], ref_grad(x, old, ret, eps, band_closed), atol=1e-12)
    assert x[0] < min(old - eps, ret) and x[-1] > max(old + eps, ret)  # the default range shows band and return
