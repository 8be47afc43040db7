"""Faster byte loads in inductor's AVX2 C++ kernels: :func:`fast_byte_loads`.

The problem. With torch 2.13 on a CPU whose best instruction set is AVX2 (no AVX-512), inductor
vectorises an element-wise float32 kernel 8 lanes at a time (bfloat16/float16: 16 lanes) and loads a
``uint8``/``int8`` input (our bool masks, passed as ``mask.view(torch.uint8)``) with
``at::vec::Vectorized<uint8_t>::loadu(ptr, static_cast<int64_t>(8))`` (code generator:
``torch/_inductor/codegen/cpp.py``, ``CppVecKernel._get_vec_load_line``). That partial load
(``torch/include/ATen/cpu/vec/vec256/vec256_int.h``, ``Vectorized8::loadu(const void*, T count)``)
fills a 32-byte stack buffer with 1s, copies the 8 (16) bytes over it and reloads all 32 bytes: a
store-forwarding stall on every vector. The AVX-512 header has a fast path for this count; AVX2 has
none.

The rewrite. Inside ``with fast_byte_loads():`` the C++ generated for such a load becomes one 8-byte
(16-byte) vector load blended into a vector of 1s::

    at::vec::Vectorized<uint8_t>(_mm256_blend_epi32(_mm256_set1_epi8(1),
        _mm256_castsi128_si256(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(ptr))), 0x03))

(``_mm_loadu_si128`` and blend mask ``0x0F`` for 16 bytes). It applies only when the picked vector
ISA is AVX2, the element type is ``uint8``/``int8``, the load is contiguous and unmasked, the kernel's
vector length is exactly 8 or 16, and the generated line is the plain ``loadu(<ptr>, 8|16)`` form;
every other load (tails with a run-time count, masked loads, other ISAs, other dtypes) is left as
inductor wrote it. Semantics are unchanged: lanes ``0..n-1`` hold the same bytes as before and lanes
``n..31`` hold 1, exactly as the original buffer fill (inductor relies on that, e.g. for integer
division in padding lanes). ``Vectorized<uint8_t>::set(ones, loadu_one_fourth(ptr), 8)`` would say
the same thing, but its ``blend<mask>`` goes through a stack buffer and per-byte extracts and was
slower than the original load (1.77 ms against 1.43 ms in a C++ loop over 1M elements); the
intrinsic blend took 0.43 ms.

Scope. The wrapper around ``CppVecKernel._get_vec_load_line`` is installed once (idempotent, under a
lock) on the first entry and only acts when the *current thread* is inside the context, so code
generated elsewhere is untouched. Code is generated on the first call of a compiled function (and on
each recompilation, e.g. for new shapes), in the calling thread: wrap *every call*, not only the
first::

    step = torch.compile(fn, dynamic=True)
    with fast_byte_loads():
        out = step(values, mask.view(torch.uint8))

Caching. Inductor's on-disk FX graph cache (and the AOTAutograd cache above it) could otherwise serve
code compiled without the rewrite inside the context (and vice versa). The context therefore appends
a no-op :class:`torch._inductor.custom_graph_pass.CustomGraphPass` naming this rewrite and its
version to ``torch._inductor.config.post_grad_custom_post_pass`` (the documented hook whose
``uuid()`` enters the cache key; config overrides are thread-local in torch 2.13), keeping any
passes the user set. ``tests/test_codegen.py`` checks that, with a warm cache filled outside the
context, a compile inside it misses and emits the fast load, that later compiles inside and outside
each hit their own entry, and (control) that without the tag the context is served the plain kernel.

Cost of entering the context: 3-4 us per outermost ``with`` on the VM below; nested entries only
bump a counter (under 1 us). ``with torch._inductor.config.patch(...)`` would cost about 30 us per call
(attribute reads and writes on the config module take 2-3 us each), so the override's ContextVar is
swapped directly, as torch's own low-overhead ``config._make_closure_patcher`` does, with a fallback
to plain attribute writes if those internals look different. If torch's
internals differ from what is described here (method missing, other signature, other line format),
the context is a no-op: this is a speed-up, never an error. Code generated outside the calling thread
(inductor's optional subprocess compile mode, ``fx_compile_mode``) is not rewritten.

Measured 2026-11-26 on this project's shared 2-core AMD EPYC VM (AVX2), torch 2.13.0, 1 thread,
1M elements, median of 60 interleaved calls, compiled kernel ``v + o + r * m`` (two more runs under
more load gave the same picture: the byte mask costs 1.6-2.1x the float mask without the context,
0.9-1.1x with it):

==========  =============  ===========  ===================
inputs      float32 mask   uint8 mask   uint8, in context
==========  =============  ===========  ===================
float32     0.89 ms        1.70 ms      0.80 ms
bfloat16    0.66 ms        1.41 ms      0.70 ms
==========  =============  ===========  ===================
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import re
import threading
from typing import Any

import torch

try:  # torch >= 2.6; older releases have no custom graph passes, and then no rewrite either (see _install)
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_custom_graph_passes
except ImportError:  # pragma: no cover - exercised by the minimum-versions run (make test-min)
    CustomGraphPass, get_custom_graph_passes = object, None

__all__ = ["fast_byte_loads", "REWRITE_VERSION"]

#: Bump whenever the emitted C++ changes: it is part of the inductor cache key (see the module doc).
REWRITE_VERSION = 1

_LOAD_LINE = re.compile(
    r"^at::vec::Vectorized<(?P<ctype>u?int8_t)>::loadu\((?P<ptr>.+), static_cast<int64_t>\((?P<n>8|16)\)\)$"
)
_CTYPE = {torch.uint8: "uint8_t", torch.int8: "int8_t"}
# 8 bytes: movq (upper bytes zeroed) then take dwords 0-1; 16 bytes: movdqu then take dwords 0-3.
_LOAD_INTRINSIC = {8: ("_mm_loadl_epi64", "0x03"), 16: ("_mm_loadu_si128", "0x0F")}
_EXPECTED_PARAMETERS = ("self", "var", "index", "dtype", "load_mask")

_local = threading.local()
_install_lock = threading.Lock()
_install_state: bool | None = None  # None: not tried yet; True: wrapper installed; False: unsupported torch
_swap: Any = None  # _PublicSwap or _OverrideSwap, bound by _install()
_CONFIG_KEY = "post_grad_custom_post_pass"


class _FastByteLoadsPass(CustomGraphPass):
    """No-op post-grad pass whose uuid() puts this rewrite (and its version) into inductor's cache key."""

    def __call__(self, graph: torch.fx.graph.Graph) -> None:
        return None

    def uuid(self) -> str:
        return f"valueloss._codegen.fast_byte_loads v{REWRITE_VERSION}"


_CACHE_TAG = _FastByteLoadsPass()


def _balanced(text: str) -> bool:
    """True if the round brackets in ``text`` pair up (a pointer expression, not a cut-off argument list)."""
    depth = 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def _isa_is_avx2(kernel: Any) -> bool:
    """True if the kernel is generated for inductor's AVX2 ISA (the only one this rewrite targets)."""
    from torch._inductor import cpu_vec_isa

    isa = getattr(kernel, "vec_isa", None)
    if isa is None:
        isa = cpu_vec_isa.pick_vec_isa()
    avx2 = getattr(cpu_vec_isa, "VecAVX2", None)
    return avx2 is not None and type(isa) is avx2 and str(isa) == "avx2"


def _rewrite(kernel: Any, line: str, dtype: Any, load_mask: Any) -> str:
    """The fast load for ``line`` if every condition of the module doc holds, else ``line`` unchanged."""
    ctype = _CTYPE.get(dtype)
    if ctype is None or load_mask is not None or not isinstance(line, str):
        return line
    num_elems = getattr(kernel, "num_elems", None)
    if not isinstance(num_elems, int) or isinstance(num_elems, bool):
        try:
            if not getattr(num_elems, "is_Integer", False):
                return line
            num_elems = int(num_elems)
        except (TypeError, ValueError):
            return line
    if num_elems not in _LOAD_INTRINSIC:
        return line
    match = _LOAD_LINE.match(line)
    if match is None or match["ctype"] != ctype or int(match["n"]) != num_elems or not _balanced(match["ptr"]):
        return line
    if not _isa_is_avx2(kernel):
        return line
    load, blend_mask = _LOAD_INTRINSIC[num_elems]
    ptr = match["ptr"]
    return (
        f"at::vec::Vectorized<{ctype}>(_mm256_blend_epi32(_mm256_set1_epi8(1), "
        f"_mm256_castsi128_si256({load}(reinterpret_cast<const __m128i*>({ptr}))), {blend_mask}))"
    )


def _install() -> bool:
    """Wrap ``CppVecKernel._get_vec_load_line`` once; False (and nothing changed) if torch looks different."""
    global _install_state
    if _install_state is not None:
        return _install_state
    with _install_lock:
        if _install_state is None:
            # Published only once decided: a thread racing past the unlocked read never sees a half state.
            _install_state = _wrap_load_line()
        return _install_state


def _wrap_load_line() -> bool:
    """Install the wrapper and bind ``_swap``; False, with nothing changed, if torch's internals differ."""
    global _swap
    if get_custom_graph_passes is None:  # no custom graph passes (torch < 2.6): no cache key for the rewrite
        return False
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor.codegen import cpp
    except Exception:  # any import failure means: leave inductor alone
        return False
    kernel_class = getattr(cpp, "CppVecKernel", None)
    original = getattr(kernel_class, "_get_vec_load_line", None)
    if original is None or not callable(original):
        return False
    try:
        parameters = tuple(inspect.signature(original).parameters)
    except (TypeError, ValueError):
        return False
    if parameters != _EXPECTED_PARAMETERS:
        return False
    if getattr(original, "_valueloss_fast_byte_loads", False):
        # Wrapped by an earlier import of this module (importlib.reload): wrap torch's method afresh,
        # so that the wrapper reads this module's thread-local state.
        original = original.__wrapped__

    @functools.wraps(original)
    def _get_vec_load_line(self, var, index, dtype, load_mask=None):
        line = original(self, var, index, dtype, load_mask)
        if not getattr(_local, "rewrite", False):
            return line
        try:
            return _rewrite(self, line, dtype, load_mask)
        except Exception:  # a failed rewrite must never break compilation
            return line

    _get_vec_load_line._valueloss_fast_byte_loads = True  # type: ignore[attr-defined]
    _swap = _make_swap(inductor_config)
    kernel_class._get_vec_load_line = _get_vec_load_line
    return True


class _PublicSwap:
    """Puts the cache tag into ``post_grad_custom_post_pass`` through the config module's attributes."""

    def __init__(self, config: Any) -> None:
        self._config = config

    def enter(self) -> Any:
        prior = self._config.post_grad_custom_post_pass
        passes = get_custom_graph_passes(prior)
        if _CACHE_TAG in passes:
            return _NOT_SET
        self._config.post_grad_custom_post_pass = (*passes, _CACHE_TAG)
        return prior

    def exit(self, prior: Any) -> None:
        self._config.post_grad_custom_post_pass = prior


class _OverrideSwap:
    """The same through the thread-local override that ``config._make_closure_patcher`` writes (~5x faster).

    Attribute access on ``torch._inductor.config`` costs about 3 us per read or write; this writes
    the entry's ``user_override`` ContextVar and marks the config hashes dirty, line for line what
    torch's own low-overhead patcher does. Used only if those internals look as expected.
    """

    def __init__(self, config: Any, entry: Any, unset: Any) -> None:
        self._override = entry.user_override
        self._default = entry.default
        self._unset = unset
        self._hash_dirty = config._hash_dirty_var
        self._mark_dirty = config._mark_get_dict_dirty

    def enter(self) -> Any:
        prior = self._override.get()
        passes = get_custom_graph_passes(self._default if prior is self._unset else prior)
        if _CACHE_TAG in passes:
            return _NOT_SET
        self._set((*passes, _CACHE_TAG))
        return prior

    def exit(self, prior: Any) -> None:
        self._set(prior)

    def _set(self, value: Any) -> None:
        self._override.set(value)
        self._hash_dirty.set(True)
        self._mark_dirty(_CONFIG_KEY)


def _make_swap(config: Any) -> _PublicSwap | _OverrideSwap:
    """The fast config swap if torch's config internals look as expected, else the public one."""
    try:
        from torch.utils import _config_module

        entry = config._config[_CONFIG_KEY]
        unset = _config_module._UNSET_SENTINEL
        usable = (
            isinstance(entry.user_override, contextvars.ContextVar)
            and isinstance(config._hash_dirty_var, contextvars.ContextVar)
            and callable(config._mark_get_dict_dirty)
            and entry.alias is None
            and entry.env_value_force is unset
            and entry.env_value_default is unset
            and entry.justknob is None
            and entry.default is None
        )
    except Exception:
        usable = False
    return _OverrideSwap(config, entry, unset) if usable else _PublicSwap(config)


class _FastByteLoads:
    """The context manager returned by :func:`fast_byte_loads` (stateless: the state is per thread)."""

    __slots__ = ()

    def __enter__(self) -> _FastByteLoads:
        depth = getattr(_local, "depth", 0)
        if depth == 0:
            _local.config_prior = _NOT_SET
            _local.rewrite = False
            if _install():
                try:
                    _local.config_prior = _swap.enter()
                except Exception:  # no cache tag, no rewrite: a cached entry must match its key
                    pass
                else:
                    _local.rewrite = True
        _local.depth = depth + 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        depth = _local.depth - 1
        _local.depth = depth
        if depth == 0:
            _local.rewrite = False
            if _local.config_prior is not _NOT_SET:
                _swap.exit(_local.config_prior)
                _local.config_prior = _NOT_SET


_NOT_SET = object()
_CONTEXT = _FastByteLoads()


def fast_byte_loads() -> _FastByteLoads:
    """Context manager: inductor C++ kernels generated in this thread load 8/16 bytes with one vector load.

    A performance-only rewrite for AVX2 CPUs; see the module docstring for when it applies, why the
    results are bit-identical and how it interacts with inductor's caches. Re-entrant (nested use is
    fine) and scoped to the calling thread. Wrap every call of the compiled function, since
    recompilations (new shapes) generate code again. Outside AVX2, or if torch's internals differ
    from what this module expects, it changes nothing.

    Example:
        >>> import torch
        >>> from valueloss._codegen import fast_byte_loads
        >>> with fast_byte_loads(), fast_byte_loads():
        ...     print(torch.tensor([1.0, 2.0]) * torch.tensor([1, 0], dtype=torch.uint8))
        tensor([1., 0.])
    """
    return _CONTEXT
