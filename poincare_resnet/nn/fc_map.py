"""The tangent FC map of :class:`~.PoincareLinear` and :class:`~.PoincareConv2d`: where it runs.

:func:`fc_tangent` is the layers' entry point; it picks (see :mod:`._dispatch`) the Triton kernel
(:func:`._triton.fc_tangent`, eager CUDA), the native kernel (:func:`._native_fc.native_fc_tangent`,
CPU) or the PyTorch path (:func:`poincare_resnet.ball.fc_tangent`: the autograd Function
:func:`torch_fc_tangent`, or plain autograd with ``set_manual_backward(False)``). All give the
same values. ``legacy_lambda`` layers use :func:`fc_tangent_legacy` (plain autograd).
"""

from __future__ import annotations

from torch import Tensor

from .. import ball
from ..ball._autograd import FullyConnectedTangent
from ..ball.functional import _check_fc_tangent, _fc_tangent_ref
from . import _triton
from ._dispatch import full_precision, no_autocast, use_triton
from ._native_fc import native_fc_tangent, native_fc_tangent_applicable

__all__ = ["fc_tangent", "fc_tangent_legacy", "torch_fc_tangent"]


def torch_fc_tangent(
    dots: Tensor, sq: Tensor, znorm: Tensor, bias: Tensor, c: float | Tensor, dim: int
) -> Tensor:
    """The PyTorch path of the FC map: the autograd Function ``FullyConnectedTangent`` (forward
    and hand-written backward in PyTorch ops, any device, ``c`` a float or a scalar tensor that
    may need its gradient). Arguments as :func:`fc_tangent`, already checked."""
    return FullyConnectedTangent.apply(dots, sq, znorm, bias, c, dim)


def fc_tangent(
    dots: Tensor, sq: Tensor, znorm: Tensor, bias: Tensor, c: float | Tensor, dim: int
) -> Tensor:
    """:func:`poincare_resnet.ball.fc_tangent` by the fastest implementation that applies.

    With ``t = min(√c‖p‖, artanh(1 − ε))`` and ``x = expmap0(p)``::

        √c λ_x ⟨x, ẑ_k⟩ = sinh(2t)/‖p‖ · ⟨p, ẑ_k⟩,    λ_x − 1 = cosh(2t)
        q_k = √c λ_x ⟨x, ẑ_k⟩ cosh(2√c r_k) − (λ_x − 1) sinh(2√c r_k)
        ψ_k = sinh(2‖z_k‖ asinh(q_k)),   out = asinh(‖ψ‖)/(2√c‖ψ‖) · ψ

    Parameters
    ----------
    dots : Tensor
        ``⟨p, ẑ_k⟩``, the output features along ``dim``; float16/bfloat16 is upcast to float32.
    sq : Tensor
        ``‖p‖²``, ``dots``' shape with size 1 along ``dim``.
    znorm : Tensor
        ``‖z_k‖``, one per output feature.
    bias : Tensor
        ``r_k``, one per output feature.
    c : float or Tensor
        The curvature (a scalar tensor may require grad: then the PyTorch path runs).
    dim : int
        The feature axis.

    Returns
    -------
    Tensor
        ``logmap0(FC(expmap0(p)))``, ``dots``' shape (float32 for half-precision inputs).

    Shapes
    ------
    ``dots [*, K, *]``, ``sq [*, 1, *]``, ``znorm, bias [K]`` → ``[*, K, *]``.

    Raises
    ------
    ValueError
        Naming the argument, for a wrongly shaped ``sq``, ``znorm`` or ``bias``, another device
        than ``dots``', or a curvature that is not a positive scalar.
    """
    dots, sq = full_precision(dots), full_precision(sq)
    with no_autocast(dots):
        _check_fc_tangent(dots, sq, znorm, bias, dim)
        c = ball.check_curvature(c, dots)
        if dim == 1 and dots.dim() in (2, 4) and use_triton(dots, sq, znorm, bias, c=c):
            return _triton.fc_tangent(dots, sq, znorm, bias, c, dim)
        if native_fc_tangent_applicable(dots, c, dim):
            sq, znorm, bias = (t.to(dots.dtype) for t in (sq, znorm, bias))
            return native_fc_tangent(dots, sq, znorm, bias, c, dim)
        return ball.fc_tangent(dots, sq, znorm, bias, c=c, dim=dim)


def fc_tangent_legacy(
    dots: Tensor, sq: Tensor, znorm: Tensor, bias: Tensor, c: float | Tensor, dim: int
) -> Tensor:
    """The official code's FC map with its conformal-factor bug ``λ_x = 2·(1 − c‖x‖²)``.

    :func:`fc_tangent` with ``√c λ_x ⟨x, ẑ_k⟩ = λ_x tanh(t)/‖p‖ · ⟨p, ẑ_k⟩`` and ``λ_x − 1`` from
    that ``λ_x``; kept only to reproduce the paper's code (``legacy_lambda=True`` layers, the
    ``init-norms`` experiment), in plain autograd. Parameters, returns and shapes as
    :func:`fc_tangent`.
    """
    return _fc_tangent_ref(dots, sq, znorm, bias, c, dim, legacy_lambda=True)
