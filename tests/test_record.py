"""Tests of valueloss.record: what a file holds, the bounds, row sampling, no host sync between records,
the wrappers around other loss functions, and per-rank shards under a real two-process gloo run."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import gloo
import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from valueloss import ValueLoss
from valueloss.functional import LossConfig
from valueloss.record import Recorder, recorded_files


def _batch(rows=3, length=5, *, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, length, generator=gen).to(dtype)
    old_values = torch.randn(rows, length, generator=gen).to(dtype)
    returns = torch.randn(rows, length, generator=gen).to(dtype)
    mask = torch.arange(length)[None, :] < torch.randint(1, length + 1, (rows, 1), generator=gen)
    return values, old_values, returns, mask


def _read(path):
    """A recorded file's arrays and its decoded settings and meta, read with NumPy alone and no pickles."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    return arrays, json.loads(str(arrays.pop("settings"))), json.loads(str(arrays.pop("meta")))


def test_every_nth_call_is_saved_with_its_settings_and_step(tmp_path):
    """every=3 saves calls 3 and 6 (1-based), with the exact tensors, the LossConfig fields and the call number."""
    loss_fn = ValueLoss(0.3, loss_agg_mode="seq-mean-token-mean", recorder=Recorder(tmp_path, every=3))
    batches = [_batch(seed=seed) for seed in range(7)]
    for batch in batches:
        loss_fn(*batch)
    paths = recorded_files(tmp_path)
    assert [p.name for p in paths] == ["step-00000003-rank0.npz", "step-00000006-rank0.npz"]
    for path, call in zip(paths, (3, 6), strict=True):
        arrays, settings, meta = _read(path)
        for key, tensor in zip(("values", "old_values", "returns", "action_mask"), batches[call - 1], strict=True):
            np.testing.assert_array_equal(arrays[key], tensor.numpy())
            assert arrays[key].dtype == tensor.numpy().dtype
        assert settings == {"clip_eps": 0.3, "variant": "max", "mode": "seq-mean-token-mean", "loss_type": "squared",
                            "huber_delta": 1.0, "scale": 0.5, "loss_scale_factor": None}
        assert (meta["step"], meta["call"], meta["rank"], meta["world_size"]) == (call, call, 0, 1)
        assert meta["rows_kept"] is None and meta["rows_total"] == 3 and meta["shape"] == [3, 5]


def test_the_step_attribute_names_the_file_and_half_precision_is_upcast_exactly(tmp_path):
    """recorder.step names the file; bfloat16 and float16 arrive as float32 with the same numbers; float64 stays."""
    recorder = Recorder(tmp_path, every=1)
    for step, dtype in ((10, torch.bfloat16), (20, torch.float16), (30, torch.float64)):
        recorder.step = np.int64(step)  # a trainer's step may be a NumPy integer
        values, old_values, returns, mask = _batch(dtype=dtype)
        path = recorder(values, old_values, returns, mask, clip_eps=0.2)
        arrays, _, meta = _read(path)
        assert path.name == f"step-{step:08d}-rank0.npz" and meta["dtype"] == str(dtype).removeprefix("torch.")
        expected = np.float64 if dtype == torch.float64 else np.float32
        assert arrays["values"].dtype == expected
        np.testing.assert_array_equal(arrays["values"], values.double().numpy())


def test_a_recorded_file_is_a_batch_that_inspect_reads(tmp_path):
    """load_batch reads a recorded file as-is: its arrays, the mask, and the extra keys listed as ignored."""
    from valueloss.batch import load_batch

    values, old_values, returns, mask = _batch(4, 6, seed=3)
    path = Recorder(tmp_path, every=1).record(values, old_values, returns, mask)
    batch = load_batch(path)
    np.testing.assert_array_equal(batch.values, values.numpy())
    np.testing.assert_array_equal(batch.action_mask, mask.numpy())
    assert batch.ignored_keys == ("meta", "settings")


def test_max_files_drops_the_oldest_file(tmp_path):
    """With max_files=2, after 4 records only the last two remain; a new recorder on the same folder counts them."""
    recorder = Recorder(tmp_path, every=1, max_files=2)
    for step in range(4):
        recorder(*_batch(seed=step), step=step)
    assert [p.name for p in recorded_files(tmp_path)] == ["step-00000002-rank0.npz", "step-00000003-rank0.npz"]
    resumed = Recorder(tmp_path, every=1, max_files=2)
    resumed(*_batch(), step=4)
    assert [p.name for p in recorded_files(tmp_path)] == ["step-00000003-rank0.npz", "step-00000004-rank0.npz"]


def test_max_megabytes_drops_the_oldest_and_keeps_an_oversized_newest(tmp_path):
    """The byte bound deletes the oldest files until the rest fit; a newest file alone above it is kept (warned)."""
    one = Recorder(tmp_path / "probe", every=1).record(*_batch(8, 100)).stat().st_size
    recorder = Recorder(tmp_path / "run", every=1, max_files=None, max_megabytes=2.5 * one / 1e6)
    for step in range(5):
        recorder(*_batch(8, 100, seed=step), step=step)
    assert [p.name for p in recorded_files(tmp_path / "run")] == ["step-00000003-rank0.npz", "step-00000004-rank0.npz"]
    tiny = Recorder(tmp_path / "tiny", every=1, max_megabytes=one / 2e6)
    with pytest.warns(UserWarning, match="alone is"):
        tiny(*_batch(8, 100), step=0)
        tiny(*_batch(8, 100), step=1)
    assert [p.name for p in recorded_files(tmp_path / "tiny")] == ["step-00000001-rank0.npz"]


def test_huge_batches_keep_a_stated_sample_of_rows(tmp_path):
    """Above max_rows, a sorted random sample of rows is kept; meta lists them and the arrays are those rows."""
    values, old_values, returns, mask = _batch(50, 4, seed=5)
    arrays, _, meta = _read(Recorder(tmp_path, every=1, max_rows=7).record(values, old_values, returns, mask))
    rows = meta["rows_kept"]
    assert len(rows) == 7 == len(set(rows)) and rows == sorted(rows) and meta["rows_total"] == 50
    np.testing.assert_array_equal(arrays["returns"], returns[rows].numpy())
    np.testing.assert_array_equal(arrays["action_mask"], mask[rows].numpy())


class _LogTorchCalls(TorchFunctionMode):
    """Logs the name of every torch function and Tensor method called inside the block."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


def test_calls_between_records_touch_no_tensor(tmp_path):
    """A call that is not recorded runs exactly the torch calls of a loss without a recorder (no .cpu(), .item(),
    .numpy(): no host sync); the recorded call is the one that copies to the host."""
    batch = _batch(4, 6, seed=1)

    def torch_calls(loss_fn):
        with _LogTorchCalls() as log:
            loss_fn(*batch)
        return log.names

    plain = torch_calls(ValueLoss(0.2))
    recording = ValueLoss(0.2, recorder=Recorder(tmp_path, every=3))
    assert torch_calls(recording) == plain and torch_calls(recording) == plain  # calls 1 and 2
    recorded = torch_calls(recording)  # call 3 is recorded
    assert recorded[: len(plain)] == plain and "cpu" in recorded[len(plain):] and "numpy" in recorded[len(plain):]
    assert len(recorded_files(tmp_path)) == 1


def test_attach_wrap_and_patch_record_around_other_code(tmp_path):
    """attach() sets and restores a ValueLoss's recorder; patch() records a verl-style function's inputs under its
    own parameter names, with its settings, and restores the function."""
    loss_fn = ValueLoss(0.2)
    with Recorder(tmp_path / "attach", every=1).attach(loss_fn):
        loss_fn(*_batch())
    assert loss_fn.recorder is None and len(recorded_files(tmp_path / "attach")) == 1

    class core_algos:  # noqa: N801 -- the name of verl's module
        @staticmethod
        def compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean"):
            return ValueLoss(cliprange_value, loss_agg_mode=loss_agg_mode)(vpreds, values, returns, response_mask)

    original = core_algos.compute_value_loss
    values, old_values, returns, mask = _batch(seed=9)
    recorder = Recorder(tmp_path / "patch", every=2)
    with recorder.patch(core_algos, "compute_value_loss", values="vpreds", old_values="values",
                        action_mask="response_mask", clip_eps="cliprange_value", mode="loss_agg_mode"):
        for _ in range(2):
            core_algos.compute_value_loss(vpreds=values, values=old_values, returns=returns, response_mask=mask,
                                          cliprange_value=0.1, loss_agg_mode="token-sum")
    assert core_algos.compute_value_loss is original
    (path,) = recorded_files(tmp_path / "patch")
    arrays, settings, _ = _read(path)
    np.testing.assert_array_equal(arrays["old_values"], old_values.numpy())
    np.testing.assert_array_equal(arrays["values"], values.numpy())
    assert (settings["clip_eps"], settings["mode"]) == (0.1, "token-sum")
    with pytest.raises(TypeError, match=r"has no parameter\(s\) \['values'\]"):
        recorder.wrap(lambda vpreds, old_values, returns: 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"every": 0}, "every must be a whole number >= 1; got 0"),
     ({"max_files": 1.5}, "max_files must be a whole number >= 1 or None; got 1.5"),
     ({"max_megabytes": -1}, "max_megabytes must be a positive finite number or None; got -1"),
     ({"ranks": "one"}, "ranks must be 'all' or 'zero'; got 'one'")],
)
def test_bad_settings_name_the_argument(tmp_path, kwargs, message):
    """Each bad setting raises ValueError naming the argument, what was expected and what arrived."""
    with pytest.raises(ValueError, match=message):
        Recorder(tmp_path, **kwargs)


def test_bad_inputs_raise_before_anything_is_written(tmp_path):
    """Mismatched shapes and a non-callable recorder raise, naming the argument; nothing is written."""
    values = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"same shape; got \(2, 3\), \(2, 3\) and \(3,\)"):
        Recorder(tmp_path, every=1).record(values, values, torch.zeros(3))
    with pytest.raises(ValueError, match=r"step must be a whole number >= 0; got 1.5"):
        Recorder(tmp_path, every=1).record(values, values, values, step=1.5)
    with pytest.raises(TypeError, match="recorder must be a valueloss.record.Recorder"):
        ValueLoss(0.2, recorder="runs/vl")
    assert not any(tmp_path.iterdir())
    assert LossConfig().clip_eps is None  # the settings' defaults are what record() saves when none are given


# --------------------------------------------------------------------------- the snippets of docs/record.md

DOC = Path(__file__).resolve().parents[1] / "docs" / "record.md"


def test_doc_snippets_record_from_each_trainer(tmp_path, monkeypatch):
    """Each python block of docs/record.md runs as written (with stand-ins for the trainers' objects) and the
    recorder it sets up writes the 50th call's batch, under the trainer's own argument names."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 6, "docs/record.md: OpenRLHF, verl, TRL (setup, call), CleanRL (setup, call)"
    openrlhf, verl, trl_setup, trl_call, cleanrl_setup, cleanrl_call = blocks
    monkeypatch.chdir(tmp_path)
    values, old_values, returns, mask = _batch(4, 6, seed=2)

    def recorded(name, step=50):
        files = recorded_files(tmp_path / "runs" / name)
        assert [p.name for p in files] == [f"step-{step:08d}-rank0.npz"], name
        return _read(files[0])

    namespace: dict = {}
    exec(openrlhf, namespace)
    for _ in range(50):
        namespace["critic_loss_fn"](values, old_values, returns, action_mask=mask)
    assert recorded("openrlhf-critic")[1]["clip_eps"] == 0.2

    from valueloss.peers import verl_value_loss

    core_algos = types.ModuleType("verl.trainer.ppo.core_algos")

    def compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean"):
        return verl_value_loss(vpreds, values, returns, response_mask, clip_eps=cliprange_value,
                               loss_agg_mode=loss_agg_mode)

    core_algos.compute_value_loss = compute_value_loss
    for name in ("verl", "verl.trainer", "verl.trainer.ppo"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(sys.modules["verl.trainer.ppo"], "core_algos", core_algos, raising=False)
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", core_algos)
    exec(verl, {})
    for _ in range(50):  # as verl's critic worker calls it
        loss, clipfrac = core_algos.compute_value_loss(vpreds=values, values=old_values, returns=returns,
                                                       response_mask=mask, cliprange_value=0.5,
                                                       loss_agg_mode="seq-mean-token-mean")
    assert torch.equal(loss, compute_value_loss(values, returns, old_values, mask, 0.5, "seq-mean-token-mean")[0])
    arrays, settings, _ = recorded("verl-critic")
    np.testing.assert_array_equal(arrays["old_values"], old_values.numpy())
    assert (settings["clip_eps"], settings["mode"]) == (0.5, "seq-mean-token-mean")

    trl = {"vpred": values, "mb_values": old_values, "mb_return": returns, "padding_mask_p1": ~mask,
           "micro_batch_inds": torch.arange(4), "args": types.SimpleNamespace(cliprange_value=0.2)}
    exec(trl_setup, trl)
    for update in range(1, 51):
        exec(trl_call, trl | {"update": update})
    arrays, _, meta = recorded("trl-critic")
    np.testing.assert_array_equal(arrays["action_mask"], mask.numpy())
    assert meta["step"] == 50

    cleanrl = {"newvalue": values.reshape(-1), "b_values": old_values.reshape(-1), "b_returns": returns.reshape(-1),
               "mb_inds": torch.arange(24), "args": types.SimpleNamespace(clip_coef=0.2), "global_step": 6400}
    exec(cleanrl_setup, cleanrl)
    for _ in range(50):
        exec(cleanrl_call, cleanrl)
    arrays, _, meta = recorded("cleanrl-critic", step=6400)
    assert arrays["values"].shape == (1, 24) and meta["step"] == 6400 and meta["shape"] == [24]


# --------------------------------------------------------------------------- two ranks under gloo


def _worker(rank, port, directory):
    """One of two gloo ranks: four loss calls with a recorder per rank ("all") and one on rank 0 only ("zero")."""
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        every_rank = ValueLoss(0.2, recorder=Recorder(Path(directory) / "all", every=2))
        rank_zero = ValueLoss(0.2, recorder=Recorder(Path(directory) / "zero", every=2, ranks="zero"))
        for call in range(4):
            batch = _batch(seed=10 * rank + call)
            every_rank(*batch)
            rank_zero(*batch)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_gloo_ranks_write_their_own_shards(tmp_path):
    """Under a two-process gloo run, ranks="all" writes one shard per rank (rank in the name, its own data) and
    ranks="zero" writes rank 0's only."""
    gloo.launch(Path(__file__).resolve(), "_worker", 2, [tmp_path], tmp_path, deadline_s=90)
    names = [p.name for p in recorded_files(tmp_path / "all")]
    assert names == ["step-00000002-rank0.npz", "step-00000002-rank1.npz",
                     "step-00000004-rank0.npz", "step-00000004-rank1.npz"]
    for rank in range(2):
        arrays, _, meta = _read(tmp_path / "all" / f"step-00000004-rank{rank}.npz")
        assert (meta["rank"], meta["world_size"]) == (rank, 2)
        np.testing.assert_array_equal(arrays["values"], _batch(seed=10 * rank + 3)[0].numpy())
    assert [p.name for p in recorded_files(tmp_path / "zero")] == ["step-00000002-rank0.npz", "step-00000004-rank0.npz"]
