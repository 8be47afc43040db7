"""Tests of valueloss.viz.peers_plots: the plotted data equals the peers' gradients and losses."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from valueloss import peers as P  # noqa: E402
from valueloss.viz import peers_plots as PP  # noqa: E402


def test_gradient_map_shows_the_peer_gradient():
    """The mesh holds peer_gradient_map's values; band lines sit at +-clip_eps."""
    ax = PP.plot_gradient_map("Stable-Baselines3", clip_eps=0.3, num=21)
    mesh = ax.collections[0]
    _, _, grad = P.peer_gradient_map("Stable-Baselines3", clip_eps=0.3, num=21)
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(21, 21), grad.numpy())
    xs = sorted(line.get_xdata()[0] for line in ax.get_lines()[:2])
    np.testing.assert_allclose(xs, [-0.3, 0.3])
    assert "0.3" in ax.get_title() and ax.get_xlabel() == r"$v - v_{old}$"


def test_gradient_difference_is_zero_inside_the_band_for_sb3_vs_scaled_max():
    """SB3 minus CleanRL: inside the band SB3's gradient is twice CleanRL's, so the difference equals CleanRL's."""
    ax = PP.plot_gradient_difference("Stable-Baselines3", "CleanRL", clip_eps=0.2, num=21)
    diff = np.asarray(ax.collections[0].get_array()).reshape(21, 21)
    delta, _, grad_cleanrl = P.peer_gradient_map("CleanRL", clip_eps=0.2, num=21)
    inside = (delta.abs() < 0.2 - 1e-9).numpy()
    np.testing.assert_allclose(diff[inside], grad_cleanrl.numpy()[inside], atol=1e-12)


def test_peer_losses_bars_and_markers():
    """One bar per peer with its loss; markers at ValueLoss's losses."""
    g = torch.Generator().manual_seed(0)
    values, old, returns = (torch.randn(3, 8, generator=g) for _ in range(3))
    results = P.run_peers(values, old, returns, torch.ones(3, 8, dtype=torch.bool), clip_eps=0.2)
    ax = PP.plot_peer_losses(results, clip_eps=0.2)
    np.testing.assert_allclose([p.get_width() for p in ax.patches], [r.loss for r in results])
    np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), [r.valueloss_loss for r in results])
    assert [t.get_text() for t in ax.get_yticklabels()] == [r.name for r in results]


def test_gradient_maps_share_one_scale_and_colour_exact_zeros_apart():
    """Two peers' maps get the same colour limits (the largest gradient of any peer); exact zeros, and only
    they, are drawn in ZERO_COLOR instead of the colour map's near-white centre."""
    limit = max(float(P.peer_gradient_map(name, clip_eps=0.2, num=21)[2].abs().max()) for name in P.PEERS)
    for name in ("CleanRL", "Stable-Baselines3"):
        mesh = PP.plot_gradient_map(name, clip_eps=0.2, num=21).collections[0]
        assert mesh.get_clim() == (-limit, limit), name
        _, _, grad = P.peer_gradient_map(name, clip_eps=0.2, num=21)
        mask = np.ma.getmaskarray(mesh.get_array()).reshape(21, 21)
        np.testing.assert_array_equal(mask, grad.numpy() == 0)
        colours = mesh.to_rgba(mesh.get_array()).reshape(21, 21, 4)
        np.testing.assert_allclose(colours[mask], [matplotlib.colors.to_rgba(PP.ZERO_COLOR)] * int(mask.sum()))
        assert not np.isclose(colours[~mask], matplotlib.colors.to_rgba(PP.ZERO_COLOR)).all(axis=1).any()
    ax = PP.plot_gradient_map("CleanRL", clip_eps=0.2, num=21, vmax=3.0)
    assert ax.collections[0].get_clim() == (-3.0, 3.0)
    assert "exactly 0" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_gradient_maps_side_by_side_have_one_colour_bar_and_fit_eleven_inches():
    """plot_gradient_maps draws one map per peer on one scale, with a single colour bar, at most 11 inches wide."""
    axes = PP.plot_gradient_maps(["CleanRL", "Stable-Baselines3"], clip_eps=0.2, num=21)
    figure = axes[0].figure
    assert [ax.get_title().split(":")[0] for ax in axes] == ["CleanRL", "Stable-Baselines3"]
    assert axes[0].collections[0].get_clim() == axes[1].collections[0].get_clim()
    assert len(figure.axes) == 3 and figure.get_figwidth() <= 11.0  # two maps and one colour bar
    with pytest.raises(ValueError, match="one Axes per name"):
        PP.plot_gradient_maps(["CleanRL"], axes=axes)
