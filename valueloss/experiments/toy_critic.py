"""A toy critic: an MLP regressing fixed targets in "PPO iterations", to isolate value clipping.

In PPO the critic is fitted to a batch of returns for a few epochs, after which the batch is replaced and the
old values are refreshed. Here the inputs and targets are fixed, so the only thing that changes between
iterations is ``old_values``: the clip band ``|values - old_values| <= clip_eps`` of :class:`valueloss.ValueLoss`
removes a sample's own pull once its prediction has moved past the band towards its target. (It does not bound
how far the prediction moves: the network's shared weights and the optimiser's step size carry predictions far
past the band, see :mod:`valueloss.lessons.escape`.) Because ``clip_eps`` is in the units of the returns, a
fixed ``clip_eps = 0.2`` is loose for returns of spread 1 and a heavy brake for returns of spread 100
(Andrychowicz et al. 2021, "What matters in on-policy RL?", decision C13; Stable-Baselines3 documents
``clip_range_vf`` as "depends on the reward scaling"). Notebook 05 measures it.

The targets are ``scale * z`` with ``z`` a fixed smooth random function of Gaussian inputs, standardised to
mean 0 and standard deviation 1, so that ``scale`` is exactly the spread of the returns.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .._threads import single_thread
from ..diagnostics import diagnose
from ..loss import ValueLoss

__all__ = ["ToyCriticConfig", "make_toy_problem", "run_toy_critic", "iterations_to_reach"]


@dataclass(frozen=True)
class ToyCriticConfig:
    """Settings of :func:`run_toy_critic`.

    Args:
        scale: the standard deviation of the targets ("returns"), > 0.
        clip_eps: ``None`` (no value clipping) or the clip range, in the units the critic is trained in.
        normalize_returns: train the critic on ``returns / scale`` (so ``clip_eps`` is relative to the spread)
            and report its predictions times ``scale``.
        learning_rate: Adam's step size.
        num_iterations: PPO iterations (refreshes of ``old_values``).
        update_epochs: passes over the data per iteration.
        num_minibatches: minibatches per pass.
        num_samples: the fixed batch of (input, return) pairs.
        input_dim, hidden: the inputs' dimension and the width of the two tanh hidden layers.
        seed: seeds the problem (inputs, targets), the network's initialisation and the minibatch order.
    """

    scale: float = 1.0
    clip_eps: float | None = None
    normalize_returns: bool = False
    learning_rate: float = 3e-2
    num_iterations: int = 60
    update_epochs: int = 10
    num_minibatches: int = 2
    num_samples: int = 256
    input_dim: int = 1
    hidden: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a finite number > 0; got {self.scale!r}")
        if self.clip_eps is not None and not (math.isfinite(self.clip_eps) and self.clip_eps >= 0):
            raise ValueError(f"clip_eps must be None or a finite number >= 0; got {self.clip_eps!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0; got {self.learning_rate!r}")
        for name in ("num_iterations", "update_epochs", "num_minibatches", "num_samples", "input_dim", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if self.num_samples % self.num_minibatches:
            raise ValueError(f"num_samples must be divisible by num_minibatches; got {self.num_samples} and "
                             f"{self.num_minibatches}")

    def replace(self, **changes) -> ToyCriticConfig:
        return dataclasses.replace(self, **changes)


def make_toy_problem(num_samples: int, input_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(num_samples, input_dim)`` ~ N(0, 1) and unit targets ``(num_samples,)`` (mean 0, std 1).

    The targets are a random two-layer function ``sin(x W1) w2`` of the inputs, standardised exactly.
    """
    generator = torch.Generator().manual_seed(10_000 + seed)
    inputs = torch.randn(num_samples, input_dim, generator=generator)
    w1 = torch.randn(input_dim, 4, generator=generator)
    w2 = torch.randn(4, generator=generator)
    targets = torch.sin(inputs @ w1) @ w2
    return inputs, (targets - targets.mean()) / targets.std(correction=0)


def run_toy_critic(config: ToyCriticConfig = ToyCriticConfig(), *,
                   keep_values: bool = False) -> dict[str, np.ndarray]:
    """Fit the toy critic; return per-iteration curves (index 0 = before training).

    Each iteration: ``old_values`` = the critic's current predictions; ``update_epochs`` passes of minibatch
    Adam on ``ValueLoss(clip_eps)(values, old_values, returns)``; then the diagnostics of the whole batch.

    Args:
        config: the settings.
        keep_values: also return every sample's prediction after each iteration (see Returns), so that a
            caller can see how far each prediction moved; off by default (it adds ``num_iterations + 1``
            rows of ``num_samples`` numbers).

    Returns:
        ``relative_error``: ``||values - returns|| / ||returns - mean(returns)||`` (0 = perfect, 1 = as good as
        predicting the mean), ``explained_variance``, and ``clip_fraction``: after the iteration's updates, the
        share of samples whose value gradient is zero because of clipping (from :func:`valueloss.diagnose`;
        0 at index 0). Arrays of length ``num_iterations + 1``, float64.
        With ``keep_values=True`` also ``values``: ``(num_iterations + 1, num_samples)``, the predictions in
        the units of the returns after each iteration (row 0 = before training; row ``k - 1`` holds the old
        values of iteration ``k``), and ``returns``: ``(num_samples,)``. Both float64.
    """
    if not isinstance(config, ToyCriticConfig):
        raise TypeError(f"config must be a ToyCriticConfig; got {type(config).__name__}")
    with single_thread():  # the same digits on every machine
        return _fit(config, keep_values=bool(keep_values))


def _fit(config: ToyCriticConfig, *, keep_values: bool = False) -> dict[str, np.ndarray]:
    inputs, unit_targets = make_toy_problem(config.num_samples, config.input_dim, config.seed)
    returns = unit_targets * config.scale
    train_scale = config.scale if config.normalize_returns else 1.0  # critic units -> return units
    train_returns = returns / train_scale

    torch.manual_seed(config.seed)
    critic = nn.Sequential(
        nn.Linear(config.input_dim, config.hidden), nn.Tanh(),
        nn.Linear(config.hidden, config.hidden), nn.Tanh(),
        nn.Linear(config.hidden, 1),
    )
    optimizer = torch.optim.Adam(critic.parameters(), lr=config.learning_rate)
    loss_fn = ValueLoss(clip_eps=config.clip_eps)
    order_generator = torch.Generator().manual_seed(config.seed)
    minibatch_size = config.num_samples // config.num_minibatches

    def predict() -> torch.Tensor:
        with torch.no_grad():
            return critic(inputs).squeeze(-1)

    def record(values: torch.Tensor, old_values: torch.Tensor) -> None:
        values_in_return_units = values * train_scale
        stats = diagnose(values_in_return_units, old_values * train_scale, returns,
                         clip_eps=None if config.clip_eps is None else config.clip_eps * train_scale)
        error = (values_in_return_units - returns).norm() / (returns - returns.mean()).norm()
        curves["relative_error"].append(error.item())
        curves["explained_variance"].append(stats.explained_variance.item())
        curves["clip_fraction"].append(stats.clip_fraction.item())
        if keep_values:
            kept_values.append(values_in_return_units.double().numpy())

    kept_values: list[np.ndarray] = []
    curves: dict[str, list[float]] = {"relative_error": [], "explained_variance": [], "clip_fraction": []}
    values = predict()
    record(values, values)
    for _ in range(config.num_iterations):
        old_values = values
        for _ in range(config.update_epochs):
            permutation = torch.randperm(config.num_samples, generator=order_generator)
            for start in range(0, config.num_samples, minibatch_size):
                mb = permutation[start : start + minibatch_size]
                loss = loss_fn(critic(inputs[mb]).squeeze(-1), old_values[mb], train_returns[mb])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        values = predict()
        record(values, old_values)
    result = {key: np.asarray(curve) for key, curve in curves.items()}
    if keep_values:
        result["values"] = np.stack(kept_values)
        result["returns"] = returns.double().numpy()
    return result


def iterations_to_reach(relative_error, threshold: float = 0.05) -> int | None:
    """The first iteration at which ``relative_error <= threshold``; ``None`` if it never gets there.

    Example:
        >>> iterations_to_reach([1.0, 0.5, 0.04, 0.06], threshold=0.05)
        2
    """
    errors = np.asarray(relative_error, dtype=np.float64)
    if errors.ndim != 1:
        raise ValueError(f"relative_error must be 1-D; got shape {errors.shape}")
    hits = np.flatnonzero(errors <= threshold)
    return int(hits[0]) if hits.size else None
