"""valueloss.viz.why: the policy's ratio clip and the critic's value clip, and where each has no gradient."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from valueloss.viz import why  # noqa: E402


def test_policy_flat_beyond_the_band_for_a_positive_advantage_and_below_it_for_a_negative_one():
    up = why.policy_clip_data(clip_eps=0.2, advantage=1.0)
    assert np.array_equal(up["zero_grad"], up["ratio"] > 1.2 + 1e-12)
    down = why.policy_clip_data(clip_eps=0.2, advantage=-1.0)
    assert np.array_equal(down["zero_grad"], down["ratio"] < 0.8 - 1e-12)
    assert np.all(up["objective"] <= up["unclipped"])  # the min is pessimistic


def test_value_flat_from_the_band_edge_to_the_mirror_point():
    data = why.value_clip_data(clip_eps=0.25, old_value=0.0, return_=1.0, num=351)
    v = data["value"]
    expected = (v > 0.25 + 1e-12) & (v < 1.75 - 1e-12)
    assert np.array_equal(data["zero_grad"] & ~np.isclose(v, 1.75), expected)
    assert np.all(data["loss"] >= data["unclipped"])  # the max is pessimistic


def test_figure_has_two_panels_with_their_flat_stretches():
    left, right = why.plot_policy_and_value_clipping(0.2)
    labels = [[line.get_label() for line in ax.get_lines()] for ax in (left, right)]
    assert all("no gradient" in names for names in labels)
    plt.close("all")


@pytest.mark.parametrize("bad, error", [(0.0, ValueError), (1.5, ValueError), ("0.2", TypeError), (True, TypeError)])
def test_bad_clip_eps_is_named(bad, error):
    with pytest.raises(error, match="clip_eps"):
        why.policy_clip_data(bad)
