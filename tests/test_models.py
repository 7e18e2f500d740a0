"""Model zoo: every registered ResNet builds and trains a step; names, options and errors."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch import nn

from poincare_resnet.models import (
    NORM_FREE,
    EuclideanResNet,
    HybridResNet,
    PoincareResNet,
    create_model,
    list_models,
    registry,
)
from poincare_resnet.nn import PoincareBatchNorm2d, PoincareConv2d

# the CIFAR ResNets (depth 6n+2); the ResNet-18/34/50 families: tests/test_models_imagenet.py
# depth 110 is covered for one family only (the Poincaré ones take ~1 s each at depth 110)
ALL_MODELS = list_models()
CIFAR_MODELS = [n for n in ALL_MODELS if not re.search(r"resnet(18|34|50)\b", n)]
FAST_MODELS = [n for n in CIFAR_MODELS if "110" not in n or n.startswith(("euclidean", "hybrid"))]


def _forward_backward(model: nn.Module, in_chans: int, num_classes: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, in_chans, 8, 8, generator=gen) * 2 - 1
    model.train()
    out = model(x)
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad]
    assert grads
    for name, g in grads:
        assert g is not None, f"{name} received no gradient"
        assert torch.isfinite(g).all(), f"{name} has a non-finite gradient"
    return out


def test_registry_lists_every_family_and_depth():
    assert ALL_MODELS == sorted(ALL_MODELS)
    for family in ("poincare", "euclidean", "hybrid"):
        for depth in (20, 32, 44, 56, 110):
            assert f"{family}_resnet{depth}" in ALL_MODELS
            assert f"{family}_resnet{depth}_w16" in ALL_MODELS
    assert "poincare_resnet20_nf" in ALL_MODELS
    assert len(FAST_MODELS) > 30


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", FAST_MODELS)
def test_every_registered_model_forward_backward(name, in_chans):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_chans=in_chans)
    assert model.model_name == name
    assert model.model_kwargs["num_classes"] == 7
    assert model.model_kwargs["in_chans"] == in_chans
    _forward_backward(model, in_chans, 7)
    family = {"poincare": PoincareResNet, "euclidean": EuclideanResNet, "hybrid": HybridResNet}
    assert isinstance(model, family[name.split("_")[0]])
    if name.endswith("_w16"):
        assert model.widths == (16, 32, 64)
    else:
        assert model.widths == (8, 16, 32)
    depth = int(re.search(r"resnet(\d+)", name).group(1))
    assert model.depth == depth


def _signature(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("official", "registered", "widths"),
    [
        ("hyperbolic-8-16-32-resnet-20", "poincare_resnet20", None),
        ("euclidean-8-16-32-resnet-20", "euclidean_resnet20", None),
        ("euclideanwhypclass-8-16-32-resnet-20", "hybrid_resnet20", None),
        ("hyperbolic-16-32-64-resnet-20", "poincare_resnet20_w16", (16, 32, 64)),
        ("euclideanwhypclass-16-32-64-resnet-32", "hybrid_resnet32_w16", (16, 32, 64)),
    ],
)
def test_official_names_resolve_to_the_same_architecture(official, registered, widths):
    a = create_model(official, num_classes=10, in_chans=3)
    b = create_model(registered, num_classes=10, in_chans=3)
    assert type(a) is type(b)
    assert _signature(a) == _signature(b)
    assert a.model_name == registered.removesuffix("_w16")
    if widths is not None:
        assert a.model_kwargs["widths"] == list(widths)
    # the recorded name and kwargs rebuild the same architecture (what checkpoints rely on)
    kwargs = dict(a.model_kwargs)
    rebuilt = create_model(
        a.model_name, kwargs.pop("num_classes"), kwargs.pop("in_chans"), **kwargs
    )
    assert _signature(rebuilt) == _signature(a)


def test_unknown_model_name_lists_close_matches():
    with pytest.raises(ValueError, match="unknown model 'poincare_resnet21'") as info:
        create_model("poincare_resnet21")
    assert "did you mean" in str(info.value)
    assert "poincare_resnet20" in str(info.value)
    with pytest.raises(ValueError, match="unknown model 'zzz'"):
        create_model("zzz")


def test_list_models_pattern_filter():
    names = list_models("*20*")
    assert names
    assert all("20" in n for n in names)
    assert set(names) == {n for n in ALL_MODELS if "20" in n}
    assert {"poincare_resnet20", "euclidean_resnet20", "hybrid_resnet20"} <= set(names)
    assert list_models("nothing-matches-*") == []


@pytest.mark.parametrize("depth", [21, 4, 19])
def test_depth_not_6n_plus_2_is_rejected(depth):
    for name in ("poincare_resnet20", "euclidean_resnet20", "hybrid_resnet20"):
        with pytest.raises(ValueError, match=rf"6n\+2.*got {depth}"):
            create_model(name, depth=depth)


@pytest.mark.parametrize("name", ["poincare_resnet20", "euclidean_resnet20", "hybrid_resnet20"])
def test_wrong_input_channels_error_names_the_shape(name):
    model = create_model(name, num_classes=10, in_chans=3)
    with pytest.raises(ValueError, match=re.escape("got shape (2, 1, 8, 8)")):
        model(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=re.escape("got shape (1, 8, 8)")):
        model(torch.zeros(1, 8, 8))


@pytest.mark.parametrize(
    ("name", "override"),
    [
        ("poincare_resnet20", {"depth": 8}),
        ("euclidean_resnet20_w16", {"widths": (4, 8, 8)}),
        ("poincare_resnet20_nf", {"residual_scale": "learnable"}),
    ],
)
def test_overridden_defaults_are_recorded_in_model_kwargs(name, override):
    model = create_model(name, num_classes=10, in_chans=1, **override)
    kwargs = dict(model.model_kwargs)
    rebuilt = create_model(
        model.model_name, kwargs.pop("num_classes"), kwargs.pop("in_chans"), **kwargs
    )
    assert _signature(rebuilt) == _signature(model)


def test_invalid_official_depth_does_not_register_a_name(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_DEFAULTS", dict(registry._DEFAULTS))
    before = list_models()
    with pytest.raises(ValueError, match="got 21"):
        create_model("hyperbolic-8-16-32-resnet-21")
    assert list_models() == before


def test_official_name_with_unregistered_depth_rebuilds_in_a_fresh_registry(monkeypatch):
    pristine = (dict(registry._REGISTRY), dict(registry._DEFAULTS))
    monkeypatch.setattr(registry, "_REGISTRY", dict(pristine[0]))
    monkeypatch.setattr(registry, "_DEFAULTS", dict(pristine[1]))
    model = create_model("hyperbolic-8-16-32-resnet-14", num_classes=10, in_chans=1)
    assert model.depth == 14
    # a new process (e.g. `evaluate`) only has the built-in registrations
    monkeypatch.setattr(registry, "_REGISTRY", dict(pristine[0]))
    monkeypatch.setattr(registry, "_DEFAULTS", dict(pristine[1]))
    kwargs = dict(model.model_kwargs)
    rebuilt = create_model(
        model.model_name, kwargs.pop("num_classes"), kwargs.pop("in_chans"), **kwargs
    )
    assert _signature(rebuilt) == _signature(model)


# ------------------------------------------------------------------------------ options


def test_poincare_resnet_identity_init_records_kwargs():
    model = create_model(
        "poincare_resnet20", num_classes=5, in_chans=1, init="identity", bn_mean="midpoint"
    )
    assert model.model_kwargs == {
        "init": "identity",
        "bn_mean": "midpoint",
        "num_classes": 5,
        "in_chans": 1,
    }
    assert model.curvature.value == pytest.approx(0.1)
    _forward_backward(model, 1, 5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"init": "center"},
        {"init": "hnn"},
        {"bn_mean": "frechet"},
        {"residual_order": "res+f"},
        {"pool": "midpoint"},
        {"bn_eval_batch_stats": True},
        {"norm": "none", "residual_scale": "auto"},
        {"norm": "none", "residual_scale": "learnable"},
        {"norm": "none", "residual_scale": 0.5},
        {"init": "kaiming", "center_weight": True, "head_init": "identity"},
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_poincare_resnet_options_build_and_run(kwargs):
    torch.manual_seed(0)
    model = PoincareResNet(depth=8, widths=(4, 4, 8), num_classes=3, in_chans=1, **kwargs)
    _forward_backward(model, 1, 3)
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 1, 8, 8))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    if kwargs.get("norm") == "none":
        assert not any(isinstance(m, PoincareBatchNorm2d) for m in model.modules())
        block = model.layer1[0]
        if kwargs["residual_scale"] == "learnable":
            assert isinstance(block.alpha, nn.Parameter) and float(block.alpha.detach()) == 0.0
        elif kwargs["residual_scale"] == "auto":
            assert block.alpha_value == pytest.approx(1 / 3**0.5)  # depth 8: 3 blocks
        else:
            assert block.alpha_value == 0.5


def test_norm_free_models_use_the_norm_free_options():
    model = create_model("poincare_resnet20_nf", num_classes=10, in_chans=1)
    assert not any(isinstance(m, PoincareBatchNorm2d) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, PoincareConv2d)]
    assert len(convs) == 21 and all(m.init == "kaiming" and m.center_weight for m in convs)
    assert model.fc.init == "identity" and not model.fc.center_weight
    assert model.layer3[2].alpha_value == pytest.approx(1 / 3)  # ResNet-20: 9 blocks
    # the options are the documented ones, and each can still be overridden
    assert NORM_FREE["norm"] == "none" and NORM_FREE["residual_scale"] == "auto"
    plain = create_model("poincare_resnet20_nf", center_weight=False, head_init="hnn")
    assert not plain.stem[0].center_weight and plain.fc.init == "hnn"
    with pytest.raises(ValueError, match="unknown init"):
        PoincareResNet(depth=8, head_init="zeros")


def test_poincare_resnet_learnable_curvature_gets_gradient():
    torch.manual_seed(0)
    model = create_model("poincare_resnet20", num_classes=4, in_chans=1, learnable_c=True, depth=20)
    raw = dict(model.named_parameters())["curvature.raw"]
    c = torch.nn.functional.softplus(raw.detach())
    assert float(c) == pytest.approx(0.1, rel=1e-6)
    _forward_backward(model, 1, 4)
    assert raw.grad is not None and float(raw.grad.abs()) > 0


def test_poincare_resnet_rejects_bad_options():
    with pytest.raises(ValueError, match="unknown norm"):
        PoincareResNet(depth=8, norm="layer")
    with pytest.raises(ValueError, match="residual_scale"):
        PoincareResNet(depth=8, norm="none", residual_scale="big")
    with pytest.raises(ValueError, match="widths"):
        PoincareResNet(depth=8, widths=(4, 4))


def test_hybrid_head_curvature_is_learnable_and_starts_at_one():
    model = create_model("hybrid_resnet20", num_classes=10, in_chans=3)
    assert model.fc.curvature is model.curvature
    raw = model.curvature.raw
    assert isinstance(raw, nn.Parameter) and raw.requires_grad
    assert float(model.curvature().detach()) == pytest.approx(1.0, rel=1e-6)
    names = [n for n, p in model.named_parameters() if p is raw]
    assert len(names) == 1
    _forward_backward(model, 3, 10)
    assert raw.grad is not None and float(raw.grad.abs()) > 0


# ------------------------------------------------------------------------------ compile


@pytest.mark.parametrize(
    "depth",
    [
        # same blocks, fewer of them: AOT tracing of depth 20 (~6300 ops) takes 40-80 s here
        8,
        pytest.param(20, marks=pytest.mark.slow),
    ],
)
def test_poincare_resnet20_compiles_fullgraph_and_matches_eager(depth):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = create_model("poincare_resnet20", num_classes=10, in_chans=1, depth=depth).train()
    assert eager.depth == depth
    compiled_module = copy.deepcopy(eager)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_module, backend=counter, fullgraph=True)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    try:
        out_c = compiled(x)
        out_e = eager(x)
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
        out_c.square().sum().backward()
        out_e.square().sum().backward()
        for (name, p_e), p_c in zip(
            eager.named_parameters(), compiled_module.parameters(), strict=True
        ):
            torch.testing.assert_close(
                p_c.grad, p_e.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
            )
        assert counter.frame_count == 1, "graph breaks / recompiles"
        assert counter.op_count > 0
        for (name, b_e), b_c in zip(eager.named_buffers(), compiled_module.buffers(), strict=True):
            torch.testing.assert_close(
                b_c, b_e, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
            )
    finally:
        torch._dynamo.reset()
