"""valueloss.viz.dynamics: the descent simulation and the synthetic batch, against hand-written loops."""

import pytest
import torch
from bands import band
from reference import token_grad

from valueloss import Region
from valueloss.viz.dynamics import simulate_descent, synthetic_batch


def reference_descent(value, ret, eps, lr, steps, refresh_every, scale=0.5, band_closed=None):
    """Plain-Python gradient descent on max((v_clip - R)^2, (v - R)^2) with the reference's gradient (band edges
    closed or open as ``band_closed``, by default as the installed torch's clamp), old value refreshed every K steps."""
    v, old, values, olds = value, value, [value], []
    for k in range(steps):
        if k % refresh_every == 0:
            old = v
        olds.append(old)
        v = v - lr * scale * token_grad(v, old, ret, eps, band_closed=band_closed)
        values.append(v)
    return values, olds


@pytest.mark.parametrize("band_closed", [True, False], ids=["closed", "open"])
@pytest.mark.parametrize(
    "value, ret, eps, lr, steps, refresh",
    [(0.0, 1.0, 0.2, 0.1, 60, 10), (2.0, -1.0, 0.5, 0.7, 41, 7), (0.3, 0.3, 0.1, 0.2, 5, 1),
     (0.0, 1.0, 0.25, 0.5, 6, 3)],
)
def test_simulate_descent_matches_reference_loop(value, ret, eps, lr, steps, refresh, band_closed):
    """simulate_descent's values and old values equal a plain loop's, with the band's edges closed (torch <= 2.13)
    and open (torch >= 2.14) on any installed torch."""
    with band(band_closed):
        path = simulate_descent(value, ret, clip_eps=eps, lr=lr, steps=steps, refresh_every=refresh)
    values, olds = reference_descent(value, ret, eps, lr, steps, refresh, band_closed=band_closed)
    torch.testing.assert_close(path.values, torch.tensor(values, dtype=torch.float64))
    torch.testing.assert_close(path.old_values[:-1], torch.tensor(olds, dtype=torch.float64))
    assert path.steps == steps and path.grads.shape == (steps,)


def test_clipped_descent_stalls_at_band_edge_until_refresh():
    """With a large step the value jumps past the band edge, then the gradient is exactly 0 until the refresh."""
    path = simulate_descent(0.0, 1.0, clip_eps=0.2, lr=0.5, steps=8, refresh_every=4)
    assert path.values.tolist()[:5] == pytest.approx([0.0, 0.5, 0.5, 0.5, 0.5])
    assert path.stalled.tolist() == [False, True, True, True, False, True, True, True]
    assert all(r == int(Region.CLIPPED) for r, s in zip(path.regions.tolist(), path.stalled.tolist(), strict=True) if s)
    assert path.values[5] > path.values[4]  # moves again right after the refresh


def test_unclipped_descent_never_stalls_and_converges():
    """Without clipping the value approaches the return geometrically: (1 - lr)^k of the gap remains."""
    path = simulate_descent(0.0, 1.0, clip_eps=None, lr=0.1, steps=30, refresh_every=10)
    assert not path.stalled.any()
    torch.testing.assert_close(1.0 - path.values, 0.9 ** torch.arange(31, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"lr": 0.0}, "lr"), ({"steps": -1}, "steps"), ({"refresh_every": 0}, "refresh_every"),
     ({"clip_eps": -1.0}, "clip_eps")],
)
def test_simulate_descent_rejects_bad_settings(kwargs, match):
    """Bad settings raise a ValueError naming the argument."""
    with pytest.raises(ValueError, match=match):
        simulate_descent(0.0, 1.0, **kwargs)


def test_synthetic_batch_is_reproducible_and_well_formed():
    """Same seed, same batch; shapes (B, T); every row has at least min_len response tokens, right-padded."""
    a, b = synthetic_batch(16, 40, seed=3, min_len=5), synthetic_batch(16, 40, seed=3, min_len=5)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert not torch.equal(a["values"], synthetic_batch(16, 40, seed=4)["values"])
    mask = a["action_mask"]
    assert mask.shape == (16, 40) and mask.dtype == torch.bool
    lengths = mask.sum(1)
    assert lengths.min() >= 5
    assert torch.equal(mask, torch.arange(40) < lengths[:, None])


def test_synthetic_batch_progress_moves_values_towards_returns():
    """With no step noise the values sit exactly `progress` of the way from old values to returns."""
    batch = synthetic_batch(4, 8, progress=0.25, step_noise=0.0, seed=0, dtype=torch.float64)
    expected = batch["old_values"] + 0.25 * (batch["returns"] - batch["old_values"])
    torch.testing.assert_close(batch["values"], expected)
