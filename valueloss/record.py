"""Save every N-th batch a value loss sees to ``.npz`` files, bounded: :class:`Recorder`.

Attach a recorder to :class:`valueloss.ValueLoss` (``ValueLoss(0.2, recorder=Recorder("runs/vl", every=50))``),
put one around any other loss function (:meth:`Recorder.wrap`, :meth:`Recorder.patch`, e.g. verl's
``compute_value_loss``), or call it yourself next to your loss. ``valueloss inspect DIR`` reads the
directory and prints the trend over the run (docs/record.md).

Each file holds ``values``, ``old_values``, ``returns`` and ``action_mask`` (bfloat16 and float16 upcast
to float32, which is exact; float32 and float64 kept), and three JSON strings stored as NumPy unicode
scalars (so the file loads with ``numpy.load(allow_pickle=False)``): ``settings`` (the
:class:`~valueloss.functional.LossConfig` fields), ``meta`` (step, call, rank, world size, the original
shape and dtype, which rows were kept) and nothing else: no pickles.

The calls that are not recorded cost one integer increment and comparison: no tensor is touched, so
nothing synchronises with the device between records. A record copies four tensors to the host (one
synchronisation) and writes a file; docs/record.md states what that costs.

Example:
    >>> import tempfile, torch
    >>> from valueloss import ValueLoss
    >>> from valueloss.record import Recorder, recorded_files
    >>> directory = tempfile.mkdtemp()
    >>> loss_fn = ValueLoss(0.2, recorder=Recorder(directory, every=2))
    >>> values, old_values, returns = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)
    >>> for _ in range(5):
    ...     loss = loss_fn(values, old_values, returns)
    >>> [path.name for path in recorded_files(directory)]
    ['step-00000002-rank0.npz', 'step-00000004-rank0.npz']
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import operator
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .functional import LossConfig

__all__ = ["FILE_PATTERN", "FORMAT", "Recorder", "recorded_files"]

FORMAT = "valueloss-record-1"
"""The ``format`` entry of every file's ``meta``; a reader checks it."""
FILE_PATTERN = re.compile(r"^step-(\d+)-rank(\d+)\.npz$")
"""File names: ``step-{step:08d}-rank{rank}.npz`` (the rank is 0 without torch.distributed)."""

_TENSORS = ("values", "old_values", "returns")
_HALF = (torch.float16, torch.bfloat16)


def recorded_files(directory: str | os.PathLike, *, rank: int | None = None) -> list[Path]:
    """The recorded files of ``directory`` (of one ``rank``, or all), ordered by step, then rank."""
    found = []
    for path in Path(directory).iterdir():
        match = FILE_PATTERN.match(path.name)
        if match and (rank is None or int(match.group(2)) == rank):
            found.append((int(match.group(1)), int(match.group(2)), path))
    return [path for _, _, path in sorted(found)]


def _dist_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _host(tensor: Tensor, rows: Tensor | None) -> np.ndarray:
    """``tensor`` (its ``rows`` only, if given) detached on the host; half precision upcast to float32."""
    tensor = tensor.detach()
    if rows is not None:
        tensor = tensor.index_select(0, rows.to(tensor.device))
    if tensor.dtype in _HALF:
        tensor = tensor.float()
    return tensor.cpu().numpy()


def _check_positive_int(value: object, name: str, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "a whole number >= 1" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    return value


class Recorder:
    """Save ``values``, ``old_values``, ``returns``, ``action_mask``, the settings and the step of every N-th call.

    Args:
        directory: where the ``.npz`` files go (created if missing).
        every: record the ``every``-th, ``2 * every``-th, ... call (1-based; ``every=1`` records each call).
        max_files: keep at most this many files of this rank; the oldest are deleted (``None``: no limit).
        max_megabytes: keep at most this many megabytes (10**6 bytes) of this rank's files; the oldest are
            deleted first, but the newest file is always kept (a warning says so when it alone is larger).
        max_rows: a batch with more rows (sequences) than this keeps a random sample of ``max_rows`` rows,
            drawn with a generator seeded by ``seed`` and the call number; ``meta`` lists the rows kept.
        ranks: under torch.distributed, ``"all"`` (each rank writes its own files, its rank in the name)
            or ``"zero"`` (rank 0 only). Without a process group the rank is 0.
        seed: seeds the row sampling.

    The step written into a file is :attr:`step` when it is set (e.g. ``recorder.step = global_step`` in
    your loop), else the call number. Files already in ``directory`` from this rank count toward the bounds
    (oldest by modification time first), so a resumed run does not overflow them.

    Example:
        >>> import tempfile, torch
        >>> recorder = Recorder(tempfile.mkdtemp(), every=1, max_files=2)
        >>> for step in range(3):
        ...     path = recorder(torch.zeros(1, 4), torch.zeros(1, 4), torch.ones(1, 4), step=step)
        >>> [p.name for p in recorder.files]
        ['step-00000001-rank0.npz', 'step-00000002-rank0.npz']
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        every: int = 50,
        max_files: int | None = 20,
        max_megabytes: float | None = 100.0,
        max_rows: int | None = 512,
        ranks: str = "all",
        seed: int = 0,
    ) -> None:
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a str or os.PathLike; got {type(directory).__name__}")
        self.directory = Path(directory)
        self.every = _check_positive_int(every, "every")
        self.max_files = _check_positive_int(max_files, "max_files", allow_none=True)
        if max_megabytes is not None and (
            isinstance(max_megabytes, bool) or not isinstance(max_megabytes, (int, float))
            or not max_megabytes > 0 or math.isinf(max_megabytes)
        ):
            raise ValueError(f"max_megabytes must be a positive finite number or None; got {max_megabytes!r}")
        self.max_megabytes = max_megabytes
        self.max_rows = _check_positive_int(max_rows, "max_rows", allow_none=True)
        if ranks not in ("all", "zero"):
            raise ValueError(f"ranks must be 'all' or 'zero'; got {ranks!r}")
        self.ranks = ranks
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int; got {type(seed).__name__}")
        self.seed = seed
        self.calls = 0
        """Calls seen so far (recorded or not)."""
        self.step: int | None = None
        """The trainer's step to write into the next files; ``None`` writes the call number."""
        self._files: list[Path] | None = None  # this rank's files, oldest first; read lazily (the rank may change)

    def __repr__(self) -> str:
        return f"Recorder({str(self.directory)!r}, every={self.every})"

    # ------------------------------------------------------------------ the hot path

    def __call__(
        self,
        values: Tensor,
        old_values: Tensor,
        returns: Tensor,
        action_mask: Tensor | None = None,
        *,
        config: LossConfig | None = None,
        step: int | None = None,
        **settings,
    ) -> Path | None:
        """Count one loss call; on every ``every``-th call save the batch and return the file's path, else None.

        Settings: a :class:`~valueloss.functional.LossConfig` as ``config=`` or its fields as keywords (what the
        loss was called with). ``step`` overrides :attr:`step` for this call.
        """
        self.calls += 1
        if self.calls % self.every:
            return None
        return self.record(values, old_values, returns, action_mask, config=config, step=step, **settings)

    # ------------------------------------------------------------------ a record

    def record(
        self,
        values: Tensor,
        old_values: Tensor,
        returns: Tensor,
        action_mask: Tensor | None = None,
        *,
        config: LossConfig | None = None,
        step: int | None = None,
        **settings,
    ) -> Path | None:
        """Save this batch now (whatever the call count); the path, or None on a rank that does not write."""
        if config is None:
            config = LossConfig(**settings)
        elif settings:
            raise TypeError(f"record() takes either config or keyword settings, not both; got {sorted(settings)}")
        elif not isinstance(config, LossConfig):
            raise TypeError(f"config must be a LossConfig or None; got {type(config).__name__}")
        for name, tensor in zip(_TENSORS, (values, old_values, returns), strict=True):
            if not isinstance(tensor, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
        if old_values.shape != values.shape or returns.shape != values.shape:
            raise ValueError(f"values, old_values and returns must have the same shape; got {tuple(values.shape)}, "
                             f"{tuple(old_values.shape)} and {tuple(returns.shape)}")
        if action_mask is not None and (not isinstance(action_mask, Tensor) or action_mask.shape != values.shape):
            got = tuple(action_mask.shape) if isinstance(action_mask, Tensor) else type(action_mask).__name__
            raise ValueError(f"action_mask must be None or a tensor of the shape of values {tuple(values.shape)}; "
                             f"got {got}")
        rank, world_size = _dist_rank()
        if self.ranks == "zero" and rank != 0:
            return None
        given = step if step is not None else self.step if self.step is not None else self.calls
        try:
            step = -1 if isinstance(given, bool) else operator.index(given)  # int, NumPy integer, 0-dim int tensor
        except TypeError:
            step = -1
        if step < 0:
            raise ValueError(f"step must be a whole number >= 0; got {given!r}")

        shape = tuple(values.shape)
        flat = (lambda t: t.reshape(1, -1)) if values.dim() <= 1 else (lambda t: t.reshape(-1, shape[-1]))
        tensors = [flat(t) for t in (values, old_values, returns)]
        mask = flat(action_mask) if action_mask is not None else torch.ones_like(tensors[0], dtype=torch.bool)
        rows_total = tensors[0].shape[0]
        rows = None
        if self.max_rows is not None and rows_total > self.max_rows:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
            rows = torch.randperm(rows_total, generator=generator)[: self.max_rows].sort().values
        arrays = {name: _host(t, rows) for name, t in zip(_TENSORS, tensors, strict=True)}
        arrays["action_mask"] = _host(mask, rows)
        if arrays["action_mask"].dtype.kind == "f":
            arrays["action_mask"] = arrays["action_mask"].astype(np.float32)
        meta = {
            "format": FORMAT,
            "step": step,
            "call": self.calls,
            "rank": rank,
            "world_size": world_size,
            "shape": list(shape),
            "dtype": str(values.dtype).removeprefix("torch."),
            "rows_total": rows_total,
            "rows_kept": None if rows is None else rows.tolist(),
            "mask_given": action_mask is not None,
        }
        path = self._write(arrays, meta, dataclasses.asdict(config), step, rank)
        self._bound(path)
        return path

    def _write(self, arrays: dict, meta: dict, settings: dict, step: int, rank: int) -> Path:
        """Write atomically (a temporary file, then a rename), so a reader never sees half a file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"step-{step:08d}-rank{rank}.npz"
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".recording-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **arrays, settings=np.array(json.dumps(settings)), meta=np.array(json.dumps(meta)))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path

    @property
    def files(self) -> list[Path]:
        """This rank's files in the directory, oldest first (as the bounds see them)."""
        if self._files is None:
            rank = _dist_rank()[0]
            existing = recorded_files(self.directory, rank=rank) if self.directory.is_dir() else []
            self._files = sorted(existing, key=lambda p: (p.stat().st_mtime_ns, p.name))
        return list(self._files)

    def _bound(self, path: Path) -> None:
        """Add ``path`` as the newest file, then delete the oldest until both bounds hold."""
        files = [p for p in self.files if p != path] + [path]
        if self.max_files is not None:
            while len(files) > self.max_files:
                files.pop(0).unlink(missing_ok=True)
        if self.max_megabytes is not None:
            limit = self.max_megabytes * 1e6
            sizes = [p.stat().st_size if p.exists() else 0 for p in files]
            while len(files) > 1 and sum(sizes) > limit:
                files.pop(0).unlink(missing_ok=True)
                sizes.pop(0)
            if sizes[-1] > limit:
                warnings.warn(f"{path.name} alone is {sizes[-1] / 1e6:.3g} MB, above max_megabytes="
                              f"{self.max_megabytes}; kept (lower max_rows to record smaller files)", stacklevel=3)
        self._files = files

    # ------------------------------------------------------------------ around other code

    @contextlib.contextmanager
    def attach(self, loss_module) -> Iterator[Recorder]:
        """Within the block, ``loss_module`` (a :class:`valueloss.ValueLoss`) records with this recorder."""
        previous = loss_module.recorder
        loss_module.recorder = self
        try:
            yield self
        finally:
            loss_module.recorder = previous

    def wrap(self, loss_function: Callable, **names: str) -> Callable:
        """``loss_function`` with the recorder counting (and, every N-th call, saving) its inputs.

        ``names`` maps the recorder's words to the function's parameter names, for the four tensors
        (``values``, ``old_values``, ``returns``, ``action_mask``) and for settings (``clip_eps``, ``mode``,
        ...: any :class:`~valueloss.functional.LossConfig` field); a name missing from ``names`` is looked up
        under the same word. For verl (``core_algos.compute_value_loss(vpreds, returns, values,
        response_mask, cliprange_value, loss_agg_mode)``)::

            recorder.wrap(compute_value_loss, values="vpreds", old_values="values",
                          action_mask="response_mask", clip_eps="cliprange_value", mode="loss_agg_mode")

        The loss function runs first; a call that raises records nothing.
        """
        signature = inspect.signature(loss_function)
        fields = {field.name for field in dataclasses.fields(LossConfig)}
        unknown = set(names) - set(_TENSORS) - {"action_mask"} - fields
        if unknown:
            raise TypeError(f"wrap() got unknown word(s) {sorted(unknown)}; expected values, old_values, returns, "
                            f"action_mask or a LossConfig field ({', '.join(sorted(fields))})")
        missing = [names.get(word, word) for word in _TENSORS if names.get(word, word) not in signature.parameters]
        if missing:
            raise TypeError(f"{getattr(loss_function, '__name__', loss_function)} has no parameter(s) {missing}; "
                            f"pass the names it uses, e.g. values='vpreds'")

        @functools.wraps(loss_function)
        def recorded(*args, **kwargs):
            result = loss_function(*args, **kwargs)
            self.calls += 1
            if self.calls % self.every == 0:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                got = bound.arguments
                settings = {word: got[name] for word, name in ((w, names.get(w, w)) for w in fields)
                            if name in got and got[name] is not None}
                self.record(*(got[names.get(w, w)] for w in _TENSORS), got.get(names.get("action_mask", "action_mask")),
                            **settings)
            return result

        return recorded

    @contextlib.contextmanager
    def patch(self, owner: object, attribute: str, **names: str) -> Iterator[Recorder]:
        """Within the block, ``owner.attribute`` (a loss function of a module or class) is :meth:`wrap`-ped.

        For example ``with recorder.patch(core_algos, "compute_value_loss", values="vpreds", ...):``
        around verl's critic update; the original function is put back on leaving the block.
        """
        original = getattr(owner, attribute)
        setattr(owner, attribute, self.wrap(original, **names))
        try:
            yield self
        finally:
            setattr(owner, attribute, original)
