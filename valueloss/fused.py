"""One-pass value loss: the reduced loss and its gradient with one sweep over the tokens.

The eager formula (:func:`valueloss.functional.value_loss` under autograd) launches about a dozen
element-wise kernels and keeps about 9.5 input-sized tensors alive for backward. Here the forward is
one compiled graph. Its denominators (the mask's sums, or the global counts) depend on the mask
alone and come first (ATen sums a float mask of the compute dtype; the graph sums a bool mask in
int32); then one loop reads ``values``, ``old_values``, ``returns`` and ``action_mask`` once, reduces
the loss and, on CPU, writes the gradient that ``loss.backward()`` needs: scaled for
``grad_output == 1`` and rounded once into ``values.dtype``. Backward hands that buffer over as
``values.grad`` when ``grad_output`` is exactly 1 (read from host memory: nothing to synchronise on
CPU). Any other ``grad_output`` (``(c * loss).backward()``, gradient accumulation, loss scaling),
a second backward, and every backward on other devices (where reading ``grad_output`` would
synchronise, so the forward writes no gradient there) free the buffer and recompute the gradient
from the saved inputs in one more loop, scaled before its single rounding. Either way the step
allocates one tensor of the input's size: the gradient. The math is the closed form of
:func:`valueloss.functional.elementwise_value_loss_grad` (the clip band's edges as the installed
torch's ``clamp`` has them, :data:`valueloss.functional.BAND_CLOSED`; ties split 50/50) and
the scaling follows autograd's order step by step, so the result equals autograd of the eager formula.

Bool masks reach the kernels as bytes (``mask.view(torch.uint8)``), and on CPU every call runs inside
:func:`valueloss._codegen.fast_byte_loads`: inductor's vectorised load of ``bool`` on AVX2 CPUs goes
through a scalar buffer, and its 8-byte load through a store-forwarding stall, which made a byte
mask about 2x slower to stream than a float32 mask (measured in :mod:`valueloss._codegen`).

The graphs are plain PyTorch functions compiled with :func:`torch.compile` (inductor: C++/OpenMP on
CPU, Triton on GPU), one per configuration (variant, loss type, aggregation mode, clipping on or off,
which global counts are given, dtypes and mask kind, device; ``clip_eps``, ``huber_delta``,
``scale``, ``dp_size`` and the counts are tensor inputs), with dynamic shapes so that new batch
shapes do not recompile (inductor may compile a second variant for inputs of at most 4096 tokens,
and again after ``torch.set_num_threads``). Each is compiled ahead of its first call and then called
directly (:class:`_DirectCall`): dynamo's guards are checked once per call signature (and again when
global state such as the thread count changes) instead of on every call, which saved 60-100 us per
step at 4K tokens. When compilation fails (no C++ compiler, no Triton, ...), :func:`fused_value_loss`
warns once and falls back to the eager closed form of :func:`valueloss.functional.value_loss_grad`.

Only ``values`` is differentiated; there is no second derivative (backward with
``create_graph=True`` raises a clear error). ``retain_graph=True`` works: a second backward
recomputes the gradient from the saved inputs. Autograd refuses a recomputation if an input was
modified in place after the forward; a backward that hands over the forward's gradient is not
affected. Nothing in the forward synchronises with the host.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import threading
import types
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from . import functional as F
from ._codegen import fast_byte_loads
from .functional import Count

__all__ = ["AUTO_MIN_NUMEL", "FusedValueLoss", "compile_available", "fused_value_loss", "reset", "use_fused"]

_LOCK = threading.Lock()
_KERNELS: dict = {}
_CONSTANTS: dict = {}  # (value, dtype, device) -> 0-dim tensor read by the kernels
_PLANS: dict = {}  # configuration, dtypes, device -> what a call needs besides its tensors (see _plan)
_COMPILERS: dict = {}  # inductor's list of C++ compilers -> the first one found on the PATH
_COMPILE_ERROR: str | None = None  # set once compilation has failed; from then on the eager closed form runs
MIN_COMPILE_TORCH = (2, 6)
"""The oldest torch whose compiled kernels passed the core tests (torch 2.6.0, checked by hand: 342 passed,
47 skipped). Older inductors differ (torch 2.1's compiled fp32 gradients were 2 ulp off eager's, not 1) and
lack what the direct call and the fast byte loads use; with an older torch the fused path runs the eager
closed form (``make test-min`` checks that on torch 2.1.2)."""
_OLD_TORCH: str | None = (
    None if torch.__version__ >= MIN_COMPILE_TORCH
    else f"torch {torch.__version__} is older than {'.'.join(map(str, MIN_COMPILE_TORCH))}, the oldest whose "
    "compiled kernels valueloss tests"
)
_WARNED = False


def _torch_compile(fn: Callable) -> Callable:
    """``fn`` compiled with the settings of this module (a single graph: no host syncs; dynamic shapes),
    called without dynamo's per-call guard evaluation where torch allows (:class:`_DirectCall`)."""
    return _DirectCall(torch.compile(fn, fullgraph=True, dynamic=True))


class _DirectCall:
    """A ``torch.compile`` function whose guards are checked once per new call signature, not on every call.

    Dynamo evaluates a compiled function's guards on every call (with its frame evaluation about 60 us
    at 4K tokens, 0.1-0.25 ms at 1M tokens, where the kernel has just evicted the interpreter's
    working set from the caches). Here each variant is compiled ahead of its call with
    ``compiled.aot_compile`` (torch >= 2.10), and its guards are checked once per *signature*: type,
    shape, stride, dtype, device, ``requires_grad`` and inference-ness of every tensor argument and
    the value of every other argument, which is everything the guards of these graphs read besides
    global state; that (the number of threads, grad mode, ...) is compared on every call by dynamo's
    own ``GlobalStateGuard`` (0.3 us), and a change chooses the variant again. A signature that no
    variant's guards accept (dynamo specialises sizes 0 and 1, and sizes that happen to be equal)
    gets a variant of its own, up to :attr:`MAX_VARIANTS`. Where ``aot_compile`` is missing or
    fails, and beyond that many variants, the call goes through ``torch.compile`` as usual.

    The price is paid once per variant and process: ``aot_compile`` bundles its artifacts and so
    bypasses inductor's FX graph cache, and a first call generates the C++ again (the compiled
    library itself is still cached). With a warm disk cache that took 0.5-2 s longer than
    ``torch.compile`` (measured: 1.0-3.5 s against 0.2-2.6 s for three modes). At 60-200 us saved
    per step that is repaid after 2,500-33,000 steps: a win for training runs, a loss for short scripts.
    """

    MAX_VARIANTS = 8
    MAX_SIGNATURES = 1024  # memo of signature -> (variant, global state); cleared when full (re-checks are cheap)

    def __init__(self, compiled: Callable) -> None:
        self.compiled = compiled
        self.variants: list = []
        self.checks: list = []  # each variant's guard check (see _guard_check)
        self.by_signature: dict = {}  # signature -> (variant, global state when it was chosen)
        self.direct = hasattr(compiled, "aot_compile") and _GlobalStateGuard is not None

    def __call__(self, *args):
        return self.call(args)

    def call(self, args: tuple, codegen: Callable = contextlib.nullcontext):
        """``compiled(*args)``, with the steps that generate code (compiling a variant, dynamo's path, which
        may recompile) inside the context manager ``codegen()``. A compiled variant generates none when
        called (inductor writes its code in ``aot_compile``), so its calls run without it.
        """
        if not self.direct:
            with codegen():
                return self.compiled(*args)
        signature = tuple(map(_signature, args))
        try:
            entry = self.by_signature.get(signature)
        except TypeError:  # an unhashable argument (a list, ...): dynamo's guards decide, on every call
            with codegen():
                return self.compiled(*args)
        # The guards also read global state (the number of threads, which inductor's C++ bakes into its
        # loops; grad mode, autocast, the default dtype, ...): a change chooses the variant again.
        if entry is None or not entry[1].check():
            entry = self._variant(args, codegen), _GlobalStateGuard()
            if len(self.by_signature) >= self.MAX_SIGNATURES:
                self.by_signature.clear()
            self.by_signature[signature] = entry
        if entry[0] is self.compiled:
            with codegen():
                return self.compiled(*args)
        return entry[0](*args)

    def _variant(self, args: tuple, codegen: Callable = contextlib.nullcontext) -> Callable:
        """The first variant whose guards accept ``args``; a new one if none does (or the dynamo path)."""
        for variant, check in zip(self.variants, self.checks):
            if _accepts(check, args):
                return variant
        if len(self.variants) >= self.MAX_VARIANTS:
            return self.compiled
        try:
            with codegen():
                variant = self.compiled.aot_compile((args, {}))
            check = _guard_check(variant)
            accepted = _accepts(check, args)
        except Exception:  # API differences, caches disabled, ...: dynamo's path, which raises real errors
            self.direct = False
            return self.compiled
        if not accepted:  # never expected; do not trust a variant that rejects its own example
            return self.compiled
        variant.disable_guard_check()  # checked here, once per signature
        self.variants.append(variant)
        self.checks.append(check)
        return variant


def _guard_check(variant) -> Callable[[tuple], bool]:
    """``args -> variant.guard_check(*args)``, without its ``inspect.Signature.bind`` where that is safe.

    ``guard_check`` binds the arguments to the function's parameters to build the frame's locals that
    the guards read; the binding took 20-55 us of the 25-60 us a check cost, paid on every call whose
    shapes are new (RLHF batches change shape from step to step). The graph functions here take
    positional parameters only, without defaults or closures, so the locals are the parameters zipped
    with the arguments, checked by the same guard manager. Anything else, or a torch without these
    attributes, gets ``guard_check`` itself.
    """
    try:
        artifacts = variant._artifacts
        manager, parameters = artifacts.guard_manager, tuple(artifacts.signature.parameters.values())
        simple = manager is not None and not artifacts.runtime_env.closure and all(
            p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in parameters
        )
    except AttributeError:
        simple = False
    if not simple:
        return lambda args: variant.guard_check(*args)
    names = tuple(p.name for p in parameters)
    return lambda args: len(args) == len(names) and manager.check(dict(zip(names, args)))


def _accepts(check: Callable[[tuple], bool], args: tuple) -> bool:
    """Whether a variant's guard ``check`` accepts ``args`` in the current global state (False if it cannot say)."""
    try:
        return bool(check(args))
    except Exception:
        return False


# Whether we are being traced by torch.compile: torch.compiler.is_compiling from torch 2.3 on, dynamo's own before.
_is_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


try:  # dynamo's check of the global state its guards read (C++, 0.3 us)
    _GlobalStateGuard = torch._C._dynamo.guards.GlobalStateGuard
except AttributeError:  # without it, every call goes through dynamo's guards
    _GlobalStateGuard = None


def _signature(arg):
    """What the guards of the compiled graphs can read from one argument (see :class:`_DirectCall`)."""
    if isinstance(arg, Tensor):
        return type(arg), arg.shape, arg.stride(), arg.dtype, arg.device, arg.requires_grad, arg.is_inference()
    if isinstance(arg, tuple):
        return tuple(map(_signature, arg))
    return arg


_COMPILE: Callable = _torch_compile  # tests replace it to simulate a machine where compilation fails


def reset() -> None:
    """Forget every compiled kernel and any earlier compilation failure (the warning may show again)."""
    global _COMPILE_ERROR, _WARNED
    with _LOCK:
        _KERNELS.clear()
        _CONSTANTS.clear()
        _PLANS.clear()
        _COMPILE_ERROR = None
        _WARNED = False


def compile_available(device: torch.device | str = "cpu") -> bool:
    """Whether the fused kernel can be compiled for ``device``, judged without compiling anything.

    False with a torch older than :data:`MIN_COMPILE_TORCH` and after a compilation has failed in this
    process; on CPU it needs the C++ compiler that inductor is configured with, on CUDA the ``triton``
    package. Other devices: False.
    """
    if _unavailable() is not None:
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

Per call the fused path takes 0.43x-0.53x the eager path's time at 4K tokens (a fraction of a
millisecond saved) and is 6.9x-12.6x faster at 128K (``benchmarks/results/cpu_full.json``), but its
first call compiles for seconds; from 64K tokens on it saves milliseconds per call, so the compilation
pays for itself within a few hundred steps, and small teaching inputs never compile.
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
        and not _is_compiling()
        and compile_available(values.device)
    )


# --------------------------------------------------------------------------- the one-pass kernel


def _mask_weights(action_mask: Tensor | None, mask_is_bool: bool, dtype: torch.dtype):
    """``(keep, weight)`` of a mask as the kernels see it (a bool mask arrives viewed as ``uint8``)."""
    if action_mask is None:
        return None, None
    weight = action_mask.to(dtype)
    # Bool masks come as uint8 bytes: inductor's vectorised CPU load of bool is several times slower
    # than a byte load plus a conversion (see the module docstring).
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
    """``(mask * loss_token or None, mask * d loss_token / d values or None)`` in ``dtype``.

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
    return loss_token, grad_token


def _sum(t: Tensor, per_sequence: bool, dtype: torch.dtype | None = None) -> Tensor:
    """``t`` summed over everything, or over the last dimension (kept), in ``dtype`` if given."""
    return t.sum(dim=-1, keepdim=True, dtype=dtype) if per_sequence else t.sum(dtype=dtype)


def _count_dtype(numel: int) -> torch.dtype:
    """The integer type a bool mask is counted in: int32 (the mask's bytes widen once, and a vector of
    them adds in one instruction) unless the count could overflow it.

    ``torch.sum``'s default for integers, int64, widens every byte twice and adds half as many per
    instruction. Measured at 1M tokens: the count alone (mask in cache, one thread) 70-140 us in int32
    against 230-290 us in int64; the whole forward kernel with cold caches 2-4.5% faster on one and
    two threads; the fused step 3-8% faster on one thread at 1M and 4M tokens (in-process A/Bs, 30-60
    repetitions), within the noise on two.
    """
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


def _needs_weight_sum(mode: str, batch_num_tokens: Tensor | None) -> bool:
    """Whether the reduction divides by (or tests) sums of the mask."""
    return mode != "token-sum" and not (mode == "token-mean" and batch_num_tokens is not None)


def _weight_sum(mask: Tensor | None, shape: tuple, per_sequence: bool, dtype: torch.dtype, device) -> Tensor | None:
    """Sum of the mask, over everything or per sequence, where ATen does it better than the graph; else None.

    ATen sums a float tensor of its own dtype at memory speed, while inductor's float reduction
    loop (cascade summation, one accumulator through memory) takes several times as long (measured:
    1M tokens, one thread, 0.08 ms vs 0.69 ms). Bool masks (bytes) are summed in the graph, in
    int32 (exact, and no float cascade); ATen's int32 sum of bytes would first copy them to int32.
    """
    if mask is None:
        count = shape[-1] if per_sequence else math.prod(shape)
        return torch.full(shape[:-1] + (1,) if per_sequence else (), float(count), dtype=dtype, device=device)
    if mask.dtype != dtype:
        return None
    return mask.sum(dim=-1, keepdim=True) if per_sequence else mask.sum()


def _forward_pass(values, old_values, returns, action_mask, weight_sum, clip_eps, variant, loss_type, huber_delta,
                  reduction, dtype, mask_is_bool, write_grad, count_dtype):
    """The forward in one compiled graph and one loop over the tokens: ``(loss, gradient or None, denominators)``.

    ``weight_sum`` is :func:`_weight_sum`'s (if ``None``, the graph sums the mask if it needs to); ``reduction =
    (mode, scale, dp_size, batch_num_tokens, global_batch_size, norm)`` with the numbers as 0-dim
    tensors (``None`` where absent). The denominators depend on the mask alone, so they are known
    before the loop, which reduces the loss and, if ``write_grad``, writes the gradient for
    ``grad_output == 1`` (what ``loss.backward()`` passes) in ``values.dtype``: scaled exactly as
    backward would scale it, then rounded once. A bool mask is counted in ``count_dtype``
    (:func:`_count_dtype`).
    """
    settings = (clip_eps, variant, loss_type, huber_delta)
    mode, scale, dp_size, batch_num_tokens, global_batch_size, norm = reduction
    loss, grad = _per_token(
        (values, old_values, returns, action_mask), settings, dtype, mask_is_bool, loss=True, grad=write_grad
    )
    per_sequence = mode.startswith("seq-mean")
    if weight_sum is None and action_mask is not None:  # bytes sum exactly in int32; other float masks in dtype
        # (unused, and dropped by inductor, where the mode does not divide by the mask's sums)
        if mask_is_bool:
            weight_sum = _sum(action_mask.to(torch.int32), per_sequence, count_dtype).to(dtype)
        else:
            weight_sum = _sum(action_mask.to(dtype), per_sequence).to(dtype)
    denominators = _denominators(weight_sum, mode, batch_num_tokens, global_batch_size)
    if write_grad:
        one = torch.ones((), dtype=dtype, device=values.device)
        scale_tokens = _loss_to_tokens(one, denominators, mode, scale, dp_size, norm)
        grad = (scale_tokens * grad).to(values.dtype)
        # ``loss`` either way, but read through the gradient: inductor then sums the loss in the
        # loop that writes the gradient (otherwise it gives each its own loop over all inputs).
        loss = torch.where(grad != grad, loss, loss)
    loss = _reduce(_sum(loss, per_sequence), denominators, mode, scale, dp_size, norm)
    return loss, grad, denominators


def _grad_pass(values, old_values, returns, action_mask, clip_eps, variant, loss_type, huber_delta, scale_tokens,
               dtype, mask_is_bool):
    """Backward by recomputation: ``scale_tokens * mask * d loss_token / d values``, rounded once into
    ``values.dtype``, in one loop that writes only the gradient. ``scale_tokens`` is
    d loss / d (mask * loss_token): a 0-dim tensor, or one factor per sequence.
    """
    settings = (clip_eps, variant, loss_type, huber_delta)
    _, grad = _per_token(
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


def _run(kernel: Callable, device: torch.device, *args):
    """``kernel(*args)``; on CPU inside :func:`valueloss._codegen.fast_byte_loads` (bool masks are bytes).

    Inductor generates code at the first call and at recompilations, in the calling thread: every
    call that may do so is wrapped. A :class:`_DirectCall` wraps only its compilations and dynamo's
    path; its compiled variants generate no code when called, and skip the wrapping (14 us at 4K
    tokens, about 40 us after a kernel that evicted the caches).
    """
    if device.type != "cpu":
        return kernel(*args)
    if isinstance(kernel, _DirectCall):
        return kernel.call(args, fast_byte_loads)
    with fast_byte_loads():
        return kernel(*args)


# --------------------------------------------------------------------------- reductions


def _denominators(
    weight_sum: Tensor | None, mode: str, batch_num_tokens: Tensor | None, global_batch_size: Tensor | None
) -> tuple[Tensor, ...]:
    """What the reduction divides by, from the mask's sums (and the global counts): no loss needed.

    ``weight_sum`` is read only where the mode needs it (:func:`_needs_weight_sum`); it may be None elsewhere.

    ``token-mean``: ``(tokens,)``; sequence modes: ``(sequences, nonempty rows, tokens per row)``.
    Zero counts become 1 (:func:`valueloss.functional._safe_denominator`), so empty masks give 0.
    """
    if mode == "token-sum":
        return ()
    if mode == "token-mean":
        return (F._safe_denominator(weight_sum if batch_num_tokens is None else batch_num_tokens),)
    nonempty = weight_sum > 0
    count = nonempty.to(weight_sum.dtype).sum() if global_batch_size is None else global_batch_size
    return F._safe_denominator(count), nonempty, F._safe_denominator(weight_sum)


def _reduce(
    loss_sum: Tensor, denominators: tuple, mode: str, scale: Tensor | float, dp_size: Tensor | int,
    norm: Tensor | float | None,
) -> Tensor:
    """The reduced loss from the loss's sums and :func:`_denominators`.

    Same operations in the same order as :func:`valueloss.functional.value_loss`, so that the
    gradient built by :func:`_loss_to_tokens` is autograd's of the eager formula. ``norm`` is
    the ``seq-mean-token-sum-norm`` divisor (``loss_scale_factor``, by default the tokens per sequence).
    """
    if mode == "token-sum":
        return scale * (loss_sum * dp_size)
    if mode == "token-mean":
        return scale * (loss_sum / denominators[0] * dp_size)
    sequences, nonempty, tokens = denominators
    per_sequence = loss_sum / tokens if mode == "seq-mean-token-mean" else loss_sum
    loss = torch.where(nonempty, per_sequence, 0.0).sum() / sequences * dp_size
    if mode == "seq-mean-token-sum-norm":
        loss = loss / norm
    return scale * loss


def _loss_to_tokens(
    grad_output: Tensor, denominators: tuple, mode: str, scale: Tensor | float, dp_size: Tensor | int,
    norm: Tensor | float | None,
) -> Tensor:
    """d loss / d (mask * per-token loss): autograd's backward of :func:`_reduce`, step by step."""
    grad = grad_output * scale
    if mode == "token-sum":
        return grad * dp_size
    if mode == "token-mean":
        return grad * dp_size / denominators[0]
    sequences, nonempty, tokens = denominators
    if mode == "seq-mean-token-sum-norm":
        grad = grad / norm
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
    """Forward: the loss and, on CPU, the gradient for ``loss.backward()``, in one pass over the tokens.

    Call through :func:`fused_value_loss`, which validates the arguments. ``apply(values,
    old_values, returns, action_mask, config, counts)``; only ``values`` gets a gradient.

    On CPU the forward pass also writes the gradient that ``grad_output == 1`` gives (scaled and
    rounded once into ``values.dtype``), and backward hands that buffer over when the incoming
    gradient is exactly 1, which it reads from host memory (no device to wait for). Any other
    ``grad_output``, a second backward (``retain_graph=True``), and every backward on other
    devices (where reading ``grad_output`` would synchronise) free the buffer and recompute the
    gradient from the saved inputs in one more pass. The step allocates one tensor of the input's
    size either way. The inputs are saved as references (no copies); autograd refuses the
    recomputation if they were modified in place after the forward.
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
        if grad_tokens is not None and _is_one(grad_output):  # the gradient the forward wrote: hand it over
            return grad_tokens.reshape(ctx.shape), None, None, None, None, None
        del grad_tokens  # free it before the recomputation allocates the gradient again
        _, _, mode, _, _, scale, dp_size, loss_scale_factor = ctx.config
        norm = _norm(loss_scale_factor, ctx.shape[-1])
        scale_tokens = _loss_to_tokens(grad_output, ctx.denominators, mode, scale, dp_size, norm)
        return _recompute_grad(ctx.saved_tensors, grad_output, scale_tokens, ctx), None, None, None, None, None


def _is_one(grad_output: Tensor) -> bool:
    """Whether ``grad_output`` is exactly 1, asked only of CPU tensors (elsewhere it would synchronise)."""
    return grad_output.device.type == "cpu" and grad_output.numel() == 1 and grad_output.item() == 1.0


def _flat(t: Tensor | None, shape: tuple) -> Tensor | None:
    """``t`` as the kernels see it: reshaped to ``shape``, bool viewed as uint8 bytes, detached.

    detach(): a tensor without a view base, so that dynamo does not guard on the caller's layout.
    """
    if t is None:
        return None
    if t.requires_grad:  # a view of a tensor that needs a gradient carries autograd's view record: 2 us more
        t = t.detach()
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


def _kernel_inputs(inputs: tuple, config: tuple, kind: str, extra: tuple = ()):
    """(compiled kernel of this kind and configuration, its tensor arguments, its settings, (dtype, bool mask?)).

    ``extra`` is appended to the kernel's cache key: whatever else changes the compiled graph, and
    always the band's edges (:data:`valueloss.functional.BAND_CLOSED`, read while tracing: set once at
    import, keyed for tests that switch it).
    Everything but the tensor arguments comes from :func:`_plan`, worked out once per configuration.
    """
    values, old_values, returns, action_mask = inputs
    device = values.device
    extra = (*extra, F.BAND_CLOSED)
    plan_key = (
        kind, config[:5], extra, device, values.dtype, None if old_values is None else old_values.dtype,
        returns.dtype, None if action_mask is None else action_mask.dtype,
    )
    plan = _PLANS.get(plan_key)
    if plan is None:
        plan = _PLANS[plan_key] = _plan(inputs, config, kind, extra)
    key, fn, settings, dtype, mask_is_bool, per_sequence = plan
    kernel = _KERNELS.get(key)  # looked up on every call: tests swap the cache to change the compiler
    if kernel is None:
        kernel = _kernel(key, fn)
    # Token modes see one flat run of tokens, sequence modes a (sequences, T) matrix: one
    # symbolic size each, whatever the caller's number of dimensions.
    shape = (math.prod(values.shape[:-1]), values.shape[-1]) if per_sequence else (values.numel(),)
    flat = [_flat(t, shape) for t in inputs]
    return kernel, flat, settings, (dtype, mask_is_bool)


def _plan(inputs: tuple, config: tuple, kind: str, extra: tuple) -> tuple:
    """What :func:`_kernel_inputs` needs besides the tensors: ``(kernel key, graph function, settings,
    compute dtype, bool mask?, per sequence?)``. It depends on the configuration, the dtypes and the
    device only, so it is kept in ``_PLANS`` (cleared by :func:`reset`)."""
    values, _, _, action_mask = inputs
    clip_eps, variant, mode, loss_type, huber_delta = config[:5]
    dtype = F._compute_dtype(*inputs[:3])
    per_sequence = mode.startswith("seq-mean")
    key = (
        kind, values.device.type, clip_eps is None, variant, loss_type, per_sequence,
        tuple(None if t is None else t.dtype for t in inputs), *extra,
    )
    fn = {"forward": _forward_pass, "grad": _grad_pass}[kind]
    clip_eps, huber_delta = (_constant(c, dtype, values.device) for c in (clip_eps, huber_delta))
    mask_is_bool = action_mask is not None and action_mask.dtype == torch.bool
    return key, fn, (clip_eps, variant, loss_type, huber_delta), dtype, mask_is_bool, per_sequence


def _reduction(config: tuple, counts: tuple, tokens_per_sequence: int, dtype: torch.dtype, device) -> tuple:
    """The forward graph's ``reduction`` argument: the mode, and its numbers as 0-dim tensors (or None)."""
    _, _, mode, _, _, scale, dp_size, loss_scale_factor = config
    norm = _norm(loss_scale_factor, tokens_per_sequence) if mode == "seq-mean-token-sum-norm" else None
    if counts[0] is None and counts[1] is None:  # the common case: all constants, kept like the plans
        key = ("reduction", mode, scale, dp_size, norm, dtype, device)
        reduction = _PLANS.get(key)
        if reduction is None:
            reduction = _PLANS[key] = _reduction_tensors(mode, scale, dp_size, norm, counts, dtype, device)
        return reduction
    return _reduction_tensors(mode, scale, dp_size, norm, counts, dtype, device)


def _reduction_tensors(mode: str, scale: float, dp_size: int, norm: float | None, counts: tuple, dtype, device):
    like = _constant(0.0, dtype, device)
    return (
        mode, _constant(float(scale), dtype, device), _constant(float(dp_size), dtype, device),
        *(None if count is None else _as_tensor(count, like) for count in counts), _constant(norm, dtype, device),
    )


def _forward(values, old_values, returns, action_mask, config, counts):
    """(loss, gradient for grad_output 1 or None, denominators, compiled?) by the compiled forward graph,
    or by the eager closed form."""
    inputs = (values, old_values, returns, action_mask)
    if _unavailable() is None and values.numel() > 0:
        # Only on CPU can backward read grad_output without a synchronisation, to use this gradient.
        write_grad = values.device.type == "cpu"
        try:
            count_dtype = _count_dtype(values.numel())
            extra = (config[2], write_grad, *(count is None for count in counts), count_dtype)
            kernel, flat, settings, (dtype, mask_is_bool) = _kernel_inputs(inputs, config, "forward", extra)
            reduction = _reduction(config, counts, values.shape[-1], dtype, values.device)
            weight_sum = None
            if _needs_weight_sum(config[2], reduction[3]):
                weight_sum = _weight_sum(flat[3], flat[0].shape, config[2].startswith("seq-mean"), dtype, values.device)
            loss, grad_tokens, denominators = _run(
                kernel, values.device, *flat, weight_sum, *settings, reduction, dtype, mask_is_bool, write_grad,
                count_dtype,
            )
        except Exception as error:  # compilation failed: remember it, warn once, use the eager closed form
            _remember_failure(error)
        else:
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
    if _unavailable() is None:
        try:
            kernel, flat, settings, (dtype, mask_is_bool) = _kernel_inputs(inputs, ctx.config, "grad")
            grad = _run(kernel, values.device, *flat, *settings, scale_tokens.to(dtype), dtype, mask_is_bool)
        except Exception as error:  # noqa: BLE001 -- same fallback as the forward's
            _remember_failure(error)
        else:
            return grad.reshape(ctx.shape)
    _warn_fallback()
    with torch.no_grad():
        grad = F.value_loss_grad(*inputs, **_eager_kwargs(ctx.config, ctx.counts))
    return (grad_output * grad).to(values.dtype)


def _eager_kwargs(config: tuple, counts: tuple) -> dict:
    clip_eps, variant, mode, loss_type, huber_delta, scale, dp_size, loss_scale_factor = config
    batch_num_tokens, global_batch_size = counts
    return dict(
        clip_eps=clip_eps, variant=variant, mode=mode, loss_type=loss_type, huber_delta=huber_delta, scale=scale,
        dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )


def _unavailable() -> str | None:
    """Why the fused kernels are not compiled in this process (too old a torch, or a failed compilation), or None."""
    return _OLD_TORCH or _COMPILE_ERROR


def _remember_failure(error: Exception) -> None:
    global _COMPILE_ERROR
    message = str(error).strip()
    _COMPILE_ERROR = f"{type(error).__name__}: {message.splitlines()[0] if message else ''}"


def _warn_fallback() -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            f"valueloss.fused: torch.compile is unavailable ({_unavailable()}); using the eager closed-form "
            "gradient instead (same results, slower). This warning is shown once.",
            RuntimeWarning,
            stacklevel=4,
        )


def fused_value_loss(
    values: Tensor,
    old_values: Tensor | None,
    returns: Tensor,
    action_mask: Tensor | None = None,
    config: F.LossConfig | None = None,
    *,
    dp_size: int = 1,
    batch_num_tokens: Count = None,
    global_batch_size: Count = None,
    **settings,
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
    config, counts, *_ = F._prepare(
        values, old_values, returns, action_mask, config, settings, dp_size, batch_num_tokens, global_batch_size,
        "fused_value_loss",
    )
    clip_eps, variant, mode, loss_type, huber_delta, scale, loss_scale_factor = (
        config.clip_eps, config.variant, config.mode, config.loss_type, config.huber_delta, config.scale,
        config.loss_scale_factor,
    )
    dp_size, batch_num_tokens, global_batch_size = counts
    for name, t in (("old_values", old_values), ("returns", returns), ("action_mask", action_mask)):
        if t is not None and t.requires_grad:
            raise ValueError(
                f"the fused value loss differentiates values only; got {name} with requires_grad=True "
                "(use ValueLoss(fused=False) to differentiate it)"
            )
    config = (clip_eps, variant, mode, loss_type, huber_delta, scale, dp_size, loss_scale_factor)
    counts = (batch_num_tokens, global_batch_size)
    if _is_compiling():
        # Inside the caller's own torch.compile region: let that compiler fuse the eager formula.
        return F.value_loss(values, old_values, returns, action_mask, **_eager_kwargs(config, counts))
    return FusedValueLoss.apply(values, old_values, returns, action_mask, config, counts)
