"""ResNet-18/34/50 families (Poincaré, Euclidean, hybrid), the stems, the Poincaré bottleneck,
the layer settings (``PoincareLayers`` / ``EuclideanLayers``), checkpoints, Grad-CAM and CLI."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
from _helpers import model_meta
from torch import nn

from poincare_resnet import ball
from poincare_resnet.models import (
    IMAGENET_DEPTHS,
    EuclideanImageNetResNet,
    HybridImageNetResNet,
    PoincareBottleneck,
    PoincareImageNetResNet,
    PoincareLayers,
    TangentMaxPool2d,
    create_model,
    list_models,
)
from poincare_resnet.models.registry import build_from_config, model_options
from poincare_resnet.nn import Curvature, PoincareBatchNorm2d, PoincareConv2d

FAMILIES = {
    "poincare": PoincareImageNetResNet,
    "euclidean": EuclideanImageNetResNet,
    "hybrid": HybridImageNetResNet,
}
NAMES = [f"{f}_resnet{d}" for f in FAMILIES for d in IMAGENET_DEPTHS]
SMALL = {"widths": (4, 8, 8, 8)}  # the topology at a fraction of the cost


def _grads_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


def _images(b: int, size: int, chans: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, chans, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name", NAMES)
def test_registered_model_forward_backward_and_features(name):
    """Full widths 64-128-256-512; ResNet-50 at batch 1, 32×32 (its last map is still 4×4)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_chans=3)
    family, depth = name.split("_resnet")
    assert type(model) is FAMILIES[family] and model.depth == int(depth)
    assert model.widths == (64, 128, 256, 512) and model.stem_kind == "cifar"
    b, size = (1, 32) if depth == "50" else (2, 16)
    x = _images(b, size)
    out = model(x)
    assert out.shape == (b, 7) and torch.isfinite(out).all()
    out.square().sum().backward()
    _grads_finite(model)
    feats = 2048 if depth == "50" else 512
    with torch.no_grad():
        f = model.eval().forward_features(x)
        assert f.shape == (b, feats)
        torch.testing.assert_close(model.forward_head(f), model(x))


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
def test_poincare_euclidean_and_hybrid_twins_have_the_same_weights(depth):
    """Every conv kernel and the head have the same shape, in the same order. The rest differs
    by design: a Poincaré conv has a bias, its batch norm one scale (SPEC §6) where the
    Euclidean one has one per channel, and its shortcut has no batch norm. The hybrid twin is
    the Euclidean one plus its learnable curvature."""
    p, e, h = (create_model(f"{f}_resnet{depth}", num_classes=10) for f in FAMILIES)
    shapes = [[tuple(w.shape) for w in m.parameters() if w.dim() >= 2] for m in (p, e, h)]
    assert shapes[0] == shapes[1] == shapes[2]
    n_p, n_e, n_h = (sum(w.numel() for w in m.parameters()) for m in (p, e, h))
    assert n_h == n_e + 1
    conv_bias = sum(m.out_channels for m in p.modules() if isinstance(m, PoincareConv2d))
    bns = [m.num_features for m in p.modules() if isinstance(m, PoincareBatchNorm2d)]
    e_bns = [m.num_features for m in e.modules() if isinstance(m, nn.BatchNorm2d)]
    shortcut_bn = sum(e_bns) - sum(bns)
    assert shortcut_bn > 0 and len(e_bns) - len(bns) == 4 - (depth == 18) - (depth == 34)
    # Euclidean: 2 per BN channel; Poincaré: a bias per conv channel, C + 1 per batch norm
    assert n_p - n_e == conv_bias + len(bns) - sum(bns) - 2 * shortcut_bn


@pytest.mark.parametrize(("depth", "count"), [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032)])
def test_euclidean_imagenet_stem_matches_torchvision_parameter_count(depth, count):
    """torchvision's published parameter counts (1000 classes, ImageNet stem)."""
    model = create_model(f"euclidean_resnet{depth}", num_classes=1000, stem="imagenet")
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("family", FAMILIES)
def test_stem_option_sets_the_downsampling(family):
    """cifar: conv3×3 stride 1, no pooling (H/8 at the last stage); imagenet: conv7×7 stride 2
    and a 3×3 stride-2 max-pool (H/32)."""
    x = _images(2, 64)
    sizes = {}
    for stem in ("cifar", "imagenet"):
        torch.manual_seed(0)
        model = create_model(f"{family}_resnet18", stem=stem, **SMALL).eval()
        with torch.no_grad():
            sizes[stem] = tuple(model.forward_feature_map(x).shape)
        pools = [m for m in model.stem if isinstance(m, nn.MaxPool2d)]
        assert len(pools) == (stem == "imagenet")
        assert model.stem[0].kernel_size == ((3, 3) if stem == "cifar" else (7, 7))
        if family == "poincare" and pools:
            assert isinstance(pools[0], TangentMaxPool2d)
    assert sizes == {"cifar": (2, 8, 8, 8), "imagenet": (2, 8, 2, 2)}
    with pytest.raises(ValueError, match="unknown stem 'vit'"):
        create_model(f"{family}_resnet18", stem="vit")


def test_bad_depth_and_widths_are_rejected():
    with pytest.raises(ValueError, match=r"depth must be one of \[18, 34, 50, 101, 152\]"):
        create_model("poincare_resnet18", depth=20)
    with pytest.raises(ValueError, match="widths must be four positive"):
        create_model("euclidean_resnet50", widths=(8, 16, 32))


def test_poincare_max_pool_is_the_coordinate_max_of_the_tangent_map():
    u = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    out = TangentMaxPool2d(3, stride=2, padding=1)(u)
    padded = torch.nn.functional.pad(u, (1, 1, 1, 1), value=float("-inf"))
    ref = padded.unfold(2, 3, 2).unfold(3, 3, 2).amax((-1, -2))
    torch.testing.assert_close(out, ref)
    x = ball.expmap0(out, c=0.1, dim=1)  # a valid map of ball points
    assert (0.1 * x.pow(2).sum(1) < 1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_poincare_bottleneck_is_the_documented_composition(dtype):
    """The block against the chain of its layers with the reference Möbius residual:
    ``relu(logmap0(expmap0(f) ⊕ expmap0(W_s x)))``, ``f`` the 1×1 → 3×3 → 1×1 branch."""
    torch.manual_seed(0)
    cur = Curvature(0.1)
    block = PoincareBottleneck(8, 4, 2, cur, PoincareLayers(init="hnn")).to(dtype)
    assert isinstance(block.shortcut, PoincareConv2d) and block.shortcut.stride == (2, 2)
    assert block.shortcut.out_channels == 16 and block.conv2.stride == (2, 2)
    x = 0.5 * torch.randn(2, 8, 6, 6, dtype=dtype)
    out = block(x)
    assert out.shape == (2, 16, 3, 3)
    relu = torch.relu
    f = relu(block.bn1(block.conv1(x)))
    f = block.bn3(block.conv3(relu(block.bn2(block.conv2(f)))))
    ref = relu(block.residual._forward_reference(f, block.shortcut(x)))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    same = PoincareBottleneck(16, 4, 1, cur, PoincareLayers())
    assert isinstance(same.shortcut, nn.Identity)  # shape kept: identity shortcut


def test_poincare_bottleneck_gradcheck_float64():
    torch.manual_seed(0)
    block = PoincareBottleneck(4, 2, 2, Curvature(0.1), PoincareLayers(init="hnn")).double()
    x = (0.5 * torch.randn(2, 4, 4, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------ layer settings


def test_layer_settings_reach_the_layers_grouped_or_flat():
    model = create_model(
        "poincare_resnet18",
        layers={"bn_eps": 1e-3, "bn_track_running_stats": False, "init": "hnn"},
        init="kaiming",  # a flat option overrides the group
        **SMALL,
    )
    bns = [m for m in model.modules() if isinstance(m, PoincareBatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and not m.track_running_stats for m in bns)
    assert all(m.running_mean is None for m in bns)
    convs = [m for m in model.modules() if isinstance(m, PoincareConv2d)]
    assert all(m.init == "kaiming" for m in convs)
    cfg = model.model_config
    assert "layers" not in cfg and cfg["bn_eps"] == 1e-3 and cfg["init"] == "kaiming"
    assert set(PoincareLayers.__dataclass_fields__) <= set(cfg)
    json.dumps(cfg)
    e = create_model("euclidean_resnet18", bn_eps=1e-3, bn_momentum=0.01, **SMALL)
    e_bns = [m for m in e.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.eps == 1e-3 and m.momentum == 0.01 for m in e_bns)
    cifar = create_model("poincare_resnet20", depth=8, layers=PoincareLayers(bn_eps=1e-2))
    assert all(m.eps == 1e-2 for m in cifar.modules() if isinstance(m, PoincareBatchNorm2d))
    assert {"bn_eps", "bn_track_running_stats", "layers", "stem"} <= set(
        model_options("poincare_resnet50")
    )


def test_unknown_layer_setting_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown model option.*'bn_epsilon'.*valid options"):
        create_model("poincare_resnet18", bn_epsilon=1e-3)
    with pytest.raises(ValueError, match="unknown layer option.*'eps'.*valid: init"):
        create_model("poincare_resnet18", layers={"eps": 1e-3})
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        create_model("poincare_resnet34", norm="layer")


def test_old_flat_config_without_the_new_layer_settings_builds_with_a_warning():
    """A format-2 ``model_config`` written before ``bn_eps`` / ``bn_track_running_stats``
    existed: it rebuilds the same network, naming the settings it takes at their defaults."""
    torch.manual_seed(0)
    model = create_model("poincare_resnet20", depth=8, num_classes=3, in_chans=1).eval()
    old = {
        k: v
        for k, v in model.model_config.items()
        if k not in ("bn_eps", "bn_track_running_stats", "layers")
    }
    assert {"init", "bn_mean", "residual_order"} <= set(old)
    with pytest.warns(UserWarning, match="lacks argument.*bn_eps, bn_track_running_stats"):
        rebuilt = build_from_config("poincare_resnet20", old)
    rebuilt.load_state_dict(model.state_dict())
    x = _images(2, 8, chans=1)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model(x), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_from_config("poincare_resnet20", model.model_config)


# ------------------------------------------------------------------------------ tools


@pytest.mark.parametrize("name", ["poincare_resnet50", "hybrid_resnet18"])
def test_checkpoint_round_trip_rebuilds_the_network(name, tmp_path):
    from poincare_resnet.api import load_model
    from poincare_resnet.training.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_chans=1, stem="imagenet", **SMALL).eval()
    meta = model_meta(model)
    path = save_checkpoint(tmp_path / "m.safetensors", model_state=model.state_dict(), meta=meta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rebuilt, _ = load_model(path)
    assert type(rebuilt) is type(model) and rebuilt.stem_kind == "imagenet"
    assert rebuilt.model_config == model.model_config
    x = _images(2, 32, chans=1)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_grad_cam_hooks_the_last_stage(family):
    from poincare_resnet.evaluation.explain import grad_cam

    torch.manual_seed(0)
    model = create_model(f"{family}_resnet18", num_classes=4, **SMALL)
    assert model.gradcam_layer is model.layer4
    x = _images(2, 16)
    cam = grad_cam(model, x)
    assert cam.shape == (2, 16, 16) and cam.min() >= 0 and cam.max() <= 1
    assert torch.isfinite(cam).all() and float(cam.amax()) == pytest.approx(1.0)


def test_cli_trains_and_lists_a_resnet18(tmp_path, capsys):
    from poincare_resnet import cli

    assert cli.main(["models", "*resnet18"]) == 0
    assert capsys.readouterr().out.split() == [f"{f}_resnet18" for f in sorted(FAMILIES)]
    assert {f"{f}_resnet{d}" for f in FAMILIES for d in (18, 34, 50)} <= set(list_models())
    out = tmp_path / "run"
    argv = ["train", "--model", "poincare_resnet18", "--epochs", "1", "--limit-train", "16"]
    argv += ["--batch-size", "8", "--max-steps", "1", "--out", str(out), "--no-progress"]
    argv += ["--model-kwargs", "widths=[4,4,4,4]", "stem=imagenet", "bn_eps=0.001"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["model_kwargs"] == {"widths": [4, 4, 4, 4], "stem": "imagenet", "bn_eps": 0.001}


# ------------------------------------------------------------------------------ benchmark


def _scaling():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"
    spec = importlib.util.spec_from_file_location("scaling_bench", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_scaling_benchmark_tiny_mode_writes_json_table_and_plot(tmp_path):
    scaling = _scaling()
    out = tmp_path / "scaling"
    rows = scaling.main(["--tiny", "--inline", "--threads", "1", "--out", str(out)])
    assert [r["axis"] for r in rows] == ["width", "depth", "resolution"]
    for r in rows:
        for fam in ("euclidean", "poincare"):
            m = r[fam]
            assert m["train_ms"] > 0 and m["peak_mib"] > 0
            assert m["act_peak_mib"] > 0  # batch B holds more activations than B/2
        assert r["peak_mib_ratio"] == r["poincare"]["peak_mib"] / r["euclidean"]["peak_mib"]
    assert json.loads((out / "scaling.json").read_text()) == json.loads(json.dumps(rows))
    table = (out / "scaling.md").read_text().splitlines()
    assert sum(line.startswith("| ") for line in table) == 1 + len(rows)
    assert "224" not in table[-1] and "imagenet stem" in table[-1]
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_callgrind_marker_runs_the_step_once_and_is_a_no_op_outside_valgrind(tmp_path):
    scaling, calls = _scaling(), []
    scaling.collected_step(lambda: calls.append(1), scaling.callgrind_marker(str(tmp_path)))
    assert calls == [1]
