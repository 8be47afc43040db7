"""The synthetic batch shipped as the notebooks' sample (``notebooks/data/sample_batch.npz``).

``tests/test_batch.py`` checks that the shipped file holds exactly ``synthetic_batch(seed=0)``, bit for bit:
change nothing here that changes the draws or the arithmetic without regenerating that file.
"""

from __future__ import annotations

import numbers

import torch

from .io import Batch

__all__ = ["synthetic_batch"]


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
    Drawn with torch's generator, so the sample stays bit-identical to the one shipped.
    """
    for name, number in (("seed", seed), ("batch_size", batch_size), ("min_len", min_len), ("max_len", max_len)):
        if isinstance(number, bool) or not isinstance(number, numbers.Integral):
            raise TypeError(f"{name} must be an integer; got {type(number).__name__}")
    if batch_size < 1 or min_len < 1 or max_len < min_len:
        raise ValueError(
            "need batch_size >= 1 and 1 <= min_len <= max_len; "
            f"got batch_size={batch_size}, min_len={min_len}, max_len={max_len}"
        )
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
