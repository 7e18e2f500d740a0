// Poincare midpoint batch norm on NCHW tangent maps: the passes over the map, forward and
// hand-written backward, and their bindings.
//
// Per pixel (see poincare_resnet/nn/_closed_forms.py::batchnorm_forward, which this reproduces):
//   x = expmap0(v) = ax v,   m = (-mu) (+) x = A (x - mu) - B mu   (formed explicitly),
//   mn = |project(m)|,  at = atanh(sqrt(c) mn)   (d(x, mu) = 2 at / sqrt(c)),
//   w = r (x) m = s_w m,  w' = gyr[beta, -mu] w = e_mu mu + e_w m + e_b beta,
//   o = beta (+) w' = o_mu mu + o_w m + o_b beta,  out = logmap0(project(o)) = lg o.
// All Mobius maths is scalar arithmetic per pixel on a few inner products (batchnorm_pixel.h);
// the channel loops here only form those inner products and the final combination. Each pack
// of pixels (two SIMD vectors) runs the whole chain with its C channel lines hot in L1. Tasks
// are (image, block of kBlock pixels); reductions go through per-task partial sums, so results
// do not depend on the thread count. The [C]-sized maths between the reductions of the train
// mode is in batchnorm_channels.h.
//
// Kernels (the bindings at the end):
//   mid_forward        v -> [sum gamma^2 x (C), sum gamma^2]              (gyromidpoint sums)
//   bn_var             (v, mu) -> S = sum at^2                             (batch variance)
//   bn_out             (v, mu, beta, r) -> out                             (eval mode)
//   bn_backward        gradients of <g, out> w.r.t. v, mu, beta, r         (eval mode)
//   bn_train_forward / bn_train_backward: the whole map with batch statistics (the above plus
//                      the [C]-sized maths between the reductions), one call each way
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "batchnorm_channels.h"
#include "batchnorm_pixel.h"
#include "checks.h"
#include "simd.h"

#include <algorithm>
#include <vector>

using at::vec::Vectorized;
using namespace poincare_bn;
using poincare_simd::hsum;
using poincare_simd::ld;
using poincare_simd::Pack;
using poincare_simd::pixel_block;
using poincare_simd::st;
using poincare_simd::valid_lanes;

namespace {

constexpr int64_t kBlock = 256;  // pixels per task

// SIMD vectors per pack (measured on AVX512: 2 beats 1 by ~25% in forward and backward).
constexpr int kPackForward = 2;
constexpr int kPackBackward = 2;

// ---------------------------------------------------------------- midpoint sums
// Per pixel, with gamma^2 = 1 / (1 - c|x|^2) and x = ax v (radial_gamma): the sums over the
// pixels of gamma^2 x = (g2 ax) v (C columns) and of gamma^2 (one more).

template <typename T>
void mid_forward_impl(const T* v, T* part, int64_t B, int64_t C, int64_t P,
                      const Consts<T>& k) {
  using V = Pack<T, kPackForward>;
  const int64_t nblk = poincare_simd::blocks_per_image(P, kBlock);
  constexpr int64_t VS = V::size();
  at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc((C + 1) * VS);
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, p0, n] = pixel_block(task, nblk, kBlock, P);
      const T* vb = v + b * C * P + p0;
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t i = 0; i < n; i += VS) {
        const int64_t m = std::min<int64_t>(VS, n - i);
        const V valid = valid_lanes<V>(m);
        V n2(0);
        for (int64_t ch = 0; ch < C; ++ch) {
          const V x = ld<V>(vb + ch * P + i, m);
          n2 = n2 + x * x;
        }
        V nn, t, th, ax, g2;
        radial_gamma(n2, k, &nn, &t, &th, &ax, &g2);
        const V w = g2 * ax;
        for (int64_t ch = 0; ch < C; ++ch) {
          const V x = ld<V>(vb + ch * P + i, m);
          st(ld<V>(acc.data() + ch * VS, VS) + x * w, acc.data() + ch * VS, VS);
        }
        st(ld<V>(acc.data() + C * VS, VS) + sel(valid, g2), acc.data() + C * VS, VS);
      }
      for (int64_t ch = 0; ch <= C; ++ch) {
        part[task * (C + 1) + ch] = hsum(ld<V>(acc.data() + ch * VS, VS));
      }
    }
  });
}

// Adds to grad_v the gradient of the train map through the midpoint sums and the variance:
//   grad_v += w g_s1 + 2 g_n2 v  +  g_var (var_a v + var_b mu)
// with w = g2 ax (the weight of v in the sums), g_s1 [C], g_s0 the adjoints of the sums, and
// g_n2 the adjoint of |v|^2 through g2 and ax (radial_gamma, in reverse):
//   g_g2 = g_s0 + <g_s1, v> ax,  g_ax = <g_s1, v> g2,
//   g2 = 1 / max(1 - th^2, min),  ax = th / t,  th = tanh(min(t, t_max)),  t = sqrt(c) |v|.
// var_a, var_b [B, P] hold the variance's gradient with unit weight in coefficient form, as
// backward_impl<true> left it (dS/dv_c = var_a v_c + var_b mu_c); g_var = dL/dS.
template <typename T>
void mid_backward_impl(const T* v, const T* g_s1, T g_s0, T* grad_v, int64_t B, int64_t C,
                       int64_t P, const Consts<T>& k, const T* var_a, const T* var_b,
                       const T* mu, T g_var) {
  using V = Pack<T, kPackBackward>;
  const int64_t nblk = poincare_simd::blocks_per_image(P, kBlock);
  constexpr int64_t VS = V::size();
  at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    const V one(1);
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, p0, n] = pixel_block(task, nblk, kBlock, P);
      const T* vb = v + b * C * P + p0;
      T* gvb = grad_v + b * C * P + p0;
      for (int64_t i = 0; i < n; i += VS) {
        const int64_t m = std::min<int64_t>(VS, n - i);
        V n2(0), gv(0);  // |v|^2, <g_s1, v>
        for (int64_t ch = 0; ch < C; ++ch) {
          const V x = ld<V>(vb + ch * P + i, m);
          n2 = n2 + x * x;
          gv = gv + x * V(g_s1[ch]);
        }
        V nn, t, th, ax, g2;
        radial_gamma(n2, k, &nn, &t, &th, &ax, &g2);
        const V w = g2 * ax;
        const V g_g2 = V(g_s0) + gv * ax;
        const V g_ax = gv * g2;
        const V e_ok = (one - th * th) >= V(k.min_norm);
        V g_th = sel(e_ok, V(2) * th * g2 * g2 * g_g2) + g_ax / t;
        V g_t = (ax / t * g_ax).neg() + sel(t <= V(k.t_max), g_th * (one - th * th));
        const V g_n2 = sel(n2 >= V(k.min_norm2), V(k.sc) * g_t / (V(2) * nn));
        const int64_t pix = b * P + p0 + i;
        const V v_coef = V(2) * g_n2 + V(g_var) * ld<V>(var_a + pix, m);
        const V mu_coef = V(g_var) * ld<V>(var_b + pix, m);
        for (int64_t ch = 0; ch < C; ++ch) {
          const V x = ld<V>(vb + ch * P + i, m);
          V gv = w * V(g_s1[ch]) + v_coef * x;
          gv = gv + mu_coef * V(mu[ch]);
          gv = gv + ld<V>(gvb + ch * P + i, m);
          st(gv, gvb + ch * P + i, m);
        }
      }
    }
  });
}

// ---------------------------------------------------------------- variance and output
// Per pixel pack, two passes over the channels form every inner product the chain needs:
//   pass 1: |v|^2 (then centre_expmap: ax), and (kDots) <v, mu>, <v, beta>, <g, mu>,
//           <g, beta>, <g, v>;
//   pass 2: with d = ax v - mu formed explicitly, |d|^2, <d, mu>, <d, beta> (with beta) and
//           (kDots) <d, v>, <g, d>;
// then centre_coefficients (A, B). Since m = A d - B mu, the products of m follow from those
// of d with no cancellation between large terms (d is the small vector):
//   |m|^2 = A^2 |d|^2 - 2AB <d, mu> + B^2 |mu|^2,  <m, mu> = A <d, mu> - B |mu|^2, ...
template <typename V>
struct PixelProducts {
  PixelCentre<V> s;
  V dmu{0}, db{0}, dv{0}, vm{0}, vb{0};     // <d, mu>, <d, beta>, <d, v>, <v, mu>, <v, beta>
  V g_mu{0}, g_b{0}, g_v{0}, g_d{0};        // <g, mu>, <g, beta>, <g, v>, <g, d>
  V q, mm, mb, md, mv, g_m;                 // |m|^2, <m, mu>, <m, beta>, <m, d>, <m, v>, <g, m>
};

// The products of the pixels [i, i + m) of a block (vb, gb: its v and output gradient g).
// kDots (backward): also the products with v and g; beta: nullptr when not wanted (variance).
template <bool kDots, typename V>
inline void pixel_products(PixelProducts<V>& f, const typename V::value_type* vb,
                           const typename V::value_type* gb, int64_t P, int64_t C, int64_t i,
                           int64_t m, const typename V::value_type* mu,
                           const typename V::value_type* beta,
                           const Consts<typename V::value_type>& k) {
  V n2(0);
  for (int64_t ch = 0; ch < C; ++ch) {
    const V x = ld<V>(vb + ch * P + i, m);
    n2 = n2 + x * x;
    if constexpr (kDots) {
      const V muc(mu[ch]);
      f.vm = f.vm + x * muc;
      f.vb = f.vb + x * V(beta[ch]);
      const V g = ld<V>(gb + ch * P + i, m);
      f.g_mu = f.g_mu + g * muc;
      f.g_b = f.g_b + g * V(beta[ch]);
      f.g_v = f.g_v + g * x;
    }
  }
  f.s.n2 = n2;
  centre_expmap(f.s, k);
  V d2(0);
  for (int64_t ch = 0; ch < C; ++ch) {
    const V x = ld<V>(vb + ch * P + i, m);
    const V muc(mu[ch]);
    const V d = f.s.ax * x - muc;
    d2 = d2 + d * d;
    f.dmu = f.dmu + d * muc;
    if (beta != nullptr) f.db = f.db + d * V(beta[ch]);
    if constexpr (kDots) {
      f.dv = f.dv + d * x;
      f.g_d = f.g_d + ld<V>(gb + ch * P + i, m) * d;
    }
  }
  f.s.d2 = d2;
  centre_coefficients(f.s, k);
  const V A = f.s.A, B = f.s.B, m2(k.m2);
  f.q = A * A * d2 - V(2) * A * B * f.dmu + B * B * m2;
  f.mm = A * f.dmu - B * m2;
  f.mb = A * f.db - B * V(k.bm);
  f.md = A * d2 - B * f.dmu;
  f.mv = A * f.dv - B * f.vm;
  f.g_m = A * f.g_d - B * f.g_mu;
}

// m = A (ax v - mu) - B mu for one channel
template <typename V>
inline V form_m(const PixelCentre<V>& s, const V& x, const V& muc, V* d_out = nullptr) {
  const V d = s.ax * x - muc;
  if (d_out != nullptr) *d_out = d;
  return s.A * d - s.B * muc;
}

// The per-task sums of at^2 = atanh(sqrt(c) |project((-mu) (+) x)|)^2 (the batch variance is
// 4 / (c N) times their total).
template <typename T>
void var_impl(const T* v, const T* mu, T* part, int64_t B, int64_t C, int64_t P,
              const Consts<T>& k) {
  using V = Pack<T, kPackForward>;
  const int64_t nblk = poincare_simd::blocks_per_image(P, kBlock);
  constexpr int64_t VS = V::size();
  at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, p0, n] = pixel_block(task, nblk, kBlock, P);
      const T* vb = v + b * C * P + p0;
      V acc(0);
      for (int64_t i = 0; i < n; i += VS) {
        const int64_t m = std::min<int64_t>(VS, n - i);
        PixelProducts<V> f;
        pixel_products<false>(f, vb, nullptr, P, C, i, m, mu, nullptr, k);
        PixelOutput<V> s2;
        s2.q = f.q;
        pixel_output<false>(s2, k);
        acc = acc + sel(valid_lanes<V>(m), s2.at * s2.at);
      }
      part[task] = hsum(acc);
    }
  });
}

// out = lg o = k_mu mu + k_b beta + k_w m per channel (k_* = lg o_*).
template <typename T>
void out_impl(const T* v, const T* mu, const T* beta, T* out, int64_t B, int64_t C, int64_t P,
              const Consts<T>& k) {
  using V = Pack<T, kPackForward>;
  const int64_t nblk = poincare_simd::blocks_per_image(P, kBlock);
  constexpr int64_t VS = V::size();
  at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, p0, n] = pixel_block(task, nblk, kBlock, P);
      const T* vb = v + b * C * P + p0;
      T* ob = out + b * C * P + p0;
      for (int64_t i = 0; i < n; i += VS) {
        const int64_t m = std::min<int64_t>(VS, n - i);
        PixelProducts<V> f;
        pixel_products<false>(f, vb, nullptr, P, C, i, m, mu, beta, k);
        PixelOutput<V> s2;
        s2.q = f.q;
        s2.mm = f.mm;
        s2.mb = f.mb;
        pixel_output<true>(s2, k);
        const V k_mu = s2.lg * s2.o_mu, k_b = s2.lg * s2.o_b, k_w = s2.lg * s2.o_w;
        for (int64_t ch = 0; ch < C; ++ch) {
          const V muc(mu[ch]);
          const V mv = form_m(f.s, ld<V>(vb + ch * P + i, m), muc);
          st(k_mu * muc + k_b * V(beta[ch]) + k_w * mv, ob + ch * P + i, m);
        }
      }
    }
  });
}

// Backward of L = <g, out>. part: [tasks, 2 C + kGlobals] holding the per-task sums of the mu
// and beta channel adjoints and of the global-scalar adjoints (GlobalGrads).
// With gm = adjoint of m = k_w g + 2 g_q m + g_mm mu + g_mb beta (its products with d, mu and v
// follow from those of its four terms) and gd = adjoint of d = A gm + 2 g_d2 d:
//   grad v = ax gd + 2 g_n2 v,  grad mu += k_mu g + g_mm m - gd - B gm,
//   grad beta += k_b g + g_mb m.
//
// kVar (train mode): also the gradient of S = sum at^2 with unit weight, which the caller
// scales by g_S = dL/dS once this pass has reduced dL/dr. Per pixel it is
//   dS/dv_c = var_a x_c + var_b mu_c   (stored in var_a, var_b [B, P]: two scalars a pixel),
// and dS/dmu_c sums to  sum_p (var_mu_x x_c) + mu_c (sum_p var_mu_mu) + 2 G_m2 mu_c  (part:
// C + 2 more columns). Derivation: with gm = 2 g_q m, gd = A gm + 2 g_d2 d, m = A d - B mu,
// d = ax x - mu,
//   gd = gd_d d + gd_mu mu  (gd_d = 2 g_q A^2 + 2 g_d2, gd_mu = -2 g_q A B),
//   dS/dv = ax gd + 2 g_n2 x,   dS/dmu (per pixel) = -gd - B gm.
template <typename T, bool kVar = false>
void backward_impl(const T* v, const T* mu, const T* beta, const T* grad, T* grad_v, T* part,
                   int64_t B, int64_t C, int64_t P, const Consts<T>& k, T* var_a = nullptr,
                   T* var_b = nullptr) {
  using V = Pack<T, kPackBackward>;
  const int64_t nblk = poincare_simd::blocks_per_image(P, kBlock);
  constexpr int64_t VS = V::size();
  const int64_t width = 2 * C + kGlobals + (kVar ? C + 2 : 0);
  at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    // per lane: the mu (C) and beta (C) channel adjoints, and (kVar) var_mu_x x_c (C)
    std::vector<T> acc((kVar ? 3 : 2) * C * VS);
    const V two(2);
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, p0, n] = pixel_block(task, nblk, kBlock, P);
      const T* vb = v + b * C * P + p0;
      const T* gb = grad + b * C * P + p0;
      T* gvb = grad_v + b * C * P + p0;
      std::fill(acc.begin(), acc.end(), T(0));
      GlobalGrads<V> glob, var_glob;
      V var_mu_mu(0);
      for (int64_t i = 0; i < n; i += VS) {
        const int64_t m = std::min<int64_t>(VS, n - i);
        PixelProducts<V> f;
        pixel_products<true>(f, vb, gb, P, C, i, m, mu, beta, k);
        const PixelCentre<V>& s1 = f.s;
        PixelOutput<V> s2;
        s2.q = f.q;
        s2.mm = f.mm;
        s2.mb = f.mb;
        pixel_output<true>(s2, k);
        // the output's adjoint seeds k_mu, k_b, k_w (<g, mu>, <g, beta>, <g, m>), none on at
        V g_q, g_mm, g_mb;
        pixel_output_backward<true>(s2, k, f.g_mu, f.g_b, f.g_m, V(0), &g_q, &g_mm, &g_mb, glob);
        const V k_mu = s2.lg * s2.o_mu, k_b = s2.lg * s2.o_b, k_w = s2.lg * s2.o_w;
        // <gm, d>, <gm, mu>, <gm, v> from the products of gm's four terms
        const V two_gq = two * g_q;
        const V gm_d = k_w * f.g_d + two_gq * f.md + g_mm * f.dmu + g_mb * f.db;
        const V gm_mu = k_w * f.g_mu + two_gq * f.mm + g_mm * V(k.m2) + g_mb * V(k.bm);
        const V gm_v = k_w * f.g_v + two_gq * f.mv + g_mm * f.vm + g_mb * f.vb;
        // m = A d - B mu: g_A = <gm, d>, g_B = -<gm, mu>
        V g_n2, g_d2;
        centre_backward(s1, k, gm_d, gm_mu.neg(), gm_v, f.dv, &g_n2, &g_d2, glob);
        const V two_gn2 = two * g_n2, two_gd2 = two * g_d2;
        V var_mu_x(0);
        if constexpr (kVar) {
          // the same chain seeded with dS/dat = 2 at alone (gm = 2 g_q m)
          V g_q_var, g_mm_var, g_mb_var;
          const V zero(0);
          pixel_output_backward<false>(s2, k, zero, zero, zero, sel(valid_lanes<V>(m), two * s2.at),
                                       &g_q_var, &g_mm_var, &g_mb_var, var_glob);
          const V two_gq_var = two * g_q_var;
          V g_n2_var, g_d2_var;
          centre_backward(s1, k, two_gq_var * f.md, (two_gq_var * f.mm).neg(), two_gq_var * f.mv,
                          f.dv, &g_n2_var, &g_d2_var, var_glob);
          const V A = s1.A, Bc = s1.B, ax = s1.ax;
          const V gd_d = two_gq_var * A * A + two * g_d2_var;
          const V gd_mu = (two_gq_var * A * Bc).neg();
          const int64_t pix = b * P + p0 + i;
          st(gd_d * ax * ax + two * g_n2_var, var_a + pix, m);
          st(ax * (gd_mu - gd_d), var_b + pix, m);
          const V two_gq_ab = two_gq_var * A * Bc;
          var_mu_x = ((gd_d + two_gq_ab) * ax).neg();
          var_mu_mu = var_mu_mu + sel(valid_lanes<V>(m),
                                      gd_d - gd_mu + two_gq_ab + two_gq_var * Bc * Bc);
        }
        // the channel pass: grad v, and the mu, beta (and variance) channel adjoints
        for (int64_t ch = 0; ch < C; ++ch) {
          const V x = ld<V>(vb + ch * P + i, m);
          const V muc(mu[ch]);
          V d;
          const V mv = form_m(s1, x, muc, &d);
          V gm = two_gq * mv + g_mm * muc;
          V g_mu_c = g_mm * mv;
          T* acc_mu = acc.data() + ch * VS;
          const V g = ld<V>(gb + ch * P + i, m);  // (after gm's first terms: same rounding)
          const V bc(beta[ch]);
          gm = gm + k_w * g + g_mb * bc;
          g_mu_c = g_mu_c + k_mu * g;
          T* acc_beta = acc.data() + (C + ch) * VS;
          st(ld<V>(acc_beta, VS) + k_b * g + g_mb * mv, acc_beta, VS);
          const V gd = s1.A * gm + two_gd2 * d;
          g_mu_c = g_mu_c - gd - s1.B * gm;
          st(ld<V>(acc_mu, VS) + g_mu_c, acc_mu, VS);
          st(s1.ax * gd + two_gn2 * x, gvb + ch * P + i, m);
          if constexpr (kVar) {
            T* acc_var = acc.data() + (2 * C + ch) * VS;
            st(ld<V>(acc_var, VS) + var_mu_x * x, acc_var, VS);
          }
        }
      }
      T* pt = part + task * width;
      for (int64_t ch = 0; ch < 2 * C; ++ch) pt[ch] = hsum(ld<V>(acc.data() + ch * VS, VS));
      if constexpr (kVar) {
        T* pv = pt + 2 * C + kGlobals;
        for (int64_t ch = 0; ch < C; ++ch) pv[ch] = hsum(ld<V>(acc.data() + (2 * C + ch) * VS, VS));
        pv[C] = hsum(var_mu_mu);
        pv[C + 1] = hsum(var_glob.m2);
      }
      pt[2 * C + 0] = hsum(glob.m2);
      pt[2 * C + 1] = hsum(glob.b2);
      pt[2 * C + 2] = hsum(glob.bm);
      pt[2 * C + 3] = hsum(glob.gd);
      pt[2 * C + 4] = hsum(glob.big_b2);
      pt[2 * C + 5] = hsum(glob.uv);
      pt[2 * C + 6] = hsum(glob.r);
    }
  });
}

// ---------------------------------------------------------------- bindings
// v: a contiguous [B, C, ...] map; P = the product of the trailing sizes. The Python side
// passes [B, C, H*W] views: torch.compile then saves and passes the kernels' buffers as they
// are (a 4-D map downstream of a convolution gets a channels-last copy when it is saved).
int64_t pixels(const torch::Tensor& v) {
  const int64_t rows = v.size(0) * v.size(1);
  return rows == 0 ? 0 : v.numel() / rows;
}

namespace ck = poincare_checks;

void check_map(const char* op, const torch::Tensor& v) {
  ck::check_map(op, "v", v, -3, "a [B, C, ...] map");
}

// A per-channel vector of v's dtype: C elements, contiguous, on the CPU.
void check_vec(const char* op, const char* name, const torch::Tensor& t, const torch::Tensor& v,
               const char* what = "one per channel") {
  ck::check_tensor(op, name, t, v.scalar_type(), "the dtype of v");
  ck::check_numel(op, name, t, v.size(1), what);
}

// The bias (any floating dtype: read once, converted to double): C elements on the CPU.
void check_bias(const char* op, const torch::Tensor& beta_t, const torch::Tensor& v) {
  TORCH_CHECK(beta_t.defined() && beta_t.device().is_cpu(), op,
              ": beta_t (the bias) must be a CPU tensor, got one on ", beta_t.device());
  TORCH_CHECK(beta_t.is_floating_point(), op, ": beta_t (the bias) has dtype ",
              beta_t.scalar_type(), ", expected a floating dtype");
  ck::check_numel(op, "beta_t", beta_t, v.size(1), "the bias, one per channel");
}

// The output gradient: v's shape and dtype, contiguous.
void check_grad(const char* op, const torch::Tensor& g, const torch::Tensor& v) {
  ck::check_tensor(op, "grad", g, v.scalar_type(), "the dtype of v");
  ck::check_sizes(op, "grad", g, v.sizes(), "the shape of v");
}

torch::Tensor mid_forward(torch::Tensor v, double c, double t_max, double min_norm) {
  check_map("mid_forward", v);
  const int64_t B = v.size(0), C = v.size(1), P = pixels(v);
  const int64_t tasks = B * poincare_simd::blocks_per_image(P, kBlock);
  auto part = torch::zeros({std::max<int64_t>(tasks, 1), C + 1}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "mid_forward", [&] {
    auto k = make_consts<scalar_t>(c, t_max, 0.0, min_norm, nullptr, nullptr, 0, 0.0);
    mid_forward_impl<scalar_t>(v.data_ptr<scalar_t>(), part.data_ptr<scalar_t>(), B, C, P, k);
  });
  return part.sum(0);
}

torch::Tensor bn_var(torch::Tensor v, torch::Tensor mu, double c, double t_max, double proj_eps,
                     double min_norm) {
  check_map("bn_var", v);
  check_vec("bn_var", "mu", mu, v);
  const int64_t B = v.size(0), C = v.size(1), P = pixels(v);
  const int64_t tasks = B * poincare_simd::blocks_per_image(P, kBlock);
  auto part = torch::zeros({std::max<int64_t>(tasks, 1)}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "bn_var", [&] {
    const scalar_t* m = mu.data_ptr<scalar_t>();
    auto k = make_consts<scalar_t>(c, t_max, proj_eps, min_norm, m, m, C, 0.0);
    var_impl<scalar_t>(v.data_ptr<scalar_t>(), m, part.data_ptr<scalar_t>(), B, C, P, k);
  });
  return part.sum();
}

torch::Tensor bn_out(torch::Tensor v, torch::Tensor mu, torch::Tensor beta, double r, double c,
                     double t_max, double proj_eps, double min_norm) {
  check_map("bn_out", v);
  check_vec("bn_out", "mu", mu, v);
  check_vec("bn_out", "beta", beta, v);
  const int64_t B = v.size(0), C = v.size(1), P = pixels(v);
  auto out = torch::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "bn_out", [&] {
    const scalar_t* m = mu.data_ptr<scalar_t>();
    const scalar_t* bt = beta.data_ptr<scalar_t>();
    auto k = make_consts<scalar_t>(c, t_max, proj_eps, min_norm, m, bt, C, r);
    out_impl<scalar_t>(v.data_ptr<scalar_t>(), m, bt, out.data_ptr<scalar_t>(), B, C, P, k);
  });
  return out;
}

// Per-task sums of backward_impl -> (grad_mu [C], grad_beta [C], grad_r [1]): the channel
// adjoints plus what reaches mu and beta through the global scalars.
template <typename T>
void reduce_backward_part(const torch::Tensor& tot, const torch::Tensor& mu,
                          const torch::Tensor& beta, const Consts<T>& k, int64_t C,
                          torch::Tensor* grad_mu, torch::Tensor* grad_beta,
                          torch::Tensor* grad_r) {
  const T* s = tot.data_ptr<T>();
  T G_m2 = s[2 * C + 0], G_b2 = s[2 * C + 1], G_bm = s[2 * C + 2], G_gd = s[2 * C + 3];
  T G_B2 = s[2 * C + 4], G_uv = s[2 * C + 5], G_r = s[2 * C + 6];
  // gd = max(1 + 2c uv + c^2 b2 m2, min), uv = -bm, B2 = 1 - c b2
  const T gd_raw = T(1) + k.c * T(2) * (-k.bm) + k.c2 * k.b2 * k.m2;
  if (gd_raw >= k.min_norm) {
    G_uv += T(2) * k.c * G_gd;
    G_b2 += k.c2 * k.m2 * G_gd;
    G_m2 += k.c2 * k.b2 * G_gd;
  }
  G_b2 -= k.c * G_B2;
  G_bm -= G_uv;
  auto chan_mu = tot.narrow(0, 0, C);
  auto chan_b = tot.narrow(0, C, C);
  *grad_mu = chan_mu + T(2) * G_m2 * mu + G_bm * beta;
  *grad_beta = chan_b + T(2) * G_b2 * beta + G_bm * mu;
  *grad_r = torch::full({1}, G_r, tot.options());
}

// Returns (grad_v, grad_mu [C], grad_beta [C], grad_r [1]) of <grad, out>.
std::vector<torch::Tensor> bn_backward(torch::Tensor v, torch::Tensor mu, torch::Tensor beta,
                                       torch::Tensor grad, double r, double c, double t_max,
                                       double proj_eps, double min_norm) {
  check_map("bn_backward", v);
  check_vec("bn_backward", "mu", mu, v);
  check_vec("bn_backward", "beta", beta, v);
  check_grad("bn_backward", grad, v);
  const int64_t B = v.size(0), C = v.size(1), P = pixels(v);
  const int64_t tasks = B * poincare_simd::blocks_per_image(P, kBlock);
  auto grad_v = torch::empty_like(v);
  auto part = torch::zeros({std::max<int64_t>(tasks, 1), 2 * C + kGlobals}, v.options());
  torch::Tensor grad_mu, grad_beta, grad_r;
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "bn_backward", [&] {
    using T = scalar_t;
    const T* m = mu.data_ptr<T>();
    const T* bt = beta.data_ptr<T>();
    auto k = make_consts<T>(c, t_max, proj_eps, min_norm, m, bt, C, r);
    backward_impl<T>(v.data_ptr<T>(), m, bt, grad.data_ptr<T>(), grad_v.data_ptr<T>(),
                     part.data_ptr<T>(), B, C, P, k);
    reduce_backward_part<T>(part.sum(0), mu, beta, k, C, &grad_mu, &grad_beta, &grad_r);
  });
  return {grad_v, grad_mu, grad_beta, grad_r};
}

// ---------------------------------------------------------------- train mode, end to end
// Returns (out, mu [C], var [], sums [C + 1], S []): mu and var for the running statistics,
// sums and S (the two reductions) for the backward pass.
std::vector<torch::Tensor> bn_train_forward(torch::Tensor v, torch::Tensor beta_t, double w,
                                            double c, double bn_eps, double proj_eps,
                                            double t_max, double min_norm) {
  check_map("bn_train_forward", v);
  check_bias("bn_train_forward", beta_t, v);
  auto sums = mid_forward(v, c, t_max, min_norm);
  ChannelStats z = make_channel_stats(v.size(0) * pixels(v), sums, beta_t, 0.0, w, c, bn_eps,
                                      proj_eps, t_max, min_norm);
  auto mu = from_doubles(z.mu, v.options());
  auto S = bn_var(v, mu, c, t_max, proj_eps, min_norm);
  z.S = S.item<double>();
  rescale_from_variance(z);
  auto beta = from_doubles(z.beta, v.options());
  auto out = bn_out(v, mu, beta, z.r, c, t_max, proj_eps, min_norm);
  auto var = torch::full({}, z.var, v.options());
  return {out, mu, var, sums, S};
}

// Returns (grad_v or undefined, grad_bias [C] (double), grad_weight [] (double)).
std::vector<torch::Tensor> bn_train_backward(torch::Tensor v, torch::Tensor grad,
                                             torch::Tensor sums, torch::Tensor S,
                                             torch::Tensor beta_t, double w, double c,
                                             double bn_eps, double proj_eps, double t_max,
                                             double min_norm, bool need_v) {
  const char* op = "bn_train_backward";
  check_map(op, v);
  check_grad(op, grad, v);
  check_bias(op, beta_t, v);
  ck::check_tensor(op, "sums", sums, v.scalar_type(), "the dtype of v");
  ck::check_numel(op, "sums", sums, v.size(1) + 1, "C + 1 midpoint sums");
  ck::check_tensor(op, "dist", S, v.scalar_type(), "the dtype of v");
  ck::check_numel(op, "dist", S, 1, "the variance sum");
  ChannelStats z = make_channel_stats(v.size(0) * pixels(v), sums, beta_t, S.item<double>(), w,
                                      c, bn_eps, proj_eps, t_max, min_norm);
  rescale_from_variance(z);
  auto mu = from_doubles(z.mu, v.options());
  auto beta = from_doubles(z.beta, v.options());
  // Pass 1 (backward_impl): the gradient through the output map, the adjoints of mu, beta and
  // r, and (need_v) the variance sum's gradient with unit weight in coefficient form. Then the
  // [C]-sized reverse: r = |w| / sqrt(var + eps) gives g_S = dL/dS, mu's total adjoint (output
  // map + g_S through S) the sums' (midpoint_from_sums_backward). Pass 2 (mid_backward_impl)
  // adds the gradient through the sums and g_S times the variance's. Without need_v only the
  // parameters' gradients are formed: pass 1 without the variance chain.
  const int64_t B = v.size(0), C = v.size(1), P = pixels(v);
  const int64_t tasks = B * poincare_simd::blocks_per_image(P, kBlock);
  const auto& g = grad;
  auto grad_v = torch::empty_like(v);
  auto var_a = torch::empty({need_v ? B * P : 0}, v.options());
  auto var_b = torch::empty({need_v ? B * P : 0}, v.options());
  const int64_t width = 2 * C + kGlobals + (need_v ? C + 2 : 0);  // backward_impl's row layout
  auto part = torch::zeros({std::max<int64_t>(tasks, 1), width}, v.options());
  torch::Tensor res_mu, res_beta, res_r, unit_mu;
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "bn_train_backward", [&] {
    using T = scalar_t;
    const T* m = mu.data_ptr<T>();
    auto k = make_consts<T>(c, t_max, proj_eps, min_norm, m, beta.data_ptr<T>(), C, z.r);
    if (need_v) {
      backward_impl<T, true>(v.data_ptr<T>(), m, beta.data_ptr<T>(), g.data_ptr<T>(),
                             grad_v.data_ptr<T>(), part.data_ptr<T>(), B, C, P, k,
                             var_a.data_ptr<T>(), var_b.data_ptr<T>());
    } else {  // only the parameters' gradients: no variance chain
      backward_impl<T>(v.data_ptr<T>(), m, beta.data_ptr<T>(), g.data_ptr<T>(),
                       grad_v.data_ptr<T>(), part.data_ptr<T>(), B, C, P, k);
    }
    auto tot = part.sum(0);
    reduce_backward_part<T>(tot.narrow(0, 0, 2 * C + kGlobals), mu, beta, k, C, &res_mu,
                            &res_beta, &res_r);
    if (need_v) {  // dS/dmu = sum_p var_mu_x x + (sum_p var_mu_mu + 2 G_m2) mu
      auto extra = tot.narrow(0, 2 * C + kGlobals, C + 2);
      const T* e = extra.data_ptr<T>();
      unit_mu = extra.narrow(0, 0, C) + (e[C] + T(2) * e[C + 1]) * mu;
    }
  });
  const auto g_mu = to_doubles(res_mu);
  const double g_r = res_r.item<double>();
  // r = |w| / sqrt(var + eps), var = S 4 / (c N)
  const double sd = std::sqrt(z.var + z.bn_eps);
  const double g_w = g_r * (w > 0 ? 1.0 : (w < 0 ? -1.0 : 0.0)) / sd;
  const double g_var = -g_r * z.r / (2 * (z.var + z.bn_eps));
  const double g_S = g_var * 4 / (z.c * z.count);
  auto g_bt = from_doubles(centre_from_bias_backward(z, to_doubles(res_beta)), torch::kDouble);
  auto g_w_t = torch::full({}, g_w, torch::TensorOptions().dtype(torch::kDouble));
  if (!need_v) return {torch::Tensor(), g_bt, g_w_t};
  // through sigma^2 (g_S times the unit-weight gradient) and mu (the midpoint sums)
  const auto g_mu_var = to_doubles(unit_mu);
  std::vector<double> g_mu_tot(z.C);
  for (int64_t i = 0; i < z.C; ++i) g_mu_tot[i] = g_mu[i] + g_S * g_mu_var[i];
  const auto g_sums = midpoint_from_sums_backward(z, g_mu_tot);
  std::vector<double> g_s1(g_sums.begin(), g_sums.begin() + z.C);
  auto g_s1_t = from_doubles(g_s1, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "bn_train_backward_mid", [&] {
    using T = scalar_t;
    auto k = make_consts<T>(c, t_max, 0.0, min_norm, nullptr, nullptr, 0, 0.0);
    mid_backward_impl<T>(v.data_ptr<T>(), g_s1_t.data_ptr<T>(), T(g_sums[z.C]),
                         grad_v.data_ptr<T>(), B, C, P, k, var_a.data_ptr<T>(),
                         var_b.data_ptr<T>(), mu.data_ptr<T>(), T(g_S));
  });
  return {grad_v, g_bt, g_w_t};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mid_forward", &mid_forward, "gyromidpoint sums [sum gamma^2 x, sum gamma^2]");
  m.def("bn_var", &bn_var, "sum of atanh(sqrt(c) |(-mu) + x|)^2 over pixels");
  m.def("bn_out", &bn_out, "batch-norm output map");
  m.def("bn_backward", &bn_backward, "batch-norm backward");
  m.def("bn_train_forward", &bn_train_forward, "batch norm with batch statistics");
  m.def("bn_train_backward", &bn_train_backward, "backward of bn_train_forward");
}
