"""Elementary functions for the Triton kernels, built from ``exp``, ``log`` and ``sqrt`` only.

``triton.language`` has no ``tanh``/``atanh``/``log1p``/``sinh``/``asinh`` that runs both on a
GPU and under the interpreter (``libdevice`` is GPU-only), so they are written here; each is
accurate to a few ulps in float32 and float64, with Taylor series where the closed form would
cancel. (No constant is assigned to a local variable: under the interpreter such a Python
float becomes a float32 scalar, which would round float64 maths.)

* ``tanh(u) = (1 − e^{−2u}) / (1 + e^{−2u})`` (``u ≥ 0``), series below ``u = 0.3`` (float32) or
  ``0.05`` (float64);
* ``log1p(y) = 2 artanh(y / (2 + y))`` by the odd series below ``y = 0.2``, else ``log(1 + y)``;
* ``artanh(s) = log1p(2s / (1 − s)) / 2`` (``0 ≤ s < 1``);
* ``sinh(x) = (eˣ − e⁻ˣ)/2``, series below ``|x| = 0.5``; ``cosh(x) = (eˣ + e⁻ˣ)/2``;
* ``asinh(q) = sign(q) log1p(|q| + q²/(1 + √(1 + q²)))`` (the form of
  :func:`poincare_resnet.ball._autograd.fast_asinh`), ``log(2|q|)`` above ``|q| = 1e8``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh_pos(u):
    """``tanh(u)`` for ``u ≥ 0``."""
    e = tl.exp(-2.0 * u)
    big = (1.0 - e) / (1.0 + e)
    u2 = u * u
    poly = u2 * (-929569.0 / 638512875.0) + 21844.0 / 6081075.0
    poly = poly * u2 - 1382.0 / 155925.0
    poly = poly * u2 + 62.0 / 2835.0
    poly = poly * u2 - 17.0 / 315.0
    poly = poly * u2 + 2.0 / 15.0
    poly = poly * u2 - 1.0 / 3.0
    series = u + u * u2 * poly
    if u.dtype == tl.float64:  # the series' error, ~6e-4 u¹⁷, must stay below float64 rounding
        return tl.where(u < 0.05, series, big)
    return tl.where(u < 0.3, series, big)


@triton.jit
def _atanh_series(s):
    """``artanh(s)`` for ``|s| ≤ 0.1`` (odd series to s¹⁵)."""
    s2 = s * s
    poly = s2 * (1.0 / 15.0) + 1.0 / 13.0
    poly = poly * s2 + 1.0 / 11.0
    poly = poly * s2 + 1.0 / 9.0
    poly = poly * s2 + 1.0 / 7.0
    poly = poly * s2 + 1.0 / 5.0
    poly = poly * s2 + 1.0 / 3.0
    return s + s * s2 * poly


@triton.jit
def log1p_pos(y):
    """``log(1 + y)`` for ``y ≥ 0``."""
    small = y < 0.2
    ys = tl.where(small, y, 0.0)
    return tl.where(small, 2.0 * _atanh_series(ys / (2.0 + ys)), tl.log(1.0 + y))


@triton.jit
def atanh_pos(s):
    """``artanh(s)`` for ``0 ≤ s < 1``."""
    return 0.5 * log1p_pos(2.0 * s / (1.0 - s))


@triton.jit
def sinh(x):
    """``sinh(x)``."""
    ax = tl.abs(x)
    ep = tl.exp(ax)
    big = 0.5 * (ep - 1.0 / ep)
    x2 = ax * ax
    poly = x2 * (1.0 / 6227020800.0) + 1.0 / 39916800.0
    poly = poly * x2 + 1.0 / 362880.0
    poly = poly * x2 + 1.0 / 5040.0
    poly = poly * x2 + 1.0 / 120.0
    poly = poly * x2 + 1.0 / 6.0
    series = ax + ax * x2 * poly
    mag = tl.where(ax < 0.5, series, big)
    return tl.where(x < 0, -mag, mag)


@triton.jit
def cosh(x):
    """``cosh(x)``."""
    ep = tl.exp(tl.abs(x))
    return 0.5 * (ep + 1.0 / ep)


@triton.jit
def asinh(q):
    """``asinh(q)``."""
    a = tl.abs(q)
    huge = a > 1e8
    am = tl.where(huge, 1.0, a)
    mid = log1p_pos(am + am * am / (1.0 + tl.sqrt(1.0 + am * am)))
    mag = tl.where(huge, tl.log(tl.where(huge, a, 1.0)) + 0.6931471805599453, mid)
    return tl.where(q < 0, -mag, mag)
