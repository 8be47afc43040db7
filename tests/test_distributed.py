"""Tests of valueloss.distributed: counts, forward keywords, the one-process replay, and real gloo DDP runs.

The gloo tests start real worker processes on loopback (forks of one fresh interpreter: tests/gloo.py), give
each rank a shard of a ragged batch, wrap a small critic in DistributedDataParallel and compare the
averaged gradients with a full-batch reference computed here by plain loops.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import gloo
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

CLIP_EPS = 0.2
MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


# --------------------------------------------------------------------------- independent references


def reference_loss(values, old_values, returns, mask, mode, clip_eps=CLIP_EPS, scale=0.5, norm=None):
    """The full-batch value loss by loops over rows, written without valueloss (differentiable)."""
    batch, length = values.shape
    row_sums, row_counts = [], []
    for s in range(batch):
        keep = mask[s] != 0
        v, o, r = values[s][keep], old_values[s][keep], returns[s][keep]
        v_clip = o + torch.clamp(v - o, -clip_eps, clip_eps)
        row_sums.append(torch.maximum((v_clip - r) ** 2, (v - r) ** 2).sum())
        row_counts.append(int(keep.sum()))
    num_tokens = sum(row_counts)
    nonempty = [s for s in range(batch) if row_counts[s] > 0]
    zero = values.sum() * 0.0
    if mode == "token-sum":
        total = sum(row_sums, zero)
    elif mode == "token-mean":
        total = sum(row_sums, zero) / num_tokens if num_tokens else zero
    elif not nonempty:
        total = zero
    elif mode == "seq-mean-token-mean":
        total = sum((row_sums[s] / row_counts[s] for s in nonempty), zero) / len(nonempty)
    else:
        total = sum((row_sums[s] for s in nonempty), zero) / len(nonempty)
        if mode == "seq-mean-token-sum-norm":
            total = total / (norm if norm is not None else length)
    return scale * total


def reference_counts(masks):
    """(tokens, non-empty rows) of a list of masks by plain Python loops."""
    tokens, rows = 0.0, 0
    for mask in masks:
        for row in mask.tolist():
            tokens += sum(float(x) for x in row)
            rows += int(any(float(x) != 0 for x in row))
    return tokens, rows


def ragged_batch(batch, length, *, seed=0, empty_rows=(), dtype=torch.float64):
    """A batch with ragged left-aligned masks; rows in empty_rows are fully masked."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    mask[list(empty_rows)] = False
    values = torch.randn(batch, length, generator=gen, dtype=dtype)
    old_values = values + 0.3 * torch.randn(batch, length, generator=gen, dtype=dtype)
    returns = torch.randn(batch, length, generator=gen, dtype=dtype)
    return values, old_values, returns, mask


# --------------------------------------------------------------------------- counts and keywords


def test_local_counts_match_loops():
    """local_counts sums tokens and non-empty rows over every micro-batch of the window."""
    from valueloss.distributed import local_counts

    masks = [ragged_batch(5, 7, seed=1, empty_rows=(2,))[3], ragged_batch(3, 4, seed=2, empty_rows=(0, 1, 2))[3]]
    masks.append(torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    counts = local_counts(masks)
    tokens, rows = reference_counts(masks)
    assert float(counts.num_tokens) == tokens
    assert int(counts.num_sequences) == rows
    assert counts.dp_size == 1
    assert counts.seq_len() is None  # T = 7, 4, 2


def test_global_counts_without_process_group_is_local():
    """Without torch.distributed initialised, global_counts is the local count and dp_size is 1."""
    from valueloss.distributed import global_counts

    mask = ragged_batch(6, 5, seed=3, empty_rows=(4,))[3]
    counts = global_counts(mask)
    assert (float(counts.num_tokens), int(counts.num_sequences)) == reference_counts([mask])
    assert counts.dp_size == 1 and counts.seq_len() == 5


def test_forward_kwargs_gives_only_the_needed_count():
    """token-mean gets the token count, seq modes the sequence count, token-sum neither."""
    from valueloss import ValueLoss
    from valueloss.distributed import local_counts

    counts = local_counts([torch.ones(2, 3), torch.ones(1, 3)])
    expected_keys = {
        "token-mean": {"dp_size", "batch_num_tokens"},
        "token-sum": {"dp_size"},
        "seq-mean-token-mean": {"dp_size", "global_batch_size"},
        "seq-mean-token-sum": {"dp_size", "global_batch_size"},
        "seq-mean-token-sum-norm": {"dp_size", "global_batch_size"},
    }
    for mode, keys in expected_keys.items():
        kwargs = counts.forward_kwargs(ValueLoss(0.2, loss_agg_mode=mode))
        assert set(kwargs) == keys, mode
    kwargs = counts.forward_kwargs("token-mean", accumulation_divisor=4, dtype=torch.float32)
    assert kwargs["dp_size"] == 4 and kwargs["batch_num_tokens"].dtype == torch.float32
    assert float(kwargs["batch_num_tokens"]) == 9.0


def test_norm_mode_needs_uniform_length_or_factor():
    """seq-mean-token-sum-norm with micro-batches of different T raises unless loss_scale_factor is set."""
    from valueloss import ValueLoss
    from valueloss.distributed import local_counts

    counts = local_counts([torch.ones(2, 3), torch.ones(2, 5)])
    with pytest.raises(ValueError, match="loss_scale_factor"):
        counts.forward_kwargs(ValueLoss(0.2, loss_agg_mode="seq-mean-token-sum-norm"))
    kwargs = counts.forward_kwargs(ValueLoss(0.2, loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=5.0))
    assert float(kwargs["global_batch_size"]) == 4.0


def test_forward_kwargs_checks_process_group_size():
    """Counts summed over 2 ranks are refused in a single process; bad arguments name themselves."""
    from valueloss import ValueLoss
    from valueloss.distributed import GlobalCounts, forward_kwargs, local_counts

    fake = GlobalCounts(torch.tensor(4.0), torch.tensor(2.0), dp_size=2)
    with pytest.raises(ValueError, match="2 rank"):
        forward_kwargs(ValueLoss(0.2), fake)
    assert forward_kwargs("token-sum") == {"dp_size": 1}
    assert forward_kwargs("token-sum", accumulation_divisor=4) == {"dp_size": 4}
    with pytest.raises(ValueError, match="local_counts"):
        forward_kwargs(ValueLoss(0.2), accumulation_divisor=4)  # a mean per micro-batch, scaled by 4: wrong
    with pytest.raises(ValueError, match="accumulation_divisor must be a positive integer"):
        forward_kwargs("token-sum", accumulation_divisor=0)
    with pytest.raises(RuntimeError, match="not initialised"):
        forward_kwargs("token-sum", group=object())
    with pytest.raises(ValueError, match="mode must be one of"):
        forward_kwargs("mean")
    with pytest.raises(TypeError, match="action_masks"):
        local_counts("not a mask")
    with pytest.raises(ValueError, match="empty sequence"):
        local_counts([])


def test_split_batch_covers_rows_in_order():
    """split_batch keeps every row once, in order, and refuses too few rows."""
    from valueloss.lessons.data_parallel import split_batch

    rows = torch.arange(11)
    pieces = split_batch(rows, 3, 2)
    assert len(pieces) == 3 and all(len(shard) == 2 for shard in pieces)
    assert torch.cat([mb for shard in pieces for mb in shard]).tolist() == list(range(11))
    with pytest.raises(ValueError, match="at least 6 rows"):
        split_batch(torch.arange(5), 3, 2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divisor", [1, 3])
def test_accumulation_recipe_equals_full_batch(mode, divisor):
    """Summing (or averaging with accumulation_divisor) micro-batch losses with window counts gives the full loss."""
    from valueloss import ValueLoss
    from valueloss.distributed import local_counts
    from valueloss.lessons.data_parallel import split_batch

    values, old_values, returns, mask = ragged_batch(9, 6, seed=4, empty_rows=(1, 6, 7, 8))
    loss_fn = ValueLoss(CLIP_EPS, loss_agg_mode=mode)
    (window,) = split_batch(torch.stack([values, old_values, returns, mask.double()], 1), 1, 3)
    counts = local_counts([mb[:, 3] for mb in window])
    kwargs = counts.forward_kwargs(loss_fn, accumulation_divisor=divisor, dtype=torch.float64)
    total = sum(loss_fn(mb[:, 0], mb[:, 1], mb[:, 2], mb[:, 3], **kwargs) / divisor for mb in window)
    expected = reference_loss(values, old_values, returns, mask, mode)
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- the one-process replay


def _reference_strategy(values, old_values, returns, mask, mode, shards, micro, strategy):
    """What the optimizer minimises under a normalisation strategy, from reference_loss pieces."""
    rows = torch.arange(values.shape[0])
    per_rank = [list(torch.tensor_split(s, micro)) for s in torch.tensor_split(rows, shards)]
    all_tokens = int((mask != 0).sum())
    all_rows = int((mask != 0).any(-1).sum())
    total = values.sum() * 0.0
    for rank_rows in per_rank:
        rank_idx = torch.cat(rank_rows)
        for idx in rank_rows:
            v, o, r, m = values[idx], old_values[idx], returns[idx], mask[idx]
            token_sum = reference_loss(v, o, r, m, "token-sum")
            seq_sum = reference_loss(v, o, r, m, "seq-mean-token-sum") * max(int((m != 0).any(-1).sum()), 1)
            if strategy == "per-micro-batch":
                piece = reference_loss(v, o, r, m, mode) / micro
            else:
                tokens, seqs = (all_tokens, all_rows) if strategy == "global" else (
                    int((mask[rank_idx] != 0).sum()),
                    int((mask[rank_idx] != 0).any(-1).sum()),
                )
                dp = shards if strategy == "global" else 1
                if mode == "token-mean":
                    piece = token_sum / max(tokens, 1) * dp
                elif mode == "token-sum":
                    piece = token_sum * dp
                elif mode == "seq-mean-token-mean":
                    rows = range(len(idx))
                    ones = [reference_loss(v[i : i + 1], o[i : i + 1], r[i : i + 1], m[i : i + 1], mode) for i in rows]
                    piece = sum(ones, total * 0.0) / max(seqs, 1) * dp
                else:
                    piece = seq_sum / max(seqs, 1) * dp
                    if mode == "seq-mean-token-sum-norm":
                        piece = piece / values.shape[1]
            total = total + piece / shards
    return total


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("shards", "micro"), [(1, 3), (2, 2), (3, 1), (3, 2)])
def test_compare_normalisations_matches_reference(mode, shards, micro):
    """Each strategy's loss and gradient match an independent replay; global equals the full batch."""
    from valueloss.lessons.data_parallel import NORMALISATIONS, compare_normalisations

    values, old_values, returns, mask = ragged_batch(13, 7, seed=5, empty_rows=(0, 10, 11, 12))
    result = compare_normalisations(
        values, old_values, returns, mask, num_shards=shards, num_micro_batches=micro, mode=mode
    )
    full = reference_loss(values, old_values, returns, mask, mode)
    assert result.full_loss == pytest.approx(float(full), rel=1e-12, abs=1e-12)
    assert result.loss_errors["global"] < 1e-12 and result.grad_errors["global"] < 1e-12
    for strategy in NORMALISATIONS:
        leaf = values.clone().requires_grad_(True)
        expected = _reference_strategy(leaf, old_values, returns, mask, mode, shards, micro, strategy)
        (grad,) = torch.autograd.grad(expected, leaf)
        assert result.losses[strategy] == pytest.approx(float(expected.detach()), rel=1e-12, abs=1e-12), strategy
        torch.testing.assert_close(result.grads[strategy], grad, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 9),
    length=st.integers(1, 7),
    shards=st.integers(1, 3),
    micro=st.integers(1, 3),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
    density=st.floats(0.0, 1.0),
)
def test_global_counts_exact_for_any_mask_and_split(batch, length, shards, micro, mode, seed, density):
    """For any mask (empty rows and batches included) and any split, global counts give the full-batch gradient."""
    from valueloss.lessons.data_parallel import compare_normalisations

    if shards * micro > batch:
        shards, micro = 1, 1
    values, old_values, returns, _ = ragged_batch(batch, length, seed=seed)
    mask = torch.rand(batch, length, generator=torch.Generator().manual_seed(seed)) < density
    result = compare_normalisations(
        values, old_values, returns, mask, num_shards=shards, num_micro_batches=micro, mode=mode
    )
    leaf = values.clone().requires_grad_(True)
    expected = reference_loss(leaf, old_values, returns, mask, mode)
    (grad,) = torch.autograd.grad(expected, leaf)
    assert result.losses["global"] == pytest.approx(float(expected.detach()), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(result.grads["global"], grad, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(result.grads["per-micro-batch"]).all() and torch.isfinite(result.grads["per-rank"]).all()


def test_naive_mean_is_wrong_on_ragged_batches():
    """The per-micro-batch mean and per-rank counts move the token-mean gradient; global counts do not."""
    from valueloss.lessons.data_parallel import compare_normalisations

    values, old_values, returns, mask = ragged_batch(16, 32, seed=6, empty_rows=(15,))
    result = compare_normalisations(values, old_values, returns, mask, num_shards=2, num_micro_batches=4)
    assert result.grad_errors["per-micro-batch"] > 0.01
    assert result.grad_errors["per-rank"] > 0.001
    assert result.grad_errors["global"] < 1e-6


def test_seq_mean_per_micro_batch_exact_with_equal_rows():
    """seq-mean-token-mean is exact per micro-batch when every micro-batch has the same number of non-empty rows."""
    from valueloss.lessons.data_parallel import compare_normalisations

    values, old_values, returns, mask = ragged_batch(12, 9, seed=7)
    result = compare_normalisations(
        values, old_values, returns, mask, num_shards=2, num_micro_batches=3, mode="seq-mean-token-mean"
    )
    assert result.grad_errors["per-micro-batch"] < 1e-12
    result = compare_normalisations(values, old_values, returns, mask, num_shards=2, num_micro_batches=3)
    assert result.grad_errors["per-micro-batch"] > 1e-3  # token-mean is not


# --------------------------------------------------------------------------- real gloo runs


FEATURES = 3


def _critic():
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)
    ).double()


def _distributed_data(world):
    """Features, old values, returns and a ragged mask: row 1 and the whole last rank's shard are masked."""
    from valueloss.lessons.data_parallel import split_batch

    batch, length = 8, 6
    gen = torch.Generator().manual_seed(10 + world)
    features = torch.randn(batch, length, FEATURES, generator=gen, dtype=torch.float64)
    old_values = 0.5 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    returns = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([6, 3, 1, 5, 2, 6, 4, 3])
    mask = torch.arange(length)[None, :] < lengths[:, None]
    mask[1] = False
    last_rows = split_batch(torch.arange(batch), world, 1)[-1][0]
    mask[last_rows] = False
    torch.manual_seed(world)
    state = _critic().state_dict()
    return {"features": features, "old_values": old_values, "returns": returns, "mask": mask, "state": state}


WORLDS = (2, 3)
LAUNCH = max(WORLDS)


def _cases():
    """Exact recipe for every mode with and without accumulation; the naive mean with accumulation."""
    exact = [(mode, micro, "global") for mode, micro in itertools.product(MODES, (1, 2))]
    return exact + [(mode, 2, "per-micro-batch") for mode in MODES]


def _before_fork():
    """Run once by tests/gloo.py before it forks the ranks: DistributedDataParallel's constructor imports
    torch.compile's machinery (seconds per process); torch.compiler.list_backends() imports the same modules."""
    torch.compiler.list_backends()


def _worker(rank, port, data_path, out_dir):
    """One process of a 3-rank gloo job; runs every case on the 3-rank world and on a 2-rank subgroup."""
    import contextlib
    from datetime import timedelta

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from valueloss import ValueLoss
    from valueloss.distributed import forward_kwargs, global_counts
    from valueloss.lessons.data_parallel import split_batch

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=LAUNCH, timeout=timedelta(seconds=60)
    )
    try:
        all_data = torch.load(data_path, weights_only=True)
        groups = {LAUNCH: None}
        for world in WORLDS:
            if world != LAUNCH:
                groups[world] = dist.new_group(list(range(world)))  # collective: every rank calls it
        results = {}
        for world in WORLDS:
            if rank >= world:
                continue
            group, data, out = groups[world], all_data[world], {}
            critic = _critic()
            critic.load_state_dict(data["state"])
            model = DistributedDataParallel(critic, process_group=group)
            try:
                forward_kwargs(ValueLoss(CLIP_EPS), group=group)
                out["error_without_counts"] = ""
            except ValueError as err:
                out["error_without_counts"] = str(err)
            for mode, micro, strategy in _cases():
                loss_fn = ValueLoss(CLIP_EPS, loss_agg_mode=mode)
                keys = ("features", "old_values", "returns", "mask")
                shard = [split_batch(data[k], world, micro)[rank] for k in keys]
                batches = list(zip(*shard, strict=True))
                counts = global_counts([mb[3] for mb in batches], group=group)
                model.zero_grad(set_to_none=True)
                for j, (features, old_values, returns, mask) in enumerate(batches):
                    last = j == len(batches) - 1
                    with contextlib.nullcontext() if last else model.no_sync():
                        values = model(features).squeeze(-1)
                        if strategy == "global":
                            kwargs = forward_kwargs(loss_fn, counts, group=group)
                            loss = loss_fn(values, old_values, returns, mask, **kwargs)
                        else:
                            loss = loss_fn(values, old_values, returns, mask) / micro
                        loss.backward()
                out[(mode, micro, strategy)] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            results[world] = out
        torch.save(results, Path(out_dir) / f"out{rank}.pt")
        # Every rank done before any tears down: rank 2, which skips the 2-rank cases, once hung in
        # destroy_process_group() after ranks 0 and 1 had exited (results written, killed at the deadline).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _launch(tmp_path, deadline_s=100.0):
    """Run the worker on LAUNCH gloo ranks (forks of one fresh interpreter, tests/gloo.py); each rank's results."""
    data_path = tmp_path / "data.pt"
    torch.save({world: _distributed_data(world) for world in WORLDS}, data_path)
    gloo.launch(Path(__file__).resolve(), "_worker", LAUNCH, [data_path, tmp_path], tmp_path, deadline_s)
    return [torch.load(tmp_path / f"out{rank}.pt", weights_only=False) for rank in range(LAUNCH)]


def _reference_grads(data, mode):
    critic = _critic()
    critic.load_state_dict(data["state"])
    values = critic(data["features"]).squeeze(-1)
    loss = reference_loss(values, data["old_values"], data["returns"], data["mask"], mode)
    grads = torch.autograd.grad(loss, list(critic.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Results of one 3-process gloo job (the 3-rank world and a 2-rank subgroup), per rank."""
    return _launch(tmp_path_factory.mktemp("gloo"))


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", WORLDS)
def test_ddp_gradients_equal_full_batch(world, ddp_results):
    """Under gloo DDP, global counts give the full-batch gradient to 1e-12; the per-micro-batch mean does not."""
    results = [rank_results[world] for rank_results in ddp_results[:world]]
    data = _distributed_data(world)
    assert data["mask"].any(-1).sum() >= 3 and not data["mask"][-1].any()  # ragged, and the last shard is empty
    for rank_results in results:
        assert f"has {world} ranks and no counts were given" in rank_results["error_without_counts"]
    for mode in MODES:
        expected = _reference_grads(data, mode)
        for micro in (1, 2):
            for rank_results in results:
                torch.testing.assert_close(rank_results[(mode, micro, "global")], expected, rtol=1e-12, atol=1e-12)
        naive = results[0][(mode, 2, "per-micro-batch")]
        assert (naive - expected).norm() > 1e-3 * expected.norm(), mode


