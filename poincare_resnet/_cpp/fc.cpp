// Fused tangent-form HNN++ FC map (FullyConnectedTangent) on NCHW maps, forward and backward.
//
// Per position (b, p) and output channel k, with per-pixel a = sinh(2t)/|p|, e = cosh(2t) and
// per-channel ch = cosh(2 sqrt(c) r_k), sh = sinh(2 sqrt(c) r_k), zn2 = 2 |z_k|:
//   q = a dots ch - e sh,  g = clamp(zn2 asinh(q), +-L),  psi = sinh(g),
//   out = kappa(|psi|) psi,  kappa = asinh(|psi|) / (2 sqrt(c) |psi|)  (capped output norm).
// The per-pixel terms come from sq = |p|^2: n = sqrt(sq), t = sqrt(c) n capped at in_limit,
//   a = sinh(2t)/n (series sqrt(c)(2 + 4t^2/3 + 4t^4/15) for small t), e = cosh(2t).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "checks.h"
#include "fastmath.h"
#include "simd.h"

#include <algorithm>
#include <vector>

using at::vec::Vectorized;
namespace fm = poincare_fastmath;
namespace ck = poincare_checks;
using poincare_simd::hsum;
using poincare_simd::ld;
using poincare_simd::st;

namespace {

constexpr int64_t kBlock = 128;  // pixels per task

template <typename T>
struct Params {
  T sc;         // sqrt(c)
  T in_limit;   // cap of t = sqrt(c)|p|
  T arg_limit;  // clamp of g
  T out_limit;  // cap of asinh(|psi|)
  T small_p;    // series threshold for kappa
  T min_norm;
};

// kappa (and kappa' |psi| when wanted) from |psi|^2, vectorised over pixels.
template <typename T>
inline void kappa_terms(const Vectorized<T>& p2, const Params<T>& prm, Vectorized<T>* kappa,
                        Vectorized<T>* kp2, Vectorized<T>* pn) {
  using V = Vectorized<T>;
  const V one(1), mn2(prm.min_norm * prm.min_norm), inv2sc(T(1) / (2 * prm.sc));
  V p = at::vec::maximum(p2, mn2).sqrt();
  V root;
  V rho = fm::asinh(p, &root);
  V small = p < V(prm.small_p);
  V clipped = rho > V(prm.out_limit);
  V series = one - p2 / V(6) + V(T(3) / T(40)) * p2 * p2;
  V kb = V::blendv(rho / p, series, small);
  V k = V::blendv(kb, V(prm.out_limit) / p, clipped) * inv2sc;
  *kappa = k;
  *pn = p;
  if (kp2 != nullptr) {
    V kser = p2 * (V(T(-1) / T(3)) + V(T(0.3)) * p2 - V(T(0.267857)) * p2 * p2);
    V kex = one / root - kb;  // root = sqrt(1 + p^2)
    V d = V::blendv(kex, kser, small) * inv2sc;
    *kp2 = V::blendv(d, V(0) - k, clipped);
  }
}

// Per-pixel input terms a, e (and, for the backward, da/dsq, de/dsq) from sq.
template <typename T>
inline void input_terms(const Vectorized<T>& sq, const Params<T>& prm, Vectorized<T>* a,
                        Vectorized<T>* e, Vectorized<T>* da, Vectorized<T>* de) {
  using V = Vectorized<T>;
  const V one(1), sc(prm.sc), c(prm.sc * prm.sc);
  V n = at::vec::maximum(sq, V(prm.min_norm * prm.min_norm)).sqrt();
  V t = sc * n;
  V clipped = t > V(prm.in_limit);
  V tc = at::vec::minimum(t, V(prm.in_limit));
  V small = t < V(prm.small_p);
  V t2 = t * t;
  V two_tc = tc + tc;
  V sinh2t, cosh2t;
  fm::sinh_cosh(two_tc, &sinh2t, &cosh2t);
  V series = sc * (V(2) + t2 * (V(T(4.0 / 3)) + V(T(4.0 / 15)) * t2));
  V av = V::blendv(sinh2t / n, series, small);
  *a = av;
  *e = cosh2t;
  if (da != nullptr) {
    V n2 = n * n;
    V da_exact = (V(2) * sc * n * cosh2t - sinh2t) / (V(2) * n2 * n);
    V da_series = sc * c * (V(T(4.0 / 3)) + V(T(8.0 / 15)) * t2);
    V de_exact = sc * sinh2t / n;
    V de_series = c * (V(2) + V(T(4.0 / 3)) * t2);
    V dav = V::blendv(da_exact, da_series, small);
    V dev = V::blendv(de_exact, de_series, small);
    *da = V::blendv(dav, (V(0) - av) / (V(2) * n2), clipped);
    *de = V::blendv(dev, V(0), clipped);
  }
}

// input_terms of the n pixels of a block from sq into a, e (and, with kGrad, da, de).
template <bool kGrad, typename T>
inline void block_input_terms(const T* sq, int64_t n, const Params<T>& prm, T* a, T* e, T* da,
                              T* de) {
  using V = Vectorized<T>;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), n - i);
    V av, ev, dav, dev;
    input_terms<T>(ld<V>(sq + i, m), prm, &av, &ev, kGrad ? &dav : nullptr,
                   kGrad ? &dev : nullptr);
    st(av, a + i, m);
    st(ev, e + i, m);
    if constexpr (kGrad) {
      st(dav, da + i, m);
      st(dev, de + i, m);
    }
  }
}

template <typename T>
void forward_impl(const T* dots, const T* SQ, const T* ch, const T* sh, const T* zn2, T* out,
                  int64_t B, int64_t C, int64_t P, Params<T> prm) {
  using V = Vectorized<T>;
  const int64_t nblk = poincare_simd::blocks_per_image(P, kBlock);
  at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    T p2buf[kBlock], kbuf[kBlock], a[kBlock], e[kBlock];
    const V lim(prm.arg_limit), nlim(-prm.arg_limit);
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, p0, n] = poincare_simd::pixel_block(task, nblk, kBlock, P);
      block_input_terms<false, T>(SQ + b * P + p0, n, prm, a, e, nullptr, nullptr);
      std::fill(p2buf, p2buf + n, T(0));
      for (int64_t c = 0; c < C; ++c) {
        const T* d = dots + (b * C + c) * P + p0;
        T* o = out + (b * C + c) * P + p0;
        const V vch(ch[c]), vsh(sh[c]), vzn(zn2[c]);
        for (int64_t i = 0; i < n; i += V::size()) {
          const int64_t m = std::min<int64_t>(V::size(), n - i);
          V q = ld<V>(a + i, m) * ld<V>(d + i, m) * vch - ld<V>(e + i, m) * vsh;
          V root;
          V psi = fm::sinh_bounded(at::vec::clamp(vzn * fm::asinh(q, &root), nlim, lim));
          st(psi, o + i, m);
          st(ld<V>(p2buf + i, m) + psi * psi, p2buf + i, m);
        }
      }
      for (int64_t i = 0; i < n; i += V::size()) {
        const int64_t m = std::min<int64_t>(V::size(), n - i);
        V k, pn;
        kappa_terms<T>(ld<V>(p2buf + i, m), prm, &k, nullptr, &pn);
        st(k, kbuf + i, m);
      }
      for (int64_t c = 0; c < C; ++c) {
        T* o = out + (b * C + c) * P + p0;
        for (int64_t i = 0; i < n; i += V::size()) {
          const int64_t m = std::min<int64_t>(V::size(), n - i);
          st(ld<V>(o + i, m) * ld<V>(kbuf + i, m), o + i, m);
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const T* grad, const T* dots, const T* SQ, const T* ch, const T* sh,
                   const T* zn2, T* grad_dots, T* grad_sq, T* chan, int64_t B, int64_t C,
                   int64_t P, Params<T> prm) {
  using V = Vectorized<T>;
  const int64_t nblk = poincare_simd::blocks_per_image(P, kBlock);
  at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(3 * C * kBlock);
    T p2buf[kBlock], gpbuf[kBlock], kbuf[kBlock], cbuf[kBlock], gabuf[kBlock], gebuf[kBlock];
    T a[kBlock], e[kBlock], da[kBlock], de[kBlock];
    const V lim(prm.arg_limit), nlim(-prm.arg_limit), one(1), zero(0);
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, p0, n] = poincare_simd::pixel_block(task, nblk, kBlock, P);
      block_input_terms<true, T>(SQ + b * P + p0, n, prm, a, e, da, de);
      T* psis = scratch.data();
      T* hs = psis + C * kBlock;
      T* roots = hs + C * kBlock;
      std::fill(p2buf, p2buf + n, T(0));
      std::fill(gpbuf, gpbuf + n, T(0));
      for (int64_t c = 0; c < C; ++c) {
        const T* d = dots + (b * C + c) * P + p0;
        const T* gr = grad + (b * C + c) * P + p0;
        const V vch(ch[c]), vsh(sh[c]), vzn(zn2[c]);
        for (int64_t i = 0; i < n; i += V::size()) {
          const int64_t m = std::min<int64_t>(V::size(), n - i);
          V q = ld<V>(a + i, m) * ld<V>(d + i, m) * vch - ld<V>(e + i, m) * vsh;
          V root;
          V h = fm::asinh(q, &root);
          V psi = fm::sinh_bounded(at::vec::clamp(vzn * h, nlim, lim));
          st(psi, psis + c * kBlock + i, m);
          st(h, hs + c * kBlock + i, m);
          st(root, roots + c * kBlock + i, m);  // sqrt(1 + q^2)
          st(ld<V>(p2buf + i, m) + psi * psi, p2buf + i, m);
          st(ld<V>(gpbuf + i, m) + ld<V>(gr + i, m) * psi, gpbuf + i, m);
        }
      }
      for (int64_t i = 0; i < n; i += V::size()) {
        const int64_t m = std::min<int64_t>(V::size(), n - i);
        V k, kp2, pn;
        kappa_terms<T>(ld<V>(p2buf + i, m), prm, &k, &kp2, &pn);
        st(k, kbuf + i, m);
        st((kp2 / pn) * (ld<V>(gpbuf + i, m) / pn), cbuf + i, m);  // ordered against underflow
      }
      std::fill(gabuf, gabuf + n, T(0));
      std::fill(gebuf, gebuf + n, T(0));
      T* chan_t = chan + task * 3 * C;
      for (int64_t c = 0; c < C; ++c) {
        const T* d = dots + (b * C + c) * P + p0;
        const T* gr = grad + (b * C + c) * P + p0;
        T* gd = grad_dots != nullptr ? grad_dots + (b * C + c) * P + p0 : nullptr;
        const V vch(ch[c]), vsh(sh[c]), vzn(zn2[c]);
        V zacc(0), cacc(0), sacc(0);
        for (int64_t i = 0; i < n; i += V::size()) {
          const int64_t m = std::min<int64_t>(V::size(), n - i);
          V psi = ld<V>(psis + c * kBlock + i, m);
          V h = ld<V>(hs + c * kBlock + i, m);
          // sqrt(1 + q^2) >= 1; the max keeps the zero-filled tail lanes finite
          V root = at::vec::maximum(ld<V>(roots + c * kBlock + i, m), one);
          V gg = ld<V>(kbuf + i, m) * ld<V>(gr + i, m) + ld<V>(cbuf + i, m) * psi;
          // no gradient where g was clamped; NaN (not clamped) passes through
          V clamped = (vzn * h).abs() > lim;
          gg = V::blendv(gg * (one + psi * psi).sqrt(), zero, clamped);
          zacc = zacc + gg * h;
          V gq = gg * vzn / root;
          V av = ld<V>(a + i, m), dv = ld<V>(d + i, m);
          if (gd != nullptr) st(gq * av * vch, gd + i, m);
          V gqd = gq * dv;
          st(ld<V>(gabuf + i, m) + gqd * vch, gabuf + i, m);
          st(ld<V>(gebuf + i, m) - gq * vsh, gebuf + i, m);
          cacc = cacc + gqd * av;
          sacc = sacc - gq * ld<V>(e + i, m);
        }
        chan_t[c] = hsum(zacc);
        chan_t[C + c] = hsum(cacc);
        chan_t[2 * C + c] = hsum(sacc);
      }
      T* gs = grad_sq + b * P + p0;
      for (int64_t i = 0; i < n; i += V::size()) {
        const int64_t m = std::min<int64_t>(V::size(), n - i);
        st(ld<V>(gabuf + i, m) * ld<V>(da + i, m) + ld<V>(gebuf + i, m) * ld<V>(de + i, m),
           gs + i, m);
      }
    }
  });
}

// dots [B, C, P], sq [B, P] and the per-channel ch, sh, zn2 [C]: all contiguous CPU tensors of
// dots' dtype (checked before any pointer is taken).
void check_inputs(const char* op, const torch::Tensor& dots, const torch::Tensor& sq,
                  const torch::Tensor& ch, const torch::Tensor& sh, const torch::Tensor& zn2) {
  ck::check_map(op, "dots", dots, 3, "[B, C, P]");
  const auto dtype = dots.scalar_type();
  ck::check_tensor(op, "sq", sq, dtype, "the dtype of dots");
  ck::check_sizes(op, "sq", sq, {dots.size(0), dots.size(2)}, "[B, P] for dots [B, C, P]");
  const int64_t C = dots.size(1);
  ck::check_tensor(op, "ch", ch, dtype, "the dtype of dots");
  ck::check_numel(op, "ch", ch, C, "one per output channel");
  ck::check_tensor(op, "sh", sh, dtype, "the dtype of dots");
  ck::check_numel(op, "sh", sh, C, "one per output channel");
  ck::check_tensor(op, "zn2", zn2, dtype, "the dtype of dots");
  ck::check_numel(op, "zn2", zn2, C, "one per output channel");
}

template <typename T>
Params<T> make_params(double sc, double in_limit, double arg_limit, double out_limit,
                      double small, double min_norm) {
  return Params<T>{T(sc), T(in_limit), T(arg_limit), T(out_limit), T(small), T(min_norm)};
}

torch::Tensor fc_forward(torch::Tensor dots, torch::Tensor sq, torch::Tensor ch,
                         torch::Tensor sh, torch::Tensor zn2, double sc, double in_limit,
                         double arg_limit, double out_limit, double small, double min_norm) {
  check_inputs("fc_forward", dots, sq, ch, sh, zn2);
  auto out = torch::empty_like(dots);
  const int64_t B = dots.size(0), C = dots.size(1), P = dots.size(2);
  AT_DISPATCH_FLOATING_TYPES(dots.scalar_type(), "fc_forward", [&] {
    forward_impl<scalar_t>(dots.data_ptr<scalar_t>(), sq.data_ptr<scalar_t>(),
                           ch.data_ptr<scalar_t>(), sh.data_ptr<scalar_t>(),
                           zn2.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, C, P,
                           make_params<scalar_t>(sc, in_limit, arg_limit, out_limit, small,
                                                 min_norm));
  });
  return out;
}

// Returns (grad_dots or undefined, grad_sq [B, P], chan [3, C]) where chan holds
// (dL/d zn2, dL/d ch, dL/d sh).
std::vector<torch::Tensor> fc_backward(torch::Tensor grad, torch::Tensor dots, torch::Tensor sq,
                                       torch::Tensor ch, torch::Tensor sh, torch::Tensor zn2,
                                       double sc, double in_limit, double arg_limit,
                                       double out_limit, double small, double min_norm,
                                       bool need_dots) {
  check_inputs("fc_backward", dots, sq, ch, sh, zn2);
  ck::check_tensor("fc_backward", "grad", grad, dots.scalar_type(), "the dtype of dots");
  ck::check_sizes("fc_backward", "grad", grad, dots.sizes(), "the shape of dots");
  const int64_t B = dots.size(0), C = dots.size(1), P = dots.size(2);
  const int64_t nblk = poincare_simd::blocks_per_image(P, kBlock);
  auto grad_dots = need_dots ? torch::empty_like(dots) : torch::Tensor();
  auto grad_sq = torch::empty_like(sq);
  auto chan = torch::empty({B * nblk, 3, C}, dots.options());
  AT_DISPATCH_FLOATING_TYPES(dots.scalar_type(), "fc_backward", [&] {
    backward_impl<scalar_t>(grad.data_ptr<scalar_t>(), dots.data_ptr<scalar_t>(),
                            sq.data_ptr<scalar_t>(), ch.data_ptr<scalar_t>(),
                            sh.data_ptr<scalar_t>(), zn2.data_ptr<scalar_t>(),
                            need_dots ? grad_dots.data_ptr<scalar_t>() : nullptr,
                            grad_sq.data_ptr<scalar_t>(), chan.data_ptr<scalar_t>(), B, C, P,
                            make_params<scalar_t>(sc, in_limit, arg_limit, out_limit, small,
                                                  min_norm));
  });
  return {grad_dots, grad_sq, chan.sum(0)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fc_forward", &fc_forward, "fused tangent FC forward");
  m.def("fc_backward", &fc_backward, "fused tangent FC backward");
}
