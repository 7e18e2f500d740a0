"""The Triton kernels (``poincare_resnet.nn._triton``) against the PyTorch paths, under the
Triton interpreter on CPU tensors (``TRITON_INTERPRET=1``).

References: the closed forms of :mod:`poincare_resnet.nn._closed_forms` and
:func:`poincare_resnet.ball.fc_tangent` with native kernels off and plain autograd, evaluated in
float64. float32 kernels must match them to 1e-5 (max-norm relative error, values and every
gradient), float64 kernels to 1e-10; float64 gradchecks on tiny shapes. Shapes cover B = 1,
C = 1, odd H·W (7×5), [N, C] matrices and C above the channel block (C = 70, BLOCK_C = 32).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from poincare_resnet import _cpp, ball
from poincare_resnet.ball import get_eps, max_tangent_radius
from poincare_resnet.nn._closed_forms import batchnorm_forward, residual_forward

HAS_TRITON = importlib.util.find_spec("triton") is not None
# TRITON_INTERPRET must be set before triton.language is first imported (its library functions
# are jit-decorated at import), and setting it in a shared pytest process would also turn the
# real Triton kernels of other test modules (torch.compile on a GPU) into interpreted ones. So
# without it this module runs itself in a subprocess that has it.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install '.[gpu]')")
@pytest.mark.skipif(INTERPRETING, reason="already under the interpreter: the tests run here")
def test_kernels_under_interpreter():
    """Run this file's kernel tests with ``TRITON_INTERPRET=1`` in a fresh interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-x"],
        env=env,
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout.strip().splitlines()[-1], proc.stdout[-2000:]


def _cuda_target():
    try:
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget
    except Exception:  # pragma: no cover - an old or partial triton
        return None
    return GPUTarget("cuda", 90, 32) if "nvidia" in backends else None


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install '.[gpu]')")
@pytest.mark.skipif(INTERPRETING, reason="the interpreter does not compile kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_kernels_compile_for_cuda(dtype):
    """Every kernel compiles to PTX for sm_90 (no GPU needed): the interpreter runs Python, so
    this is what catches code that only the Triton compiler rejects."""
    if _cuda_target() is None:
        pytest.skip("triton has no NVIDIA backend")
    import triton
    from triton.compiler import ASTSource

    from poincare_resnet.nn._triton import _batchnorm as B
    from poincare_resnet.nn._triton import _fc as F
    from poincare_resnet.nn._triton import _residual as R

    dt = {torch.float32: "fp32", torch.float64: "fp64"}[dtype]
    res = dict(R._consts(0.7, 4e-3, 3.0, True), BLOCK_C=32, BLOCK_P=R.BLOCK_P)
    fc = dict(F._consts(0.7, dtype), BLOCK_C=32, BLOCK_P=F.BLOCK_P)
    bn = dict(B._consts(0.7, 4e-3, 3.0), BLOCK_C=32, BLOCK_P=B.BLOCK_P)
    mid = dict(SC=0.7**0.5, T_MAX=3.0, MN=1e-15, BLOCK_C=32, BLOCK_P=B.BLOCK_P)
    jobs = [
        (R.residual_fwd_kernel, res),
        (R.residual_bwd_kernel, dict(res, F_FIRST=False)),
        (F.fc_fwd_kernel, fc),
        (F.fc_bwd_kernel, dict(fc, NEED_DOTS=True)),
        (B.bn_out_kernel, bn),
        (B.bn_var_kernel, bn),
        (B.bn_bwd_kernel, dict(bn, KOUT=True)),
        (B.bn_bwd_kernel, dict(bn, KOUT=False)),
        (B.mid_fwd_kernel, mid),
        (B.mid_bwd_kernel, mid),
    ]
    for fn, consts in jobs:
        sig = {
            name: "constexpr" if name in consts else ("*" + dt if name.endswith("_ptr") else "i64")
            for name in fn.arg_names
        }
        kernel = triton.compile(ASTSource(fn, sig, constexprs=consts), target=_cuda_target())
        assert ".entry" in kernel.asm["ptx"], fn.__name__


@pytest.fixture(scope="module")
def tk():
    """The kernel package (only under the interpreter; otherwise the subprocess runs these)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install '.[gpu]')")
    if not INTERPRETING:
        pytest.skip("runs in the TRITON_INTERPRET=1 subprocess of test_kernels_under_interpreter")
    pkg = importlib.import_module("poincare_resnet.nn._triton")
    native = _cpp.native_enabled()
    _cpp.set_native(False)
    yield pkg
    _cpp.set_native(native)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a − b| / max|b|`` in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _grads(fn, inputs, grad_out):
    """Output and gradients of ``⟨grad_out, fn(*inputs)⟩`` w.r.t. the tensors needing grad."""
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    out = fn(*leaves)
    need = [x for x in leaves if x.requires_grad]
    grads = torch.autograd.grad((out * grad_out.to(out.dtype)).sum(), need)
    return out.detach(), grads


def _compare(kernel, reference, inputs, dtype, gen, tol=None, conditioned=True):
    """kernel(inputs in dtype) against reference(inputs in float64): values and gradients.

    ``conditioned=False`` (inputs at the clamps, where float32 rounding is amplified): the
    float32 error may reach 4× that of the float32 reference itself."""
    tol = TOL[dtype] if tol is None else tol
    inputs64 = [x.detach().double().requires_grad_(x.requires_grad) for x in inputs]
    ref_out, _ = _grads(reference, inputs64, torch.ones(()))
    grad_out = torch.randn(ref_out.shape, generator=gen, dtype=torch.float64)
    ref_out, ref_grads = _grads(reference, inputs64, grad_out)

    def errors_of(fn):
        cast = [x.detach().to(dtype).requires_grad_(x.requires_grad) for x in inputs]
        out, grads = _grads(fn, cast, grad_out)
        assert out.dtype == dtype
        return [rel_err(out, ref_out)] + [
            rel_err(g, r) for g, r in zip(grads, ref_grads, strict=True)
        ]

    errors = errors_of(kernel)
    if not conditioned and dtype == torch.float32:
        tol = max(tol, 4 * max(errors_of(reference)))
    assert max(errors) <= tol, f"relative errors (value, grads...) {errors} > {tol}"
    return errors


def _ball_map(shape, gen, lo, hi, c):
    """A map whose per-pixel norms along dim 1 are uniform in [lo, hi]/√c."""
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    norm_shape = list(shape)
    norm_shape[1] = 1
    radius = lo + (hi - lo) * torch.rand(norm_shape, generator=gen, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True) * radius / c**0.5


SHAPES = [(2, 70, 7, 5), (1, 1, 7, 5), (3, 4, 2, 2), (6, 5), (1, 1)]
IDS = ["C70", "B1C1", "small", "NC", "N1C1"]


# ------------------------------------------------------------------------------- residual


def _res_inputs(shape, gen, alpha_tensor, c, lo=0.1, hi=1.0):
    f = _ball_map(shape, gen, lo, hi, c)
    r = _ball_map(shape, gen, lo, hi, c)
    f.requires_grad_()
    r.requires_grad_()
    a = torch.tensor([0.7], dtype=torch.float64, requires_grad=True) if alpha_tensor else None
    return f, r, a


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("f_first", [True, False], ids=["f_first", "res_first"])
def test_residual_matches_closed_form(tk, dtype, shape, f_first):
    gen = torch.Generator().manual_seed(1)
    c = 0.8
    eps, t_max = get_eps(dtype), max_tangent_radius(dtype)
    f, r, a = _res_inputs(shape, gen, True, c)  # √c‖v‖ ≤ 1: off the clamps

    def kern(f, r, a):
        return tk.residual(f, r, a, c, eps, t_max, f_first)

    def ref(f, r, a):
        return residual_forward(f, r, a.to(f.dtype), c, eps, t_max, f_first)

    _compare(kern, ref, [f, r, a], dtype, gen)


@pytest.mark.parametrize("alpha", [None, 0.3], ids=["none", "float"])
def test_residual_alpha_forms_and_clamps(tk, dtype, alpha):
    """α None or a float; large inputs that hit the tanh cap and the projection."""
    gen = torch.Generator().manual_seed(2)
    c = 1.3
    eps, t_max = get_eps(dtype), max_tangent_radius(dtype)
    f, r, _ = _res_inputs((2, 37, 3, 3), gen, False, c, lo=0.5, hi=8.0)

    def kern(f, r):
        return tk.residual(f, r, alpha, c, eps, t_max, True, block_c=16)

    def ref(f, r):
        return residual_forward(f, r, alpha, c, eps, t_max, True)

    _compare(
        kern,
        ref,
        [f, r],
        dtype,
        gen,
        {torch.float32: 1e-5, torch.float64: 1e-9}[dtype],
        conditioned=False,
    )


def test_residual_gradcheck(tk):
    gen = torch.Generator().manual_seed(3)
    f, r, a = _res_inputs((2, 3, 1, 3), gen, True, 0.7)
    eps, t_max = get_eps(torch.float64), max_tangent_radius(torch.float64)
    for f_first in (True, False):
        assert torch.autograd.gradcheck(
            lambda f, r, a, f_first=f_first: tk.residual(
                f, r, a, 0.7, eps, t_max, f_first, block_c=2
            ),
            (f, r, a),
            fast_mode=True,
        )


def test_residual_channels_last_and_errors(tk):
    gen = torch.Generator().manual_seed(4)
    f, r, _ = _res_inputs((2, 3, 4, 5), gen, False, 1.0)
    eps, t_max = get_eps(torch.float64), max_tangent_radius(torch.float64)
    ref = residual_forward(f, r, None, 1.0, eps, t_max)
    out = tk.residual(f.to(memory_format=torch.channels_last), r, None, 1.0, eps, t_max)
    assert rel_err(out, ref) < 1e-12
    with pytest.raises(ValueError, match="res"):
        tk.residual(f, r[:, :2], None, 1.0, eps, t_max)
    with pytest.raises(ValueError, match="f must be float32 or float64"):
        tk.residual(f.half(), r.half(), None, 1.0, eps, t_max)
    with pytest.raises(ValueError, match="alpha"):
        tk.residual(f, r, torch.ones(2, dtype=torch.float64), 1.0, eps, t_max)
    with pytest.raises(TypeError, match="c must be a Python float"):
        tk.residual(f, r, None, torch.tensor(1.0), eps, t_max)
    with pytest.raises(ValueError, match="f must"):
        tk.residual(f[:, :, ::2, :], r[:, :, ::2, :], None, 1.0, eps, t_max)


def test_residual_nan_propagates(tk):
    f = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    f[0, 1, 1, 0] = float("nan")
    out = tk.residual(f, torch.zeros_like(f), None, 1.0, 1e-5, 5.0)
    assert out[0, :, 1, 0].isnan().all() and not out[0, :, 0, 0].isnan().any()


# ------------------------------------------------------------------------------- FC map


def _fc_reference(dtype):
    """``ball.fc_tangent`` in float64, native off, plain autograd, with ``dtype``'s limits."""

    def ref(dots, sq, zn, bias, c, dim):
        saved = get_eps(torch.float64)
        ball.set_eps(torch.float64, get_eps(dtype))
        try:
            with ball.config.manual_backward(False):
                return ball.fc_tangent(dots, sq, zn, bias, c=c, dim=dim)
        finally:
            ball.set_eps(torch.float64, saved)

    return ref


def _fc_inputs(shape, gen, dot_scale=0.5, sq_scale=1.0):
    k = shape[1]
    dots = torch.randn(shape, generator=gen, dtype=torch.float64) * dot_scale
    sq_shape = list(shape)
    sq_shape[1] = 1
    sq = torch.rand(sq_shape, generator=gen, dtype=torch.float64) * sq_scale + 0.05
    zn = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(k, generator=gen, dtype=torch.float64) * 0.3
    return [t.requires_grad_() for t in (dots, sq, zn, bias)]


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_fc_matches_ball(tk, dtype, shape):
    gen = torch.Generator().manual_seed(5)
    c = 0.6
    dim = 1 if len(shape) == 4 else -1
    ref = _fc_reference(dtype)
    inputs = _fc_inputs(shape, gen)
    _compare(
        lambda *x: tk.fc_tangent(*x, c, dim),
        lambda *x: ref(*x, c, dim),
        inputs,
        dtype,
        gen,
    )


@pytest.mark.parametrize("case", ["small_p", "clipped"])
def test_fc_small_and_clipped(tk, dtype, case):
    """Tiny inputs (series branches) and large ones (input cap, argument clamp, output clip)."""
    gen = torch.Generator().manual_seed(6)
    c = 1.0
    if case == "small_p":
        inputs = _fc_inputs((2, 40, 3, 3), gen, dot_scale=1e-3, sq_scale=1e-4)
        tol = TOL[dtype]
    else:
        inputs = _fc_inputs((2, 40, 3, 3), gen, dot_scale=3.0, sq_scale=30.0)
        tol = {torch.float32: 3e-5, torch.float64: 1e-9}[dtype]
    ref = _fc_reference(dtype)
    _compare(
        lambda *x: tk.fc_tangent(*x, c, 1, block_c=16),
        lambda *x: ref(*x, c, 1),
        inputs,
        dtype,
        gen,
        tol,
    )


def test_fc_gradcheck(tk):
    gen = torch.Generator().manual_seed(7)
    for shape, dim in (((2, 3, 1, 3), 1), ((3, 4), -1)):
        inputs = _fc_inputs(shape, gen)
        assert torch.autograd.gradcheck(
            lambda *x, dim=dim: tk.fc_tangent(*x, 0.9, dim, block_c=2),
            tuple(inputs),
            fast_mode=True,
        )


def test_fc_errors(tk):
    gen = torch.Generator().manual_seed(8)
    dots, sq, zn, bias = (t.detach() for t in _fc_inputs((2, 3, 2, 2), gen))
    with pytest.raises(ValueError, match="znorm"):
        tk.fc_tangent(dots, sq, zn[:2], bias, 1.0, 1)
    with pytest.raises(ValueError, match="bias"):
        tk.fc_tangent(dots, sq, zn, bias[:2], 1.0, 1)
    with pytest.raises(ValueError, match="sq must have shape"):
        tk.fc_tangent(dots, sq.expand(2, 3, 2, 2), zn, bias, 1.0, 1)
    with pytest.raises(ValueError, match="dim"):
        tk.fc_tangent(dots, sq, zn, bias, 1.0, -1)
    with pytest.raises(ValueError, match="dots must be float32"):
        tk.fc_tangent(dots.half(), sq.half(), zn, bias, 1.0, 1)


# ------------------------------------------------------------------------------- batch norm

BN_SHAPES = [(2, 70, 7, 5), (1, 1, 7, 5), (3, 4, 2, 2), (1, 3, 1, 1)]
BN_IDS = ["C70", "B1C1", "small", "B1P1"]


def _bn_inputs(shape, gen, c, lo=0.1, hi=1.0):
    ch = shape[1]
    v = _ball_map(shape, gen, lo, hi, c)
    beta_t = _ball_map((1, ch), gen, 0.1, 0.6, c)[0]
    weight = torch.tensor([0.8], dtype=torch.float64)
    mu = _ball_map((1, ch), gen, 0.05, 0.4, c)[0]
    return [t.requires_grad_() for t in (v, beta_t, weight, mu)]


def _bn_fns(tk, dtype, c, train, block_c=None):
    eps, t_max = get_eps(dtype), max_tangent_radius(dtype)
    bn_eps = 1e-5

    def kern(v, beta_t, weight, mu=None):
        var = None if train else torch.tensor(0.3, dtype=v.dtype)
        return tk.batchnorm(v, mu, beta_t, weight, var, c, bn_eps, eps, t_max, block_c=block_c)

    def ref(v, beta_t, weight, mu=None):
        var = None if train else torch.tensor(0.3, dtype=v.dtype)
        return batchnorm_forward(v, mu, beta_t, weight, var, c, bn_eps, eps, t_max)

    return kern, ref


@pytest.mark.parametrize("shape", BN_SHAPES, ids=BN_IDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_batchnorm_matches_closed_form(tk, dtype, shape, train):
    """Eval: gradients to v, β, weight and the given μ; train: through the batch μ and σ²."""
    if train and shape[0] * shape[2] * shape[3] == 1:
        pytest.skip("one pixel: μ = x, so d(x, μ) = 0, where its gradient is undefined")
    gen = torch.Generator().manual_seed(9)
    c = 0.9
    inputs = _bn_inputs(shape, gen, c)
    if train:
        inputs = inputs[:3]
    kern, ref = _bn_fns(tk, dtype, c, train)
    _compare(lambda *x: kern(*x)[0], lambda *x: ref(*x)[0], inputs, dtype, gen)
    out_k, mu_k, var_k, n_k = kern(*[x.detach().to(dtype) for x in inputs])
    out_r, mu_r, var_r, n_r = ref(*[x.detach() for x in inputs])
    assert rel_err(mu_k, mu_r) <= TOL[dtype] and rel_err(var_k, var_r) <= TOL[dtype]
    assert (n_k is None) == (n_r is None) and (n_r is None or n_k.item() == n_r.item())


def test_batchnorm_near_the_mean_at_the_boundary(tk, dtype):
    """x ≈ μ near the boundary: the d = x − μ form keeps float32 accurate (the closed form's
    float32 coefficients lose ~1e-3 there; the kernel may not do worse than 4× the float32
    reference, and meets 1e-5 if it is better)."""
    gen = torch.Generator().manual_seed(10)
    c = 1.0
    shape = (2, 6, 3, 3)
    base = _ball_map((1, 6, 1, 1), gen, 2.0, 2.0, c)
    v = (base + 1e-3 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()
    _, beta_t, weight, mu = _bn_inputs(shape, gen, c)
    mu = ball.expmap0(base.reshape(-1), c=c).detach().requires_grad_()
    kern, ref = _bn_fns(tk, dtype, c, train=False, block_c=4)
    _compare(
        lambda *x: kern(*x)[0],
        lambda *x: ref(*x)[0],
        [v, beta_t, weight, mu],
        dtype,
        gen,
        {torch.float32: 1e-5, torch.float64: 1e-9}[dtype],
        conditioned=False,
    )


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_batchnorm_gradcheck(tk, train):
    gen = torch.Generator().manual_seed(11)
    inputs = _bn_inputs((2, 3, 1, 2), gen, 0.8)
    if train:
        inputs = inputs[:3]
    kern, _ = _bn_fns(tk, torch.float64, 0.8, train, block_c=2)
    assert torch.autograd.gradcheck(lambda *x: kern(*x)[0], tuple(inputs), fast_mode=True)


def test_batchnorm_errors_and_nan(tk):
    gen = torch.Generator().manual_seed(12)
    v, beta_t, weight, mu = (t.detach() for t in _bn_inputs((2, 3, 2, 2), gen, 1.0))
    var = torch.tensor(0.5, dtype=torch.float64)
    args = (1.0, 1e-5, 1e-5, 5.0)
    with pytest.raises(ValueError, match="beta_t"):
        tk.batchnorm(v, mu, beta_t[:2], weight, var, *args)
    with pytest.raises(ValueError, match="mu"):
        tk.batchnorm(v, mu[:2], beta_t, weight, var, *args)
    with pytest.raises(ValueError, match="weight"):
        tk.batchnorm(v, mu, beta_t, torch.ones(2, dtype=torch.float64), var, *args)
    with pytest.raises(ValueError, match="v must have 4 dims"):
        tk.batchnorm(v[:, :, 0, 0], mu, beta_t, weight, var, *args)
    v = v.clone()
    v[1, 2, 0, 1] = float("nan")
    out = tk.batchnorm(v, mu, beta_t, weight, var, *args)[0]
    assert out[1, :, 0, 1].isnan().all() and not out[0].isnan().any()
    assert tk.batchnorm(v, None, beta_t, weight, None, *args)[0].isnan().all()  # NaN in μ


def test_applicable(tk):
    x = torch.zeros(2, 3, 4, 4)
    assert tk.available()
    assert tk.applicable(x, x, torch.zeros(3), c=1.0)
    assert not tk.applicable(x, x.double(), c=1.0)
    assert not tk.applicable(x.half(), c=1.0)
    assert not tk.applicable(torch.zeros(2, 3, 4), c=1.0)
    assert not tk.applicable(x, c=torch.tensor(1.0))
    assert not tk.applicable(x[:, :, ::2, :], c=1.0)
    flat = x[:, :, 0, 0]  # [N, C]
    assert tk.applicable(flat, c=1.0) and not tk.applicable(flat, kind="batchnorm")
    assert tk.applicable(x.to(memory_format=torch.channels_last), kind="batchnorm")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        assert not tk.applicable(x, c=1.0)  # CPU tensors need the interpreter
    finally:
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_layers_dispatch_to_triton(tk, monkeypatch, train):
    """The layers reach the Triton kernels through ``nn._dispatch`` (CUDA tensors there; CPU
    tensors under the interpreter here) and give the PyTorch path's values and gradients."""
    from poincare_resnet import nn as pnn
    from poincare_resnet.nn import _dispatch

    torch.manual_seed(0)
    conv = pnn.PoincareConv2d(3, 5, 3, padding=1, c=0.3)
    bn = pnn.PoincareBatchNorm2d(5, c=0.3)
    block = pnn.PoincareResidual(c=0.3)
    conv, bn = conv.double(), bn.double()  # float64: the two paths must agree to rounding
    bn.train(train)
    if not train:
        bn.running_var.fill_(0.7)

    def run():
        x = (torch.randn(2, 3, 6, 5, dtype=torch.float64) * 0.5).requires_grad_()
        torch.manual_seed(1)
        y = bn(conv(x))
        out = block(y, y.flip(0), alpha=0.5)
        out.pow(2).sum().backward()
        grads = [x.grad] + [p.grad.clone() for p in (*conv.parameters(), *bn.parameters())]
        for p in (*conv.parameters(), *bn.parameters()):
            p.grad = None
        return out.detach(), grads

    torch.manual_seed(2)
    ref_out, ref_grads = run()
    calls = []
    for name in ("fc_tangent", "batchnorm", "residual"):
        real = getattr(_dispatch._triton, name)
        monkeypatch.setattr(
            _dispatch._triton,
            name,
            lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k),
        )
    monkeypatch.setattr(_dispatch, "_TRITON_ON_CPU", True)
    torch.manual_seed(2)
    out, grads = run()
    assert sorted(set(calls)) == ["batchnorm", "fc_tangent", "residual"]
    assert rel_err(out, ref_out) <= 1e-10
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g, r) <= 1e-9
