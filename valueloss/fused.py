"""The value loss and its gradient in one compiled pass: ``ValueLoss(..., fused=True)``.

The pattern of Liger-Kernel's losses (``liger_kernel/ops/cross_entropy.py``): the forward computes the
loss *and* the gradient that ``loss.backward()`` needs, and a thin :class:`torch.autograd.Function` hands
that gradient over in backward, multiplied by the incoming gradient. Here the forward is one function
compiled with :func:`torch.compile` (``dynamic=True, fullgraph=True``; inductor writes C++/OpenMP on CPU,
Triton on GPU), built from the same per-token math as the eager path
(:func:`valueloss.functional._elementwise`, :func:`valueloss.functional._elementwise_grad`) and the
same aggregation. Each token is read once; nothing of the input's size is kept for backward except the
gradient itself.

Settings. Every number (``clip_eps``, ``huber_delta``, ``scale``, ``dp_size``, the
``seq-mean-token-sum-norm`` divisor, the count the mode divides by if it is given, the token count of an
absent mask) enters the compiled graph in one small tensor built afresh on every call, so no two settings
can share a tensor and no graph is specialised on a value: annealing ``clip_eps`` or ``scale`` compiles
nothing. A count given as a tensor is joined to it on the device (never read on the host). The strings
(``variant``, ``loss_type``, ``mode``), whether clipping is on, the mask's kind (none, bool, or weights:
integer or float), whether the count is given and whether a gradient is needed pick the graph: each such
configuration has its own compiled function, so the cache is bounded (by a few hundred; dynamo keeps its
graphs, and its :attr:`torch.compiler.config.recompile_limit`, per code object, so each configuration
gets its own copy of the function's code). Within one configuration new shapes do not recompile, except
that dynamo specialises sizes 0 and 1 (empty inputs run uncompiled); guards are dynamo's own, evaluated on
every call.

Exactness. For ``loss.backward()`` (an incoming gradient of 1) the gradient equals autograd's of
:func:`valueloss.functional.value_loss`: the graph applies the aggregation's factors in the order
autograd's backward does, and then the per-token derivative (``tests/test_fused.py`` checks equality
with ``torch.equal``). Where the two branches of the ``max`` tie with different errors, autograd adds two
half gradients and the closed form halves their sum: the last bit may differ there. For any other
incoming gradient ``g`` the saved gradient is multiplied by ``g`` (no host synchronisation: ``g`` is
never read on the host), which rounds once more than autograd (within 2 ulp in float32; in half
precision the gradient is stored in the input's dtype, so within one ulp of it). The loss is summed in
a different order than ATen's ``sum``: within a few ulp. The means' denominators are the eager path's to
the last bit: an integer or float mask is summed outside the graph by the eager path's own function, and a
bool mask is counted exactly, in integers, inside it (as the eager path counts it).

Limits. Only ``values`` is differentiated (``ValueError`` if another input requires a gradient). There
is no second derivative: backward with ``create_graph=True`` raises a ``RuntimeError`` naming the fused
path, and so do the ``torch.func`` transforms (``grad``, ``vjp`` and ``jacrev`` differentiate with
``create_graph=True``; ``vmap``, ``jvp`` and ``jacfwd`` have no rule here). ``retain_graph=True`` works:
a second backward recomputes the gradient from the saved inputs (and refuses, like autograd, if one
was modified in place since). Inside the caller's own ``torch.compile`` region the eager formula runs,
for that compiler to fuse. ``meta`` tensors run the same function uncompiled (shapes and dtypes only).
With a torch older than :data:`MIN_COMPILE_TORCH` the function runs uncompiled (same numbers, eager
speed). If compiling or running the graph fails, the call raises a ``RuntimeError`` that names the fused
path; nothing is remembered, so the next call tries again. Calls into the compiled functions are
serialised by a lock, so threads that make their first call together compile one at a time.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from . import functional as F
from .functional import Count

__all__ = ["MIN_COMPILE_TORCH", "FusedValueLoss", "compiled_configurations", "fused_value_loss", "reset"]

MIN_COMPILE_TORCH = (2, 6)
"""The oldest torch whose compiled graphs the tests have passed on; with an older torch the fused path runs
its function uncompiled (the same numbers at eager speed; ``make test-min`` checks that on torch 2.1.2)."""
_OLD_TORCH: str | None = (
    None if torch.__version__ >= MIN_COMPILE_TORCH
    else f"torch {torch.__version__} is older than {'.'.join(map(str, MIN_COMPILE_TORCH))}, the oldest whose "
    "compiled graphs valueloss tests"
)

# Whether the caller's own torch.compile is tracing us (public from torch 2.3; older ones never compile here).
_is_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", lambda: False)

_LOCK = threading.RLock()  # serialises compilation (and the calls that may trigger it)
_COMPILED: dict = {}  # configuration -> compiled function; bounded by the number of configurations


def _COMPILE(function: Callable) -> Callable:  # noqa: N802 -- a module constant that tests replace
    """How each configuration's function is compiled (the tests run the same function uncompiled, too)."""
    return torch.compile(function, dynamic=True, fullgraph=True)


_NO_DERIVATIVE = (
    "fused_value_loss has no second derivative and no torch.func rule: {what} is not supported; "
    "use ValueLoss(fused=False) (valueloss.functional.value_loss), which autograd differentiates"
)


class _Plan(NamedTuple):
    """What picks the graph: the strings of a call (everything else enters as tensors)."""

    variant: str
    loss_type: str
    clipped: bool
    mode: str
    mask_kind: str  # "none", "bool", or "weights" (an integer or float mask)
    count_given: bool  # whether the count the mode divides by is given (then it is settings[_COUNT])
    count_dtype: torch.dtype  # the integer type a bool mask is counted in
    want_grad: bool
    band_closed: bool  # valueloss.functional.BAND_CLOSED, read while tracing


# Positions in the settings tensor.
_CLIP_EPS, _HUBER_DELTA, _SCALE, _DP_SIZE, _NORM, _COUNT, _TOKENS = range(7)


def _loss_and_grad(values, old_values, returns, action_mask, mask_sums, settings, plan):
    """``(loss, d loss / d values or None)`` of :func:`valueloss.functional.value_loss`, in one graph.

    ``settings`` holds the numbers (see ``_CLIP_EPS`` ...) in the compute dtype; ``mask_sums`` are a weight
    mask's sums taken outside (over everything, or per sequence; None otherwise). The gradient is for an
    incoming gradient of 1: the aggregation's factors applied in the order of autograd's backward through
    the eager formula, then the per-token derivative.
    """
    dtype = settings.dtype
    per_token = (settings[_CLIP_EPS] if plan.clipped else None, plan.variant, plan.loss_type, settings[_HUBER_DELTA])
    scale, dp_size = settings[_SCALE], settings[_DP_SIZE]
    given = settings[_COUNT] if plan.count_given else None
    per_sequence = plan.mode.startswith("seq-mean")
    keep = weight = None
    if plan.mask_kind == "bool":  # viewed as bytes, and compared as floats (see fused_value_loss)
        keep = action_mask.to(dtype) != 0
    elif plan.mask_kind == "weights":
        keep, weight = action_mask != 0, action_mask.to(dtype)

    # The denominators depend on the mask alone, and so does d loss / d (mask * per-token loss): ``chain``.
    if plan.mask_kind == "weights":
        mask_count = mask_sums
    elif plan.mask_kind == "bool":  # counted exactly, in integers
        mask_count = (action_mask.sum(dim=-1, keepdim=True, dtype=plan.count_dtype) if per_sequence
                      else action_mask.sum(dtype=plan.count_dtype)).to(dtype)
    else:  # settings[_TOKENS] is the number of tokens (token-mean) or tokens per sequence
        mask_count = settings[_TOKENS].expand(values.shape[:-1] + (1,)) if per_sequence else settings[_TOKENS]
    if plan.mode == "token-sum":
        chain = scale * dp_size
    elif plan.mode == "token-mean":
        tokens = mask_count if given is None else given
        positive = tokens > 0
        safe = torch.where(positive, tokens, 1.0)
        chain = torch.where(positive, scale * dp_size, 0.0) / safe
    else:
        nonempty = mask_count > 0
        safe_seq_counts = torch.where(nonempty, mask_count, 1.0)
        sequences = nonempty.to(dtype).sum() if given is None else given
        positive = sequences > 0
        safe = torch.where(positive, sequences, 1.0)
        chain = scale / settings[_NORM] if plan.mode == "seq-mean-token-sum-norm" else scale
        chain = torch.where(nonempty, torch.where(positive, chain * dp_size, 0.0) / safe, 0.0)
        if plan.mode == "seq-mean-token-mean":
            chain = chain / safe_seq_counts

    values_c, returns_c = values.to(dtype), returns.to(dtype)
    old_values_c = None if old_values is None else old_values.to(dtype)
    loss_mat = F._elementwise(values_c, old_values_c, returns_c, *per_token)
    masked = loss_mat if keep is None else torch.where(keep, loss_mat, 0.0)
    if weight is not None:
        masked = masked * weight
    grad = None
    if plan.want_grad:
        grad_token = F._elementwise_grad(values_c, old_values_c, returns_c, *per_token)
        grad = (chain if weight is None else chain * weight) * grad_token
        if keep is not None:  # masked-out tokens get 0, whatever they hold (NaN, inf)
            grad = torch.where(keep, grad, 0.0)
        # The same numbers, read through the gradient: inductor then sums the loss in the loop that writes the
        # gradient (after the one that counts the mask), not in a loop of its own that reads every input again.
        masked = torch.where(grad != grad, masked, masked)
        grad = grad.to(values.dtype)

    if plan.mode == "token-sum":
        loss = scale * (masked.sum() * dp_size)
    elif plan.mode == "token-mean":
        loss = scale * (torch.where(positive, masked.sum() / safe, 0.0) * dp_size)
    else:
        seq_losses = masked.sum(dim=-1, keepdim=True)
        if plan.mode == "seq-mean-token-mean":
            seq_losses = seq_losses / safe_seq_counts
        loss = torch.where(positive, torch.where(nonempty, seq_losses, 0.0).sum() / safe, 0.0) * dp_size
        if plan.mode == "seq-mean-token-sum-norm":
            loss = loss / settings[_NORM]
        loss = scale * loss
    return loss, grad


def _compiled(plan: _Plan) -> Callable:
    """The compiled function of ``plan``: :func:`_loss_and_grad` with a code object of its own (dynamo keeps
    its graphs, and its recompile limit, per code object), compiled at its first call."""
    compiled = _COMPILED.get(plan)
    if compiled is None:
        with _LOCK:
            compiled = _COMPILED.get(plan)
            if compiled is None:
                code = _loss_and_grad.__code__
                code = code.replace(co_name=f"{code.co_name}_{len(_COMPILED)}")
                function = types.FunctionType(code, _loss_and_grad.__globals__, code.co_name)
                compiled = _COMPILED[plan] = _COMPILE(function)
    return compiled


def _run(values: Tensor, args: tuple, plan: _Plan):
    """:func:`_loss_and_grad` on ``args``: compiled, or uncompiled on ``meta`` tensors, empty inputs and old torch."""
    if _OLD_TORCH is not None or values.device.type == "meta" or values.numel() == 0:
        return _loss_and_grad(*args, plan)  # (an empty input would get graphs of its own: size 0 is specialised)
    compiled = _compiled(plan)
    try:
        with _LOCK:
            return compiled(*args, plan)
    except Exception as error:
        message = str(error).strip().splitlines()
        raise RuntimeError(
            f"fused_value_loss: torch.compile's graph failed on {values.device.type} "
            f"({type(error).__name__}: {message[0] if message else ''}); ValueLoss(fused=False) computes the same "
            "loss without compiling"
        ) from error


def compiled_configurations() -> int:
    """How many configurations have a compiled function in this process (each compiles at its first call)."""
    return len(_COMPILED)


def reset() -> None:
    """Forget every compiled function (the next call of each configuration compiles again)."""
    with _LOCK:
        _COMPILED.clear()


class FusedValueLoss(torch.autograd.Function):
    """Forward: the loss and its gradient (for an incoming gradient of 1) in one pass; backward: that
    gradient times the incoming one. Call through :func:`fused_value_loss`, which validates the arguments.

    ``apply(values, old_values, returns, action_mask, mask_sums, settings, plan)`` returns
    ``(loss, gradient)``, the gradient not differentiable. Backward multiplies the saved gradient in place
    by ``grad_output`` and hands it over (so a step allocates one gradient, and ``grad_output`` is never
    read on the host); a second backward through a retained graph recomputes it from the saved inputs.
    """

    @staticmethod
    def forward(values, old_values, returns, action_mask, mask_sums, settings, plan):
        return _run(values, (values, old_values, returns, action_mask, mask_sums, settings), plan)

    @staticmethod
    def setup_context(ctx, inputs, output):
        values, old_values, returns, action_mask, mask_sums, settings, plan = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # else backward gets a zero tensor of the input's size for the gradient output
        ctx.save_for_backward(values, old_values, returns, action_mask, mask_sums)
        ctx.settings, ctx.plan, ctx.grad = settings, plan, output[1]

    @staticmethod
    def backward(ctx, grad_output, _):
        if torch.is_grad_enabled():  # create_graph=True, which torch.func.grad/vjp/jacrev use
            raise RuntimeError(_NO_DERIVATIVE.format(what="backward with create_graph=True (or a torch.func "
                                                          "transform)"))
        grad, ctx.grad = ctx.grad, None  # released here, so that autograd can hand the buffer over as values.grad
        if grad_output is None:  # the loss took no part in what is differentiated (grads are not materialised)
            return (None,) * 7
        if grad is None:  # a second backward through a retained graph: recompute
            values, *rest = ctx.saved_tensors
            _, grad = _run(values, (values, *rest, ctx.settings), ctx.plan)
        return grad.mul_(grad_output), None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_NO_DERIVATIVE.format(what="forward-mode AD (torch.func.jvp, jacfwd)"))

    @staticmethod
    def vmap(info, in_dims, *args):
        raise RuntimeError(_NO_DERIVATIVE.format(what="torch.func.vmap"))


def _settings_tensor(numbers: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``numbers`` as a new tensor on ``device``: one per call, so that no two settings share a tensor and no
    graph is specialised on one. On an accelerator it is copied from pinned memory without waiting: a
    blocking copy from the host would synchronise."""
    if device.type in ("cpu", "meta"):
        return torch.tensor(numbers, dtype=dtype, device=device)
    return torch.tensor(numbers, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _mask_kind(action_mask: Tensor | None) -> str:
    if action_mask is None:
        return "none"
    return "bool" if action_mask.dtype == torch.bool else "weights"


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
    """:func:`valueloss.functional.value_loss` and its gradient in one compiled pass; see :class:`valueloss.ValueLoss`.

    Same arguments and numbers (the gradient of ``loss.backward()`` equal to autograd's of the eager
    formula, the loss within a few ulp; see :mod:`valueloss.fused`). Differentiates ``values`` only. The
    first call of each configuration compiles for seconds (inductor caches the code on disk for later
    processes).

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
    config, counts, *_, per_token = F._prepare(  # no casts: the graph casts half precision itself
        values, old_values, returns, action_mask, config, settings, dp_size, batch_num_tokens, global_batch_size,
        "fused_value_loss", cast=False,
    )
    dtype, device = F._compute_dtype(values, old_values, returns), values.device
    for name, t in (("old_values", old_values), ("returns", returns), ("action_mask", action_mask)):
        if t is not None and t.requires_grad:
            raise ValueError(
                f"fused_value_loss differentiates values only; got {name} with requires_grad=True "
                "(use ValueLoss(fused=False) to differentiate it)"
            )
    if _is_compiling():  # inside the caller's own torch.compile region: let that compiler fuse the eager formula
        return F.value_loss(values, old_values, returns, action_mask, config, dp_size=dp_size,
                            batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size)
    clip_eps, variant, loss_type, huber_delta = per_token
    mode = config.mode
    per_sequence = mode.startswith("seq-mean")
    # The one count the mode divides by (token-sum divides by none), given as a number or a tensor.
    count = None if mode == "token-sum" else counts.global_batch_size if per_sequence else counts.batch_num_tokens
    norm = config.loss_scale_factor if config.loss_scale_factor is not None else max(values.shape[-1], 1)
    tokens = values.shape[-1] if per_sequence else values.numel()
    numbers = [clip_eps or 0.0, huber_delta, config.scale, float(counts.dp_size), norm,
               count if count is not None and not isinstance(count, Tensor) else 0.0, tokens]
    settings_tensor = _settings_tensor(numbers, dtype, device)
    if isinstance(count, Tensor):  # never read on the host: joined to the settings on the device
        count = count.to(device=device, dtype=dtype, non_blocking=True).reshape(1)
        settings_tensor = torch.cat([settings_tensor[:_COUNT], count, settings_tensor[_COUNT + 1:]])
    mask_kind = _mask_kind(action_mask)
    mask_sums = None
    if mask_kind == "weights" and (per_sequence or (mode == "token-mean" and count is None)):
        # an integer or float mask's sums, by the eager path's own function (the same numbers, to the last bit)
        mask_sums = F._mask_sum(action_mask, dtype, dim=-1).unsqueeze(-1) if per_sequence else (
            F._mask_sum(action_mask, dtype))
    want_grad = values.requires_grad and torch.is_grad_enabled()
    plan = _Plan(variant, loss_type, clip_eps is not None, mode, mask_kind, count is not None,
                 torch.int32 if values.numel() <= torch.iinfo(torch.int32).max else torch.int64, want_grad,
                 F.BAND_CLOSED)
    if mask_kind == "bool":
        # As bytes, converted to floats before the comparison: inductor's vectorised CPU loads of bool, and of
        # bytes compared as bytes, go through a scalar buffer (measured on one thread, 4M tokens, a pass that
        # reads three float inputs and the mask and writes one output: 8.9 ms with a bool mask, 10.5 ms with its
        # bytes compared as bytes, 3.9 ms with them converted to float32 first). Counting the bytes in int32
        # is fast (0.2 ms).
        action_mask = action_mask.view(torch.uint8)
    args = (values, old_values, returns, action_mask, mask_sums, settings_tensor, plan)
    if not want_grad:
        return _run(values, args[:-1], plan)[0]
    return FusedValueLoss.apply(*args)[0]
