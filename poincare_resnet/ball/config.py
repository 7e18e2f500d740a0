"""Numerical settings of the Poincaré-ball maths: projection epsilon and the backward-pass switch.

Points are kept at ``‖x‖ ≤ (1 − ε)/√c``. This also caps every tangent vector at the origin at
``artanh(1 − ε)/√c`` (≈ 9.82 at c = 0.1 in float32): a built-in feature-norm clip, which also
bounds the logits of a Poincaré network. Defaults follow the reference systems: ε = 4e-3 in
float32 (and lower precisions), 1e-5 in float64.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

MIN_NORM = 1e-15
_DEFAULT_EPS = {torch.float64: 1e-5, torch.float32: 4e-3, torch.float16: 4e-3, torch.bfloat16: 4e-3}
_eps: dict[torch.dtype, float] = dict(_DEFAULT_EPS)
_manual_backward = True


def get_eps(dtype: torch.dtype) -> float:
    """Projection epsilon used for tensors of ``dtype``."""
    return _eps.get(dtype, _eps[torch.float32])


def set_eps(dtype: torch.dtype, eps: float | None) -> None:
    """Set the projection epsilon for ``dtype`` (``None`` restores the default)."""
    if eps is None:
        _eps[dtype] = _DEFAULT_EPS.get(dtype, _DEFAULT_EPS[torch.float32])
        return
    if not (0.0 < float(eps) < 1.0):
        raise ValueError(f"projection eps must lie in (0, 1), got {eps!r}")
    _eps[dtype] = float(eps)


def max_tangent_radius(dtype: torch.dtype) -> float:
    """``artanh(1 − ε)``: the largest value of ``√c‖v‖`` for a tangent vector at the origin."""
    return math.atanh(1.0 - get_eps(dtype))


def manual_backward_enabled() -> bool:
    """Whether the hand-written backward passes and closed-form layer kernels are used (default).

    ``False`` is the plain-autograd baseline: the ball operations differentiate through autograd
    and the layers run as op-by-op chains of :mod:`poincare_resnet.ball` functions, as research
    code does. Values are the same; graph size, memory and speed are not.
    """
    return _manual_backward


def set_manual_backward(enabled: bool) -> None:
    """Select the hand-written backward passes (``True``, default) or plain autograd."""
    global _manual_backward
    _manual_backward = bool(enabled)


@contextlib.contextmanager
def manual_backward(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_manual_backward`."""
    previous = _manual_backward
    set_manual_backward(enabled)
    try:
        yield
    finally:
        set_manual_backward(previous)
