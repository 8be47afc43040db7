"""Clipping over a run: read a directory written by :class:`valueloss.record.Recorder` and report each step.

:func:`load_recording` reads every ``step-*-rank*.npz`` file of a directory with :func:`~valueloss.batch.load_batch`
(so its checks and limits apply), groups the ranks' shards of a step into one batch, and returns the steps in
order. :func:`inspect_directory` runs :func:`~valueloss.batch.inspect_batch` on each step and keeps the
numbers that matter over a run (:class:`TrendPoint`); :func:`format_trend` prints one line per step
(``valueloss inspect DIR``); :func:`valueloss.viz.trend_plot.plot_trend` draws it.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..record import FILE_PATTERN
from .io import Batch, BatchError, load_batch, validate_batch
from .report import _finite_or_none, inspect_batch

__all__ = [
    "MAX_FILES",
    "RecordedStep",
    "Trend",
    "TrendPoint",
    "format_trend",
    "inspect_directory",
    "load_recording",
    "run_directory_command",
]

_MAX_JSON = 1_000_000  # characters of a file's settings or meta string; longer ones are ignored, never read


@dataclass(frozen=True)
class RecordedStep:
    """One recorded step: the ranks' shards joined into one :class:`~valueloss.batch.Batch`, and what the files said."""

    step: int
    batch: Batch
    files: tuple[str, ...]
    ranks: tuple[int, ...]
    settings: dict = field(default_factory=dict)
    """The loss settings recorded with the first shard (``LossConfig`` fields), or ``{}`` if none were stored."""
    meta: tuple[dict, ...] = ()
    """Each shard's ``meta`` (step, call, rank, world size, rows kept, ...)."""


def _json_entry(path: Path, key: str) -> dict:
    """``key`` of a recorded file decoded from its JSON string, or ``{}`` when it is missing or not a JSON object."""
    try:
        with zipfile.ZipFile(path) as archive:  # its declared size first: a huge member is never read
            info = archive.getinfo(f"{key}.npy")
            if info.file_size > 4 * _MAX_JSON + 1024:
                return {}
        with np.load(path, allow_pickle=False) as archive:
            entry = archive[key]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return {}
    if entry.dtype.kind != "U" or entry.ndim != 0 or entry.itemsize // 4 > _MAX_JSON:
        return {}
    try:
        decoded = json.loads(str(entry))
    except ValueError:
        return {}
    return decoded if isinstance(decoded, dict) else {}


def _join(step: int, shards: list[tuple[int, Batch]], source: str) -> Batch:
    """The shards of one step as one batch: rows stacked in rank order, padded (masked) to the longest ``T``."""
    if len(shards) == 1:
        return shards[0][1]
    length = max(batch.values.shape[1] for _, batch in shards)

    def stack(name: str, fill: object) -> np.ndarray:
        parts = []
        for _, batch in shards:
            array = getattr(batch, name)
            pad = np.full((array.shape[0], length - array.shape[1]), fill, dtype=array.dtype)
            parts.append(np.concatenate([array, pad], axis=1))
        return np.concatenate(parts, axis=0)

    dtype = np.result_type(*(batch.values.dtype for _, batch in shards))
    arrays = {name: stack(name, 0.0).astype(dtype) for name in ("values", "old_values", "returns")}
    arrays["action_mask"] = stack("action_mask", False)
    joined = validate_batch(arrays, source=source)
    return Batch(joined.values, joined.old_values, joined.returns, joined.action_mask, source=source,
                 dtype=shards[0][1].dtype)


MAX_FILES = 10_000
"""Default limit on the recorded files of one directory: every step is held in memory while it is reported."""


def load_recording(
    directory: str | os.PathLike, *, max_files: int = MAX_FILES, **limits: int
) -> tuple[list[RecordedStep], list[tuple[str, str]]]:
    """The recorded steps of ``directory`` in step order, and the files that could not be read (name, reason).

    Each file is read by :func:`~valueloss.batch.load_batch`, with ``limits`` (its size limits, e.g.
    ``max_bytes``) passed on. At most ``max_files`` recorded files are read (each within those limits, all
    of them held in memory); a directory with more is refused before any is read.

    Raises :class:`~valueloss.batch.BatchError` when ``directory`` is not a directory, holds no recorded file
    or more than ``max_files`` of them, or none of its files is a valid batch.
    """
    if isinstance(max_files, bool) or not isinstance(max_files, int) or max_files < 1:
        raise ValueError(f"max_files must be a positive int; got {max_files!r}")
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or os.PathLike; got {type(directory).__name__}")
    directory = Path(directory)
    if not directory.is_dir():
        raise BatchError(f"{directory}: not a directory")
    by_step: dict[int, list[tuple[int, Path]]] = {}
    found = 0
    for path in directory.iterdir():
        match = FILE_PATTERN.match(path.name)
        if match:
            found += 1
            if found > max_files:
                raise BatchError(f"{directory}: holds more than {max_files} recorded files, the limit "
                                 "(raise it with --max-files N, or max_files=N in Python)")
            by_step.setdefault(int(match.group(1)), []).append((int(match.group(2)), path))
    if not by_step:
        raise BatchError(f"{directory}: is a directory with no recorded files "
                         "(named step-NNNNNNNN-rankR.npz, written by valueloss.record.Recorder)")
    steps, skipped = [], []
    for step in sorted(by_step):
        shards, metas, files, settings = [], [], [], {}
        for rank, path in sorted(by_step[step]):
            try:
                batch = load_batch(path, **limits)
            except BatchError as error:
                skipped.append((path.name, str(error)))
                continue
            shards.append((rank, batch))
            metas.append(_json_entry(path, "meta"))
            files.append(path.name)
            settings = settings or _json_entry(path, "settings")
        if shards:
            source = f"{directory} step {step}"
            steps.append(RecordedStep(step=step, batch=_join(step, shards, source), files=tuple(files),
                                      ranks=tuple(rank for rank, _ in shards), settings=settings, meta=tuple(metas)))
    if not steps:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped[:3])
        raise BatchError(f"{directory}: none of the {len(skipped)} recorded file(s) is a valid batch ({reasons})")
    return steps, skipped


@dataclass(frozen=True)
class TrendPoint:
    """What clipping did at one recorded step (the numbers are :func:`~valueloss.batch.inspect_batch`'s)."""

    step: int
    ranks: tuple[int, ...]
    num_sequences: int
    num_tokens: int
    clip_fraction: float
    outside_band_fraction: float
    explained_variance: float
    loss: float
    loss_unclipped: float
    suggested_clip_eps: tuple[float, float]
    """The ``clip_eps`` range whose clip fraction lies in the target range at this step."""
    recorded_clip_eps: float | None
    """The ``clip_eps`` the loss was called with (``None``: no clipping, or not recorded)."""


@dataclass(frozen=True)
class Trend:
    """The per-step report of a recorded directory; :meth:`to_dict` is the JSON form of ``--json``."""

    directory: str
    clip_eps: float
    mode: str
    target_clip_fraction: tuple[float, float]
    points: list[TrendPoint]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def column(self, name: str) -> np.ndarray:
        """One field of every point as an array (``suggested_clip_eps`` gives shape ``(steps, 2)``)."""
        return np.array([getattr(point, name) for point in self.points], dtype=np.float64)

    def to_dict(self) -> dict[str, object]:
        """The trend as strict-JSON-ready Python values (a non-finite number becomes None)."""
        out = _finite_or_none(asdict(self))
        for point in out["points"]:
            point["ranks"] = list(point["ranks"])
            point["suggested_clip_eps"] = list(point["suggested_clip_eps"])
        out["target_clip_fraction"] = list(self.target_clip_fraction)
        out["skipped"] = [{"file": name, "reason": reason} for name, reason in self.skipped]
        return out


def inspect_directory(
    directory: str | os.PathLike,
    *,
    clip_eps: float = 0.2,
    mode: str = "token-mean",
    target_clip_fraction: tuple[float, float] = (0.05, 0.15),
    **limits: int,
) -> Trend:
    """Report each recorded step of ``directory`` at one ``clip_eps`` and ``mode`` (see :func:`inspect_batch`);
    ``limits`` go to :func:`load_recording`."""
    steps, skipped = load_recording(directory, **limits)
    points = []
    for recorded in steps:
        report = inspect_batch(recorded.batch, clip_eps=clip_eps, mode=mode, target_clip_fraction=target_clip_fraction)
        recorded_eps = recorded.settings.get("clip_eps")
        points.append(TrendPoint(
            step=recorded.step,
            ranks=recorded.ranks,
            num_sequences=report.num_sequences,
            num_tokens=report.num_tokens,
            clip_fraction=report.clip_fraction,
            outside_band_fraction=report.outside_band_fraction,
            explained_variance=report.explained_variance,
            loss=report.loss,
            loss_unclipped=report.loss_unclipped,
            suggested_clip_eps=report.suggested_clip_eps,
            recorded_clip_eps=float(recorded_eps) if isinstance(recorded_eps, (int, float)) else None,
        ))
    return Trend(directory=str(directory), clip_eps=float(clip_eps), mode=mode,
                 target_clip_fraction=tuple(float(x) for x in target_clip_fraction), points=points, skipped=skipped)


def format_trend(trend: Trend) -> str:
    """The text of ``valueloss inspect DIR``: a header, then one line per recorded step."""
    if not isinstance(trend, Trend):
        raise TypeError(f"trend must be a Trend (from inspect_directory); got {type(trend).__name__}")
    low, high = trend.target_clip_fraction
    recorded = sorted({p.recorded_clip_eps for p in trend.points}, key=lambda x: (x is None, x or 0.0))
    said = ", ".join("none" if eps is None else f"{eps:g}" for eps in recorded)
    ranks = sorted({rank for p in trend.points for rank in p.ranks})
    lines = [
        f"valueloss inspect: {trend.directory} ({len(trend.points)} recorded steps, ranks "
        f"{', '.join(map(str, ranks))}); measured at clip_eps={trend.clip_eps:g}, mode={trend.mode} "
        f"(recorded with clip_eps {said})",
        f"{'step':>8} {'seqs':>5} {'tokens':>7} {'clip%':>6} {'outside%':>8} {'expl.var':>9} "
        f"{'loss':>10} {'unclipped':>10}  clip_eps for {100 * low:.0f}-{100 * high:.0f}% clipped",
    ]
    for p in trend.points:
        lo, hi = p.suggested_clip_eps
        lines.append(f"{p.step:>8} {p.num_sequences:>5} {p.num_tokens:>7} {100 * p.clip_fraction:>6.2f} "
                     f"{100 * p.outside_band_fraction:>8.2f} {p.explained_variance:>9.4f} {p.loss:>10.4g} "
                     f"{p.loss_unclipped:>10.4g}  [{lo:.3g}, {hi:.3g}]")
    for name, reason in trend.skipped:
        lines.append(f"  skipped {name}: {' '.join(reason.splitlines())}")
    return "\n".join(lines)


def run_directory_command(args, plot_trend=None) -> int:
    """``valueloss inspect DIR`` (called by :mod:`valueloss.batch.cli` when BATCH is a directory); the exit code.

    Uses the parsed ``batch``, ``clip_eps``, ``mode``, ``target_clip_fraction``, ``json`` and ``plot`` (and the
    ``--max-*`` limits); ``plot_trend`` is :func:`valueloss.viz.trend_plot.plot_trend`, which the CLI imports
    (only it reaches up into viz), or None without matplotlib. A bad directory or figure path prints one line on
    stderr and returns 2, as for a file.
    """
    import sys

    def error(message: str) -> int:
        print(f"valueloss inspect: error: {' '.join(message.splitlines())}", file=sys.stderr)
        return 2

    low, high = args.target_clip_fraction
    if low > high:
        return error(f"--target-clip-fraction LOW must be <= HIGH; got {low} {high}")
    if args.plot and plot_trend is None:
        return error("--plot needs matplotlib; pip install 'valueloss[notebooks]' (or leave out --plot)")
    try:
        names = ("max_bytes", "max_tokens", "max_sequences", "max_files")
        limits = {name: getattr(args, name) for name in names if hasattr(args, name)}
        trend = inspect_directory(args.batch, clip_eps=args.clip_eps, mode=args.mode, target_clip_fraction=(low, high),
                                  **limits)
    except (BatchError, ValueError) as failure:
        return error(str(failure))
    except MemoryError:
        return error("ran out of memory reading the recorded batches; lower --max-tokens or inspect fewer files")
    if args.plot:
        try:
            plot_trend(trend, args.plot)
        except (OSError, ValueError) as failure:
            return error(f"--plot could not write {args.plot} ({type(failure).__name__}: {failure})")
    print(json.dumps(trend.to_dict(), indent=2, allow_nan=False) if args.json else format_trend(trend))
    if args.plot and not args.json:
        print(f"\n  figure      written to {args.plot}")
    return 0
