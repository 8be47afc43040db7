"""Tests of valueloss.lessons.escape and the keep_values hook of the toy critic it builds on."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

from valueloss import Region
from valueloss.experiments.toy_critic import ToyCriticConfig, make_toy_problem, run_toy_critic
from valueloss.lessons import escape
from valueloss.viz.plotting import find_artist

SMALL = dict(num_samples=64, hidden=16, update_epochs=4)


def _reference_regions(values, old_values, returns, clip_eps):
    """Region names per prediction, from the formula written out with plain Python floats."""
    names = []
    for v, old, r in zip(values.tolist(), old_values.tolist(), returns.tolist()):
        if abs(v - old) <= clip_eps:
            names.append("inside")
            continue
        v_clip = old + max(-clip_eps, min(clip_eps, v - old))
        names.append("clipped" if (v_clip - r) ** 2 > (v - r) ** 2 else "unclipped")
    return np.array(names)


# ------------------------------------------------------------------------------------ the toy critic's hook


def test_keep_values_adds_the_predictions_and_changes_nothing_else():
    """keep_values=True adds values (iterations + 1, N) and returns (N,); the curves are bit-identical."""
    config = ToyCriticConfig(scale=10.0, clip_eps=0.5, num_iterations=3, **SMALL)
    plain, kept = run_toy_critic(config), run_toy_critic(config, keep_values=True)
    assert set(plain) == {"relative_error", "explained_variance", "clip_fraction"}
    assert set(kept) == set(plain) | {"values", "returns"}
    for key in plain:
        np.testing.assert_array_equal(kept[key], plain[key])
    assert kept["values"].shape == (4, 64) and kept["returns"].shape == (64,)
    assert kept["values"].dtype == kept["returns"].dtype == np.float64


def test_kept_values_reproduce_the_recorded_error():
    """The kept predictions and returns give back relative_error (a norm computed here in float64)."""
    config = ToyCriticConfig(scale=100.0, clip_eps=0.2, num_iterations=3, normalize_returns=True, **SMALL)
    kept = run_toy_critic(config, keep_values=True)
    _, unit_targets = make_toy_problem(64, 1, 0)
    np.testing.assert_allclose(kept["returns"], 100.0 * unit_targets.double().numpy(), rtol=1e-6)
    returns = kept["returns"]
    errors = [np.linalg.norm(v - returns) / np.linalg.norm(returns - returns.mean()) for v in kept["values"]]
    np.testing.assert_allclose(errors, kept["relative_error"], rtol=1e-5)


# --------------------------------------------------------------------------------------------- measuring


def test_measures_agree_with_a_loop_over_the_predictions():
    """Share outside, mean and max distance, share towards R and regions match a plain loop."""
    moves = escape.measure_escape(ToyCriticConfig(clip_eps=0.2, **SMALL))
    outside = towards = 0
    distances = []
    for v, old, r in zip(moves.values.tolist(), moves.old_values.tolist(), moves.returns.tolist()):
        distances.append(abs(v - old) / 0.2)
        outside += abs(v - old) > 0.2
        towards += (v - old > 0) == (r - old > 0)
    assert moves.outside_fraction == pytest.approx(outside / 64)
    assert moves.mean_move == pytest.approx(sum(distances) / 64)
    assert moves.max_move == pytest.approx(max(distances))
    assert moves.towards_fraction == pytest.approx(towards / 64)
    names = np.array(["inside", "clipped", "unclipped"])
    reference = _reference_regions(moves.values, moves.old_values, moves.returns, 0.2)
    assert (names[moves.regions] == reference).mean() > 0.99  # float ties at the edge may differ


def test_the_band_bounds_nothing_on_the_toy_critic():
    """At the notebooks' setting most predictions leave the band in one iteration, some by many eps."""
    moves = escape.measure_escape(ToyCriticConfig(clip_eps=0.2))
    assert moves.outside_fraction > 0.5 and moves.max_move > 5.0
    large = escape.measure_escape(ToyCriticConfig(scale=100.0, clip_eps=0.2))
    assert large.outside_fraction > 0.95 and large.mean_move > 10.0


def test_small_steps_keep_the_predictions_inside():
    """With a tiny learning rate and one epoch every prediction ends the iteration inside its band."""
    moves = escape.measure_escape(ToyCriticConfig(clip_eps=0.2, learning_rate=1e-4, update_epochs=1))
    assert moves.outside_fraction == 0.0 and moves.max_move < 1.0


def test_a_later_iteration_is_the_same_slice_of_a_longer_run():
    """measure_escape(iteration=k) equals escape_from_run of a longer run at k (iterations do not see the end)."""
    config = ToyCriticConfig(clip_eps=0.3, **SMALL)
    direct = escape.measure_escape(config, iteration=2)
    run = run_toy_critic(config.replace(num_iterations=4), keep_values=True)
    sliced = escape.escape_from_run(run, 0.3, 2)
    np.testing.assert_array_equal(direct.values, sliced.values)
    np.testing.assert_array_equal(direct.old_values, sliced.old_values)
    assert direct.iteration == sliced.iteration == 2


def test_normalised_returns_measure_against_the_band_in_return_units():
    """With normalize_returns the band is clip_eps * scale wide in the units of the returns."""
    moves = escape.measure_escape(ToyCriticConfig(scale=50.0, clip_eps=0.2, normalize_returns=True, **SMALL))
    assert moves.clip_eps == pytest.approx(10.0)
    np.testing.assert_allclose(moves.moved, (moves.values - moves.old_values) / 10.0)


@pytest.mark.parametrize("clip_eps", [None, 0.0, -1.0, float("nan"), True])
def test_a_band_of_no_width_is_refused(clip_eps):
    """Distances in units of clip_eps need clip_eps > 0: the error names it and what arrived."""
    with pytest.raises(ValueError, match=r"clip_eps must be a finite number > 0.*got"):
        escape.escape_from_run({"values": np.zeros((2, 3)), "returns": np.zeros(3)}, clip_eps)


def test_a_run_without_kept_values_or_out_of_range_iteration_is_refused():
    """escape_from_run says to use keep_values=True, and names the iterations a run has."""
    run = run_toy_critic(ToyCriticConfig(num_iterations=2, **SMALL))
    with pytest.raises(ValueError, match="keep_values=True"):
        escape.escape_from_run(run, 0.2)
    kept = run_toy_critic(ToyCriticConfig(num_iterations=2, **SMALL), keep_values=True)
    with pytest.raises(ValueError, match=r"iteration must be an int in \[1, 2\].*got 3"):
        escape.escape_from_run(kept, 0.2, 3)
    with pytest.raises(TypeError, match="ToyCriticConfig"):
        escape.measure_escape({"clip_eps": 0.2})


# ------------------------------------------------------------------------------------ the figure and explorer


def test_plot_escape_draws_every_prediction_where_it_went():
    """The dots of each region sit at (moved / eps, R - v_old); the band spans -1..1; the title gives the share."""
    moves = escape.measure_escape(ToyCriticConfig(clip_eps=0.2, **SMALL))
    _, ax = plt.subplots()
    assert escape.plot_escape(ax, moves) is ax
    regions, shown = moves.regions, 0
    for region in Region:
        dots = find_artist(ax, f"valueloss.escape.{region.name.lower()}")
        chosen = regions == region
        expected = np.column_stack([(moves.values - moves.old_values)[chosen] / 0.2,
                                    (moves.returns - moves.old_values)[chosen]])
        np.testing.assert_allclose(dots.get_offsets(), expected.reshape(-1, 2))
        assert f"({int(chosen.sum())})" in dots.get_label()
        shown += len(dots.get_offsets())
    assert shown == 64
    band = find_artist(ax, "valueloss.escape.band")
    if hasattr(band, "get_width"):  # a Rectangle (matplotlib >= 3.9)
        edges = band.get_x(), band.get_x() + band.get_width()
    else:  # a Polygon
        edges = band.get_xy()[:, 0].min(), band.get_xy()[:, 0].max()
    assert edges == pytest.approx((-1.0, 1.0))
    assert f"{moves.outside_fraction:.0%} outside the band" in ax.get_title()
    assert ax.get_xlim()[1] >= moves.max_move
    plt.close("all")


def test_explorer_slider_redraws_the_new_iteration():
    """Moving the learning-rate slider re-trains: the dots and the summary are those of a direct measurement."""
    base = ToyCriticConfig(clip_eps=0.2, **SMALL)
    explorer = escape.EscapeExplorer(learning_rate=3e-2, epochs=4, base=base)
    before = explorer.image.value
    explorer.learning_rate.value = 1e-4
    explorer.epochs.value = 1
    expected = escape.measure_escape(base.replace(learning_rate=explorer.learning_rate.value, update_epochs=1))
    inside = find_artist(explorer.ax, "valueloss.escape.inside")
    np.testing.assert_allclose(inside.get_offsets()[:, 0], (expected.values - expected.old_values) / 0.2)
    assert len(inside.get_offsets()) == 64, "a tiny step leaves every prediction inside its band"
    assert "0% outside the band" in explorer.ax.get_title()
    assert "<b>0%</b>" in explorer.summary.value
    assert explorer.image.value[:4] == b"\x89PNG" and explorer.image.value != before
