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
      default: r = fm::log_pos(v); break;
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


@pytest.fixture(scope="module")
def fastmath():
    if cpp.load_kernel("fc") is None:
        pytest.skip("native kernels cannot be built here")
    from torch.utils import cpp_extension

    cflags, tag = cpp._build_flags()
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
