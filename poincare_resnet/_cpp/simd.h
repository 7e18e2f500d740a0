// SIMD building blocks shared by the native kernels (fc.cpp, residual.cpp, batchnorm.cpp).
//
// The kernels are written on ATen's Vectorized<T> (the SIMD width PyTorch detected: AVX-512,
// AVX2 or its scalar fallback) or on a Pack of K of them, which this header gives the same
// arithmetic, so one template body serves both:
//   ld / st        load or store the first m lanes (a block's ragged tail); the rest read as 0,
//   hsum           the sum of the lanes, in lane order,
//   blend / sel    lane-wise selects (sel(mask, a) is a where mask, else 0),
//   valid_lanes    the mask of the first m lanes,
//   pixel_block    the (image, first pixel, pixels) of one task of a kernel's parallel loop.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "fastmath.h"

// For helpers that split one straight-line chain: inlined whatever their size, so that the
// compiler contracts a * b + c into fma across them exactly as in the chain written out (with
// -ffp-contract=fast, only within one function), and the results do not depend on inlining.
#define POINCARE_ALWAYS_INLINE inline __attribute__((always_inline))

namespace poincare_simd {

using at::vec::Vectorized;

// K SIMD vectors processed together: independent per-pixel chains for instruction-level
// parallelism (one chain alone is latency-bound: divisions, tanh/atanh, sqrt).
template <typename T_, int K>
struct Pack {
  using value_type = T_;
  using Vec = Vectorized<T_>;
  static constexpr int64_t size() { return K * Vec::size(); }
  Vec v[K];
  Pack() = default;
  Pack(T_ s) {  // broadcast
    for (int j = 0; j < K; ++j) v[j] = Vec(s);
  }
#define PACK_UNARY(name, expr)                 \
  Pack name() const {                          \
    Pack r;                                    \
    for (int j = 0; j < K; ++j) r.v[j] = expr; \
    return r;                                  \
  }
  PACK_UNARY(neg, v[j].neg())
  PACK_UNARY(sqrt, v[j].sqrt())
  PACK_UNARY(tanh, poincare_fastmath::tanh(v[j]))
  PACK_UNARY(atanh, poincare_fastmath::atanh(v[j]))
#undef PACK_UNARY
};

template <typename V>
struct is_pack : std::false_type {};
template <typename T, int K>
struct is_pack<Pack<T, K>> : std::true_type {};

#define PACK_BINARY(op)                                                         \
  template <typename T, int K>                                                  \
  inline Pack<T, K> operator op(const Pack<T, K>& a, const Pack<T, K>& b) {     \
    Pack<T, K> r;                                                               \
    for (int j = 0; j < K; ++j) r.v[j] = a.v[j] op b.v[j];                      \
    return r;                                                                   \
  }
PACK_BINARY(+)
PACK_BINARY(-)
PACK_BINARY(*)
PACK_BINARY(/)
PACK_BINARY(>)
PACK_BINARY(<)
PACK_BINARY(>=)
PACK_BINARY(<=)
#undef PACK_BINARY

template <typename T, int K>
inline Pack<T, K> vmax(const Pack<T, K>& a, const Pack<T, K>& b) {
  Pack<T, K> r;
  for (int j = 0; j < K; ++j) r.v[j] = at::vec::maximum(a.v[j], b.v[j]);
  return r;
}

template <typename T, int K>
inline Pack<T, K> vmin(const Pack<T, K>& a, const Pack<T, K>& b) {
  Pack<T, K> r;
  for (int j = 0; j < K; ++j) r.v[j] = at::vec::minimum(a.v[j], b.v[j]);
  return r;
}

// b where mask, else a
template <typename T>
inline Vectorized<T> blend(const Vectorized<T>& a, const Vectorized<T>& b,
                           const Vectorized<T>& mask) {
  return Vectorized<T>::blendv(a, b, mask);
}

template <typename T, int K>
inline Pack<T, K> blend(const Pack<T, K>& a, const Pack<T, K>& b, const Pack<T, K>& mask) {
  Pack<T, K> r;
  for (int j = 0; j < K; ++j) r.v[j] = Vectorized<T>::blendv(a.v[j], b.v[j], mask.v[j]);
  return r;
}

// if_true where mask, else if_false
template <typename V>
inline V sel(const V& mask, const V& if_true, const V& if_false) {
  return blend(if_false, if_true, mask);
}

// a where mask, else 0
template <typename V>
inline V sel(const V& mask, const V& a) {
  return blend(V(0), a, mask);
}

// Load m values (m <= size; a Pack clamps m to [0, size]); the other lanes read as 0.
template <typename V, typename T>
inline V ld(const T* p, int64_t m) {
  if constexpr (is_pack<V>::value) {
    using Vec = Vectorized<T>;
    constexpr int64_t VS = Vec::size();
    V r;
    for (int j = 0; j < int(V::size() / VS); ++j) {
      const int64_t mj = std::min<int64_t>(std::max<int64_t>(m - j * VS, 0), VS);
      r.v[j] = mj == VS ? Vec::loadu(p + j * VS) : (mj > 0 ? Vec::loadu(p + j * VS, mj) : Vec(0));
    }
    return r;
  } else {
    return m == V::size() ? V::loadu(p) : V::loadu(p, m);
  }
}

// Store the first m lanes of x.
template <typename V, typename T>
inline void st(const V& x, T* p, int64_t m) {
  if constexpr (is_pack<V>::value) {
    using Vec = Vectorized<T>;
    constexpr int64_t VS = Vec::size();
    for (int j = 0; j < int(V::size() / VS); ++j) {
      const int64_t mj = std::min<int64_t>(std::max<int64_t>(m - j * VS, 0), VS);
      if (mj == VS) {
        x.v[j].store(p + j * VS);
      } else if (mj > 0) {
        x.v[j].store(p + j * VS, mj);
      }
    }
  } else if (m == V::size()) {
    x.store(p);
  } else {
    x.store(p, m);
  }
}

// lanes < m
template <typename V>
inline V valid_lanes(int64_t m) {
  using T = typename V::value_type;
  using Vec = Vectorized<T>;
  constexpr int64_t VS = Vec::size();
  V r;
  for (int j = 0; j < int(V::size() / VS); ++j) r.v[j] = Vec::arange(0, 1) < Vec(T(m - j * VS));
  return r;
}

// The sum of the lanes of x, in lane order.
template <typename V>
inline typename V::value_type hsum(const V& x) {
  using T = typename V::value_type;
  T buf[V::size()];
  st(x, buf, V::size());
  T s = 0;
  for (int64_t i = 0; i < V::size(); ++i) s += buf[i];
  return s;
}

// One task of a kernel's parallel loop over a [B, C, P] map: pixels [p0, p0 + n) of image b.
// The tasks are (image, block of `block` pixels), nblk = blocks_per_image(P, block) per image;
// reductions go through per-task partial sums, so results do not depend on the thread count.
struct PixelBlock {
  int64_t b, p0, n;
};

inline int64_t blocks_per_image(int64_t P, int64_t block) { return (P + block - 1) / block; }

inline PixelBlock pixel_block(int64_t task, int64_t nblk, int64_t block, int64_t P) {
  const int64_t b = task / nblk, p0 = (task % nblk) * block;
  return {b, p0, std::min(block, P - p0)};
}

}  // namespace poincare_simd
