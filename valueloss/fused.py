"""One-pass value loss: the reduced loss and its gradient with one sweep over the tokens each.

The eager formula (:func:`valueloss.functional.value_loss` under autograd) launches about a dozen
element-wise kernels and keeps about 9.5 input-sized tensors alive for backward. Here, for float32
(or float64) ``values``, the forward reads ``values``, ``old_values``, ``returns`` and
``action_mask`` once and, in that same pass, writes the per-token gradient and reduces the loss;
backward scales that buffer in place by one scalar (or one factor per sequence) and the incoming
``grad_output`` and hands it over as ``values.grad``. The whole step allocates one tensor of the
input's size: the gradient. For bfloat16/float16 ``values`` the gradient must be rounded once from
float32 after the scaling, so the forward pass only reads and reduces, and backward recomputes the
per-token gradient from the (saved, not copied) inputs and writes it in ``values.dtype``: again one
tensor. The math is the closed form of :func:`valueloss.functional.elementwise_value_loss_grad`
(closed clip band, ties split 50/50), so the result equals autograd of the eager formula.

Bool masks reach the kernels as bytes (``mask.view(torch.uint8)``): inductor's vectorised load of
``bool`` on AVX2 CPUs goes through a scalar buffer and costs several times a byte load (measured
with ``benchmarks/bench_value_loss.py``: the fused step with a bool mask took about 2x as long before).

The passes are plain PyTorch functions compiled with :func:`torch.compile` (inductor: C++/OpenMP on
CPU, Triton on GPU), one compiled kernel per configuration (variant, loss type, clipping on or off,
token or sequence reduction, dtypes and mask kind, device; ``clip_eps`` and ``huber_delta`` are
kernel inputs), with dynamic shapes so that new batch shapes do not recompile (inductor may compile a
second variant for inputs of at most 4096 tokens, and again after ``torch.set_num_threads``). When
compilation fails (no C++ compiler, no Triton, ...), :func:`fused_value_loss` warns once and falls
back to the eager closed form of :func:`valueloss.functional.value_loss_grad`.

Only ``values`` is differentiated; there is no second derivative (backward with
``create_graph=True`` raises a clear error). ``retain_graph=True`` works: a second backward
recomputes the gradient from the saved inputs. Autograd refuses that recomputation (bfloat16,
float16, or a second backward) if an input was modified in place after the forward; the first
float32 backward uses the gradient of the forward and is not affected. Nothing in the forward
synchronises with the host.
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

Per call the fused path takes 0.8x-1.4x the eager path's time at 4K tokens and is 3.3x-6.3x faster at
128K (``benchmarks/results/cpu_full.json``), but its first call compiles for seconds; from 64K tokens
on it saves milliseconds per call, so the compilation pays for itself within a few hundred steps,
and small teaching inputs never compile.
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


def _mask_weights(action_mask: Tensor | None, mask_is_bool: bool, dtype: torch.dtype):
    """``(keep, weight)`` of a mask as the kernels see it (a bool mask arrives viewed as ``uint8``)."""
    if action_mask is None:
        return None, None
    weight = action_mask.to(dtype)
    # Bool masks come as uint8 bytes: inductor's vectorised CPU load of bool is several times slower
    # than a byte load plus a conversion (measured: benchmarks/bench_value_loss.py, bool vs float masks).
    keep = weight != 0 if mask_is_bool else action_mask != 0
    return keep, weight


def _masked_token(token: Tensor, keep: Tensor | None, weight: Tensor | None, mask_is_bool: bool) -> Tensor:
    """``mask * token``, exactly 0 at masked-out tokens whatever ``token`` holds there (NaN, inf)."""
    if keep is None:
        return token
    if mask_is_bool:
        return torch.where(keep, token, 0.0)
    return torch.where(keep, token, 0.0) * weight


def _per_token(inputs: tuple, settings: tuple, dtype: torch.dtype, mask_is_bool: bool, *, loss: bool, grad: bool):
    """``(mask * loss_token or None, mask * d loss_token / d values or None, mask weight or None)`` in ``dtype``.

    ``inputs = (values, old_values, returns, action_mask)``; ``settings = (clip_eps, variant,
    loss_type, huber_delta)`` with ``clip_eps`` and ``huber_delta`` as 0-dim tensors, so that one
    compiled kernel serves every value (and no value is baked into generated code). Masked-out
    tokens are selected away by ``torch.where``, so NaN/inf there never reach the results.
    """
    values, old_values, returns, action_mask = inputs
    tensors = (values.to(dtype), None if old_values is None else old_values.to(dtype), returns.to(dtype))
    keep, weight = _mask_weights(action_mask, mask_is_bool, dtype)
    loss_token = _masked_token(F._elementwise(*tensors, *settings), keep, weight, mask_is_bool) if loss else None
    grad_token = _masked_token(F._elementwise_grad(*tensors, *settings), keep, weight, mask_is_bool) if grad else None
    return loss_token, grad_token, weight


def _sums(loss: Tensor, weight: Tensor | None, per_sequence: bool) -> tuple[Tensor, Tensor]:
    """Sums of ``mask * loss_token`` and of ``mask``: over everything, or over the last dimension."""
    weight = torch.ones_like(loss) if weight is None else weight
    if per_sequence:
        return loss.sum(dim=-1, keepdim=True), weight.sum(dim=-1, keepdim=True)
    return loss.sum(), weight.sum()


def _token_pass(values, old_values, returns, action_mask, clip_eps, variant, loss_type, huber_delta, per_sequence,
                dtype, mask_is_bool):
    """Forward when ``values`` has the compute dtype: ``(grad_tokens, loss_sum, weight_sum)`` in one loop.

    ``grad_tokens`` is ``mask * d loss_token / d values`` in ``dtype``; the sums are :func:`_sums`'.
    """
    settings = (clip_eps, variant, loss_type, huber_delta)
    loss, grad, weight = _per_token(
        (values, old_values, returns, action_mask), settings, dtype, mask_is_bool, loss=True, grad=True
    )
    return (grad, *_sums(loss, weight, per_sequence))


def _loss_pass(values, old_values, returns, action_mask, clip_eps, variant, loss_type, huber_delta, per_sequence,
               dtype, mask_is_bool):
    """Forward for half-precision ``values``: only ``(loss_sum, weight_sum)``, a read-only loop."""
    settings = (clip_eps, variant, loss_type, huber_delta)
    loss, _, weight = _per_token(
        (values, old_values, returns, action_mask), settings, dtype, mask_is_bool, loss=True, grad=False
    )
    return _sums(loss, weight, per_sequence)


def _grad_pass(values, old_values, returns, action_mask, clip_eps, variant, loss_type, huber_delta, scale_tokens,
               dtype, mask_is_bool):
    """Backward by recomputation: ``scale_tokens * mask * d loss_token / d values``, rounded once into
    ``values.dtype``, in one loop that writes only the gradient. ``scale_tokens`` is
    d loss / d (mask * loss_token): a 0-dim tensor, or one factor per sequence.
    """
    settings = (clip_eps, variant, loss_type, huber_delta)
    _, grad, _ = _per_token(
        (values, old_values, returns, action_mask), settings, dtype, mask_is_bool, loss=False, grad=True
    )
    return (scale_tokens * grad).to(values.dtype)


def _new_function(fn: Callable, suffix: str) -> Callable:
    """A copy of ``fn`` with its own code object.

    Dynamo keeps its cache of compiled graphs (and its recompilation limit) per code object; giving
    each configuration its own copy keeps the configurations from evicting each other.
    """
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{suffix}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _kernel(key: tuple, fn: Callable) -> Callable:
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
    """Forward: the loss (and, for full-precision ``values``, the per-token gradient) in one pass.

    Call through :func:`fused_value_loss`, which validates the arguments. ``apply(values,
    old_values, returns, action_mask, config, counts)``; only ``values`` gets a gradient.

    When ``values`` has the compute dtype (float32, float64), the forward pass also writes the
    per-token gradient, and backward scales that buffer in place and hands it over as the gradient:
    the step allocates one tensor of the inputs' size in all. For half-precision ``values`` the
    gradient must be rounded once from float32, so the forward pass only reads, and backward
    recomputes the per-token gradient and writes it in ``values.dtype`` (again one tensor). A second
    backward through the same graph (``retain_graph=True``) also recomputes. The inputs are saved as
    references (no copies); autograd refuses that recomputation if they were modified in place.
    """

    @staticmethod
    def forward(ctx, values, old_values, returns, action_mask, config, counts):
        loss, grad_tokens, denominators, compiled = _forward(values, old_values, returns, action_mask, config, counts)
        ctx.save_for_backward(values, old_values, returns, action_mask)
        ctx.grad_tokens, ctx.denominators = grad_tokens, denominators
        ctx.config, ctx.counts, ctx.compiled, ctx.shape = config, counts, compiled, values.shape
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the fused value loss has no second derivative: backward with create_graph=True is not supported; "
                "use ValueLoss(fused=False) (or valueloss.functional.value_loss) for double backward"
            )
        if not ctx.compiled:  # the eager fallback saved the finished gradient
            return (grad_output * ctx.grad_tokens).to(ctx.saved_tensors[0].dtype), None, None, None, None, None
        grad_tokens, ctx.grad_tokens = ctx.grad_tokens, None
        scale_tokens = _loss_to_tokens(grad_output, ctx.denominators, ctx.config, ctx.shape[-1])
        if grad_tokens is not None:  # first backward, full precision: scale the buffer in place and hand it over
            return grad_tokens.mul_(scale_tokens.to(grad_tokens.dtype)).reshape(ctx.shape), None, None, None, None, None
        return _recompute_grad(ctx.saved_tensors, grad_output, scale_tokens, ctx), None, None, None, None, None


def _flat(t: Tensor | None, shape: tuple) -> Tensor | None:
    """``t`` as the kernels see it: reshaped to ``shape``, bool viewed as uint8 bytes, detached.

    detach(): a tensor without a view base, so that dynamo does not guard on the caller's layout.
    """
    if t is None:
        return None
    t = t.reshape(shape)
    return (t.view(torch.uint8) if t.dtype == torch.bool else t).detach()


def _constant(value: float | None, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """``value`` as a cached 0-dim tensor: the kernel reads it instead of baking it in (no recompiles)."""
    if value is None:
        return None
    key = (value, dtype, device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(value, dtype=dtype, device=device)
    return _CONSTANTS[key]


def _kernel_inputs(inputs: tuple, config: tuple, kind: str):
    """(compiled kernel of this kind and configuration, its tensor arguments, its constant arguments)."""
    values, _, _, action_mask = inputs
    clip_eps, variant, mode, loss_type, huber_delta = config[:5]
    dtype = F._compute_dtype(*inputs[:3])
    per_sequence = mode.startswith("seq-mean")
    # Token modes see one flat run of tokens, sequence modes a (sequences, T) matrix: one
    # symbolic size each, whatever the caller's number of dimensions.
    shape = (math.prod(values.shape[:-1]), values.shape[-1]) if per_sequence else (values.numel(),)
    key = (
        kind, values.device.type, clip_eps is None, variant, loss_type, per_sequence,
        tuple(None if t is None else t.dtype for t in inputs),
    )
    fn = {"token": _token_pass, "loss": _loss_pass, "grad": _grad_pass}[kind]
    flat = [_flat(t, shape) for t in inputs]
    clip_eps, huber_delta = (_constant(c, dtype, values.device) for c in (clip_eps, huber_delta))
    mask_is_bool = action_mask is not None and action_mask.dtype == torch.bool
    return _kernel(key, fn), flat, (clip_eps, variant, loss_type, huber_delta), (dtype, mask_is_bool), per_sequence


def _forward(values, old_values, returns, action_mask, config, counts):
    """(loss, per-token gradient or None, denominators, compiled?) by a compiled pass, or by the eager closed form."""
    inputs = (values, old_values, returns, action_mask)
    if _COMPILE_ERROR is None and values.numel() > 0:
        one_pass = values.dtype == F._compute_dtype(values, old_values, returns)
        try:
            kernel, flat, settings, (dtype, mask_is_bool), per_sequence = _kernel_inputs(
                inputs, config, "token" if one_pass else "loss"
            )
            outputs = kernel(*flat, *settings, per_sequence, dtype, mask_is_bool)
            grad_tokens, *sums = outputs if one_pass else (None, *outputs)
        except Exception as error:  # compilation failed: remember it, warn once, use the eager closed form
            _remember_failure(error)
        else:
            loss, denominators = _reduce(*sums, values.shape[-1], *_reduce_settings(config, counts))
            return loss, grad_tokens, denominators, True
    if values.numel() > 0:
        _warn_fallback()
    with torch.no_grad():
        loss = F.value_loss(*inputs, **_eager_kwargs(config, counts))
        grad = F.value_loss_grad(*inputs, **_eager_kwargs(config, counts))
    return loss, grad, (), False


def _recompute_grad(inputs: tuple, grad_output: Tensor, scale_tokens: Tensor, ctx) -> Tensor:
    """The gradient for ``values`` by the compiled gradient pass (or the eager closed form if it fails)."""
    values = inputs[0]
    if _COMPILE_ERROR is None:
        try:
            kernel, flat, settings, (dtype, mask_is_bool), _ = _kernel_inputs(inputs, ctx.config, "grad")
            grad = kernel(*flat, *settings, scale_tokens.to(dtype), dtype, mask_is_bool)
        except Exception as error:  # noqa: BLE001 -- same fallback as the forward's
            _remember_failure(error)
        else:
            return grad.reshape(ctx.shape)
    _warn_fallback()
    with torch.no_grad():
        grad = F.value_loss_grad(*inputs, **_eager_kwargs(ctx.config, ctx.counts))
    return (grad_output * grad).to(values.dtype)


def _reduce_settings(config: tuple, counts: tuple) -> tuple:
    _, _, mode, _, _, scale, dp_size, loss_scale_factor = config
    return mode, scale, dp_size, *counts, loss_scale_factor


def _eager_kwargs(config: tuple, counts: tuple) -> dict:
    clip_eps, variant, mode, loss_type, huber_delta, scale, dp_size, loss_scale_factor = config
    batch_num_tokens, global_batch_size = counts
    return dict(
        clip_eps=clip_eps, variant=variant, mode=mode, loss_type=loss_type, huber_delta=huber_delta, scale=scale,
        dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )


def _remember_failure(error: Exception) -> None:
    global _COMPILE_ERROR
    message = str(error).strip()
    _COMPILE_ERROR = f"{type(error).__name__}: {message.splitlines()[0] if message else ''}"


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
    config = (clip_eps, variant, mode, loss_type, huber_delta, scale, dp_size, loss_scale_factor)
    counts = (batch_num_tokens, global_batch_size)
    if torch.compiler.is_compiling():
        # Inside the caller's own torch.compile region: let that compiler fuse the eager formula.
        return F.value_loss(values, old_values, returns, action_mask, **_eager_kwargs(config, counts))
    return FusedValueLoss.apply(values, old_values, returns, action_mask, config, counts)
