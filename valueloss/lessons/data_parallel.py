"""Data parallelism replayed in one process: how far the usual normalisation shortcuts are from the full batch.

The teaching half of :mod:`valueloss.distributed` (notebook 09): :func:`split_batch` cuts a batch the way
ranks and micro-batches see it, and :func:`compare_normalisations` measures the error of a mean per
micro-batch or counts per rank against the exact global counts.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import functional as F
from .._validate import check_choice
from ..distributed import GlobalCounts, local_counts

__all__ = ["NORMALISATIONS", "NormalisationComparison", "compare_normalisations", "split_batch"]

NORMALISATIONS = ("per-micro-batch", "per-rank", "global")
"""The normalisation choices compared by :func:`compare_normalisations`.

* ``"per-micro-batch"``: each micro-batch uses its own counts and the loss is divided by the
  number of accumulation steps (the usual "mean of means");
* ``"per-rank"``: each rank counts over its own accumulation window, but not over the other ranks;
* ``"global"``: counts over the whole window on all ranks, ``dp_size`` = number of ranks (exact).
"""

def split_batch(tensor: Tensor, num_shards: int, num_micro_batches: int = 1) -> list:
    """Split the rows of a ``(B, ...)`` batch into ``num_shards`` ranks of ``num_micro_batches`` each.

    Contiguous rows, as a distributed sampler without shuffling would; sizes differ by at most
    one row (``torch.tensor_split``). Returns ``[[micro-batch, ...] per rank]`` of views.

    Example:
        >>> import torch
        >>> from valueloss.lessons.data_parallel import split_batch
        >>> [[mb.tolist() for mb in shard] for shard in split_batch(torch.arange(5), 2, 2)]
        [[[0, 1], [2]], [[3], [4]]]
    """
    for name, value in (("num_shards", num_shards), ("num_micro_batches", num_micro_batches)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if not isinstance(tensor, Tensor) or tensor.dim() < 1:
        raise ValueError("tensor must be a tensor with a batch dimension")
    if tensor.shape[0] < num_shards * num_micro_batches:
        raise ValueError(
            f"a batch of {tensor.shape[0]} rows cannot be split into {num_shards} shards x "
            f"{num_micro_batches} micro-batches (needs at least {num_shards * num_micro_batches} rows)"
        )
    return [list(torch.tensor_split(shard, num_micro_batches)) for shard in torch.tensor_split(tensor, num_shards)]


@dataclass(frozen=True)
class NormalisationComparison:
    """Result of :func:`compare_normalisations`; losses and relative errors as Python floats.

    Attributes:
        mode, num_shards, num_micro_batches: the setting compared.
        full_loss: the loss of the whole batch in one piece.
        losses: per choice in :data:`NORMALISATIONS`, the loss the optimizer effectively minimises
            (after the trainer's division by the accumulation steps and DDP's average over ranks).
        loss_errors: ``|loss - full_loss| / |full_loss|`` (absolute if ``full_loss`` is 0).
        grad_errors: ``||g - g_full|| / ||g_full||`` of the gradient with respect to ``values``.
        grads: the gradient with respect to ``values`` per choice, plus ``"full"``.
    """

    mode: str
    num_shards: int
    num_micro_batches: int
    full_loss: float
    losses: dict
    loss_errors: dict
    grad_errors: dict
    grads: dict = field(repr=False)


def _relative(error: float, reference: float) -> float:
    return error / abs(reference) if reference != 0 else error


def compare_normalisations(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    action_mask: Tensor,
    *,
    num_shards: int = 2,
    num_micro_batches: int = 2,
    mode: str = "token-mean",
    clip_eps: float | None = 0.2,
    loss_scale_factor: float | None = None,
    **loss_kwargs,
) -> NormalisationComparison:
    """Replay data parallelism and gradient accumulation in one process and compare normalisations.

    The ``(B, T)`` batch is cut with :func:`split_batch` into ``num_shards`` ranks of
    ``num_micro_batches`` micro-batches. For each choice in :data:`NORMALISATIONS` the loss of every
    micro-batch is computed with :func:`valueloss.functional.value_loss`, combined the way a trainer
    and DDP combine gradients (sum over the window, or its mean for ``"per-micro-batch"``; mean over
    ranks), and differentiated with respect to ``values``. ``loss_kwargs`` go to ``value_loss``
    (``variant``, ``loss_type``, ``huber_delta``, ``scale``).

    Example:
        >>> import torch
        >>> from valueloss.lessons.data_parallel import compare_normalisations
        >>> values, old_values, returns = torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(4, 3)
        >>> mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 1, 1]])
        >>> result = compare_normalisations(values, old_values, returns, mask, num_shards=2, num_micro_batches=1)
        >>> round(result.full_loss, 6), round(result.losses["global"], 6)
        (0.5, 0.5)
        >>> round(result.grad_errors["per-rank"], 4)  # rank 0 has 4 tokens, rank 1 has 6
        0.2041
    """
    check_choice(mode, F.AGGREGATION_MODES, "mode")
    if not isinstance(action_mask, Tensor):
        raise TypeError(f"action_mask must be a torch.Tensor; got {type(action_mask).__name__}")
    if values.dim() != 2:
        raise ValueError(f"values must be a (B, T) batch; got shape {tuple(values.shape)}")
    common = dict(clip_eps=clip_eps, mode=mode, loss_scale_factor=loss_scale_factor, **loss_kwargs)
    leaf = values.detach().clone().requires_grad_(True)

    full = F.value_loss(leaf, old_values, returns, action_mask, **common)
    (grad_full,) = torch.autograd.grad(full, leaf)

    pieces = [split_batch(t, num_shards, num_micro_batches) for t in (leaf, old_values, returns, action_mask)]
    shards = [list(zip(*(p[r] for p in pieces), strict=True)) for r in range(num_shards)]
    everything = local_counts([mb[3] for shard in shards for mb in shard])
    dtype = F._compute_dtype(leaf, old_values, returns)

    losses, grads = {}, {"full": grad_full}
    for choice in NORMALISATIONS:
        total = leaf.new_zeros(())
        for shard in shards:
            rank_counts = local_counts([mb[3] for mb in shard])
            for v, ov, ret, m in shard:
                if choice == "per-micro-batch":
                    loss = F.value_loss(v, ov, ret, m, **common) / num_micro_batches
                elif choice == "per-rank":
                    loss = F.value_loss(v, ov, ret, m, **common, **_counts_kwargs(rank_counts, 1, dtype))
                else:
                    loss = F.value_loss(v, ov, ret, m, **common, **_counts_kwargs(everything, num_shards, dtype))
                total = total + loss / num_shards  # DDP averages gradients over ranks
        (grad,) = torch.autograd.grad(total, leaf)
        losses[choice], grads[choice] = float(total.detach()), grad

    full_loss = float(full.detach())
    grad_norm = float(grad_full.norm())
    return NormalisationComparison(
        mode=mode,
        num_shards=num_shards,
        num_micro_batches=num_micro_batches,
        full_loss=full_loss,
        losses=losses,
        loss_errors={c: _relative(abs(losses[c] - full_loss), full_loss) for c in NORMALISATIONS},
        grad_errors={c: _relative(float((grads[c] - grad_full).norm()), grad_norm) for c in NORMALISATIONS},
        grads=grads,
    )


def _counts_kwargs(counts: GlobalCounts, dp_size: int, dtype: torch.dtype) -> dict:
    """Both counts (every mode ignores the one it does not need) with an explicit ``dp_size``."""
    return {
        "dp_size": dp_size,
        "batch_num_tokens": counts.num_tokens.to(dtype),
        "global_batch_size": counts.num_sequences.to(dtype),
    }
