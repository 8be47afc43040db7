"""One-pass value loss: the reduced loss and its gradient in a single sweep over the tokens.

The eager formula (:func:`valueloss.functional.value_loss` under autograd) launches about a dozen
element-wise kernels and keeps several input-sized tensors alive for backward. Here the forward
reads ``values``, ``old_values``, ``returns`` and ``action_mask`` once, and in that same pass writes
the per-token gradient and reduces the loss; backward multiplies the stored gradient by one scalar
(or one factor per sequence) and the incoming ``grad_output``. The math is the closed form of
:func:`valueloss.functional.elementwise_value_loss_grad` (closed clip band, ties split 50/50), so
the result equals autograd of the eager formula.

The pass is a plain PyTorch function compiled with :func:`torch.compile` (inductor: C++/OpenMP on
CPU, Triton on GPU), one compiled kernel per configuration (variant, loss type, clipping on or off,
token or sequence reduction, dtypes and mask kind, device; ``clip_eps`` and ``huber_delta`` are
kernel inputs), with dynamic shapes so that new batch shapes do not recompile (inductor may compile a
second variant for inputs of at most 4096 tokens, and again after ``torch.set_num_threads``). When
compilation fails (no C++ compiler, no Triton, ...), :func:`fused_value_loss` warns once and falls
back to the eager closed form of :func:`valueloss.functional.value_loss_grad`.

Only ``values`` is differentiated; there is no second derivative (backward with
``create_graph=True`` raises a clear error), and ``retain_graph=True`` works (the stored gradient
is never modified). Nothing in the forward synchronises with the host.
"""

from __future__ import annotations

import math
import shutil
import threading
import types
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from . import functional as F
from .functional import Count

__all__ = ["AUTO_MIN_NUMEL", "FusedValueLoss", "compile_available", "fused_value_loss", "reset", "use_fused"]

_LOCK = threading.Lock()
_KERNELS: dict = {}
_CONSTANTS: dict = {}  # (value, dtype, device) -> 0-dim tensor read by the kernels
_COMPILERS: dict = {}  # inductor's list of C++ compilers -> the first one found on the PATH
_COMPILE_ERROR: str | None = None  # set once compilation has failed; from then on the eager closed form runs
_WARNED = False


def _torch_compile(fn: Callable) -> Callable:
    """``torch.compile`` with the settings of this module: a single graph (no host syncs), dynamic shapes."""
    return torch.compile(fn, fullgraph=True, dynamic=True)


_COMPILE: Callable = _torch_compile  # tests replace it to simulate a machine where compilation fails


def reset() -> None:
    """Forget every compiled kernel and any earlier compilation failure (the warning may show again)."""
    global _COMPILE_ERROR, _WARNED
    with _LOCK:
        _KERNELS.clear()
        _CONSTANTS.clear()
        _COMPILE_ERROR = None
        _WARNED = False


def compile_available(device: torch.device | str = "cpu") -> bool:
    """Whether the fused kernel can be compiled for ``device``, judged without compiling anything.

    False after a compilation has failed in this process; on CPU it needs the C++ compiler that
    inductor is configured with, on CUDA the ``triton`` package. Other devices: False.
    """
    if _COMPILE_ERROR is not None:
        return False
    device_type = torch.device(device).type
    if device_type == "cpu":
        return _cpu_compiler() is not None
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return False


def _cpu_compiler() -> str | None:
    """The first C++ compiler of inductor's search list (``config.cpp.cxx``, from ``$CXX``) on the PATH."""
    from torch._inductor import config as inductor_config

    candidates = inductor_config.cpp.cxx
    candidates = (candidates,) if isinstance(candidates, str) else tuple(candidates)
    if candidates not in _COMPILERS:
        _COMPILERS[candidates] = next((name for name in candidates if name and shutil.which(name)), None)
    return _COMPILERS[candidates]


AUTO_MIN_NUMEL = 65536
"""``fused="auto"`` uses the fused path from this many tokens on.

Per call the fused path wins from about 8K-16K tokens on (benchmarks/bench_value_loss.py, 1 thread),
but its first call compiles for seconds; from 64K tokens on it saves milliseconds per call, so the
compilation pays for itself within a few hundred steps, and small teaching inputs never compile.
"""


def use_fused(fused: bool | str, values: Tensor, *others: Tensor | None) -> bool:
    """Whether :class:`valueloss.ValueLoss` with setting ``fused`` takes the fused path for these inputs.

    ``True``/``False`` force it; ``"auto"`` takes it when ``values`` needs a gradient, has at least
    :data:`AUTO_MIN_NUMEL` elements, no other input needs a gradient, we are not already inside a
    ``torch.compile`` region, and :func:`compile_available` says yes. Small inputs therefore stay
    on the eager path and never trigger a compilation.
    """
    if fused is True or fused is False:
        return fused
    return (
        values.requires_grad
        and torch.is_grad_enabled()
        and values.numel() >= AUTO_MIN_NUMEL
        and not any(t is not None and t.requires_grad for t in others)
        and not torch.compiler.is_compiling()
        and compile_available(values.device)
    )


# --------------------------------------------------------------------------- the one-pass kernel


def _token_pass(
    values: Tensor,
    old_values: Tensor | None,
    returns: Tensor,
    action_mask: Tensor | None,
    clip_eps: Tensor | None,
    variant: str,
    loss_type: str,
    huber_delta: Tensor,
    per_sequence: bool,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """The per-token work, written for inductor to fuse into one loop over the tokens.

    ``clip_eps`` and ``huber_delta`` arrive as 0-dim tensors, so that one compiled kernel serves
    every value (and no value is baked into generated code).

    Returns ``(grad_tokens, loss_sum, weight_sum)``: ``mask * d loss_token / d values`` in ``dtype``,
    and the sums of ``mask * loss_token`` and of ``mask`` over everything (``per_sequence=False``)
    or over the last dimension. Masked-out tokens are zeroed before any arithmetic, so NaN/inf there
    never reach the loss or the gradient.
    """
    values = values.to(dtype)
    returns = returns.to(dtype)
    old_values = None if old_values is None else old_values.to(dtype)
    if action_mask is not None:
        keep = action_mask if action_mask.dtype == torch.bool else action_mask != 0
        values = torch.where(keep, values, 0.0)
        returns = torch.where(keep, returns, 0.0)
        old_values = None if old_values is None else torch.where(keep, old_values, 0.0)
    loss_token = F._elementwise(values, old_values, returns, clip_eps, variant, loss_type, huber_delta)
    grad_token = F._elementwise_grad(values, old_values, returns, clip_eps, variant, loss_type, huber_delta)
    if action_mask is None:
        weight = torch.ones_like(values)
        loss_weighted, grad_weighted = loss_token, grad_token
    elif action_mask.dtype == torch.bool:
        weight = action_mask.to(dtype)
        loss_weighted = torch.where(keep, loss_token, 0.0)
        grad_weighted = torch.where(keep, grad_token, 0.0)
    else:
        weight = action_mask.to(dtype)
        loss_weighted = torch.where(keep, loss_token, 0.0) * weight
        grad_weighted = torch.where(keep, grad_token, 0.0) * weight
    if per_sequence:
        return grad_weighted, loss_weighted.sum(dim=-1, keepdim=True), weight.sum(dim=-1, keepdim=True)
    return grad_weighted, loss_weighted.sum(), weight.sum()


def _new_function(fn: Callable, suffix: str) -> Callable:
    """A copy of ``fn`` with its own code object.

    Dynamo keeps its cache of compiled graphs (and its recompilation limit) per code object; giving
    each configuration its own copy keeps the configurations from evicting each other.
    """
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{suffix}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _kernel(key: tuple, fn: Callable = _token_pass) -> Callable:
    with _LOCK:
        kernel = _KERNELS.get(key)
        if kernel is None:
            kernel = _COMPILE(_new_function(fn, str(len(_KERNELS))))
            _KERNELS[key] = kernel
    return kernel


# --------------------------------------------------------------------------- reductions


def _reduce(
    loss_sum: Tensor,
    weight_sum: Tensor,
    tokens_per_sequence: int,
    mode: str,
    scale: float,
    dp_size: int,
    batch_num_tokens: Count,
    global_batch_size: Count,
    loss_scale_factor: float | None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The reduced loss from the kernel's sums, and the denominators backward needs.

    Same operations in the same order as :func:`valueloss.functional.value_loss`, so that the
    gradient built by :func:`_loss_to_tokens` is autograd's of the eager formula.
    """
    if mode == "token-sum":
        return scale * (loss_sum * dp_size), ()
    if mode == "token-mean":
        count = weight_sum if batch_num_tokens is None else _as_tensor(batch_num_tokens, loss_sum)
        denominator = F._safe_denominator(count)
        return scale * (loss_sum / denominator * dp_size), (denominator,)
    nonempty = weight_sum > 0
    if mode == "seq-mean-token-mean":
        tokens = F._safe_denominator(weight_sum)
        per_sequence = loss_sum / tokens
    else:
        tokens = weight_sum  # unused by backward
        per_sequence = loss_sum
    if global_batch_size is None:
        sequences = F._safe_denominator(nonempty.to(loss_sum.dtype).sum())
    else:
        sequences = F._safe_denominator(_as_tensor(global_batch_size, loss_sum))
    loss = torch.where(nonempty, per_sequence, 0.0).sum() / sequences * dp_size
    if mode == "seq-mean-token-sum-norm":
        loss = loss / _norm(loss_scale_factor, tokens_per_sequence)
    return scale * loss, (sequences, nonempty, tokens)


def _loss_to_tokens(grad_output: Tensor, denominators: tuple, config: tuple, tokens_per_sequence: int) -> Tensor:
    """d loss / d (mask * per-token loss): autograd's backward of :func:`_reduce`, step by step."""
    _, _, mode, _, _, scale, dp_size, loss_scale_factor = config
    grad = grad_output * scale
    if mode == "token-sum":
        return grad * dp_size
    if mode == "token-mean":
        return grad * dp_size / denominators[0]
    sequences, nonempty, tokens = denominators
    if mode == "seq-mean-token-sum-norm":
        grad = grad / _norm(loss_scale_factor, tokens_per_sequence)
    grad = torch.where(nonempty, grad * dp_size / sequences, 0.0)
    return grad / tokens if mode == "seq-mean-token-mean" else grad


def _norm(loss_scale_factor: float | None, tokens_per_sequence: int) -> float:
    return loss_scale_factor if loss_scale_factor is not None else max(tokens_per_sequence, 1)


def _as_tensor(count, like: Tensor) -> Tensor:
    if isinstance(count, Tensor):
        return count.to(device=like.device, dtype=like.dtype)
    return like.new_tensor(float(count))


# --------------------------------------------------------------------------- autograd


class FusedValueLoss(torch.autograd.Function):
    """Forward: loss and the per-token gradient in one pass; backward: one multiply.

    Call through :func:`fused_value_loss`, which validates the arguments. ``apply(values,
    old_values, returns, action_mask, config, counts)``; only ``values`` gets a gradient. Saved for
    backward: the per-token gradient (compute dtype, the size of ``values``) and a few scalars or
    per-sequence denominators.
    """

    @staticmethod
    def forward(ctx, values, old_values, returns, action_mask, config, counts):
        loss, grad_tokens, denominators, compiled = _forward(values, old_values, returns, action_mask, config, counts)
        ctx.save_for_backward(grad_tokens, *denominators)
        ctx.config, ctx.compiled, ctx.values_dtype = config, compiled, values.dtype
        ctx.tokens_per_sequence = values.shape[-1]
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the fused value loss has no second derivative: backward with create_graph=True is not supported; "
                "use ValueLoss(fused=False) (or valueloss.functional.value_loss) for double backward"
            )
        grad_tokens, *denominators = ctx.saved_tensors
        if ctx.compiled:
            scale_tokens = _loss_to_tokens(grad_output, tuple(denominators), ctx.config, ctx.tokens_per_sequence)
            if scale_tokens.dim() > 0:  # one factor per sequence: (sequences, 1) -> (..., 1)
                scale_tokens = scale_tokens.reshape(grad_tokens.shape[:-1] + (1,))
        else:  # the fallback saved the finished gradient
            scale_tokens = grad_output
        return _scale(grad_tokens, scale_tokens.to(grad_tokens.dtype), ctx.values_dtype), None, None, None, None, None


def _scale_and_cast(grad_tokens: Tensor, scale_tokens: Tensor, dtype: torch.dtype) -> Tensor:
    return (scale_tokens * grad_tokens).to(dtype)


def _scale(grad_tokens: Tensor, scale_tokens: Tensor, dtype: torch.dtype) -> Tensor:
    """``scale_tokens * grad_tokens`` in the compute dtype, rounded once into ``dtype``, in one pass.

    Same dtype: one eager ``mul``. Half-precision ``values``: eager PyTorch would write a float32
    product and then copy it (2 more inputs' worth of memory), so this multiply-and-round is compiled too.
    """
    if dtype == grad_tokens.dtype:
        return scale_tokens * grad_tokens
    if _COMPILE_ERROR is None and grad_tokens.numel() > 0:
        key = ("scale", grad_tokens.device.type, grad_tokens.dtype, dtype, scale_tokens.dim())
        try:
            return _kernel(key, _scale_and_cast)(grad_tokens, scale_tokens, dtype)
        except Exception:  # noqa: BLE001 -- the eager fallback below is always correct
            pass
    return (scale_tokens * grad_tokens).to(dtype)


def _flat(t: Tensor | None, shape: tuple) -> Tensor | None:
    # detach(): a tensor without a view base, so that dynamo does not guard on the caller's layout.
    return None if t is None else t.reshape(shape).detach()


def _constant(value: float | None, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """``value`` as a cached 0-dim tensor: the kernel reads it instead of baking it in (no recompiles)."""
    if value is None:
        return None
    key = (value, dtype, device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(value, dtype=dtype, device=device)
    return _CONSTANTS[key]


def _forward(values, old_values, returns, action_mask, config, counts):
    """(loss, saved gradient, denominators, compiled?) by the compiled kernel, or by the eager closed form."""
    global _COMPILE_ERROR
    clip_eps, variant, mode, loss_type, huber_delta, scale, dp_size, loss_scale_factor = config
    batch_num_tokens, global_batch_size = counts
    dtype = F._compute_dtype(values, old_values, returns)
    per_sequence = mode.startswith("seq-mean")
    if _COMPILE_ERROR is None and values.numel() > 0:
        # Token modes see one flat run of tokens, sequence modes a (sequences, T) matrix: one
        # symbolic size each, whatever the caller's number of dimensions.
        shape = (math.prod(values.shape[:-1]), values.shape[-1]) if per_sequence else (values.numel(),)
        flat = [_flat(t, shape) for t in (values, old_values, returns, action_mask)]
        key = (
            values.device.type,
            clip_eps is None,
            variant,
            loss_type,
            per_sequence,
            tuple(None if t is None else t.dtype for t in (values, old_values, returns, action_mask)),
        )
        constants = [_constant(c, dtype, values.device) for c in (clip_eps, huber_delta)]
        try:
            grad_tokens, loss_sum, weight_sum = _kernel(key)(
                *flat, constants[0], variant, loss_type, constants[1], per_sequence, dtype
            )
        except Exception as error:  # compilation failed: remember it, warn once, use the eager closed form
            message = str(error).strip()
            _COMPILE_ERROR = f"{type(error).__name__}: {message.splitlines()[0] if message else ''}"
        else:
            loss, denominators = _reduce(
                loss_sum, weight_sum, values.shape[-1], mode, scale, dp_size, batch_num_tokens, global_batch_size,
                loss_scale_factor,
            )
            return loss, grad_tokens.reshape(values.shape), denominators, True
    if values.numel() > 0:
        _warn_fallback()
    kwargs = dict(
        clip_eps=clip_eps, variant=variant, mode=mode, loss_type=loss_type, huber_delta=huber_delta, scale=scale,
        dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )
    with torch.no_grad():
        loss = F.value_loss(values, old_values, returns, action_mask, **kwargs)
        grad = F.value_loss_grad(values, old_values, returns, action_mask, **kwargs)
    return loss, grad, (), False


def _warn_fallback() -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            f"valueloss.fused: torch.compile is unavailable ({_COMPILE_ERROR}); using the eager closed-form "
            "gradient instead (same results, slower). This warning is shown once.",
            RuntimeWarning,
            stacklevel=4,
        )


def fused_value_loss(
    values: Tensor,
    old_values: Tensor | None,
    returns: Tensor,
    action_mask: Tensor | None = None,
    *,
    clip_eps: float | None = None,
    variant: str = "max",
    mode: str = "token-mean",
    loss_type: str = "squared",
    huber_delta: float = 1.0,
    scale: float = 0.5,
    dp_size: int = 1,
    batch_num_tokens: Count = None,
    global_batch_size: Count = None,
    loss_scale_factor: float | None = None,
) -> Tensor:
    """:func:`valueloss.functional.value_loss` in one compiled pass; see :class:`valueloss.ValueLoss`.

    Same arguments and results (fp32 losses within 1e-6 relative, gradients equal to autograd of the
    eager formula). Differentiates ``values`` only: raises ``ValueError`` if ``old_values``,
    ``returns`` or ``action_mask`` require a gradient. The first call of each configuration compiles
    a kernel (seconds; inductor caches it on disk for later processes).

    Example:
        >>> import torch
        >>> from valueloss.fused import fused_value_loss
        >>> values = torch.tensor([[1.0, 2.0, 0.5]], requires_grad=True)
        >>> old_values, returns = torch.tensor([[0.5, 2.0, 0.5]]), torch.tensor([[2.0, 1.0, 0.5]])
        >>> loss = fused_value_loss(values, old_values, returns, torch.tensor([[True, True, False]]), clip_eps=0.2)
        >>> loss.backward()
        >>> round(loss.item(), 4), values.grad
        (0.6725, tensor([[0.0000, 0.5000, 0.0000]]))
    """
    clip_eps, huber_delta = F._validate_elementwise(
        values, old_values, returns, clip_eps, variant, loss_type, huber_delta, action_mask
    )
    dp_size, batch_num_tokens, global_batch_size, loss_scale_factor = F._validate_aggregation(
        values, action_mask, mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor
    )
    scale = F._check_scale(scale)
    for name, t in (("old_values", old_values), ("returns", returns), ("action_mask", action_mask)):
        if t is not None and t.requires_grad:
            raise ValueError(
                f"the fused value loss differentiates values only; got {name} with requires_grad=True "
                "(use ValueLoss(fused=False) to differentiate it)"
            )
    kwargs = dict(
        clip_eps=clip_eps, variant=variant, mode=mode, loss_type=loss_type, huber_delta=huber_delta, scale=scale,
        dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )
    if torch.compiler.is_compiling():
        # Inside the caller's own torch.compile region: let that compiler fuse the eager formula.
        return F.value_loss(values, old_values, returns, action_mask, **kwargs)
    config = (clip_eps, variant, mode, loss_type, huber_delta, scale, dp_size, loss_scale_factor)
    return FusedValueLoss.apply(values, old_values, returns, action_mask, config, (batch_num_tokens, global_batch_size))
