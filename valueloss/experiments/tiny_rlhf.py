"""A token-level PPO small enough for a laptop CPU: a tiny causal transformer learns to hit a digit sum.

The task (a verifiable reward, ragged responses): a prompt ``[S, d1, d2]`` names a target sum ``S`` and two
digits; the policy continues with digits and ends with an end token. The reward, given once at the end,
is ``1 - min(|sum - S|, 10) / 5`` (1 for an exact hit, down to -1), where ``sum`` adds the prompt's two
digits and the response's; a response that reaches :attr:`TinyRLHFConfig.max_response` tokens without
the end token gets -1. A policy that picks tokens uniformly at random scores about -0.84
(:func:`random_policy_reward`); the default run ends near +0.83 (notebooks/data/README.md).

The algorithm is the RLHF flavour of PPO (as in OpenRLHF's and verl's PPO trainers, without a KL penalty:
there is no reference model to stay close to): a policy transformer and a separate critic transformer of
the same shape; a rollout of ``batch_size`` prompts sampled token by token; old log-probabilities and old
values recomputed in one forward pass over the finished sequences; generalised advantage estimation
(Schulman et al. 2016) over the response tokens with ``gamma = 1``, the reward on the last token;
advantages whitened over the unmasked tokens; then ``epochs`` passes over ``minibatches`` minibatches with
the clipped policy ratio and :class:`valueloss.ValueLoss` for the critic (``value_clip_eps=None`` turns
value clipping off). Token-level masks throughout: every mean is over the unmasked response tokens.

Deterministic: the run sets one torch thread and ``torch.use_deterministic_algorithms(True)`` (and restores
both afterwards); all randomness comes from generators seeded by ``seed``. The same torch build on the same
kind of CPU repeats it bit for bit (notebooks/data/README.md says which was used for the shipped batches).

``python -m valueloss.experiments.tiny_rlhf --out DIR`` runs it and records batches with
:class:`valueloss.record.Recorder` (``--help`` for the settings).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .._threads import single_thread
from ..diagnostics import diagnose
from ..loss import ValueLoss
from ..record import Recorder

__all__ = ["TinyRLHFConfig", "TinyRLHFResult", "random_policy_reward", "run_tiny_rlhf", "main"]

DIGITS = 10
END = 10
MAX_NEEDED = 13  # the response must add 0..13 to the prompt's two digits
TARGET_OFFSET = 11  # token of target sum S is TARGET_OFFSET + S, S in 0..18 + MAX_NEEDED
VOCAB = TARGET_OFFSET + 18 + MAX_NEEDED + 1
PROMPT = 3


@dataclass(frozen=True)
class TinyRLHFConfig:
    """Settings of :func:`run_tiny_rlhf`; the defaults made the shipped recording."""

    seed: int = 0
    iterations: int = 300
    batch_size: int = 128
    """Prompts per rollout (one response each)."""
    max_response: int = 8
    epochs: int = 4
    minibatches: int = 2
    policy_lr: float = 3e-4
    critic_lr: float = 1e-3
    clip_ratio: float = 0.2
    value_clip_eps: float | None = 0.2
    """``None`` trains the critic on the plain squared error (no value clipping)."""
    gae_lambda: float = 0.95
    entropy_coef: float = 0.01
    max_grad_norm: float = 1.0
    d_model: int = 64
    layers: int = 2
    heads: int = 4

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "max_response", "epochs", "minibatches", "d_model", "layers", "heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1; got {value!r}")
        if self.batch_size % self.minibatches:
            raise ValueError(
                f"batch_size must be divisible by minibatches; got {self.batch_size} and {self.minibatches}"
            )
        if self.d_model % self.heads:
            raise ValueError(f"d_model must be divisible by heads; got {self.d_model} and {self.heads}")
        if self.value_clip_eps is not None and not self.value_clip_eps >= 0:
            raise ValueError(f"value_clip_eps must be >= 0 or None; got {self.value_clip_eps!r}")


@dataclass
class TinyRLHFResult:
    """Per-iteration curves of a run (lists of floats, one entry per iteration) and a checksum of the run."""

    config: TinyRLHFConfig
    reward: list[float]
    """Mean reward of the iteration's rollout (sampled responses, before the update)."""
    exact: list[float]
    """Share of responses whose digit sum hit the target and that ended with the end token."""
    response_length: list[float]
    value_clip_fraction: list[float]
    """Share of the critic's unmasked tokens whose gradient value clipping zeroed (last minibatch of the
    iteration), measured at ``value_clip_eps`` (0.2 when clipping is off)."""
    explained_variance: list[float]
    """Of the returns by the old values, at rollout time."""
    checksum: str
    """SHA-256 over the final parameters of both networks and the rewards of every rollout."""
    seconds: float

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["config"] = dataclasses.asdict(self.config)
        return out


# --------------------------------------------------------------------------- the model


class _Block(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention, then a two-layer MLP."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=-1)
        q, k, v = (t.reshape(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        attention = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """A causal transformer over the task's tokens with ``outputs`` numbers per position (logits or a value)."""

    def __init__(self, config: TinyRLHFConfig, outputs: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, config.d_model)
        self.position = nn.Embedding(PROMPT + config.max_response, config.d_model)
        self.blocks = nn.ModuleList(_Block(config.d_model, config.heads) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, outputs)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# --------------------------------------------------------------------------- the task


def sample_prompts(batch_size: int, generator: torch.Generator) -> Tensor:
    """``(batch_size, 3)`` prompts ``[S, d1, d2]``: two random digits and a target ``S = d1 + d2 + needed``."""
    digits = torch.randint(0, DIGITS, (batch_size, 2), generator=generator)
    needed = torch.randint(0, MAX_NEEDED + 1, (batch_size,), generator=generator)
    target = digits.sum(1) + needed
    return torch.cat([(TARGET_OFFSET + target)[:, None], digits], dim=1)


def response_mask(responses: Tensor) -> Tensor:
    """True up to and including the first end token (all True when there is none)."""
    is_end = responses == END
    ended_before = (is_end.cumsum(1) - is_end.long()) > 0
    return ~ended_before


def rewards_of(prompts: Tensor, responses: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The reward of each response (float64) and whether it hit the target exactly and ended."""
    target = prompts[:, 0] - TARGET_OFFSET
    digit_sum = prompts[:, 1:].sum(1) + torch.where(mask & (responses < DIGITS), responses, 0).sum(1)
    ended = ((responses == END) & mask).any(1)
    distance = (digit_sum - target).abs().clamp(max=10).double()
    reward = torch.where(ended, 1.0 - distance / 5.0, -1.0)
    return reward, ended & (distance == 0)


def random_policy_reward(episodes: int = 8192, max_response: int = 8, seed: int = 12345) -> float:
    """Mean reward of a policy that picks each token uniformly at random (its responses' mean length varies)."""
    generator = torch.Generator().manual_seed(seed)
    prompts = sample_prompts(episodes, generator)
    responses = torch.randint(0, VOCAB, (episodes, max_response), generator=generator)
    return float(rewards_of(prompts, responses, response_mask(responses))[0].mean())


# --------------------------------------------------------------------------- PPO


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Advantages and returns by GAE with ``gamma = 1`` over each response's unmasked tokens."""
    advantages = torch.zeros_like(values)
    running = torch.zeros(values.shape[0], dtype=values.dtype)
    next_value = torch.zeros(values.shape[0], dtype=values.dtype)
    for t in reversed(range(values.shape[1])):
        keep = mask[:, t]
        delta = rewards[:, t] + next_value - values[:, t]
        running = torch.where(keep, delta + lam * running, 0.0)
        advantages[:, t] = running
        next_value = torch.where(keep, values[:, t], 0.0)
    return advantages, advantages + values


@torch.no_grad()
def _rollout(policy: TinyTransformer, config: TinyRLHFConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Prompts and sampled responses (tokens after the first end token are filler, masked out later)."""
    prompts = sample_prompts(config.batch_size, generator)
    tokens = prompts
    for _ in range(config.max_response):
        logits = policy(tokens)[:, -1]
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        tokens = torch.cat([tokens, nxt], dim=1)
    return prompts, tokens[:, PROMPT:]


def _response_outputs(model: TinyTransformer, sequences: Tensor) -> Tensor:
    """The model's outputs at the positions that predict each response token (the state before it)."""
    return model(sequences[:, :-1])[:, PROMPT - 1:]


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """One torch thread and deterministic algorithms inside the block; the caller's settings after it."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with single_thread():
            yield
    finally:
        torch.use_deterministic_algorithms(previous)


def run_tiny_rlhf(
    config: TinyRLHFConfig | None = None,
    *,
    record_dir: str | Path | None = None,
    record_every: int = 10,
    max_files: int = 40,
    progress: bool = False,
) -> TinyRLHFResult:
    """Train the policy and critic with PPO; with ``record_dir``, record the critic's last minibatch of every
    ``record_every``-th iteration (step = iteration, 1-based) with :class:`valueloss.record.Recorder`."""
    config = config or TinyRLHFConfig()
    start = time.perf_counter()
    with deterministic():
        torch.manual_seed(config.seed)
        policy = TinyTransformer(config, VOCAB)
        critic = TinyTransformer(config, 1)
        generator = torch.Generator().manual_seed(config.seed + 1)
        policy_opt = torch.optim.Adam(policy.parameters(), lr=config.policy_lr)
        critic_opt = torch.optim.Adam(critic.parameters(), lr=config.critic_lr)
        calls = config.epochs * config.minibatches
        recorder = None
        if record_dir is not None:
            recorder = Recorder(record_dir, every=calls * record_every, max_files=max_files, max_rows=None)
        value_loss = ValueLoss(config.value_clip_eps, recorder=recorder)
        measure_eps = config.value_clip_eps if config.value_clip_eps is not None else 0.2
        digest = hashlib.sha256()
        curves: dict[str, list[float]] = {k: [] for k in ("reward", "exact", "response_length",
                                                           "value_clip_fraction", "explained_variance")}
        for iteration in range(1, config.iterations + 1):
            prompts, responses = _rollout(policy, config, generator)
            mask = response_mask(responses)
            reward, exact = rewards_of(prompts, responses, mask)
            sequences = torch.cat([prompts, responses], dim=1)
            with torch.no_grad():
                old_logprobs = _response_outputs(policy, sequences).log_softmax(-1)
                old_logprobs = old_logprobs.gather(-1, responses[..., None]).squeeze(-1)
                old_values = _response_outputs(critic, sequences).squeeze(-1)
            last = mask.sum(1) - 1
            token_rewards = torch.zeros_like(old_values)
            token_rewards[torch.arange(config.batch_size), last] = reward.to(old_values.dtype)
            advantages, returns = gae(token_rewards, old_values, mask, config.gae_lambda)
            mean = masked_mean(advantages, mask)
            std = masked_mean((advantages - mean) ** 2, mask).sqrt()
            advantages = (advantages - mean) / (std + 1e-8)
            ev = diagnose(old_values, old_values, returns, mask).explained_variance
            digest.update(reward.numpy().tobytes())
            curves["reward"].append(float(reward.mean()))
            curves["exact"].append(float(exact.double().mean()))
            curves["response_length"].append(float(mask.sum(1).double().mean()))
            curves["explained_variance"].append(float(ev))
            if recorder is not None:
                recorder.step = iteration

            size = config.batch_size // config.minibatches
            for _ in range(config.epochs):
                order = torch.randperm(config.batch_size, generator=generator)
                for k in range(config.minibatches):
                    rows = order[k * size:(k + 1) * size]
                    seq, resp, m = sequences[rows], responses[rows], mask[rows]
                    logits = _response_outputs(policy, seq)
                    logprobs = logits.log_softmax(-1)
                    new_logprobs = logprobs.gather(-1, resp[..., None]).squeeze(-1)
                    ratio = (new_logprobs - old_logprobs[rows]).exp()
                    adv = advantages[rows]
                    policy_loss = masked_mean(
                        torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - config.clip_ratio, 1 + config.clip_ratio)), m
                    )
                    entropy = masked_mean(-(logprobs.exp() * logprobs).sum(-1), m)
                    policy_opt.zero_grad()
                    (policy_loss - config.entropy_coef * entropy).backward()
                    nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
                    policy_opt.step()

                    values = _response_outputs(critic, seq).squeeze(-1)
                    critic_loss = value_loss(values, old_values[rows], returns[rows], m)
                    critic_opt.zero_grad()
                    critic_loss.backward()
                    nn.utils.clip_grad_norm_(critic.parameters(), config.max_grad_norm)
                    critic_opt.step()
            clipped = diagnose(values.detach(), old_values[rows], returns[rows], m, clip_eps=measure_eps)
            curves["value_clip_fraction"].append(float(clipped.clip_fraction))
            if progress and (iteration % 10 == 0 or iteration == 1):
                now = {key: series[-1] for key, series in curves.items()}
                print(f"iteration {iteration:4d}  reward {now['reward']:+.3f}  exact {now['exact']:.2f}  length "
                      f"{now['response_length']:.2f}  value clip fraction {now['value_clip_fraction']:.3f}  "
                      f"explained variance {now['explained_variance']:+.3f}", flush=True)
        for model in (policy, critic):
            for tensor in model.state_dict().values():
                digest.update(tensor.numpy().tobytes())
    return TinyRLHFResult(config=config, checksum=digest.hexdigest(), seconds=time.perf_counter() - start, **curves)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """``python -m valueloss.experiments.tiny_rlhf``: run, record, print the curves' summary."""
    parser = argparse.ArgumentParser(prog="python -m valueloss.experiments.tiny_rlhf",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", metavar="DIR", help="record the critic's batches into DIR (created)")
    parser.add_argument("--record-every", type=int, default=10, help="record every N-th iteration (default: 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=TinyRLHFConfig.iterations)
    parser.add_argument("--value-clip-eps", default="0.2", help="value clip range, or 'none' (default: 0.2)")
    parser.add_argument("--json", metavar="FILE", help="also write the curves and the checksum as JSON")
    args = parser.parse_args(argv)
    try:
        try:
            eps = None if args.value_clip_eps.lower() == "none" else float(args.value_clip_eps)
        except ValueError:
            raise ValueError(f"--value-clip-eps must be a number >= 0 or 'none'; got {args.value_clip_eps!r}") from None
        config = TinyRLHFConfig(seed=args.seed, iterations=args.iterations, value_clip_eps=eps)
        if args.record_every < 1:
            raise ValueError(f"--record-every must be >= 1; got {args.record_every}")
        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise ValueError(f"--json {args.json}: its folder does not exist")
    except ValueError as error:
        print(f"tiny_rlhf: error: {error}", file=sys.stderr)
        return 2
    result = run_tiny_rlhf(config, record_dir=args.out, record_every=args.record_every, progress=True)
    last = slice(-20, None)
    print(f"random policy reward {random_policy_reward(max_response=config.max_response):+.3f}; "
          f"trained (mean of the last 20 rollouts) {sum(result.reward[last]) / len(result.reward[last]):+.3f}, "
          f"exact {sum(result.exact[last]) / len(result.exact[last]):.2f}; {result.seconds:.0f} s; "
          f"checksum {result.checksum}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
