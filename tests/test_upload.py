"""Tests of valueloss.viz.upload: uploading a file in code changes the report and the figure."""

import datetime
import io
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ipywidgets")

from valueloss.batch import synthetic_batch  # noqa: E402
from valueloss.viz.upload import batch_upload_explorer  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "notebooks" / "data" / "sample_batch.npz"


def _upload_value(name, data):
    stamp = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    return ({"name": name, "type": "", "size": len(data), "content": memoryview(data), "last_modified": stamp},)


def _npz_bytes(batch):
    buffer = io.BytesIO()
    np.savez(buffer, values=batch.values, old_values=batch.old_values, returns=batch.returns,
             action_mask=batch.action_mask)
    return buffer.getvalue()


def test_upload_replaces_the_batch_and_report():
    """Setting FileUpload.value in code analyses the uploaded batch: new token count, new text, new image."""
    explorer = batch_upload_explorer(SAMPLE)
    before_text, before_image = explorer.text.value, explorer.image.value
    other = synthetic_batch(seed=11, batch_size=5, max_len=9)
    explorer.upload.value = _upload_value("mine.npz", _npz_bytes(other))
    assert explorer.report.num_tokens == int(other.action_mask.sum())
    assert f"{explorer.report.num_tokens} tokens" in explorer.text.value and explorer.text.value != before_text
    assert explorer.image.value != before_image and "mine.npz" in explorer.status.value


def test_bad_upload_keeps_the_previous_batch_and_shows_the_error():
    """A bad upload leaves the report as it was and prints the BatchError."""
    explorer = batch_upload_explorer()
    tokens = explorer.report.num_tokens
    explorer.upload.value = _upload_value("bad.pt", b"garbage")
    assert explorer.report.num_tokens == tokens
    assert "could not use bad.pt" in explorer.status.value and "weights_only=True" in explorer.status.value


def test_clip_eps_slider_recomputes():
    """Moving clip_eps in code changes the reported clip fraction as the report for that eps says."""
    explorer = batch_upload_explorer()
    low = explorer.report.clip_fraction
    explorer.clip_eps.value = 1.0
    assert explorer.report.clip_eps == pytest.approx(1.0)
    assert explorer.report.clip_fraction < low
    explorer.mode.value = "seq-mean-token-mean"
    assert explorer.report.mode == "seq-mean-token-mean" and "mode=seq-mean-token-mean" in explorer.text.value


def test_default_explorer_is_the_shipped_sample():
    """Without a path the explorer shows synthetic_batch(seed=0), the batch shipped as the sample."""
    explorer = batch_upload_explorer()
    np.testing.assert_array_equal(explorer.batch.values, synthetic_batch(seed=0).values, strict=True)
