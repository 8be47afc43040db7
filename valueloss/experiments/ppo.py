"""A compact PPO for gymnasium's CartPole-v1, written to be read top to bottom.

The algorithm follows CleanRL's single-file ``ppo.py`` (vwxyzjn/cleanrl, ``cleanrl/ppo.py``, checked
2026-11-25) and the "37 implementation details of PPO" (Huang et al., ICLR blog track 2022): vectorised
environments, generalised advantage estimation (GAE, Schulman et al. 2016), the clipped policy ratio,
per-minibatch advantage normalisation, one Adam optimiser with a linearly annealed learning rate, gradient
clipping at 0.5, and the value loss from :class:`valueloss.ValueLoss`. The learning step of an iteration is
one function, :func:`ppo_update` (about 40 lines, notebook 06 prints it). Two switches are the subject of
notebook 06:

* ``value_clip_eps``: ``None`` for the plain squared error, a number for ppo2's clipped value loss
  (OpenAI baselines ``ppo2/model.py``; CleanRL's ``clip_vloss``), in the units of the returns;
* ``reward_scaling``: divide every reward by the running standard deviation of the discounted return
  (Engstrom et al. 2020, "Implementation Matters in Deep RL", Section 3 / Algorithm 2; gymnasium's
  ``NormalizeReward`` wrapper), which shrinks CartPole's returns (up to ~100 with gamma=0.99) to O(1-10).

Differences from CleanRL, each for correctness or readability: the transition that ends an episode is
marked on the step where it happens (``episode_ends[t]``), and an episode cut by the time limit (truncated,
not terminated) is bootstrapped with the critic's value of its final observation (Pardo et al. 2018,
"Time limits in RL"). Learning curves use the undiscounted, unscaled episode returns.

Every run is deterministic for a seed (it runs on one torch thread): torch, numpy and the environments are
seeded, and the minibatch order comes from a torch generator seeded from the same seed.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from torch import Tensor, nn
from torch.distributions import Categorical

from .._threads import single_thread
from ..diagnostics import diagnose
from ..loss import ValueLoss

__all__ = [
    "PPOConfig", "RolloutBatch", "RunningMeanStd", "RewardScaler", "compute_gae", "ppo_update", "run_ppo", "CURVE_KEYS"
]

#: Per-iteration quantities returned by :func:`run_ppo` (one entry per PPO iteration).
CURVE_KEYS = (
    "global_step",  # environment steps so far (all envs)
    "episodic_return",  # mean raw return of the last ``return_window`` finished episodes
    "value_loss",  # ValueLoss averaged over the minibatches of the iteration
    "explained_variance",  # of the returns by the critic's rollout values (before the update)
    "value_clip_fraction",  # share of samples whose value gradient was zeroed by value clipping
    "policy_clip_fraction",  # share of samples with |ratio - 1| > clip_coef
    "approx_kl",  # (ratio - 1) - log(ratio), averaged (Schulman's k3 estimator)
    "entropy",  # mean policy entropy
    "return_std",  # standard deviation of the critic's regression targets in the batch
)


@dataclass(frozen=True)
class PPOConfig:
    """Hyper-parameters of :func:`run_ppo`; the defaults are CleanRL's ``ppo.py`` for CartPole-v1.

    Args:
        total_timesteps: environment steps over all envs; rounded down to whole iterations.
        num_envs: parallel environments (a ``SyncVectorEnv``).
        num_steps: steps per env per rollout; the batch is ``num_envs * num_steps``.
        learning_rate: Adam's step size, linearly annealed to 0 when ``anneal_lr``.
        gamma, gae_lambda: discount and GAE's lambda.
        num_minibatches, update_epochs: the batch is split into minibatches, ``update_epochs`` passes.
        clip_coef: the policy ratio's clip range.
        value_clip_eps: ``None`` (no value clipping) or the value clip range, in return units.
        reward_scaling: divide rewards by the running std of the discounted return (Engstrom et al. 2020).
        norm_adv: normalise advantages per minibatch.
        ent_coef, vf_coef: weights of the entropy bonus and of the value loss.
        max_grad_norm: global gradient-norm clip.
        hidden: width of the two tanh hidden layers of the actor and of the critic.
        return_window: finished episodes averaged into ``episodic_return``.
        env_id: a gymnasium id with a discrete action space and a flat observation.
    """

    total_timesteps: int = 100_000
    num_envs: int = 4
    num_steps: int = 128
    learning_rate: float = 2.5e-4
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 4
    clip_coef: float = 0.2
    value_clip_eps: float | None = None
    reward_scaling: bool = False
    norm_adv: bool = True
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    hidden: int = 64
    return_window: int = 10
    env_id: str = "CartPole-v1"

    def __post_init__(self) -> None:
        for name in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if (self.num_envs * self.num_steps) % self.num_minibatches:
            raise ValueError(
                f"num_envs * num_steps must be divisible by num_minibatches; got "
                f"{self.num_envs} * {self.num_steps} and {self.num_minibatches}"
            )
        if self.total_timesteps < self.batch_size:
            raise ValueError(
                f"total_timesteps must be at least one batch (num_envs * num_steps = {self.batch_size}); "
                f"got {self.total_timesteps}"
            )
        if self.value_clip_eps is not None and not (self.value_clip_eps >= 0 and math.isfinite(self.value_clip_eps)):
            raise ValueError(f"value_clip_eps must be None or a finite number >= 0; got {self.value_clip_eps!r}")
        if not 0 < self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ValueError(f"gamma must be in (0, 1] and gae_lambda in [0, 1]; got {self.gamma}, {self.gae_lambda}")

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_iterations(self) -> int:
        return self.total_timesteps // self.batch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------
# Reward scaling: running statistics of the discounted return
# ----------------------------------------------------------------------------------------------------------


class RunningMeanStd:
    """Running mean and variance, merged batch by batch (Chan, Golub & LeVeque 1979, parallel algorithm)."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4  # the tiny prior count avoids dividing by zero

    def update(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch, dtype=np.float64)
        batch_mean, batch_var, batch_count = batch.mean(), batch.var(), batch.size
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.mean = self.mean + delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.var, self.count = m2 / total, total


class RewardScaler:
    """Divide rewards by the running std of each env's discounted return (Engstrom et al. 2020, Alg. 2).

    The discounted return of an env restarts at 0 when its episode ends; the mean is not subtracted
    (subtracting it would change the optimal policy of a survival task like CartPole).
    """

    def __init__(self, num_envs: int, gamma: float, epsilon: float = 1e-8) -> None:
        self.gamma, self.epsilon = gamma, epsilon
        self.discounted_return = np.zeros(num_envs)
        self.stats = RunningMeanStd()

    def __call__(self, rewards: np.ndarray, episode_ends: np.ndarray) -> np.ndarray:
        self.discounted_return = self.discounted_return * self.gamma + rewards
        self.stats.update(self.discounted_return)
        self.discounted_return[episode_ends] = 0.0
        return rewards / math.sqrt(self.stats.var + self.epsilon)


# ----------------------------------------------------------------------------------------------------------
# Generalised advantage estimation
# ----------------------------------------------------------------------------------------------------------


def compute_gae(
    rewards: Tensor, values: Tensor, episode_ends: Tensor, next_values: Tensor, *, gamma: float, gae_lambda: float
) -> tuple[Tensor, Tensor]:
    r"""Advantages and returns by GAE (Schulman et al. 2016, eq. 16), computed backwards in time.

    .. math::
        \delta_t = r_t + \gamma (1 - d_t) V(s_{t+1}) - V(s_t), \qquad
        A_t = \delta_t + \gamma \lambda (1 - d_t) A_{t+1}, \qquad R_t = A_t + V(s_t)

    where :math:`d_t = 1` if the transition at step ``t`` ended the episode.

    Args:
        rewards: ``(T, N)`` rewards of the transitions (time first, one column per env).
        values: ``(T, N)`` critic values of the observations the transitions started from.
        episode_ends: ``(T, N)`` 1.0 where the transition ended the episode (terminated or truncated; a
            truncated episode's bootstrap value belongs in its reward), else 0.0.
        next_values: ``(N,)`` critic values of the observations after the last step.

    Returns:
        ``(advantages, returns)``, both ``(T, N)``.
    """
    if not (rewards.shape == values.shape == episode_ends.shape) or rewards.dim() != 2:
        raise ValueError(
            "rewards, values and episode_ends must have the same (T, N) shape; got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)} and {tuple(episode_ends.shape)}"
        )
    if next_values.shape != rewards.shape[1:]:
        raise ValueError(f"next_values must have shape {tuple(rewards.shape[1:])}; got {tuple(next_values.shape)}")
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    advantage_after = torch.zeros_like(next_values)
    for t in reversed(range(num_steps)):
        continues = 1.0 - episode_ends[t]
        value_after = next_values if t == num_steps - 1 else values[t + 1]
        delta = rewards[t] + gamma * continues * value_after - values[t]
        advantage_after = delta + gamma * gae_lambda * continues * advantage_after
        advantages[t] = advantage_after
    return advantages, advantages + values


# ----------------------------------------------------------------------------------------------------------
# Actor and critic
# ----------------------------------------------------------------------------------------------------------


def _layer(in_features: int, out_features: int, std: float = math.sqrt(2)) -> nn.Linear:
    """A linear layer with orthogonal weights and zero bias (the initialisation of ppo2 and CleanRL)."""
    layer = nn.Linear(in_features, out_features)
    nn.init.orthogonal_(layer.weight, std)
    nn.init.zeros_(layer.bias)
    return layer


class ActorCritic(nn.Module):
    """Separate two-layer tanh MLPs for the policy logits and the value."""

    def __init__(self, obs_dim: int, num_actions: int, hidden: int) -> None:
        super().__init__()
        self.critic = nn.Sequential(
            _layer(obs_dim, hidden), nn.Tanh(), _layer(hidden, hidden), nn.Tanh(), _layer(hidden, 1, std=1.0)
        )
        self.actor = nn.Sequential(
            _layer(obs_dim, hidden), nn.Tanh(), _layer(hidden, hidden), nn.Tanh(), _layer(hidden, num_actions, 0.01)
        )

    def value(self, obs: Tensor) -> Tensor:
        return self.critic(obs).squeeze(-1)

    def policy(self, obs: Tensor) -> Categorical:
        return Categorical(logits=self.actor(obs), validate_args=False)


# ----------------------------------------------------------------------------------------------------------
# The update: one iteration's learning step, in CleanRL's layout
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutBatch:
    """One iteration's rollout, flattened over (step, env): everything :func:`ppo_update` learns from.

    Args:
        obs: ``(B, obs_dim)`` observations.
        actions: ``(B,)`` the actions taken.
        logprobs: ``(B,)`` their log-probabilities under the policy that collected the rollout.
        advantages: ``(B,)`` GAE advantages.
        returns: ``(B,)`` the critic's regression targets (advantages + values).
        values: ``(B,)`` the critic's values at rollout time: the old values that value clipping clips around.
    """

    obs: Tensor
    actions: Tensor
    logprobs: Tensor
    advantages: Tensor
    returns: Tensor
    values: Tensor


def ppo_update(
    agent: ActorCritic, optimizer: torch.optim.Optimizer, batch: RolloutBatch, config: PPOConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """One PPO update, laid out like CleanRL's ``ppo.py`` (Huang et al. 2022): actor and critic learn together.

    ``update_epochs`` passes over shuffled minibatches. Each minibatch gives one loss, policy loss minus
    ``ent_coef`` x entropy plus ``vf_coef`` x value loss, and one step of the one optimiser over all parameters,
    after one gradient-norm clip of all of them. Returns the minibatch averages of the update's statistics.
    """
    value_loss_fn = ValueLoss(clip_eps=config.value_clip_eps)  # 0.5 * mean (clipped) squared error
    stats = []
    for _ in range(config.update_epochs):
        order = torch.randperm(config.batch_size, generator=generator)
        for start in range(0, config.batch_size, config.minibatch_size):
            mb = order[start : start + config.minibatch_size]
            # Actor: the clipped surrogate objective on the probability ratio new / old
            policy = agent.policy(batch.obs[mb])
            new_logprob, entropy = policy.log_prob(batch.actions[mb]), policy.entropy().mean()
            log_ratio = new_logprob - batch.logprobs[mb]
            ratio = log_ratio.exp()
            advantages = batch.advantages[mb]
            if config.norm_adv:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            policy_loss_unclipped = -advantages * ratio
            policy_loss_clipped = -advantages * torch.clamp(ratio, 1 - config.clip_coef, 1 + config.clip_coef)
            policy_loss = torch.max(policy_loss_unclipped, policy_loss_clipped).mean()

            # Critic: the value loss, clipped around the rollout's values when value_clip_eps is set
            new_values = agent.value(batch.obs[mb])
            value_loss = value_loss_fn(new_values, batch.values[mb], batch.returns[mb])

            # One loss, one gradient-norm clip over actor and critic together, one optimiser step
            loss = policy_loss - config.ent_coef * entropy + config.vf_coef * value_loss
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), config.max_grad_norm)
            optimizer.step()
            stats.append(_update_stats(config, batch, mb, new_values, value_loss, ratio, log_ratio, entropy))
    return {key: sum(row[key] for row in stats) / len(stats) for key in stats[0]}


@torch.no_grad()
def _update_stats(config, batch, mb, new_values, value_loss, ratio, log_ratio, entropy) -> dict[str, float]:
    """One minibatch's row of the update statistics in :data:`CURVE_KEYS` (logged, never learnt from)."""
    value_stats = diagnose(new_values, batch.values[mb], batch.returns[mb], clip_eps=config.value_clip_eps)
    return {
        "value_loss": value_loss.item(),
        "value_clip_fraction": value_stats.clip_fraction.item(),
        "policy_clip_fraction": ((ratio - 1.0).abs() > config.clip_coef).float().mean().item(),
        "approx_kl": ((ratio - 1.0) - log_ratio).mean().item(),
        "entropy": entropy.item(),
    }


# ----------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------


def make_envs(config: PPOConfig, seed: int) -> SyncVectorEnv:
    """``num_envs`` copies of the environment, reset right away when an episode ends (same step)."""
    envs = SyncVectorEnv(
        [lambda: gym.make(config.env_id) for _ in range(config.num_envs)], autoreset_mode=AutoresetMode.SAME_STEP
    )
    envs.action_space.seed(seed)
    return envs


def run_ppo(
    config: PPOConfig, seed: int, *, progress: Callable[[int], None] | None = None
) -> dict[str, list[float]]:
    """Train PPO with ``config`` from ``seed``; return the per-iteration curves of :data:`CURVE_KEYS`.

    Args:
        config: the hyper-parameters.
        seed: seeds torch, numpy, the environments (env ``i`` gets ``seed + i``) and the minibatch order.
        progress: called with the number of environment steps after each iteration (e.g. a tqdm update).

    Returns:
        A dict mapping each name of :data:`CURVE_KEYS` to a list with one float per iteration
        (``episodic_return`` is NaN until the first episode ends).

    The run uses one torch thread (the caller's setting is restored afterwards), so its numbers are the same
    on any machine with the same library versions, in a worker process or not.
    """
    if not isinstance(config, PPOConfig):
        raise TypeError(f"config must be a PPOConfig; got {type(config).__name__}")
    with single_thread():
        return _train(config, seed, progress)


def _train(config: PPOConfig, seed: int, progress: Callable[[int], None] | None) -> dict[str, list[float]]:
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (global numpy state, for any library code that draws from it)
    generator = torch.Generator().manual_seed(seed)
    envs = make_envs(config, seed)
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    agent = ActorCritic(obs_dim, int(envs.single_action_space.n), config.hidden)
    optimizer = torch.optim.Adam(agent.parameters(), lr=config.learning_rate, eps=1e-5)
    reward_scaler = RewardScaler(config.num_envs, config.gamma) if config.reward_scaling else None

    shape = (config.num_steps, config.num_envs)
    obs_buffer = torch.zeros(shape + (obs_dim,))
    actions, logprobs = torch.zeros(shape, dtype=torch.long), torch.zeros(shape)
    rewards, episode_ends, values = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)

    episode_return = np.zeros(config.num_envs)  # raw return of each env's running episode
    finished_returns: deque[float] = deque(maxlen=config.return_window)
    curves: dict[str, list[float]] = {key: [] for key in CURVE_KEYS}
    obs_np, _ = envs.reset(seed=[seed + i for i in range(config.num_envs)])
    obs = torch.as_tensor(obs_np, dtype=torch.float32)
    global_step = 0

    for iteration in range(config.num_iterations):
        if config.anneal_lr:
            optimizer.param_groups[0]["lr"] = config.learning_rate * (1.0 - iteration / config.num_iterations)

        # 1. Rollout: num_steps steps in every env with the current policy.
        for step in range(config.num_steps):
            obs_buffer[step] = obs
            with torch.no_grad():
                policy = agent.policy(obs)
                action = policy.sample()
                actions[step], logprobs[step], values[step] = action, policy.log_prob(action), agent.value(obs)
            obs_np, reward, terminated, truncated, info = envs.step(action.numpy())
            ended = terminated | truncated
            global_step += config.num_envs

            episode_return += reward
            finished_returns.extend(episode_return[ended].tolist())
            episode_return[ended] = 0.0

            learning_reward = reward_scaler(reward, ended) if reward_scaler is not None else reward.astype(np.float64)
            cut_by_time_limit = np.flatnonzero(truncated & ~terminated)
            if cut_by_time_limit.size:  # bootstrap: the episode would have gone on
                final_obs = torch.as_tensor(np.stack(info["final_obs"][cut_by_time_limit]), dtype=torch.float32)
                with torch.no_grad():
                    learning_reward[cut_by_time_limit] += config.gamma * agent.value(final_obs).numpy()
            rewards[step] = torch.as_tensor(learning_reward, dtype=torch.float32)
            episode_ends[step] = torch.as_tensor(ended, dtype=torch.float32)
            obs = torch.as_tensor(obs_np, dtype=torch.float32)

        # 2. Advantages and the critic's regression targets.
        with torch.no_grad():
            advantages, returns = compute_gae(
                rewards, values, episode_ends, agent.value(obs), gamma=config.gamma, gae_lambda=config.gae_lambda
            )
        b_obs, b_actions, b_logprobs = obs_buffer.reshape(-1, obs_dim), actions.reshape(-1), logprobs.reshape(-1)
        b_advantages, b_returns, b_values = advantages.reshape(-1), returns.reshape(-1), values.reshape(-1)

        # 3. Update: the PPO update of CleanRL's ppo.py, written out in ppo_update above.
        batch = RolloutBatch(b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values)
        update_stats = ppo_update(agent, optimizer, batch, config, generator)

        # 4. Log one row of every curve.
        rollout_stats = diagnose(b_values, b_values, b_returns)
        curves["global_step"].append(float(global_step))
        curves["episodic_return"].append(float(np.mean(finished_returns)) if finished_returns else math.nan)
        curves["explained_variance"].append(rollout_stats.explained_variance.item())
        curves["return_std"].append(b_returns.std().item())
        for key, average in update_stats.items():
            curves[key].append(average)
        if progress is not None:
            progress(config.batch_size)

    envs.close()
    return curves
