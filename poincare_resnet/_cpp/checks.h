// Argument checks of the native kernels: every tensor a kernel indexes is checked for its
// device (CPU), dtype, contiguity and size before any pointer is taken, and a failure names the
// op and the argument, e.g. "fc_forward: zn2 has 7 elements, expected 8 (one per output
// channel)". The checks read sizes and flags only (no data, no host sync).
#pragma once

#include <torch/extension.h>

#include <string>

namespace poincare_checks {

// t is defined, on the CPU, of dtype `dtype`, and contiguous.
inline void check_tensor(const char* op, const char* name, const torch::Tensor& t,
                         c10::ScalarType dtype, const char* dtype_of) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on device ", t.device(),
              ", the native kernels take CPU tensors");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(),
              ", expected ", dtype, " (", dtype_of, ")");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " is not contiguous (strides ", t.strides(),
              " for shape ", t.sizes(), ")");
}

// A floating-point map (float32 or float64) of `dims` dimensions: the op's leading tensor.
inline void check_map(const char* op, const char* name, const torch::Tensor& t, int64_t dims,
                      const char* layout) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kDouble, op, ": ",
              name, " has dtype ", t.scalar_type(), ", expected float32 or float64");
  check_tensor(op, name, t, t.scalar_type(), "float32 or float64");
  TORCH_CHECK(dims < 0 ? t.dim() >= -dims : t.dim() == dims, op, ": ", name, " has shape ",
              t.sizes(), ", expected ", layout);
}

// t holds exactly n elements (any shape with n elements is read as a flat vector).
inline void check_numel(const char* op, const char* name, const torch::Tensor& t, int64_t n,
                        const char* what) {
  TORCH_CHECK(t.numel() == n, op, ": ", name, " has ", t.numel(), " elements, expected ", n,
              " (", what, ")");
}

// t has exactly the given sizes.
inline void check_sizes(const char* op, const char* name, const torch::Tensor& t,
                        c10::IntArrayRef sizes, const char* what) {
  TORCH_CHECK(t.sizes() == sizes, op, ": ", name, " has shape ", t.sizes(), ", expected ", sizes,
              " (", what, ")");
}

}  // namespace poincare_checks
