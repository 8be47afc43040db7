"""Tests of valueloss.inspect: loading, validation errors, the report's numbers, the sample batch and the figure."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from valueloss import inspect as vi

SAMPLE = Path(__file__).resolve().parents[1] / "notebooks" / "data" / "sample_batch.pt"


def _arrays(seed=0, shape=(4, 6)):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(shape, generator=g)
    values = old + 0.3 * torch.randn(shape, generator=g)
    returns = old + 0.5 * torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) < 0.7
    mask[:, 0] = True
    return {"values": values, "old_values": old, "returns": returns, "action_mask": mask}


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("suffix", [".pt", ".npz", ".safetensors"])
def test_round_trip_each_format(tmp_path, suffix):
    """A batch saved as .pt, .npz or .safetensors loads back with the same tensors."""
    data = _arrays()
    path = tmp_path / f"batch{suffix}"
    if suffix == ".pt":
        torch.save(data, path)
    elif suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in data.items()})
    else:
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file({k: v.contiguous() for k, v in data.items()}, str(path))
    batch = vi.load_batch(path)
    for key in ("values", "old_values", "returns"):
        assert torch.equal(getattr(batch, key), data[key])
    assert torch.equal(batch.action_mask, data["action_mask"])
    assert batch.had_mask


def test_load_batch_bytes_matches_file(tmp_path):
    """Uploaded bytes load like the file they came from."""
    path = tmp_path / "b.pt"
    torch.save(_arrays(1), path)
    from_bytes = vi.load_batch_bytes(path.read_bytes(), "b.pt")
    assert torch.equal(from_bytes.values, vi.load_batch(path).values)


def test_mask_alias_float_mask_and_one_dimensional_input():
    """response_mask is accepted as the mask, 0/1 floats become bool, a (T,) batch becomes (1, T)."""
    data = {k: v[0] for k, v in _arrays(2).items()}
    data["response_mask"] = data.pop("action_mask").float()
    batch = vi.validate_batch(data)
    assert batch.values.shape == (1, 6) and batch.action_mask.dtype == torch.bool
    assert batch.action_mask.sum() == data["response_mask"].sum()


def test_no_mask_means_all_tokens_and_extra_keys_listed():
    """Without a mask every token counts; unknown keys are ignored and listed."""
    data = _arrays(3)
    del data["action_mask"]
    data["advantages"] = torch.zeros(4, 6)
    batch = vi.validate_batch(data)
    assert bool(batch.action_mask.all()) and not batch.had_mask
    assert batch.ignored_keys == ("advantages",)


def test_nan_at_masked_positions_is_allowed():
    """NaN where the mask is 0 is padding, not an error."""
    data = _arrays(4)
    data["action_mask"][0, -1] = False
    data["values"][0, -1] = float("nan")
    batch = vi.validate_batch(data)
    assert not batch.action_mask[0, -1]
    report = vi.inspect_batch(batch, clip_eps=0.2)
    assert math.isfinite(report.loss) and math.isfinite(report.explained_variance)


# --------------------------------------------------------------------------- every error path


def _write(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_error_no_such_file(tmp_path):
    """A missing path is a BatchError naming the path."""
    with pytest.raises(vi.BatchError, match="no such file"):
        vi.load_batch(tmp_path / "absent.pt")


def test_error_directory(tmp_path):
    """A directory is not a batch."""
    with pytest.raises(vi.BatchError, match="is a directory"):
        vi.load_batch(tmp_path)


def test_error_garbage_pt(tmp_path):
    """Random bytes in a .pt file: says it does not load with weights_only=True."""
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(vi.BatchError, match=r"weights_only=True"):
        vi.load_batch(path)


class _Custom:
    pass


def test_error_pickled_object_refused_by_weights_only(tmp_path):
    """A .pt holding arbitrary Python objects is refused (never unpickled)."""
    path = _write(tmp_path, "obj.pt", {"values": _Custom()})
    with pytest.raises(vi.BatchError, match="weights_only=True"):
        vi.load_batch(path)


def test_error_not_a_mapping(tmp_path):
    """A .pt holding a list (not a dict) says a dict with the keys was expected."""
    path = _write(tmp_path, "list.pt", [torch.zeros(3)])
    with pytest.raises(vi.BatchError, match="expected a dict with keys values, old_values, returns.*got list"):
        vi.load_batch(path)


def test_error_garbage_npz_and_unknown_suffix(tmp_path):
    """A text file named .npz, and a .csv, are rejected with the reason."""
    bad = tmp_path / "bad.npz"
    bad.write_text("hello")
    with pytest.raises(vi.BatchError, match="not a NumPy .npz archive"):
        vi.load_batch(bad)
    csv = tmp_path / "batch.csv"
    csv.write_text("1,2,3")
    with pytest.raises(vi.BatchError, match=r"unsupported file type '.csv'; expected one of .pt, .pth, .npz"):
        vi.load_batch(csv)


def test_error_garbage_safetensors(tmp_path):
    """Random bytes named .safetensors are rejected."""
    pytest.importorskip("safetensors")
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00" * 20)
    with pytest.raises(vi.BatchError, match="not a safetensors file"):
        vi.load_batch(path)


def test_error_missing_key():
    """Missing keys are named, with the keys that were found."""
    data = _arrays()
    del data["returns"]
    with pytest.raises(vi.BatchError, match="missing key.*returns; found keys: action_mask, old_values, values"):
        vi.validate_batch(data)


@pytest.mark.parametrize("key", ["old_values", "returns", "action_mask"])
def test_error_mismatched_shapes(key):
    """A shape mismatch names both shapes."""
    data = _arrays()
    data[key] = data[key][:, :5]
    with pytest.raises(vi.BatchError, match=rf"values and {key} must have the same shape; got \(4, 6\) and \(4, 5\)"):
        vi.validate_batch(data)


@pytest.mark.parametrize("key", ["values", "old_values", "returns"])
def test_error_nan_at_unmasked_position(key):
    """NaN/inf where the mask is 1 is an error naming the key, the count and the first position."""
    data = _arrays()
    data[key][2, 0] = float("inf")
    message = rf"{key} has 1 NaN/inf value\(s\) at unmasked positions \(first at \(2, 0\)\)"
    with pytest.raises(vi.BatchError, match=message):
        vi.validate_batch(data)


def test_error_empty_mask():
    """A mask with no token selected is an error (nothing to inspect)."""
    data = _arrays()
    data["action_mask"][:] = False
    with pytest.raises(vi.BatchError, match="selects no token"):
        vi.validate_batch(data)


def test_error_other_bad_contents():
    """Non-binary masks, integer values, 3-D and empty tensors, two masks, non-arrays: each has its message."""
    cases = [
        ({"action_mask": torch.full((4, 6), 0.5)}, "must hold only 0/1"),
        ({"values": torch.zeros(4, 6, dtype=torch.int64)}, "values must be floating point; got dtype torch.int64"),
        ({"values": torch.zeros(2, 2, 6)}, r"shape \(B, T\) or \(T,\); got \(2, 2, 6\)"),
        ({"response_mask": torch.ones(4, 6)}, "several masks"),
        ({"returns": [1.0, 2.0]}, "returns must be a tensor or array; got list"),
    ]
    for change, message in cases:
        data = {**_arrays(), **change}
        with pytest.raises(vi.BatchError, match=message):
            vi.validate_batch(data)
    empty = {k: torch.zeros(0, 3) for k in ("values", "old_values", "returns")}
    with pytest.raises(vi.BatchError, match="values is empty"):
        vi.validate_batch(empty)


# --------------------------------------------------------------------------- the report's numbers


def _loop_regions(batch, eps):
    """Clipped (gradient zero) flags by the definition: outside the band and the clipped branch strictly larger."""
    flags = []
    for vr, orow, rr in zip(batch.values.double().tolist(), batch.old_values.double().tolist(),
                            batch.returns.double().tolist(), strict=True):
        row = []
        for v, o, r in zip(vr, orow, rr, strict=True):
            vc = min(max(v, o - eps), o + eps)
            row.append(abs(v - o) > eps and (vc - r) ** 2 > (v - r) ** 2)
        flags.append(row)
    return torch.tensor(flags)


def test_report_numbers_match_loops():
    """Counts, losses, clip fraction, histogram and per-sequence breakdown against plain loops."""
    batch = vi.synthetic_batch(seed=3, batch_size=6, max_len=20)
    eps = 0.2
    report = vi.inspect_batch(batch, clip_eps=eps)
    mask = batch.action_mask
    assert report.num_tokens == int(mask.sum()) and report.num_sequences == 6
    clipped = _loop_regions(batch, eps) & mask
    assert report.clip_fraction == pytest.approx(clipped.sum().item() / mask.sum().item(), rel=1e-6)
    terms_clip, terms_plain = [], []
    for v, o, r in zip(batch.values[mask].double().tolist(), batch.old_values[mask].double().tolist(),
                       batch.returns[mask].double().tolist(), strict=True):
        vc = min(max(v, o - eps), o + eps)
        terms_clip.append(max((vc - r) ** 2, (v - r) ** 2))
        terms_plain.append((v - r) ** 2)
    assert report.loss == pytest.approx(0.5 * sum(terms_clip) / len(terms_clip), rel=1e-5)
    assert report.loss_unclipped == pytest.approx(0.5 * sum(terms_plain) / len(terms_plain), rel=1e-5)
    normalized = ((batch.values - batch.old_values) / eps)[mask].numpy()
    edges = np.array([-1e9 if e == -math.inf else 1e9 if e == math.inf else e for e in vi.HISTOGRAM_EDGES])
    expected_counts = [int(((normalized >= lo) & (normalized < hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:],
                                                                                          strict=True)]
    assert report.histogram_counts == expected_counts
    for s in report.sequences:
        assert s.clipped == int(clipped[s.index].sum()) and s.tokens == int(mask[s.index].sum())
        positions = clipped[s.index].nonzero().flatten().tolist()
        assert s.first_clipped_position == (positions[0] if positions else None)


def test_clip_fraction_by_position_sums_to_clip_count():
    """Position bins partition the tokens: bin fraction times bin size sums to the clipped count."""
    batch = vi.synthetic_batch(seed=4, batch_size=5, max_len=30)
    report = vi.inspect_batch(batch, clip_eps=0.2)
    rank = torch.cumsum(batch.action_mask.long(), 1) - 1
    lengths = batch.action_mask.sum(1, keepdim=True)
    bins = (rank.double() / lengths * 10).long().clamp(max=9)[batch.action_mask]
    sizes = torch.bincount(bins, minlength=10).tolist()
    total = sum(f * n for f, n in zip(report.clip_fraction_by_position, sizes, strict=True))
    assert total == pytest.approx(sum(s.clipped for s in report.sequences))


@pytest.mark.parametrize("variant", ["max", "clipped"])
def test_clip_thresholds_reproduce_the_clip_fraction_at_every_eps(variant):
    """share(threshold > eps) equals the clip fraction from the per-token definition, for many eps."""
    batch = vi.synthetic_batch(seed=5, batch_size=8, max_len=24)
    m = batch.action_mask
    t = vi.clip_thresholds(batch.values.double(), batch.old_values.double(), batch.returns.double(),
                           variant=variant)[m]
    d = (batch.values.double() - batch.old_values.double())[m]
    r = (batch.returns.double() - batch.old_values.double())[m]
    for eps in (0.013, 0.05, 0.1, 0.2, 0.37, 0.8):
        vc = d.clamp(-eps, eps)
        outside = d.abs() > eps
        clipped = outside if variant == "clipped" else outside & ((vc - r) ** 2 > (d - r) ** 2)
        assert float((t > eps).double().mean()) == pytest.approx(float(clipped.double().mean()), abs=1.5 / int(m.sum()))
        curve = vi.clip_fraction_curve(t, torch.tensor([eps]))
        assert float(curve[0]) == pytest.approx(float((t > eps).double().mean()))


def test_suggested_range_hits_the_target():
    """At the suggested bounds, the clip fraction is at the target's ends (within one token)."""
    batch = vi.synthetic_batch(seed=6)
    report = vi.inspect_batch(batch, clip_eps=0.2, target_clip_fraction=(0.05, 0.2))
    low, high = report.suggested_clip_eps
    assert 0 < low < high
    t = vi.clip_thresholds(batch.values, batch.old_values, batch.returns)[batch.action_mask]
    n = t.numel()
    assert float((t > low).double().mean()) == pytest.approx(0.2, abs=2 / n)
    assert float((t > high).double().mean()) == pytest.approx(0.05, abs=2 / n)
    with pytest.raises(ValueError, match="target must be"):
        vi.suggest_clip_eps(t, (0.3, 0.1))


def test_inspect_rejects_bad_settings():
    """clip_eps must be positive and mode one of the aggregation modes."""
    batch = vi.synthetic_batch(seed=0, batch_size=2, max_len=5)
    with pytest.raises(ValueError, match="clip_eps must be a positive number"):
        vi.inspect_batch(batch, clip_eps=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        vi.inspect_batch(batch, mode="mean")


def test_report_json_and_text():
    """to_dict is JSON-serialisable and the text names the key numbers."""
    report = vi.inspect_batch(vi.synthetic_batch(seed=0), clip_eps=0.2)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["num_tokens"] == report.num_tokens and data["histogram_edges"][0] == "-inf"
    assert len(data["sequences"]) == report.num_sequences and "normalized_delta" not in data
    text = vi.format_report(report)
    assert f"{100 * report.clip_fraction:.2f}% of tokens have zero gradient" in text
    assert f"{report.num_tokens} tokens" in text


# --------------------------------------------------------------------------- the sample batch


def test_synthetic_batch_is_reproducible_and_ragged():
    """Same seed, same tensors; lengths vary; padded positions are zero."""
    a, b = vi.synthetic_batch(seed=7), vi.synthetic_batch(seed=7)
    assert torch.equal(a.values, b.values) and torch.equal(a.action_mask, b.action_mask)
    lengths = a.action_mask.sum(1)
    assert lengths.min() < lengths.max()
    assert torch.all(a.values[~a.action_mask] == 0)
    assert not torch.equal(a.values, vi.synthetic_batch(seed=8).values)


def test_shipped_sample_is_synthetic_seed_0_and_small():
    """notebooks/data/sample_batch.pt is synthetic_batch(seed=0) saved with save_batch, under 1 MB."""
    assert SAMPLE.stat().st_size < 1_000_000
    shipped = vi.load_batch(SAMPLE)
    fresh = vi.synthetic_batch(seed=0)
    for key in ("values", "old_values", "returns", "action_mask"):
        assert torch.equal(getattr(shipped, key), getattr(fresh, key)), key


def test_sample_clip_fraction_is_realistic():
    """The sample's drift puts a realistic share of tokens outside a 0.2 band (10-40%)."""
    report = vi.inspect_batch(vi.load_batch(SAMPLE), clip_eps=0.2)
    assert 0.1 < report.outside_band_fraction < 0.4
    assert 0.05 < report.clip_fraction < report.outside_band_fraction


def test_save_batch_npz_round_trip(tmp_path):
    """save_batch writes .npz too, and refuses other suffixes."""
    batch = vi.synthetic_batch(seed=1, batch_size=3, max_len=6)
    vi.save_batch(batch, tmp_path / "b.npz")
    assert torch.equal(vi.load_batch(tmp_path / "b.npz").returns, batch.returns)
    with pytest.raises(ValueError, match="must end in .pt, .pth or .npz"):
        vi.save_batch(batch, tmp_path / "b.txt")


# --------------------------------------------------------------------------- the figure


def test_plot_report_artist_data(tmp_path):
    """The figure shows the report's curve, the band lines at +-1 and one bar per sequence; the PNG is written."""
    import matplotlib

    matplotlib.use("Agg")
    report = vi.inspect_batch(vi.synthetic_batch(seed=0), clip_eps=0.2)
    path = tmp_path / "r.png"
    fig = vi.plot_report(report, path)
    ax_hist, ax_curve, ax_pos, ax_seq = fig.axes
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(line.get_xdata()[0] for line in ax_hist.get_lines()) == [-1, 1]
    assert sum(p.get_height() for p in ax_hist.patches) == report.num_tokens
    curve = ax_curve.get_lines()[0]
    np.testing.assert_allclose(curve.get_ydata(), report.curve_clip_fraction)
    heights = [p.get_height() for p in ax_pos.patches]
    np.testing.assert_allclose(heights, report.clip_fraction_by_position)
    assert len(ax_seq.patches) == 2 * report.num_sequences
    assert "0.2" in ax_hist.get_title()


def test_import_does_not_load_matplotlib():
    """import valueloss.inspect (and valueloss.cli, valueloss.peers) leaves matplotlib unloaded."""
    code = "import sys, valueloss.inspect, valueloss.cli, valueloss.peers; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_analysing_the_sample_is_cheap():
    """Loading, analysing and formatting the sample costs well under a second of CPU (torch import excluded)."""
    import time

    vi.format_report(vi.inspect_batch(vi.load_batch(SAMPLE)))  # warm up lazy torch kernels
    start = time.process_time()
    vi.format_report(vi.inspect_batch(vi.load_batch(SAMPLE), clip_eps=0.2))
    assert time.process_time() - start < 0.5
