"""Tests of valueloss.batch.trend (reading a recorded directory, the per-step trend) and its figure."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from valueloss.batch import BatchError
from valueloss.batch.trend import format_trend, inspect_directory, load_recording
from valueloss.record import Recorder


def _batch(rows, length, seed, drift):
    gen = torch.Generator().manual_seed(seed)
    old_values = torch.randn(rows, length, generator=gen, dtype=torch.float64)
    values = old_values + drift * torch.randn(rows, length, generator=gen, dtype=torch.float64)
    returns = torch.randn(rows, length, generator=gen, dtype=torch.float64)
    mask = torch.arange(length)[None, :] < torch.randint(1, length + 1, (rows, 1), generator=gen)
    return values, old_values, returns, mask


def _reference_clip_fraction(values, old_values, returns, mask, clip_eps):
    """Share of unmasked tokens whose clipped branch strictly wins the max (gradient zero), by plain loops."""
    clipped = total = 0
    for v_row, o_row, r_row, m_row in zip(values.tolist(), old_values.tolist(), returns.tolist(), mask.tolist()):
        for v, o, r, m in zip(v_row, o_row, r_row, m_row):
            if m:
                v_clip = o + min(max(v - o, -clip_eps), clip_eps)
                total += 1
                clipped += (v_clip - r) ** 2 > (v - r) ** 2
    return clipped / total


@pytest.fixture
def recording(tmp_path):
    """Three steps with growing drift; step 20 has two ranks' shards of different lengths."""
    batches = {10: [_batch(4, 6, 0, 0.05)], 20: [_batch(3, 6, 1, 0.2), _batch(2, 9, 2, 0.2)],
               30: [_batch(5, 7, 3, 0.6)]}
    for step, shards in batches.items():
        for rank, batch in enumerate(shards):
            Recorder(tmp_path, every=1, max_files=None).record(*batch, clip_eps=0.2, step=step)
            if rank:
                (tmp_path / f"step-{step:08d}-rank0.npz").rename(tmp_path / f"step-{step:08d}-rank{rank}.npz")
                Recorder(tmp_path, every=1, max_files=None).record(*shards[0], clip_eps=0.2, step=step)
    return tmp_path, batches


def test_each_step_reports_the_clip_fraction_of_its_batch(recording):
    """Steps come in order; each step's clip fraction equals a plain-loop count over all its shards' tokens."""
    directory, batches = recording
    trend = inspect_directory(directory, clip_eps=0.2)
    assert [p.step for p in trend.points] == [10, 20, 30]
    for point, (step, shards) in zip(trend.points, batches.items(), strict=True):
        clipped = [_reference_clip_fraction(*shard, 0.2) * int(shard[3].sum()) for shard in shards]
        tokens = sum(int(shard[3].sum()) for shard in shards)
        assert point.num_tokens == tokens
        assert point.clip_fraction == pytest.approx(sum(clipped) / tokens, abs=1e-12), step
        assert point.recorded_clip_eps == 0.2
    assert trend.points[0].clip_fraction < trend.points[2].clip_fraction  # drift 0.05 -> 0.6
    assert trend.points[1].ranks == (0, 1) and trend.points[1].num_sequences == 5


def test_shards_of_one_step_are_joined_in_rank_order_and_padded(recording):
    """Rank 0's rows come first; the shorter shard is padded with masked-out columns to the longer one's T."""
    directory, batches = recording
    steps, skipped = load_recording(directory)
    joined = steps[1].batch
    assert joined.values.shape == (5, 9) and skipped == []
    rank0, rank1 = batches[20]
    np.testing.assert_array_equal(joined.values[:3, :6], rank0[0].numpy())
    np.testing.assert_array_equal(joined.action_mask[:3, 6:], False)
    np.testing.assert_array_equal(joined.returns[3:], rank1[2].numpy())
    assert steps[1].files == ("step-00000020-rank0.npz", "step-00000020-rank1.npz")
    assert [m["rank"] for m in steps[1].meta] == [0, 0]  # the renamed shard still says where it was written


def test_text_has_one_line_per_step_and_json_round_trips(recording):
    """format_trend prints a two-line header and one line per step; to_dict is JSON with every point."""
    directory, _ = recording
    trend = inspect_directory(directory, clip_eps=0.2, target_clip_fraction=(0.1, 0.2))
    lines = format_trend(trend).splitlines()
    assert len(lines) == 2 + 3 and lines[2].split()[0] == "10" and "clip_eps for 10-20% clipped" in lines[1]
    assert f"{100 * trend.points[2].clip_fraction:.2f}" in lines[4]
    data = json.loads(json.dumps(trend.to_dict()))
    assert [p["step"] for p in data["points"]] == [10, 20, 30] and data["points"][1]["ranks"] == [0, 1]


def test_unreadable_files_are_skipped_with_a_reason_and_empty_folders_raise(recording, tmp_path_factory):
    """A broken recorded file is listed as skipped (why); a folder without recordings, or a file, raises BatchError."""
    directory, _ = recording
    (directory / "step-00000040-rank0.npz").write_bytes(b"not a zip")
    trend = inspect_directory(directory)
    assert [p.step for p in trend.points] == [10, 20, 30]
    assert trend.skipped[0][0] == "step-00000040-rank0.npz" and "not a NumPy .npz archive" in trend.skipped[0][1]
    assert "skipped step-00000040-rank0.npz" in format_trend(trend)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(BatchError, match="is a directory with no recorded files"):
        load_recording(empty)
    with pytest.raises(BatchError, match="not a directory"):
        load_recording(directory / "step-00000010-rank0.npz")
    with pytest.raises(BatchError, match=r"more than 4 recorded files.*--max-files N"):
        load_recording(directory, max_files=4)  # it holds five: four shards of three steps, one broken file
    assert len(load_recording(directory, max_files=5)[0]) == 3
    with pytest.raises(ValueError, match="max_files must be a positive int; got 0"):
        load_recording(directory, max_files=0)


def test_plot_trend_draws_the_trend_numbers(recording):
    """The figure's lines hold the trend's steps and percentages; the band is drawn at the measured clip_eps."""
    from valueloss.viz.trend_plot import plot_trend

    directory, _ = recording
    trend = inspect_directory(directory, clip_eps=0.2)
    fig = plot_trend(trend)
    ax_clip, ax_loss, ax_eps = fig.axes[:3]
    np.testing.assert_allclose(ax_clip.lines[0].get_xdata(), [10, 20, 30])
    np.testing.assert_allclose(ax_clip.lines[0].get_ydata(), 100 * trend.column("clip_fraction"))
    np.testing.assert_allclose(ax_loss.lines[1].get_ydata(), trend.column("loss_unclipped"))
    assert ax_eps.lines[0].get_ydata()[0] == 0.2 and "Clipping at clip_eps=0.2" == ax_clip.get_title()


def test_an_oversized_or_broken_meta_is_ignored(tmp_path):
    """A meta string above the size bound is ignored (though it is valid JSON), and so is a settings string that
    is not JSON: the step then comes from the file name."""
    values, old_values, returns, mask = _batch(2, 3, 0, 0.1)
    np.savez(tmp_path / "step-00000005-rank0.npz", values=values.numpy(), old_values=old_values.numpy(),
             returns=returns.numpy(), action_mask=mask.numpy(), meta=np.array(json.dumps({"pad": "x" * 1_100_000})),
             settings=np.array("not json"))
    (step,), skipped = load_recording(tmp_path)
    assert (step.step, step.meta, step.settings, skipped) == (5, ({},), {}, [])


def test_cli_inspect_dir_prints_text_json_and_a_figure(recording, tmp_path, capsys):
    """`valueloss inspect DIR` prints one line per step, --json the points, --plot writes a PNG; a folder without
    recordings exits 2 with one line saying why."""
    from valueloss.batch.cli import main

    directory, _ = recording
    assert main(["inspect", str(directory)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and [line.split()[0] for line in lines[2:]] == ["10", "20", "30"]
    assert main(["inspect", str(directory), "--json", "--clip-eps", "0.1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["clip_eps"] == 0.1 and [p["step"] for p in data["points"]] == [10, 20, 30]
    png = tmp_path / "trend.png"
    assert main(["inspect", str(directory), "--plot", str(png)]) == 0 and png.read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["inspect", str(empty)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"valueloss inspect: error: {empty}: is a directory with no recorded files")


def test_cli_inspect_dir_on_the_shipped_recording(capsys):
    """The shipped tiny_rlhf recording reads as 30 steps, 10 to 300, recorded with clip_eps 0.2."""
    from valueloss.batch.cli import main

    shipped = Path(__file__).resolve().parents[1] / "notebooks" / "data" / "tiny_rlhf"
    assert main(["inspect", str(shipped)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "(30 recorded steps, ranks 0)" in lines[0] and "recorded with clip_eps 0.2" in lines[0]
    assert [int(line.split()[0]) for line in lines[2:]] == list(range(10, 301, 10))


def test_upload_explorer_on_a_recorded_directory(recording):
    """batch_upload_explorer(DIR) starts on the last step; choosing another step shows that step's report."""
    pytest.importorskip("ipywidgets")
    from valueloss.viz.upload import batch_upload_explorer

    directory, _ = recording
    points = inspect_directory(directory).points
    explorer = batch_upload_explorer(directory)
    assert [label for label, _ in explorer.step.options] == ["10", "20", "30"]
    assert "step 30" in explorer.status.value and explorer.report.num_tokens == points[2].num_tokens
    explorer.step.value = 0
    assert "step 10" in explorer.status.value and explorer.report.num_tokens == points[0].num_tokens
    assert explorer.report.clip_fraction == pytest.approx(points[0].clip_fraction, abs=1e-12)
    assert explorer.step in explorer.widget.children[0].children


def test_json_is_strict_a_non_finite_number_becomes_null(recording):
    """Trend.to_dict turns a non-finite number into None, so --json never prints NaN or Infinity."""
    import dataclasses

    directory, _ = recording
    trend = inspect_directory(directory)
    broken = dataclasses.replace(trend.points[0], explained_variance=float("nan"), suggested_clip_eps=(0.1, math.inf))
    data = dataclasses.replace(trend, points=[broken]).to_dict()
    assert data["points"][0]["explained_variance"] is None and data["points"][0]["suggested_clip_eps"] == [0.1, None]
    json.dumps(data, allow_nan=False)
