"""Read, check and report a saved batch of values, old values, returns and masks (``valueloss inspect``).

* :mod:`valueloss.batch.io`: :class:`Batch`, :class:`BatchError`, :class:`Limits`, :func:`load_batch`
  (``.pt``, ``.npz``, ``.safetensors``, each read within limits checked from its headers),
  :func:`load_batch_bytes`, :func:`validate_batch`, :func:`save_batch`;
* :mod:`valueloss.batch.synthetic`: :func:`synthetic_batch`, the notebooks' sample batch;
* :mod:`valueloss.batch.report`: :func:`inspect_batch` and :func:`format_report`, whose numbers come from
  :mod:`valueloss.functional` and :func:`valueloss.diagnose`;
* :mod:`valueloss.batch.cli`: the ``valueloss inspect BATCH`` command.

The figure of a report is :func:`valueloss.viz.batch_plot.plot_report` (matplotlib lives in :mod:`valueloss.viz`).
"""

from .io import Batch, BatchError, Limits, load_batch, load_batch_bytes, save_batch, validate_batch
from .report import (
    InspectReport,
    SequenceStats,
    clip_fraction_curve,
    clip_thresholds,
    format_report,
    inspect_batch,
    suggest_clip_eps,
)
from .synthetic import synthetic_batch

__all__ = [
    "Batch",
    "BatchError",
    "InspectReport",
    "Limits",
    "SequenceStats",
    "clip_fraction_curve",
    "clip_thresholds",
    "format_report",
    "inspect_batch",
    "load_batch",
    "load_batch_bytes",
    "save_batch",
    "suggest_clip_eps",
    "synthetic_batch",
    "validate_batch",
]
