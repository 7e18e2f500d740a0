"""Poincaré fully connected layer (HNN++) and the MLR head.

Contract: modules take and return **tangent vectors at the origin** (SPEC §5); the manifold axis
is the last one, as for :class:`torch.nn.Linear`. A layer maps ``u ↦ logmap0(FC(expmap0(u)))``
in closed form (:func:`poincare_resnet.nn.fc_map.fc_tangent`), so no exp/log pair is computed
only to be undone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ball
from ..ball import MIN_NORM
from ._dispatch import full_precision, no_autocast
from .curvature import Curvature, as_curvature
from .fc_map import fc_tangent, fc_tangent_legacy
from .init import INITS, init_poincare_weight


class _PoincareFCBase(nn.Module):
    """Shared parameters and initialisation of the Poincaré linear and convolution layers."""

    weight: Tensor
    bias: Tensor | None
    scale: float = 1.0  # β-concatenation ratio of the input (a conv's; 1 for a linear layer)
    center_weight: bool = False  # centre each normal over its inputs (see _unit_weight)

    def _setup(self, weight_shape, bias: bool, c, init: str, legacy_lambda: bool) -> None:
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
        self.curvature = as_curvature(c)
        self.init = init
        self.legacy_lambda = bool(legacy_lambda)
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.zeros(weight_shape[0])) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():  # a learnable curvature's current value, without its graph
            c = float(self.curvature())
        init_poincare_weight(self.weight, self.init, self.scale, c=c)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _unit_weight(self) -> tuple[Tensor, Tensor]:
        """Return (ẑ = z/‖z‖, ‖z‖) with the norm over everything but the output axis.

        With ``center_weight`` each normal is first centred over its inputs, ``z ← z − mean(z)``
        (the centring half of weight standardisation): the layer then ignores the mean of its
        input, so a ReLU's positive mean cannot shift the activations of a network without
        batch norm layer after layer."""
        flat = self.weight.flatten(1)
        if self.center_weight:
            flat = flat - flat.mean(1, keepdim=True)
        znorm = flat.norm(dim=1).clamp_min(MIN_NORM)
        return (flat / znorm.unsqueeze(1)).view_as(self.weight), znorm

    def _fc(self, dots: Tensor, sq: Tensor, znorm: Tensor, dim: int) -> Tensor:
        c = self.curvature()
        bias = self.bias if self.bias is not None else torch.zeros_like(znorm)
        if self.legacy_lambda:
            return fc_tangent_legacy(dots, sq, znorm, bias, c, dim)
        return fc_tangent(dots, sq, znorm, bias, c, dim)


class PoincareLinear(_PoincareFCBase):
    """HNN++ Poincaré FC layer on tangent vectors at the origin (last axis).

    ``weight`` is ``[out_features, in_features]`` (row k = the hyperplane normal z_k), ``bias`` is
    ``[out_features]`` (the offsets r_k). For x = expmap0(u)::

        v_k(x) = (2‖z_k‖/√c) asinh(√c λ_x ⟨x, ẑ_k⟩ cosh(2√c r_k) − (λ_x − 1) sinh(2√c r_k))
        w_k = sinh(√c v_k)/√c,   FC(x) = w / (1 + √(1 + c‖w‖²)),   output = logmap0(FC(x))

    At ``init="identity"`` (``weight = ½I``, ``bias = 0``) a square layer is exactly the identity.
    ``legacy_lambda=True`` reproduces the official code's ``λ_x = 2(1 − c‖x‖²)`` bug.
    ``center_weight=True`` centres each normal over its inputs, ``z_k ← z_k − mean(z_k)``, before
    normalising it (as :class:`~.PoincareConv2d`'s option): the layer then ignores the mean of
    its input features.

    Parameters
    ----------
    in_features, out_features : int
        Sizes of the input and output tangent vectors.
    bias : bool
        Learn the offsets ``r_k`` (else ``r = 0``).
    c : float or Curvature
        The curvature (a :class:`~.Curvature` module to learn it).
    init : str
        One of :data:`~.INITS` (``"identity"``: ``½I`` and its generalisation).
    legacy_lambda : bool
        The official code's conformal-factor bug (plain autograd; for reproduction only).
    center_weight : bool
        Centre each normal over its inputs.

    Shapes
    ------
    ``[*, in_features]`` → ``[*, out_features]``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        c: float | Curvature = 0.1,
        init: str = "identity",
        legacy_lambda: bool = False,
        center_weight: bool = False,
    ) -> None:
        super().__init__()
        self.center_weight = bool(center_weight)
        self.in_features, self.out_features = in_features, out_features
        self._setup((out_features, in_features), bias, c, init, legacy_lambda)

    def forward(self, u: Tensor) -> Tensor:
        if u.shape[-1] != self.in_features:
            raise ValueError(
                f"PoincareLinear expected {self.in_features} input features on the last axis, "
                f"got input of shape {tuple(u.shape)}"
            )
        zhat, znorm = self._unit_weight()
        dots = u @ zhat.t()
        sq = u.pow(2).sum(-1, keepdim=True)
        return self._fc(dots, sq, znorm, dim=-1)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, init={self.init!r}"
            + (", center_weight=True" if self.center_weight else "")
        )


class PoincareMLR(nn.Module):
    """Multinomial logistic regression on the ball: logits = signed hyperplane distances ``v_k``.

    Input: tangent vectors at the origin (last axis); ``weight [num_classes, in_features]``,
    ``bias [num_classes]``. An alternative head to a :class:`PoincareLinear` whose output tangent
    is a monotone function of the same scores (and whose norm the ball's clip caps; these
    scores grow with ``‖z_k‖``). Under autocast the scores are computed in float32 from
    upcast inputs, like the other hyperbolic maps.
    """

    def __init__(self, in_features: int, num_classes: int, c: float | Curvature = 0.1) -> None:
        super().__init__()
        self.curvature = as_curvature(c)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.normal_(self.weight, 0.0, (2.0 * in_features * num_classes) ** -0.5)

    def forward(self, u: Tensor) -> Tensor:
        u = full_precision(u)  # the hyperbolic maths stays in float32 under autocast
        with no_autocast(u):
            c = self.curvature()
            x = ball.expmap0(u, c=c, dim=-1)
            return ball.hyperplane_distances(x, self.weight, self.bias, c=c, dim=-1)
