"""Poincaré-ball operations as pure functions.

The ball of curvature −c (c > 0) is ``B = {x : c‖x‖² < 1}``. Every function takes the curvature as
keyword ``c`` (a Python float, or a scalar tensor that may require grad) and the manifold axis as
keyword ``dim`` (default −1); any other axes are batch axes. Points outside the ball are not
rejected: maps whose formula needs ``√c‖x‖ < 1`` (``logmap0``, ``dist``, ``logmap``,
``mobius_scalar_mul``, the FC maps) clamp it to ``1 − ε``, and results that are ball points are
projected to ``‖x‖ ≤ (1 − ε)/√c`` (see :mod:`poincare_resnet.ball.config`), as the reference
systems do (``mobius_add`` projects its result, not its inputs). NaN inputs propagate (checking
them would need a host sync); :func:`check_point` validates explicitly.

The hot operations (``expmap0``, ``logmap0``, ``mobius_add``, ``fully_connected`` and the
tangent-form FC used by the layers) run hand-written backward passes unless
``config.set_manual_backward(False)`` selects plain autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _autograd as F
from ._autograd import _sqrt
from .config import MIN_NORM, get_eps, manual_backward_enabled, max_tangent_radius

Curvature = float | Tensor

__all__ = [
    "check_curvature",
    "check_point",
    "project",
    "conformal_factor",
    "expmap0",
    "logmap0",
    "expmap",
    "logmap",
    "mobius_add",
    "mobius_scalar_mul",
    "dist",
    "gyration",
    "transport",
    "gyromidpoint",
    "hyperplane_distances",
    "fully_connected",
    "fc_tangent",
]


# ------------------------------------------------------------------------------ validation


def check_curvature(c: Curvature, like: Tensor | None = None) -> Curvature:
    """Validate ``c`` (finite, > 0) and return it as a float or a tensor of ``like``'s dtype.

    A tensor ``c`` must be a scalar. Its value is checked only for CPU tensors that do not
    require grad: reading a GPU tensor would synchronise with the host, and a learnable
    curvature (:class:`poincare_resnet.nn.Curvature`) is positive by construction (softplus),
    so hot paths never read it back.
    """
    if isinstance(c, Tensor):
        if c.numel() != 1:
            raise ValueError(
                f"curvature c must be a scalar, got a tensor of shape {tuple(c.shape)}"
            )
        if (
            c.device.type == "cpu"
            and not c.requires_grad
            and not torch.compiler.is_compiling()
            and not (math.isfinite(float(c.detach())) and float(c.detach()) > 0)
        ):
            raise ValueError(f"curvature c must be finite and > 0, got {float(c.detach())!r}")
        if c.dim():  # a one-element tensor of shape (1,), (1, 1), …: must not broadcast x up
            c = c.reshape(())
        if like is not None and c.dtype != like.dtype:
            c = c.to(like.dtype)
        return c
    try:
        value = float(c)
    except (TypeError, ValueError):
        raise TypeError(f"curvature c must be a float or a scalar tensor, got {c!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"curvature c must be finite and > 0, got {value!r}")
    return value


def _check_pair(x: Tensor, y: Tensor, dim: int, names: str = "x and y") -> None:
    if x.dim() == 0 or y.dim() == 0:
        raise ValueError(
            f"{names} must have a manifold axis, got shapes {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if x.shape[dim] != y.shape[dim]:
        raise ValueError(
            f"{names} must have the same size along the manifold axis dim={dim}, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    try:
        torch.broadcast_shapes(x.shape, y.shape)
    except RuntimeError:
        raise ValueError(
            f"{names} have shapes {tuple(x.shape)} and {tuple(y.shape)} that do not broadcast"
        ) from None


def check_point(x: Tensor, *, c: Curvature, dim: int = -1, name: str = "x") -> None:
    """Raise ``ValueError`` if ``x`` holds NaN/Inf or points outside the open ball.

    This reads values back to the host: call it at API boundaries, not in hot paths.
    """
    c = check_curvature(c)
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    radius = 1.0 / math.sqrt(float(c))
    norms = x.norm(dim=dim)
    outside = int((norms >= radius).sum())
    if outside:
        raise ValueError(
            f"{name} has {outside} point(s) outside the Poincaré ball of radius 1/√c = "
            f"{radius:.6g} (largest norm {float(norms.max()):.6g})"
        )


def _norm(x: Tensor, dim: int) -> Tensor:
    return x.norm(dim=dim, keepdim=True).clamp_min(MIN_NORM)


def _sq(x: Tensor, dim: int) -> Tensor:
    return x.pow(2).sum(dim, keepdim=True)


def _dot(x: Tensor, y: Tensor, dim: int) -> Tensor:
    return (x * y).sum(dim, keepdim=True)


# ------------------------------------------------------------------------------ basic maps


def project(x: Tensor, *, c: Curvature, dim: int = -1, eps: float | None = None) -> Tensor:
    """Project onto the ball: ``x · min(1, (1 − ε)/(√c‖x‖))``."""
    c = check_curvature(c, x)
    eps = get_eps(x.dtype) if eps is None else eps
    radius = (1 - eps) / _sqrt(c)
    norm = _norm(x, dim)
    return torch.where(norm > radius, x / norm * radius, x)


def conformal_factor(x: Tensor, *, c: Curvature, dim: int = -1, keepdim: bool = True) -> Tensor:
    """``λ_x = 2 / (1 − c‖x‖²)`` (the official code's ``2·(1 − c‖x‖²)`` is a bug)."""
    c = check_curvature(c, x)
    lam = 2 / (1 - c * _sq(x, dim)).clamp_min(MIN_NORM)
    return lam if keepdim else lam.squeeze(dim)


def _expmap0_ref(v: Tensor, c: Curvature, dim: int) -> Tensor:
    sc = _sqrt(c)
    n = _norm(v, dim)
    t = (sc * n).clamp_max(max_tangent_radius(v.dtype))
    return torch.tanh(t) * v / (sc * n)


def _logmap0_ref(y: Tensor, c: Curvature, dim: int) -> Tensor:
    sc = _sqrt(c)
    n = _norm(y, dim)
    s = (sc * n).clamp_max(1 - get_eps(y.dtype))
    return torch.atanh(s) * y / (sc * n)


def expmap0(v: Tensor, *, c: Curvature, dim: int = -1) -> Tensor:
    """``expmap0(v) = tanh(√c‖v‖) · v / (√c‖v‖)``, with ``√c‖v‖`` capped at ``artanh(1 − ε)``."""
    c = check_curvature(c, v)
    if manual_backward_enabled():
        return F.RadialMap.apply(v, c, dim, "exp")
    return _expmap0_ref(v, c, dim)


def logmap0(y: Tensor, *, c: Curvature, dim: int = -1) -> Tensor:
    """``logmap0(y) = artanh(√c‖y‖) · y / (√c‖y‖)``, ``y`` projected onto the ball first."""
    c = check_curvature(c, y)
    if manual_backward_enabled():
        return F.RadialMap.apply(y, c, dim, "log")
    return _logmap0_ref(y, c, dim)


def _mobius_add_ref(x: Tensor, y: Tensor, c: Curvature, dim: int) -> Tensor:
    xy, x2, y2 = _dot(x, y, dim), _sq(x, dim), _sq(y, dim)
    num = (1 + 2 * c * xy + c * y2) * x + (1 - c * x2) * y
    den = (1 + 2 * c * xy + c * c * x2 * y2).clamp_min(MIN_NORM)
    return project(num / den, c=c, dim=dim)


def mobius_add(x: Tensor, y: Tensor, *, c: Curvature, dim: int = -1) -> Tensor:
    """``x ⊕ y = ((1 + 2c⟨x,y⟩ + c‖y‖²) x + (1 − c‖x‖²) y) / (1 + 2c⟨x,y⟩ + c²‖x‖²‖y‖²)``.

    The result is projected onto the ball.
    """
    c = check_curvature(c, x)
    _check_pair(x, y, dim)
    if manual_backward_enabled():
        return F.MobiusAdd.apply(x, y, c, dim)
    return _mobius_add_ref(x, y, c, dim)


def mobius_scalar_mul(r: Tensor | float, x: Tensor, *, c: Curvature, dim: int = -1) -> Tensor:
    """``r ⊗ x = tanh(r · artanh(√c‖x‖)) · x / (√c‖x‖)``."""
    c = check_curvature(c, x)
    sc = _sqrt(c)
    n = _norm(x, dim)
    s = (sc * n).clamp_max(1 - get_eps(x.dtype))
    return project(torch.tanh(r * torch.atanh(s)) * x / (sc * n), c=c, dim=dim)


def dist(x: Tensor, y: Tensor, *, c: Curvature, dim: int = -1, keepdim: bool = False) -> Tensor:
    """``d(x, y) = (2/√c) · artanh(√c ‖(−x) ⊕ y‖)``."""
    c = check_curvature(c, x)
    _check_pair(x, y, dim)
    sc = _sqrt(c)
    m = _norm(mobius_add(-x, y, c=c, dim=dim), dim)
    d = 2 / sc * torch.atanh((sc * m).clamp_max(1 - get_eps(x.dtype)))
    return d if keepdim else d.squeeze(dim)


def expmap(x: Tensor, v: Tensor, *, c: Curvature, dim: int = -1) -> Tensor:
    """``expmap_x(v) = x ⊕ (tanh(√c λ_x ‖v‖ / 2) · v / (√c‖v‖))``."""
    c = check_curvature(c, x)
    _check_pair(x, v, dim, "x and v")
    sc = _sqrt(c)
    n = _norm(v, dim)
    lam = conformal_factor(x, c=c, dim=dim)
    t = (sc * lam * n / 2).clamp_max(max_tangent_radius(x.dtype))
    return mobius_add(x, torch.tanh(t) * v / (sc * n), c=c, dim=dim)


def logmap(x: Tensor, y: Tensor, *, c: Curvature, dim: int = -1) -> Tensor:
    """``logmap_x(y) = (2/(√c λ_x)) · artanh(√c‖m‖) · m/‖m‖`` with ``m = (−x) ⊕ y``."""
    c = check_curvature(c, x)
    _check_pair(x, y, dim)
    sc = _sqrt(c)
    m = mobius_add(-x, y, c=c, dim=dim)
    n = _norm(m, dim)
    lam = conformal_factor(x, c=c, dim=dim)
    return 2 / (sc * lam) * torch.atanh((sc * n).clamp_max(1 - get_eps(x.dtype))) * m / n


def gyration(u: Tensor, v: Tensor, w: Tensor, *, c: Curvature, dim: int = -1) -> Tensor:
    """Closed-form ``gyr[u, v] w = w + 2(a u + b v)/d`` (linear in ``w``), with
    ``a = −c²⟨u,w⟩‖v‖² + c⟨v,w⟩ + 2c²⟨u,v⟩⟨v,w⟩``, ``b = −c²⟨v,w⟩‖u‖² − c⟨u,w⟩``,
    ``d = 1 + 2c⟨u,v⟩ + c²‖u‖²‖v‖²``.
    """
    c = check_curvature(c, u)
    _check_pair(u, v, dim, "u and v")
    _check_pair(u, w, dim, "u and w")
    uw, vw, uv = _dot(u, w, dim), _dot(v, w, dim), _dot(u, v, dim)
    u2, v2 = _sq(u, dim), _sq(v, dim)
    c2 = c * c
    a = -c2 * uw * v2 + c * vw + 2 * c2 * uv * vw
    b = -c2 * vw * u2 - c * uw
    d = (1 + 2 * c * uv + c2 * u2 * v2).clamp_min(MIN_NORM)
    return w + 2 * (a * u + b * v) / d


def transport(x: Tensor, y: Tensor, v: Tensor, *, c: Curvature, dim: int = -1) -> Tensor:
    """Parallel transport ``PT_{x→y}(v) = gyr[y, −x] v · λ_x / λ_y``."""
    c = check_curvature(c, x)
    lam_x = conformal_factor(x, c=c, dim=dim)
    lam_y = conformal_factor(y, c=c, dim=dim)
    return gyration(y, -x, v, c=c, dim=dim) * lam_x / lam_y


def gyromidpoint(
    x: Tensor,
    weights: Tensor | None = None,
    *,
    c: Curvature,
    dim: int = -1,
    reduce_dim: int | tuple[int, ...] = 0,
    keepdim: bool = False,
) -> Tensor:
    """Weighted gyromidpoint ``½ ⊗ (Σ wᵢ λᵢ xᵢ / Σ wᵢ (λᵢ − 1))`` over ``reduce_dim``.

    Computed as ``m' = Σ wᵢγᵢ² xᵢ / (Σ wᵢγᵢ² − Σwᵢ/2)``, ``μ = m' / (1 + √(1 − c‖m'‖²))`` with
    ``γᵢ² = 1/(1 − c‖xᵢ‖²)``. ``weights`` broadcasts against ``x`` without the manifold axis.
    """
    c = check_curvature(c, x)
    ndim = x.dim()
    dim = dim % ndim
    rdims = (reduce_dim,) if isinstance(reduce_dim, int) else tuple(reduce_dim)
    rdims = tuple(r % ndim for r in rdims)
    if dim in rdims:
        raise ValueError(f"reduce_dim {reduce_dim} must not include the manifold axis dim={dim}")
    gamma2 = 1 / (1 - c * _sq(x, dim)).clamp_min(MIN_NORM)
    if weights is None:
        w = torch.ones_like(gamma2)
    else:
        w = weights.unsqueeze(dim) if weights.dim() == ndim - 1 else weights
    num = (w * gamma2 * x).sum(rdims, keepdim=True)
    den = (w * gamma2).sum(rdims, keepdim=True) - w.expand_as(gamma2).sum(rdims, keepdim=True) / 2
    # sign-preserving clamp: the formula is invariant under w → −w (negative total weight)
    m = num / torch.where(den < 0, den.clamp_max(-MIN_NORM), den.clamp_min(MIN_NORM))
    mu = m / (1 + torch.sqrt((1 - c * _sq(m, dim)).clamp_min(MIN_NORM)))
    mu = project(mu, c=c, dim=dim)
    return mu if keepdim else mu.squeeze(rdims)


# ------------------------------------------------------------------------------ HNN++ FC / MLR


def _check_fc(x: Tensor, weight: Tensor, bias: Tensor | None, dim: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [out, in], got {tuple(weight.shape)}")
    if x.shape[dim] != weight.shape[1]:
        raise ValueError(
            f"x has {x.shape[dim]} features along dim={dim} (shape {tuple(x.shape)}) but weight "
            f"has shape {tuple(weight.shape)} = [out, in]"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(
            f"bias must have shape [{weight.shape[0]}] to match weight {tuple(weight.shape)}, "
            f"got {tuple(bias.shape)}"
        )


def _check_fc_tangent(dots: Tensor, sq: Tensor, znorm: Tensor, bias: Tensor, dim: int) -> None:
    """``ValueError`` naming the argument unless ``znorm`` and ``bias`` are ``[K]`` vectors
    (``K = dots.shape[dim]``, one per output feature) and ``sq`` has ``dots``' shape with size 1
    along ``dim``, all floating point and on ``dots``' device. Reads shapes only (no host
    sync)."""
    if not isinstance(dots, Tensor) or dots.dim() == 0:
        raise ValueError("dots must be a tensor with a feature axis")
    ndim = dots.dim()
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim={dim} is out of range for dots of shape {tuple(dots.shape)}")
    k = dots.shape[dim]
    for name, t in (("sq", sq), ("znorm", znorm), ("bias", bias)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if not (t.is_floating_point() and dots.is_floating_point()):
            raise ValueError(f"{name} and dots must be floating point, got {t.dtype}, {dots.dtype}")
        if t.device != dots.device:
            raise ValueError(f"{name} is on {t.device}, expected {dots.device} (that of dots)")
    for name, t in (("znorm", znorm), ("bias", bias)):
        if t.dim() != 1 or t.shape[0] != k:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected [{k}] (one per output feature of "
                f"dots {tuple(dots.shape)} along dim={dim})"
            )
    want = list(dots.shape)
    want[dim] = 1
    if list(sq.shape) != want:
        raise ValueError(
            f"sq has shape {tuple(sq.shape)}, expected {tuple(want)} (‖p‖², dots' shape with size "
            f"1 along dim={dim})"
        )


def _contract(x: Tensor, weight: Tensor, dim: int) -> Tensor:
    """``Σ_i x[..., i, ...] W[k, i]`` along ``dim``."""
    return torch.movedim(torch.movedim(x, dim, -1) @ weight.t(), -1, dim)


def hyperplane_distances(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, *, c: Curvature, dim: int = -1
) -> Tensor:
    """HNN++ MLR scores (signed hyperplane distances), one per row ``z_k`` of ``weight``::

    v_k(x) = (2‖z_k‖/√c) · asinh(√c λ_x ⟨x, ẑ_k⟩ cosh(2√c r_k) − (λ_x − 1) sinh(2√c r_k))
    """
    c = check_curvature(c, x)
    _check_fc(x, weight, bias, dim)
    sc = _sqrt(c)
    x = project(x, c=c, dim=dim)
    lam = conformal_factor(x, c=c, dim=dim)
    znorm = weight.norm(dim=1).clamp_min(MIN_NORM)
    dots = _contract(x, weight / znorm[:, None], dim)
    shape = [1] * x.dim()
    shape[dim] = -1
    r = torch.zeros_like(znorm) if bias is None else bias
    two_sr = (2 * sc * r).reshape(shape)
    q = sc * lam * dots * torch.cosh(two_sr) - (lam - 1) * torch.sinh(two_sr)
    return 2 * znorm.reshape(shape) / sc * torch.asinh(q)


def _fc_tangent_ref(dots, sq, znorm, bias, c, dim, legacy_lambda: bool = False):
    """Plain-autograd twin of :class:`_autograd.FullyConnectedTangent` (same formula).

    ``legacy_lambda``: the official code's conformal factor ``λ_x = 2(1 − tanh²t)`` in place of
    ``2/(1 − tanh²t)``, i.e. ``√c λ_x ⟨x, ẑ⟩ = λ_x tanh(t)/‖p‖ · ⟨p, ẑ⟩`` and ``λ_x − 1`` from it
    (to reproduce the paper's code; :func:`poincare_resnet.nn.fc_map.fc_tangent_legacy`)."""
    sc = _sqrt(c)
    limit = max_tangent_radius(dots.dtype)
    n = sq.clamp_min(MIN_NORM**2).sqrt()
    tc = (sc * n).clamp_max(limit)
    if legacy_lambda:
        th = torch.tanh(tc)  # √c‖x‖ for x = expmap0(p)
        lam = 2 * (1 - th * th)  # the bug: a product instead of 2/(1 − c‖x‖²)
        a, e = lam * th / n, lam - 1
    else:  # λ_x tanh(t) = sinh(2t), λ_x − 1 = cosh(2t)
        a, e = torch.sinh(2 * tc) / n, torch.cosh(2 * tc)
    shape = [1] * dots.dim()
    shape[dim] = -1
    two_sr = (2 * sc * bias).reshape(shape)
    q = a * dots * torch.cosh(two_sr) - e * torch.sinh(two_sr)
    g = (2 * znorm.reshape(shape) * F.fast_asinh(q)).clamp(-F.FC_ARG_LIMIT, F.FC_ARG_LIMIT)
    psi = torch.sinh(g)
    p = _norm(psi, dim)
    rho = torch.asinh(p).clamp_max(2 * limit)
    return rho / (2 * sc * p) * psi


def fc_tangent(
    dots: Tensor, sq: Tensor, znorm: Tensor, bias: Tensor, *, c: Curvature, dim: int = -1
) -> Tensor:
    """Tangent form of the HNN++ FC map, ``logmap0(FC(expmap0(p)))``, from the projections
    ``dots_k = ⟨p, ẑ_k⟩`` (along ``dim``) and ``sq = ‖p‖²`` (size 1 along ``dim``)::

        t = √c‖p‖ (capped),  √c λ_x ⟨x, ẑ_k⟩ = sinh(2t)/‖p‖ · ⟨p, ẑ_k⟩,  λ_x − 1 = cosh(2t)
        w_k = sinh(√c v_k)/√c,   logmap0(FC(x)) = asinh(√c‖w‖)/(2√c‖w‖) · w

    This is the fused core of :class:`~poincare_resnet.nn.PoincareLinear` and
    :class:`~poincare_resnet.nn.PoincareConv2d`: the contraction ⟨p, ẑ_k⟩ is an ordinary matmul or
    convolution and everything else is element-wise. This function is the PyTorch path (any
    device; no kernels): the layers call :func:`poincare_resnet.nn.fc_map.fc_tangent`, which runs
    the native CPU or the Triton kernel where one applies and this function otherwise.

    Raises ``ValueError`` (naming the argument) for a ``znorm`` or ``bias`` that is not one value
    per output feature, an ``sq`` not of ``dots``' shape with size 1 along ``dim``, or another
    device than ``dots``' (other floating dtypes are converted to ``dots``'). NaN and ±inf
    propagate: a NaN in ``dots`` or ``sq`` gives NaN at that position, in every output feature
    there (they share the norm of ψ).
    """
    c = check_curvature(c, dots)
    _check_fc_tangent(dots, sq, znorm, bias, dim)
    sq, znorm, bias = (t.to(dots.dtype) for t in (sq, znorm, bias))  # no-ops when they match
    if manual_backward_enabled():
        return F.FullyConnectedTangent.apply(dots, sq, znorm, bias, c, dim)
    return _fc_tangent_ref(dots, sq, znorm, bias, c, dim)


def fully_connected(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, *, c: Curvature, dim: int = -1
) -> Tensor:
    """HNN++ fully connected map: ``FC(x) = w / (1 + √(1 + c‖w‖²))``, ``w_k = sinh(√c v_k)/√c``
    with ``v_k`` the :func:`hyperplane_distances`. ``weight`` is ``[out, in]`` (row k = z_k).

    With ``weight = ½·I`` and ``bias = 0`` it is exactly the identity.
    """
    c = check_curvature(c, x)
    _check_fc(x, weight, bias, dim)
    if not manual_backward_enabled():
        v = hyperplane_distances(x, weight, bias, c=c, dim=dim)
        sc = _sqrt(c)
        w = torch.sinh((sc * v).clamp(-F.FC_ARG_LIMIT, F.FC_ARG_LIMIT)) / sc
        return project(w / (1 + torch.sqrt(1 + c * _sq(w, dim))), c=c, dim=dim)
    p = logmap0(x, c=c, dim=dim)
    znorm = weight.norm(dim=1).clamp_min(MIN_NORM)
    dots = _contract(p, weight / znorm[:, None], dim)
    r = torch.zeros_like(znorm) if bias is None else bias
    return expmap0(fc_tangent(dots, _sq(p, dim), znorm, r, c=c, dim=dim), c=c, dim=dim)
