"""Wrongly sized, typed, placed or strided arguments raise an error naming the argument.

Before these checks the native FC kernel indexed ``ch``, ``sh`` and ``zn2`` by the channel count
of ``dots`` whatever their size (a 7-element bias for 8 channels read past its end). Each case
here hands one bad argument to a public entry point (``ball.fc_tangent``, the layers' functional
entry points) or to a custom op of ``poincare_resnet._cpp`` called directly through
``torch.ops``, and checks that it raises before any kernel runs, with the argument's name in the
message. A meta tensor stands in for a tensor on another device.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import native_switch

import poincare_resnet._cpp as cpp
from poincare_resnet import ball
from poincare_resnet._cpp import batchnorm_ops, fc_ops, residual_ops  # noqa: F401 (the ops)
from poincare_resnet.nn import _dispatch
from poincare_resnet.nn._native_batchnorm import native_batchnorm

B, K, P = 2, 8, 5
LIMITS = (0.3, 8.0, 40.0, 16.0, 0.1, 1e-15)  # sc, in_limit, arg_limit, out_limit, small, min_norm
BN = (0.1, 1e-5, 1e-5, 8.0, 1e-15)  # c, bn_eps, proj_eps, t_max, min_norm


def _need(name: str) -> None:
    if cpp.load_kernel(name) is None:
        pytest.skip(f"native kernel {name!r} cannot be built here")


def _bad(kind: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` made wrong in one way: one element short or long, another dtype, on the meta
    device, or non-contiguous (same values and shape)."""
    if kind == "short":
        return t.reshape(-1)[:-1].clone() if t.dim() <= 1 else t[..., :-1].clone()
    if kind == "long":
        return torch.cat([t.reshape(-1), t.reshape(-1)[:1]])
    if kind == "dtype":
        return t.to(torch.float64 if t.dtype == torch.float32 else torch.float32)
    if kind == "meta":
        return t.to("meta")
    if kind == "strided":
        assert t.dim() >= 1
        wide = torch.stack([t, t], dim=-1)
        return wide[..., 0]  # every other element: not contiguous
    raise AssertionError(kind)


# ------------------------------------------------------------------ ball.fc_tangent
def _fc_args(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    dots = torch.randn(B, K, 3, 3, generator=g, dtype=dtype) * 0.3
    sq = dots.pow(2).sum(1, keepdim=True) + 0.1
    znorm = torch.rand(K, generator=g, dtype=dtype) + 0.5
    bias = torch.randn(K, generator=g, dtype=dtype) * 0.1
    return dict(dots=dots, sq=sq, znorm=znorm, bias=bias)


@pytest.mark.parametrize("kind", ["short", "long", "meta"])
@pytest.mark.parametrize("arg", ["znorm", "bias", "sq"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "pytorch"])
def test_fc_tangent_rejects_bad_per_channel_argument(native, arg, kind):
    if native:
        _need("fc")
    args = _fc_args()
    args[arg] = _bad(kind, args[arg])
    with native_switch(native), pytest.raises(ValueError, match=arg):
        ball.fc_tangent(*args.values(), c=0.1, dim=1)


@pytest.mark.parametrize("native", [True, False], ids=["native", "pytorch"])
def test_fc_tangent_rejects_bad_curvature(native):
    args = _fc_args()
    with native_switch(native), pytest.raises(ValueError, match="curvature"):
        ball.fc_tangent(*args.values(), c=torch.tensor([0.1, 0.2]), dim=1)
    with native_switch(native), pytest.raises(ValueError, match="curvature"):
        ball.fc_tangent(*args.values(), c=-1.0, dim=1)


def test_fc_tangent_layer_entry_point_rejects_wrong_bias():
    """The layers' entry point (``nn._dispatch.fc_tangent``) reaches the same check."""
    args = _fc_args()
    args["bias"] = args["bias"][:7]
    with pytest.raises(ValueError, match="bias has shape \\(7,\\), expected \\[8\\]"):
        _dispatch.fc_tangent(*args.values(), 0.1, 1)


def test_fc_tangent_converts_other_float_dtypes():
    """A float64 bias with float32 maps is converted (as the PyTorch path's type promotion
    would widen it); the result equals that of a float32 bias."""
    args = _fc_args()
    want = ball.fc_tangent(*args.values(), c=0.1, dim=1)
    args["bias"] = args["bias"].double()
    got = ball.fc_tangent(*args.values(), c=0.1, dim=1)
    assert got.dtype == torch.float32 and torch.equal(got, want)


# ------------------------------------------------------------------ torch.ops: the FC kernel
def _fc_op_args(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return dict(
        dots=torch.randn(B, K, P, generator=g, dtype=dtype) * 0.3,
        sq=torch.rand(B, P, generator=g, dtype=dtype),
        ch=torch.ones(K, dtype=dtype) * 1.1,
        sh=torch.ones(K, dtype=dtype) * 0.2,
        zn2=torch.ones(K, dtype=dtype),
    )


FC_MESSAGES = {  # kind -> the message's pattern after the argument's name
    "short": "has 7 elements, expected 8 \\(one per output channel\\)",
    "long": "has 9 elements, expected 8 \\(one per output channel\\)",
    "dtype": "has dtype Double, expected Float",
    "meta": "is on meta",
    "strided": "is not contiguous",
}


@pytest.mark.parametrize("kind", list(FC_MESSAGES))
@pytest.mark.parametrize("arg", ["ch", "sh", "zn2"])
@pytest.mark.parametrize("op", ["fc_forward", "fc_backward"])
def test_fc_ops_reject_bad_per_channel_tensor(op, arg, kind):
    _need("fc")
    args = _fc_op_args()
    args[arg] = _bad(kind, args[arg])
    grad = torch.randn(B, K, P)
    call = getattr(torch.ops.poincare_resnet, op)
    error = ValueError if kind == "meta" else RuntimeError
    with pytest.raises(error, match=f"{op}: {arg} {FC_MESSAGES[kind]}"):
        if op == "fc_forward":
            call(*args.values(), *LIMITS)
        else:
            call(grad, *args.values(), *LIMITS, True)


@pytest.mark.parametrize("kind", ["short", "dtype", "meta", "strided"])
@pytest.mark.parametrize("arg", ["dots", "sq", "grad"])
@pytest.mark.parametrize("op", ["fc_forward", "fc_backward"])
def test_fc_ops_reject_bad_map(op, arg, kind):
    _need("fc")
    if op == "fc_forward" and arg == "grad":
        pytest.skip("no grad in the forward")
    args = _fc_op_args()
    args["grad"] = torch.randn(B, K, P)
    args[arg] = _bad(kind, args[arg])
    if arg == "grad" and kind == "strided":
        pytest.skip("grad is made contiguous by the op")
    if kind == "dtype" and arg == "dots":  # the others then mismatch instead: name the first
        pattern = "sq has dtype Float, expected Double"
    elif kind == "meta" and arg == "dots":
        pattern = "(sq|grad) is on cpu, expected meta"
    elif kind == "short" and arg == "dots":  # P - 1 pixels: sq [B, P] no longer matches
        pattern = "sq has shape \\[2, 5\\], expected \\[2, 4\\]"
    else:
        pattern = f"{arg} "
    call = getattr(torch.ops.poincare_resnet, op)
    grad = args.pop("grad")
    error = ValueError if kind == "meta" else RuntimeError
    with pytest.raises(error, match=f"{op}: {pattern}"):
        if op == "fc_forward":
            call(*args.values(), *LIMITS)
        else:
            call(grad, *args.values(), *LIMITS, True)


# ------------------------------------------------------------------ torch.ops: batch norm
def _bn_map(dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    return torch.randn(B, K, P, generator=g, dtype=dtype) * 0.3


@pytest.mark.parametrize("kind", ["short", "long", "meta"])
def test_bn_train_forward_rejects_bad_bias(kind):
    _need("batchnorm")
    v = _bn_map()
    bias = _bad(kind, torch.zeros(K))
    error = ValueError if kind == "meta" else RuntimeError
    with pytest.raises(error, match="bn_train_forward: beta_t"):
        torch.ops.poincare_resnet.bn_train_forward(v, bias, torch.ones(1), *BN)


@pytest.mark.parametrize("weight", [torch.ones(3), torch.ones(0)], ids=["3", "0"])
def test_bn_ops_reject_wrong_sized_scalars(weight):
    _need("batchnorm")
    v = _bn_map()
    with pytest.raises(ValueError, match="weight must have one element"):
        torch.ops.poincare_resnet.bn_train_forward(v, torch.zeros(K), weight, *BN)
    mu, beta = torch.zeros(K), torch.zeros(K)
    with pytest.raises(ValueError, match="r must have one element"):
        torch.ops.poincare_resnet.bn_out(v, mu, beta, weight, 0.1, 8.0, 1e-5, 1e-15)


def _bn_train_saved():
    v = _bn_map()
    bias, weight = torch.zeros(K), torch.ones(1)
    out, _, _, sums, dist = torch.ops.poincare_resnet.bn_train_forward(v, bias, weight, *BN)
    return dict(v=v, grad=torch.randn_like(out), sums=sums, dist=dist, beta_t=bias, weight=weight)


@pytest.mark.parametrize("kind", ["short", "long", "dtype", "meta"])
@pytest.mark.parametrize("arg", ["grad", "sums", "dist", "beta_t"])
def test_bn_train_backward_rejects_bad_tensor(arg, kind):
    _need("batchnorm")
    args = _bn_train_saved()
    if kind == "long" and arg == "grad":
        pytest.skip("a map is one element too short instead")
    if kind == "dtype" and arg == "beta_t":
        pytest.skip("the bias is read in any floating dtype (converted to double)")
    args[arg] = (
        _bad(kind, args[arg])
        if not (kind == "short" and arg == "dist")
        else args[arg].reshape(1)[:0]
    )
    error = ValueError if kind == "meta" else RuntimeError
    with pytest.raises(error, match=f"bn_train_backward: {arg}"):
        torch.ops.poincare_resnet.bn_train_backward(*args.values(), *BN, True)


@pytest.mark.parametrize("kind", ["short", "long", "dtype", "meta", "strided"])
@pytest.mark.parametrize("arg", ["mu", "beta", "grad"])
@pytest.mark.parametrize("op", ["bn_out", "bn_backward"])
def test_bn_eval_ops_reject_bad_tensor(op, arg, kind):
    _need("batchnorm")
    if op == "bn_out" and arg == "grad":
        pytest.skip("no grad in the forward")
    if arg == "grad" and kind in ("long", "strided"):
        pytest.skip("grad is made contiguous by the op; a long map is a wrong shape (short)")
    v = _bn_map()
    args = dict(mu=torch.zeros(K) + 0.01, beta=torch.zeros(K) + 0.02, grad=torch.randn_like(v))
    args[arg] = _bad(kind, args[arg])
    error = ValueError if kind == "meta" else RuntimeError
    r, scalars = torch.ones(1), (0.1, 8.0, 1e-5, 1e-15)
    with pytest.raises(error, match=f"{op}: {arg}"):
        if op == "bn_out":
            torch.ops.poincare_resnet.bn_out(v, args["mu"], args["beta"], r, *scalars)
        else:
            torch.ops.poincare_resnet.bn_backward(v, *args.values(), r, *scalars)


@pytest.mark.parametrize("kind", ["short", "dtype", "strided"])
def test_bn_ops_reject_bad_map(kind):
    _need("batchnorm")
    v = _bad(kind, _bn_map())
    if kind == "dtype":  # a float64 map with float32 mu: mu is named
        pattern = "mu has dtype Float, expected Double"
    elif kind == "short":  # the map has P - 1 pixels: fine by itself, wrong against grad
        pattern = "grad has shape"
    else:
        pattern = "v is not contiguous"
    mu, beta, grad = torch.zeros(K), torch.zeros(K), torch.randn(B, K, P)
    with pytest.raises(RuntimeError, match=f"bn_backward: {pattern}"):
        torch.ops.poincare_resnet.bn_backward(v, mu, beta, grad, torch.ones(1), 0.1, 8, 1e-5, 1e-15)


# ------------------------------------------------------------------ torch.ops: residual
@pytest.mark.parametrize("kind", ["short", "dtype", "meta", "strided"])
@pytest.mark.parametrize("arg", ["f", "res", "grad"])
@pytest.mark.parametrize("op", ["residual_forward", "residual_backward"])
def test_residual_ops_reject_bad_map(op, arg, kind):
    _need("residual")
    if op == "residual_forward" and arg == "grad":
        pytest.skip("no grad in the forward")
    g = torch.Generator().manual_seed(3)
    args = {n: torch.randn(B, K, P, generator=g) * 0.3 for n in ("grad", "f", "res")}
    args[arg] = _bad(kind, args[arg])
    if arg == "f" and kind == "dtype":
        pattern = "res has dtype Float, expected Double"
    elif arg == "f" and kind == "meta":
        pattern = "res is on cpu, expected meta"
    elif arg == "f" and kind == "short":
        pattern = "(res|grad) has shape"
    else:
        pattern = arg
    error = ValueError if kind == "meta" else RuntimeError
    alpha, scalars = torch.tensor(1.0, dtype=torch.float64), (0.1, 1e-5, 8.0, True)
    with pytest.raises(error, match=f"{op}: {pattern}"):
        if op == "residual_forward":
            torch.ops.poincare_resnet.residual_forward(args["f"], args["res"], alpha, *scalars)
        else:
            torch.ops.poincare_resnet.residual_backward(*args.values(), alpha, *scalars)


def test_residual_ops_reject_wrong_sized_alpha():
    _need("residual")
    f = torch.randn(B, K, P)
    with pytest.raises(ValueError, match="alpha must have one element"):
        torch.ops.poincare_resnet.residual_forward(f, f, torch.ones(2), 0.1, 1e-5, 8.0, True)


# ------------------------------------------------------------------ the batch norm entry point
@pytest.mark.parametrize(
    "arg, pattern",
    [
        ("bias", "bias has 7 elements"),
        ("weight", "weight has 2 elements"),
        ("mu", "running mean has 7 elements"),
        ("var", "running variance has 2 elements"),
    ],
)
def test_native_batchnorm_entry_point_rejects_wrong_sizes(arg, pattern):
    """``nn._native_batchnorm.native_batchnorm`` (what ``nn._dispatch.batchnorm`` runs on CPU)."""
    _need("batchnorm")
    v = torch.randn(B, K, 3, 3) * 0.3
    args = dict(mu=None, bias=torch.zeros(K), weight=torch.ones(1), var=None)
    if arg in ("mu", "var"):  # running statistics (eval)
        args["mu"], args["var"] = torch.zeros(K), torch.ones(1)
    bad = {"bias": torch.zeros(7), "weight": torch.ones(2), "mu": torch.zeros(7)}
    bad["var"] = torch.ones(2)
    args[arg] = bad[arg]
    with pytest.raises(ValueError, match=pattern):
        native_batchnorm(
            v, args["mu"], args["bias"], args["weight"], args["var"], 0.1, 1e-5, 1e-5, 8.0
        )
    with native_switch(True), pytest.raises(ValueError, match=pattern):
        _dispatch.batchnorm(
            v, args["mu"], args["bias"], args["weight"], args["var"], 0.1, 1e-5, 1e-5, 8.0, None
        )
