"""Read and check a saved batch: :class:`Batch`, :func:`load_batch`, :func:`validate_batch`, :func:`save_batch`.

A batch is a mapping with ``values``, ``old_values``, ``returns`` (all ``(B, T)`` or ``(T,)``
floating point) and optionally ``action_mask`` (bool or 0/1; aliases ``response_mask``,
``loss_mask``, ``mask``), saved as ``.pt``/``.pth`` (``torch.save`` of a dict; read with
``torch.load(weights_only=True)``), ``.npz`` (``numpy.savez``) or ``.safetensors`` (needs the
``safetensors`` package, extra ``valueloss[io]``). :func:`load_batch` raises :class:`BatchError`
with a message naming the key and what was expected and what arrived.

>>> batch = validate_batch({"values": np.array([0.5, 0.1]), "old_values": np.zeros(2), "returns": np.ones(2)})
>>> batch.values.shape, batch.dtype, batch.had_mask
((1, 2), 'float64', False)
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MASK_ALIASES",
    "REQUIRED_KEYS",
    "SUFFIXES",
    "Batch",
    "BatchError",
    "load_batch",
    "load_batch_bytes",
    "save_batch",
    "validate_batch",
]

REQUIRED_KEYS = ("values", "old_values", "returns")
MASK_ALIASES = ("action_mask", "response_mask", "loss_mask", "mask")
SUFFIXES = (".pt", ".pth", ".npz", ".safetensors")


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
        tensor = obj.detach().cpu()
        arrived = str(tensor.dtype)
        if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.float32, torch.float64):
            tensor = tensor.float()  # bfloat16, float8: NumPy has no such dtype; float32 holds them exactly
        try:
            return tensor.numpy(), arrived
        except TypeError as error:
            raise BatchError(f"{source}: {name} has dtype {arrived}, which NumPy cannot hold") from error
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise BatchError(f"{source}: {name} must be a numeric array; got an object array")
        return obj, obj.dtype.name
    raise BatchError(f"{source}: {name} must be a tensor or array; got {type(obj).__name__}")


def validate_batch(mapping: object, *, source: str = "<memory>") -> Batch:
    """Check a mapping of NumPy arrays or torch tensors and return a :class:`Batch`, or raise :class:`BatchError`.

    Checks: it is a mapping; the keys ``values``, ``old_values``, ``returns`` exist; they are
    floating point with 1 or 2 dimensions and the same non-empty shape; the mask (if any) has that
    shape and holds only 0/1; no NaN/inf at unmasked positions; at least one unmasked token.
    1-D inputs are treated as a single sequence ``(1, T)``. Other keys are ignored (and listed).
    Torch tensors are moved to the CPU and converted (bfloat16 to float32, with ``dtype="bfloat16"``);
    the arrays of the returned batch are copies.
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


def _read_safetensors(raw: bytes, source: str) -> object:
    """Read with ``safetensors.numpy``; only a dtype NumPy lacks (bfloat16, float8) needs ``safetensors.torch``."""
    try:
        from safetensors.numpy import load as load_numpy
    except ImportError as error:
        raise BatchError(
            f"{source}: reading .safetensors needs the safetensors package (pip install 'valueloss[io]')"
        ) from error
    try:
        return load_numpy(raw)
    except KeyError:
        pass  # safetensors.numpy has no NumPy dtype for this file's dtype name (e.g. 'BF16'): read it with torch
    except Exception as error:  # noqa: BLE001 -- any failure here means "not a safetensors file"
        raise BatchError(f"{source}: not a safetensors file ({type(error).__name__}: {error})") from error
    try:
        from safetensors.torch import load as load_torch

        return load_torch(raw)
    except Exception as error:  # noqa: BLE001
        raise BatchError(f"{source}: not a safetensors file ({type(error).__name__}: {error})") from error


def _read(data: bytes | os.PathLike | str, suffix: str, source: str) -> object:
    buffer = io.BytesIO(data) if isinstance(data, bytes) else data
    if suffix in (".pt", ".pth"):
        try:
            return torch.load(buffer, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 -- any failure here means "not a loadable batch"
            raise BatchError(
                f"{source}: not a PyTorch file that loads with torch.load(weights_only=True) "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            ) from error
    if suffix == ".npz":
        try:
            with np.load(buffer, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
            raise BatchError(f"{source}: not a NumPy .npz archive ({type(error).__name__}: {error})") from error
    if suffix == ".safetensors":
        return _read_safetensors(data if isinstance(data, bytes) else Path(data).read_bytes(), source)
    raise BatchError(f"{source}: unsupported file type {suffix or '(none)'!r}; expected one of {', '.join(SUFFIXES)}")


def load_batch(path: str | os.PathLike) -> Batch:
    """Load and validate a batch file (``.pt``, ``.pth``, ``.npz``, ``.safetensors``); raise :class:`BatchError`."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike naming a batch file; got {type(path).__name__}")
    path = Path(path)
    if not path.exists():
        raise BatchError(f"{path}: no such file")
    if path.is_dir():
        raise BatchError(f"{path}: is a directory, expected a batch file")
    try:
        path.open("rb").close()
    except OSError as error:
        raise BatchError(f"{path}: cannot be read ({error.strerror or error})") from error
    return validate_batch(_read(path, path.suffix.lower(), str(path)), source=str(path))


def load_batch_bytes(data: bytes, filename: str) -> Batch:
    """Like :func:`load_batch`, for the bytes of an uploaded file; ``filename`` gives the format."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be the file's bytes (bytes, bytearray or memoryview); got {type(data).__name__}")
    if not isinstance(filename, str):
        raise TypeError(f"filename must be a str such as 'batch.npz' (its suffix gives the format); "
                        f"got {type(filename).__name__}")
    return validate_batch(_read(bytes(data), Path(filename).suffix.lower(), filename), source=filename)


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
