"""``poincare-resnet embed``: points inside the unit disk, per-class mean distances to the origin
as the CSV says (recomputed from the features), the projection an isometry on a geodesic
plane, OOD overlay, two runs side by side."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from poincare_resnet import ball, cli
from poincare_resnet.api import load_model
from poincare_resnet.data import load_dataset
from poincare_resnet.evaluation.embed import disk_projection, pooled_features

TINY = [
    "train", "--dataset", "digits", "--limit-train", "96", "--batch-size", "32", "--epochs",
    "1", "--no-progress", "--device", "cpu", "--model-kwargs", "depth=8", "widths=[4,4,4]",
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    p, e = root / "p", root / "e"
    assert cli.main([*TINY, "--out", str(p)]) == 0
    assert cli.main([*TINY, "--model", "euclidean_resnet20", "--out", str(e)]) == 0
    out = root / "out"
    rc = cli.main(["embed", str(p), str(e), "--ood-set", "gaussian", "--limit", "150",
                   "--out", str(out)])  # fmt: skip
    assert rc == 0
    return p, e, out


def _csv(out: Path) -> list[dict]:
    with open(out / "embedding.csv", newline="") as f:
        return list(csv.DictReader(f))


def _disk_dist(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Distance on the unit Poincaré disk (curvature −1), the arcosh formula."""
    num = 2 * ((p - q) ** 2).sum(-1)
    den = (1 - (p**2).sum(-1)) * (1 - (q**2).sum(-1))
    return torch.acosh(1 + num / den)


def test_outputs_and_points_strictly_inside_the_unit_disk(runs):
    _, _, out = runs
    assert (out / "embedding.png").stat().st_size > 10_000
    rows = _csv(out)
    # two runs × (150 test + 150 gaussian)
    assert len(rows) == 2 * 300
    r2 = torch.tensor([float(r["x"]) ** 2 + float(r["y"]) ** 2 for r in rows], dtype=torch.float64)
    assert float(r2.max()) < 1.0
    assert {r["split"] for r in rows} == {"test", "ood:gaussian"}
    assert all(r["label"] == "-1" for r in rows if r["split"] != "test")


def test_class_means_of_distance_to_origin_are_what_the_csv_says(runs):
    p, e, out = runs
    rows = _csv(out)
    summary = json.loads((out / "embedding_summary.json").read_text())
    data = load_dataset("digits")
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data.test_y), generator=gen)[:150].sort().values
    x, y = data.test_x[idx], data.test_y[idx]
    for i, run in enumerate((p, e)):
        model, _ = load_model(run)
        feats = pooled_features(model, x)
        if summary[i]["hyperbolic"]:
            # d(0, expmap0(v)) = 2‖v‖ for every c (independent of the ball route)
            d = 2 * feats.norm(dim=1)
        else:
            # Euclidean: f scaled by 1/mean‖f‖, expmap0 at c = 1
            s = 1 / feats.norm(dim=1).mean()
            assert summary[i]["feature_scale"] == pytest.approx(float(s), rel=1e-12)
            d = 2 * (s * feats).norm(dim=1)
        mine = [r for r in rows if r["run"] == str(i) and r["split"] == "test"]
        assert [int(r["label"]) for r in mine] == y.tolist()
        csv_d = torch.tensor([float(r["dist_to_origin"]) for r in mine], dtype=torch.float64)
        torch.testing.assert_close(csv_d, d, rtol=1e-6, atol=1e-9)
        for k, name in enumerate(data.class_names):
            if not (y == k).any():
                continue
            from_csv = float(csv_d[y == k].mean())
            assert summary[i]["mean_dist_to_origin"][name] == pytest.approx(from_csv, rel=1e-9)
            assert from_csv == pytest.approx(float(d[y == k].mean()), rel=1e-6)


@pytest.mark.parametrize("center", ["frechet", "origin"])
@pytest.mark.parametrize("c", [0.1, 1.0])
def test_projection_is_an_isometry_on_a_geodesic_plane(center, c):
    # points of a 2-D plane through the origin (totally geodesic) embedded in R^6
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64))
    v = torch.randn(40, 2, dtype=torch.float64) * (0.8 / c**0.5) + 0.5 / c**0.5
    z = ball.expmap0(v @ q.T, c=c)
    p, info = disk_projection(z, c, center)
    assert float((p**2).sum(1).max()) < 1
    i, j = torch.triu_indices(40, 40, 1)
    want = math.sqrt(c) * ball.dist(z[i], z[j], c=c)
    torch.testing.assert_close(_disk_dist(p[i], p[j]), want, rtol=1e-7, atol=1e-9)
    assert float(info["explained"].sum()) == pytest.approx(1.0, abs=1e-9)
    if center == "frechet":
        # the Fréchet mean lands at the disk's centre, the ball origin at √c·d(μ, 0) from it
        mu = info["mu"]
        assert float(ball.logmap(mu.expand_as(z), z, c=c).mean(0).norm()) < 1e-8
        o = info["origin"]
        d_o = _disk_dist(o[None], torch.zeros(1, 2, dtype=torch.float64))
        want_o = math.sqrt(c) * ball.dist(mu, torch.zeros_like(mu), c=c)
        assert float(d_o) == pytest.approx(float(want_o), rel=1e-7)


def test_projection_differs_from_a_euclidean_pca():
    # the naive map (PCA of ball coordinates) does not keep hyperbolic distances
    torch.manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(5, 2, dtype=torch.float64))
    z = ball.expmap0((torch.randn(30, 2, dtype=torch.float64) * 0.5 + 0.3) @ q.T, c=1.0)
    naive = z @ q
    i, j = torch.triu_indices(30, 30, 1)
    err = (_disk_dist(naive[i], naive[j]) - ball.dist(z[i], z[j], c=1.0)).abs().max()
    assert float(err) < 1e-9  # a plane through the origin: both agree ...
    z2 = ball.mobius_add(ball.expmap0(torch.full((5,), 0.4, dtype=torch.float64), c=1.0), z, c=1.0)
    p2, _ = disk_projection(z2, 1.0, "frechet")  # ... after a translation only ours does
    torch.testing.assert_close(_disk_dist(p2[i], p2[j]), ball.dist(z2[i], z2[j], c=1.0))
    naive2 = (z2 - z2.mean(0)) @ torch.linalg.svd(z2 - z2.mean(0), full_matrices=False)[2][:2].T
    err2 = (_disk_dist(naive2[i], naive2[j]) - ball.dist(z2[i], z2[j], c=1.0)).abs().max()
    assert float(err2) > 1e-2


def test_bad_input_is_refused(runs, tmp_path, capsys):
    p, _, _ = runs
    assert cli.main(["embed", str(tmp_path / "none")]) == cli.EXIT_BAD_INPUT
    assert cli.main(["embed", str(p), "--ood-set", "nosuchset"]) == cli.EXIT_BAD_INPUT
    assert "nosuchset" in capsys.readouterr().err
    with pytest.raises(ValueError, match="center"):
        disk_projection(torch.zeros(3, 2, dtype=torch.float64), 1.0, "median")
