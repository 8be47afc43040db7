"""Global token and sequence counts for data parallelism and gradient accumulation.

Every aggregation mode except ``token-sum`` divides by a count: the number of unmasked tokens
(``token-mean``) or of non-empty sequences (the ``seq-mean-*`` modes). When one optimizer step
sees the batch as ``W`` data-parallel shards of ``k`` micro-batches each, a count taken per
micro-batch (or per rank) is the wrong divisor: tokens of a micro-batch with few tokens weigh
more than tokens of a full one, and the critic's effective learning rate changes from step to
step. The exact recipe (verl ``verl/trainer/ppo/core_algos.py::agg_loss(..., dp_size,
batch_num_tokens, global_batch_size, loss_scale_factor)``, called with ``config.global_batch_info``;
OpenRLHF ``openrlhf/models/loss.py::ValueLoss.forward(..., dp_size, batch_num_tokens,
global_batch_size)``; checked 2026-11-25):

1. before the first micro-batch of a step, count tokens and non-empty sequences over all
   micro-batches of the step on all ranks (:func:`global_counts`: one ``all_reduce`` of a
   5-element tensor);
2. compute each micro-batch's loss with those global counts and ``dp_size = W``
   (:meth:`GlobalCounts.forward_kwargs`);
3. call ``backward`` on each micro-batch loss *without* dividing it by ``k`` (gradients add up
   over the window) and let DDP/FSDP average over the ``W`` ranks.

The gradient is then exactly the full-batch gradient: ``(1/W) * sum_r sum_j sum(m L)_rj / N * W
= sum(m L) / N``. If the trainer divides every micro-batch loss by ``k`` (Hugging Face
``Trainer``/``Accelerate`` with ``gradient_accumulation_steps=k``), pass
``accumulation_divisor=k``: ``dp_size`` becomes ``W * k`` and undoes that division too.

:func:`valueloss.lessons.data_parallel.compare_normalisations` replays the whole split in one process and
reports how far the usual shortcuts (a mean per micro-batch, counts per rank) are from the full-batch loss.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import functional as F
from ._validate import check_choice

__all__ = [
    "GlobalCounts",
    "forward_kwargs",
    "global_counts",
    "local_counts",
]

# Modes that need each count when dp_size > 1 (mirrors functional._counts).
_NEEDS_TOKENS = ("token-mean",)
_NEEDS_SEQUENCES = ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

MaskWindow = Tensor | Sequence[Tensor]


# --------------------------------------------------------------------------- counting


def _as_window(action_masks: MaskWindow) -> list:
    if isinstance(action_masks, Tensor):
        action_masks = [action_masks]
    if isinstance(action_masks, (str, bytes)) or not isinstance(action_masks, Sequence):
        raise TypeError(
            "action_masks must be a tensor or a sequence of tensors (one per micro-batch); "
            f"got {type(action_masks).__name__}"
        )
    if len(action_masks) == 0:
        raise ValueError("action_masks must hold at least one micro-batch mask; got an empty sequence")
    for i, mask in enumerate(action_masks):
        if not isinstance(mask, Tensor):
            raise TypeError(f"action_masks[{i}] must be a torch.Tensor; got {type(mask).__name__}")
        if mask.dim() < 1:
            raise ValueError(f"action_masks[{i}] must have a token dimension (..., T); got a 0-dim tensor")
        if mask.is_complex():
            raise TypeError(f"action_masks[{i}] must be a bool, integer or floating-point tensor; got {mask.dtype}")
        if mask.device != action_masks[0].device:
            raise ValueError(
                f"all action_masks must be on one device; got {action_masks[0].device} and {mask.device} (index {i})"
            )
    return list(action_masks)


def _count_dtype(device: torch.device) -> torch.dtype:
    # float64 counts are exact up to 2**53 tokens; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _local_stats(action_masks: MaskWindow) -> Tensor:
    """``[tokens, non-empty sequences, micro-batches, sum T, sum T**2]`` over this process's window.

    The last three let every rank check, after one sum-all-reduce, whether all micro-batches share
    one padded length ``T`` (``n * sum T**2 == (sum T)**2`` exactly when all are equal).
    """
    masks = _as_window(action_masks)
    device = masks[0].device
    dtype = _count_dtype(device)
    stats = torch.zeros(5, dtype=dtype, device=device)
    for mask in masks:
        weights = mask.to(dtype)
        row_counts = weights.sum(dim=-1)
        length = float(mask.shape[-1])
        stats = stats + torch.stack(
            [
                weights.sum(),
                (row_counts > 0).to(dtype).sum(),
                torch.ones((), dtype=dtype, device=device),
                torch.full((), length, dtype=dtype, device=device),
                torch.full((), length * length, dtype=dtype, device=device),
            ]
        )
    return stats


@dataclass(frozen=True)
class GlobalCounts:
    """Counts over one optimizer step (all micro-batches of the accumulation window, all ranks).

    Build it with :func:`global_counts` (data parallel) or :func:`local_counts` (one process);
    pass :meth:`forward_kwargs` to :meth:`valueloss.ValueLoss.forward`.

    Attributes:
        num_tokens: 0-dim tensor, the number of unmasked tokens (the sum of the masks).
        num_sequences: 0-dim tensor, the number of sequences with at least one unmasked token.
        dp_size: the number of data-parallel ranks whose gradients DDP/FSDP average.
        length_moments: 0-dim tensors ``(micro-batches, sum of T, sum of T**2)`` of the padded
            lengths ``T``; used only to check ``seq-mean-token-sum-norm``'s default divisor.
    """

    num_tokens: Tensor
    num_sequences: Tensor
    dp_size: int = 1
    length_moments: tuple = field(default=(), repr=False)

    def __post_init__(self) -> None:
        for name in ("num_tokens", "num_sequences"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise TypeError(f"{name} must be a one-element tensor; got {type(value).__name__}")
        if isinstance(self.dp_size, bool) or not isinstance(self.dp_size, numbers.Integral) or self.dp_size < 1:
            raise ValueError(f"dp_size must be a positive integer; got {self.dp_size!r}")

    def seq_len(self) -> int | None:
        """The padded length ``T`` shared by every micro-batch, or None if they differ or are unknown.

        Reads three numbers on the host (a synchronisation on GPUs); only
        ``seq-mean-token-sum-norm`` without a fixed ``loss_scale_factor`` needs it.
        """
        if len(self.length_moments) != 3:
            return None
        n, total, total_sq = (float(t) for t in self.length_moments)
        if n <= 0 or n * total_sq != total * total:
            return None
        return int(round(total / n))

    def forward_kwargs(
        self,
        mode: str | torch.nn.Module = "token-mean",
        *,
        loss_scale_factor: float | None = None,
        accumulation_divisor: int = 1,
        dtype: torch.dtype | None = None,
    ) -> dict:
        """Keyword arguments ``dp_size``, ``batch_num_tokens``, ``global_batch_size`` for ``ValueLoss.forward``.

        Only the counts the mode divides by are returned: ``token-mean`` gets ``batch_num_tokens``,
        the ``seq-mean-*`` modes get ``global_batch_size``, ``token-sum`` gets only ``dp_size``.

        Args:
            mode: an aggregation mode, or a :class:`valueloss.ValueLoss` (its ``loss_agg_mode`` and
                ``loss_scale_factor`` are used).
            loss_scale_factor: the divisor of ``seq-mean-token-sum-norm`` (when ``mode`` is a string).
                Left at None, each micro-batch divides by its own padded length ``T``, which equals the
                full-batch divisor only if every micro-batch has the same ``T``; otherwise this raises.
            accumulation_divisor: what the trainer divides each micro-batch loss by before
                ``backward`` (``gradient_accumulation_steps`` in HF Trainer/Accelerate); 1 if the
                micro-batch losses are summed. Multiplies ``dp_size``.
            dtype: cast the counts to this dtype (e.g. ``values.dtype``; by default they stay float64,
                which promotes a float32 loss to float64).
        """
        mode, loss_scale_factor = _mode_of(mode, loss_scale_factor)
        kwargs: dict = {"dp_size": self.dp_size * _check_divisor(accumulation_divisor)}
        if mode in _NEEDS_TOKENS:
            kwargs["batch_num_tokens"] = self.num_tokens if dtype is None else self.num_tokens.to(dtype)
        if mode in _NEEDS_SEQUENCES:
            kwargs["global_batch_size"] = self.num_sequences if dtype is None else self.num_sequences.to(dtype)
        if mode == "seq-mean-token-sum-norm" and loss_scale_factor is None and self.seq_len() is None:
            raise ValueError(
                "mode='seq-mean-token-sum-norm' divides each micro-batch by its own padded length T unless "
                "loss_scale_factor is set, and the micro-batches of this step have different T; "
                "set loss_scale_factor (e.g. the maximum response length) on ValueLoss"
            )
        return kwargs


def _check_divisor(accumulation_divisor: object) -> int:
    if isinstance(accumulation_divisor, bool) or not isinstance(accumulation_divisor, numbers.Integral) or (
        accumulation_divisor < 1
    ):
        raise ValueError(f"accumulation_divisor must be a positive integer; got {accumulation_divisor!r}")
    return int(accumulation_divisor)


def _mode_of(mode, loss_scale_factor):
    if isinstance(mode, torch.nn.Module):
        config = getattr(mode, "config", None)
        if not isinstance(config, F.LossConfig):
            raise TypeError(f"mode must be an aggregation mode or a ValueLoss; got {type(mode).__name__}")
        if loss_scale_factor is None:
            loss_scale_factor = config.loss_scale_factor
        mode = config.mode
    check_choice(mode, F.AGGREGATION_MODES, "mode")
    return mode, loss_scale_factor


def _from_stats(stats: Tensor, dp_size: int) -> GlobalCounts:
    return GlobalCounts(stats[0], stats[1], dp_size, (stats[2], stats[3], stats[4]))


def local_counts(action_masks: MaskWindow) -> GlobalCounts:
    """Counts over the micro-batches of one process's accumulation window, no communication.

    Exact for gradient accumulation on a single process (``dp_size=1``). Under data parallelism
    use :func:`global_counts`.

    Example:
        >>> import torch
        >>> from valueloss.distributed import local_counts
        >>> window = [torch.tensor([[1, 1, 0], [0, 0, 0]]), torch.tensor([[1, 1, 1]])]
        >>> counts = local_counts(window)
        >>> int(counts.num_tokens), int(counts.num_sequences), counts.dp_size
        (5, 2, 1)
    """
    return _from_stats(_local_stats(action_masks), 1)


def _world_size(group) -> int:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        return 1
    return dist.get_world_size(group)


def global_counts(action_masks: MaskWindow, *, group=None) -> GlobalCounts:
    """Counts over this rank's accumulation window summed over all ranks of ``group``.

    One ``all_reduce`` (sum) of a 5-element tensor on the masks' device; nothing is read on the
    host. Without an initialised ``torch.distributed`` this equals :func:`local_counts`. Every
    rank of the group must call it (it is a collective), with the masks of all its micro-batches
    for the coming optimizer step.

    Args:
        action_masks: this rank's ``(B_j, T_j)`` mask of each micro-batch (a tensor for one).
        group: the data-parallel process group (default: the world). Under FSDP/HSDP, the group
            over which gradients are averaged.

    Returns:
        :class:`GlobalCounts` with ``dp_size`` = the group's size.
    """
    stats = _local_stats(action_masks)
    world = _world_size(group)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    return _from_stats(stats, world)


def forward_kwargs(
    loss_fn: str | torch.nn.Module,
    counts: GlobalCounts | None = None,
    *,
    group=None,
    accumulation_divisor: int = 1,
    dtype: torch.dtype | None = None,
) -> dict:
    """The ``ValueLoss.forward`` keywords for this process, checked against the process group.

    With ``counts``: :meth:`GlobalCounts.forward_kwargs`, after checking that ``counts.dp_size``
    is the group's size. Without: valid only where the local count is the right one (a single
    process without accumulation) or no count is needed (``token-sum``; then ``dp_size`` = the
    group's size times ``accumulation_divisor``); otherwise raises ``ValueError`` naming the fix,
    instead of letting each rank or micro-batch divide by its own count.

    Example:
        >>> from valueloss import ValueLoss
        >>> from valueloss.distributed import forward_kwargs
        >>> forward_kwargs(ValueLoss(0.2))  # one process, one micro-batch: the local count is global
        {'dp_size': 1}
    """
    mode, _ = _mode_of(loss_fn, None)
    accumulation_divisor = _check_divisor(accumulation_divisor)
    world = _world_size(group)
    if counts is None:
        if mode != "token-sum" and world > 1:
            raise ValueError(
                f"mode={mode!r} divides by a global count, but the process group has {world} ranks and "
                "no counts were given; compute them once per optimizer step with "
                "valueloss.distributed.global_counts(<masks of all micro-batches>)"
            )
        if mode != "token-sum" and accumulation_divisor > 1:
            raise ValueError(
                f"mode={mode!r} divides by a count over the whole accumulation window, but "
                f"accumulation_divisor={accumulation_divisor} and no counts were given; "
                "pass counts=local_counts(<masks of all micro-batches>)"
            )
        return {"dp_size": world * accumulation_divisor}
    if not isinstance(counts, GlobalCounts):
        raise TypeError(f"counts must be a GlobalCounts or None; got {type(counts).__name__}")
    if counts.dp_size != world:
        raise ValueError(
            f"counts were summed over {counts.dp_size} rank(s) but the process group has {world}; "
            "use global_counts(..., group=<the data-parallel group>)"
        )
    return counts.forward_kwargs(loss_fn, accumulation_divisor=accumulation_divisor, dtype=dtype)
