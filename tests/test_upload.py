"""Tests of valueloss.viz.upload: uploading a file in code changes the report and the figure."""

import datetime
import io
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ipywidgets")

from valueloss.batch import synthetic_batch  # noqa: E402
from valueloss.viz.upload import _escape, batch_upload_explorer  # noqa: E402

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
    explorer.upload.value = _upload_value("bad.npz", b"garbage")
    assert explorer.report.num_tokens == tokens
    assert "could not use bad.npz" in explorer.status.value and "not a NumPy .npz archive" in explorer.status.value


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


def test_every_hostile_upload_is_shown_in_the_status_line():
    """Each uploadable case of the adversarial corpus leaves the batch as it was and shows its message."""
    from adversarial import CASES

    from valueloss.batch import io as batch_io

    explorer = batch_upload_explorer(max_bytes=batch_io.MAX_BYTES, max_tokens=batch_io.MAX_TOKENS,
                                     max_sequences=batch_io.MAX_SEQUENCES)  # the command line's, as the corpus
    tokens = explorer.report.num_tokens
    for name, case in CASES.items():
        if not (case.bytes_ok and case.message):
            continue
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / case.filename
            case.write(path)
            data = path.read_bytes()
        explorer.upload.value = _upload_value(case.filename, data)
        assert explorer.report.num_tokens == tokens, name
        assert f"could not use {case.filename}" in explorer.status.value, name
        assert _escape(case.message) in explorer.status.value, name


def test_any_failure_is_shown_in_words(monkeypatch):
    """Failures other than BatchError (a reader bug, a report that cannot be drawn, a malformed upload) show too."""
    from valueloss.viz import upload

    explorer = batch_upload_explorer()
    good = _npz_bytes(synthetic_batch(seed=3, batch_size=4, max_len=6))

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(upload, "load_batch_bytes", broken)
    explorer.upload.value = _upload_value("a.npz", good)
    assert "could not use a.npz: RuntimeError: disk on fire" in explorer.status.value
    assert "second line" not in explorer.status.value
    monkeypatch.undo()
    tokens = explorer.report.num_tokens
    monkeypatch.setattr(upload, "plot_report", broken)
    explorer.upload.value = _upload_value("b.npz", good)
    assert "could not analyse b.npz: RuntimeError: disk on fire" in explorer.status.value
    assert explorer.report.num_tokens == tokens and explorer.batch.source != "b.npz"
    explorer.clip_eps.value = 0.5
    assert "could not recompute the report: RuntimeError" in explorer.status.value
    monkeypatch.undo()
    explorer._on_upload({"new": ({"name": "c.npz"},)})
    assert "could not read the upload: KeyError" in explorer.status.value


def test_uploads_over_the_explorers_limits_are_refused():
    """An upload larger than max_bytes, or with more sequences than max_sequences, is refused in the status line."""
    from valueloss.batch import Limits

    explorer = batch_upload_explorer(max_bytes=1000)
    assert explorer.limits == Limits(1000, 2**20, 2048)
    explorer.upload.value = _upload_value("big.npz", bytes(2000))
    assert "the file has 2000 bytes, more than this explorer's limit of 1000" in explorer.status.value
    explorer.limits = Limits(max_sequences=4)
    explorer.upload.value = _upload_value("rows.npz", _npz_bytes(synthetic_batch(seed=1, batch_size=5, max_len=6)))
    assert "5 sequences, more than the limit of 4" in explorer.status.value
