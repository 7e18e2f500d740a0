"""The dispatch layer: one module per map under ``nn/``, a pure ``ball/``, and compiled graphs
that follow the process-wide switches (never a stale graph)."""

from __future__ import annotations

import ast
import contextlib
import math
from pathlib import Path

import pytest
import torch

from poincare_resnet import _cpp, ball
from poincare_resnet.ball import get_eps, max_tangent_radius
from poincare_resnet.nn import PoincareLinear, PoincareResidual, _dispatch
from poincare_resnet.nn._closed_forms import batchnorm_forward
from poincare_resnet.nn._native_batchnorm import native_batchnorm
from poincare_resnet.nn.batchnorm_map import batchnorm
from poincare_resnet.nn.fc_map import fc_tangent, fc_tangent_legacy
from poincare_resnet.nn.residual_map import residual

BALL = Path(ball.__file__).parent
F64 = torch.float64


def _imports(path: Path) -> set[str]:
    """Every module an ``import`` or ``from … import`` in ``path`` names (relative ones with
    their leading dots)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_ball_imports_no_kernels():
    """``ball/`` is pure maths: no module there imports the native kernels or the layers."""
    files = sorted(BALL.glob("*.py"))
    assert len(files) >= 4
    for path in files:
        bad = {m for m in _imports(path) if "_cpp" in m or m.startswith("..") or ".nn" in m}
        assert not bad, f"{path.name} imports {bad}"


def test_deprecated_dispatch_names_are_the_map_functions():
    assert _dispatch.fc_tangent is fc_tangent
    assert _dispatch.batchnorm is batchnorm
    assert _dispatch.residual is residual
    with pytest.raises(AttributeError, match="no_such_map"):
        _dispatch.no_such_map  # noqa: B018


# --------------------------------------------------------------------- the FC map's variants
def _fc_args(shape=(3, 4, 5), dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    dots = torch.randn(*shape, generator=g, dtype=dtype)
    sq = dots.pow(2).sum(1, keepdim=True) + torch.rand(shape[0], 1, shape[2], generator=g).to(dtype)
    znorm = torch.rand(shape[1], generator=g, dtype=dtype) + 0.3
    bias = torch.randn(shape[1], generator=g, dtype=dtype) * 0.3
    return dots, sq, znorm, bias


def test_fc_tangent_legacy_is_the_official_codes_formula():
    """``λ_x = 2(1 − c‖x‖²)`` written out from the official code (x = expmap0(p), ‖x‖ =
    tanh(√c‖p‖)/√c), against :func:`fc_tangent_legacy`; and it is not the correct map."""
    c = 0.7
    dots, sq, znorm, bias = _fc_args()
    sc = math.sqrt(c)
    n = sq.sqrt()
    xnorm = torch.tanh(sc * n) / sc
    lam = 2 * (1 - c * xnorm**2)
    x_dot_z = xnorm / n * dots  # ⟨x, ẑ⟩ = ‖x‖/‖p‖ ⟨p, ẑ⟩
    r = bias.view(1, -1, 1)
    q = sc * lam * x_dot_z * torch.cosh(2 * sc * r) - (lam - 1) * torch.sinh(2 * sc * r)
    w = torch.sinh(2 * znorm.view(1, -1, 1) * torch.asinh(q)) / sc  # w = sinh(√c v)/√c
    wn = w.norm(dim=1, keepdim=True)
    want = torch.asinh(sc * wn) / (2 * sc * wn) * w  # logmap0(w/(1 + √(1 + c‖w‖²)))
    got = fc_tangent_legacy(dots, sq, znorm, bias, c, 1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (got - ball.fc_tangent(dots, sq, znorm, bias, c=c, dim=1)).abs().max() > 1e-2


def test_poincare_linear_center_weight():
    """``PoincareLinear(center_weight=True)`` centres every normal over its inputs (as the
    conv's option does): it equals the plain layer with centred weights, its unit normals sum
    to zero, and its repr says so."""
    torch.manual_seed(0)
    layer = PoincareLinear(6, 4, c=0.5, init="hnn", center_weight=True).double()
    plain = PoincareLinear(6, 4, c=0.5, init="hnn").double()
    with torch.no_grad():
        layer.weight.normal_(0.3, 1.0)
        layer.bias.normal_(0.0, 0.2)
        plain.weight.copy_(layer.weight - layer.weight.mean(1, keepdim=True))
        plain.bias.copy_(layer.bias)
    u = torch.randn(5, 6, dtype=F64) * 0.3
    torch.testing.assert_close(layer(u), plain(u), rtol=1e-12, atol=1e-12)
    sums = layer._unit_weight()[0].sum(1)
    torch.testing.assert_close(sums, torch.zeros_like(sums), rtol=0, atol=1e-12)
    assert "center_weight=True" in repr(layer) and "center_weight" not in repr(plain)


# --------------------------------------------------------------------- the batch-norm front end
def _bn_args(dtype=F64):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, 3, 4, 4, generator=g, dtype=dtype) * 0.5
    mu = ball.expmap0(torch.randn(3, generator=g, dtype=dtype) * 0.2, c=0.5)
    bias = torch.randn(3, generator=g, dtype=dtype) * 0.2
    consts = (0.5, 1e-5, get_eps(dtype), max_tangent_radius(dtype))
    return (
        v,
        mu,
        bias,
        torch.full((1,), 1.3, dtype=dtype),
        torch.full((1,), 0.8, dtype=dtype),
        consts,
    )


def test_native_batchnorm_refuses_one_running_statistic():
    """One running statistic without the other is not a layer's call: the native wrapper says
    so (before any kernel runs) and the dispatch gives it to the closed form."""
    v, mu, bias, weight, var, (c, bn_eps, proj_eps, t_max) = _bn_args()
    with pytest.raises(ValueError, match="both running statistics"):
        native_batchnorm(v, mu, bias, weight, None, c, bn_eps, proj_eps, t_max)
    for m, s in ((mu, None), (None, var)):
        got = batchnorm(v, m, bias, weight, s, c, bn_eps, proj_eps, t_max, None)
        want = batchnorm_forward(v, m, bias, weight, s, c, bn_eps, proj_eps, t_max)
        torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------- compiled graphs and switches
@contextlib.contextmanager
def _restored():
    native, manual = _cpp.native_enabled(), ball.manual_backward_enabled()
    try:
        yield
    finally:
        _cpp.set_native(native)
        ball.set_manual_backward(manual)
        ball.set_eps(torch.float32, None)


class _Graphs:
    """A ``torch.compile`` backend that keeps the code of every graph it is given."""

    def __init__(self) -> None:
        self.code: list[str] = []

    def __call__(self, gm, example_inputs):
        self.code.append(gm.code)
        return gm.forward


def test_compiled_graph_follows_eps():
    """``set_eps`` after compiling: the graph recompiles and the new radius holds."""
    graphs = _Graphs()
    f = torch.compile(lambda v: ball.expmap0(v, c=1.0), backend=graphs, fullgraph=True)
    x = torch.full((2, 3), 30.0)
    with _restored():
        before = f(x).norm(dim=-1)
        ball.set_eps(torch.float32, 0.1)
        after = f(x).norm(dim=-1)
    torch.testing.assert_close(before, torch.full((2,), 1 - 4e-3))
    torch.testing.assert_close(after, torch.full((2,), 0.9))
    assert len(graphs.code) == 2


@pytest.mark.skipif(_cpp.load_kernel("residual") is None, reason="no native residual kernel")
def test_compiled_graph_follows_native_and_manual_backward_switches():
    """``set_native`` and ``set_manual_backward`` after compiling: each change recompiles, and
    the new graph holds the native op only while the native kernels are on."""
    graphs = _Graphs()
    layer = PoincareResidual(c=0.1)
    f = torch.compile(lambda a, b: layer(a, b), backend=graphs, fullgraph=True)
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    want = layer._forward_reference(a, b)
    with _restored():
        outs = [f(a, b)]
        _cpp.set_native(False)
        outs.append(f(a, b))
        ball.set_manual_backward(False)
        outs.append(f(a, b))
    native_op = "poincare_resnet.residual_forward"
    assert [native_op in code for code in graphs.code] == [True, False, False]
    assert graphs.code[1] != graphs.code[2]  # the PyTorch Function, then the op-by-op chain
    for out in outs:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_compiled_graph_ignores_the_triton_switch():
    """A traced graph never takes the Triton kernels, so flipping :func:`set_triton` does not
    recompile it."""
    graphs = _Graphs()
    f = torch.compile(lambda a, b: PoincareResidual(c=0.1)(a, b), backend=graphs)
    a = torch.randn(2, 3, 4, 4)
    enabled = _dispatch._TRITON["enabled"]
    try:
        f(a, a)
        _dispatch.set_triton(not enabled)
        f(a, a)
    finally:
        _dispatch.set_triton(enabled)
    assert len(graphs.code) == 1
