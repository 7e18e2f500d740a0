"""conv_norm on the PyTorch path: the FC output's recomputation in batch norm's backward hands
its terms to the FC node's backward, which then skips its own recomputation."""

import gc
import importlib.util
import weakref
from pathlib import Path

import pytest
import torch
from _helpers import native_switch

from poincare_resnet.ball import _autograd
from poincare_resnet.ball._autograd import fc_output_sharing_terms, record_fc_nodes
from poincare_resnet.models.resnet import PoincareResNet
from poincare_resnet.nn import PoincareBatchNorm2d, PoincareConv2d, conv_norm, set_fc_recompute
from poincare_resnet.nn.recompute import fc_share_enabled, set_fc_share


@pytest.fixture(autouse=True)
def torch_path():
    """The PyTorch path, recomputation on; the switches restored afterwards."""
    share = fc_share_enabled()
    set_fc_recompute(True)
    with native_switch(False):
        yield
    set_fc_share(share)


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of the FC forward (``_fc_forward``) and of its backward's terms
    (``_fc_terms``), and keeps weak references to every full-size term computed."""
    counts = {"forward": 0, "terms": 0, "refs": []}
    forward, terms = _autograd._fc_forward, _autograd._fc_terms

    def counted_forward(*args):
        counts["forward"] += 1
        return forward(*args)

    def counted_terms(*args, **kwargs):
        counts["terms"] += 1
        out = terms(*args, **kwargs)
        full = [t for t in (out.h, out.root, out.g_raw, out.psi, out.psi2) if t is not None]
        counts["refs"] += [weakref.ref(t) for t in full]
        if kwargs.get("lean"):  # what a share keeps
            counts["kept"] = sum(t.nbytes for t in out if isinstance(t, torch.Tensor))
        return out

    monkeypatch.setattr(_autograd, "_fc_forward", counted_forward)
    monkeypatch.setattr(_autograd, "_fc_terms", counted_terms)
    return counts


def _alive(counts) -> int:
    return sum(r() is not None for r in counts["refs"])


def _pair(dtype=torch.float64, seed=0, train=True):
    torch.manual_seed(seed)
    conv = PoincareConv2d(3, 5, 3, padding=1, c=0.7, init="hnn").to(dtype)
    bn = PoincareBatchNorm2d(5, c=0.7).to(dtype).train(train)
    with torch.no_grad():
        bn.bias.normal_(0, 0.1)
    u = (0.5 * torch.randn(2, 3, 5, 6, dtype=dtype)).requires_grad_(True)
    return conv, bn, u


def _run(share, dtype, train, create_graph=False):
    """Output and gradients of a conv → BN pair, a retained second backward included."""
    set_fc_share(share)
    conv, bn, u = _pair(dtype, train=train)
    out = conv_norm(conv, bn, u)
    w = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    params = (u, conv.weight, conv.bias, bn.bias, bn.weight)
    first = torch.autograd.grad((out * w).sum(), params, retain_graph=True)
    if create_graph:
        (gu,) = torch.autograd.grad((out * w).sum(), u, create_graph=True)
        return [out, *first, *torch.autograd.grad(gu.square().sum(), (u, conv.weight))]
    (out * w).sum().backward()  # the second backward over the same graph shares again
    return [out, *first, u.grad, conv.weight.grad, bn.bias.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_values_and_gradients_are_bit_identical(dtype, train, calls):
    shared = _run(True, dtype, train)
    assert calls["forward"] == 1 and calls["terms"] == 2  # forward; one recomputation each
    unshared = _run(False, dtype, train)
    assert calls["forward"] == 4 and calls["terms"] == 4  # + two recomputations, two backwards
    for a, b in zip(shared, unshared, strict=True):
        assert torch.equal(a, b)


def test_create_graph_recomputes_differentiably(calls):
    shared, unshared = _run(True, torch.float64, True, True), _run(False, torch.float64, True, True)
    for a, b in zip(shared, unshared, strict=True):
        assert torch.equal(a, b)


def test_a_model_trains_bit_identically_and_shares_every_pair(calls):
    grads = []
    for share in (False, True):
        set_fc_share(share)
        torch.manual_seed(0)
        model = PoincareResNet(depth=8, num_classes=3, widths=(4, 6, 8))
        x = torch.randn(2, 3, 8, 8)
        loss = model(x).logsumexp(1).sum()
        before = dict(calls)
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
        calls[share] = (calls["forward"] - before["forward"], calls["terms"] - before["terms"])
    named = model.named_modules()
    pairs = sum(isinstance(m, PoincareConv2d) and "shortcut" not in n for n, m in named)
    # unshared: each conv → BN pair recomputes the FC output in batch norm's backward, then the
    # terms in the FC node's; shared: only the terms, once per FC node (the 1×1 shortcuts and
    # the head have no batch norm after them: their nodes compute their own)
    assert pairs > 0 and calls[False][0] == pairs and calls[True][0] == 0
    assert calls[False][1] == calls[True][1] > pairs
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_the_terms_are_dropped_when_consumed(calls):
    conv, bn, u = _pair()
    out = conv_norm(conv, bn, u)
    alive = []
    u.register_hook(lambda g: alive.append(_alive(calls)))  # after the FC node's backward
    out.square().sum().backward()
    assert calls["terms"] == 1 and alive == [0]


def test_the_terms_are_dropped_when_the_fc_backward_does_not_run(calls):
    conv, bn, u = _pair()
    out = conv_norm(conv, bn, u)
    # only batch norm's parameters: its backward recomputes (and shares), the FC node never runs
    torch.autograd.grad(out.square().sum(), [bn.bias], retain_graph=True)
    assert calls["terms"] == 1 and calls["refs"] and _alive(calls) == 0
    out.square().sum().backward()  # the retained graph: shared again, and used by the FC node
    assert calls["terms"] == 2 and _alive(calls) == 0


def test_the_terms_are_dropped_when_the_backward_fails(calls):
    conv, bn, u = _pair()

    def fail(g):
        raise RuntimeError("boom")

    # a gradient hook on the FC output: runs after batch norm's backward, before the FC node's
    conv.register_forward_hook(lambda m, i, o: o.register_hook(fail) and None)
    out = conv_norm(conv, bn, u)
    with pytest.raises(RuntimeError, match="boom"):
        out.square().sum().backward()
    assert calls["terms"] == 1 and calls["refs"] and _alive(calls) == 0  # no gc needed


def _profiled_peak():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_memory.py"
    spec = importlib.util.spec_from_file_location("_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.profiled_peak_mib


def test_a_backward_peak_grows_by_at_most_one_layers_terms(calls):
    peak_mib = _profiled_peak()
    torch.manual_seed(0)
    convs = [PoincareConv2d(6, 6, 3, padding=1, c=0.7, init="hnn") for _ in range(3)]
    pairs = [(conv, PoincareBatchNorm2d(6, c=0.7)) for conv in convs]
    params = [p for pair in pairs for layer in pair for p in layer.parameters()]
    u = 0.3 * torch.randn(8, 6, 12, 12)
    peaks = []
    for share in (False, True, False):
        set_fc_share(share)
        for p in params:
            p.grad = None  # each backward allocates the same gradients
        x = u
        for conv, bn in pairs:
            x = conv_norm(conv, bn, x)
        loss = x.square().sum()
        peaks.append(peak_mib(loss.backward) * 2**20)
    assert calls["forward"] == 3 * 3 + 3 * 2  # three forwards, the unshared backwards' recomputing
    one_map, one_pixel_map = u.nbytes, u.nbytes // u.shape[1]
    # a share keeps three full-size maps and the per-position terms; the peak grows by no more
    # (against the mean of the unshared runs around it: the peak drifts by a few kB a run; and
    # a per-position map of slack for the allocator's rounding)
    assert 3 * one_map < calls["kept"] < 5 * one_map
    assert peaks[1] - (peaks[0] + peaks[2]) / 2 <= calls["kept"] + one_pixel_map


def _two_fc_nodes():
    """Two FC nodes (two convolutions of one input) with their recorded ``(ctx, inputs)``."""
    conv_a, _, u = _pair()
    conv_b = PoincareConv2d(3, 5, 3, padding=1, c=0.7, init="hnn").double()
    with record_fc_nodes() as nodes:
        ya, yb = conv_a(u), conv_b(u)
    assert [ctx for ctx, _ in nodes] == [ya.grad_fn, yb.grad_fn]
    return u, ya, yb, nodes


def _grad_u(hook=None):
    u, ya, yb, nodes = _two_fc_nodes()
    if hook is not None:  # runs in backward, before yb's FC node
        yb.register_hook(lambda g: hook(nodes))
    (ya.sin().sum() + yb.cos().sum()).backward()
    return u.grad


def test_no_node_uses_another_nodes_terms(calls):
    reference = _grad_u()
    assert calls["terms"] == 2

    def wrong(nodes):  # a's recomputation, left on b's node
        (ctx_a, inputs_a), (ctx_b, _) = nodes
        assert fc_output_sharing_terms(ctx_b, inputs_a) is not None

    assert torch.equal(_grad_u(wrong), reference)
    assert calls["terms"] == 2 + 3  # the wrong terms were not used: both nodes recomputed


def test_at_most_one_layer_holds_terms(calls):
    reference = _grad_u()

    def both(nodes):  # a's share first, then b's: a's is dropped, b's used
        (ctx_a, inputs_a), (ctx_b, inputs_b) = nodes
        fc_output_sharing_terms(ctx_a, inputs_a)
        assert _alive(calls) == 3  # h, √(1 + q²), ψ
        fc_output_sharing_terms(ctx_b, inputs_b)
        assert _alive(calls) == 3  # a's are gone

    assert torch.equal(_grad_u(both), reference)
    assert calls["terms"] == 2 + 3  # a recomputed its own, b used its share
    gc.collect()
    assert _alive(calls) == 0


def test_nothing_is_shared_outside_a_backward():
    u, ya, yb, nodes = _two_fc_nodes()
    ctx, inputs = nodes[0]
    with torch.no_grad():
        assert fc_output_sharing_terms(ctx, inputs) is None
    assert ctx.fc_share is None


class _Pair(torch.nn.Module):
    def __init__(self, conv, bn):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, u):
        return conv_norm(self.conv, self.bn, u)


def test_gradcheck_of_a_shared_conv_norm_pair(monkeypatch):
    taken = []
    take = _autograd.FCShare.take
    monkeypatch.setattr(_autograd.FCShare, "take", lambda s: taken.append(take(s)) or taken[-1])
    torch.manual_seed(0)
    pair = _Pair(PoincareConv2d(2, 3, 3, padding=1, c=0.7, init="hnn"), PoincareBatchNorm2d(3))
    pair = pair.double()
    names = ("conv.weight", "conv.bias", "bn.bias")
    params = tuple(dict(pair.named_parameters())[n].detach().clone() for n in names)

    def f(u, *values):
        return torch.func.functional_call(pair, dict(zip(names, values, strict=True)), (u,))

    inputs = (0.5 * torch.randn(2, 2, 3, 3, dtype=torch.float64), *params)
    assert torch.autograd.gradcheck(f, tuple(t.requires_grad_(True) for t in inputs))
    assert any(t is not None for t in taken)  # the FC node's backward used the shared terms
