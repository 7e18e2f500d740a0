"""The float32 fast functions of ``poincare_resnet/_cpp/fastmath.h`` against float64 PyTorch.

The kernels' float32 tanh, atanh, sinh, cosh and asinh are closed forms on one fast exp or log
(the inline log, tested here too) with odd series for small arguments; they are also covered
through every float32 kernel test. Here each is checked directly on a dense grid (both
branches and the switch points), and the float64 versions, which the float64 kernel tests rely
on, are checked to be SLEEF-accurate.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

import poincare_resnet._cpp as cpp

_SOURCE = r"""
#include <torch/extension.h>
#include "fastmath.h"
namespace fm = poincare_fastmath;

template <typename T>
void apply(const T* x, T* out, int64_t n, int64_t which) {
  using V = at::vec::Vectorized<T>;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), n - i);
    V v = V::loadu(x + i, m), r, s, c;
    switch (which) {
      case 0: r = fm::asinh(v, &s); break;
      case 1: fm::asinh(v, &r); break;  // the returned sqrt(1 + x^2)
      case 2: r = fm::sinh(v); break;
      case 3: fm::sinh_cosh(v, &s, &c); r = c; break;
      case 4: r = fm::tanh(v); break;
      case 5: r = fm::atanh(v); break;
      case 6: r = fm::log(v); break;
      case 8: r = fm::sinh_bounded(v); break;
      default: r = fm::log_ge1(v); break;
    }
    r.store(out + i, m);
  }
}

torch::Tensor run(torch::Tensor x, int64_t which) {
  x = x.contiguous();
  auto out = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmath", [&] {
    apply<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel(), which);
  });
  return out;
}
"""


_AVX2 = ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


@pytest.fixture(scope="module", params=["kernels", "avx2"])
def fastmath(request):
    """The header compiled as the kernels are here, and for AVX2 (its code without AVX512's
    getexp/getmant and masked instructions), where this CPU runs AVX2."""
    if cpp.load_kernel("fc") is None:
        pytest.skip("native kernels cannot be built here")
    from torch.utils import cpp_extension

    cflags, tag = cpp._build_flags()
    if request.param == "avx2":
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            pytest.skip("no AVX2 here")
        cflags = [f for f in cflags if not f.startswith(("-mavx", "-DCPU_CAPABILITY"))] + _AVX2
        tag = "avx2"
    # the header is not a source of load_inline's build key: name the module by its contents
    header = (cpp._HERE / "fastmath.h").read_bytes()
    return cpp_extension.load_inline(
        name=f"poincare_resnet_fastmath_test_{tag}_{hashlib.sha1(header).hexdigest()[:12]}",
        cpp_sources=_SOURCE,
        functions=["run"],
        extra_cflags=cflags,
        extra_include_paths=[str(cpp._HERE)],
        verbose=False,
    )


def _grid(lo: float, hi: float) -> torch.Tensor:
    """Dense linear grid plus a log grid of small magnitudes, both signs, in float64."""
    small = torch.logspace(-8, 0, 20001, dtype=torch.float64)
    return torch.cat([torch.linspace(lo, hi, 200001, dtype=torch.float64), small, -small]).clamp(
        lo, hi
    )


CASES = {  # which: (name, reference, grid)
    0: ("asinh", torch.asinh, (-1e4, 1e4)),
    1: ("sqrt(1+x^2)", lambda x: torch.sqrt(1 + x * x), (-1e4, 1e4)),
    2: ("sinh", torch.sinh, (-40.0, 40.0)),
    3: ("cosh", torch.cosh, (0.0, 40.0)),
    4: ("tanh", torch.tanh, (-9.0, 9.0)),
    5: ("atanh", torch.atanh, (-0.99999, 0.99999)),
    8: ("sinh_bounded", torch.sinh, (-40.0, 40.0)),
}


def _log_grid(dtype) -> torch.Tensor:
    """Positive normal numbers from the smallest float32 normal to 1e30, densely around 1."""
    tiny = torch.finfo(torch.float32).tiny
    spread = torch.logspace(torch.tensor(tiny).log10().item(), 30, 400001, dtype=torch.float64)
    near_one = torch.linspace(0.5, 4.0, 200001, dtype=torch.float64)
    return torch.cat([spread, near_one]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fast_log_absolute_and_relative_error(fastmath, dtype):
    """The inline float32 log (Cephes' polynomial on the mantissa, exponent from the bits)."""
    x = _log_grid(dtype)
    got = fastmath.run(x, 6).double()
    want = x.double().log()  # the same (rounded) inputs, evaluated in float64
    err = (got - want).abs()
    # relative error, except near x = 1 where log x → 0 and only an absolute bound makes sense
    rel_tol, abs_tol = (1e-6, 1e-7) if dtype == torch.float32 else (1e-14, 1e-15)
    bad = (err > rel_tol * want.abs()) & (err > abs_tol)
    assert not bad.any(), f"log ({dtype}) off at x = {x[bad][:5].tolist()}"


@pytest.mark.parametrize("which", sorted(CASES), ids=[CASES[k][0] for k in sorted(CASES)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fastmath_relative_error(fastmath, which, dtype):
    name, ref, (lo, hi) = CASES[which]
    x = _grid(lo, hi).to(dtype)
    got = fastmath.run(x, which).double()
    want = ref(x.double())  # the same (rounded) inputs, evaluated in float64
    rel = ((got - want).abs() / want.abs().clamp_min(1e-300)).max().item()
    tol = 2e-6 if dtype == torch.float32 else 1e-14
    assert rel <= tol, f"{name} ({dtype}): max relative error {rel:.3g} > {tol:g}"


# ------------------------------------------------------------------ IEEE special values
_INF, _NAN = float("inf"), float("nan")


def _specials(dtype) -> list[float]:
    """NaN, ±inf, ±0, denormals (smallest and a mid one), ±1e±30."""
    fi = torch.finfo(dtype)
    denormals = [fi.tiny / 2**10, fi.tiny * 2.0 ** -(fi.bits - 9 if dtype == torch.float32 else 52)]
    values = [_NAN, _INF, -_INF, 0.0, -0.0, 1e30, -1e30, 1e-30, -1e-30]
    return values + denormals + [-d for d in denormals]


def _mp_ref(name: str, x: float) -> float:
    """The IEEE value of ``name(x)``, from mpmath (50 digits) with the special cases spelled out."""
    import math
    import sys

    import mpmath

    if math.isnan(x):
        return _NAN
    if math.isinf(x):
        sign = math.copysign(1.0, x)
        return {
            "asinh": sign * _INF,
            "sqrt(1+x^2)": _INF,
            "sinh": sign * _INF,
            "cosh": _INF,
            "tanh": sign,
            "atanh": _NAN,
            "log": _INF if x > 0 else _NAN,
            "log_ge1": _INF,
        }[name]
    if x == 0.0:  # keep the sign of zero
        return {"sqrt(1+x^2)": 1.0, "cosh": 1.0, "log": -_INF}.get(name, x)
    with mpmath.workdps(50):
        v = mpmath.mpf(x)
        if name == "atanh":
            if abs(x) > 1:
                return _NAN
            if abs(x) == 1:
                return math.copysign(_INF, x)
        if name == "log" and x < 0:
            return _NAN
        fn = {
            "asinh": mpmath.asinh,
            "sqrt(1+x^2)": lambda t: mpmath.sqrt(1 + t * t),
            "sinh": mpmath.sinh,
            "cosh": mpmath.cosh,
            "tanh": mpmath.tanh,
            "atanh": mpmath.atanh,
            "log": mpmath.log,
            "log_ge1": mpmath.log,
            "sinh_bounded": mpmath.sinh,
        }[name]
        r = fn(v)
        if abs(r) > mpmath.mpf(sys.float_info.max):
            return math.copysign(_INF, float(mpmath.sign(r)))
        return float(r)


SPECIAL_CASES = {  # which: (name, the inputs its domain allows beyond the specials)
    0: ("asinh", [1e20, -1e20, 3e38, -3e38, 4095.0, 4097.0, -5000.0]),
    1: ("sqrt(1+x^2)", [1e20, -1e20, 3e38, -3e38]),
    2: ("sinh", [88.0, -88.0, 1e4, -1e4]),
    3: ("cosh", [88.0, 1e4]),
    4: ("tanh", [20.0, -20.0, 1e4]),
    5: ("atanh", [1.0, -1.0, 1.5, -2.0, 0.5]),
    6: ("log", [1.0, 2.0, 0.5, 3e38, -1.0]),
    7: ("log_ge1", [1.0, 2.0, 3e38, 1e30]),
    8: ("sinh_bounded", [40.0, -40.0, 80.0, -80.0, 3.0]),
}
_DOUBLE_HUGE = [1e200, -1e200, 1.7e308, -1.7e308]


def _domain(which: int, dtype) -> list[float]:
    name, extra = SPECIAL_CASES[which]
    xs = _specials(dtype) + extra
    if dtype == torch.float64 and name in ("asinh", "sqrt(1+x^2)"):
        xs += _DOUBLE_HUGE
    if name == "cosh":  # sinh_cosh is for x >= 0 (and NaN)
        xs = [x for x in xs if not x < 0 and str(x) != "-0.0"]
    if name == "log_ge1":  # x >= 1, +inf or NaN
        xs = [x for x in xs if x != x or x >= 1]
    if name == "sinh_bounded":  # finite |x| <= 80 or NaN
        xs = [x for x in xs if x != x or abs(x) <= 80]
    return xs


@pytest.mark.parametrize("which", sorted(SPECIAL_CASES), ids=[v[0] for v in SPECIAL_CASES.values()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fastmath_ieee_special_values(fastmath, which, dtype):
    """NaN, ±inf, ±0, denormals and huge arguments give the IEEE result (exact for the special
    values, to the functions' accuracy elsewhere), one value per lane and all in one vector."""
    name = SPECIAL_CASES[which][0]
    xs = _domain(which, dtype)
    x = torch.tensor(xs, dtype=dtype)
    got = fastmath.run(x, which)
    want = torch.tensor([_mp_ref(name, float(v)) for v in x.tolist()], dtype=torch.float64)
    want = want.to(dtype).double()  # the reference rounded to dtype (overflow to inf)
    got = got.double()
    tol = 2e-6 if dtype == torch.float32 else 1e-14
    for xi, g, w in zip(x.tolist(), got.tolist(), want.tolist(), strict=True):
        where = f"{name}({xi!r}) [{dtype}] = {g!r}, IEEE {w!r}"
        if w != w:
            assert g != g, where
        elif w in (_INF, -_INF) or w == 0.0:
            assert g == w, where
            if w == 0.0:
                assert str(g)[0] == str(w)[0], f"sign of zero: {where}"
        else:
            assert abs(g - w) <= tol * abs(w), where
