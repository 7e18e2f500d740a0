"""The native CPU batch norm (``_cpp/batchnorm.cpp``) against the PyTorch closed form."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _helpers import bn_inputs, bn_run, gen

from poincare_resnet import _cpp, ball
from poincare_resnet.ball import get_eps, max_tangent_radius
from poincare_resnet.nn import PoincareBatchNorm2d
from poincare_resnet.nn._closed_forms import batchnorm_forward
from poincare_resnet.nn._native_batchnorm import (
    _BatchNormMap,
    _TrainBatchNorm,
    native_batchnorm,
    native_batchnorm_applicable,
)

F64 = torch.float64
_NATIVE = _cpp.load_kernel("batchnorm") is not None
pytestmark = pytest.mark.skipif(
    not _NATIVE, reason="native batch-norm kernel unavailable (no C++ toolchain or disabled)"
)

# float32: both paths carry ~1e-5..1e-4 of rounding (sums over pixels, tanh/atanh near the
# boundary); each is about equally far from the float64 evaluation (the *_vs_exact checks)
TOL = {torch.float64: 1e-10, torch.float32: 3e-4}


_gen, _inputs, _run = gen, bn_inputs, bn_run


NAMES = ["out", "mu", "var", "grad v", "grad bias", "grad weight"]


def _rel_error(got, want, floor=1e-30):
    scale = max(float(want.abs().max()), floor)
    return float((got.double() - want.double()).abs().max()) / scale


def _errors(got, want):
    """Max error of each result relative to its scale. Gradients that vanish (the weight's when
    every point sits on the clip radius, the input's for a single position) are measured
    against the largest input/bias gradient; σ² against the eps it is added to."""
    grad_scale = 1e-3 * max(float(want[3].abs().max()), float(want[4].abs().max()))
    errors = {}
    for i, (name, a, b) in enumerate(zip(NAMES, got, want, strict=True)):
        assert a.shape == b.shape, name
        floor = grad_scale if i >= 3 else (1e-5 if name == "var" else 1e-30)
        errors[name] = _rel_error(a, b, floor)
    return errors


def _check(shape, c, scale, dtype, train, seed=0, equal=False, tol=None):
    args = _inputs(shape, c, scale, dtype, seed, train, equal)
    want, n_want = _run(batchnorm_forward, *args, c)
    got, n_got = _run(native_batchnorm, *args, c)
    assert n_got == n_want
    assert all(a.dtype == b.dtype for a, b in zip(got, want, strict=True))
    tol = TOL[dtype] if tol is None else tol
    for name, err in _errors(got, want).items():
        assert math.isfinite(err) and err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


def _check_float32_vs_exact(shape, c, scale, train, seed=0, equal=False):
    """Ill-conditioned float32 cases (x ≈ μ near the boundary amplify rounding by the conformal
    factor and by r): both float32 paths are compared with the float64 evaluation of the same
    float32 inputs, and the native one must be about as accurate as the PyTorch one."""
    args = _inputs(shape, c, scale, torch.float32, seed, train, equal)
    wide = tuple(None if t is None else t.double() for t in args)
    exact, _ = _run(batchnorm_forward, *wide, c, like=torch.float32)
    native = _errors(_run(native_batchnorm, *args, c)[0], exact)
    closed = _errors(_run(batchnorm_forward, *args, c)[0], exact)
    for name in NAMES:
        assert math.isfinite(native[name]), name
        assert native[name] <= 3 * closed[name] + TOL[torch.float32], (
            f"{name}: native error {native[name]:.3g}, closed form {closed[name]:.3g}"
        )


# ---------------------------------------------------------------------------- against autograd


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("scale", [0.3, 1.5, 6.0])
def test_matches_closed_form_float64(train, scale, curvature):
    _check((3, 4, 5, 3), curvature, scale, F64, train)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("scale", [0.3, 1.5])
def test_matches_closed_form_float32(train, scale, curvature):
    _check((4, 8, 6, 5), curvature, scale, torch.float32, train, seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_near_boundary_clamps_active(dtype, train):
    """Large tangent norms: expmap0 clips at t_max, (−μ) ⊕ x is projected, logmap0 clips."""
    c = 1.0
    v = _inputs((3, 4, 5, 3), c, 30.0, dtype, 2, train)[0]
    assert float((v.norm(dim=1) * math.sqrt(c)).min()) > max_tangent_radius(dtype)
    _check((3, 4, 5, 3), c, 30.0, dtype, train, seed=2)
    _check((3, 4, 5, 3), c, 4.0, dtype, train, seed=3)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_all_equal_inputs(scale, train):
    """Every position the same point, so x = μ: m = (−μ) ⊕ x is rounding noise and σ² ≈ 0
    (r = |w|/√eps ≈ 400 amplifies it); far out the conformal factor amplifies it too."""
    shape = (2, 4, 3, 3)
    _check(shape, 0.5, scale, F64, train, seed=4, equal=True, tol=1e-6)
    if scale < 1:
        _check_float32_vs_exact(shape, 0.5, scale, train, seed=4, equal=True)
        return
    # Near the boundary in float32 the batch midpoint itself is off by ~1e-5 relative in both
    # paths (its formula divides by 1 + √(1 − c‖m'‖²) with 1 − c‖m'‖² = 1/(2γ² − 1)² computed
    # from float32 sums), which r then amplifies: both paths' outputs are rounding noise of size
    # O(1) there. Check they stay finite and bounded.
    args = _inputs(shape, 0.5, scale, torch.float32, 4, train, equal=True)
    got, _ = _run(native_batchnorm, *args, 0.5)
    for name, t in zip(NAMES, got, strict=True):
        assert torch.isfinite(t).all(), name
    bound = max_tangent_radius(torch.float32) / math.sqrt(0.5)
    assert float(got[0].norm(dim=1).max()) <= bound * (1 + 1e-5)
    if train:
        assert float(got[2]) < 1e-3


@pytest.mark.parametrize("scale", [1.0, 2.5, 3.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_near_boundary_as_accurate_as_closed_form(scale, seed):
    _check_float32_vs_exact((3, 5, 4, 3), 0.5, scale, True, seed=seed)
    _check_float32_vs_exact((3, 5, 4, 3), 0.5, scale, False, seed=seed)


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (1, 5, 1, 1), (3, 2, 7, 5), (2, 6, 13, 11)])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_odd_shapes(shape, train):
    """Pixel counts that are not multiples of the SIMD width or of the block (tail lanes)."""
    if shape[0] * shape[2] * shape[3] == 1 and train:
        # a single position: x = μ exactly and σ² = 0, as for all-equal inputs
        _check(shape, 1.0, 1.0, F64, train, seed=5, tol=1e-6)
        _check_float32_vs_exact(shape, 1.0, 1.0, train, seed=5)
        return
    _check(shape, 1.0, 1.0, F64, train, seed=5)
    _check(shape, 1.0, 0.5, torch.float32, train, seed=5)
    _check_float32_vs_exact(shape, 1.0, 1.0, train, seed=5)


def test_larger_map_float32():
    """Many blocks per image and several tasks (the per-task partial sums)."""
    _check((3, 16, 20, 19), 0.1, 1.0, torch.float32, True, seed=6)
    _check((3, 16, 20, 19), 0.1, 1.0, torch.float32, False, seed=6)


def test_results_do_not_depend_on_thread_count():
    args = _inputs((4, 8, 17, 19), 0.3, 1.0, torch.float32, 7, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = _run(native_batchnorm, *args, 0.3)
        torch.set_num_threads(2)
        two, _ = _run(native_batchnorm, *args, 0.3)
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(NAMES, one, two, strict=True):
        assert torch.equal(a, b), name


def test_repeated_calls_are_bitwise_equal():
    """Nothing depends on buffer addresses or scheduling (gradcheck's reentrancy check needs
    this, and so do bitwise-reproducible training runs)."""
    args = _inputs((3, 4, 5, 3), 0.7, 2.0, F64, 8, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, _ = _run(native_batchnorm, *args, 0.7)
        for _ in range(30):
            again, _ = _run(native_batchnorm, *args, 0.7)
            for name, a, b in zip(NAMES, again, first, strict=True):
                assert torch.equal(a, b), name
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- gradcheck


def _gradcheck(fn, inputs):
    # finite differences of these maps carry ~1e-7 truncation error: gradcheck's default
    # tolerances (the exact comparison with autograd is the tests above)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


GRADCHECK_CASES = {
    f"{mode}-{scale}": ((3, 4, 5, 3), 0.7, scale, 8, mode == "train")
    for mode in ("train", "eval")
    for scale in (0.5, 2.0)
}
# points far out (expmap0 clipped for some pixels, projections active)
GRADCHECK_CASES["near-boundary"] = ((2, 3, 3, 2), 1.0, 3.0, 10, True)


@pytest.mark.parametrize("case", list(GRADCHECK_CASES.values()), ids=list(GRADCHECK_CASES))
def test_gradcheck_native_batchnorm(case):
    shape, c, scale, seed, train = case
    v, bias, weight, mu, var, _ = _inputs(shape, c, scale, F64, seed, train)
    inputs = tuple(t.clone().requires_grad_(True) for t in (v, bias, weight))

    def f(v, bias, weight):
        return native_batchnorm(
            v, mu, bias, weight, var, c, 1e-5, get_eps(F64), max_tangent_radius(F64)
        )[0]

    _gradcheck(f, inputs)


def test_gradcheck_each_function():
    c, dt = 0.7, F64
    eps, t_max = get_eps(dt), max_tangent_radius(dt)
    g = _gen(9)
    v = (torch.randn(3, 4, 5, 3, generator=g, dtype=dt) * 1.2).requires_grad_(True)
    mu = (ball.expmap0(torch.randn(4, generator=g, dtype=dt) * 0.5, c=c)).requires_grad_(True)
    beta = (ball.expmap0(torch.randn(4, generator=g, dtype=dt) * 0.5, c=c)).requires_grad_(True)
    bias = (torch.randn(4, generator=g, dtype=dt) * 0.5).requires_grad_(True)
    r = torch.tensor([0.8], dtype=dt, requires_grad=True)
    _gradcheck(
        lambda v, mu, beta, r: _BatchNormMap.apply(v, mu, beta, r, c, t_max, eps),
        (v, mu, beta, r),
    )
    _gradcheck(
        lambda v, bias, r: _TrainBatchNorm.apply(v, bias, r, c, 1e-5, eps, t_max)[0],
        (v, bias, r),
    )
    # each input alone (the backward skips the work for inputs that need no gradient)
    for i in range(3):
        inputs = [t.detach().requires_grad_(j == i) for j, t in enumerate((v, bias, r))]
        _gradcheck(
            lambda v, bias, r: _TrainBatchNorm.apply(v, bias, r, c, 1e-5, eps, t_max)[0],
            tuple(inputs),
        )


# ---------------------------------------------------------------------------- the layer


@pytest.fixture
def native_switch():
    yield _cpp.set_native
    _cpp.set_native(True)


def _layer_run(bn, u, grad):
    u = u.clone().requires_grad_(True)
    out = bn(u)
    (out * grad).sum().backward()
    return out.detach(), u.grad, bn.weight.grad, bn.bias.grad


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_layer_native_on_and_off(dtype, native_switch):
    tol = TOL[dtype]
    c = 0.4
    base = PoincareBatchNorm2d(6, c=c, momentum=0.3).to(dtype)
    with torch.no_grad():
        base.bias.copy_(torch.randn(6, generator=_gen(11)) * 0.3)
        base.weight.fill_(0.9)
    results = {}
    for native in (False, True):
        native_switch(native)
        bn = copy.deepcopy(base)
        runs = []
        for step in range(3):  # train steps update the running statistics
            u = torch.randn(4, 6, 5, 7, generator=_gen(20 + step), dtype=dtype) * 1.5
            runs.append(_layer_run(bn, u, torch.randn(u.shape, generator=_gen(30), dtype=dtype)))
            bn.zero_grad()
        stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
        bn.eval()
        u = torch.randn(3, 6, 4, 4, generator=_gen(40), dtype=dtype)
        runs.append(_layer_run(bn, u, torch.randn(u.shape, generator=_gen(41), dtype=dtype)))
        results[native] = runs, stats
    (runs_ref, stats_ref), (runs_nat, stats_nat) = results[False], results[True]
    # the weight's gradient is one sum over B·P terms that can cancel (at step 2 to 0.054 from
    # ~5): its rounding is relative to the size it has at the other steps, not to that value
    # (both paths ~2.5e-4 from float64 there, in opposite directions on AVX-512)
    weight_scale = max(float(run[2].abs().max()) for run in runs_ref)
    for step, (a, b) in enumerate(zip(runs_nat, runs_ref, strict=True)):
        for name, x, y in zip(["out", "grad u", "grad weight", "grad bias"], a, b, strict=True):
            floor = weight_scale if name == "grad weight" else 1e-30
            assert _rel_error(x, y, floor) <= tol, f"step {step} {name}"
    assert _rel_error(stats_nat[0], stats_ref[0]) <= tol, "running_mean"
    assert _rel_error(stats_nat[1], stats_ref[1]) <= tol, "running_var"
    assert stats_nat[2] == stats_ref[2] == 3


def test_layer_uses_native_path(monkeypatch):
    from poincare_resnet.nn import batchnorm_map

    calls = []
    original = batchnorm_map.native_batchnorm

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(batchnorm_map, "native_batchnorm", spy)
    bn = PoincareBatchNorm2d(3, c=0.5)
    bn(torch.randn(2, 3, 4, 4))
    bn.eval()
    bn(torch.randn(2, 3, 4, 4))
    assert len(calls) == 2
    _cpp.set_native(False)
    try:
        bn(torch.randn(2, 3, 4, 4))
    finally:
        _cpp.set_native(True)
    assert len(calls) == 2


def test_backward_after_native_switched_off(native_switch):
    """The graph keeps the kernel module it was built with."""
    bn = PoincareBatchNorm2d(3, c=0.5)
    u = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = bn(u)
    native_switch(False)
    out.sum().backward()
    assert torch.isfinite(u.grad).all()


def test_applicability():
    v = torch.randn(2, 3, 4, 4)
    assert native_batchnorm_applicable(v, 0.5, None)
    assert native_batchnorm_applicable(v.double(), 1, None)
    assert not native_batchnorm_applicable(v, torch.tensor(0.5), None)  # learnable curvature
    assert not native_batchnorm_applicable(v, 0.5, lambda t: t)  # synchronised statistics
    assert not native_batchnorm_applicable(v.half(), 0.5, None)
    assert not native_batchnorm_applicable(v[0], 0.5, None)
    _cpp.set_native(False)
    try:
        assert not native_batchnorm_applicable(v, 0.5, None)
    finally:
        _cpp.set_native(True)


def test_learnable_curvature_uses_the_pytorch_path():
    from poincare_resnet.nn.curvature import Curvature

    bn = PoincareBatchNorm2d(3, c=Curvature(0.5, learnable=True))
    u = torch.randn(2, 3, 4, 4, requires_grad=True)
    bn(u).sum().backward()
    assert bn.curvature.raw.grad is not None and torch.isfinite(u.grad).all()


def test_non_contiguous_input():
    u = torch.randn(2, 5, 6, 4, dtype=F64).permute(0, 1, 3, 2)  # not contiguous
    c = 0.5
    bias = torch.randn(5, dtype=F64) * 0.2
    weight = torch.tensor([1.1], dtype=F64)
    args = (None, bias, weight, None, c, 1e-5, get_eps(F64), max_tangent_radius(F64))
    got = native_batchnorm(u, *args)[0]
    want = batchnorm_forward(u, *args)[0]
    assert _rel_error(got, want) <= 1e-10


def test_double_backward_is_refused():
    """The hand-written backward is not differentiable: say so instead of returning wrong
    second derivatives."""
    bn = PoincareBatchNorm2d(3, c=0.5).double()
    u = torch.randn(2, 3, 4, 4, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(bn(u).pow(2).sum(), u, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
