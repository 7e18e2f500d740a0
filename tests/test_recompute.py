"""conv_norm: batch norm's backward recomputes the Poincaré conv's FC output, not keeping it."""

import gc
import weakref

import pytest
import torch
from _helpers import native_switch

from poincare_resnet.models.resnet import PoincareResNet
from poincare_resnet.nn import (
    PoincareBatchNorm2d,
    PoincareConv2d,
    conv_norm,
    fc_recompute_enabled,
    set_fc_recompute,
)


@pytest.fixture
def recompute():
    """Yields the switch; restores it afterwards."""
    before = fc_recompute_enabled()
    yield set_fc_recompute
    set_fc_recompute(before)


def _pair(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    conv = PoincareConv2d(4, 6, 3, padding=1, c=0.7, init="hnn").to(dtype)
    bn = PoincareBatchNorm2d(6, c=0.7).to(dtype)
    with torch.no_grad():
        bn.bias.normal_(0, 0.1)
    u = (0.5 * torch.randn(3, 4, 5, 7, dtype=dtype)).requires_grad_(True)
    return conv, bn, u


def _fc_output_storage(conv):
    """A forward hook that keeps a weak reference to the conv output's storage."""
    refs = []
    conv.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o.untyped_storage())))
    return refs


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_the_fc_output_is_not_kept_for_backward(recompute, native, train):
    with native_switch(native):
        for enabled in (True, False):
            recompute(enabled)
            conv, bn, u = _pair()
            bn.train(train)
            refs = _fc_output_storage(conv)
            out = conv_norm(conv, bn, u)
            gc.collect()
            # on: nothing holds the FC output (the graph keeps a slot); off: batch norm keeps it
            assert (refs[0]() is None) == enabled
            out.square().sum().backward()
            assert u.grad is not None and torch.isfinite(u.grad).all()


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_equal_keeping_the_output(recompute, native, dtype):
    results = []
    with native_switch(native):
        for enabled in (False, True):
            recompute(enabled)
            conv, bn, u = _pair(dtype)
            out = conv_norm(conv, bn, u)
            w = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
            (out * w).sum().backward(retain_graph=True)
            first = [t.grad.clone() for t in (u, conv.weight, conv.bias, bn.bias, bn.weight)]
            (out * w).sum().backward()  # a second backward over the same graph recomputes again
            results.append((out.detach(), first, [u.grad, conv.weight.grad]))
    (o0, g0, h0), (o1, g1, h1) = results
    assert torch.equal(o0, o1)
    for a, b in zip(g0 + h0, g1 + h1, strict=True):
        assert torch.equal(a, b)


def test_a_model_trains_the_same_and_keeps_its_hooks(recompute):
    grads, calls = [], []
    for enabled in (False, True):
        recompute(enabled)
        torch.manual_seed(0)
        model = PoincareResNet(depth=8, num_classes=3, widths=(4, 6, 8)).double()
        model.layer1[0].conv1.register_forward_hook(lambda *a, on=enabled: calls.append(on))
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
        model(x).logsumexp(1).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    assert calls == [False, True]
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_a_hook_that_replaces_the_output_keeps_it(recompute):
    recompute(True)
    conv, bn, u = _pair()
    conv.register_forward_hook(lambda m, i, o: o * 1.0)
    refs = _fc_output_storage(conv)  # runs after the replacing hook: sees the replacement
    out = conv_norm(conv, bn, u)
    gc.collect()
    assert refs[0]() is not None  # not the recorded FC output: kept as usual
    out.sum().backward()
    assert torch.isfinite(u.grad).all()


def test_nothing_is_recorded_without_autograd(recompute):
    recompute(True)
    conv, bn, u = _pair()
    with torch.no_grad():
        assert torch.equal(conv_norm(conv, bn, u), bn(conv(u)))


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_gradient_for_the_input_only_frees_the_graph(recompute, native, train):
    """``autograd.grad(loss, u)`` with parameters that require gradients (the attacks) leaves
    the parameter-only nodes of batch norm's forward unrun; the graph must still be freed once
    its outputs are gone (the saved-tensor hooks closed a reference cycle through such a node's
    saved output: 23 GB after a Fashion-MNIST compare's attacks)."""
    from poincare_resnet.nn.recompute import _Recompute

    recompute(True)

    def live() -> int:
        gc.collect()
        return sum(isinstance(o, _Recompute) for o in gc.get_objects())

    with native_switch(native):
        conv, bn, u = _pair()
        bn.train(train)
        before = live()
        for _ in range(3):
            x = u.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(conv_norm(conv, bn, x).square().sum(), x)
            assert torch.isfinite(g).all()
            del g, x
        assert live() == before
