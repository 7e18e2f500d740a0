"""Tests for the robustness evaluation: margin loss, PGD restarts, the Square attack as a
gradient-masking detector, the zero-gradient fraction, the per-sample worst case, the angular
attack, transfer attacks and the ``attack`` command."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _helpers import tiny_config
from test_evaluation import _separable_data, trained_model  # noqa: F401 (the fixture)
from torch import nn

from poincare_resnet.cli import main
from poincare_resnet.evaluation import commands
from poincare_resnet.evaluation.attacks import (
    ATTACKS,
    angular,
    angular_component,
    angular_input_grad,
    attack_loss,
    fgsm,
    margin_loss,
    pgd,
    predict,
    robust_accuracy,
    zero_grad_fraction,
)
from poincare_resnet.evaluation.commands import attack_rows
from poincare_resnet.evaluation.robustness import (
    attack_options,
    correct_under_attack,
    robustness_wide_rows,
    worst_case_correct,
)
from poincare_resnet.evaluation.square_attack import square, square_fraction
from poincare_resnet.training.trainer import train


class Quantised(nn.Module):
    """``inner(round(8x) / 8)``: the input gradient is exactly zero everywhere."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(8.0 * x) / 8.0)


class LeftHalf(nn.Module):
    """``inner`` on the image with its right half zeroed: half the gradient is exactly 0."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.arange(x.shape[-1]) < x.shape[-1] // 2
        return self.inner(torch.where(keep, x, 0.0))


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of noisy 8×8 images with mean ∓0.1 (noise std 0.5), in float64."""
    x, y = _separable_data(n, seed)
    return x.double(), y


@pytest.fixture(scope="module")
def model(trained_model: nn.Module) -> nn.Module:  # noqa: F811 (the imported fixture)
    """The two-class conv → ReLU → mean pool → linear network of ``test_evaluation``, trained
    on its separable images, in float64."""
    return copy.deepcopy(trained_model).double().eval()


def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x) == y).double().mean())


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_margin_loss_equals_hand_computation(dtype):
    z = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, -1.0], [0.5, 0.5, 0.0]], dtype=dtype)
    y = torch.tensor([1, 2, 0])
    # max over j ≠ y of z_j, minus z_y: (2 − 3), (5 − (−1)), (0.5 − 0.5)
    expect = torch.tensor([-1.0, 6.0, 0.0], dtype=dtype)
    torch.testing.assert_close(margin_loss(z, y), expect)
    torch.testing.assert_close(attack_loss(z, y, "margin"), expect)
    torch.testing.assert_close(attack_loss(z, y, "ce"), F.cross_entropy(z, y, reduction="none"))
    with pytest.raises(ValueError, match="unknown attack loss 'cw'"):
        attack_loss(z, y, "cw")
    nan = margin_loss(torch.tensor([[float("nan"), 1.0]], dtype=dtype), torch.tensor([1]))
    assert torch.isnan(nan).all()


def test_pgd_margin_ascends_the_margin(model):
    x, y = _data(32, seed=2)
    eps = 0.05
    m0 = margin_loss(model(x), y)
    x_m = pgd(model, x, y, eps, steps=5, random_start=False, loss="margin")
    x_c = pgd(model, x, y, eps, steps=5, random_start=False, loss="ce")
    with torch.no_grad():
        m_m, m_c = margin_loss(model(x_m), y), margin_loss(model(x_c), y)
    assert (m_m > m0).all() and m_m.sum() >= m_c.sum() - 1e-9
    assert (x_m - x).abs().max() <= eps + 1e-9


class Saturated(nn.Module):
    """``10⁴ · inner(x)`` in float32: the softmax saturates, the CE gradient is exactly 0."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = copy.deepcopy(inner).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1e4 * self.inner(x)


def test_margin_loss_defeats_a_saturated_softmax(model):
    x, y = _data(48, seed=2)
    net, x = Saturated(model), x.float()
    clean, eps = _acc(net, x, y), 0.3
    assert clean > 0.85
    ce = zero_grad_fraction(net, x, y)
    assert ce["zero_grad_inputs"] >= clean - 0.05  # every confident sample: CE gradient 0
    assert zero_grad_fraction(net, x, y, loss="margin")["zero_grad_inputs"] == 0.0
    acc_ce = _acc(net, pgd(net, x, y, eps, steps=5, random_start=False), y)
    acc_margin = _acc(net, pgd(net, x, y, eps, steps=5, random_start=False, loss="margin"), y)
    assert acc_ce >= clean - 0.05 and acc_margin < clean - 0.5


# ----------------------------------------------------------------------------- restarts


def test_restarts_never_lower_the_fooled_set(model):
    x, y = _data(64, seed=3)
    # one small step from a random start: which samples are fooled depends on the start
    kw = {"steps": 1, "step_size": 0.01}
    eps = 0.12
    runs = [pgd(model, x, y, eps, generator=_gen(s), **kw) for s in range(4)]
    fooled = [predict(model, r) != y for r in runs]
    assert any((f & ~fooled[0]).any() for f in fooled[1:]), "starts must matter for this test"
    assert any((fooled[0] & ~f).any() for f in fooled[1:]), "a start must also lose samples"
    x_r = pgd(model, x, y, eps, generator=_gen(0), restarts=4, **kw)
    f_r = predict(model, x_r) != y
    assert (f_r | ~fooled[0]).all()  # every sample the first start fooled stays fooled
    assert f_r.sum() > fooled[0].sum()  # and restarts add some
    assert (x_r - x).abs().max() <= eps + 1e-9
    with pytest.raises(ValueError, match="random_start"):
        pgd(model, x, y, eps, random_start=False, restarts=2)
    with pytest.raises(ValueError, match="restarts must be a positive integer"):
        pgd(model, x, y, eps, restarts=0)


# ----------------------------------------------------------------------------- Square


def test_square_attack_breaks_gradient_masking_that_stops_fgsm_and_pgd(model):
    x, y = _data(48, seed=4)
    eps = 0.3
    masked = Quantised(model)
    clean = _acc(masked, x, y)
    assert clean > 0.85
    # the gradient is zero everywhere: sign(0) = 0, the gradient attacks do not move the input
    assert _acc(masked, fgsm(masked, x, y, eps), y) == clean
    assert _acc(masked, pgd(masked, x, y, eps, steps=5, random_start=False), y) == clean
    x_s = square(masked, x, y, eps, queries=60, generator=_gen())
    assert _acc(masked, x_s, y) < clean - 0.5
    assert (x_s - x).abs().max() <= eps + 1e-9 and x_s.abs().max() <= 1.0
    # on the plain model the gradient attacks work (the masking is the wrapper's)
    assert _acc(model, fgsm(model, x, y, eps), y) < clean - 0.5


def test_square_is_seeded_and_stays_in_the_ball(model):
    x, y = _data(16, seed=5)
    a = square(model, x.clone(), y, 0.1, queries=20, generator=_gen(1))
    b = square(model, x, y, 0.1, queries=20, generator=_gen(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ((a - x).abs() <= 0.1 + 1e-9).all()
    assert square_fraction(0.8, 0, 100) == 0.8
    assert square_fraction(0.8, 1, 1000) == 0.8  # u = ⌊10⁴ · 1/1000⌋ = 10
    assert square_fraction(0.8, 3, 1000) == pytest.approx(0.4)  # u = 30 ∈ (10, 50]
    assert square_fraction(0.8, 1, 100) == pytest.approx(0.2)  # u = 100 ∈ (50, 200]
    assert square_fraction(0.8, 99, 100) == pytest.approx(0.8 / 512)
    torch.testing.assert_close(square(model, x, y, 0.0, queries=5), x)
    with pytest.raises(ValueError, match="queries"):
        square(model, x, y, 0.1, queries=0)


# ----------------------------------------------------------------------------- zero gradients


def test_zero_grad_fraction(model):
    x, y = _data(20, seed=6)
    assert zero_grad_fraction(Quantised(model), x, y) == {
        "zero_grad_inputs": 1.0,
        "zero_grad_elements": 1.0,
    }
    plain = zero_grad_fraction(model, x, y, batch_size=7)
    assert plain["zero_grad_inputs"] < 1.0 and plain["zero_grad_elements"] < 0.5
    half = zero_grad_fraction(LeftHalf(model), x, y, loss="margin")
    assert half["zero_grad_inputs"] == 0.0 and half["zero_grad_elements"] >= 0.5


# ----------------------------------------------------------------------------- worst case


def test_worst_case_is_the_per_sample_and():
    a = torch.tensor([True, False, True, True])
    b = torch.tensor([True, True, False, True])
    w = worst_case_correct({"a": a, "b": b})
    assert w.tolist() == [True, False, False, True]
    # min of the accuracies is 0.75, the worst case 0.5
    assert min(float(a.double().mean()), float(b.double().mean())) == 0.75
    assert float(w.double().mean()) == 0.5
    assert a.tolist() == [True, False, True, True]  # the inputs are not modified
    with pytest.raises(ValueError, match="at least one"):
        worst_case_correct({})


def _masks(model, x, y, names, e, source=None) -> dict[str, torch.Tensor]:
    """Per attack, the per-sample correctness at ``e`` with the options of :func:`_rows`."""
    given = {"steps": 3, "queries": 15, "generator": None}
    clean = predict(model, x) == y
    out = {}
    for n in names:
        kw = attack_options(ATTACKS[n], {**given, "generator": _gen(0)})
        out[n] = correct_under_attack(model, x, y, n, e, source, clean=clean, **kw)
    return out


def _rows(model, x, y, names, e, **kw) -> dict[str, float]:
    rows = attack_rows(model, x, y, names, (e,), steps=3, queries=15, worst_case=True, **kw)
    return {r["attack"]: r["accuracy"] for r in rows}


def test_attack_rows_worst_case_matches_per_sample_masks(model):
    x, y = _data(40, seed=7)
    names = ("fgsm", "pgd-margin", "square", "angular")
    for e in (0.02, 0.08):
        acc = _rows(model, x, y, names, e)
        assert set(acc) == {*names, "worst"}
        assert all(acc["worst"] <= acc[n] for n in names)
        masks = _masks(model, x, y, names, e)
        assert [acc[n] for n in names] == [float(masks[n].double().mean()) for n in names]
        assert acc["worst"] == float(worst_case_correct(masks).double().mean())
    rows = attack_rows(model, x, y, ("fgsm", "pgd"), (0.02, 0.08), worst_case=True)
    wide = robustness_wide_rows(rows)
    assert [r["eps_255"] for r in wide] == pytest.approx([255 * 0.02, 255 * 0.08])
    assert set(wide[0]) >= {"clean_accuracy", "worst", "fgsm", "pgd"}
    assert wide[1]["worst"] == next(r["accuracy"] for r in rows[-1:])


def test_clean_misclassified_images_stay_misclassified(model):
    x, y = _data(64, seed=10)

    def fix(_m, xb, yb, _eps):  # an "attack" that moves every image to its class's mean
        return ((yb.double() * 2 - 1) * 0.9)[:, None, None, None].expand_as(xb).clone()

    assert _acc(model, fix(model, x, y, 0.0), y) == 1.0
    clean = predict(model, x) == y
    assert not clean.all()
    torch.testing.assert_close(correct_under_attack(model, x, y, fix, 0.1, clean=clean), clean)
    row = robust_accuracy(model, x, y, fix, [0.1])[0]
    assert row["accuracy"] == row["clean_accuracy"] < 1.0


# ----------------------------------------------------------------------------- transfer


def test_transfer_attacks(model):
    x, y = _data(32, seed=9)
    names = ("fgsm", "pgd", "square", "angular")
    white = _rows(model, x, y, names, 0.08)
    assert _rows(model, x, y, names, 0.08, source=model) == white
    masked = Quantised(model)
    clean = _acc(model, x, y)
    # crafted on the masked model, FGSM does not move the images: the target sees clean inputs
    assert _rows(model, x, y, ("fgsm",), 0.3, source=masked)["fgsm"] == clean
    # crafted on the plain model, the examples transfer to its masked twin
    masked_clean = _acc(masked, x, y)
    assert _rows(masked, x, y, ("fgsm",), 0.3)["fgsm"] == masked_clean  # white-box: masked
    assert _rows(masked, x, y, ("fgsm",), 0.3, source=model)["fgsm"] < masked_clean - 0.5


# ----------------------------------------------------------------------------- angular


def test_angular_component_is_orthogonal_to_the_radial_direction():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(6, 5, generator=g, dtype=torch.float64)
    grad = torch.randn(6, 5, generator=g, dtype=torch.float64)
    e[0] = 0.0
    g_a = angular_component(e, grad)
    torch.testing.assert_close(
        (g_a * e).sum(1), torch.zeros(6, dtype=torch.float64), atol=1e-13, rtol=0
    )
    # an independent formulation: the projector I − ê êᵀ
    unit = e[1:] / e[1:].norm(dim=1, keepdim=True)
    proj = torch.eye(5, dtype=torch.float64) - unit[:, :, None] * unit[:, None, :]
    torch.testing.assert_close(g_a[1:], (proj @ grad[1:, :, None])[..., 0])
    torch.testing.assert_close(g_a[0], grad[0])  # no radial direction at the origin


def _angular_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``Jᵀ P ∇_e L`` with the projector ``P = I − ê êᵀ`` and ``J = ∂e/∂x`` (two autograd
    passes, one per factor)."""
    x = x.detach().requires_grad_(True)
    e = model.forward_features(x).flatten(1)
    leaf = e.detach().requires_grad_(True)
    loss = F.cross_entropy(model.forward_head(leaf), y, reduction="sum")
    (g_e,) = torch.autograd.grad(loss, [leaf])
    unit = leaf.detach() / leaf.detach().norm(dim=1, keepdim=True)
    proj = torch.eye(e.shape[1], dtype=e.dtype) - unit[:, :, None] * unit[:, None, :]
    (d,) = torch.autograd.grad(e, [x], grad_outputs=(proj @ g_e[:, :, None])[..., 0])
    return d


def test_angular_direction_matches_reference_and_drops_the_radial_part(model):
    x, y = _data(8, seed=8)
    d = angular_input_grad(model, x, y)
    torch.testing.assert_close(d, _angular_reference(model, x, y))
    assert not torch.allclose(
        d, torch.func.grad(lambda t: F.cross_entropy(model(t), y, reduction="sum"))(x)
    )
    x_a = angular(model, x, y, 0.1, steps=3, generator=_gen())
    assert (x_a - x).abs().max() <= 0.1 + 1e-9 and not torch.equal(x_a, x)
    with pytest.raises(ValueError, match="forward_features"):
        angular_input_grad(Quantised(model), x, y)


def test_angular_attack_on_a_poincare_model():
    from poincare_resnet import create_model

    torch.manual_seed(0)
    net = create_model("poincare_resnet20", num_classes=3, in_chans=1, depth=8, widths=(4, 4, 4))
    net = net.double().eval()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 1, 2, 0])
    feats = net.forward_features(x.requires_grad_(True)).flatten(1)
    loss = F.cross_entropy(net.forward_head(feats), y, reduction="sum")
    (g_e,) = torch.autograd.grad(loss, [feats])
    g_a = angular_component(feats.detach(), g_e)
    cos = (g_a * feats.detach()).sum(1) / (g_a.norm(dim=1) * feats.detach().norm(dim=1))
    assert cos.abs().max() < 1e-12
    torch.testing.assert_close(
        angular_input_grad(net, x.detach(), y), _angular_reference(net, x.detach(), y)
    )


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """1-epoch runs on 64 digits (2 steps) of a Poincaré and a Euclidean depth-8 ResNet."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name in ("poincare_resnet20", "euclidean_resnet20"):
        summary = train(tiny_config(root / name, model=name), log=lambda _m: None)
        out[name] = Path(summary["run_dir"])
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cli_attack_table_on_poincare_and_transfer(runs, tmp_path, capsys):
    p, e = str(runs["poincare_resnet20"]), str(runs["euclidean_resnet20"])
    out = tmp_path / "p"
    small = ["--eps", "0.8,3.2", "--limit", "6", "--steps", "2", "--queries", "4"]
    assert main(["attack", p, *small, "--restarts", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| worst |" in printed and "zero_grad_inputs" in printed
    summary = json.loads((out / "robustness.json").read_text())
    assert summary["model"] == "poincare_resnet20" and 0.0 <= summary["zero_grad_inputs"] <= 1.0
    wide = summary["rows"]
    assert [r["eps_255"] for r in wide] == pytest.approx([0.8, 3.2])
    attacks = ("fgsm", "pgd", "pgd-margin", "square", "angular")
    for r in wide:
        assert r["worst"] <= min(r[a] for a in attacks) and r["worst"] <= r["clean_accuracy"]
    long = _read_csv(out / "attack.csv")
    assert {r["attack"] for r in long} == {*attacks, "worst"} and len(long) == 12
    assert (out / "robustness.md").is_file() and (out / "accuracy_vs_eps.png").is_file()

    out = tmp_path / "t"
    argv = ["attack", p, "--attacks", "fgsm,square", "--source", e, *small, "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "robustness.json").read_text())
    assert summary["source"] == e and {r["source"] for r in summary["attacks"]} == {e}


def test_cli_attack_bad_input_exit_code_2(runs, tmp_path, capsys, monkeypatch):
    p = str(runs["poincare_resnet20"])
    bad = [
        (["--attacks", "fgsm,cw"], "unknown attack 'cw'"),
        (["--attacks", "pgd", "--restarts", "2", "--no-random-start"], "random start"),
        (["--source", str(tmp_path / "nope")], "does not exist"),
    ]
    for extra, message in bad:
        assert main(["attack", p, *extra, "--limit", "2", "--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
    real = commands.load_checkpoint_data

    def other_data(ck, *a, **k):
        if str(ck) != "SRC":
            return real(ck, *a, **k)
        model, meta, data = real(p, *a, **k)
        return model, meta, dataclasses.replace(data, name="cifar10")

    monkeypatch.setattr(commands, "load_checkpoint_data", other_data)
    assert main(["attack", p, "--source", "SRC", "--limit", "2", "--out", str(tmp_path / "o")]) == 2
    assert "a transfer attack needs the same data" in capsys.readouterr().err
