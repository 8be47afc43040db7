"""valueloss.viz.app: the shared controls drive the right explorers, and the figures show the new settings."""


import matplotlib

matplotlib.use("Agg")

import ipywidgets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from valueloss.viz import app  # noqa: E402


def ref_clipped_loss(v, old, ret, eps):
    """max((v_clip - R)^2, (v - R)^2), plain numpy."""
    v_clip = old + np.clip(v - old, -eps, eps)
    return np.maximum((v - ret) ** 2, (v_clip - ret) ** 2)


def span(patch):
    """(left, right) x-limits of an axvspan patch."""
    return patch.get_x(), patch.get_x() + patch.get_width()


@pytest.fixture(scope="module")
def board():
    dashboard = app.Dashboard(backend="agg")
    yield dashboard
    dashboard.close()


@pytest.fixture
def fresh(board):
    """The module's dashboard, reset to its default settings."""
    for name, value in {"clip_eps": 0.2, "old_value": 0.0, "return": 1.0, "extent": 1.5}.items():
        board.controls[name].value = value
    return board


def test_layout_holds_shared_controls_and_every_explorer(fresh):
    """Four visible shared sliders; each explorer's widget sits beside an explanation; own sliders hidden."""
    assert list(fresh.controls) == ["clip_eps", "old_value", "return", "extent"]
    for name, control in fresh.controls.items():
        assert isinstance(control, ipywidgets.FloatSlider) and control.description == name
        assert control.layout.display != "none"
        assert (control.min, control.max, control.step) == app.CONTROL_RANGES[name]
    panels = fresh.widget.children[2:]
    assert [p.children for p in panels] == [(e.widget, fresh.notes[n]) for n, e in fresh.explorers.items()]
    for explorer in fresh.explorers.values():
        assert all(control.layout.display == "none" for control in explorer.controls.values())
    assert all("<h3" in note.value and len(note.value) > 200 for note in fresh.notes.values())


def test_clip_eps_drives_all_three_and_moves_the_band(fresh):
    """clip_eps reaches every explorer; the 1D band becomes [v_old - eps, v_old + eps]."""
    fresh.controls["clip_eps"].value = 0.35
    assert {e.params["clip_eps"] for e in fresh.explorers.values()} == {0.35}
    np.testing.assert_allclose(span(fresh.explorers["loss_curve"].artists["band"]), (-0.35, 0.35))
    image = fresh.explorers["surface"].artists["clipped"].get_array()
    offsets = np.linspace(-1.5, 1.5, image.shape[0])
    dv, dr = np.meshgrid(offsets, offsets)
    np.testing.assert_allclose(image, ref_clipped_loss(dv, 0.0, dr, 0.35), rtol=1e-6, atol=1e-9)


def test_old_value_and_return_reach_the_gradient_slice_as_their_difference(fresh):
    """old_value and return move the 1D lines; the gradient slice sits at R - v_old; the surface is untouched."""
    surface_before = fresh.explorers["surface"].artists["clipped"].get_array().copy()
    fresh.controls["old_value"].value = 0.3
    fresh.controls["return"].value = -0.5
    curve, gradient = fresh.explorers["loss_curve"], fresh.explorers["gradient"]
    assert curve.params == {"clip_eps": 0.2, "old_value": 0.3, "return": -0.5}
    assert gradient.params["return"] == pytest.approx(-0.8, abs=1e-12)
    np.testing.assert_allclose(curve.artists["old_value"].get_xdata(), [0.3, 0.3])
    np.testing.assert_allclose(curve.artists["return"].get_xdata(), [-0.5, -0.5])
    np.testing.assert_allclose(gradient.artists["slice"].get_ydata(), [-0.8, -0.8])
    np.testing.assert_array_equal(fresh.explorers["surface"].artists["clipped"].get_array(), surface_before)
    assert "= -0.80" in fresh.notes["gradient"].value and "= -0.80" in fresh.notes["surface"].value


def test_extent_drives_the_planes_only(fresh):
    """extent sets the half-width of the surface and region maps and leaves the 1D explorer alone."""
    fresh.controls["extent"].value = 2.0
    for image in (fresh.explorers["surface"].artists["unclipped"], fresh.explorers["gradient"].artists["regions"]):
        np.testing.assert_allclose(image.get_extent(), (-2.0, 2.0, -2.0, 2.0))
    assert fresh.explorers["loss_curve"].params == {"clip_eps": 0.2, "old_value": 0.0, "return": 1.0}


def test_figures_change_when_a_control_moves(fresh):
    """Moving clip_eps changes the rendered pixels of every explorer's canvas."""
    before = {n: np.asarray(e.figure.canvas.buffer_rgba()).copy() for n, e in fresh.explorers.items()}
    fresh.controls["clip_eps"].value = 0.5
    for name, explorer in fresh.explorers.items():
        assert not np.array_equal(np.asarray(explorer.figure.canvas.buffer_rgba()), before[name]), name


def test_text_repr_is_stable_and_the_widget_view_is_offered(fresh):
    """The display bundle has the widget view and a plain-text summary of the settings."""
    bundle = fresh._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"] == (
        "valueloss dashboard: clip_eps=0.20, old_value=0.00, return=1.00, extent=1.50; "
        "explorers: loss_curve, surface, gradient"
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"clip_eps": 1.5}, ValueError, r"clip_eps must lie in \[0.0, 1.0\].*got 1.5"),
        ({"old_value": -2.0}, ValueError, r"old_value must lie in \[-1.5, 1.5\].*got -2.0"),
        ({"return_": "1"}, TypeError, "return must be a number; got str"),
        ({"extent": 0.1}, ValueError, r"extent must lie in \[0.25, 3.0\].*got 0.1"),
    ],
)
def test_out_of_range_settings_are_rejected(kwargs, error, message):
    """A starting value outside its slider's range raises, naming the argument (sliders would clip silently)."""
    with pytest.raises(error, match=message):
        app.Dashboard(backend="agg", **kwargs)


def test_canvas_dashboard_sends_one_frame_per_figure_for_a_shared_change():
    """With live figures, one shared clip_eps change sends one new frame to each of the three views, no background."""
    pytest.importorskip("anywidget")
    board = app.Dashboard(backend="canvas")
    try:
        sent = {name: [] for name in board.explorers}
        for name, explorer in board.explorers.items():
            explorer.view.observe(lambda change, name=name: sent[name].append(change["name"]),
                                  names=["frame", "background"])
        board.controls["clip_eps"].value = 0.4
        assert sent == {name: ["frame"] for name in board.explorers}
    finally:
        board.close()
