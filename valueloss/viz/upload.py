"""A JupyterLab explorer for your own batch: upload a file, move ``clip_eps``, read the report.

The widget code only wires controls to :mod:`valueloss.batch` (which does all the work) and
:func:`valueloss.viz.batch_plot.plot_report`; the figure is rendered to a PNG (matplotlib's Agg canvas)
so it shows the same in JupyterLab, in Voila and in exported HTML. ipywidgets and matplotlib are
imported here, never by ``import valueloss``.

An upload is untrusted: it is read within limits smaller than the command line's (:data:`UPLOAD_LIMITS`,
raised with the keyword arguments of :func:`batch_upload_explorer`), and every failure, of any kind, is shown
in the status line in words; the previous batch stays.
"""

from __future__ import annotations

import io
import os

from ..batch import (
    Batch,
    BatchError,
    InspectReport,
    Limits,
    format_report,
    inspect_batch,
    load_batch,
    load_batch_bytes,
    synthetic_batch,
)
from ..functional import AGGREGATION_MODES
from .batch_plot import plot_report

__all__ = ["BatchUploadExplorer", "RecordingExplorer", "batch_upload_explorer"]

ACCEPT = ".pt,.pth,.npz,.safetensors"
UPLOAD_LIMITS = Limits(max_bytes=2**26, max_tokens=2**20, max_sequences=2**11)
"""The explorer's limits: 64 MiB, about a million tokens, 2048 sequences (its figure draws a bar per sequence)."""


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class BatchUploadExplorer:
    """Upload control + ``clip_eps`` slider + mode selector + the text report and its figure.

    Attributes a test (or a curious user) can read: ``batch`` (the current :class:`Batch`),
    ``report`` (the current :class:`InspectReport`), ``upload``, ``clip_eps``, ``mode``,
    ``text`` (HTML with the report), ``image`` (PNG of :func:`plot_report`), ``status``
    (the last error or what was loaded), and ``widget`` (the box to display).
    """

    def __init__(self, batch: Batch, *, clip_eps: float = 0.2, mode: str = "token-mean",
                 limits: Limits = UPLOAD_LIMITS) -> None:
        import ipywidgets as w

        if not isinstance(limits, Limits):
            raise TypeError(f"limits must be a valueloss.batch.Limits; got {type(limits).__name__}")
        self.limits = limits
        self.batch = batch
        self.report: InspectReport | None = None
        self.upload = w.FileUpload(accept=ACCEPT, multiple=False, description="Upload batch")
        self.clip_eps = w.FloatLogSlider(value=clip_eps, base=10, min=-3, max=1, step=0.05, description="clip_eps",
                                         readout_format=".3g", continuous_update=False)
        self.mode = w.Dropdown(options=AGGREGATION_MODES, value=mode, description="mode")
        self.status = w.HTML()
        self.text = w.HTML()
        self.image = w.Image(format="png")
        self.widget = w.VBox([w.HBox([self.upload, self.clip_eps, self.mode]), self.status, self.image, self.text])
        self.upload.observe(self._on_upload, names="value")
        self.clip_eps.observe(self._on_setting, names="value")
        self.mode.observe(self._on_setting, names="value")
        self._set_status(f"showing {_escape(batch.source)}")
        self.refresh()

    def _set_status(self, message: str, error: bool = False) -> None:
        colour = "#D55E00" if error else "#0072B2"
        self.status.value = f'<span style="color:{colour}">{message}</span>'

    def refresh(self) -> None:
        """Recompute the report for the current batch and settings, and redraw."""
        self.report = inspect_batch(self.batch, clip_eps=self.clip_eps.value, mode=self.mode.value)
        self.text.value = f"<pre>{_escape(format_report(self.report))}</pre>"
        figure = plot_report(self.report)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=80)
        self.image.value = buffer.getvalue()

    def load_bytes(self, data: bytes, filename: str) -> bool:
        """Analyse an uploaded file; on any failure keep the previous batch and show why. Returns success."""
        shown = _escape(str(filename))
        try:
            size = memoryview(data).nbytes
            if size > self.limits.max_bytes:
                raise BatchError(f"the file has {size} bytes, more than this explorer's limit of "
                                 f"{self.limits.max_bytes} (batch_upload_explorer(max_bytes=...) raises it)")
            batch = load_batch_bytes(data, filename, max_bytes=self.limits.max_bytes,
                                     max_tokens=self.limits.max_tokens, max_sequences=self.limits.max_sequences)
        except BatchError as error:
            self._set_status(f"could not use {shown}: {_escape(str(error))}", error=True)
            return False
        except MemoryError:
            self._set_status(f"could not use {shown}: it needs more memory than this kernel has", error=True)
            return False
        except Exception as error:  # noqa: BLE001 -- any failure must reach the status line, in words
            self._set_status(f"could not use {shown}: {_escape(_describe(error))}", error=True)
            return False
        previous = self.batch
        self.batch = batch
        if not self._refresh_or_report(f"could not analyse {shown}"):
            self.batch = previous
            try:  # back to the previous report; the status line keeps saying why the upload failed
                self.refresh()
            except Exception:  # noqa: BLE001, S110 -- the failure above is the one to show
                pass
            return False
        self._set_status(f"showing {shown}")
        return True

    def _refresh_or_report(self, what: str) -> bool:
        """:meth:`refresh`; a failure is shown in the status line (with ``what``) instead of raised."""
        try:
            self.refresh()
        except Exception as error:  # noqa: BLE001 -- shown, never lost in a widget callback's log
            self._set_status(f"{what}: {_escape(_describe(error))}", error=True)
            return False
        return True

    def _on_upload(self, change) -> None:
        try:
            files = change["new"]
            if not files:
                return
            item = files[0]
            name, content = item["name"], item["content"]
        except Exception as error:  # noqa: BLE001
            self._set_status(f"could not read the upload: {_escape(_describe(error))}", error=True)
            return
        self.load_bytes(content, name)

    def _on_setting(self, change) -> None:
        if self._refresh_or_report("could not recompute the report"):
            self._set_status(f"showing {_escape(self.batch.source)}")

    def _ipython_display_(self) -> None:  # pragma: no cover - exercised in notebooks
        from IPython.display import display

        display(self.widget)


def _describe(error: BaseException) -> str:
    """An exception in one line of words: its type and the first line of its message."""
    message = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def batch_upload_explorer(
    path: str | os.PathLike | None = None, *, clip_eps: float = 0.2, mode: str = "token-mean",
    max_bytes: int = UPLOAD_LIMITS.max_bytes, max_tokens: int = UPLOAD_LIMITS.max_tokens,
    max_sequences: int = UPLOAD_LIMITS.max_sequences,
) -> BatchUploadExplorer:
    """The explorer of notebook 08, starting on the batch file ``path``, or on a recorded directory.

    Without a path it starts on ``synthetic_batch(seed=0)``: the batch shipped as
    ``notebooks/data/sample_batch.npz``, generated here because the package does not ship the notebooks' data.
    ``max_bytes``, ``max_tokens`` and ``max_sequences`` bound what an upload (and ``path``) may hold
    (:class:`valueloss.batch.Limits`; defaults :data:`UPLOAD_LIMITS`). A directory written by
    :class:`valueloss.record.Recorder` gives a :class:`RecordingExplorer`: a step selector over the recorded steps
    (each file read within the same limits), starting on the last.
    """
    limits = Limits(max_bytes, max_tokens, max_sequences)
    if path is not None and os.path.isdir(path):
        return RecordingExplorer(path, clip_eps=clip_eps, mode=mode, limits=limits)
    batch = load_batch(path, max_bytes=max_bytes, max_tokens=max_tokens, max_sequences=max_sequences) \
        if path is not None else synthetic_batch(seed=0)
    return BatchUploadExplorer(batch, clip_eps=clip_eps, mode=mode, limits=limits)


class RecordingExplorer(BatchUploadExplorer):
    """:class:`BatchUploadExplorer` on a directory recorded by :class:`valueloss.record.Recorder`, plus ``step``:
    a selector of the recorded steps (``steps`` holds them, read once by
    :func:`valueloss.batch.trend.load_recording` within ``limits``). An upload still shows the uploaded file.
    """

    def __init__(self, directory: str | os.PathLike, *, clip_eps: float = 0.2, mode: str = "token-mean",
                 limits: Limits = UPLOAD_LIMITS) -> None:
        import ipywidgets as w

        from ..batch.trend import load_recording

        if not isinstance(limits, Limits):
            raise TypeError(f"limits must be a valueloss.batch.Limits; got {type(limits).__name__}")
        self.directory = str(directory)
        self.steps, self.skipped = load_recording(directory, max_bytes=limits.max_bytes,
                                                  max_tokens=limits.max_tokens, max_sequences=limits.max_sequences)
        super().__init__(self.steps[-1].batch, clip_eps=clip_eps, mode=mode, limits=limits)
        self.step = w.Dropdown(options=[(str(s.step), i) for i, s in enumerate(self.steps)],
                               value=len(self.steps) - 1, description="step")
        controls, *rest = self.widget.children
        self.widget.children = (w.HBox([self.step, *controls.children]), *rest)
        self.step.observe(self._on_step, names="value")
        self._set_status(f"showing step {self.steps[-1].step} of {_escape(self.directory)}")

    def _on_step(self, change) -> None:
        recorded = self.steps[change["new"]]
        self.batch = recorded.batch
        if self._refresh_or_report(f"could not analyse step {recorded.step}"):
            self._set_status(f"showing step {recorded.step} of {_escape(self.directory)}")
