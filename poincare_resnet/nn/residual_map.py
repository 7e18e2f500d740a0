"""The residual map of :class:`~.PoincareResidual`: where it runs.

:func:`residual` is the layer's entry point; it picks (see :mod:`._dispatch`) the Triton kernels
(:func:`._triton.residual`, eager CUDA), the native kernel
(:func:`._native_residual.native_residual`, CPU), the PyTorch path
(:func:`._torch_residual.torch_residual`) or the closed form
(:func:`._closed_forms.residual_forward`: a learnable curvature). All give the same values.
"""

from __future__ import annotations

from torch import Tensor

from . import _triton
from ._closed_forms import residual_forward
from ._dispatch import check_curvature, check_scalar, full_precision, no_autocast, use_triton
from ._native_residual import native_residual, native_residual_applicable
from ._torch_residual import torch_residual, torch_residual_applicable

__all__ = ["residual"]


def residual(
    f: Tensor,
    res: Tensor,
    alpha: Tensor | float | None,
    c: float | Tensor,
    proj_eps: float,
    t_max: float,
    f_first: bool,
) -> Tensor:
    """The Poincaré residual by the fastest implementation that applies::

        out = logmap0(expmap0(α f) ⊕ expmap0(res))      (f_first; else res ⊕ α f)

    with the Möbius addition along dim 1 and its result projected to ``‖x‖ ≤ (1 − ε)/√c``.

    Parameters
    ----------
    f, res : Tensor
        The branch and the shortcut (tangent maps of one shape); float16/bfloat16 is upcast to
        float32.
    alpha : Tensor, float or None
        The residual scale (``None`` = 1; a one-element tensor receives a gradient).
    c : float or Tensor
        The curvature (a scalar tensor may require grad).
    proj_eps, t_max : float
        The projection ε and ``artanh(1 − ε)``.
    f_first : bool
        ``f ⊕ res`` (the paper's order) or ``res ⊕ f``.

    Returns
    -------
    Tensor
        ``f``'s shape.

    Shapes
    ------
    ``f, res [B, C, *]`` (the native and Triton kernels take ``[B, C, H, W]``) → ``[B, C, *]``.
    """
    f, res = full_precision(f), full_precision(res)
    check_curvature(c)
    check_scalar(alpha, "residual: alpha")
    if f.shape != res.shape:
        raise ValueError(
            f"residual: f has shape {tuple(f.shape)} but res has {tuple(res.shape)}; "
            "they must match"
        )
    with no_autocast(f):
        if f.dim() == 4 and use_triton(f, res, c=c):
            return _triton.residual(f, res, alpha, c, proj_eps, t_max, f_first)
        if native_residual_applicable(f, res, alpha, c):
            return native_residual(f, res, alpha, c, proj_eps, t_max, f_first)
        if torch_residual_applicable(f, res, alpha, c):
            return torch_residual(f, res, alpha, c, proj_eps, t_max, f_first)
        return residual_forward(f, res, alpha, c, proj_eps, t_max, f_first)
