"""Tests for poincare_resnet.evaluation: metrics, OOD scores, attacks, explanations, plots."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from poincare_resnet.evaluation import (
    PAPER_FGSM_EPS,
    accuracy_topk,
    collect_outputs,
    confusion_matrix,
    energy_score,
    evaluate_ood,
    feature_norm_score,
    fgsm,
    grad_cam,
    input_saliency,
    make_ood_sets,
    msp_score,
    ood_metrics,
    ood_roc_curve,
    per_class_accuracy,
    pgd,
    plot_accuracy_vs_eps,
    plot_confusion_matrix,
    plot_explanations,
    plot_roc_curves,
    plot_score_histograms,
    plot_training_curves,
    robust_accuracy,
    write_table,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class LeftMaskReLU(nn.Module):
    """ReLU that zeroes the right half of the feature map (columns >= W // 2)."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(a)
        mask[..., : a.shape[-1] // 2] = 1.0
        return F.relu(a) * mask


class TinyCNN(nn.Module):
    """Minimal Euclidean classifier following the model protocol."""

    def __init__(
        self, in_ch: int = 1, num_classes: int = 2, width: int = 8, left_only: bool = False
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, width, 3, padding=1)
        self.gradcam_layer: nn.Module = LeftMaskReLU() if left_only else nn.ReLU()
        self.head = nn.Linear(width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.gradcam_layer(self.conv(x)).mean(dim=(2, 3))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _separable_data(n: int, seed: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of noisy images with mean -0.1 / +0.1 (noise std 0.5): separable by the mean
    but with a non-trivial loss after a short training run."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (y.float() * 0.2 - 0.1)[:, None, None, None] + 0.5 * torch.randn(
        n, 1, size, size, generator=g
    )
    return x.clamp(-1, 1), y


@pytest.fixture(scope="module")
def trained_model() -> TinyCNN:
    torch.manual_seed(0)
    model = TinyCNN()
    x, y = _separable_data(64, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(25):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model


def _no_param_grads(model: nn.Module) -> bool:
    return all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- metrics


def test_accuracy_topk_and_per_class():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    targets = torch.tensor([0, 2, 1, 1])
    acc = accuracy_topk(logits, targets, ks=(1, 2, 5))
    assert acc["top1"] == pytest.approx(0.25)
    assert acc["top2"] == pytest.approx(0.75)
    assert acc["top5"] == pytest.approx(1.0)  # k capped at K = 3
    pca = per_class_accuracy(logits, targets)
    np.testing.assert_allclose(pca, [1.0, 0.0, 0.0])
    pca4 = per_class_accuracy(logits.argmax(1), targets, num_classes=4)
    assert math.isnan(pca4[3])
    cm = confusion_matrix(logits, targets)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [1, 0, 1], [0, 1, 0]])


def test_ood_metrics_perfect_separation():
    m = ood_metrics([5.0, 6.0, 7.0], [1.0, 2.0])
    assert m == {"fpr95": 0.0, "auroc": 1.0, "aupr": 1.0}
    m = ood_metrics([1.0, 2.0], [5.0, 6.0, 7.0])  # reversed: every OOD above every ID
    assert m["auroc"] == 0.0 and m["fpr95"] == 1.0


def test_ood_metrics_hand_example():
    # AUROC = pairs ordered correctly / 16: 0.9→4, 0.8→4, 0.7→3, 0.6→3 = 14/16.
    # FPR95: TPR ≥ .95 needs threshold ≤ 0.6, where OOD 0.75 is accepted → 1/4.
    # AP: ranking in,in,out,in,in,... → (1 + 1 + 3/4 + 4/5) / 4 = 0.8875.
    m = ood_metrics(torch.tensor([0.9, 0.8, 0.7, 0.6]), np.array([0.75, 0.5, 0.4, 0.3]))
    assert m["auroc"] == pytest.approx(14 / 16, abs=1e-12)
    assert m["fpr95"] == pytest.approx(0.25, abs=1e-12)
    assert m["aupr"] == pytest.approx(0.8875, abs=1e-12)


def test_ood_metrics_identical_distributions():
    s = list(range(1, 101))
    m = ood_metrics(s, s)
    assert m["auroc"] == pytest.approx(0.5, abs=1e-12)
    # TPR ≥ 0.95 first reached at threshold 6 (95 of 100 accepted) with FPR = 95/100.
    assert m["fpr95"] == pytest.approx(0.95, abs=1e-12)
    fpr, tpr, thr = ood_roc_curve(s, s)
    np.testing.assert_allclose(fpr, tpr)
    assert fpr[0] == 0.0 and fpr[-1] == 1.0 and len(thr) == len(fpr)


def test_ood_metrics_rejects_bad_input():
    with pytest.raises(ValueError):
        ood_metrics([], [1.0])
    with pytest.raises(ValueError):
        ood_metrics([float("nan")], [1.0])


# ----------------------------------------------------------------------------- OOD scores


def test_score_functions_hand_values():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    np.testing.assert_allclose(energy_score(logits), [math.log(2.0), math.log(4.0)], rtol=1e-6)
    np.testing.assert_allclose(
        energy_score(logits, T=2.0),
        [2 * math.log(2.0), 2 * math.log(math.sqrt(3.0) + 1.0)],
        rtol=1e-6,
    )
    np.testing.assert_allclose(msp_score(logits), [0.5, 0.75], rtol=1e-6)
    feats = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(feature_norm_score(feats), [10.0, 0.0])


def test_feature_norm_is_ball_distance_of_expmap0():
    v = torch.randn(5, 4, dtype=torch.float64) * 0.7
    for c in (0.3, 1.0, 2.0):
        sc = math.sqrt(c)
        n = v.norm(dim=-1, keepdim=True)
        x = torch.tanh(sc * n) * v / (sc * n)  # expmap0 on the ball of curvature -c
        d = 2.0 / sc * torch.atanh(sc * x.norm(dim=-1))
        torch.testing.assert_close(feature_norm_score(v), d)


def test_collect_outputs_and_mode_restored():
    torch.manual_seed(0)
    model = TinyCNN(in_ch=3, num_classes=4)
    model.train()
    x = torch.rand(7, 3, 6, 6) * 2 - 1
    logits, feats = collect_outputs(model, x, batch_size=3, device="cpu")
    assert logits.shape == (7, 4) and feats.shape == (7, 8)
    assert model.training and not logits.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x))


def test_make_ood_sets_shapes_and_ranges():
    x = torch.rand(5, 3, 12, 10) * 2 - 1
    sets = make_ood_sets(
        x, names=("gaussian", "uniform", "inverted", "hflip", "vflip", "digits"), seed=0
    )
    for name, t in sets.items():
        assert t.shape == x.shape and t.dtype == x.dtype, name
        assert t.min() >= -1.0 and t.max() <= 1.0, name
    torch.testing.assert_close(sets["inverted"], -x)
    torch.testing.assert_close(sets["hflip"], x.flip(-1))
    torch.testing.assert_close(sets["vflip"], x.flip(-2))
    d = sets["digits"]
    torch.testing.assert_close(d[:, 0], d[:, 2])  # grey digits repeated over channels
    assert d.std() > 0.1
    again = make_ood_sets(x, names=("gaussian",), seed=0)["gaussian"]
    torch.testing.assert_close(again, sets["gaussian"])
    with pytest.raises(ValueError):
        make_ood_sets(x, names=("nope",))


def test_make_ood_sets_digits_native_size_matches_sklearn():
    from sklearn.datasets import load_digits

    ref = torch.as_tensor(load_digits().images, dtype=torch.float32) / 16 * 2 - 1
    d = make_ood_sets(torch.zeros(3, 1, 8, 8), names=("digits",), seed=1)["digits"]
    for img in d[:, 0]:
        assert (ref - img).abs().flatten(1).amax(1).min() < 1e-6  # an exact sklearn digit


def test_evaluate_ood_rows(trained_model):
    x_in, _ = _separable_data(20, seed=5)
    sets = make_ood_sets(x_in, names=("uniform", "inverted"), seed=0)
    rows = evaluate_ood(trained_model, x_in, sets, repeats=3, seed=0, subsample=10)
    assert len(rows) == 6
    assert {(r["ood_set"], r["score"]) for r in rows} == {
        (s, k) for s in ("uniform", "inverted") for k in ("energy", "msp", "feature_norm")
    }
    for r in rows:
        assert r["n_in"] == 10 and r["n_out"] == 10 and r["repeats"] == 3
        for k in ("fpr95", "auroc", "aupr"):
            assert 0.0 <= r[k] <= 1.0 and r[f"{k}_std"] >= 0.0
    full = evaluate_ood(trained_model, x_in, sets, scores=("energy",))
    assert all(r["fpr95_std"] == 0.0 and r["n_in"] == 20 for r in full)
    assert rows == evaluate_ood(trained_model, x_in, sets, repeats=3, seed=0, subsample=10)


def test_ood_rows_from_scores_takes_precomputed_scores():
    from poincare_resnet.evaluation import ood_rows_from_scores

    s_in = np.array([2.0, 3.0, 4.0, 5.0])
    out = {"a": {"energy": np.array([0.0, 1.0, 2.5, 6.0])}, "b": {"energy": s_in - 10}}
    rows = ood_rows_from_scores({"energy": s_in}, out)
    assert [(r["ood_set"], r["score"]) for r in rows] == [("a", "energy"), ("b", "energy")]
    # P(s_in > s_out) counted by hand: 2 + 3 + 3 + 3 of 16 pairs
    assert rows[0]["auroc"] == pytest.approx(11 / 16) and rows[0]["auroc_std"] == 0.0
    assert rows[1]["auroc"] == 1.0 and rows[1]["fpr95"] == 0.0  # separated: no OOD accepted
    assert rows[0]["n_in"] == 4 and rows[0]["n_out"] == 4 and rows[0]["repeats"] == 1
    drawn = ood_rows_from_scores({"energy": s_in}, out, repeats=4, seed=1, subsample=2)
    assert all(r["n_in"] == 2 and r["repeats"] == 4 for r in drawn)
    assert drawn == ood_rows_from_scores({"energy": s_in}, out, repeats=4, seed=1, subsample=2)
    with pytest.raises(ValueError, match="repeats"):
        ood_rows_from_scores({"energy": s_in}, out, repeats=0)


def test_ood_repeats_of_every_sample_collapse_to_one_full_draw():
    """Drawing all of two equal-size sets is a permutation: one draw, std exactly 0."""
    from poincare_resnet.evaluation import ood_rows_from_scores

    rng = np.random.default_rng(3)
    s_in, s_out = rng.normal(1.0, 1.0, 500), rng.normal(0.0, 1.0, 500)
    once = ood_rows_from_scores({"energy": s_in}, {"o": {"energy": s_out}})
    many = ood_rows_from_scores({"energy": s_in}, {"o": {"energy": s_out}}, repeats=5, seed=1)
    assert many == once and many[0]["repeats"] == 1 and many[0]["auroc_std"] == 0.0
    # a larger OOD set is still subsampled to the ID size in every repeat: a real spread
    big = ood_rows_from_scores({"energy": s_in}, {"o": {"energy": rng.normal(0, 1, 900)}}, 5)
    assert big[0]["repeats"] == 5 and big[0]["n_out"] == 500 and big[0]["auroc_std"] > 0


def test_ood_command_rows_equal_evaluate_ood(trained_model):
    """The ``ood`` command scores cached outputs; its rows are those of :func:`evaluate_ood`."""
    from poincare_resnet.evaluation.commands import ood_scores_and_rows

    x_in, _ = _separable_data(20, seed=5)
    sets = make_ood_sets(x_in, names=("uniform", "inverted"), seed=0)
    want = evaluate_ood(trained_model, x_in, sets, repeats=3, seed=2, subsample=10)
    rows, in_scores, out_scores = ood_scores_and_rows(
        trained_model, x_in, sets, repeats=3, subsample=10, seed=2
    )
    assert rows == want
    assert set(in_scores) == {"energy", "msp", "feature_norm"}
    assert set(out_scores["msp"]) == {"uniform", "inverted"}


# ----------------------------------------------------------------------------- attacks


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def test_paper_eps_grid():
    np.testing.assert_allclose(np.array(PAPER_FGSM_EPS) * 255, [0.8, 1.6, 2.4, 3.2])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fgsm_pgd_properties(trained_model, mode):
    model = trained_model
    model.train(mode == "train")
    model.conv.eval()  # mixed per-submodule modes must be restored exactly
    flags = [m.training for m in model.modules()]
    x, y = _separable_data(32, seed=3)
    eps = 0.1
    x_f = fgsm(model, x, y, eps)
    x_p = pgd(model, x, y, eps, steps=10, random_start=False)
    x_r = pgd(model, x, y, eps, steps=5, generator=torch.Generator().manual_seed(0))
    assert [m.training for m in model.modules()] == flags
    assert _no_param_grads(model)
    model.eval()
    clean = _loss(model, x, y)
    l_f, l_p, l_r = _loss(model, x_f, y), _loss(model, x_p, y), _loss(model, x_r, y)
    assert clean > 0.05  # trained-ish, not saturated
    assert l_f > 2 * clean and l_p > 2 * clean and l_r > 2 * clean
    assert l_p >= l_f * (1 - 1e-4)  # nearly linear model: FGSM is already (almost) optimal
    for xa in (x_f, x_p, x_r):
        assert (xa - x).abs().max() <= eps + 1e-6
        assert xa.min() >= -1.0 and xa.max() <= 1.0
        assert not xa.requires_grad
    x_r2 = pgd(model, x, y, eps, steps=5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x_r, x_r2)
    torch.testing.assert_close(fgsm(model, x, y, 0.0), x)


def test_robust_accuracy_rows(trained_model):
    x, y = _separable_data(24, seed=4)
    rows = robust_accuracy(trained_model, x, y, "fgsm", [0.0, 0.05, 0.3], batch_size=10)
    assert [r["eps"] for r in rows] == [0.0, 0.05, 0.3]
    assert rows[0]["accuracy"] == rows[0]["clean_accuracy"] > 0.9
    assert rows[2]["accuracy"] <= rows[0]["accuracy"]
    assert rows[1]["eps_255"] == pytest.approx(0.05 * 255)
    assert all(r["attack"] == "fgsm" for r in rows)
    rows_p = robust_accuracy(trained_model, x, y, "pgd", PAPER_FGSM_EPS[:1], batch_size=24, steps=3)
    assert rows_p[0]["attack"] == "pgd" and 0.0 <= rows_p[0]["accuracy"] <= 1.0
    assert _no_param_grads(trained_model)


# ----------------------------------------------------------------------------- explanations


def test_grad_cam_and_saliency_shapes(trained_model):
    x, _ = _separable_data(4, seed=6, size=10)
    trained_model.train()
    cam = grad_cam(trained_model, x)
    sal = input_saliency(trained_model, x, target=1)
    assert trained_model.training and _no_param_grads(trained_model)
    for m in (cam, sal):
        assert m.shape == (4, 10, 10)
        assert m.min() >= 0.0 and m.max() <= 1.0
    assert torch.allclose(sal.flatten(1).amax(1), torch.ones(4))


def test_grad_cam_localises_left_half():
    torch.manual_seed(0)
    model = TinyCNN(in_ch=3, num_classes=3, left_only=True)
    with torch.no_grad():
        model.head.weight[0].fill_(1.0)  # positive channel weights for class 0
    x = torch.rand(3, 3, 12, 12) * 2 - 1
    cam = grad_cam(model, x, target=0)
    assert cam.shape == (3, 12, 12)
    left, total = cam[..., :6].sum(dim=(1, 2)), cam.sum(dim=(1, 2))
    assert (total > 0).all() and (left / total > 0.99).all()
    sal = input_saliency(model, x, target=torch.tensor([0, 1, 2]))
    # logits see the input only through the left half (+ the 3x3 conv's one-pixel halo)
    assert sal[..., 7:].abs().max() == 0.0


# ----------------------------------------------------------------------------- plots / tables


def _is_png(path) -> bool:
    return path.exists() and path.stat().st_size > 100 and path.read_bytes()[:8] == PNG_MAGIC


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    s_in, s_out = rng.normal(1, 1, 50), rng.normal(0, 1, 40)
    fpr, tpr, thr = ood_roc_curve(s_in, s_out)
    paths = [
        plot_roc_curves(
            {"energy": (fpr, tpr, thr), "msp": {"fpr": fpr, "tpr": tpr}}, tmp_path / "roc.png"
        ),
        plot_score_histograms(torch.tensor(s_in), {"noise": s_out}, tmp_path / "h.png", "hist"),
        plot_accuracy_vs_eps(
            [
                {
                    "attack": "fgsm",
                    "eps": e,
                    "eps_255": e * 255,
                    "accuracy": 0.9 - e,
                    "clean_accuracy": 0.95,
                }
                for e in PAPER_FGSM_EPS
            ],
            tmp_path / "eps.png",
        ),
        plot_confusion_matrix(np.array([[5, 1], [2, 7]]), ["a", "b"], tmp_path / "cm.png"),
        plot_training_curves(
            [
                {
                    "epoch": i,
                    "train_loss": 1.0 / (i + 1),
                    "val_loss": 1.2 / (i + 1),
                    "train_acc": 0.5 + 0.1 * i,
                    "val_acc": 0.45 + 0.1 * i,
                    "lr": 0.1,
                }
                for i in range(4)
            ],
            tmp_path / "sub" / "curves.png",
        ),
    ]
    imgs = torch.rand(2, 3, 8, 8) * 2 - 1
    maps = torch.rand(2, 8, 8)
    paths.append(
        plot_explanations(
            imgs,
            {"euclid": (maps, maps), "hyper": torch.stack([maps, maps], 1)},
            tmp_path / "expl.png",
        )
    )
    paths.append(plot_explanations(imgs[:, :1], {"m": maps}, tmp_path / "expl_grey.png"))
    for p in paths:
        assert _is_png(p), p


def test_write_table(tmp_path):
    rows = [
        {"ood_set": "uniform", "auroc": 0.123456789, "n": 10},
        {"ood_set": "digits", "auroc": 12345.678, "n": 20, "extra": "x|y"},
    ]
    md = write_table(rows, tmp_path / "out" / "table_eps0.8")
    with open(tmp_path / "out" / "table_eps0.8.csv", newline="") as fh:
        back = list(csv.DictReader(fh))
    assert [r["ood_set"] for r in back] == ["uniform", "digits"]
    assert float(back[0]["auroc"]) == pytest.approx(0.123456789)
    assert back[0]["extra"] == "" and back[1]["extra"] == "x|y"
    assert (tmp_path / "out" / "table_eps0.8.md").read_text() == md
    lines = md.strip().splitlines()
    assert len(lines) == 4
    assert lines[0] == "| ood_set | auroc | n | extra |"
    assert "0.1235" in lines[2] and "| 10 |" in lines[2]
    assert "1.235e+04" in lines[3]
