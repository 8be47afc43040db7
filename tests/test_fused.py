"""Tests of valueloss.fused: the loss and its gradient from one compiled function, against the eager path.

The oracle is :func:`valueloss.functional.value_loss` differentiated by autograd (itself checked against the
plain loops of ``tests/reference.py`` in test_functional.py; the matrix here checks against those loops too).
Gradients are compared with ``torch.equal``: the fused path promises autograd's numbers for
``loss.backward()``. Losses are summed in another order, so they are compared to a few ulp.

Compiling costs seconds per configuration on a cold cache, so the compiled tests (marked ``compile``) share
a handful of configurations at small shapes (one graph each: shapes are dynamic, numbers are tensors), and
the whole matrix of settings runs the same function uncompiled (fixture ``uncompiled``).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading

import pytest
import torch
from bands import band
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import grad_loops, loss_loops

from valueloss import ValueLoss, fused
from valueloss import functional as F
from valueloss.fused import fused_value_loss

MODES = F.AGGREGATION_MODES
MASKS = ("bool", "int", "float", "none")
SHAPE = (6, 37)  # the shape of most compiled tests: small, neither dimension 0, 1 or equal to the other


def _inputs(shape=SHAPE, dtype=torch.float32, mask="bool", seed=0):
    """values, old_values, returns with many tokens outside a band of 0.2, and a mask of the given kind."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g)
    old_values = values + 0.5 * torch.randn(shape, generator=g)
    returns = torch.randn(shape, generator=g)
    keep = torch.rand(shape, generator=g) > 0.3
    action_mask = {
        "bool": keep,
        "int": keep.to(torch.int64) * torch.randint(1, 3, shape, generator=g),
        "float": keep.float() * torch.rand(shape, generator=g).add(0.5),
        "none": None,
    }[mask]
    return values.to(dtype), old_values.to(dtype), returns.to(dtype), action_mask


def _step(loss_fn, values, *args, grad_output=None, **kwargs):
    """(loss, values.grad) of one forward and backward of ``loss_fn`` on a fresh leaf."""
    leaf = values.detach().clone().requires_grad_(True)
    loss = loss_fn(leaf, *args, **kwargs)
    loss.backward(grad_output)
    return loss.detach(), leaf.grad


def _fused(*args, **kwargs):
    return _step(fused_value_loss, *args, **kwargs)


def _eager(*args, **kwargs):
    return _step(F.value_loss, *args, **kwargs)


def _assert_same(fused_result, eager_result, msg=""):
    """The gradient equal to eager's (torch.equal, shape and dtype), the loss within a few ulp."""
    (loss, grad), (eager_loss, eager_grad) = fused_result, eager_result
    assert loss.dtype == eager_loss.dtype and grad.dtype == eager_grad.dtype, msg
    assert torch.equal(grad, eager_grad), (msg, (grad - eager_grad).abs().max())
    torch.testing.assert_close(loss, eager_loss, rtol=4 * torch.finfo(loss.dtype).eps, atol=1e-30, msg=str(msg))


@pytest.fixture
def uncompiled(monkeypatch):
    """The fused path's function run without torch.compile (fresh cache, restored afterwards)."""
    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(fused, "_COMPILE", lambda function: function)
    monkeypatch.setattr(fused, "_OLD_TORCH", None)


_COMPILER: list = []  # [None] once a compiled call worked, [reason] if it cannot work here


@pytest.fixture
def compiled():
    """Skip unless torch.compile works here (torch >= MIN_COMPILE_TORCH and a compiler for inductor)."""
    if not _COMPILER:
        reason = fused._OLD_TORCH
        if reason is None:
            try:
                _fused(*_inputs(), clip_eps=0.2)
            except RuntimeError as error:
                reason = f"torch.compile does not work here: {error}"
        _COMPILER.append(reason)
    if _COMPILER[0] is not None:
        pytest.skip(_COMPILER[0])


# The compiled configurations the tests share (each compiles once per process).
PLANS = {
    "token-mean bool": dict(clip_eps=0.2),
    "token-mean bool, count given": dict(clip_eps=0.2, batch_num_tokens=150.0),
    "seq-mean-token-mean float huber": dict(clip_eps=0.2, mode="seq-mean-token-mean", mask="float",
                                            loss_type="huber", huber_delta=0.7),
    "token-sum none clipped": dict(clip_eps=0.2, mode="token-sum", mask="none", variant="clipped"),
    "seq-mean-token-sum-norm int, no clip, count given": dict(clip_eps=None, mode="seq-mean-token-sum-norm",
                                                             mask="int", global_batch_size=4.0),
}


def _plan_inputs(name, seed=0, shape=SHAPE):
    kwargs = dict(PLANS[name])
    return _inputs(shape, mask=kwargs.pop("mask", "bool"), seed=seed), kwargs


# --------------------------------------------------------------------------- the issue's bugs, compiled


@pytest.mark.compile
def test_issue_18_repro_gives_the_eager_numbers(compiled):
    """The issue's repro: after a first call with clip 0.5, clip 0.2 and 1.0 give eager's loss and gradient;
    so does scale 1.0 when dp_size goes from 1 to 2."""
    torch.manual_seed(0)
    v = torch.randn(4, 8); old = v + 0.5 * torch.randn(4, 8); ret = torch.randn(4, 8)  # noqa: E702

    def run(clip, fused, **kwargs):
        x = v.clone().requires_grad_(); loss = ValueLoss(clip, fused=fused)(x, old, ret, **kwargs)  # noqa: E702
        loss.backward(); return loss.item(), x.grad  # noqa: E702

    run(0.5, True)  # first fused call: clip_eps == scale == 0.5
    for clip in (0.2, 1.0, 0.5):
        (loss, grad), (eager_loss, eager_grad) = run(clip, True), run(clip, False)
        assert loss == pytest.approx(eager_loss, rel=1e-6) and torch.equal(grad, eager_grad), clip
    assert run(0.2, True)[0] == pytest.approx(1.3974, abs=1e-4)  # the issue's eager number; fused gave 0.5589
    for dp_size in (1, 2, 1):
        results = []
        for setting in (True, False):
            x = v.clone().requires_grad_()
            loss = ValueLoss(0.2, scale=1.0, fused=setting)(x, old, ret, dp_size=dp_size, batch_num_tokens=32)
            loss.backward()
            results.append((loss.detach(), x.grad))
        _assert_same(*results, msg=dp_size)


@pytest.mark.compile
def test_every_setting_changed_between_calls_at_one_shape(compiled):
    """Interleaved calls at one shape, changing every number (clip_eps, scale, dp_size, huber_delta, counts:
    numbers, tensors, 0) and every string (mode, mask kind, variant, loss_type, clipping on/off): each call
    gives eager's gradient exactly and its loss to a few ulp."""
    calls = []
    for clip_eps, scale in [(0.5, 0.5), (0.2, 0.5), (1.0, 1.0), (0.2, 0.2), (0.0, 2.0), (math.inf, 0.5)]:
        calls.append(("token-mean bool", dict(clip_eps=clip_eps, scale=scale)))
        calls.append(("token-sum none clipped", dict(clip_eps=clip_eps, scale=scale)))
    for count in [150.0, 0, 1, torch.tensor(150.0), torch.tensor(0), torch.tensor(77, dtype=torch.int64),
                  torch.tensor(12.5, dtype=torch.float64)]:
        for dp_size in (1, 2, 8):
            calls.append(("token-mean bool, count given", dict(clip_eps=0.5, dp_size=dp_size, batch_num_tokens=count)))
        calls.append(("seq-mean-token-sum-norm int, no clip, count given",
                      dict(global_batch_size=count, dp_size=2, loss_scale_factor=3.0)))
        calls.append(("seq-mean-token-sum-norm int, no clip, count given", dict(global_batch_size=count)))
    for huber_delta in (0.7, 1.0, 0.5, 1e300, 0.01):
        calls.append(("seq-mean-token-mean float huber", dict(huber_delta=huber_delta, scale=huber_delta % 1)))
    calls = calls[::2] + calls[1::2][::-1]  # interleave the configurations
    compiled_before = fused.compiled_configurations()
    for name, changes in calls:
        (values, old_values, returns, action_mask), kwargs = _plan_inputs(name)
        kwargs.update(changes)
        _assert_same(_fused(values, old_values, returns, action_mask, **kwargs),
                     _eager(values, old_values, returns, action_mask, **kwargs), msg=(name, changes))
    assert fused.compiled_configurations() - compiled_before <= len(PLANS)


@pytest.mark.compile
@pytest.mark.parametrize("n_threads", [2, 4])
def test_threads_making_their_first_call_together(compiled, monkeypatch, n_threads):
    """n threads making the first call of a configuration at once all get eager's numbers, and the next call
    (compiled, not a fallback) too."""
    monkeypatch.setattr(fused, "_COMPILED", {})  # a first call again (the other tests' graphs come back afterwards)
    (values, old_values, returns, action_mask), kwargs = _plan_inputs("token-mean bool")
    start, results, errors = threading.Barrier(n_threads), [None] * n_threads, []

    def work(i):
        try:
            start.wait()
            results[i] = _fused(values, old_values, returns, action_mask, **dict(kwargs, clip_eps=0.1 * (i + 1)))
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i, result in enumerate(results):
        _assert_same(result, _eager(values, old_values, returns, action_mask, **dict(kwargs, clip_eps=0.1 * (i + 1))))
    assert fused.compiled_configurations() == 1
    with torch.compiler.set_stance("fail_on_recompile"):  # the next call runs the compiled graph
        _assert_same(_fused(values, old_values, returns, action_mask, **kwargs),
                     _eager(values, old_values, returns, action_mask, **kwargs))


@pytest.mark.compile
def test_a_failing_call_does_not_disable_the_next(compiled, monkeypatch):
    """Meta tensors run the function uncompiled (shapes only); a call whose compilation fails raises an error
    naming the fused path; neither changes what the next call does (compiled, eager's numbers)."""
    (values, old_values, returns, action_mask), kwargs = _plan_inputs("token-mean bool")
    meta = [t.to("meta") for t in (values, old_values, returns, action_mask)]
    loss, grad = _fused(*meta, **kwargs)
    assert loss.device.type == "meta" and grad.shape == values.shape and grad.device.type == "meta"

    def failing_compile(function):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return call

    with monkeypatch.context() as patch:
        patch.setattr(fused, "_COMPILED", {})
        patch.setattr(fused, "_COMPILE", failing_compile)
        with pytest.raises(RuntimeError, match=r"fused_value_loss: torch.compile's graph failed on cpu \(RuntimeError: "
                                               r"InvalidCxxCompiler.*ValueLoss\(fused=False\)"):
            _fused(values, old_values, returns, action_mask, **kwargs)
    with torch.compiler.set_stance("fail_on_recompile"):
        _assert_same(_fused(values, old_values, returns, action_mask, **kwargs),
                     _eager(values, old_values, returns, action_mask, **kwargs))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _annealed_steps(n_steps: int, name: str = "token-mean bool, count given") -> int:
    """``n_steps`` fused steps with clip_eps, scale and the count annealed; the growth of the RSS over them."""
    (values, old_values, returns, action_mask), kwargs = _plan_inputs(name)
    leaf = values.clone().requires_grad_(True)
    start = None
    for step in range(n_steps + 50):
        if step == 50:  # after the allocator and the caches have settled
            start = _rss_bytes()
        leaf.grad = None
        progress = step / (n_steps + 50)
        kwargs.update(clip_eps=0.5 - 0.4 * progress, scale=0.5 + progress, batch_num_tokens=150.0 + step)
        fused_value_loss(leaf, old_values, returns, action_mask, **kwargs).backward()
    return _rss_bytes() - start


@pytest.mark.compile
def test_memory_flat_with_annealed_settings(compiled):
    """400 steps with clip_eps, scale and the count annealed compile nothing new (dynamo's fail_on_recompile)
    and the RSS does not grow (the old caches grew by about 13 KB per step: 5 MB here)."""
    _annealed_steps(1)  # compiled before the count starts
    configurations = fused.compiled_configurations()
    with torch.compiler.set_stance("fail_on_recompile"):
        growth = _annealed_steps(400)
    assert fused.compiled_configurations() == configurations
    assert growth < 1 << 20, growth


@pytest.mark.slow
@pytest.mark.compile
def test_memory_flat_over_thousands_of_annealed_steps(compiled):
    """The soak: 5000 annealed steps, the RSS grows by less than 1 MB (the old caches: 65 MB)."""
    _annealed_steps(1)
    with torch.compiler.set_stance("fail_on_recompile"):
        growth = _annealed_steps(5000)
    assert growth < 1 << 20, growth


# --------------------------------------------------------------------------- numbers, compiled


@pytest.mark.compile
@pytest.mark.parametrize("name", ["token-mean bool", "seq-mean-token-mean float huber"])
def test_masked_out_nan_and_inf_stay_out(compiled, name):
    """NaN and inf at masked-out tokens of any input reach neither the loss nor the gradient."""
    (values, old_values, returns, action_mask), kwargs = _plan_inputs(name)
    out = action_mask == 0
    for t, bad in ((values, math.nan), (old_values, math.inf), (returns, -math.inf)):
        t[out] = bad
    loss, grad = result = _fused(values, old_values, returns, action_mask, **kwargs)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[out] == 0).all()
    _assert_same(result, _eager(values, old_values, returns, action_mask, **kwargs))


@pytest.mark.compile
@pytest.mark.parametrize("name", ["token-mean bool", "seq-mean-token-mean float huber"])
def test_empty_masks_give_zero(compiled, name):
    """An all-zero mask (count 0) gives a loss and a gradient of exactly 0; empty sequences contribute 0."""
    (values, old_values, returns, action_mask), kwargs = _plan_inputs(name)
    empty = torch.zeros_like(action_mask)
    loss, grad = _fused(values, old_values, returns, empty, **kwargs)
    assert loss.item() == 0.0 and not grad.any()
    action_mask[::2] = 0  # every other sequence empty
    _assert_same(_fused(values, old_values, returns, action_mask, **kwargs),
                 _eager(values, old_values, returns, action_mask, **kwargs))


@pytest.mark.compile
def test_half_precision(compiled):
    """bf16 inputs are computed in float32: the loss in float32 within a few ulp, the gradient in bf16 equal to
    eager's; so with grad_output 1 and 2."""
    (values, old_values, returns, action_mask), kwargs = _plan_inputs("token-mean bool")
    half = [t.to(torch.bfloat16) for t in (values, old_values, returns)]
    _assert_same(_fused(*half, action_mask, **kwargs), _eager(*half, action_mask, **kwargs))
    two = torch.tensor(2.0)  # exact in every precision: the product is eager's too
    _assert_same(_fused(*half, action_mask, grad_output=two, **kwargs),
                 _eager(*half, action_mask, grad_output=two, **kwargs))


@pytest.mark.compile
def test_band_edges_and_ties_are_autograds(compiled):
    """Tokens exactly on the band's edge and exact ties of the max get autograd's gradient (the band as the
    installed torch's clamp has it; ties split 50/50)."""
    values = torch.tensor([[1.25, -0.75, 0.5, 2.0, 0.3, -1.0, 0.7]] * 2)  # two rows: dynamo specialises size 1
    old_values = torch.tensor([[1.0, -1.0, 0.25, 1.5, 0.3, -0.5, 0.7]] * 2)  # |delta| = 0.25 = clip_eps: tokens 0-2
    returns = torch.tensor([[0.0, 0.0, 0.375, 1.75, 0.0, -0.75, 1.0]] * 2)  # ties: tokens 3, 5 (|e_clipped| == |e|)
    mask = torch.ones_like(values, dtype=torch.bool)
    _assert_same(_fused(values, old_values, returns, mask, clip_eps=0.25),
                 _eager(values, old_values, returns, mask, clip_eps=0.25))
    reference = grad_loops(values, old_values, returns, mask, clip_eps=0.25)
    torch.testing.assert_close(_fused(values, old_values, returns, mask, clip_eps=0.25)[1].double(), reference)


@pytest.mark.compile
def test_one_step_allocates_the_gradient_alone(compiled):
    """A forward and backward hold at most one tensor of the input's size at any moment: the gradient, handed
    over as values.grad (the profiler's CPU memory events)."""
    from torch.profiler import ProfilerActivity, profile

    (values, old_values, returns, action_mask), kwargs = _plan_inputs("token-mean bool", shape=(64, 1024))
    leaf = values.clone().requires_grad_(True)

    def step():
        fused_value_loss(leaf, old_values, returns, action_mask, **kwargs).backward()

    step()
    leaf.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    current = peak = 0
    for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if event.name() == "[memory]":
            current += event.nbytes()
            peak = max(peak, current)
    input_bytes = leaf.numel() * leaf.element_size()
    assert input_bytes <= peak <= input_bytes + 4096, (peak, input_bytes)


@pytest.mark.compile
def test_forward_never_reads_a_tensor_on_the_host(compiled, monkeypatch):
    """No host synchronisation in forward or backward: reading any tensor's value on the host raises meanwhile
    (tensor counts included)."""
    (values, old_values, returns, action_mask), kwargs = _plan_inputs("token-mean bool, count given")
    kwargs.update(dp_size=2, batch_num_tokens=torch.tensor(150.0))
    expected = _eager(values, old_values, returns, action_mask, **kwargs)
    _fused(values, old_values, returns, action_mask, **kwargs)  # compiled outside the patch

    def host_read(*args, **kwargs):
        raise AssertionError("a host synchronisation")

    leaf = values.clone().requires_grad_(True)
    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
            patch.setattr(torch.Tensor, name, host_read)
        loss = fused_value_loss(leaf, old_values, returns, action_mask, **kwargs)
        loss.backward()
    _assert_same((loss.detach(), leaf.grad), expected)


# --------------------------------------------------------------------------- autograd, compiled


@pytest.mark.compile
def test_backward_multiplies_by_grad_output_and_retain_graph_recomputes(compiled):
    """backward hands over the saved gradient times grad_output; a second backward through a retained graph
    recomputes it (the same numbers); grad_output 3 is within 2 ulp of autograd's."""
    (values, old_values, returns, action_mask), kwargs = _plan_inputs("token-mean bool")
    leaf = values.clone().requires_grad_(True)
    loss = fused_value_loss(leaf, old_values, returns, action_mask, **kwargs)
    loss.backward(retain_graph=True)
    first, leaf.grad = leaf.grad, None
    loss.backward(retain_graph=True)
    assert torch.equal(leaf.grad, first)
    leaf.grad = None
    loss.backward(torch.tensor(3.0))
    _, eager_grad = _eager(values, old_values, returns, action_mask, grad_output=torch.tensor(3.0), **kwargs)
    torch.testing.assert_close(leaf.grad, eager_grad, rtol=2 * torch.finfo(torch.float32).eps, atol=0)


@pytest.mark.compile
def test_in_place_edits_after_forward(compiled):
    """loss.backward() uses the gradient computed in forward; a retained second backward, which recomputes from
    the saved inputs, refuses inputs modified in place since (autograd's error)."""
    (values, old_values, returns, action_mask), kwargs = _plan_inputs("token-mean bool")
    expected = _eager(values, old_values, returns, action_mask, **kwargs)[1]
    leaf, edited = values.clone().requires_grad_(True), old_values.clone()
    loss = fused_value_loss(leaf, edited, returns, action_mask, **kwargs)
    edited.add_(1.0)
    loss.backward(retain_graph=True)
    assert torch.equal(leaf.grad, expected)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.compile
def test_double_backward_is_refused_naming_fused(compiled):
    """create_graph=True raises an error naming the fused path instead of a silent zero second derivative."""
    (values, old_values, returns, action_mask), kwargs = _plan_inputs("token-mean bool")
    leaf = values.clone().requires_grad_(True)
    loss = fused_value_loss(leaf, old_values, returns, action_mask, **kwargs)
    with pytest.raises(RuntimeError, match=r"fused_value_loss has no second derivative.*create_graph=True"):
        torch.autograd.grad(loss, leaf, create_graph=True)


@pytest.mark.compile
@pytest.mark.parametrize("tokens", [37, 70_000])
def test_torch_func_transforms_raise_naming_fused_at_every_size(compiled, tokens):
    """torch.func.grad, vjp, jacrev, jvp and vmap through fused_value_loss raise an error naming
    fused_value_loss (and ValueLoss(fused=False)), small batch or large."""
    values, old_values, returns, action_mask = _inputs((2, tokens))

    def loss(v):
        return fused_value_loss(v, old_values, returns, action_mask, clip_eps=0.2)

    transforms = {
        "grad": lambda: torch.func.grad(loss)(values),
        "vjp": lambda: torch.func.vjp(loss, values)[1](torch.tensor(1.0)),
        "jacrev": lambda: torch.func.jacrev(loss)(values),
        "jvp": lambda: torch.func.jvp(loss, (values,), (torch.ones_like(values),)),
        "vmap": lambda: torch.func.vmap(loss)(values[None].expand(3, -1, -1)),
        "vmap of grad": lambda: torch.func.vmap(torch.func.grad(loss))(values[None].expand(3, -1, -1)),
    }
    for name, call in transforms.items():
        with pytest.raises((RuntimeError, ValueError), match=r"fused_value_loss") as raised:
            call()
        assert "ValueLoss(fused=False)" in str(raised.value), name


@pytest.mark.compile
def test_inside_the_callers_compile_region_the_eager_formula_runs(compiled):
    """Traced by the caller's torch.compile, fused_value_loss runs the eager formula (for that compiler to
    fuse) and compiles nothing of its own."""
    (values, old_values, returns, action_mask), kwargs = _plan_inputs("token-mean bool")
    before = fused.compiled_configurations()
    loss_fn = ValueLoss(0.2, fused=True)
    step = torch.compile(lambda v: loss_fn(v, old_values, returns, action_mask), fullgraph=True, backend="eager")
    leaf = values.clone().requires_grad_(True)
    loss = step(leaf)
    loss.backward()
    assert type(loss.grad_fn).__name__ != "FusedValueLossBackward"
    _assert_same((loss.detach(), leaf.grad), _eager(values, old_values, returns, action_mask, **kwargs))
    assert fused.compiled_configurations() == before


@pytest.mark.cuda
@pytest.mark.compile
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_eager():
    """On CUDA (inductor writes Triton) the fused loss and gradient match the eager path's (to a few ulp: CUDA's
    eager division by a number multiplies by its reciprocal)."""
    for name in PLANS:
        (values, old_values, returns, action_mask), kwargs = _plan_inputs(name)
        cuda = [None if t is None else t.cuda() for t in (values, old_values, returns, action_mask)]
        (loss, grad), (eager_loss, eager_grad) = _fused(*cuda, **kwargs), _eager(*cuda, **kwargs)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-30)
        torch.testing.assert_close(grad, eager_grad, rtol=4e-7, atol=1e-30)


# --------------------------------------------------------------------------- the whole matrix, uncompiled

CONFIGS = [
    dict(clip_eps=0.2),
    dict(clip_eps=0.2, variant="clipped"),
    dict(clip_eps=0.3, loss_type="huber", huber_delta=0.7),
    dict(clip_eps=0.3, variant="clipped", loss_type="huber", huber_delta=1.5),
    dict(clip_eps=None, scale=1.0),
    dict(clip_eps=0.0),
]
COUNTS = {  # per mode: token-mean reads batch_num_tokens, the sequence modes global_batch_size, token-sum neither
    "local": dict(dp_size=1),
    "numbers": dict(dp_size=2, batch_num_tokens=90.0, global_batch_size=5.0),
    "tensors": dict(dp_size=4, batch_num_tokens=torch.tensor(90), global_batch_size=torch.tensor(5.0)),
    "zero": dict(dp_size=1, batch_num_tokens=0, global_batch_size=torch.tensor(0.0)),
}


def _matrix_ids(config):
    return "-".join(f"{k}={v}" for k, v in config.items()) if isinstance(config, dict) else config


@pytest.mark.parametrize(("config", "counts"), [(config, "local") for config in CONFIGS]
                         + [(CONFIGS[0], counts) for counts in COUNTS if counts != "local"], ids=_matrix_ids)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("mode", MODES)
def test_every_configuration_matches_eager_and_the_reference(uncompiled, mode, mask, config, counts):
    """Every mode x mask kind x (variant, loss type, clipping; or counts: numbers, tensors, 0): the gradient
    equals eager's, and loss and gradient match the plain loops of tests/reference.py."""
    values, old_values, returns, action_mask = _inputs(mask=mask)
    count_name = {"token-mean": "batch_num_tokens", "token-sum": None}.get(mode, "global_batch_size")
    given = {name: value for name, value in COUNTS[counts].items() if name in ("dp_size", count_name)}
    kwargs = dict(config, mode=mode, **given)
    if mode == "seq-mean-token-sum-norm":
        kwargs["loss_scale_factor"] = 5.0
    loss, grad = result = _fused(values, old_values, returns, action_mask, **kwargs)
    _assert_same(result, _eager(values, old_values, returns, action_mask, **kwargs), msg=kwargs)
    reference = {name: float(value) if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}
    reference["delta"] = reference.pop("huber_delta", 1.0)
    assert loss.item() == pytest.approx(loss_loops(values, old_values, returns, action_mask, **reference), rel=1e-5)
    torch.testing.assert_close(grad.double(), grad_loops(values, old_values, returns, action_mask, **reference),
                               rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_other_dtypes(uncompiled, dtype, mode):
    """Half precision accumulates in float32 (a float32 loss, a gradient in the input's dtype); float64 stays
    float64; gradients equal eager's."""
    values, old_values, returns, action_mask = _inputs(dtype=dtype, mask="float")
    _assert_same(_fused(values, old_values, returns, action_mask, clip_eps=0.2, mode=mode),
                 _eager(values, old_values, returns, action_mask, clip_eps=0.2, mode=mode))


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from([(1,), (7,), (1, 1), (3, 1), (1, 9), (5, 5), (2, 3, 4), (41, 401)]),
    clip_eps=st.one_of(st.none(), st.floats(0.0, 2.0)),
    mode=st.sampled_from(MODES),
    mask=st.sampled_from(MASKS),
    keep=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_masks_and_clip_ranges(shape, clip_eps, mode, mask, keep, seed):
    """Awkward shapes (sizes 1, 3-D, 41x401), any clip range and mask density: the gradient equals eager's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused, "_COMPILED", {})
        patch.setattr(fused, "_COMPILE", lambda function: function)
        patch.setattr(fused, "_OLD_TORCH", None)
        values, old_values, returns, action_mask = _inputs(shape, mask=mask, seed=seed)
        if action_mask is not None:
            action_mask = action_mask * (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < keep)
        kwargs = dict(clip_eps=clip_eps, mode=mode)
        _assert_same(_fused(values, old_values, returns, action_mask, **kwargs),
                     _eager(values, old_values, returns, action_mask, **kwargs), msg=kwargs)


@pytest.mark.parametrize("closed", [True, False], ids=["closed band", "open band"])
def test_band_edges_follow_functional_band_closed(uncompiled, closed):
    """At |values - old_values| == clip_eps the gradient follows valueloss.functional.BAND_CLOSED (either way)."""
    values = torch.tensor([[1.25, -0.75, 0.5, 2.0]])
    old_values = torch.tensor([[1.0, -1.0, 0.25, 1.5]])
    returns = torch.tensor([[3.0, 3.0, -2.0, 1.75]])
    with band(closed):
        loss, grad = _fused(values, old_values, returns, None, clip_eps=0.25, mode="token-sum", scale=1.0)
        expected = grad_loops(values, old_values, returns, None, clip_eps=0.25, mode="token-sum", scale=1.0,
                              band_closed=closed)
    assert torch.equal(grad.double(), expected)


def test_gradcheck_float64(uncompiled):
    """torch.autograd.gradcheck in float64, every mode, away from the band's edges and the ties."""
    values, old_values, returns, action_mask = _inputs((3, 5), dtype=torch.float64, mask="float")
    for mode in MODES:
        leaf = values.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda v, mode=mode: fused_value_loss(v, old_values, returns, action_mask, clip_eps=0.2, mode=mode), (leaf,)
        )


def test_empty_inputs_run_uncompiled(monkeypatch):
    """A tensor with no tokens needs no graph (size 0 would get one of its own): loss 0, an empty gradient."""
    monkeypatch.setattr(fused, "_COMPILE", lambda function: pytest.fail("nothing may be compiled"))
    values = torch.zeros(0, 5, requires_grad=True)
    loss = fused_value_loss(values, values.detach(), values.detach(), clip_eps=0.2)
    loss.backward()
    assert loss.item() == 0.0 and values.grad.shape == (0, 5)


def test_no_grad_computes_the_loss_only(uncompiled):
    """Without a gradient to compute (no_grad, or values not requiring one) the loss alone is computed."""
    values, old_values, returns, action_mask = _inputs()
    with torch.no_grad():
        loss = fused_value_loss(values.requires_grad_(True), old_values, returns, action_mask, clip_eps=0.2)
    assert loss.grad_fn is None and all(not plan.want_grad for plan in fused._COMPILED)
    torch.testing.assert_close(loss, F.value_loss(values, old_values, returns, action_mask, clip_eps=0.2))


def test_old_torch_runs_the_function_uncompiled(monkeypatch):
    """Below MIN_COMPILE_TORCH nothing is compiled and the numbers are the same."""
    assert (fused._OLD_TORCH is None) == (torch.__version__ >= fused.MIN_COMPILE_TORCH)
    monkeypatch.setattr(fused, "_OLD_TORCH", "torch 2.1.2 is older than 2.6")
    monkeypatch.setattr(fused, "_COMPILE", lambda function: pytest.fail("nothing may be compiled"))
    values, old_values, returns, action_mask = _inputs()
    for mode in MODES:
        _assert_same(_fused(values, old_values, returns, action_mask, clip_eps=0.2, mode=mode),
                     _eager(values, old_values, returns, action_mask, clip_eps=0.2, mode=mode))


def test_configurations_are_bounded(uncompiled):
    """Numbers never make a new configuration: 200 calls with new clip_eps, scale, dp_size and counts add one."""
    values, old_values, returns, action_mask = _inputs()
    for i in range(200):
        fused_value_loss(values.requires_grad_(True), old_values, returns, action_mask, clip_eps=0.01 * i,
                         scale=0.5 + i, dp_size=1 + i, batch_num_tokens=float(i) if i % 2 else torch.tensor(i))
    assert fused.compiled_configurations() == 1


def test_other_inputs_requiring_grad_are_refused():
    """The fused path differentiates values only and says so when another input needs a gradient."""
    values, old_values, returns, action_mask = _inputs()
    with pytest.raises(ValueError, match="fused_value_loss differentiates values only; got returns"):
        fused_value_loss(values.requires_grad_(), old_values, returns.requires_grad_(), action_mask, clip_eps=0.2)


def test_bad_arguments_raise_the_eager_paths_errors():
    """Shapes, settings and counts are checked at the entry point, with the messages of the eager path."""
    values, old_values, returns, action_mask = _inputs()
    with pytest.raises(ValueError, match="values and returns must have the same shape"):
        fused_value_loss(values, old_values, returns[:, :4], action_mask, clip_eps=0.2)
    with pytest.raises(ValueError, match="mode must be one of"):
        fused_value_loss(values, old_values, returns, action_mask, clip_eps=0.2, mode="mean")
    with pytest.raises(ValueError, match="batch_num_tokens"):
        fused_value_loss(values, old_values, returns, action_mask, clip_eps=0.2, dp_size=2)
    with pytest.raises(ValueError, match="batch_num_tokens must be a non-negative finite count"):
        fused_value_loss(values, old_values, returns, action_mask, clip_eps=0.2, batch_num_tokens=-1)


def test_valueloss_fused_true_equals_fused_false(uncompiled):
    """ValueLoss(fused=True) and ValueLoss(fused=False) give the same numbers in every mode and variant."""
    values, old_values, returns, action_mask = _inputs((4, 3, 20))
    for mode in MODES:
        for variant in ("max", "clipped"):
            results = [_step(ValueLoss(0.2, loss_agg_mode=mode, variant=variant, fused=setting), values, old_values,
                             returns, action_mask) for setting in (True, False)]
            _assert_same(*results, msg=(mode, variant))


_NO_COMPILER = """
import torch
from valueloss.fused import fused_value_loss
values = torch.randn(8, 70, requires_grad=True)
for _ in range(2):
    try:
        fused_value_loss(values, torch.randn(8, 70), torch.randn(8, 70), clip_eps=0.2)
    except RuntimeError as error:
        print(str(error)[:80])
"""


@pytest.mark.slow
@pytest.mark.compile
def test_without_a_compiler_each_call_raises_naming_fused():
    """With CXX pointing nowhere (caches off), every call raises an error naming the fused path: the failure is
    not remembered, and nothing falls back silently."""
    if fused._OLD_TORCH is not None:
        pytest.skip(fused._OLD_TORCH)
    env = dict(os.environ, CXX="/nonexistent/g++", TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    proc = subprocess.run([sys.executable, "-c", _NO_COMPILER], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("fused_value_loss: torch.compile's graph failed on cpu (")
                                   for line in lines), lines
