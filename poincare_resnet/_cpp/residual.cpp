// Fused Poincaré residual on tangent maps [B, C, P], forward and hand-written backward.
//
// Per pixel, with u = a f (a = the SkipInit scale) and r = res:
//   x_f = expmap0(u) = af u,  x_r = expmap0(r) = ar r    (radial factors, tanh clamped at t_max)
//   o = x ⊕ y  (x, y = x_f, x_r, or swapped when f_first is false) = K f + cr r
//   out = logmap0(project(o)) = lg o,  lg = atanh(min(√c‖o‖, 1 − eps)) / (√c‖o‖)
// The per-pixel scalars depend on the channel sums Sff = ‖f‖², Srr = ‖r‖², Sfr = ⟨f, r⟩ only;
// o is formed explicitly and its norm taken from it, as the PyTorch closed form
// (poincare_resnet/nn/_closed_forms.py::residual_forward) does, with the same clamps. The backward
// is the line-by-line adjoint of that straight-line per-pixel code (the same operations
// autograd differentiates), so both paths agree to rounding: ~1e-15 relative in float64,
// ~1e-5 in float32 (tanh and atanh are evaluated from exp/log1p here, divisions by shared
// reciprocals). Per task (one block of up to 128 pixels of one image): one pass over the
// channels for the sums, the per-pixel scalars, then the output pass(es) in register chunks.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "checks.h"
#include "simd.h"

#include <algorithm>
#include <numeric>
#include <vector>

using at::vec::Vectorized;
using poincare_simd::ld;
using poincare_simd::sel;
using poincare_simd::st;

namespace {

constexpr int64_t kBlock = 128;  // pixels per task

template <typename T>
struct Params {
  T c, sc, two_c, c2, inv_c, half_c, t_max, s_max, mn, mn2, a;
  bool f_first;
};

template <typename T>
Params<T> make_params(double a, double c, double proj_eps, double t_max, bool f_first) {
  const double mn = 1e-15;  // MIN_NORM of poincare_resnet.ball.config
  return Params<T>{T(c),     T(std::sqrt(c)),  T(2 * c), T(c * c),   T(1 / c), T(c / 2),
                   T(t_max), T(1 - proj_eps), T(mn),    T(mn * mn), T(a),     f_first};
}

// tanh(u) for u >= 0: (1 − e^{−2u}) / (1 + e^{−2u}) (one exp, much cheaper than SLEEF's tanh),
// and its Taylor series below a threshold where 1 − e^{−2u} would lose relative accuracy.
template <typename T>
inline Vectorized<T> tanh_pos(const Vectorized<T>& u) {
  using V = Vectorized<T>;
  const V one(1);
  const T small_u = sizeof(T) == 4 ? T(0.3) : T(0.05);
  V e = (V(T(-2)) * u).exp();
  V big = (one - e) / (one + e);
  V u2 = u * u;
  V poly = V(T(-929569.0 / 638512875.0));
  poly = at::vec::fmadd(poly, u2, V(T(21844.0 / 6081075.0)));
  poly = at::vec::fmadd(poly, u2, V(T(-1382.0 / 155925.0)));
  poly = at::vec::fmadd(poly, u2, V(T(62.0 / 2835.0)));
  poly = at::vec::fmadd(poly, u2, V(T(-17.0 / 315.0)));
  poly = at::vec::fmadd(poly, u2, V(T(2.0 / 15.0)));
  poly = at::vec::fmadd(poly, u2, V(T(-1.0 / 3.0)));
  V series = at::vec::fmadd(u * u2, poly, u);
  return sel(u < V(small_u), series, big);
}

// atanh(s) for 0 <= s < 1 as log1p(2s / (1 − s)) / 2 (cheaper than SLEEF's atanh).
template <typename T>
inline Vectorized<T> atanh_pos(const Vectorized<T>& s) {
  using V = Vectorized<T>;
  return V(T(0.5)) * (V(T(2)) * s / (V(T(1)) - s)).log1p();
}

// x = expmap0(v) = al v for ‖v‖² = n2:  n = √max(n2, mn²), z = √c n, th = tanh(min(z, t_max)),
// al = th / z. (Divisions are taken once, as reciprocals: they cost more than the rest.)
template <typename T>
struct Radial {
  Vectorized<T> n2, z, inv_z, th, al;
};

template <typename T>
inline Radial<T> radial_fwd(const Vectorized<T>& n2, const Params<T>& p) {
  using V = Vectorized<T>;
  Radial<T> r;
  r.n2 = n2;
  r.z = V(p.sc) * at::vec::maximum(n2, V(p.mn2)).sqrt();
  r.inv_z = V(T(1)) / r.z;
  r.th = tanh_pos<T>(at::vec::minimum(r.z, V(p.t_max)));
  r.al = r.th * r.inv_z;
  return r;
}

// Adjoint: (dL/d al, dL/d th) -> dL/d n2.
template <typename T>
inline Vectorized<T> radial_bwd(const Radial<T>& r, const Vectorized<T>& d_al,
                                const Vectorized<T>& d_th, const Params<T>& p) {
  using V = Vectorized<T>;
  const V one(1), zero(0);
  V d_th_t = d_th + d_al * r.inv_z;
  V d_z = (zero - d_al) * r.al * r.inv_z;                    // al = th / z
  V d_u = d_th_t * (one - r.th * r.th);                      // th = tanh(u)
  d_z = d_z + sel(r.z <= V(p.t_max), d_u, zero);             // u = min(z, t_max)
  V d_n2 = V(p.half_c) * d_z * r.inv_z;                      // z = √c √n2
  return sel(r.n2 >= V(p.mn2), d_n2, zero);                  // clamp at mn²
}

// The per-pixel scalars of the Möbius sum from the channel sums.
template <typename T>
struct Pixel {
  Radial<T> rf, rr;
  Vectorized<T> fr, xfr, x2, y2, inv_den, den_raw, cx, cy, cf, cr, k;
};

template <typename T>
inline void pixel_fwd(const Vectorized<T>& sff, const Vectorized<T>& srr,
                      const Vectorized<T>& sfr, const Params<T>& p, Pixel<T>& q) {
  using V = Vectorized<T>;
  const V one(1), a(p.a), c(p.c), two_c(p.two_c), inv_c(p.inv_c);
  q.rf = radial_fwd<T>(sff * (a * a), p);
  q.rr = radial_fwd<T>(srr, p);
  q.fr = sfr * a;
  V xf2 = q.rf.th * q.rf.th * inv_c;
  V xr2 = q.rr.th * q.rr.th * inv_c;
  q.xfr = q.rf.al * q.rr.al * q.fr;
  q.x2 = p.f_first ? xf2 : xr2;
  q.y2 = p.f_first ? xr2 : xf2;
  V big_a = one + two_c * q.xfr + c * q.y2;
  V big_b = one - c * q.x2;
  q.den_raw = one + two_c * q.xfr + V(p.c2) * q.x2 * q.y2;
  q.inv_den = one / at::vec::maximum(q.den_raw, V(p.mn));
  q.cx = big_a * q.inv_den;
  q.cy = big_b * q.inv_den;
  q.cf = (p.f_first ? q.cx : q.cy) * q.rf.al;
  q.cr = (p.f_first ? q.cy : q.cx) * q.rr.al;
  q.k = q.cf * a;
}

// logmap0 of the projected point with ‖o‖² = o2: the factor lg, and dL/do2 from dL/dlg when
// asked.
template <typename T>
inline Vectorized<T> logmap_scale(const Vectorized<T>& o2, const Params<T>& p,
                                  const Vectorized<T>* d_lg, Vectorized<T>* d_o2) {
  using V = Vectorized<T>;
  const V one(1), zero(0);
  V z = V(p.sc) * at::vec::maximum(o2, V(p.mn2)).sqrt();
  V inv_z = one / z;
  V s = at::vec::minimum(z, V(p.s_max));
  V lg = atanh_pos<T>(s) * inv_z;
  if (d_lg != nullptr) {
    V d_at = *d_lg * inv_z;
    V d_z = (zero - *d_lg) * lg * inv_z;                       // lg = atanh(s) / z
    V d_s = d_at / (one - s * s);
    d_z = d_z + sel(z <= V(p.s_max), d_s, zero);               // s = min(z, s_max)
    *d_o2 = sel(o2 >= V(p.mn2), V(p.half_c) * d_z * inv_z, zero);
  }
  return lg;
}

// Each task is one block of up to kBlock pixels of one image; it runs in chunks of U vectors of
// pixels, looping over the channels with the per-pixel accumulators held in registers.
template <typename T, int U>
struct Chunk {
  int64_t m[U];  // lanes of each vector in the chunk (0 past the end of the block)
  Chunk(int64_t i, int64_t n) {
    for (int u = 0; u < U; ++u) {
      const int64_t left = n - i - u * Vectorized<T>::size();
      m[u] = std::max<int64_t>(0, std::min<int64_t>(Vectorized<T>::size(), left));
    }
  }
};

// The backward's passes over a chunk: for each channel ch and each vector u of pixels, body(u,
// off, f, r, g, o) with the values at offset off = ch P + u (vector size) and the ball point
// o = K f + cr r (formed again from f and r: cheaper than storing it).
template <typename T, int U, typename Body>
inline void for_each_point(const T* f, const T* r, const T* g, int64_t C, int64_t P,
                           const Chunk<T, U>& ck, const Vectorized<T>* kv,
                           const Vectorized<T>* crv, Body&& body) {
  using V = Vectorized<T>;
  for (int64_t ch = 0; ch < C; ++ch) {
    for (int u = 0; u < U; ++u) {
      const int64_t off = ch * P + u * V::size();
      V fv = ld<V>(f + off, ck.m[u]), rv = ld<V>(r + off, ck.m[u]);
      V gv = ld<V>(g + off, ck.m[u]);
      V ov = crv[u] * rv + kv[u] * fv;
      body(u, off, fv, rv, gv, ov);
    }
  }
}

// Channel sums ‖f‖², ‖r‖², ⟨f, r⟩ of a block of n pixels into sff/srr/sfr, eight vectors of
// pixels at a time (long contiguous runs per channel row); optionally prefetches g's rows.
template <typename T>
inline void block_sums(const T* f, const T* r, const T* g, int64_t C, int64_t P, int64_t n,
                       T* sff, T* srr, T* sfr) {
  using V = Vectorized<T>;
  constexpr int U = 8;
  constexpr int64_t W = U * V::size();
  for (int64_t i0 = 0; i0 < n; i0 += W) {
    const Chunk<T, U> ck(i0, n);
    V a[U], b[U], d[U];
    for (int u = 0; u < U; ++u) a[u] = b[u] = d[u] = V(0);
    for (int64_t ch = 0; ch < C; ++ch) {
      const int64_t row = ch * P + i0;
      for (int u = 0; u < U; ++u) {
        if (ck.m[u] == 0) break;
        V fv = ld<V>(f + row + u * V::size(), ck.m[u]);
        V rv = ld<V>(r + row + u * V::size(), ck.m[u]);
        if (g != nullptr) __builtin_prefetch(g + row + u * V::size());
        a[u] = at::vec::fmadd(fv, fv, a[u]);
        b[u] = at::vec::fmadd(rv, rv, b[u]);
        d[u] = at::vec::fmadd(fv, rv, d[u]);
      }
    }
    for (int u = 0; u < U; ++u) {
      const int64_t off = i0 + u * V::size();
      if (ck.m[u] == 0) break;
      st(a[u], sff + off, ck.m[u]);
      st(b[u], srr + off, ck.m[u]);
      st(d[u], sfr + off, ck.m[u]);
    }
  }
}

template <typename T>
void forward_impl(const T* F, const T* R, T* out, int64_t B, int64_t C, int64_t P,
                  Params<T> prm) {
  using V = Vectorized<T>;
  constexpr int U = 4;
  constexpr int64_t W = U * V::size();
  const int64_t nblk = poincare_simd::blocks_per_image(P, kBlock);
  at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    T sffb[kBlock], srrb[kBlock], sfrb[kBlock];
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, p0, n] = poincare_simd::pixel_block(task, nblk, kBlock, P);
      block_sums<T>(F + b * C * P + p0, R + b * C * P + p0, nullptr, C, P, n, sffb, srrb, sfrb);
      for (int64_t i0 = 0; i0 < n; i0 += W) {
        const Chunk<T, U> ck(i0, n);
        const T* f = F + b * C * P + p0 + i0;
        const T* r = R + b * C * P + p0 + i0;
        T* o = out + b * C * P + p0 + i0;
        V kv[U], crv[U], o2[U];
        for (int u = 0; u < U; ++u) {
          const int64_t off = i0 + u * V::size();
          Pixel<T> q;
          pixel_fwd<T>(ld<V>(sffb + off, ck.m[u]), ld<V>(srrb + off, ck.m[u]),
                       ld<V>(sfrb + off, ck.m[u]), prm, q);
          kv[u] = q.k;
          crv[u] = q.cr;
          o2[u] = V(0);
        }
        // the ball point o = K f + cr r, formed explicitly; its norm from it
        for (int64_t ch = 0; ch < C; ++ch) {
          for (int u = 0; u < U; ++u) {
            const int64_t off = ch * P + u * V::size();
            V ov = crv[u] * ld<V>(r + off, ck.m[u]) + kv[u] * ld<V>(f + off, ck.m[u]);
            st(ov, o + off, ck.m[u]);
            o2[u] = at::vec::fmadd(ov, ov, o2[u]);
          }
        }
        V lg[U];
        for (int u = 0; u < U; ++u) lg[u] = logmap_scale<T>(o2[u], prm, nullptr, nullptr);
        for (int64_t ch = 0; ch < C; ++ch) {
          for (int u = 0; u < U; ++u) {
            const int64_t off = ch * P + u * V::size();
            st(ld<V>(o + off, ck.m[u]) * lg[u], o + off, ck.m[u]);
          }
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const T* G, const T* F, const T* R, T* grad_f, T* grad_r, double* grad_a,
                   int64_t B, int64_t C, int64_t P, Params<T> prm) {
  using V = Vectorized<T>;
  constexpr int U = 2;
  constexpr int64_t W = U * V::size();
  const int64_t nblk = poincare_simd::blocks_per_image(P, kBlock);
  at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    const V zero(0), two(2), a(prm.a), c(prm.c), two_c(prm.two_c), c2(prm.c2);
    const V inv_c(prm.inv_c);
    T sffb[kBlock], srrb[kBlock], sfrb[kBlock];
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, p0, n] = poincare_simd::pixel_block(task, nblk, kBlock, P);
      V acc_a(0);
      const int64_t blk = b * C * P + p0;
      block_sums<T>(F + blk, R + blk, G + blk, C, P, n, sffb, srrb, sfrb);
      for (int64_t i0 = 0; i0 < n; i0 += W) {
        const Chunk<T, U> ck(i0, n);
        const int64_t base = b * C * P + p0 + i0;
        const T* f = F + base;
        const T* r = R + base;
        const T* g = G + base;
        V sff[U], srr[U], sfr[U];
        for (int u = 0; u < U; ++u) {
          const int64_t off = i0 + u * V::size();
          sff[u] = ld<V>(sffb + off, ck.m[u]);
          srr[u] = ld<V>(srrb + off, ck.m[u]);
          sfr[u] = ld<V>(sfrb + off, ck.m[u]);
        }
        Pixel<T> q[U];
        V kv[U], crv[U];
        for (int u = 0; u < U; ++u) {
          pixel_fwd<T>(sff[u], srr[u], sfr[u], prm, q[u]);
          kv[u] = q[u].k;
          crv[u] = q[u].cr;
        }
        // o (explicitly), ‖o‖², ⟨g, o⟩, ⟨o, f⟩, ⟨o, r⟩, ⟨g, f⟩, ⟨g, r⟩
        V o2[U], go[U], of[U], orr[U], gf[U], gr[U];
        for (int u = 0; u < U; ++u) o2[u] = go[u] = of[u] = orr[u] = gf[u] = gr[u] = zero;
        for_each_point<T>(f, r, g, C, P, ck, kv, crv,
                          [&](int u, int64_t, const V& fv, const V& rv, const V& gv, const V& ov) {
                            o2[u] = at::vec::fmadd(ov, ov, o2[u]);
                            go[u] = at::vec::fmadd(gv, ov, go[u]);
                            of[u] = at::vec::fmadd(ov, fv, of[u]);
                            orr[u] = at::vec::fmadd(ov, rv, orr[u]);
                            gf[u] = at::vec::fmadd(gv, fv, gf[u]);
                            gr[u] = at::vec::fmadd(gv, rv, gr[u]);
                          });
        // per-pixel adjoint of the scalar chain, in reverse
        V lgv[U], two_pv[U], d_sff2[U], d_srr2[U], d_sfrv[U];
        for (int u = 0; u < U; ++u) {
          const Pixel<T>& p = q[u];
          V d_lg = go[u], d_o2;
          V lg = logmap_scale<T>(o2[u], prm, &d_lg, &d_o2);
          V two_p = two * d_o2;
          // dL/do = lg g + 2 d_o2 o;  o = K f + cr r
          V d_k = lg * gf[u] + two_p * of[u];
          V d_cr = lg * gr[u] + two_p * orr[u];
          // K = cf a
          V d_cf = d_k * a;
          V d_a = d_k * p.cf;
          // cf = (cx | cy) af, cr = (cy | cx) ar
          V d_af, d_ar, d_cx, d_cy;
          if (prm.f_first) {
            d_cx = d_cf * p.rf.al;
            d_af = d_cf * p.cx;
            d_cy = d_cr * p.rr.al;
            d_ar = d_cr * p.cy;
          } else {
            d_cy = d_cf * p.rf.al;
            d_af = d_cf * p.cy;
            d_cx = d_cr * p.rr.al;
            d_ar = d_cr * p.cx;
          }
          // cx = A / den, cy = B / den
          V d_big_a = d_cx * p.inv_den;
          V d_big_b = d_cy * p.inv_den;
          V d_den = zero - (d_cx * p.cx + d_cy * p.cy) * p.inv_den;
          V d_den_raw = sel(p.den_raw >= V(prm.mn), d_den, zero);
          // den_raw = 1 + 2c xfr + c² x2 y2, A = 1 + 2c xfr + c y2, B = 1 − c x2
          V d_xfr = two_c * (d_den_raw + d_big_a);
          V d_x2 = c2 * p.y2 * d_den_raw - c * d_big_b;
          V d_y2 = c2 * p.x2 * d_den_raw + c * d_big_a;
          V d_xf2 = prm.f_first ? d_x2 : d_y2;
          V d_xr2 = prm.f_first ? d_y2 : d_x2;
          // xf2 = thf²/c, xr2 = thr²/c, xfr = af ar fr
          V d_thf = two * p.rf.th * d_xf2 * inv_c;
          V d_thr = two * p.rr.th * d_xr2 * inv_c;
          d_af = d_af + d_xfr * p.rr.al * p.fr;
          d_ar = d_ar + d_xfr * p.rf.al * p.fr;
          V d_fr = d_xfr * p.rf.al * p.rr.al;
          V d_nf2 = radial_bwd<T>(p.rf, d_af, d_thf, prm);
          V d_nr2 = radial_bwd<T>(p.rr, d_ar, d_thr, prm);
          // nf2 = Sff a², fr = Sfr a
          d_a = d_a + d_nf2 * sff[u] * two * a + d_fr * sfr[u];
          lgv[u] = lg;
          two_pv[u] = two_p;
          d_sff2[u] = two * d_nf2 * (a * a);
          d_srr2[u] = two * d_nr2;
          d_sfrv[u] = d_fr * a;
          acc_a = acc_a + V::set(zero, d_a, ck.m[u]);
        }
        // grad_f = K dL/do + 2 dSff f + dSfr r,  grad_r = cr dL/do + 2 dSrr r + dSfr f
        T* gfo = grad_f + base;
        T* gro = grad_r + base;
        for_each_point<T>(f, r, g, C, P, ck, kv, crv,
                          [&](int u, int64_t off, const V& fv, const V& rv, const V& gv,
                              const V& ov) {
                            V d_o = lgv[u] * gv + two_pv[u] * ov;
                            st(kv[u] * d_o + d_sff2[u] * fv + d_sfrv[u] * rv, gfo + off, ck.m[u]);
                            st(crv[u] * d_o + d_srr2[u] * rv + d_sfrv[u] * fv, gro + off, ck.m[u]);
                          });
      }
      T lanes[V::size()];
      acc_a.store(lanes);
      grad_a[task] = std::accumulate(lanes, lanes + V::size(), 0.0);
    }
  });
}

namespace ck = poincare_checks;

// f, res [B, C, P]: contiguous CPU maps of one floating dtype and shape.
void check_inputs(const char* op, const torch::Tensor& f, const torch::Tensor& res) {
  ck::check_map(op, "f", f, 3, "[B, C, P]");
  ck::check_tensor(op, "res", res, f.scalar_type(), "the dtype of f");
  ck::check_sizes(op, "res", res, f.sizes(), "the shape of f");
}

torch::Tensor residual_forward(torch::Tensor f, torch::Tensor res, double alpha, double c,
                               double proj_eps, double t_max, bool f_first) {
  check_inputs("residual_forward", f, res);
  auto out = torch::empty_like(f);
  const int64_t B = f.size(0), C = f.size(1), P = f.size(2);
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "residual_forward", [&] {
    forward_impl<scalar_t>(f.data_ptr<scalar_t>(), res.data_ptr<scalar_t>(),
                           out.data_ptr<scalar_t>(), B, C, P,
                           make_params<scalar_t>(alpha, c, proj_eps, t_max, f_first));
  });
  return out;
}

// Returns (grad_f, grad_res, dL/d alpha as a 0-dim tensor).
std::vector<torch::Tensor> residual_backward(torch::Tensor grad, torch::Tensor f,
                                             torch::Tensor res, double alpha, double c,
                                             double proj_eps, double t_max, bool f_first) {
  check_inputs("residual_backward", f, res);
  ck::check_tensor("residual_backward", "grad", grad, f.scalar_type(), "the dtype of f");
  ck::check_sizes("residual_backward", "grad", grad, f.sizes(), "the shape of f");
  const int64_t B = f.size(0), C = f.size(1), P = f.size(2);
  const int64_t nblk = poincare_simd::blocks_per_image(P, kBlock);
  auto grad_f = torch::empty_like(f);
  auto grad_r = torch::empty_like(res);
  auto grad_a = torch::empty({B * nblk}, f.options().dtype(torch::kFloat64));
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "residual_backward", [&] {
    backward_impl<scalar_t>(grad.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(),
                            res.data_ptr<scalar_t>(), grad_f.data_ptr<scalar_t>(),
                            grad_r.data_ptr<scalar_t>(), grad_a.data_ptr<double>(), B, C, P,
                            make_params<scalar_t>(alpha, c, proj_eps, t_max, f_first));
  });
  return {grad_f, grad_r, grad_a.sum().to(f.scalar_type())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("residual_forward", &residual_forward, "fused Poincare residual forward");
  m.def("residual_backward", &residual_backward, "fused Poincare residual backward");
}
