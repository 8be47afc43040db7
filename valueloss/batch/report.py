"""What value clipping does to *your* batch: load, validate and report on a saved rollout batch.

A batch is a mapping with ``values``, ``old_values``, ``returns`` (all ``(B, T)`` or ``(T,)``
floating point) and optionally ``action_mask`` (bool or 0/1; aliases ``response_mask``,
``loss_mask``, ``mask``), saved as ``.pt``/``.pth`` (``torch.save`` of a dict; read with
``torch.load(weights_only=True)``), ``.npz`` (``numpy.savez``) or ``.safetensors`` (needs the
``safetensors`` package, extra ``valueloss[io]``). :func:`load_batch` raises :class:`BatchError`
with a message naming the key and what was expected; :func:`inspect_batch` computes an
:class:`InspectReport`; the command line ``valueloss inspect BATCH`` prints it.

The report is computed with NumPy in float64 and mirrors the torch code of the package
(:func:`valueloss.diagnose`, :func:`valueloss.functional.clip_regions` and
:func:`valueloss.functional.aggregate`; ``tests/test_inspect.py`` checks that they agree). This
module imports torch only when it has to: to read a ``.pt`` file, a ``.safetensors`` file holding a
dtype NumPy lacks (bfloat16), to accept torch tensors, or in :meth:`Batch.tensors` and
:func:`synthetic_batch`. So ``valueloss inspect batch.npz`` never pays torch's import time.

The suggested ``clip_eps`` range comes from a closed form: with ``d = v - old`` and
``r = R - old``, a token's gradient is killed by the ``max`` form exactly when
``clip_eps < min(|d|, sign(d) * (2 r - d))`` (for ``variant="clipped"``: when ``clip_eps < |d|``).
So the clip fraction as a function of ``clip_eps`` is the survival function of these per-token
thresholds (:func:`clip_thresholds`), and a target clip fraction maps to a quantile.

``synthetic_batch`` generates the sample batch shipped in ``notebooks/data/sample_batch.npz``.
This module does not import matplotlib until :func:`plot_report` is called.

>>> batch = validate_batch({"values": np.array([0.5, 0.1]), "old_values": np.zeros(2), "returns": np.ones(2)})
>>> report = inspect_batch(batch, clip_eps=0.2)
>>> report.clip_fraction, report.outside_band_fraction, round(report.loss, 6)
(0.5, 0.5, 0.3625)
"""

from __future__ import annotations

import functools
import importlib.metadata
import io
import math
import numbers
import os
import re
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._choices import AGGREGATION_MODES, VARIANTS
from .._choices import check_choice as _check_choice

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "MASK_ALIASES",
    "REQUIRED_KEYS",
    "Batch",
    "BatchError",
    "InspectReport",
    "band_closed",
    "clip_fraction_curve",
    "clip_thresholds",
    "format_report",
    "inspect_batch",
    "load_batch",
    "load_batch_bytes",
    "plot_report",
    "save_batch",
    "suggest_clip_eps",
    "synthetic_batch",
    "validate_batch",
]

REQUIRED_KEYS = ("values", "old_values", "returns")
MASK_ALIASES = ("action_mask", "response_mask", "loss_mask", "mask")
SUFFIXES = (".pt", ".pth", ".npz", ".safetensors")
HISTOGRAM_EDGES = (-math.inf, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, math.inf)
"""Bin edges of the histogram of ``(values - old_values) / clip_eps``; bins are ``[lo, hi)`` as printed.

With a closed band ``[-1, 1]`` (torch <= 2.13, see :func:`band_closed`) a token exactly at ``+clip_eps`` is
inside the band but counted in ``[+1.0, +1.5)``."""
POSITION_BINS = 10


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
        """``(values, old_values, returns, action_mask)`` as new CPU torch tensors (imports torch).

        The float tensors keep the arrays' dtype (float32 for a float32 or bfloat16 file); the mask is bool.
        """
        import torch

        arrays = (self.values, self.old_values, self.returns, self.action_mask)
        return tuple(torch.from_numpy(np.array(a, copy=True)) for a in arrays)  # type: ignore[return-value]


# --------------------------------------------------------------------------- loading


def _to_array(source: str, name: str, obj: object) -> tuple[np.ndarray, str]:
    """``obj`` as a NumPy array, and the dtype it arrived in (``"torch.bfloat16"`` for a torch tensor)."""
    torch = sys.modules.get("torch")  # a torch tensor can only exist if torch was imported
    if torch is not None and isinstance(obj, torch.Tensor):
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
        import torch  # only .pt files need torch to be read

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
    path = Path(path)
    if not path.exists():
        raise BatchError(f"{path}: no such file")
    if path.is_dir():
        raise BatchError(f"{path}: is a directory, expected a batch file")
    return validate_batch(_read(path, path.suffix.lower(), str(path)), source=str(path))


def load_batch_bytes(data: bytes, filename: str) -> Batch:
    """Like :func:`load_batch`, for the bytes of an uploaded file; ``filename`` gives the format."""
    return validate_batch(_read(bytes(data), Path(filename).suffix.lower(), filename), source=filename)


def save_batch(batch: Batch, path: str | os.PathLike) -> None:
    """Save a batch as ``.npz`` (NumPy) or ``.pt`` (a dict of tensors, loadable with ``weights_only=True``)."""
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
        import torch

        torch.save({key: torch.from_numpy(np.array(a, copy=True)) for key, a in arrays.items()}, path)
    else:
        raise ValueError(f"path must end in .pt, .pth or .npz; got {path.name!r}")


# --------------------------------------------------------------------------- the synthetic sample


def synthetic_batch(
    seed: int = 0,
    *,
    batch_size: int = 24,
    max_len: int = 64,
    min_len: int = 4,
    gamma: float = 1.0,
    lam: float = 0.95,
    kl_coef: float = 0.05,
    learning_rate: float = 0.35,
    drift_noise: float = 0.12,
) -> Batch:
    """A reproducible RLHF-like critic batch: ragged responses, GAE returns, one step of value drift.

    Each of ``batch_size`` responses has a length drawn uniformly in ``[min_len, max_len]``
    (right padding; padded positions hold 0 and are masked out). Rewards are a per-token KL
    penalty ``-kl_coef * |N(0, 1)|`` plus a terminal score ``N(0, 1)``. ``old_values`` is a
    critic that knows part of the return (``0.6 * G_t`` plus a smooth per-sequence bias and noise);
    ``returns`` are GAE(``gamma``, ``lam``) returns computed with those ``old_values``. ``values``
    is the critic after one optimiser step: it moves ``learning_rate`` of the way from
    ``old_values`` to ``returns`` plus heavy-tailed (Student-t, 3 dof) noise of scale
    ``drift_noise``, so a realistic share of tokens leaves a ``clip_eps=0.2`` band.
    Drawn with torch's generator (imported here), so the sample stays bit-identical to the one shipped.
    """
    if batch_size < 1 or min_len < 1 or max_len < min_len:
        raise ValueError(
            f"need batch_size >= 1 and 1 <= min_len <= max_len; got {batch_size}, {min_len}, {max_len}"
        )
    import torch

    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch_size,), generator=generator)
    positions = torch.arange(max_len)
    mask = positions[None, :] < lengths[:, None]
    rewards = -kl_coef * torch.randn(batch_size, max_len, generator=generator, dtype=torch.float64).abs()
    score = torch.randn(batch_size, generator=generator, dtype=torch.float64)
    rewards[torch.arange(batch_size), lengths - 1] += score
    rewards = torch.where(mask, rewards, 0.0)

    # Monte-Carlo return-to-go, then a critic that knows part of it.
    to_go = torch.zeros_like(rewards)
    running = torch.zeros(batch_size, dtype=torch.float64)
    for t in reversed(range(max_len)):
        running = rewards[:, t] + gamma * running
        to_go[:, t] = running
    bias = 0.3 * torch.randn(batch_size, 1, generator=generator, dtype=torch.float64)
    ramp = torch.linspace(1.0, 0.2, max_len, dtype=torch.float64)[None, :]
    noise = 0.1 * torch.randn(batch_size, max_len, generator=generator, dtype=torch.float64)
    old_values = torch.where(mask, 0.6 * to_go + bias * ramp + noise, 0.0)

    # GAE returns with the old critic.
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(batch_size, dtype=torch.float64)
    for t in reversed(range(max_len)):
        next_value = old_values[:, t + 1] if t + 1 < max_len else torch.zeros(batch_size, dtype=torch.float64)
        next_value = torch.where(mask[:, t + 1] if t + 1 < max_len else torch.zeros_like(mask[:, 0]), next_value, 0.0)
        delta = rewards[:, t] + gamma * next_value - old_values[:, t]
        last = torch.where(mask[:, t], delta + gamma * lam * last, 0.0)
        advantages[:, t] = last
    returns = torch.where(mask, advantages + old_values, 0.0)

    # Student-t with 3 degrees of freedom: a normal over sqrt(chi2_3 / 3).
    normal = torch.randn(batch_size, max_len, generator=generator, dtype=torch.float64)
    chi2 = (torch.randn(3, batch_size, max_len, generator=generator, dtype=torch.float64) ** 2).sum(dim=0)
    heavy = normal / torch.sqrt(chi2 / 3.0)
    values = torch.where(mask, old_values + learning_rate * (returns - old_values) + drift_noise * heavy, 0.0)
    return Batch(
        values=values.float().numpy(),
        old_values=old_values.float().numpy(),
        returns=returns.float().numpy(),
        action_mask=mask.numpy(),
        source=f"synthetic_batch(seed={seed})",
        dtype="float32",
    )


# --------------------------------------------------------------------------- the analysis (NumPy, float64)


def _float64(*arrays: object) -> list[np.ndarray]:
    """The arrays (NumPy, or CPU torch tensors) in float64, checked to share one shape (never broadcast)."""
    out = [np.asarray(a, dtype=np.float64) for a in arrays]
    if any(a.shape != out[0].shape for a in out):
        raise ValueError(f"values, old_values and returns must have the same shape; got {[a.shape for a in out]}")
    return out


def _safe(count: float) -> float:
    """A denominator that is 1 where the count is 0, so empty masks give 0 (``functional._safe_denominator``)."""
    return count if count > 0 else 1.0


def _aggregate(loss_mat: np.ndarray, mask: np.ndarray, mode: str) -> float:
    """NumPy mirror of :func:`valueloss.functional.aggregate` with ``dp_size=1`` and the local counts.

    ``loss_mat`` is already zero at masked-out tokens. token-mean: ``sum / N``; token-sum: ``sum``;
    seq-mean-token-mean: mean over non-empty rows of the row mean; seq-mean-token-sum: mean over
    non-empty rows of the row sum; seq-mean-token-sum-norm: that divided by ``T``.
    """
    weights = mask.astype(np.float64)
    masked = weights * loss_mat
    if mode in ("token-mean", "token-sum"):
        total = float(masked.sum())
        return total if mode == "token-sum" else total / _safe(float(weights.sum()))
    seq_sums = masked.sum(axis=-1)
    seq_counts = weights.sum(axis=-1)
    nonempty = seq_counts > 0
    seq_losses = seq_sums / np.where(nonempty, seq_counts, 1.0) if mode == "seq-mean-token-mean" else seq_sums
    loss = float(np.where(nonempty, seq_losses, 0.0).sum()) / _safe(float(nonempty.sum()))
    if mode == "seq-mean-token-sum-norm":
        loss /= max(loss_mat.shape[-1], 1)
    return loss


def band_closed() -> bool:
    """:data:`valueloss.functional.BAND_CLOSED` (the clip band's edges as the installed torch's ``clamp``
    has them), without importing torch: that module's answer once it is loaded, else the one it gives on
    the installed torch's release (closed up to 2.13, open from 2.14; ``tests/test_inspect.py`` checks
    that the two agree). Read from the package metadata, so ``valueloss inspect batch.npz`` stays fast.
    """
    functional = sys.modules.get("valueloss.functional")
    if functional is not None:
        return functional.BAND_CLOSED
    return _release(_torch_version()) < (2, 14)


@functools.cache
def _torch_version() -> str:
    return importlib.metadata.version("torch")


def _release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``2.14.1+cpu`` or ``2.15.0a0``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"torch's version must start with major.minor; got {version!r}")
    return int(match.group(1)), int(match.group(2))


def _token_losses(
    values: np.ndarray, old_values: np.ndarray, returns: np.ndarray, clip_eps: float, variant: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-token squared loss with and without clipping, and the outside / clipped flags.

    Mirrors ``valueloss.functional._elementwise`` and ``_regions`` step by step (same operations in
    the same order): outside the closed band means ``|d| > clip_eps``; clipped means outside and
    the clipped branch strictly larger (every outside token for ``variant="clipped"``). Where the band
    is open (torch >= 2.14, :func:`band_closed`), outside means ``|d| >= clip_eps``, as there.
    """
    delta = values - old_values
    loss_unclipped = (values - returns) ** 2
    values_clipped = old_values + np.clip(delta, -clip_eps, clip_eps)
    loss_clipped = (values_clipped - returns) ** 2
    if band_closed():
        outside = (delta < -clip_eps) | (delta > clip_eps)
    else:
        outside = (delta <= -clip_eps) | (delta >= clip_eps)
    if variant == "clipped":
        return loss_clipped, loss_unclipped, outside, outside
    return np.maximum(loss_clipped, loss_unclipped), loss_unclipped, outside, outside & (loss_clipped > loss_unclipped)


def _explained_variance(values: np.ndarray, returns: np.ndarray, weights: np.ndarray) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over the mask, 0 if ``Var(returns)`` is 0 (as :func:`diagnose`)."""
    count = _safe(float(weights.sum()))
    var_returns = float((weights * (returns - (weights * returns).sum() / count) ** 2).sum()) / count
    residual = returns - values
    var_residual = float((weights * (residual - (weights * residual).sum() / count) ** 2).sum()) / count
    return 1.0 - var_residual / var_returns if var_returns > 0 else 0.0


def clip_thresholds(values: object, old_values: object, returns: object, *, variant: str = "max") -> np.ndarray:
    """Per token, the largest ``clip_eps`` at which clipping kills its gradient (0 if it never does).

    For the squared loss with ``variant="max"``: ``t = max(0, min(|d|, sign(d) * (2 r - d)))`` with
    ``d = values - old_values`` and ``r = returns - old_values``; the token is in
    :attr:`valueloss.Region.CLIPPED` exactly when ``clip_eps < t``. For ``variant="clipped"``:
    ``t = |d|``. Inputs are NumPy arrays (or CPU tensors) of one shape; the result is float64.

    >>> clip_thresholds(np.array([0.5, 0.5, -0.1]), np.zeros(3), np.array([1.0, 0.3, 0.0]))
    array([0.5, 0.1, 0. ])
    """
    _check_choice(variant, VARIANTS, "variant")
    values, old_values, returns = _float64(values, old_values, returns)
    delta = values - old_values
    if variant == "clipped":
        return np.abs(delta)
    residual = returns - old_values
    threshold = np.minimum(np.abs(delta), np.sign(delta) * (2 * residual - delta))
    return np.maximum(threshold, 0.0)


def clip_fraction_curve(thresholds: object, clip_eps: object) -> np.ndarray:
    """Clip fraction at each ``clip_eps``: the share of ``thresholds`` strictly above it (float64).

    >>> clip_fraction_curve(np.array([0.0, 0.1, 0.3, 0.5]), [0.0, 0.1, 0.4])
    array([0.75, 0.5 , 0.25])
    """
    ordered = np.sort(np.asarray(thresholds, dtype=np.float64).ravel())
    above = ordered.size - np.searchsorted(ordered, np.asarray(clip_eps, dtype=np.float64), side="right")
    return above / max(ordered.size, 1)


def suggest_clip_eps(thresholds: object, target: tuple[float, float] = (0.05, 0.15)) -> tuple[float, float]:
    """The ``clip_eps`` interval whose clip fraction lies in ``target = (low, high)``.

    The clip fraction falls as ``clip_eps`` grows, so the low end of the returned interval gives
    the ``high`` fraction and vice versa. Uses quantiles of :func:`clip_thresholds` (linear
    interpolation, as ``numpy.quantile`` and ``torch.quantile`` by default). A returned bound of 0.0
    means even ``clip_eps -> 0`` does not reach that fraction (too few tokens ever clip).
    """
    low, high = (float(x) for x in target)
    if not 0 <= low <= high <= 1:
        raise ValueError(f"target must be (low, high) with 0 <= low <= high <= 1; got {target!r}")
    flat = np.asarray(thresholds, dtype=np.float64).ravel()
    if not flat.size:
        return 0.0, 0.0
    return float(np.quantile(flat, 1 - high)), float(np.quantile(flat, 1 - low))


@dataclass(frozen=True)
class SequenceStats:
    """Where the gradients die in one sequence."""

    index: int
    tokens: int
    clipped: int
    """Tokens in :attr:`Region.CLIPPED` (gradient exactly zero)."""
    outside_unclipped: int
    """Tokens outside the band whose gradient stays live."""
    clip_fraction: float
    first_clipped_position: int | None
    """Position (column) of the first clipped token, or None."""


@dataclass(frozen=True)
class InspectReport:
    """Everything ``valueloss inspect`` reports; :meth:`to_dict` is the JSON form."""

    source: str
    shape: tuple[int, ...]
    dtype: str
    clip_eps: float
    mode: str
    num_sequences: int
    num_nonempty_sequences: int
    num_tokens: int
    tokens_per_sequence: dict[str, float]
    loss: float
    loss_unclipped: float
    clip_fraction: float
    outside_band_fraction: float
    explained_variance: float
    mean_abs_error: float
    histogram_edges: list[float]
    histogram_counts: list[int]
    clip_fraction_by_position: list[float]
    """Clip fraction in each tenth of the responses (relative position 0-10%, ..., 90-100%)."""
    sequences: list[SequenceStats]
    suggested_clip_eps: tuple[float, float]
    target_clip_fraction: tuple[float, float]
    ignored_keys: tuple[str, ...] = ()
    had_mask: bool = True
    curve_clip_eps: list[float] = field(default_factory=list, repr=False)
    curve_clip_fraction: list[float] = field(default_factory=list, repr=False)
    normalized_delta: list[float] = field(default_factory=list, repr=False)
    """``(values - old_values) / clip_eps`` at unmasked tokens (for plots; not in the JSON)."""

    def to_dict(self) -> dict[str, object]:
        """The report as JSON-ready Python values (infinite histogram edges become strings)."""
        out = asdict(self)
        out.pop("normalized_delta")
        out["histogram_edges"] = [e if math.isfinite(e) else ("inf" if e > 0 else "-inf") for e in self.histogram_edges]
        out["shape"] = list(self.shape)
        out["suggested_clip_eps"] = list(self.suggested_clip_eps)
        out["target_clip_fraction"] = list(self.target_clip_fraction)
        out["ignored_keys"] = list(self.ignored_keys)
        return out


def _sequence_stats(clipped: np.ndarray, outside_live: np.ndarray, lengths: np.ndarray) -> list[SequenceStats]:
    clipped_counts = clipped.sum(axis=1)
    live_counts = outside_live.sum(axis=1)
    first = clipped.argmax(axis=1)
    return [
        SequenceStats(
            index=i,
            tokens=int(n),
            clipped=int(c),
            outside_unclipped=int(live),
            clip_fraction=int(c) / int(n) if n else 0.0,
            first_clipped_position=int(f) if c else None,
        )
        for i, (n, c, live, f) in enumerate(zip(lengths, clipped_counts, live_counts, first))
    ]


def _clip_fraction_by_position(mask: np.ndarray, clipped: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Clip fraction per tenth of the responses; a token's relative position is its rank / its row's count."""
    rank = np.cumsum(mask, axis=1) - 1
    relative = rank / np.maximum(lengths, 1)[:, None]
    position_bin = np.minimum((relative * POSITION_BINS).astype(np.int64), POSITION_BINS - 1)[mask]
    per_bin_tokens = np.bincount(position_bin, minlength=POSITION_BINS).astype(np.float64)
    per_bin_clipped = np.bincount(position_bin, weights=clipped[mask].astype(np.float64), minlength=POSITION_BINS)
    return np.where(per_bin_tokens > 0, per_bin_clipped / np.maximum(per_bin_tokens, 1), 0.0)


def inspect_batch(
    batch: Batch,
    *,
    clip_eps: float = 0.2,
    mode: str = "token-mean",
    variant: str = "max",
    target_clip_fraction: tuple[float, float] = (0.05, 0.15),
) -> InspectReport:
    """Compute the :class:`InspectReport` of a validated batch (see the module docstring).

    Everything is computed in float64 with NumPy. ``loss``, ``loss_unclipped``, ``clip_fraction``,
    ``outside_band_fraction``, ``explained_variance`` and ``mean_abs_error`` are those of
    :func:`valueloss.diagnose` with the default squared loss and ``scale=0.5`` (equal to rounding
    when ``diagnose`` gets float64 tensors; within float32 rounding for float32 ones).
    """
    if isinstance(clip_eps, bool) or not isinstance(clip_eps, numbers.Real) or not 0 < float(clip_eps) < math.inf:
        raise ValueError(f"clip_eps must be a positive number to inspect clipping; got {clip_eps!r}")
    clip_eps = float(clip_eps)
    _check_choice(mode, AGGREGATION_MODES, "mode")
    _check_choice(variant, VARIANTS, "variant")
    mask = np.asarray(batch.action_mask, dtype=bool)
    arrays = _float64(batch.values, batch.old_values, batch.returns)
    if mask.ndim != 2 or arrays[0].shape != mask.shape:
        raise ValueError(
            f"values and action_mask must have the same shape (B, T); got {arrays[0].shape} and {mask.shape}"
        )
    if not mask.any():
        raise ValueError("action_mask selects no token; nothing to inspect")
    # Zero the masked-out tokens first, so that NaN/inf in padding cannot leak (functional._prepare).
    values, old_values, returns = (np.where(mask, a, 0.0) for a in arrays)
    weights = mask.astype(np.float64)
    num_tokens = float(weights.sum())

    loss_mat, loss_unclipped_mat, outside, clipped = _token_losses(values, old_values, returns, clip_eps, variant)
    clipped &= mask
    outside &= mask
    residual = returns - values

    normalized = ((values - old_values) / clip_eps)[mask]
    inner_edges = np.asarray(HISTOGRAM_EDGES[1:-1])
    counts = np.bincount(np.searchsorted(inner_edges, normalized, side="right"), minlength=len(HISTOGRAM_EDGES) - 1)

    lengths = mask.sum(axis=1)
    thresholds = clip_thresholds(values, old_values, returns, variant=variant)[mask]
    suggestion = suggest_clip_eps(thresholds, target_clip_fraction)
    top = max(float(thresholds.max()), 2 * clip_eps, 1e-6)
    curve_eps = np.linspace(0, top, 201)
    curve = clip_fraction_curve(thresholds, curve_eps)

    nonempty = np.sort(lengths[lengths > 0])
    return InspectReport(
        source=batch.source,
        shape=tuple(mask.shape),
        dtype=batch.dtype,
        clip_eps=clip_eps,
        mode=mode,
        num_sequences=int(mask.shape[0]),
        num_nonempty_sequences=int(nonempty.size),
        num_tokens=int(num_tokens),
        tokens_per_sequence={
            "min": float(nonempty[0]),
            "median": float(nonempty[(nonempty.size - 1) // 2]),  # the lower middle value, as torch.median
            "max": float(nonempty[-1]),
        },
        loss=0.5 * _aggregate(loss_mat, mask, mode),
        loss_unclipped=0.5 * _aggregate(loss_unclipped_mat, mask, mode),
        clip_fraction=float(clipped.sum()) / num_tokens,
        outside_band_fraction=float(outside.sum()) / num_tokens,
        explained_variance=_explained_variance(values, returns, weights),
        mean_abs_error=float((weights * np.abs(residual)).sum()) / num_tokens,
        histogram_edges=list(HISTOGRAM_EDGES),
        histogram_counts=[int(c) for c in counts],
        clip_fraction_by_position=[float(x) for x in _clip_fraction_by_position(mask, clipped, lengths)],
        sequences=_sequence_stats(clipped, outside & ~clipped, lengths),
        suggested_clip_eps=suggestion,
        target_clip_fraction=tuple(float(x) for x in target_clip_fraction),
        ignored_keys=batch.ignored_keys,
        had_mask=batch.had_mask,
        curve_clip_eps=curve_eps.tolist(),
        curve_clip_fraction=curve.tolist(),
        normalized_delta=normalized.tolist(),
    )


def _edge(e: float) -> str:
    return "-inf" if e == -math.inf else ("+inf" if e == math.inf else f"{e:+.1f}")


def format_report(report: InspectReport, *, top: int = 8) -> str:
    """The human-readable report printed by ``valueloss inspect`` (``top`` sequences listed)."""
    lines = []
    add = lines.append
    add(f"valueloss inspect: {report.source}")
    tps = report.tokens_per_sequence
    add(
        f"  batch       shape {tuple(report.shape)} {report.dtype}; {report.num_sequences} sequences "
        f"({report.num_nonempty_sequences} non-empty), {report.num_tokens} tokens "
        f"(per sequence min {tps['min']:.0f} / median {tps['median']:.0f} / max {tps['max']:.0f})"
    )
    if not report.had_mask:
        add("  note        no action_mask in the file: every position counts")
    if report.ignored_keys:
        add(f"  note        ignored keys: {', '.join(report.ignored_keys)}")
    add(f"  settings    clip_eps={report.clip_eps:g}, mode={report.mode}")
    add(f"  loss        {report.loss:.6f} clipped   {report.loss_unclipped:.6f} unclipped")
    add(
        f"  clipping    {100 * report.clip_fraction:.2f}% of tokens have zero gradient (clip fraction); "
        f"{100 * report.outside_band_fraction:.2f}% are outside the band"
    )
    add(f"  critic      explained variance {report.explained_variance:.4f}, mean |values - returns| "
        f"{report.mean_abs_error:.4f}")
    add("")
    add("  (values - old_values) / clip_eps over unmasked tokens (band = [-1, +1]):")
    total = max(sum(report.histogram_counts), 1)
    widest = max(report.histogram_counts) or 1
    edges = report.histogram_edges
    for i, count in enumerate(report.histogram_counts):
        label = f"[{_edge(edges[i])}, {_edge(edges[i + 1])})"
        bar = "#" * round(40 * count / widest)
        add(f"    {label:>14} {count:7d} {100 * count / total:6.2f}%  {bar}".rstrip())
    add("")
    add("  clip fraction by position in the response (each tenth, start -> end):")
    add("    " + " ".join(f"{100 * x:5.1f}" for x in report.clip_fraction_by_position) + "  (%)")
    add("")
    worst = sorted(report.sequences, key=lambda s: (-s.clip_fraction, s.index))[:top]
    add(f"  where gradients die (top {len(worst)} of {report.num_sequences} sequences by clip fraction):")
    add("    seq  tokens  clipped  outside-live  clip%  first clipped at")
    for s in worst:
        first = "-" if s.first_clipped_position is None else str(s.first_clipped_position)
        add(f"    {s.index:3d}  {s.tokens:6d}  {s.clipped:7d}  {s.outside_unclipped:12d}  "
            f"{100 * s.clip_fraction:5.1f}  {first}")
    without = sum(1 for s in report.sequences if s.clipped == 0 and s.tokens > 0)
    add(f"    {without} non-empty sequence(s) have no clipped token")
    add("")
    low, high = report.suggested_clip_eps
    t_low, t_high = report.target_clip_fraction
    add(
        f"  suggestion  clip_eps in [{low:.4g}, {high:.4g}] gives a clip fraction between "
        f"{100 * t_low:.0f}% and {100 * t_high:.0f}% on this batch"
    )
    return "\n".join(lines)


def plot_report(report: InspectReport, path: str | os.PathLike | None = None):
    """A 2x2 figure: histogram of ``(v - old)/clip_eps``, clip fraction vs ``clip_eps``, by position, per sequence.

    Imports matplotlib (Agg when saving) only here. Saves a PNG to ``path`` when given; returns the Figure.
    """
    import matplotlib

    if path is not None and matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    from matplotlib.figure import Figure

    colors = ("#0072B2", "#D55E00", "#009E73", "#CC79A7")  # Okabe-Ito, colour-blind safe
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    ax_hist, ax_curve, ax_pos, ax_seq = fig.subplots(2, 2).flatten()

    data = np.asarray(report.normalized_delta)
    limit = max(3.0, float(np.percentile(np.abs(data), 99.5))) if data.size else 3.0
    bins = np.linspace(-limit, limit, 61)
    ax_hist.hist(np.clip(data, -limit, limit), bins=bins, color=colors[0], label="unmasked tokens")
    for x in (-1, 1):
        ax_hist.axvline(x, color=colors[1], linestyle="--", label="clip band" if x == 1 else None)
    ax_hist.set_xlabel(r"$(v - v_{old}) / \epsilon$")
    ax_hist.set_ylabel("tokens")
    ax_hist.set_title(f"Value drift in units of clip_eps = {report.clip_eps:g}")
    ax_hist.legend()

    ax_curve.plot(report.curve_clip_eps, report.curve_clip_fraction, color=colors[0], label="clip fraction")
    ax_curve.axvline(report.clip_eps, color=colors[1], linestyle="--", label=f"clip_eps = {report.clip_eps:g}")
    low, high = report.suggested_clip_eps
    ax_curve.axvspan(low, high, color=colors[2], alpha=0.25, label="suggested range")
    ax_curve.set_xlabel(r"clip_eps $\epsilon$")
    ax_curve.set_ylabel("share of tokens with zero gradient")
    t_low, t_high = report.target_clip_fraction
    ax_curve.set_title(f"Clip fraction vs clip_eps (target {t_low:g}-{t_high:g})")
    ax_curve.legend()

    centers = (np.arange(POSITION_BINS) + 0.5) / POSITION_BINS
    ax_pos.bar(centers, report.clip_fraction_by_position, width=0.9 / POSITION_BINS, color=colors[3],
               label="clip fraction")
    ax_pos.set_xlabel("relative position in the response")
    ax_pos.set_ylabel("clip fraction")
    ax_pos.set_title(f"Where in the response gradients die (clip_eps = {report.clip_eps:g})")
    ax_pos.legend()

    index = [s.index for s in report.sequences]
    ax_seq.bar(index, [s.clip_fraction for s in report.sequences], color=colors[1], label="clipped (zero gradient)")
    ax_seq.bar(index, [s.outside_unclipped / max(s.tokens, 1) for s in report.sequences],
               bottom=[s.clip_fraction for s in report.sequences], color=colors[0], label="outside band, live")
    ax_seq.set_xlabel("sequence")
    ax_seq.set_ylabel("share of its tokens")
    ax_seq.set_title(f"Per sequence (mode = {report.mode})")
    ax_seq.legend()
    fig.suptitle(f"valueloss inspect: {Path(report.source).name}")
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
