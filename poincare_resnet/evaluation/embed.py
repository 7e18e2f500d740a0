"""``poincare-resnet embed RUN [RUN_B]``: pooled features on the Poincaré disk.

**Projection: tangent PCA at the Fréchet mean.** The test set's pooled features ``v`` (tangent
vectors at the origin) are mapped to the ball, ``z = expmap0(v)`` at the model's curvature c.
With μ the Fréchet mean of the in-distribution points, ``u = logmap_μ(z)`` are tangent vectors
at μ, and ``e₁, e₂`` the two leading principal directions of the ``u`` (uncentred: their mean
is zero at the Fréchet mean). The Möbius translation ``x ↦ (−μ) ⊕ x`` is an isometry taking μ
to the origin with differential ``(λ_μ/2)·I`` there, so the point of the geodesic plane
``expmap_μ(span(e₁, e₂))`` with coordinates ``a = (⟨u, e₁⟩, ⟨u, e₂⟩)`` sits at

``p = √c · expmap0((λ_μ/2) a) = tanh(√c λ_μ ‖a‖/2) a/‖a‖``

on the unit disk (scaled from the radius-1/√c disk by √c, so the disk has curvature −1 and
distances are √c times the ball's). Distances from μ are kept exactly
(``d_disk(0, p) = √c·d(μ, z)`` when ``u`` lies in the plane) and the whole map is an isometry
for points in a 2-D geodesic plane; the image of the ball's origin is marked. ``center =
"origin"`` does the same at the origin (PCA of the features themselves, then ``expmap0``).

**Distance to the origin** is the hyperbolic distance ``d(0, z) = (2/√c) artanh(√c‖z‖)``
(``= 2‖v‖``) in the full feature space, per point, with the per-class means.

**Euclidean runs** (no curvature): the features ``f`` are scaled by ``s = 1/mean‖f‖`` over the
in-distribution set and read as tangent vectors at the origin of the unit ball (c = 1),
``z = expmap0(s f)``; then the same projection. Hybrid runs use their head's curvature.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import ball
from ..ball.frechet import frechet_mean

__all__ = ["CENTERS", "disk_projection", "model_curvature", "pooled_features", "run_embed"]

CENTERS = ("frechet", "origin")


@torch.no_grad()
def pooled_features(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """``model.forward_features`` of ``x`` in eval mode, as float64 on the CPU, ``[N, D]``."""
    from .ood import eval_mode

    p = next(iter(model.parameters()))
    out = []
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(device=p.device, dtype=p.dtype)
            out.append(model.forward_features(xb).double().cpu())
    return torch.cat(out)


def model_curvature(model: nn.Module) -> float | None:
    """The curvature c of a Poincaré or hybrid model (its ``curvature`` module), else None."""
    cur = getattr(model, "curvature", None)
    if cur is None:
        return None
    return float(torch.as_tensor(cur()).detach())


def _pca_basis(u: Tensor, k: int = 2) -> tuple[Tensor, Tensor]:
    """Leading ``k`` right singular vectors of ``u [N, D]`` (uncentred) and the fraction of
    ``Σ‖u‖²`` they capture (per direction). D < k is padded with zero directions."""
    _, s, vh = torch.linalg.svd(u, full_matrices=False)
    basis = torch.zeros(k, u.shape[1], dtype=u.dtype)
    m = min(k, vh.shape[0])
    basis[:m] = vh[:m]
    # a sign convention, so that repeated runs draw the same picture
    signs = torch.sign(basis.sum(1, keepdim=True))
    basis = basis * torch.where(signs == 0, torch.ones_like(signs), signs)
    energy = s**2 / (s**2).sum().clamp_min(1e-300)
    frac = torch.zeros(k, dtype=u.dtype)
    frac[:m] = energy[:m]
    return basis, frac


def disk_projection(
    z: Tensor, c: float, center: str = "frechet", fit: Tensor | None = None
) -> tuple[Tensor, dict[str, Any]]:
    """Project ball points ``z [N, D]`` (curvature −c) onto the unit Poincaré disk.

    Tangent PCA at ``μ`` (the Fréchet mean of ``fit``, default ``z``; or the origin for
    ``center="origin"``): ``a = (⟨logmap_μ(z), e₁⟩, ⟨logmap_μ(z), e₂⟩)`` and
    ``p = tanh(√c λ_μ ‖a‖/2) a/‖a‖``. Returns ``(p [N, 2], info)`` with ``info`` holding
    ``mu``, ``basis [2, D]``, ``explained`` (fractions of ``Σ‖logmap_μ‖²``) and ``origin``
    (the disk position of the ball's origin). Computed in float64; ``‖p‖ < 1``.
    """
    if center not in CENTERS:
        raise ValueError(f"center must be one of {CENTERS}, got {center!r}")
    z = z.double()
    fit = z if fit is None else fit.double()
    if center == "frechet":
        mu = frechet_mean(fit, c=c, iters=200, tol=1e-12)
    else:
        mu = torch.zeros(z.shape[1], dtype=torch.float64)
    lam = float(ball.conformal_factor(mu, c=c, keepdim=False))
    basis, frac = _pca_basis(ball.logmap(mu.expand_as(fit), fit, c=c))

    def to_disk(points: Tensor) -> Tensor:
        u = ball.logmap(mu.expand_as(points), points, c=c)
        a = u @ basis.T
        w = (lam / 2) * a
        return ball.project(ball.expmap0(w, c=c) * c**0.5, c=1.0, eps=1e-9)

    origin = to_disk(torch.zeros(1, z.shape[1], dtype=torch.float64))[0]
    info = {"mu": mu, "basis": basis, "explained": frac, "origin": origin}
    return to_disk(z), info


def _ball_points(feats: Tensor, c: float | None, ref: Tensor) -> tuple[Tensor, float, float]:
    """``(z, c, scale)``: ``expmap0(scale·f)`` with ``scale = 1`` for a hyperbolic model, and
    ``1/mean‖f_ref‖`` at c = 1 for a Euclidean one."""
    if c is None:
        scale = 1.0 / float(ref.norm(dim=1).mean().clamp_min(1e-12))
        c = 1.0
    else:
        scale = 1.0
    return ball.expmap0(feats * scale, c=c), c, scale


def _embed_one(
    checkpoint: str | Path,
    ood_set: str | None,
    limit: int | None,
    seed: int,
    center: str,
    data_dir: str | None,
    device: str,
) -> dict[str, Any]:
    from .commands import load_checkpoint_data, resolve_ood_sets

    model, meta, data = load_checkpoint_data(checkpoint, data_dir, device)
    x, y = data.test_x, data.test_y
    if limit is not None and limit < len(y):
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:limit]
        x, y = x[idx.sort().values], y[idx.sort().values]
    feats = pooled_features(model, x)
    c = model_curvature(model)
    z, c_used, scale = _ball_points(feats, c, feats)
    p, info = disk_projection(z, c_used, center)
    dist0 = ball.dist(torch.zeros_like(z), z, c=c_used)
    rows = {
        "x": p[:, 0],
        "y": p[:, 1],
        "label": y.long(),
        "dist_to_origin": dist0,
        "split": ["test"] * len(y),
    }
    ood_name = None
    if ood_set:
        ood_x = next(iter(resolve_ood_sets([ood_set], x, seed).items()))
        ood_name, ox = ood_x
        of = pooled_features(model, ox)
        oz = ball.expmap0(of * scale, c=c_used)
        op, _ = disk_projection(oz, c_used, center, fit=z)
        rows["x"] = torch.cat([rows["x"], op[:, 0]])
        rows["y"] = torch.cat([rows["y"], op[:, 1]])
        rows["label"] = torch.cat([rows["label"], torch.full((len(ox),), -1)])
        rows["dist_to_origin"] = torch.cat([dist0, ball.dist(torch.zeros_like(oz), oz, c=c_used)])
        rows["split"] += [f"ood:{ood_name}"] * len(ox)
    per_class = {
        name: float(dist0[y == k].mean())
        for k, name in enumerate(data.class_names)
        if (y == k).any()
    }
    return {
        "run": str(checkpoint),
        "model": meta.get("model_name"),
        "hyperbolic": c is not None,
        "c": c_used,
        "feature_scale": scale,
        "center": center,
        "explained_variance": [float(v) for v in info["explained"]],
        "origin_on_disk": [float(v) for v in info["origin"]],
        "class_names": list(data.class_names),
        "mean_dist_to_origin": per_class,
        "ood_set": ood_name,
        "rows": rows,
    }


def _write_csv(results: Sequence[dict[str, Any]], path: Path) -> None:
    lines = ["run,model,x,y,label,class,dist_to_origin,split"]
    for i, r in enumerate(results):
        rows, names = r["rows"], r["class_names"]
        for j in range(len(rows["split"])):
            lab = int(rows["label"][j])
            cls = names[lab] if lab >= 0 else ""
            lines.append(
                f"{i},{r['model']},{float(rows['x'][j])!r},{float(rows['y'][j])!r},{lab},"
                f'"{cls}",{float(rows["dist_to_origin"][j])!r},{rows["split"][j]}'
            )
    path.write_text("\n".join(lines) + "\n")


def _plot(results: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(2, n, figsize=(5.2 * n, 9.5), squeeze=False,
                             gridspec_kw={"height_ratios": [1.15, 1]})  # fmt: skip
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(results):
        ax, bx = axes[0, i], axes[1, i]
        rows = r["rows"]
        split = np.array(rows["split"])
        lab = rows["label"].numpy()
        xs, ys = rows["x"].numpy(), rows["y"].numpy()
        ax.add_patch(plt.Circle((0, 0), 1.0, fill=False, color="0.3", lw=1))
        test = split == "test"
        for k, name in enumerate(r["class_names"]):
            m = test & (lab == k)
            ax.scatter(xs[m], ys[m], s=4, color=cmap(k % 10), label=name, alpha=0.7, lw=0)
        if r["ood_set"]:
            m = ~test
            ax.scatter(xs[m], ys[m], s=6, color="k", marker="x", lw=0.5, alpha=0.6,
                       label=f"OOD: {r['ood_set']}")  # fmt: skip
        o = r["origin_on_disk"]
        ax.scatter([o[0]], [o[1]], s=60, marker="+", color="k", lw=1.5, label="ball origin")
        ax.set_xlim(-1.02, 1.02)
        ax.set_ylim(-1.02, 1.02)
        ax.set_aspect("equal")
        ax.set_axis_off()
        kind = f"c = {r['c']:.3g}" if r["hyperbolic"] else "Euclidean features, expmap0 at c = 1"
        ev = sum(r["explained_variance"]) * 100
        where = "Fréchet mean" if r["center"] == "frechet" else "origin"
        ax.set_title(f"{r['model']}\n{kind}; tangent PCA at the {where} ({ev:.0f} %)",
                     fontsize=9)  # fmt: skip
        ax.legend(fontsize=6, markerscale=2, loc="lower left", bbox_to_anchor=(0.9, 0.0))
        groups = [rows["dist_to_origin"][torch.as_tensor(test) & (rows["label"] == k)].numpy()
                  for k in range(len(r["class_names"]))]  # fmt: skip
        labels = list(r["class_names"])
        if r["ood_set"]:
            groups.append(rows["dist_to_origin"][torch.as_tensor(~test)].numpy())
            labels.append(f"OOD: {r['ood_set']}")
        keep = [j for j, g in enumerate(groups) if len(g)]
        major_minor = tuple(int(v) for v in matplotlib.__version__.split(".")[:2])
        horizontal = {"orientation": "horizontal"} if major_minor >= (3, 10) else {"vert": False}
        bx.boxplot([groups[j] for j in keep], showfliers=False, **horizontal)
        bx.set_yticks(range(1, len(keep) + 1), [labels[j] for j in keep], fontsize=7)
        means = [float(np.mean(groups[j])) for j in keep]
        bx.scatter(means, range(1, len(keep) + 1), marker="D", s=12, color="C3", label="mean",
                   zorder=3)  # fmt: skip
        bx.set_xlabel("hyperbolic distance to the origin d(0, z)")
        bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_embed(
    checkpoints: Sequence[str | Path],
    out: str | Path,
    ood_set: str | None = None,
    limit: int | None = 2000,
    seed: int = 0,
    center: str = "frechet",
    data_dir: str | None = None,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Embed one or more runs side by side; writes ``embedding.png``, ``embedding.csv``
    (``run, model, x, y, label, class, dist_to_origin, split``; ``label = -1`` and
    ``split = ood:<name>`` for the OOD set) and ``embedding_summary.json`` to ``out``.

    Parameters
    ----------
    checkpoints : sequence of paths
        Run directories or ``.safetensors`` files (one column each).
    ood_set : str, optional
        A builtin OOD set (``gaussian``, ``uniform``, ``inverted``, ``hflip``, ``vflip``,
        ``digits``) or an image directory / CIFAR-format file, overlaid in black.
    limit : int, optional
        Embed a seeded random subset of this many test images (``None``: all).
    center : {"frechet", "origin"}
        Where the tangent PCA is taken (see the module docstring).
    """
    if not checkpoints:
        raise ValueError("embed needs at least one run")
    if limit is not None and limit < 2:
        raise ValueError(f"--limit must be >= 2, got {limit}")
    out = Path(out)
    results = [_embed_one(ck, ood_set, limit, seed, center, data_dir, device) for ck in checkpoints]
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(results, out / "embedding.csv")
    _plot(results, out / "embedding.png")
    summary = [{k: v for k, v in r.items() if k != "rows"} for r in results]
    (out / "embedding_summary.json").write_text(json.dumps(summary, indent=2))
    return results
