"""Tests of valueloss._codegen: the 8/16-byte vector loads in inductor's AVX2 C++ kernels.

Each compiled function is a fresh code object (``eval`` of a lambda), so dynamo compiles it once
without a global ``torch._dynamo.reset()``. Inductor's caches write to a temporary directory for
this module. The generated C++ is captured through ``GraphLowering.save_output_code`` (the hook
``torch._inductor.utils.run_and_get_code`` uses; it also fires on an FX graph cache hit).
"""

from __future__ import annotations

import contextlib
import os
import threading
import types
from unittest import mock

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor import cpu_vec_isa
from torch._inductor.codecache import CppPythonBindingsCodeCache
from torch._inductor.codegen import cpp as inductor_cpp
from torch._inductor.graph import GraphLowering

from valueloss import _codegen, fused
from valueloss._codegen import fast_byte_loads

ISA = cpu_vec_isa.pick_vec_isa()
needs_avx2 = pytest.mark.skipif(
    str(ISA) != "avx2", reason=f"the rewrite targets AVX2 only; inductor picked {str(ISA) or 'no vector ISA'!r}"
)

FAST_8 = "_mm_loadl_epi64("
FAST_16 = "_mm_loadu_si128("
SLOW_8 = "::loadu(in_ptr3 + static_cast<int64_t>(x0), static_cast<int64_t>(8))"
_CTYPES = (("uint8_t", torch.uint8), ("int8_t", torch.int8))


@pytest.fixture(scope="module", autouse=True)
def _private_inductor_cache(tmp_path_factory):
    """Point inductor's on-disk caches at a temporary directory for this module."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor_cache"))
    yield
    if previous is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def _new_compiled(source="lambda v, o, r, m: v + o + r * m"):
    """A compiled function with a code object of its own (dynamo caches per code object)."""
    return torch.compile(eval(source), dynamic=True, fullgraph=True)  # noqa: S307 - a literal from this file


@contextlib.contextmanager
def _capture_code():
    """Collect the wrapper source of every graph compiled (or served from the FX cache) in the block."""
    sources = []
    with mock.patch.object(GraphLowering, "save_output_code", sources.append):
        yield sources


def _compile_and_run(fn, *args, inside):
    """Run ``fn`` once, inside or outside ``fast_byte_loads()``; return (output, generated sources)."""
    with _capture_code() as sources:
        if inside:
            with fast_byte_loads():
                out = fn(*args)
        else:
            out = fn(*args)
    return out, "\n".join(sources)


def _inputs(n, dtype, mask_dtype, seed):
    """Three float inputs and a byte mask covering 0, 1 and every other byte value."""
    g = torch.Generator().manual_seed(seed)
    values, old_values, returns = (torch.randn(n, generator=g).to(dtype) for _ in range(3))
    low, high = (0, 256) if mask_dtype == torch.uint8 else (-128, 128)
    mask = torch.randint(low, high, (n,), generator=g, dtype=torch.int64).to(mask_dtype)
    mask[: n // 3] = torch.randint(0, 2, (n // 3,), generator=g).to(mask_dtype)  # a 0/1 stretch
    return values, old_values, returns, mask


def _reference(values, old_values, returns, mask):
    """The kernel in eager float32, rounded once to the input dtype (inductor's own rule for bf16)."""
    v, o, r, m = (t.to(torch.float32) for t in (values, old_values, returns, mask))
    return ((v + o) + r * m).to(values.dtype)


def _fake_kernel(num_elems):
    """The two attributes of a CppVecKernel that the rewrite reads."""
    return types.SimpleNamespace(num_elems=num_elems, vec_isa=ISA)


@needs_avx2
def test_rewrite_of_one_load_line():
    """Only plain unmasked 8/16-lane uint8/int8 loads are rewritten, into one movq/movdqu blended with 1s."""
    line8 = "at::vec::Vectorized<uint8_t>::loadu(in_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(8))"
    fast8 = _codegen._rewrite(_fake_kernel(8), line8, torch.uint8, None)
    assert fast8 == (
        "at::vec::Vectorized<uint8_t>(_mm256_blend_epi32(_mm256_set1_epi8(1), _mm256_castsi128_si256("
        "_mm_loadl_epi64(reinterpret_cast<const __m128i*>(in_ptr0 + static_cast<int64_t>(x0)))), 0x03))"
    )
    line16 = "at::vec::Vectorized<int8_t>::loadu(in_ptr1, static_cast<int64_t>(16))"
    fast16 = _codegen._rewrite(_fake_kernel(16), line16, torch.int8, None)
    assert fast16 == (
        "at::vec::Vectorized<int8_t>(_mm256_blend_epi32(_mm256_set1_epi8(1), _mm256_castsi128_si256("
        "_mm_loadu_si128(reinterpret_cast<const __m128i*>(in_ptr1))), 0x0F))"
    )
    unchanged = [
        (_fake_kernel(8), line8, torch.uint8, "some_mask"),  # masked load
        (_fake_kernel(32), line8.replace("(8)", "(32)"), torch.uint8, None),  # a pure byte kernel
        (_fake_kernel(8), line8, torch.int8, None),  # line's type disagrees with the dtype
        (_fake_kernel(16), line8, torch.uint8, None),  # count disagrees with the kernel
        (_fake_kernel(8), line8.replace("uint8_t", "float"), torch.float32, None),
        (
            _fake_kernel(8),
            "at::vec::Vectorized<uint8_t>::loadu(in_ptr0, static_cast<int64_t>(ks0 - 8))",
            torch.uint8,
            None,
        ),  # run-time tail count
        (_fake_kernel(8), "at::vec::Vectorized<uint8_t>::loadu(f(a, static_cast<int64_t>(8))", torch.uint8, None),
        (types.SimpleNamespace(num_elems=8, vec_isa=cpu_vec_isa.VecAVX512()), line8, torch.uint8, None),
    ]
    for kernel, line, dtype, load_mask in unchanged:
        assert _codegen._rewrite(kernel, line, dtype, load_mask) == line


@needs_avx2
def test_generated_code_fast_inside_original_outside():
    """A float32 kernel reading a uint8 mask gets the 8-byte load inside the context, the original outside."""
    args = _inputs(1003, torch.float32, torch.uint8, seed=0)
    with inductor_config.patch(fx_graph_cache=False):
        out_in, code_in = _compile_and_run(_new_compiled(), *args, inside=True)
        out_out, code_out = _compile_and_run(_new_compiled(), *args, inside=False)
    assert FAST_8 in code_in and SLOW_8 not in code_in
    assert SLOW_8 in code_out and FAST_8 not in code_out
    assert torch.equal(out_in, out_out)


@needs_avx2
def test_fused_run_of_a_direct_call_generates_the_fast_code():
    """valueloss.fused._run enters the context only where code may be generated: a direct call's compilation is
    such a step, its memoised calls are not (and generate nothing)."""
    args = _inputs(1003, torch.float32, torch.uint8, seed=1)
    call = fused._DirectCall(_new_compiled("lambda v, o, r, m: (v + o + r * m) * 2.0"))
    cpu = torch.device("cpu")
    with inductor_config.patch(fx_graph_cache=False), _capture_code() as sources:
        first = fused._run(call, cpu, *args)
        compiled_code = "\n".join(sources)
        second = fused._run(call, cpu, *args)
    assert call.direct and len(call.variants) == 1 and len(call.by_signature) == 1
    assert FAST_8 in compiled_code and SLOW_8 not in compiled_code
    assert "\n".join(sources) == compiled_code  # the memoised call generated nothing
    v, o, r, m = (t.float() for t in args)
    assert torch.equal(first, (v + o + r * m) * 2.0) and torch.equal(second, first)


@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.int8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_bit_identical(dtype, mask_dtype):
    """Inside the context the compiled kernel equals the eager reference bit for bit, with and without tails."""
    lanes = 8 if dtype == torch.float32 else 16
    fn = _new_compiled()
    sources = []
    for seed, n in enumerate((lanes * 125, lanes * 125 + 5, 4 * lanes + lanes - 1, lanes + 1)):
        args = _inputs(n, dtype, mask_dtype, seed)
        out, code = _compile_and_run(fn, *args, inside=True)
        sources.append(code)
        assert out.dtype == dtype
        assert torch.equal(out, _reference(*args)), f"n={n}"
    if str(ISA) == "avx2":
        assert (FAST_8 if lanes == 8 else FAST_16) in "".join(sources)


@needs_avx2
def test_all_32_lanes_match_the_original_load():
    """The fast load fills all 32 byte lanes like ``loadu(ptr, n)``: the n input bytes, then 1s."""
    cases = [(n, ctype, dtype, offset) for n in (8, 16) for ctype, dtype in _CTYPES for offset in (0, 3)]
    lines = []
    for j, (n, ctype, dtype, offset) in enumerate(cases):
        original = (
            f"at::vec::Vectorized<{ctype}>::loadu(reinterpret_cast<const {ctype}*>(in_ptr0) + {offset}, "
            f"static_cast<int64_t>({n}))"
        )
        fast = _codegen._rewrite(_fake_kernel(n), original, dtype, None)
        assert fast != original
        lines.append(f"    {original}.store(out_ptr0 + {64 * j});\n    {fast}.store(out_ptr0 + {64 * j + 32});")
    source = (
        "#include <torch/csrc/inductor/cpp_prefix.h>\n"
        'extern "C" void kernel(const uint8_t* in_ptr0, uint8_t* out_ptr0) {\n' + "\n".join(lines) + "\n}\n"
    )
    kernel = CppPythonBindingsCodeCache.load_pybinding(["const uint8_t*", "uint8_t*"], source)
    data = torch.arange(200, 232).to(torch.uint8)
    data[5], data[6], data[7] = 0, 1, 255
    out = torch.zeros(len(cases), 2, 32, dtype=torch.uint8)
    kernel(data, out)
    for j, (n, ctype, _, offset) in enumerate(cases):
        expected = torch.ones(32, dtype=torch.uint8)
        expected[:n] = data[offset : offset + n]
        assert torch.equal(out[j, 0], expected), f"original loadu, n={n}, {ctype}, offset {offset}"
        assert torch.equal(out[j, 1], expected), f"fast load, n={n}, {ctype}, offset {offset}"


def test_int8_division_kernel_matches_eager():
    """A float32 kernel dividing int8 tensors (floor division and remainder) equals eager inside the context."""
    fn = _new_compiled("lambda a, p, q: a + torch.div(p, q, rounding_mode='floor').float() + (p % q)")
    g = torch.Generator().manual_seed(5)
    n = 8 * 40 + 3
    a = torch.randn(n, generator=g)
    p = torch.randint(-128, 128, (n,), generator=g).to(torch.int8)
    sign = torch.where(torch.arange(n) % 2 == 0, 1, -1)
    q = (torch.randint(1, 128, (n,), generator=g) * sign).to(torch.int8)
    with inductor_config.patch(fx_graph_cache=False):
        out, code = _compile_and_run(fn, a, p, q, inside=True)
    expected = a + torch.div(p, q, rounding_mode="floor").float() + (p % q)
    assert torch.equal(out, expected)
    if str(ISA) == "avx2":
        assert FAST_8 in code


@needs_avx2
def test_other_thread_not_rewritten():
    """A compile in another thread while this one is inside the context keeps the original load."""
    args = _inputs(1003, torch.float32, torch.uint8, seed=1)
    fn = _new_compiled()
    result = {}

    def compile_elsewhere():
        result["out"] = fn(*args)

    with _capture_code() as sources, fast_byte_loads():
        worker = threading.Thread(target=compile_elsewhere)
        worker.start()
        worker.join()
    code = "\n".join(sources)
    assert SLOW_8 in code and FAST_8 not in code
    assert torch.equal(result["out"], _reference(*args))


@needs_avx2
def test_warm_cache_serves_the_matching_code():
    """A warm FX graph cache never hands code compiled outside the context to a compile inside it, or back."""
    args = _inputs(1003, torch.float32, torch.uint8, seed=2)

    def run(inside):
        before = counters["inductor"]["fxgraph_cache_hit"]
        fn = _new_compiled("lambda v, o, r, m: v * o + r * m")  # a graph no other test compiles
        _, code = _compile_and_run(fn, *args, inside=inside)
        return FAST_8 in code, counters["inductor"]["fxgraph_cache_hit"] - before

    with inductor_config.patch(fx_graph_cache=True):
        assert run(inside=False) == (False, 0)
        assert run(inside=True) == (True, 0)  # a miss: the cache key includes the rewrite
        assert run(inside=False) == (False, 1)
        assert run(inside=True) == (True, 1)
        # Control: without the cache tag, the context is served the plain kernel compiled above.
        no_tag = types.SimpleNamespace(enter=lambda: _codegen._NOT_SET, exit=lambda prior: None)
        with mock.patch.object(_codegen, "_swap", no_tag):
            assert run(inside=True) == (False, 1)


def test_config_tag_nested_and_restored():
    """Inside (nested) contexts the user's post-grad passes are kept plus the tag; leaving restores them."""

    class UserPass(_codegen.CustomGraphPass):
        def __call__(self, graph):
            return None

        def uuid(self):
            return "user-pass"

    user = UserPass()
    with inductor_config.patch(post_grad_custom_post_pass=user):
        with fast_byte_loads():
            with fast_byte_loads():
                passes = inductor_config.post_grad_custom_post_pass
            assert inductor_config.post_grad_custom_post_pass == passes
        assert inductor_config.post_grad_custom_post_pass is user
    if _codegen._install():
        assert passes == (user, _codegen._CACHE_TAG)
        assert _codegen._CACHE_TAG.uuid() == f"valueloss._codegen.fast_byte_loads v{_codegen.REWRITE_VERSION}"
    assert inductor_config.post_grad_custom_post_pass is None
    assert getattr(_codegen._local, "depth", 0) == 0
    assert not getattr(_codegen._local, "rewrite", False)


def test_no_rewrite_without_cache_tag(monkeypatch):
    """If the cache tag cannot be set, the context does not rewrite either (cache entries must match keys)."""

    def refuse():
        raise RuntimeError("config changed shape")

    if not _codegen._install():
        pytest.skip("torch's internals differ: the context is a no-op anyway")
    monkeypatch.setattr(_codegen, "_swap", types.SimpleNamespace(enter=refuse, exit=None))
    with fast_byte_loads():
        assert not _codegen._local.rewrite
    with fast_byte_loads():
        monkeypatch.undo()
        assert not _codegen._local.rewrite  # decided on the outermost entry
        with fast_byte_loads():
            assert not _codegen._local.rewrite
    with fast_byte_loads():
        assert _codegen._local.rewrite
    assert not _codegen._local.rewrite


def test_noop_when_torch_internals_differ(monkeypatch):
    """Without the expected CppVecKernel method (or with another signature) the context changes nothing."""
    monkeypatch.setattr(_codegen, "_install_state", None)
    monkeypatch.delattr(inductor_cpp.CppVecKernel, "_get_vec_load_line")
    with fast_byte_loads():
        assert inductor_config.post_grad_custom_post_pass is None
    assert _codegen._install_state is False
    assert not hasattr(inductor_cpp.CppVecKernel, "_get_vec_load_line")

    def other_signature(self, var, index, dtype, load_mask=None, extra=None):
        return "original"

    monkeypatch.setattr(_codegen, "_install_state", None)
    monkeypatch.setattr(inductor_cpp.CppVecKernel, "_get_vec_load_line", other_signature, raising=False)
    with fast_byte_loads():
        assert inductor_config.post_grad_custom_post_pass is None
    assert inductor_cpp.CppVecKernel._get_vec_load_line is other_signature
    assert getattr(_codegen._local, "depth", 0) == 0
