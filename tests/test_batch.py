"""Tests of valueloss.batch (io, synthetic, report): loading, validation errors, the report's numbers against
tests/reference.py, the sample batch; and of its figure, valueloss.viz.batch_plot."""

import json
import math
from pathlib import Path

import fresh
import numpy as np
import pytest
import reference
import torch
from bands import band
from hypothesis import given, settings
from hypothesis import strategies as st

import valueloss.batch as vi
from valueloss import diagnose, functional
from valueloss.batch import report as report_module
from valueloss.batch.io import PT_MIN_TORCH
from valueloss.batch.report import HISTOGRAM_EDGES

reads_pt = pytest.mark.skipif(torch.__version__ < PT_MIN_TORCH, reason=f".pt files are refused below torch "
                              f"{PT_MIN_TORCH} (tests/test_adversarial.py checks the refusal)")

SAMPLE = Path(__file__).resolve().parents[1] / "notebooks" / "data" / "sample_batch.npz"
INSIDE, CLIPPED, UNCLIPPED = 0, 1, 2  # the region codes of reference.token_region
REPORTED = ("loss", "loss_unclipped", "clip_fraction", "outside_band_fraction", "explained_variance", "mean_abs_error")


def _arrays(seed=0, shape=(4, 6)):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(shape, generator=g)
    values = old + 0.3 * torch.randn(shape, generator=g)
    returns = old + 0.5 * torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) < 0.7
    mask[:, 0] = True
    return {"values": values, "old_values": old, "returns": returns, "action_mask": mask}


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("suffix", [pytest.param(".pt", marks=reads_pt), ".npz", ".safetensors"])
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
    for key in ("values", "old_values", "returns", "action_mask"):
        np.testing.assert_array_equal(getattr(batch, key), data[key].numpy(), strict=True)
    assert batch.had_mask and batch.dtype == "float32"


@reads_pt
def test_load_batch_bytes_matches_file(tmp_path):
    """Uploaded bytes load like the file they came from."""
    path = tmp_path / "b.pt"
    torch.save(_arrays(1), path)
    from_bytes = vi.load_batch_bytes(path.read_bytes(), "b.pt")
    np.testing.assert_array_equal(from_bytes.values, vi.load_batch(path).values, strict=True)


def test_mask_alias_float_mask_and_one_dimensional_input():
    """response_mask is accepted as the mask, 0/1 floats become bool, a (T,) batch becomes (1, T)."""
    data = {k: v[0] for k, v in _arrays(2).items()}
    data["response_mask"] = data.pop("action_mask").float()
    batch = vi.validate_batch(data)
    assert batch.values.shape == (1, 6) and batch.action_mask.dtype == np.bool_
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


@reads_pt
def test_error_garbage_pt(tmp_path):
    """Random bytes in a .pt file: says it does not load with weights_only=True."""
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(vi.BatchError, match=r"weights_only=True"):
        vi.load_batch(path)


class _Custom:
    pass


@reads_pt
def test_error_pickled_object_refused_by_weights_only(tmp_path):
    """A .pt holding arbitrary Python objects is refused (never unpickled)."""
    path = _write(tmp_path, "obj.pt", {"values": _Custom()})
    with pytest.raises(vi.BatchError, match="weights_only=True"):
        vi.load_batch(path)


@reads_pt
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


def test_wrong_argument_types_name_the_argument(tmp_path):
    """An argument of the wrong type is a TypeError naming the argument, what was expected and what arrived."""
    batch = vi.synthetic_batch(seed=0, batch_size=2, max_len=5)
    cases = [
        (lambda: vi.load_batch(None), r"path must be a str or os.PathLike naming a batch file; got NoneType"),
        (lambda: vi.load_batch_bytes("abc", "b.npz"), r"data must be the file's bytes .*; got str"),
        (lambda: vi.load_batch_bytes(b"abc", None), r"filename must be a str .*; got NoneType"),
        (lambda: vi.save_batch({"values": 1}, tmp_path / "b.npz"), r"batch must be a Batch .*; got dict"),
        (lambda: vi.save_batch(batch, 7), r"path must be a str or os.PathLike ending in .pt, .pth or .npz; got int"),
        (lambda: vi.inspect_batch({"values": 1}), r"batch must be a valueloss.batch.Batch .*; got dict"),
        (lambda: vi.format_report(batch), r"report must be an InspectReport \(from inspect_batch\); got Batch"),
        (lambda: vi.synthetic_batch(seed=0.5), r"seed must be an integer; got float"),
    ]
    for call, message in cases:
        with pytest.raises(TypeError, match=message):
            call()
    with pytest.raises(ValueError, match=r"got batch_size=2, min_len=5, max_len=3"):
        vi.synthetic_batch(batch_size=2, min_len=5, max_len=3)


def test_validate_accepts_numpy_and_torch_alike():
    """The same batch given as NumPy arrays or as torch tensors validates to equal arrays, copied from the input."""
    data = _arrays(5)
    from_torch = vi.validate_batch(data)
    arrays = {k: v.numpy() for k, v in data.items()}
    from_numpy = vi.validate_batch(arrays)
    for key in ("values", "old_values", "returns", "action_mask"):
        np.testing.assert_array_equal(getattr(from_torch, key), getattr(from_numpy, key), strict=True)
    assert from_torch.dtype == from_numpy.dtype == "float32" and isinstance(from_torch.values, np.ndarray)
    arrays["values"][0, 0] = 123.0
    assert from_numpy.values[0, 0] != 123.0


def test_half_precision_is_widened_and_named():
    """bfloat16 tensors and float16 arrays become float32 arrays (exactly); dtype says what was loaded."""
    data = _arrays(6)
    bf16 = vi.validate_batch({**data, **{k: data[k].bfloat16() for k in ("values", "old_values", "returns")}})
    assert bf16.dtype == "bfloat16" and bf16.values.dtype == np.float32
    np.testing.assert_array_equal(bf16.values, data["values"].bfloat16().float().numpy())
    f16 = vi.validate_batch({k: v.numpy().astype(np.float16) if k != "action_mask" else v.numpy()
                             for k, v in data.items()})
    assert f16.dtype == "float16" and f16.returns.dtype == np.float32
    mixed = vi.validate_batch({**data, "returns": data["returns"].double()})
    assert mixed.dtype == "float64" and mixed.values.dtype == np.float64
    assert vi.inspect_batch(bf16).dtype == "bfloat16"


def test_safetensors_bfloat16_falls_back_to_torch(tmp_path):
    """A bfloat16 .safetensors file (NumPy has no bfloat16) loads through safetensors.torch as float32 values."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    data = {k: (v.bfloat16() if v.is_floating_point() else v).contiguous() for k, v in _arrays(7).items()}
    path = tmp_path / "b.safetensors"
    safetensors_torch.save_file(data, str(path))
    batch = vi.load_batch(path)
    assert batch.dtype == "bfloat16" and batch.values.dtype == np.float32
    np.testing.assert_array_equal(batch.old_values, data["old_values"].float().numpy())
    np.testing.assert_array_equal(batch.action_mask, data["action_mask"].numpy())


def test_batch_tensors_gives_torch_copies():
    """Batch.tensors() returns (values, old_values, returns, action_mask) as new torch tensors of the same data."""
    batch = vi.synthetic_batch(seed=2, batch_size=3, max_len=7)
    values, old_values, returns, mask = batch.tensors()
    assert values.dtype == torch.float32 and mask.dtype == torch.bool
    for tensor, array in zip((values, old_values, returns, mask),
                             (batch.values, batch.old_values, batch.returns, batch.action_mask)):
        np.testing.assert_array_equal(tensor.numpy(), array, strict=True)
    values[0, 0] = 99.0
    assert batch.values[0, 0] != 99.0


# --------------------------------------------------------------------------- the report's numbers


def _loop_regions(batch, eps, variant="max", band_closed=None):
    """Each token's region code from reference.token_region (plain floats), as a (B, T) array."""
    rows = zip(batch.values.astype(float).tolist(), batch.old_values.astype(float).tolist(),
               batch.returns.astype(float).tolist(), strict=True)
    return np.array([[reference.token_region(v, o, r, eps, variant, band_closed=band_closed)
                      for v, o, r in zip(*row, strict=True)] for row in rows])


def _loop_report(batch, eps, mode, variant, band_closed=None):
    """The report's six headline numbers from tests/reference.py's plain loops (masked-out tokens skipped)."""
    tensors = [torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in (batch.values, batch.old_values,
                                                                            batch.returns)]
    mask = torch.from_numpy(np.asarray(batch.action_mask))
    regions = _loop_regions(batch, eps, variant, band_closed)[batch.action_mask]
    n = int(batch.action_mask.sum())
    errors = [abs(r - v) for v, r in zip(batch.values[batch.action_mask].astype(float).tolist(),
                                         batch.returns[batch.action_mask].astype(float).tolist(), strict=True)]
    return {
        "loss": reference.loss_loops(*tensors, mask, clip_eps=eps, variant=variant, mode=mode),
        "loss_unclipped": reference.loss_loops(*tensors, mask, mode=mode),
        "clip_fraction": int((regions == CLIPPED).sum()) / n,
        "outside_band_fraction": int((regions != INSIDE).sum()) / n,
        "explained_variance": reference.explained_variance_loops(tensors[0], tensors[2], mask),
        "mean_abs_error": sum(errors) / n,
    }


def test_report_numbers_match_loops():
    """Counts, losses, clip fraction, histogram and per-sequence breakdown against plain loops."""
    batch = vi.synthetic_batch(seed=3, batch_size=6, max_len=20)
    eps = 0.2
    report = vi.inspect_batch(batch, clip_eps=eps)
    mask = batch.action_mask
    assert report.num_tokens == int(mask.sum()) and report.num_sequences == 6
    clipped = (_loop_regions(batch, eps) == CLIPPED) & mask
    assert report.clip_fraction == pytest.approx(clipped.sum() / mask.sum(), rel=1e-12)
    terms_clip, terms_plain = [], []
    for v, o, r in zip(batch.values[mask].astype(float).tolist(), batch.old_values[mask].astype(float).tolist(),
                       batch.returns[mask].astype(float).tolist(), strict=True):
        vc = min(max(v, o - eps), o + eps)
        terms_clip.append(max((vc - r) ** 2, (v - r) ** 2))
        terms_plain.append((v - r) ** 2)
    assert report.loss == pytest.approx(0.5 * sum(terms_clip) / len(terms_clip), rel=1e-12)
    assert report.loss_unclipped == pytest.approx(0.5 * sum(terms_plain) / len(terms_plain), rel=1e-12)
    normalized = [(v - o) / eps for v, o in zip(batch.values[mask].astype(float).tolist(),
                                                 batch.old_values[mask].astype(float).tolist(), strict=True)]
    edges = HISTOGRAM_EDGES
    expected_counts = [sum(lo <= x < hi for x in normalized) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    assert report.histogram_counts == expected_counts
    for s in report.sequences:
        assert s.clipped == int(clipped[s.index].sum()) and s.tokens == int(mask[s.index].sum())
        positions = np.flatnonzero(clipped[s.index]).tolist()
        assert s.first_clipped_position == (positions[0] if positions else None)
    assert report.tokens_per_sequence["median"] == sorted(mask.sum(1).tolist())[(6 - 1) // 2]


def test_clip_fraction_by_position_against_loops():
    """Each tenth's clip fraction is clipped / tokens among tokens whose rank / row length falls in that tenth."""
    batch = vi.synthetic_batch(seed=4, batch_size=5, max_len=30)
    report = vi.inspect_batch(batch, clip_eps=0.2)
    clipped = _loop_regions(batch, 0.2) == CLIPPED
    tokens, hits = [0] * 10, [0] * 10
    for row_mask, row_clipped in zip(batch.action_mask.tolist(), clipped.tolist(), strict=True):
        n, rank = sum(row_mask), 0
        for keep, c in zip(row_mask, row_clipped, strict=True):
            if keep:
                b = min(int(rank / n * 10), 9)
                tokens[b] += 1
                hits[b] += c
                rank += 1
    expected = [h / t if t else 0.0 for h, t in zip(hits, tokens, strict=True)]
    assert report.clip_fraction_by_position == pytest.approx(expected, rel=1e-12)


def _ragged(seed, batch_size, max_len, empty_rows=()):
    """A float64 batch with random lengths (some rows possibly empty) and NaN in the padding."""
    rng = np.random.default_rng(seed)
    old = rng.normal(size=(batch_size, max_len))
    values = old + 0.3 * rng.standard_t(3, size=old.shape)
    returns = old + 0.5 * rng.normal(size=old.shape)
    lengths = rng.integers(1, max_len + 1, size=batch_size)
    lengths[list(empty_rows)] = 0
    mask = np.arange(max_len)[None, :] < lengths[:, None]
    values[~mask] = np.nan
    return vi.Batch(values, old, returns, mask)


GRID = [(0, 1, 1, ()), (1, 1, 7, ()), (2, 5, 9, (1, 3)), (3, 41, 401, (0, 17, 40)), (4, 8, 3, (7,))]


@pytest.mark.parametrize("variant", functional.VARIANTS)
@pytest.mark.parametrize("mode", functional.AGGREGATION_MODES)
@pytest.mark.parametrize("case", GRID, ids=[f"{b}x{t}-empty{len(e)}" for _, b, t, e in GRID])
def test_report_equals_loops_on_ragged_batches(case, mode, variant):
    """Loss, clip fraction, share outside, EV and MAE equal tests/reference.py's plain loops (rtol 1e-12), with
    empty rows and NaN in the padding."""
    seed, batch_size, max_len, empty_rows = case
    batch = _ragged(seed, batch_size, max_len, empty_rows)
    for eps in (0.05, 0.3):
        report = vi.inspect_batch(batch, clip_eps=eps, mode=mode, variant=variant)
        expected = _loop_report(batch, eps, mode, variant)
        for key in REPORTED:
            assert getattr(report, key) == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key
        assert report.num_tokens == int(batch.action_mask.sum())


DYADIC = st.integers(-12, 12).map(lambda k: k / 8)


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(DYADIC, DYADIC, st.one_of(DYADIC, st.none()), st.booleans()), min_size=6, max_size=6),
    eps=st.sampled_from([0.125, 0.25, 0.5, 1.0]),
    mode=st.sampled_from(functional.AGGREGATION_MODES),
    variant=st.sampled_from(functional.VARIANTS),
    band_closed=st.booleans(),
)
def test_report_equals_loops_with_ties_and_band_edges(data, eps, mode, variant, band_closed):
    """On eighths (|v - old| = eps happens exactly; returns None = the tie point) counts and losses equal the
    plain loops', with the band closed (torch <= 2.13) and open (torch >= 2.14) on any installed torch."""
    # A return halfway between v and its clipped value makes both branches of the max equal (an exact tie).
    data = [(v, o, (v + o + min(max(v - o, -eps), eps)) / 2 if r is None else r, m) for v, o, r, m in data]
    values, old_values, returns, mask = (np.array(column).reshape(2, 3) for column in zip(*data))
    mask[0, 0] = True
    batch = vi.Batch(values, old_values, returns, mask)
    with band(band_closed):
        report = vi.inspect_batch(batch, clip_eps=eps, mode=mode, variant=variant)
    expected = _loop_report(batch, eps, mode, variant, band_closed)
    for key in REPORTED:
        assert getattr(report, key) == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key
    regions = _loop_regions(batch, eps, variant, band_closed)
    for s in report.sequences:
        row = regions[s.index][mask[s.index]]
        assert (s.clipped, s.outside_unclipped) == (int((row == CLIPPED).sum()),
                                                    int((row == UNCLIPPED).sum()))


@pytest.mark.parametrize("band_closed", [True, False], ids=["closed", "open"])
def test_band_edge_and_tie_by_hand(band_closed):
    """|v - old| = eps is inside a closed band (torch <= 2.13) and outside an open one (torch >= 2.14), where
    v_clip == v makes it a tie; an exact tie of the two branches is outside but keeps its gradient."""
    # Tokens (old = 0, eps = 0.25): on the +edge, on the -edge, a tie (v = 0.75, R = 0.5), clipped, inside.
    values = np.array([[0.25, -0.25, 0.75, 0.75, 0.125]])
    returns = np.array([[1.0, -1.0, 0.5, 1.0, 0.0]])
    with band(band_closed):
        batch = vi.Batch(values, np.zeros_like(values), returns, np.ones((1, 5), bool))
        report = vi.inspect_batch(batch, clip_eps=0.25)
    edges_outside = 0 if band_closed else 2
    assert report.outside_band_fraction == pytest.approx((2 + edges_outside) / 5)
    assert report.clip_fraction == pytest.approx(1 / 5)
    (row,) = report.sequences
    assert (row.clipped, row.outside_unclipped, row.first_clipped_position) == (1, 1 + edges_outside, 3)
    # Histogram bins are [lo, hi): +1.0 counts in [+1.0, +1.5), -1.0 in [-1.0, -0.5); 3.0 in [+3.0, +inf).
    counts = dict(zip(HISTOGRAM_EDGES[:-1], report.histogram_counts, strict=True))
    assert (counts[1.0], counts[-1.0], counts[3.0], counts[0.5]) == (1, 1, 2, 1)
    thresholds = vi.clip_thresholds(values, np.zeros_like(values), returns)
    np.testing.assert_array_equal(thresholds, [[0.25, 0.25, 0.25, 0.75, 0.0]])
    assert vi.clip_fraction_curve(thresholds, [0.25, 0.2499]).tolist() == [1 / 5, 4 / 5]


def test_sample_report_equals_diagnose_in_float32():
    """On the float32 sample, the float64 report equals diagnose on the float32 tensors to rtol 1e-6, every mode."""
    batch = vi.load_batch(SAMPLE)
    tensors = batch.tensors()
    for mode in functional.AGGREGATION_MODES:
        report = vi.inspect_batch(batch, clip_eps=0.2, mode=mode)
        expected = diagnose(*tensors, clip_eps=0.2, mode=mode).to_dict()
        for key in REPORTED:
            assert getattr(report, key) == pytest.approx(expected[key], rel=1e-6), (mode, key)


def test_sample_report_equals_loops():
    """On the shipped float32 sample every mode's headline numbers equal the plain loops' (rtol 1e-12)."""
    batch = vi.load_batch(SAMPLE)
    for mode in functional.AGGREGATION_MODES:
        report = vi.inspect_batch(batch, clip_eps=0.2, mode=mode)
        expected = _loop_report(batch, 0.2, mode, "max")
        for key in REPORTED:
            assert getattr(report, key) == pytest.approx(expected[key], rel=1e-12), (mode, key)


def test_report_has_no_math_of_its_own():
    """The report calls diagnose and functional.clip_regions with a functional.LossConfig, the CLI offers
    functional's modes, and no copy of the loss, the aggregation or the band's edges is left."""
    from valueloss.batch import cli

    module = report_module
    assert module.diagnose is diagnose and module.clip_regions is functional.clip_regions
    assert module.LossConfig is functional.LossConfig and cli.AGGREGATION_MODES is functional.AGGREGATION_MODES
    for name in ("band_closed", "_torch_version", "_release", "_aggregate", "_token_losses", "_explained_variance"):
        assert not hasattr(module, name), name


@pytest.mark.parametrize("variant", ["max", "clipped"])
def test_clip_thresholds_reproduce_the_clip_fraction_at_every_eps(variant):
    """share(threshold > eps) equals the clip fraction from the per-token definition, for many eps."""
    batch = vi.synthetic_batch(seed=5, batch_size=8, max_len=24)
    m = batch.action_mask
    v, o, r = (a.astype(np.float64) for a in (batch.values, batch.old_values, batch.returns))
    t = vi.clip_thresholds(v, o, r, variant=variant)[m]
    assert t.dtype == np.float64
    d, res = (v - o)[m], (r - o)[m]
    for eps in (0.013, 0.05, 0.1, 0.2, 0.37, 0.8):
        vc = np.clip(d, -eps, eps)
        outside = np.abs(d) > eps
        clipped = outside if variant == "clipped" else outside & ((vc - res) ** 2 > (d - res) ** 2)
        assert (t > eps).mean() == pytest.approx(clipped.mean(), abs=1.5 / int(m.sum()))
        curve = vi.clip_fraction_curve(t, [eps])
        assert curve[0] == pytest.approx((t > eps).mean())


def test_suggested_range_hits_the_target():
    """At the suggested bounds, the clip fraction is at the target's ends (within one token)."""
    batch = vi.synthetic_batch(seed=6)
    report = vi.inspect_batch(batch, clip_eps=0.2, target_clip_fraction=(0.05, 0.2))
    low, high = report.suggested_clip_eps
    assert 0 < low < high
    t = vi.clip_thresholds(batch.values, batch.old_values, batch.returns)[batch.action_mask]
    n = t.size
    assert (t > low).mean() == pytest.approx(0.2, abs=2 / n)
    assert (t > high).mean() == pytest.approx(0.05, abs=2 / n)
    with pytest.raises(ValueError, match="target must be"):
        vi.suggest_clip_eps(t, (0.3, 0.1))


def test_inspect_rejects_bad_settings():
    """clip_eps must be a positive finite number, mode and variant known, shapes agree, the target a pair of
    fractions, top a count: each message names the argument."""
    batch = vi.synthetic_batch(seed=0, batch_size=2, max_len=5)
    for clip_eps in (0, -0.1, float("nan"), float("inf"), "0.2", True):
        with pytest.raises(ValueError, match="clip_eps must be a positive number"):
            vi.inspect_batch(batch, clip_eps=clip_eps)
    with pytest.raises(ValueError, match="mode must be one of 'token-mean'"):
        vi.inspect_batch(batch, mode="mean")
    with pytest.raises(ValueError, match="variant must be one of"):
        vi.inspect_batch(batch, variant="min")
    short = vi.Batch(batch.values, batch.old_values, batch.returns[:, :4], batch.action_mask)
    with pytest.raises(ValueError, match=r"same shape; got \[\(2, 5\), \(2, 5\), \(2, 4\)\]"):
        vi.inspect_batch(short)
    with pytest.raises(ValueError, match="selects no token"):
        vi.inspect_batch(vi.Batch(batch.values, batch.old_values, batch.returns, np.zeros((2, 5), bool)))
    with pytest.raises(ValueError, match=r"target_clip_fraction must be \(low, high\) with 0 <= low <= high <= 1; "
                                         r"got \(0.3, 0.1\)"):
        vi.inspect_batch(batch, target_clip_fraction=(0.3, 0.1))
    with pytest.raises(ValueError, match=r"target_clip_fraction must be a pair \(low, high\) .*; got 0.1"):
        vi.inspect_batch(batch, target_clip_fraction=0.1)
    for top in (-1, 2.5, True):
        with pytest.raises(ValueError, match=rf"top must be a non-negative integer .*; got {top!r}"):
            vi.format_report(vi.inspect_batch(batch), top=top)


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
    """Same seed, same arrays; lengths vary; padded positions are zero."""
    a, b = vi.synthetic_batch(seed=7), vi.synthetic_batch(seed=7)
    np.testing.assert_array_equal(a.values, b.values, strict=True)
    np.testing.assert_array_equal(a.action_mask, b.action_mask, strict=True)
    lengths = a.action_mask.sum(1)
    assert lengths.min() < lengths.max()
    assert np.all(a.values[~a.action_mask] == 0)
    assert not np.array_equal(a.values, vi.synthetic_batch(seed=8).values)


def test_shipped_sample_is_synthetic_seed_0_and_small():
    """notebooks/data/sample_batch.npz holds exactly synthetic_batch(seed=0)'s four arrays, bit for bit, under 1 MB."""
    assert SAMPLE.stat().st_size < 1_000_000
    fresh = vi.synthetic_batch(seed=0)
    with np.load(SAMPLE, allow_pickle=False) as archive:
        assert sorted(archive.files) == ["action_mask", "old_values", "returns", "values"]
        for key in archive.files:
            shipped = archive[key]
            assert shipped.dtype == (np.bool_ if key == "action_mask" else np.float32), key
            assert shipped.shape == (24, 64) and shipped.tobytes() == getattr(fresh, key).tobytes(), key


def test_sample_clip_fraction_is_realistic():
    """The sample's drift puts a realistic share of tokens outside a 0.2 band (10-40%)."""
    report = vi.inspect_batch(vi.load_batch(SAMPLE), clip_eps=0.2)
    assert 0.1 < report.outside_band_fraction < 0.4
    assert 0.05 < report.clip_fraction < report.outside_band_fraction


@pytest.mark.parametrize("suffix", [".npz", pytest.param(".pt", marks=reads_pt)])
def test_save_batch_round_trip(tmp_path, suffix):
    """save_batch writes .npz (NumPy) and .pt (torch) that load back bit for bit, and refuses other suffixes."""
    batch = vi.synthetic_batch(seed=1, batch_size=3, max_len=6)
    vi.save_batch(batch, tmp_path / f"b{suffix}")
    loaded = vi.load_batch(tmp_path / f"b{suffix}")
    for key in ("values", "old_values", "returns", "action_mask"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(batch, key), strict=True)
    with pytest.raises(ValueError, match="must end in .pt, .pth or .npz"):
        vi.save_batch(batch, tmp_path / "b.txt")


# --------------------------------------------------------------------------- the figure


def test_plot_report_artist_data(tmp_path):
    """The figure (valueloss.viz.batch_plot) shows the report's curve, the band lines at +-1 and one bar per
    sequence; the PNG is written without touching matplotlib's backend."""
    import matplotlib

    matplotlib.use("Agg")
    from valueloss.viz.batch_plot import plot_report

    report = vi.inspect_batch(vi.synthetic_batch(seed=0), clip_eps=0.2)
    path = tmp_path / "r.png"
    fig = plot_report(report, path)
    ax_hist, ax_curve, ax_pos, ax_seq = fig.axes
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(line.get_xdata()[0] for line in ax_hist.get_lines()) == [-1, 1]
    assert sum(p.get_height() for p in ax_hist.patches) == report.num_tokens
    curve = ax_curve.get_lines()[0]
    np.testing.assert_allclose(curve.get_ydata(), report.curve_clip_fraction)
    heights = [p.get_height() for p in ax_pos.patches]
    np.testing.assert_allclose(heights, report.clip_fraction_by_position)
    assert len(ax_seq.patches) == 2 * report.num_sequences
    assert "0.2" in ax_hist.get_title() and matplotlib.get_backend().lower() == "agg"
    with pytest.raises(TypeError, match="report must be an InspectReport .*; got dict"):
        plot_report(report.to_dict())


def test_import_does_not_load_matplotlib_or_viz():
    """Importing every module of valueloss.batch (and valueloss.peers) loads neither matplotlib nor valueloss.viz
    (in a fresh interpreter, tests/fresh.py)."""
    modules = fresh.stage("import valueloss.batch")["modules"]
    assert "valueloss.batch.synthetic" in modules and "valueloss.peers" in modules
    assert [m for m in ("matplotlib", "valueloss.viz") if m in modules] == []


def test_batch_sources_import_no_viz_and_no_matplotlib():
    """No module of valueloss/batch imports matplotlib, and only the CLI's --plot reaches up into valueloss.viz."""
    import re

    root = Path(vi.__file__).parent
    for path in sorted(root.glob("*.py")):
        source = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+matplotlib\b", source, re.M), path.name
        viz = re.findall(r"^\s*(?:from|import)\s+(?:\.\.|valueloss\.)viz\b.*$", source, re.M)
        expected = ["        from ..viz.batch_plot import plot_report",
                    "        from ..viz.trend_plot import plot_trend"]
        assert viz == (expected if path.name == "cli.py" else []), path.name


def test_analysing_the_sample_is_cheap():
    """Loading, analysing and formatting the sample costs well under a second of CPU."""
    import time

    vi.format_report(vi.inspect_batch(vi.load_batch(SAMPLE)))  # warm up
    start = time.process_time()
    vi.format_report(vi.inspect_batch(vi.load_batch(SAMPLE), clip_eps=0.2))
    assert time.process_time() - start < 0.5
