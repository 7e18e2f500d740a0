"""``init-norms``: tangent-norm propagation through deep stacks of Poincaré layers at init.

Stacks of ``depth`` square :class:`PoincareLinear` layers (``features`` wide) and
:class:`PoincareConv2d` layers (for each of ``channels`` channel counts, 3×3, padding 1, on a
``size × size`` map) are initialised with ``identity`` (the paper's ½·I), ``center`` (centre-tap
identity, not the paper's), ``hnn`` (HNN++ normal), ``identity`` with the official code's
conformal-factor bug (``legacy_lambda=True``) and ``identity-compensated`` (a centre-tap identity
scaled by :func:`~poincare_resnet.nn.compensated_gain`, not the paper's). Random tangent inputs
(isotropic directions) have norm ``input_norm`` (per vector, per pixel for the convolutions;
default :data:`~poincare_resnet.nn.init.COMPENSATED_NORM` = 0.5, the RMS tangent norm after a
batch norm); after each layer the mean tangent norm is divided by the input's.

Of the paper's inits none keeps norms through 3×3 convolutions: the β-concatenation scales each
patch by ``s ≈ 1/3``, so the centre-tap identity shrinks the tangent norm about 3× per layer, and
the flat ½·I (the paper's) reads channel 0 at shifted taps, moving the map off the zero-padded
border (in the networks, batch norm after every convolution restores the scale). The compensated
centre tap keeps it: its scale undoes ``s`` and the FC map's non-linearity at the operating norm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..evaluation.tables import write_table_atomic as write_table
from ..nn import PoincareConv2d, PoincareLinear
from ..nn.init import COMPENSATED_NORM
from .common import (
    Log,
    as_tuple,
    mean_tangent_norm,
    new_figure,
    pick,
    save_figure,
    torch_threads,
    write_json,
)

SLUG = "init_norms"
VARIANTS: tuple[tuple[str, str, bool], ...] = (
    ("identity", "identity", False),
    ("center", "center", False),
    ("hnn", "hnn", False),
    ("identity (legacy λ)", "identity", True),
    ("identity-compensated", "identity-compensated", False),
)
STYLES = ("-", "--", "-", "-", "-.")  # one per variant in the figure


def _random_tangents(
    shape: tuple[int, ...], dim: int, norm: float, gen: torch.Generator
) -> torch.Tensor:
    """Gaussian directions scaled to tangent norm ``norm`` along ``dim`` (float64)."""
    u = torch.randn(shape, generator=gen, dtype=torch.float64)
    return norm * u / torch.linalg.vector_norm(u, dim=dim, keepdim=True)


@torch.no_grad()
def norm_profile(
    layers: list[torch.nn.Module], u: torch.Tensor, dim: int
) -> tuple[list[float], torch.Tensor]:
    """Mean tangent norm after each layer relative to the input's (entry 0 is the input: 1).

    Parameters
    ----------
    layers : list of nn.Module
        Applied in order.
    u : Tensor
        The input tangent vectors.
    dim : int
        Their axis.

    Returns
    -------
    tuple
        ``len(layers) + 1`` ratios, and the last layer's output.
    """
    base = mean_tangent_norm(u, dim)
    out = [1.0]
    for layer in layers:
        u = layer(u)
        out.append(mean_tangent_norm(u, dim) / base)
    return out, u


def interior(u: torch.Tensor) -> torch.Tensor:
    """The central half (in height and width) of a ``[B, C, H, W]`` map; vectors unchanged."""
    if u.dim() != 4:
        return u
    h, w = u.shape[-2:]
    return u[..., h // 4 : h - h // 4, w // 4 : w - w // 4]


def run(
    out_dir: str | Path,
    tiny: bool = False,
    *,
    depth: int | None = None,
    features: int = 32,
    channels: Any = None,
    size: int = 16,
    batch: int | None = None,
    input_norm: float = COMPENSATED_NORM,
    c: float = 0.1,
    dtype: str = "float32",
    seed: int = 0,
    threads: int | None = None,
    log: Log = print,
) -> list[dict[str, Any]]:
    """Relative tangent norm per layer for every (layer stack, init); table + figure.

    Parameters
    ----------
    out_dir, tiny, log
        The output directory of the init-norms table, figure and summary; tiny sizes (the
        ``None`` defaults depend on it); the progress log.
    depth, features, channels, size, batch, input_norm, c, dtype
        The layer stacks (``channels``: one conv stack per channel count, default 16 and 64) and
        their input.
    seed, threads
        Seed and torch CPU threads.

    Returns
    -------
    list of dict
        The table rows, one per (layer stack, init).
    """
    out = Path(out_dir)
    depth = int(pick(depth, 50, 10, tiny))
    batch = int(pick(batch, 64, 8, tiny))
    channels = as_tuple(pick(channels, (16, 64), (16,), tiny))
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    dt = {"float32": torch.float32, "float64": torch.float64}.get(dtype)
    if dt is None:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    gen = torch.Generator().manual_seed(seed)
    stacks = [("linear", features, (batch, features), -1)]
    stacks += [("conv", ch, (batch, ch, size, size), 1) for ch in channels]
    rows: list[dict[str, Any]] = []
    curves: dict[tuple[str, int], dict[str, list[float]]] = {}
    with torch_threads(threads):
        for kind, width, shape, dim in stacks:
            u = _random_tangents(shape, dim, input_norm, gen).to(dt)
            curves[kind, width] = {}
            for label, init, legacy in VARIANTS:
                torch.manual_seed(seed)
                layers = _layer_stack(kind, init, legacy, depth, width, c)
                prof, last = norm_profile([m.to(dt) for m in layers], u, dim)
                centre = mean_tangent_norm(interior(last), dim) / mean_tangent_norm(u, dim)
                curves[kind, width][label] = prof
                rows.append(
                    {
                        "layer": kind,
                        "init": label,
                        "depth": depth,
                        "width": width,
                        "input_norm": mean_tangent_norm(u, dim),
                        "relative_norm": prof[-1],
                        "interior_relative_norm": centre,
                        "min_relative_norm": min(prof),
                        "max_relative_norm": max(prof),
                    }
                )
    write_table(rows, out / SLUG)
    _figure(curves, size, out / f"{SLUG}.png")
    _write_summary(out, curves, depth, log)
    return rows


def _layer_stack(
    kind: str, init: str, legacy: bool, depth: int, width: int, c: float
) -> list[torch.nn.Module]:
    """``depth`` fresh square Poincaré linear (``kind="linear"``) or 3×3 conv layers."""
    if kind == "linear":
        return [
            PoincareLinear(width, width, c=c, init=init, legacy_lambda=legacy) for _ in range(depth)
        ]
    return [
        PoincareConv2d(width, width, 3, padding=1, c=c, init=init, legacy_lambda=legacy)
        for _ in range(depth)
    ]


def _figure(curves: dict[tuple[str, int], dict[str, list[float]]], size: int, path: Path) -> None:
    """Relative tangent norm per layer, one panel per layer stack."""
    fig, axes = new_figure(len(curves))
    for ax, ((kind, width), by_init) in zip(axes, curves.items(), strict=True):
        for (label, prof), style in zip(by_init.items(), STYLES, strict=True):
            ys = [p if p > 0 else float("nan") for p in prof]  # exact zeros: not drawn on log y
            ax.plot(range(len(prof)), ys, ls=style, label=label)
        title = f"{width} features" if kind == "linear" else f"{width} ch 3×3, {size}×{size}"
        ax.set(
            yscale="log",
            xlabel="layer",
            ylabel="mean tangent norm / input's",
            title=f"Poincaré {kind} ({title})",
        )
        ax.axhline(1.0, color="grey", lw=0.6, ls=":")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def _write_summary(
    out: Path, curves: dict[tuple[str, int], dict[str, list[float]]], depth: int, log: Log
) -> None:
    """The summary: the linear stack's final relative norm under the identity and HNN++ inits,
    and each conv stack's under the compensated and the paper's flat identity."""
    linear = next(v for (kind, _), v in curves.items() if kind == "linear")
    ident, hnn = linear["identity"][-1], linear["hnn"][-1]
    conv = {w: v for (kind, w), v in curves.items() if kind == "conv"}
    compensated = {w: v["identity-compensated"][-1] for w, v in conv.items()}
    summary = {
        "depth": depth,
        "identity_linear_relative_norm": ident,
        "hnn_linear_relative_norm": hnn,
        "identity_within_5pct": abs(ident - 1) <= 0.05,
        "hnn_below_1pct": hnn < 0.01,
        "compensated_conv_relative_norm": compensated,
        "identity_conv_relative_norm": {w: v["identity"][-1] for w, v in conv.items()},
        "compensated_conv_within_10pct": all(abs(r - 1) <= 0.1 for r in compensated.values()),
    }
    write_json(out / f"{SLUG}_summary.json", summary)
    log(
        f"init-norms: after {depth} PoincareLinear layers the identity init keeps "
        f"{ident * 100:.3f} % of the input tangent norm, HNN++ init {hnn * 100:.3g} %"
    )
    for w, r in compensated.items():
        log(
            f"init-norms: after {depth} 3×3 PoincareConv2d layers ({w} channels) the "
            f"identity-compensated init keeps {r * 100:.1f} %, the paper's identity "
            f"{conv[w]['identity'][-1] * 100:.3g} %"
        )
