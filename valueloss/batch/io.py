"""Read and check a saved batch: :class:`Batch`, :func:`load_batch`, :func:`validate_batch`, :func:`save_batch`.

A batch is a mapping with ``values``, ``old_values``, ``returns`` (all ``(B, T)`` or ``(T,)``
floating point) and optionally ``action_mask`` (bool or 0/1; aliases ``response_mask``,
``loss_mask``, ``mask``), saved as ``.pt``/``.pth`` (``torch.save`` of a dict; read with
``torch.load(weights_only=True)``, on torch >= 2.10 only), ``.npz`` (``numpy.savez``) or ``.safetensors``
(read by this module from the format's specification; no package needed). :func:`load_batch` raises
:class:`BatchError` with a one-line message naming the key and what was expected and what arrived.

Files are untrusted: only regular files are read; :class:`Limits` (bytes, tokens, sequences) are checked from
each format's headers before an array is read, and keys other than the batch's are never read
(docs/inspect.md, "Untrusted files").

>>> batch = validate_batch({"values": np.array([0.5, 0.1]), "old_values": np.zeros(2), "returns": np.ones(2)})
>>> batch.values.shape, batch.dtype, batch.had_mask
((1, 2), 'float64', False)
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import stat
import struct
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MASK_ALIASES",
    "REQUIRED_KEYS",
    "SUFFIXES",
    "Batch",
    "BatchError",
    "Limits",
    "load_batch",
    "load_batch_bytes",
    "save_batch",
    "validate_batch",
]

REQUIRED_KEYS = ("values", "old_values", "returns")
MASK_ALIASES = ("action_mask", "response_mask", "loss_mask", "mask")
SUFFIXES = (".pt", ".pth", ".npz", ".safetensors")

MAX_BYTES = 2**28
"""Default limit on the decompressed bytes of the arrays read (and on the size of a ``.pt``): 256 MiB."""
MAX_TOKENS = 2**22
"""Default limit on the elements of one array, ``B * T``: about 4.2 million tokens."""
MAX_SEQUENCES = 2**16
"""Default limit on the sequences (rows ``B``) of a batch: 65536."""
MAX_HEADER = 2**20
"""Largest safetensors JSON header, ``.npy`` header or zip central directory read (bytes)."""
MAX_DIRECTORY = MAX_HEADER
MAX_PICKLE = 2**23
"""Largest pickle record (``data.pkl``) of a ``.pt`` read: 8 MiB (a dict of a few tensors takes a few KB)."""
PT_MIN_TORCH = "2.10"
"""The oldest torch whose ``torch.load(weights_only=True)`` reads ``.pt`` files here: published advisories show
it bypassable before 2.6 (code execution) and before 2.10 (memory corruption)."""


class BatchError(ValueError):
    """A file or mapping that is not a valid batch; the message says what was expected and what arrived."""


@dataclass(frozen=True)
class Batch:
    """A validated batch: NumPy float arrays of one shape ``(B, T)`` and a bool mask of that shape.

    ``values``, ``old_values`` and ``returns`` share one float dtype: float32 or float64 (half
    precision, bfloat16 and float8 are widened to float32, exactly). ``dtype`` names what was
    loaded (for example ``"float32"`` or ``"bfloat16"``); it defaults to the dtype of ``values``.
    :meth:`tensors` gives torch tensors, e.g. for :func:`valueloss.diagnose`.
    """

    values: np.ndarray
    old_values: np.ndarray
    returns: np.ndarray
    action_mask: np.ndarray
    source: str = "<memory>"
    ignored_keys: tuple[str, ...] = ()
    had_mask: bool = True
    """False when the file held no mask (every token counts)."""
    dtype: str = ""
    """The floating-point dtype that was loaded (before half precision was widened to float32)."""

    def __post_init__(self) -> None:
        if not self.dtype:
            object.__setattr__(self, "dtype", np.asarray(self.values).dtype.name)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(values, old_values, returns, action_mask)`` as new CPU torch tensors.

        The float tensors keep the arrays' dtype (float32 for a float32 or bfloat16 file); the mask is bool.
        """
        arrays = (self.values, self.old_values, self.returns, self.action_mask)
        return tuple(torch.from_numpy(np.array(a, copy=True)) for a in arrays)  # type: ignore[return-value]


# --------------------------------------------------------------------------- loading


def _to_array(source: str, name: str, obj: object) -> tuple[np.ndarray, str]:
    """``obj`` as a NumPy array, and the dtype it arrived in (``"torch.bfloat16"`` for a torch tensor)."""
    if isinstance(obj, Tensor):
        arrived = str(obj.dtype)
        if obj.is_nested or obj.layout != torch.strided:
            kind = "nested" if obj.is_nested else str(obj.layout).removeprefix("torch.")
            raise BatchError(f"{source}: {name} is a {kind} tensor; expected a dense (strided) tensor")
        if obj.device.type != "cpu":
            raise BatchError(f"{source}: {name} is a tensor on device {obj.device.type!r} (no data on the CPU); "
                             "expected a CPU tensor")
        if obj.is_quantized:
            raise BatchError(f"{source}: {name} is a quantized tensor; expected a float tensor")
        tensor = obj.detach().resolve_conj().resolve_neg()
        if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.float32, torch.float64):
            tensor = tensor.float()  # bfloat16, float8: NumPy has no such dtype; float32 holds them exactly
        try:
            return tensor.numpy(), arrived
        except (TypeError, RuntimeError) as error:
            raise BatchError(f"{source}: {name} has dtype {arrived}, which NumPy cannot hold") from error
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise BatchError(f"{source}: {name} must be a numeric array; got an object array")
        return obj, obj.dtype.name
    raise BatchError(f"{source}: {name} must be a tensor or array; got {type(obj).__name__}")


def validate_batch(mapping: object, *, source: str = "<memory>", limits: Limits | None = None) -> Batch:
    """Check a mapping of NumPy arrays or torch tensors and return a :class:`Batch`, or raise :class:`BatchError`.

    Checks: it is a mapping; the keys ``values``, ``old_values``, ``returns`` exist; they are
    floating point with 1 or 2 dimensions and the same non-empty shape; the mask (if any) has that
    shape and holds only 0/1; no NaN/inf at unmasked positions; at least one unmasked token.
    1-D inputs are treated as a single sequence ``(1, T)``. Other keys are ignored (and listed).
    Torch tensors are moved to the CPU and converted (bfloat16 to float32, with ``dtype="bfloat16"``);
    the arrays of the returned batch are copies. With ``limits`` (:class:`Limits`; :func:`load_batch`
    passes its own) the shapes are checked against them before any array is converted.
    """
    if not isinstance(mapping, Mapping):
        raise BatchError(
            f"{source}: expected a dict with keys {', '.join(REQUIRED_KEYS)} (and optionally action_mask); "
            f"got {type(mapping).__name__}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in mapping]
    if missing:
        found = ", ".join(sorted(map(str, mapping))) or "none"
        raise BatchError(f"{source}: missing key(s) {', '.join(missing)}; found keys: {found}")
    mask_keys = [key for key in MASK_ALIASES if key in mapping]
    if len(mask_keys) > 1:
        raise BatchError(f"{source}: found several masks ({', '.join(mask_keys)}); keep exactly one")
    mask_key = mask_keys[0] if mask_keys else None
    if limits is not None:  # before any conversion: a tensor of zero strides can claim any size
        for key in (*REQUIRED_KEYS, *([mask_key] if mask_key else [])):
            shape = _shape_of(mapping[key])
            if shape is not None:
                limits.check(source, key, shape, 8)
    arrays, arrived = {}, []
    for key in REQUIRED_KEYS:
        array, dtype = _to_array(source, key, mapping[key])
        if array.dtype.kind != "f":
            raise BatchError(f"{source}: {key} must be floating point; got dtype {dtype}")
        arrays[key] = array
        arrived.append(dtype.removeprefix("torch."))
    shape = arrays["values"].shape
    if len(shape) not in (1, 2):
        raise BatchError(f"{source}: values must have shape (B, T) or (T,); got {tuple(shape)}")
    if 0 in shape:
        raise BatchError(f"{source}: values is empty; got shape {tuple(shape)}")
    for key in REQUIRED_KEYS[1:]:
        if arrays[key].shape != shape:
            raise BatchError(
                f"{source}: values and {key} must have the same shape; "
                f"got {tuple(shape)} and {tuple(arrays[key].shape)}"
            )

    if mask_key is None:
        mask = np.ones(shape, dtype=bool)
    else:
        raw, raw_dtype = _to_array(source, mask_key, mapping[mask_key])
        if raw.shape != shape:
            raise BatchError(
                f"{source}: values and {mask_key} must have the same shape; got {tuple(shape)} and {tuple(raw.shape)}"
            )
        if raw.dtype.kind not in "biuf":
            raise BatchError(f"{source}: {mask_key} must be bool or 0/1; got dtype {raw_dtype}")
        if raw.dtype != bool:
            bad = ~((raw == 0) | (raw == 1))
            if bad.any():
                example = raw[bad][0].item()
                raise BatchError(f"{source}: {mask_key} must hold only 0/1 (or bool); got the value {example!r}")
        mask = raw != 0

    if len(shape) == 1:
        arrays = {key: a[None, :] for key, a in arrays.items()}
        mask = mask[None, :]
    if not mask.any():
        raise BatchError(f"{source}: {mask_key} selects no token (all zeros); nothing to inspect")
    for key in REQUIRED_KEYS:
        bad = mask & ~np.isfinite(arrays[key])
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise BatchError(
                f"{source}: {key} has {int(bad.sum())} NaN/inf value(s) at unmasked positions (first at {first})"
            )
    ignored = tuple(sorted(str(k) for k in mapping if k not in REQUIRED_KEYS and k != mask_key))
    # Like valueloss.functional._compute_dtype: promote, and hold half precision in float32.
    dtype = np.result_type(*arrays.values())
    if dtype.itemsize < 4:
        dtype = np.dtype(np.float32)
    return Batch(
        *(np.array(arrays[key], dtype=dtype) for key in REQUIRED_KEYS),
        action_mask=np.array(mask, dtype=bool),
        source=source,
        ignored_keys=ignored,
        had_mask=mask_key is not None,
        dtype=arrived[0] if len(set(arrived)) == 1 else dtype.name,
    )


# --------------------------------------------------------------------------- reading untrusted files
#
# Every reader checks sizes from the file's headers before it reads an array (the zip central directory
# and each .npy header; the safetensors JSON header; the zip records of a .pt), reads only the arrays it
# needs, and turns every failure into a one-line BatchError.


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive whole number; got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Limits:
    """What a batch file may hold: refused from its headers, before anything big is read.

    ``max_bytes``: the decompressed bytes of the arrays read (and the size of a ``.pt`` file);
    ``max_tokens``: elements of one array (``B * T``); ``max_sequences``: rows ``B``. The command line
    raises them with ``--max-bytes``, ``--max-tokens`` and ``--max-sequences``.
    """

    max_bytes: int = MAX_BYTES
    max_tokens: int = MAX_TOKENS
    max_sequences: int = MAX_SEQUENCES

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_tokens", "max_sequences"):
            _positive_int(getattr(self, name), name)

    def check(self, source: str, key: str, shape: tuple[int, ...], itemsize: int) -> int:
        """The bytes of an array of ``shape``; a BatchError naming the limit (and its flag) if it is over one."""
        count = math.prod(shape)
        rows = shape[0] if len(shape) == 2 else 1
        for amount, limit, what, flag in (
            (count, self.max_tokens, "tokens", "max-tokens"),
            (rows, self.max_sequences, "sequences", "max-sequences"),
            (count * itemsize, self.max_bytes, "bytes", "max-bytes"),
        ):
            if amount > limit:
                raise BatchError(
                    f"{source}: {key} has shape {tuple(shape)}: {amount} {what}, more than the limit of {limit} "
                    f"(raise it with --{flag} N, or {flag.replace('-', '_')}=N in Python)"
                )
        return count * itemsize


def _shape_of(obj: object) -> tuple[int, ...] | None:
    """The shape of an array or dense tensor; None for anything else (refused later, by :func:`_to_array`)."""
    if isinstance(obj, np.ndarray) or (isinstance(obj, Tensor) and not obj.is_nested):
        return tuple(int(n) for n in obj.shape)
    return None


def _zip_directory_size(file: BinaryIO, size: int, source: str, kind: str) -> None:
    """Refuse a zip whose central directory is large (it is parsed whole) or that is not a zip at all.

    Finds the end-of-central-directory record (and its zip64 form) as :mod:`zipfile` does, from the last
    64 KiB of the file.
    """
    tail_length = min(size, 22 + 65535)
    file.seek(size - tail_length)
    tail = file.read(tail_length)
    if tail[-22:-18] == b"PK\x05\x06" and tail[-2:] == b"\x00\x00":
        position = len(tail) - 22
    else:
        position = tail.rfind(b"PK\x05\x06")
    if position < 0 or len(tail) - position < 22:
        raise BatchError(f"{source}: {kind} (not a zip archive)")
    (directory,) = struct.unpack("<I", tail[position + 12:position + 16])
    locator = tail[position - 20:position] if position >= 20 else b""
    if locator[:4] == b"PK\x06\x07":
        # The zip64 record: zipfile reads the one just before the locator; the locator also names an offset.
        # Both are checked, and the largest directory size counts.
        end_record = size - tail_length + position
        (named,) = struct.unpack("<Q", locator[8:16])
        for offset in {end_record - 20 - 56, named}:
            if not 0 <= offset <= size - 56:
                raise BatchError(f"{source}: {kind} (a broken zip64 directory)")
            file.seek(offset)
            record = file.read(56)
            if record[:4] != b"PK\x06\x06":
                raise BatchError(f"{source}: {kind} (a broken zip64 directory)")
            directory = max(directory, struct.unpack("<Q", record[40:48])[0])
    if directory > MAX_DIRECTORY:
        raise BatchError(
            f"{source}: its zip directory takes {directory} bytes (more than {MAX_DIRECTORY}): far more members "
            "than a batch holds; expected a few arrays"
        )
    file.seek(0)


def _check_member(info: zipfile.ZipInfo, source: str) -> None:
    if info.flag_bits & 0x1:
        raise BatchError(f"{source}: member {info.filename!r} is encrypted; expected a plain archive")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise BatchError(
            f"{source}: member {info.filename!r} uses compression method {info.compress_type}; "
            "expected stored or deflated members (as numpy.savez and numpy.savez_compressed write)"
        )


def _read_npy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, source: str, limits: Limits,
                     budget: list[int]) -> np.ndarray:
    """One array of an .npz: its header checked against the limits, then exactly its bytes read."""
    _check_member(info, source)
    if info.file_size > limits.max_bytes + MAX_HEADER:
        raise BatchError(
            f"{source}: member {info.filename!r} declares {info.file_size} bytes, more than the limit of "
            f"{limits.max_bytes} (raise it with --max-bytes N, or max_bytes=N in Python)"
        )
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(member, max_header_size=MAX_HEADER)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(member, max_header_size=MAX_HEADER)
        else:
            raise BatchError(f"{source}: {key} is a .npy of format version {version}; expected 1.0, 2.0 or 3.0")
        if dtype.hasobject:
            raise BatchError(f"{source}: {key} holds Python objects (pickles are never loaded); "
                             "expected a numeric array")
        if dtype.itemsize == 0 or dtype.kind not in "biufc":
            raise BatchError(f"{source}: {key} must be a numeric array; got dtype {dtype}")
        nbytes = limits.check(source, key, shape, dtype.itemsize)
        budget[0] += nbytes
        if budget[0] > limits.max_bytes:
            raise BatchError(
                f"{source}: the arrays read so far hold {budget[0]} bytes, more than the limit of {limits.max_bytes} "
                "(raise it with --max-bytes N, or max_bytes=N in Python)"
            )
        data = member.read(nbytes)
        if len(data) != nbytes:
            raise BatchError(f"{source}: {key} is truncated: its header declares {nbytes} bytes, "
                             f"the member holds {len(data)}")
        while member.read(1 << 16):  # to the end, so that zipfile checks the CRC (bounded by file_size)
            pass
    return np.frombuffer(data, dtype=dtype, count=math.prod(shape)).reshape(shape, order="F" if fortran else "C")


def _read_npz(file: BinaryIO, size: int, source: str, limits: Limits) -> dict[str, object]:
    _zip_directory_size(file, size, source, "not a NumPy .npz archive")
    with zipfile.ZipFile(file) as archive:
        members = {}
        for info in archive.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            members[key] = info
        wanted = [key for key in (*REQUIRED_KEYS, *MASK_ALIASES) if key in members]
        out: dict[str, object] = {key: None for key in members}  # the others are named, never read
        budget = [0]
        for key in wanted:
            if not members[key].filename.endswith(".npy"):
                raise BatchError(f"{source}: member {members[key].filename!r} is not a .npy array")
            out[key] = _read_npy_member(archive, members[key], key, source, limits, budget)
    return out


_SAFETENSORS_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                      "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
_SAFETENSORS_TORCH = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _read_safetensors(file: BinaryIO, size: int, source: str, limits: Limits) -> dict[str, object]:
    """The safetensors format (an 8-byte length, a JSON header, the raw data): only the needed tensors are read.

    Follows the format's specification (huggingface/safetensors, README "Format"); no package needed.
    """
    bad = f"{source}: not a safetensors file"
    head = file.read(8)
    if len(head) < 8:
        raise BatchError(f"{bad} (shorter than its 8-byte header length)")
    length = int.from_bytes(head, "little")
    if length > MAX_HEADER:
        raise BatchError(f"{bad} (its header declares {length} bytes; at most {MAX_HEADER} are read)")
    if 8 + length > size:
        raise BatchError(f"{bad} (its header declares {length} bytes; the file has {size})")
    try:
        header = json.loads(file.read(length).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise BatchError(f"{bad} (its header is not JSON: {error})") from None
    if not isinstance(header, dict):
        raise BatchError(f"{bad} (its header is a JSON {type(header).__name__}, expected an object)")
    data_size = size - 8 - length
    out: dict[str, object] = {key: None for key in header if key != "__metadata__"}
    budget = 0
    for key in (*REQUIRED_KEYS, *MASK_ALIASES):
        entry = header.get(key)
        if entry is None:
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise BatchError(f"{bad} (the entry of {key} lacks dtype, shape or data_offsets)")
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
            raise BatchError(f"{bad} (the shape or data_offsets of {key} are not whole numbers)")
        if dtype_name in _SAFETENSORS_NUMPY:
            itemsize = np.dtype(_SAFETENSORS_NUMPY[dtype_name]).itemsize
        elif dtype_name in _SAFETENSORS_TORCH:
            itemsize = getattr(torch, _SAFETENSORS_TORCH[dtype_name]).itemsize
        else:
            raise BatchError(f"{source}: {key} has dtype {dtype_name!r}, which valueloss does not read; "
                             f"expected one of {', '.join([*_SAFETENSORS_NUMPY, *_SAFETENSORS_TORCH])}")
        nbytes = limits.check(source, key, tuple(shape), itemsize)
        start, end = offsets
        if not 0 <= start <= end <= data_size or end - start != nbytes:
            raise BatchError(f"{bad} (the data_offsets {offsets} of {key} do not fit its shape {tuple(shape)} "
                             f"and dtype {dtype_name} in {data_size} bytes of data)")
        budget += nbytes
        if budget > limits.max_bytes:
            raise BatchError(f"{source}: the arrays read so far hold {budget} bytes, more than the limit of "
                             f"{limits.max_bytes} (raise it with --max-bytes N, or max_bytes=N in Python)")
        file.seek(8 + length + start)
        raw = file.read(nbytes)
        if len(raw) != nbytes:
            raise BatchError(f"{bad} (the data of {key} is truncated)")
        if dtype_name in _SAFETENSORS_NUMPY:
            out[key] = np.frombuffer(raw, dtype=_SAFETENSORS_NUMPY[dtype_name]).reshape(shape)
        else:
            dtype = getattr(torch, _SAFETENSORS_TORCH[dtype_name])
            flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            out[key] = flat.reshape(shape)
    return out


def _read_pt(file: BinaryIO, size: int, source: str, limits: Limits) -> object:
    if torch.__version__ < PT_MIN_TORCH:
        raise BatchError(
            f"{source}: .pt files are not read with torch {torch.__version__}: torch.load(weights_only=True) "
            f"has published bypasses before torch {PT_MIN_TORCH}; upgrade torch, or save the batch as .npz "
            "(numpy.savez or valueloss.batch.save_batch)"
        )
    if size > limits.max_bytes:
        raise BatchError(f"{source}: the file has {size} bytes, more than the limit of {limits.max_bytes} "
                         "(raise it with --max-bytes N, or max_bytes=N in Python)")
    kind = "not a PyTorch file that loads with torch.load(weights_only=True)"
    _zip_directory_size(file, size, source, kind)
    with zipfile.ZipFile(file) as archive:
        for info in archive.infolist():
            _check_member(info, source)
            if info.compress_type != zipfile.ZIP_STORED:
                raise BatchError(f"{source}: record {info.filename!r} is compressed; torch.save stores records "
                                 "uncompressed (re-save the batch with torch.save, or as .npz)")
            if info.filename.endswith(".pkl") and info.file_size > MAX_PICKLE:
                raise BatchError(f"{source}: record {info.filename!r} has {info.file_size} bytes (more than "
                                 f"{MAX_PICKLE}); a dict of a few tensors takes a few KB")
    file.seek(0)
    data = file.read(size)
    try:
        with warnings.catch_warnings():  # torch's deprecation notices (quantized, typed storages) are not ours
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- any failure here means "not a loadable batch"
        raise BatchError(
            f"{source}: {kind} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error


_READERS = {".pt": _read_pt, ".pth": _read_pt, ".npz": _read_npz, ".safetensors": _read_safetensors}


def _read(file: BinaryIO, size: int, suffix: str, source: str, limits: Limits) -> object:
    """The mapping in ``file`` (read by its suffix); every failure becomes a one-line BatchError."""
    reader = _READERS.get(suffix)
    if reader is None:
        raise BatchError(
            f"{source}: unsupported file type {suffix or '(none)'!r}; expected one of {', '.join(SUFFIXES)}"
        )
    try:
        return reader(file, size, source, limits)
    except BatchError:
        raise
    except MemoryError:
        raise BatchError(f"{source}: ran out of memory while reading it; lower the limits "
                         "(--max-bytes, --max-tokens) or save a smaller batch") from None
    except Exception as error:  # noqa: BLE001 -- a broken file in any other way: name it, never a traceback
        what = {".npz": "not a NumPy .npz archive", ".safetensors": "not a safetensors file"}.get(suffix, "unreadable")
        message = str(error).splitlines()[0] if str(error) else ""
        raise BatchError(f"{source}: {what} ({type(error).__name__}: {message})") from error


def _display(path: str | os.PathLike) -> str:
    """A path as text that can always be printed: bytes that are not UTF-8 are shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def load_batch(path: str | os.PathLike, *, max_bytes: int = MAX_BYTES, max_tokens: int = MAX_TOKENS,
               max_sequences: int = MAX_SEQUENCES) -> Batch:
    """Load and validate a batch file (``.pt``, ``.pth``, ``.npz``, ``.safetensors``); raise :class:`BatchError`.

    Only regular files are read (symbolic links are followed, then FIFOs, devices and sockets refused).
    The limits (see :class:`Limits`) are checked from the file's headers before any array is read; keys
    other than the batch's are named in ``ignored_keys`` but never read (except in a ``.pt``, which
    ``torch.load`` reads whole: its file size is bounded by ``max_bytes``). ``.pt`` files are read with
    ``torch.load(weights_only=True)`` and only on torch >= :data:`PT_MIN_TORCH`.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike naming a batch file; got {type(path).__name__}")
    limits = Limits(max_bytes, max_tokens, max_sequences)
    source = _display(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below, unread).
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise BatchError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise BatchError(f"{source}: is a directory, expected a batch file") from None
    except OSError as error:
        raise BatchError(f"{source}: cannot be read ({error.strerror or error})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise BatchError(f"{source}: is a directory, expected a batch file")
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a regular file")
        raise BatchError(f"{source}: is {kind} (after following links); only regular files are read")
    with os.fdopen(fd, "rb") as file:
        mapping = _read(file, info.st_size, Path(path).suffix.lower(), source, limits)
    return validate_batch(mapping, source=source, limits=limits)


def load_batch_bytes(data: bytes, filename: str, *, max_bytes: int = MAX_BYTES, max_tokens: int = MAX_TOKENS,
                     max_sequences: int = MAX_SEQUENCES) -> Batch:
    """Like :func:`load_batch`, for the bytes of an uploaded file; ``filename`` gives the format."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be the file's bytes (bytes, bytearray or memoryview); got {type(data).__name__}")
    if not isinstance(filename, str):
        raise TypeError(f"filename must be a str such as 'batch.npz' (its suffix gives the format); "
                        f"got {type(filename).__name__}")
    limits = Limits(max_bytes, max_tokens, max_sequences)
    source = _display(filename)
    data = memoryview(data).cast("B")
    mapping = _read(io.BytesIO(data), data.nbytes, Path(filename).suffix.lower(), source, limits)
    return validate_batch(mapping, source=source, limits=limits)


def save_batch(batch: Batch, path: str | os.PathLike) -> None:
    """Save a batch as ``.npz`` (NumPy) or ``.pt`` (a dict of tensors, loadable with ``weights_only=True``)."""
    if not isinstance(batch, Batch):
        raise TypeError(f"batch must be a Batch (from load_batch, validate_batch or synthetic_batch); "
                        f"got {type(batch).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike ending in .pt, .pth or .npz; got {type(path).__name__}")
    path = Path(path)
    arrays = {
        "values": np.asarray(batch.values),
        "old_values": np.asarray(batch.old_values),
        "returns": np.asarray(batch.returns),
        "action_mask": np.asarray(batch.action_mask, dtype=bool),
    }
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    elif path.suffix in (".pt", ".pth"):
        torch.save({key: torch.from_numpy(np.array(a, copy=True)) for key, a in arrays.items()}, path)
    else:
        raise ValueError(f"path must end in .pt, .pth or .npz; got {path.name!r}")
