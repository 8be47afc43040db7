"""Tests of valueloss.experiments.tiny_rlhf: the task's reward and masks, GAE against plain loops, a short prefix
of the run against a stored checksum, and (slow) the full run reproducing the shipped recording bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from valueloss.experiments.tiny_rlhf import (
    END,
    TARGET_OFFSET,
    TinyRLHFConfig,
    gae,
    main,
    random_policy_reward,
    response_mask,
    rewards_of,
    run_tiny_rlhf,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "notebooks" / "data" / "tiny_rlhf"
# Where the checksums below were made; bit-for-bit equality is promised on this torch and CPU capability only.
MADE_ON = ("2.13.0+cpu", "AVX512")
PREFIX_CHECKSUM = "f88679327f4763e0cae1e2a94793eddf5fee6817bb1870b739b006ae09fc3842"


def _same_platform():
    here = (torch.__version__, torch.backends.cpu.get_cpu_capability())
    if here != MADE_ON:
        pytest.skip(f"the stored checksums were made on torch {MADE_ON[0]} with CPU capability {MADE_ON[1]}; "
                    f"this is {here[0]} with {here[1]} (other kernels may round differently)")


def test_reward_and_mask_of_handmade_responses():
    """Exact hit with an end token: 1; off by 2: 0.6; off by 12: -1 (capped at 10); no end token: -1."""
    prompts = torch.tensor([[TARGET_OFFSET + 9, 2, 3]] * 4)
    responses = torch.tensor([
        [4, END, 7, 7],  # 2 + 3 + 4 = 9: hit; the 7s after the end are not counted
        [2, END, 0, 0],  # 7: off by 2
        [9, 9, END, 0],  # 23 -> off by 14, capped at 10
        [1, 1, 1, 1],  # never ends
    ])
    mask = response_mask(responses)
    assert mask.tolist() == [[True, True, False, False], [True, True, False, False],
                             [True, True, True, False], [True, True, True, True]]
    reward, exact = rewards_of(prompts, responses, mask)
    assert reward.tolist() == [1.0, 0.6, -1.0, -1.0] and exact.tolist() == [True, False, False, False]


def test_gae_matches_plain_loops():
    """GAE with gamma 1 over ragged masks equals a per-sequence backward loop written here."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    rewards = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    mask = torch.arange(6)[None, :] < torch.tensor([[6], [1], [3], [4], [2]])
    advantages, returns = gae(rewards, values, mask, 0.9)
    for b in range(5):
        n = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1].item() if t + 1 < n else 0.0
            running = rewards[b, t].item() + next_value - values[b, t].item() + 0.9 * running
            assert advantages[b, t].item() == pytest.approx(running, abs=1e-12)
            assert returns[b, t].item() == pytest.approx(running + values[b, t].item(), abs=1e-12)
        assert advantages[b, n:].abs().sum() == 0


def test_random_policy_scores_far_below_one():
    """Uniformly random tokens mostly miss the end token or the sum: their mean reward is below -0.5."""
    assert random_policy_reward(episodes=2048) < -0.5


def test_short_prefix_of_the_run_matches_its_checksum(tmp_path):
    """Two iterations (seeded, one thread, deterministic algorithms) give the stored checksum of parameters and
    rewards, and record both iterations' critic batches; the caller's thread and determinism settings come back."""
    threads, determinism = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    result = run_tiny_rlhf(TinyRLHFConfig(iterations=2), record_dir=tmp_path, record_every=1)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, determinism)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001-rank0.npz", "step-00000002-rank0.npz"]
    assert len(result.reward) == 2 and all(-1 <= r <= 1 for r in result.reward)
    _same_platform()
    assert result.checksum == PREFIX_CHECKSUM


def test_bad_settings_raise_and_the_cli_exits_2(capsys):
    """A bad config raises ValueError naming the field; the CLI turns it into exit code 2 and one line."""
    with pytest.raises(ValueError, match="batch_size must be divisible by minibatches; got 10 and 3"):
        TinyRLHFConfig(batch_size=10, minibatches=3)
    assert main(["--iterations", "0"]) == 2
    assert capsys.readouterr().err.strip() == "tiny_rlhf: error: iterations must be a whole number >= 1; got 0"
    assert main(["--value-clip-eps", "abc"]) == 2
    assert capsys.readouterr().err.strip() == ("tiny_rlhf: error: --value-clip-eps must be a number >= 0 or 'none'; "
                                               "got 'abc'")


def _arrays(path):
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_full_run_reproduces_the_shipped_recording(tmp_path):
    """The command of notebooks/data/README.md writes the shipped files again, array for array and bit for bit,
    and the trained policy's reward is far above a random policy's."""
    _same_platform()
    result_path = tmp_path / "result.json"
    assert main(["--out", str(tmp_path / "run"), "--json", str(result_path)]) == 0
    shipped = sorted(p.name for p in SHIPPED.glob("*.npz"))
    assert sorted(p.name for p in (tmp_path / "run").glob("*.npz")) == shipped and len(shipped) >= 3
    for name in shipped:
        fresh, stored = _arrays(tmp_path / "run" / name), _arrays(SHIPPED / name)
        assert fresh.keys() == stored.keys()
        for key in stored:
            assert fresh[key].dtype == stored[key].dtype and fresh[key].tobytes() == stored[key].tobytes(), (name, key)
    result = json.loads(result_path.read_text())
    assert np.mean(result["reward"][-20:]) > random_policy_reward() + 1.0
