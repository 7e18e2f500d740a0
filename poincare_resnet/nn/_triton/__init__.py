"""Triton kernels of the three Poincaré layer maps: the tangent FC map, batch norm, residual.

Each entry point has the signature of the PyTorch path it replaces and computes the same values:

* :func:`fc_tangent` — :func:`poincare_resnet.ball.fc_tangent` (``dim`` the channel axis of a
  4-D ``[B, K, H, W]`` or 2-D ``[N, K]`` map);
* :func:`batchnorm` — :func:`poincare_resnet.nn._closed_forms.batchnorm_forward` (train mode with
  ``mu = var = None``: batch statistics, gradients through μ and σ²; eval mode: the given
  running statistics), returning ``(out, μ, σ², count)``;
* :func:`residual` — :func:`poincare_resnet.nn._closed_forms.residual_forward`.

Forward and backward of each are Triton kernels (the [C]-sized maths between the reductions is
PyTorch); they save only their inputs and per-channel statistics, and never synchronise with the
host. Maps are read as ``[B, C, P]`` through strides; one program per (batch element, block of
pixels) loops over the channels in blocks of ``BLOCK_C``, and per-channel reductions over
``B·P`` go through per-program partial sums summed by PyTorch.

Triton is imported lazily: this package imports without it, and :func:`available` says whether
the kernels can run. They run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` is
set before Triton is first imported (the interpreter; slow, for tests).
"""

from __future__ import annotations

from torch import Tensor

from ._layout import applicable as _tensors_applicable

__all__ = ["available", "applicable", "fc_tangent", "batchnorm", "residual"]


def available() -> bool:
    """Whether Triton can be imported."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def applicable(*tensors: Tensor, c: object = 1.0, kind: str | None = None) -> bool:
    """Whether the kernels can take these maps (per-channel tensors, 0-D or 1-D, pass too):
    Triton importable, float32/float64 tensors of one dtype on CUDA (or CPU with
    ``TRITON_INTERPRET=1``), 4-D ``[B, C, H, W]`` maps whose pixel axes flatten to one stride or
    2-D ``[N, C]`` ones (not for ``kind="batchnorm"``, which takes 4-D maps only), non-empty,
    and a fixed Python-float curvature ``c``."""
    if isinstance(c, Tensor) or isinstance(c, bool) or not isinstance(c, (float, int)):
        return False
    maps = [t for t in tensors if not (isinstance(t, Tensor) and t.dim() <= 1)]
    if kind == "batchnorm" and any(isinstance(t, Tensor) and t.dim() != 4 for t in maps):
        return False
    return available() and _tensors_applicable(*maps)


def residual(f, res, alpha, c, proj_eps, t_max, f_first=True, *, block_c=None):
    """:func:`poincare_resnet.nn.residual_map.residual` by Triton kernels.

    Parameters
    ----------
    f, res, alpha, c, proj_eps, t_max, f_first
        As :func:`poincare_resnet.nn.residual_map.residual`, with CUDA (or interpreted CPU)
        float32/float64 maps and ``c`` a Python float.
    block_c : int, optional
        Channels per loop step, a power of two (default 32).

    Returns
    -------
    Tensor
        The residual map, as a new tensor of ``f``'s shape (dense if ``f``'s pixels do not
        flatten).

    Shapes
    ------
    ``f, res [B, C, H, W]`` or ``[N, C]`` → the same.
    """
    from . import _residual

    block_c = _residual.BLOCK_C if block_c is None else block_c
    return _residual.residual(f, res, alpha, c, proj_eps, t_max, f_first, block_c)


def fc_tangent(dots, sq, znorm, bias, c, dim, *, block_c=None):
    """:func:`poincare_resnet.nn.fc_map.fc_tangent` by Triton kernels.

    Parameters
    ----------
    dots, sq, znorm, bias, c, dim
        As :func:`poincare_resnet.nn.fc_map.fc_tangent`, with ``dots`` a CUDA (or interpreted
        CPU) float32/float64 map, ``dim`` its channel axis 1 and ``c`` a Python float.
    block_c : int, optional
        Channels per loop step, a power of two (default 32).

    Returns
    -------
    Tensor
        The tangent FC map of every position, a new tensor of ``dots``' shape.

    Shapes
    ------
    ``dots [B, K, H, W]`` or ``[N, K]``, ``sq`` the same with ``K = 1``, ``znorm, bias [K]``.
    """
    from . import _fc

    block_c = _fc.BLOCK_C if block_c is None else block_c
    return _fc.fc_tangent(dots, sq, znorm, bias, c, dim, block_c)


def batchnorm(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max, *, block_c=None):
    """:func:`poincare_resnet.nn.batchnorm_map.batchnorm` by Triton kernels.

    Parameters
    ----------
    v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max
        As :func:`poincare_resnet.nn.batchnorm_map.batchnorm` (no ``all_reduce``), with ``v`` a
        CUDA (or interpreted CPU) float32/float64 map and ``c`` a Python float.
    block_c : int, optional
        Channels per loop step, a power of two.

    Returns
    -------
    tuple
        ``(out, μ, σ², count)``.

    Shapes
    ------
    ``v [B, C, H, W]``, ``mu, beta_t [C]``, ``weight, var [1]`` → ``out [B, C, H, W]``.
    """
    from . import _batchnorm

    block_c = _batchnorm.BLOCK_C if block_c is None else block_c
    return _batchnorm.batchnorm(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max, block_c)
