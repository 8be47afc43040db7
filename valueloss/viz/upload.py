"""A JupyterLab explorer for your own batch: upload a file, move ``clip_eps``, read the report.

The widget code only wires controls to :mod:`valueloss.batch` (which does all the work) and
:func:`valueloss.viz.batch_plot.plot_report`; the figure is rendered to a PNG (matplotlib's Agg canvas)
so it shows the same in JupyterLab, in Voila and in exported HTML. ipywidgets and matplotlib are
imported here, never by ``import valueloss``.
"""

from __future__ import annotations

import io
import os

from ..batch import (
    Batch,
    BatchError,
    InspectReport,
    format_report,
    inspect_batch,
    load_batch,
    load_batch_bytes,
    synthetic_batch,
)
from ..functional import AGGREGATION_MODES
from .batch_plot import plot_report

__all__ = ["BatchUploadExplorer", "batch_upload_explorer"]

ACCEPT = ".pt,.pth,.npz,.safetensors"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class BatchUploadExplorer:
    """Upload control + ``clip_eps`` slider + mode selector + the text report and its figure.

    Attributes a test (or a curious user) can read: ``batch`` (the current :class:`Batch`),
    ``report`` (the current :class:`InspectReport`), ``upload``, ``clip_eps``, ``mode``,
    ``text`` (HTML with the report), ``image`` (PNG of :func:`plot_report`), ``status``
    (the last error or what was loaded), and ``widget`` (the box to display).
    """

    def __init__(self, batch: Batch, *, clip_eps: float = 0.2, mode: str = "token-mean") -> None:
        import ipywidgets as w

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
        """Analyse an uploaded file; on a bad file keep the previous batch and show the error. Returns success."""
        try:
            batch = load_batch_bytes(data, filename)
        except BatchError as error:
            self._set_status(f"could not use {_escape(filename)}: {_escape(str(error))}", error=True)
            return False
        self.batch = batch
        self._set_status(f"showing {_escape(filename)}")
        self.refresh()
        return True

    def _on_upload(self, change) -> None:
        files = change["new"]
        if not files:
            return
        item = files[0]
        self.load_bytes(bytes(item["content"]), item["name"])

    def _on_setting(self, change) -> None:
        self.refresh()

    def _ipython_display_(self) -> None:  # pragma: no cover - exercised in notebooks
        from IPython.display import display

        display(self.widget)


def batch_upload_explorer(
    path: str | os.PathLike | None = None, *, clip_eps: float = 0.2, mode: str = "token-mean"
) -> BatchUploadExplorer:
    """The explorer of notebook 08, starting on the batch file ``path``.

    Without a path it starts on ``synthetic_batch(seed=0)``: the batch shipped as
    ``notebooks/data/sample_batch.npz``, generated here because the package does not ship the notebooks' data.
    """
    batch = load_batch(path) if path is not None else synthetic_batch(seed=0)
    return BatchUploadExplorer(batch, clip_eps=clip_eps, mode=mode)
