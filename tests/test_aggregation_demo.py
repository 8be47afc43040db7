"""Tests of valueloss.lessons.aggregation_demo: the ragged batch, sequence weights, figures (Agg) and the explorer."""

from __future__ import annotations

import fresh
import matplotlib
import numpy as np
import pytest
import torch
from reference import weights_loops

matplotlib.use("Agg")

from valueloss.lessons import aggregation_demo as demo  # noqa: E402
from valueloss.lessons.data_parallel import NORMALISATIONS  # noqa: E402


def test_ragged_batch_lengths_and_empty_rows():
    """Lengths lie in [(1-spread)*max_len, max_len], masks are left-aligned, num_empty rows are empty."""
    values, old_values, returns, mask = demo.ragged_batch(40, 20, spread=0.5, num_empty=5, seed=3)
    assert values.shape == old_values.shape == returns.shape == mask.shape == (40, 20)
    lengths = mask.sum(-1)
    assert int((lengths == 0).sum()) == 5
    assert all(10 <= n <= 20 for n in lengths.tolist() if n > 0)
    for row, n in zip(mask.tolist(), lengths.tolist(), strict=True):
        assert row == [True] * n + [False] * (20 - n)
    again = demo.ragged_batch(40, 20, spread=0.5, num_empty=5, seed=3)
    assert torch.equal(again[0], values) and torch.equal(again[3], mask)
    with pytest.raises(ValueError, match="spread"):
        demo.ragged_batch(4, 4, spread=1.5)
    with pytest.raises(ValueError, match="num_empty"):
        demo.ragged_batch(4, 4, num_empty=5)


def test_sequence_weights_match_the_reference():
    """Each sequence's share is the row sum of the reference's per-token weights: token-mean weighs a sequence by
    n_s / N, seq-mean-token-mean by 1 / S, seq-mean-token-sum by n_s / S (here n = 4, 1, 0, 2; N = 7; S = 3)."""
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    rows = mask.double().tolist()
    for mode in ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        shares = [sum(row) for row in weights_loops(rows, mode)]
        torch.testing.assert_close(demo.sequence_weights(mask, mode), torch.tensor(shares, dtype=torch.float64))
    assert [sum(row) for row in weights_loops(rows, "seq-mean-token-mean")] == [1 / 3, 1 / 3, 0.0, 1 / 3]


def test_plot_mask_shows_the_mask():
    """The image data is the mask as 0/1 and the title counts the tokens."""
    mask = demo.ragged_batch(5, 9, spread=0.8, num_empty=1, seed=1)[3]
    ax = demo.plot_mask(mask)
    np.testing.assert_array_equal(ax.images[0].get_array(), mask.double().numpy())
    assert f"{int(mask.sum())} response tokens" in ax.get_title()


def test_plot_sequence_weights_bars_are_shares_sorted_by_length():
    """Each mode's bars are the sequences' shares, in order of increasing length."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    ax = demo.plot_sequence_weights(mask, ("token-mean", "seq-mean-token-mean"))
    token_bars, seq_bars = ax.containers
    np.testing.assert_allclose([b.get_height() for b in token_bars], [1 / 8, 3 / 8, 4 / 8])
    np.testing.assert_allclose([b.get_height() for b in seq_bars], [1 / 3, 1 / 3, 1 / 3])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "3", "4"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["token-mean", "seq-mean-token-mean"]


def test_plot_shards_bars_and_token_totals():
    """One bar per sequence with height n_s, one colour per rank, a token total per micro-batch."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    ax = demo.plot_shards(mask, 2, 2)
    heights = [b.get_height() for c in ax.containers for b in c]
    assert heights == [2.0, 1.0, 3.0, 0.0, 2.0]
    assert [t.get_text() for t in ax.texts] == ["3", "3", "0", "2"]  # rows (0,1), (2), (3), (4)
    colours = {tuple(c.patches[0].get_facecolor()) for c in ax.containers}
    assert len(colours) == 2


def test_plot_normalisation_errors_heights():
    """The bars are the comparison's relative gradient errors in percent."""
    batch = demo.ragged_batch(8, 16, spread=0.9, seed=2)
    from valueloss.lessons.data_parallel import compare_normalisations

    result = compare_normalisations(*batch, num_shards=2, num_micro_batches=2)
    ax = demo.plot_normalisation_errors(result)
    heights = [b.get_height() for b in ax.containers[0]]
    np.testing.assert_allclose(heights, [100 * result.grad_errors[c] for c in NORMALISATIONS])
    assert heights[0] > 0 and heights[2] < 1e-10


def test_error_vs_spread_zero_without_spread():
    """Equal lengths and equal micro-batches: every normalisation is exact; with spread, only global stays exact."""
    errors = demo.error_vs_spread([0.0, 1.0], batch_size=8, max_len=12, seeds=(0, 1))
    assert set(errors) == set(NORMALISATIONS)
    assert all(errors[c][0] < 1e-12 for c in NORMALISATIONS)
    assert errors["per-micro-batch"][1] > 0.01 and errors["global"][1] < 1e-12
    ax = demo.plot_error_vs_spread([0.0, 1.0], errors)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), 100 * errors["per-micro-batch"])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(NORMALISATIONS)


def test_explorer_follows_its_controls():
    """Moving the sliders in code redraws the figure with the new setting's errors."""
    explorer = demo.explore_normalisation(spread=0.0, num_shards=2, num_micro_batches=2)
    bars = explorer.figure.axes[1].containers[0]
    assert max(b.get_height() for b in bars) < 1e-10  # equal lengths: no error anywhere
    first_png = explorer.image.value
    explorer.spread.value = 0.9
    bars = explorer.figure.axes[1].containers[0]
    heights = [b.get_height() for b in bars]
    np.testing.assert_allclose(heights, [100 * explorer.result.grad_errors[c] for c in NORMALISATIONS])
    assert heights[0] > 1.0 and heights[2] < 1e-10
    assert explorer.image.value != first_png
    explorer.mode.value = "seq-mean-token-mean"
    assert explorer.figure.axes[1].get_title().startswith("seq-mean-token-mean")
    assert explorer.result.grad_errors["per-micro-batch"] < 1e-12  # no empty rows, equal row counts
    explorer.num_empty.value = 4
    assert explorer.result.grad_errors["per-micro-batch"] > 1e-3
    explorer.num_shards.value = 3
    assert "3 rank(s)" in explorer.figure.axes[0].get_title()
    assert len(explorer.figure.axes[0].containers) == 3 * explorer.num_micro_batches.value


def test_importing_distributed_loads_no_plotting():
    """valueloss.distributed (imported by trainers) loads neither matplotlib nor ipywidgets (in a fresh
    interpreter, tests/fresh.py)."""
    modules = fresh.stage("import valueloss.distributed")["modules"]
    assert "valueloss.distributed" in modules
    assert "matplotlib" not in modules and "ipywidgets" not in modules
