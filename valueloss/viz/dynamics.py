"""Small simulations that show what value clipping does over many steps.

Two helpers that the notebooks and :mod:`valueloss.viz.plotting` share, so that no notebook defines
its own simulation:

* :func:`simulate_descent` runs plain gradient descent on a single predicted value, with or
  without clipping, refreshing the old value every ``refresh_every`` steps (one PPO iteration =
  ``refresh_every`` optimiser steps on the same rollout). It shows the clipped update stalling at
  the band edge ``old_value + clip_eps`` until the old value is refreshed.
* :func:`synthetic_batch` draws a reproducible ``(B, T)`` batch of critic predictions, old
  predictions, returns and a response mask, shaped like the batch a critic sees after a few
  optimiser steps of one PPO iteration.

All math comes from :mod:`valueloss.functional`; this module only loops and samples.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import functional as F

__all__ = ["DescentPath", "simulate_descent", "synthetic_batch"]


@dataclass(frozen=True)
class DescentPath:
    """One gradient-descent run on a single value; float64 tensors indexed by step.

    ``values[k]`` and ``old_values[k]`` are the prediction and the old prediction *before* step
    ``k`` (``k = 0..steps``, so both have ``steps + 1`` entries); ``grads[k]`` is the gradient used
    at step ``k`` (``steps`` entries) and ``regions[k]`` the :class:`~valueloss.Region` code there.
    """

    values: Tensor
    old_values: Tensor
    grads: Tensor
    regions: Tensor
    return_: float
    clip_eps: float | None
    lr: float
    refresh_every: int

    @property
    def steps(self) -> int:
        """Number of optimiser steps taken."""
        return int(self.grads.numel())

    @property
    def stalled(self) -> Tensor:
        """Boolean per step: the gradient was exactly zero (clipping switched the update off)."""
        return self.grads == 0


def _check_real(x: object, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(x).__name__}")
    value = float(x)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite; got {x!r}")
    return value


def _check_int(x: object, name: str, minimum: int) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {x!r}")
    return int(x)


def simulate_descent(
    value: float = 0.0,
    return_: float = 1.0,
    *,
    clip_eps: float | None = 0.2,
    lr: float = 0.1,
    steps: int = 60,
    refresh_every: int = 10,
    variant: str = "max",
    loss_type: str = "squared",
    huber_delta: float = 1.0,
    scale: float = 0.5,
) -> DescentPath:
    """Gradient descent on one predicted value against a fixed return.

    At step ``k`` the value moves by ``-lr * scale * d loss / d value`` (the closed-form gradient
    :func:`valueloss.functional.elementwise_value_loss_grad`); before steps ``0, refresh_every,
    2 * refresh_every, ...`` the old value is set to the current value, as a new PPO iteration
    would (the critic's predictions on the fresh rollout become ``old_values``).

    Args:
        value: the starting prediction (also the first old value).
        return_: the target return ``R``.
        clip_eps: clip range; ``None`` gives plain (unclipped) regression.
        lr: step size (> 0).
        steps: number of optimiser steps (>= 0).
        refresh_every: optimiser steps per PPO iteration (>= 1).
        variant, loss_type, huber_delta: as for :class:`valueloss.ValueLoss`.
        scale: the factor in front of the loss (0.5 as in OpenRLHF).

    Returns:
        A :class:`DescentPath`.

    Example:
        >>> path = simulate_descent(0.0, 1.0, clip_eps=0.2, lr=0.5, steps=4, refresh_every=4)
        >>> [round(v, 4) for v in path.values.tolist()]
        [0.0, 0.5, 0.5, 0.5, 0.5]
    """
    value = _check_real(value, "value")
    return_ = _check_real(return_, "return_")
    clip_eps = F.check_clip_eps(clip_eps)
    lr = _check_real(lr, "lr")
    if lr <= 0:
        raise ValueError(f"lr must be positive; got {lr!r}")
    steps = _check_int(steps, "steps", 0)
    refresh_every = _check_int(refresh_every, "refresh_every", 1)
    scale = _check_real(scale, "scale")

    kwargs = dict(clip_eps=clip_eps, variant=variant, loss_type=loss_type, huber_delta=huber_delta)
    ret = torch.tensor([return_], dtype=torch.float64)
    v = torch.tensor([value], dtype=torch.float64)
    old = v.clone()
    values, old_values, grads, regions = [value], [value], [], []
    for k in range(steps):
        if k % refresh_every == 0:
            old = v.clone()
        old_values[-1] = float(old)
        grad = scale * F.elementwise_value_loss_grad(v, old, ret, **kwargs)
        regions.append(int(F.clip_regions(v, old, ret, **kwargs)))
        grads.append(float(grad))
        v = v - lr * grad
        values.append(float(v))
        old_values.append(float(old))
    if steps % refresh_every == 0 and steps > 0:
        old_values[-1] = values[-1]  # the next iteration would start from the current value
    return DescentPath(
        values=torch.tensor(values, dtype=torch.float64),
        old_values=torch.tensor(old_values, dtype=torch.float64),
        grads=torch.tensor(grads, dtype=torch.float64),
        regions=torch.tensor(regions, dtype=torch.uint8),
        return_=return_,
        clip_eps=clip_eps,
        lr=lr,
        refresh_every=refresh_every,
    )


def synthetic_batch(
    batch_size: int = 64,
    seq_len: int = 128,
    *,
    critic_error: float = 0.5,
    progress: float = 0.3,
    step_noise: float = 0.1,
    min_len: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """A reproducible batch like the one a critic sees a few optimiser steps into a PPO iteration.

    The model (synthetic, not measured): per-token returns are a per-sequence reward level plus
    a random walk along the response; the old predictions miss them by Gaussian noise of standard
    deviation ``critic_error``; the current predictions have moved a fraction ``progress`` of the
    way from the old predictions towards the returns, plus Gaussian noise of ``step_noise``.
    Response lengths are uniform in ``[min_len, seq_len]``, padded on the right.

    Returns:
        dict with ``values``, ``old_values``, ``returns`` (``(B, T)``, ``dtype``) and
        ``action_mask`` (``(B, T)`` bool).

    Example:
        >>> batch = synthetic_batch(4, 16, seed=1)
        >>> sorted(batch), tuple(batch["values"].shape), batch["action_mask"].dtype
        (['action_mask', 'old_values', 'returns', 'values'], (4, 16), torch.bool)
    """
    batch_size = _check_int(batch_size, "batch_size", 1)
    seq_len = _check_int(seq_len, "seq_len", 1)
    min_len = _check_int(min_len, "min_len", 1)
    if min_len > seq_len:
        raise ValueError(f"min_len must be <= seq_len; got {min_len} and {seq_len}")
    critic_error = _check_real(critic_error, "critic_error")
    progress = _check_real(progress, "progress")
    step_noise = _check_real(step_noise, "step_noise")
    gen = torch.Generator().manual_seed(int(seed))
    level = torch.randn(batch_size, 1, generator=gen, dtype=torch.float64)
    walk = torch.cumsum(0.05 * torch.randn(batch_size, seq_len, generator=gen, dtype=torch.float64), dim=1)
    returns = level + walk
    old_values = returns + critic_error * torch.randn(batch_size, seq_len, generator=gen, dtype=torch.float64)
    values = (
        old_values
        + progress * (returns - old_values)
        + step_noise * torch.randn(batch_size, seq_len, generator=gen, dtype=torch.float64)
    )
    lengths = torch.randint(min_len, seq_len + 1, (batch_size, 1), generator=gen)
    action_mask = torch.arange(seq_len).unsqueeze(0) < lengths
    return {
        "values": values.to(dtype),
        "old_values": old_values.to(dtype),
        "returns": returns.to(dtype),
        "action_mask": action_mask,
    }
