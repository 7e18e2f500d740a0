// The per-pixel scalar chain of the Poincare midpoint batch norm, forward and reverse (the
// passes over the map that feed it and use it are in batchnorm.cpp).
//
// Per pixel, with x = expmap0(v) = ax v, the centre mu and bias point beta on the ball:
//   centre   m = (-mu) (+) x = A d - B mu,  d = x - mu        (PixelCentre)
//   distance at = atanh(sqrt(c) |project(m)|)                (d(x, mu) = 2 at / sqrt(c))
//   output   w = r (x) m = s_w m,  w' = gyr[beta, -mu] w = e_mu mu + e_w m + e_b beta,
//            o = beta (+) w' = o_mu mu + o_w m + o_b beta,  out = logmap0(project(o)) = lg o
//                                                           (PixelOutput)
// Everything here is arithmetic on the pixel's inner products (|v|^2, |d|^2, <d, mu>, ...) and
// the global scalars |mu|^2, |beta|^2, <beta, mu> (Consts): V is a Vectorized or a Pack of
// pixels. The reverse mode is written out line by line: g_x is the adjoint dL/dx of the
// forward quantity x, the adjoints of the global scalars are summed over the pixels
// (GlobalGrads) and reduced once per call (reduce_backward_part in batchnorm.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "simd.h"

namespace poincare_bn {

using poincare_simd::blend;
using poincare_simd::sel;
using poincare_simd::vmax;
using poincare_simd::vmin;

// Constants and the per-call global scalars: m2 = |mu|^2, b2 = |beta|^2, bm = <beta, mu>,
// omm = 1 - c|mu|^2, gd = max(1 - 2c <beta, mu> + c^2 |beta|^2 |mu|^2, min_norm) (the
// gyration's denominator), big_b2 = 1 - c|beta|^2, and the rescale r. The loop is not
// auto-vectorised (see batchnorm_channels.h: the result would depend on the addresses).
#pragma GCC push_options
#pragma GCC optimize("no-tree-vectorize")
template <typename T>
struct Consts {
  T c, sc, c2, t_max, s_max, radius, min_norm, min_norm2;
  T m2, b2, bm, omm, gd, big_b2, r;
};

template <typename T>
Consts<T> make_consts(double c, double t_max, double proj_eps, double min_norm, const T* mu,
                      const T* beta, int64_t C, double r) {
  Consts<T> k;
  const double sc = std::sqrt(c);
  k.c = T(c);
  k.sc = T(sc);
  k.c2 = T(c * c);
  k.t_max = T(t_max);
  k.s_max = T(1 - proj_eps);
  k.radius = T((1 - proj_eps) / sc);
  k.min_norm = T(min_norm);
  k.min_norm2 = T(min_norm * min_norm);
  double m2 = 0, b2 = 0, bm = 0;
  for (int64_t i = 0; i < C; ++i) {
    m2 += double(mu[i]) * double(mu[i]);
    b2 += double(beta[i]) * double(beta[i]);
    bm += double(beta[i]) * double(mu[i]);
  }
  k.m2 = T(m2);
  k.b2 = T(b2);
  k.bm = T(bm);
  k.omm = T(1) - k.c * k.m2;
  const T gd_raw = T(1) + k.c * T(2) * (-k.bm) + k.c2 * k.b2 * k.m2;
  k.gd = std::max(gd_raw, k.min_norm);
  k.big_b2 = T(1) - k.c * k.b2;
  k.r = T(r);
  return k;
}
#pragma GCC pop_options

// Adjoints of the global scalars m2, b2, bm, gd, big_b2, uv = -bm and r (Consts), accumulated
// per lane over the pixels of a task; their layout in the per-task sums: kGlobals columns.
template <typename V>
struct GlobalGrads {
  V m2{0}, b2{0}, bm{0}, gd{0}, big_b2{0}, uv{0}, r{0};
};
constexpr int kGlobals = 7;

// ---------------------------------------------------------------- centre: x and m's coefficients
// x = expmap0(v) = ax v,  ax = tanh(min(t, t_max)) / t,  t = sqrt(c) |v|. With d = x - mu formed explicitly,
//   m = (-mu) (+) x = A d - B mu,  A = (1 - c|mu|^2) / den,  B = c|d|^2 / den,
//   den = (1 - c|mu|^2)(1 - c|x|^2) + c|d|^2,
// which equals the closed form's a1 mu + a2 v but has no cancellation between O(1) terms when
// x ~ mu near the boundary (there the closed form's coefficients lose ~1e-3 in float32).
template <typename V>
struct PixelCentre {
  V n2, d2;           // inputs |v|^2 (for centre_expmap), then |d|^2 (centre_coefficients)
  V n, t, inv_t, th;  // |v| (>= min_norm), t = sqrt(c) |v|, 1 / t, tanh(min(t, t_max))
  V ax, omx;          // x = ax v;  omx = 1 - c|x|^2 = 1 - th^2
  V den_raw, inv_den; // den before its clamp at min_norm, 1 / max(den, min_norm)
  V A, B;             // m = A d - B mu
};

// x = expmap0(v) from n2 = |v|^2.

template <typename V>
inline void centre_expmap(PixelCentre<V>& s, const Consts<typename V::value_type>& k) {
  s.n = vmax(s.n2, V(k.min_norm2)).sqrt();
  s.t = V(k.sc) * s.n;
  s.inv_t = V(1) / s.t;
  s.th = vmin(s.t, V(k.t_max)).tanh();
  s.ax = s.th * s.inv_t;
  s.omx = V(1) - s.th * s.th;  // 1 - c|x|^2
}

// m = A d - B mu from d2 = |d|^2.
template <typename V>
inline void centre_coefficients(PixelCentre<V>& s, const Consts<typename V::value_type>& k) {
  const V c(k.c), omm(k.omm);
  const V cd2 = c * s.d2;
  s.den_raw = omm * s.omx + cd2;
  s.inv_den = V(1) / vmax(s.den_raw, V(k.min_norm));
  s.A = omm * s.inv_den;
  s.B = cd2 * s.inv_den;
}

// Reverse of the centre: from the adjoints of A and B (and the inner products that the adjoint
// of ax needs) to those of n2 = |v|^2 and d2 = |d|^2 (and m2, into G):
//   A = omm / den, B = c d2 / den, den = omm omx + c d2, omx = 1 - th^2,
//   g_ax = <adjoint of d, v> = A gm_v + 2 g_d2 dv  with gm_v = <adjoint of m, v>, dv = <d, v>
//   (d = ax v - mu),  ax = th / t,  th = tanh(min(t, t_max)),  t = sqrt(c) sqrt(max(n2, min^2)).
template <typename V>
inline void centre_backward(const PixelCentre<V>& s, const Consts<typename V::value_type>& k,
                            const V& g_A, const V& g_B, const V& gm_v, const V& dv,
                            V* g_n2_out, V* g_d2_out, GlobalGrads<V>& G) {
  const V one(1), c(k.c), omm(k.omm);
  const V inv = s.inv_den;
  const V g_den = (s.A * g_A + s.B * g_B).neg() * inv;
  const V g_den_raw = sel(s.den_raw >= V(k.min_norm), g_den);
  const V g_omm = g_A * inv + s.omx * g_den_raw;
  const V g_omx = omm * g_den_raw;
  const V g_d2 = c * (g_B * inv + g_den_raw);
  G.m2 = G.m2 - c * g_omm;
  const V g_ax = s.A * gm_v + V(2) * g_d2 * dv;
  const V g_th = V(-2) * s.th * g_omx + g_ax * s.inv_t;
  V g_t = (s.ax * s.inv_t * g_ax).neg();
  g_t = g_t + sel(s.t <= V(k.t_max), g_th * (one - s.th * s.th));
  const V g_n = V(k.sc) * g_t;
  *g_n2_out = sel(s.n2 >= V(k.min_norm2), g_n / (V(2) * s.n));
  *g_d2_out = g_d2;
}

// ---------------------------------------------------------------- output: from m to lg o
// The rest of the chain, from the Gram entries of m (|m|^2, <m, mu>, <m, beta>) and the global
// scalars; every vector is a combination of mu, m and beta, so its norms and products follow
// from those entries (quad).
template <typename V>
struct PixelOutput {
  V q, mm, mb;  // inputs |m|^2, <m, mu>, <m, beta>
  // projection and distance: mn0 = |m| (>= min_norm), big = mn0 > radius, shrink = radius / mn0
  // where big (else 1), mn = |project(m)|, u = sqrt(c) mn, at = atanh(min(u, s_max))
  V mn0, big, shrink, mn, u, at;
  // rescale w = r (x) project(m) = s_w m:  s_w = tanh(r at) / u * shrink (thr = tanh(r at))
  V inv_u, thr, s_w, mnn;  // mnn = |m|^2 (clamped at min^2), for the products of m
  // gyration w' = gyr[beta, -mu] w = e_mu mu + e_w m + e_b beta with uw = <beta, w>,
  // vw = <-mu, w>:  ga = -c^2 uw |mu|^2 + c vw + 2c^2 <beta, -mu> vw,  gb = -c^2 vw |beta|^2 - c uw,
  //   e_mu = -2 gb / gd, e_w = s_w, e_b = 2 ga / gd
  V uw, vw, ga, gb, e_mu, e_w, e_b;
  // Mobius addition o = beta (+) w' = ((A2 + B2 e_b) beta + B2 (e_mu mu + e_w m)) / den2 with
  // bw = <beta, w'>, w2 = |w'|^2:  A2 = 1 + 2c bw + c w2, B2 = 1 - c|beta|^2,
  //   den2 = max(1 + 2c bw + c^2 |beta|^2 w2, min_norm)
  V bw, w2, den2_raw, inv_den2, o_b, o_mu, o_w;
  // logmap0 of project(o): lg = atanh(s) / scon,  s = min(scon, s_max),  scon = sqrt(c) |o|
  V o2, on, scon, inv_scon, s, lg;
};

// |cm mu + cw m + cb beta|^2 from the Gram entries (mnn = |m|^2, mm = <m, mu>, mb = <m, beta>).

template <typename V>
inline V quad(const Consts<typename V::value_type>& k, const V& cm, const V& cw, const V& cb,
              const V& mnn, const V& mm, const V& mb) {
  return cm * cm * V(k.m2) + cw * cw * mnn + cb * cb * V(k.b2) +
         V(2) * (cm * cw * mm + cm * cb * V(k.bm) + cw * cb * mb);
}

// The forward chain from s.q, s.mm, s.mb: up to at (kOut false: the variance needs only at),
// or on to the output coefficients lg o_mu, lg o_w, lg o_b.
template <bool kOut, typename V>
inline void pixel_output(PixelOutput<V>& s, const Consts<typename V::value_type>& k) {
  using T = typename V::value_type;
  const V one(1), c(k.c), c2(k.c2), sc(k.sc);
  s.mn0 = vmax(s.q, V(k.min_norm2)).sqrt();
  s.big = s.mn0 > V(k.radius);
  s.shrink = blend(one, V(k.radius) / s.mn0, s.big);
  s.mn = s.mn0 * s.shrink;
  s.u = sc * s.mn;
  s.at = vmin(s.u, V(k.s_max)).atanh();
  if constexpr (kOut) {
    s.inv_u = one / s.u;
    s.thr = (V(k.r) * s.at).tanh();
    s.s_w = s.thr * s.inv_u * s.shrink;
    s.mnn = s.mn0 * s.mn0;  // |m|^2 before the projection (= mn^2 / shrink^2)
    s.uw = s.s_w * s.mb;
    s.vw = (s.s_w * s.mm).neg();
    const T uv = -k.bm;
    s.ga = V(-k.c2 * k.m2) * s.uw + c * s.vw + V(2 * k.c2 * uv) * s.vw;
    s.gb = V(-k.c2 * k.b2) * s.vw - c * s.uw;
    s.e_mu = V(T(-2) / k.gd) * s.gb;
    s.e_w = s.s_w;
    s.e_b = V(T(2) / k.gd) * s.ga;
    s.bw = s.e_mu * V(k.bm) + s.e_w * s.mb + s.e_b * V(k.b2);
    s.w2 = quad(k, s.e_mu, s.e_w, s.e_b, s.mnn, s.mm, s.mb);
    const V big_a2 = one + V(2 * k.c) * s.bw + c * s.w2;
    const V big_b2(k.big_b2);
    s.den2_raw = one + V(2 * k.c) * s.bw + V(k.c2 * k.b2) * s.w2;
    s.inv_den2 = one / vmax(s.den2_raw, V(k.min_norm));
    s.o_b = (big_a2 + big_b2 * s.e_b) * s.inv_den2;
    s.o_mu = big_b2 * s.e_mu * s.inv_den2;
    s.o_w = big_b2 * s.e_w * s.inv_den2;
    s.o2 = quad(k, s.o_mu, s.o_w, s.o_b, s.mnn, s.mm, s.mb);
    s.on = vmax(s.o2, V(k.min_norm2)).sqrt();
    s.scon = sc * s.on;
    s.inv_scon = one / s.scon;
    s.s = vmin(s.scon, V(k.s_max));
    s.lg = s.s.atanh() * s.inv_scon;
  }
}

// Reverse of pixel_output, each block undoing one line of the forward chain, last first.
// Seeds: the adjoints of the output coefficients k_mu = lg o_mu, k_b = lg o_b, k_w = lg o_w
// (kOut only) and of at. Results: the adjoints of q, mm, mb; the globals' accumulated into G.
template <bool kOut, typename V>
inline void pixel_output_backward(const PixelOutput<V>& s,
                                  const Consts<typename V::value_type>& k, const V& g_kmu,
                                  const V& g_kb, const V& g_kw, const V& g_at_seed, V* g_q_out,
                                  V* g_mm_out, V* g_mb_out, GlobalGrads<V>& G) {
  using T = typename V::value_type;
  const V one(1), two(2), c(k.c), c2(k.c2), sc(k.sc);
  const V m2(k.m2), b2(k.b2), bm(k.bm);
  V g_at = g_at_seed;
  V g_q(0), g_mm(0), g_mb(0), g_u(0), g_shrink(0);
  if constexpr (kOut) {
    const V g_lg = g_kmu * s.o_mu + g_kb * s.o_b + g_kw * s.o_w;
    V g_omu = g_kmu * s.lg, g_ob = g_kb * s.lg, g_ow = g_kw * s.lg;
    // lg = atanh(s) / scon, s = min(scon, s_max), scon = sc on, on = sqrt(max(o2, min^2))
    V g_scon = (s.lg * s.inv_scon * g_lg).neg();
    const V g_s = g_lg * s.inv_scon / (one - s.s * s.s);
    g_scon = g_scon + sel(s.scon <= V(k.s_max), g_s);
    const V g_on = sc * g_scon;
    const V g_o2 = sel(s.o2 >= V(k.min_norm2), g_on / (two * s.on));
    // o2 = quad(o_mu, o_w, o_b)
    g_omu = g_omu + two * g_o2 * (s.o_mu * m2 + s.o_w * s.mm + s.o_b * bm);
    g_ow = g_ow + two * g_o2 * (s.o_w * s.mnn + s.o_mu * s.mm + s.o_b * s.mb);
    g_ob = g_ob + two * g_o2 * (s.o_b * b2 + s.o_mu * bm + s.o_w * s.mb);
    G.m2 = G.m2 + g_o2 * s.o_mu * s.o_mu;
    G.b2 = G.b2 + g_o2 * s.o_b * s.o_b;
    G.bm = G.bm + two * g_o2 * s.o_mu * s.o_b;
    V g_mnn = g_o2 * s.o_w * s.o_w;
    g_mm = two * g_o2 * s.o_mu * s.o_w;
    g_mb = two * g_o2 * s.o_w * s.o_b;
    // o_b = (A2 + B2 e_b) / den2, o_mu = B2 e_mu / den2, o_w = B2 e_w / den2
    const V inv = s.inv_den2;
    const V big_b2(k.big_b2);
    const V g_a2 = g_ob * inv;
    V g_eb = g_ob * big_b2 * inv;
    V g_emu = g_omu * big_b2 * inv;
    V g_ew = g_ow * big_b2 * inv;
    G.big_b2 = G.big_b2 + (g_ob * s.e_b + g_omu * s.e_mu + g_ow * s.e_w) * inv;
    const V g_den2 = (g_ob * s.o_b + g_omu * s.o_mu + g_ow * s.o_w).neg() * inv;
    const V g_den2_raw = sel(s.den2_raw >= V(k.min_norm), g_den2);
    // den2_raw = 1 + 2c bw + c^2 b2 w2,  A2 = 1 + 2c bw + c w2
    const V g_bw = V(2 * k.c) * (g_den2_raw + g_a2);
    const V g_w2 = V(k.c2 * k.b2) * g_den2_raw + c * g_a2;
    G.b2 = G.b2 + c2 * s.w2 * g_den2_raw;
    // w2 = quad(e_mu, e_w, e_b): the same adjoint as of o2 (written out twice: a shared helper
    // lets the compiler contract other products into fma, which changes the last bits)
    g_emu = g_emu + two * g_w2 * (s.e_mu * m2 + s.e_w * s.mm + s.e_b * bm);
    g_ew = g_ew + two * g_w2 * (s.e_w * s.mnn + s.e_mu * s.mm + s.e_b * s.mb);
    g_eb = g_eb + two * g_w2 * (s.e_b * b2 + s.e_mu * bm + s.e_w * s.mb);
    G.m2 = G.m2 + g_w2 * s.e_mu * s.e_mu;
    G.b2 = G.b2 + g_w2 * s.e_b * s.e_b;
    G.bm = G.bm + two * g_w2 * s.e_mu * s.e_b;
    g_mnn = g_mnn + g_w2 * s.e_w * s.e_w;
    g_mm = g_mm + two * g_w2 * s.e_mu * s.e_w;
    g_mb = g_mb + two * g_w2 * s.e_w * s.e_b;
    // bw = e_mu bm + e_w mb + e_b b2
    g_emu = g_emu + g_bw * bm;
    g_ew = g_ew + g_bw * s.mb;
    g_eb = g_eb + g_bw * b2;
    G.bm = G.bm + g_bw * s.e_mu;
    G.b2 = G.b2 + g_bw * s.e_b;
    g_mb = g_mb + g_bw * s.e_w;
    // e_mu = -2 gb / gd, e_w = s_w, e_b = 2 ga / gd
    const V g_gb = V(T(-2) / k.gd) * g_emu;
    const V g_ga = V(T(2) / k.gd) * g_eb;
    V g_sw = g_ew;
    G.gd = G.gd - (g_emu * s.e_mu + g_eb * s.e_b) * V(T(1) / k.gd);
    // ga = -c^2 uw m2 + c vw + 2 c^2 uv vw,  gb = -c^2 vw b2 - c uw
    const T uv = -k.bm;
    const V g_uw = V(-k.c2 * k.m2) * g_ga - c * g_gb;
    const V g_vw = (c + V(2 * k.c2 * uv)) * g_ga - V(k.c2 * k.b2) * g_gb;
    G.m2 = G.m2 - c2 * s.uw * g_ga;
    G.uv = G.uv + two * c2 * s.vw * g_ga;
    G.b2 = G.b2 - c2 * s.vw * g_gb;
    // uw = s_w mb, vw = -s_w mm
    g_sw = g_sw + g_uw * s.mb - g_vw * s.mm;
    g_mb = g_mb + g_uw * s.s_w;
    g_mm = g_mm - g_vw * s.s_w;
    // s_w = thr / u * shrink,  thr = tanh(r at)
    const V g_thr = g_sw * s.shrink * s.inv_u;
    g_u = (g_sw * s.s_w * s.inv_u).neg();
    g_shrink = g_sw * s.thr * s.inv_u;
    const V g_r_at = g_thr * (one - s.thr * s.thr);
    G.r = G.r + g_r_at * s.at;
    g_at = g_at + g_r_at * V(k.r);
    // mnn = max(q, min^2)
    g_q = sel(s.q >= V(k.min_norm2), g_mnn);
  }
  // at = atanh(min(u, s_max)), u = sc mn, mn = mn0 shrink, shrink = radius / mn0 if big
  const V uc = vmin(s.u, V(k.s_max));
  g_u = g_u + sel(s.u <= V(k.s_max), g_at / (one - uc * uc));
  const V g_mn = sc * g_u;
  V g_mn0 = g_mn * s.shrink;
  g_shrink = g_shrink + g_mn * s.mn0;
  g_mn0 = g_mn0 + sel(s.big, (V(k.radius) / (s.mn0 * s.mn0) * g_shrink).neg());
  g_q = g_q + sel(s.q >= V(k.min_norm2), g_mn0 / (two * s.mn0));
  *g_q_out = g_q;
  *g_mm_out = g_mm;
  *g_mb_out = g_mb;
}


// gamma^2 of x = expmap0(v) for the gyromidpoint, from n2 = |v|^2:
//   n = |v|, t = sqrt(c) n, th = tanh(min(t, t_max)), ax = th / t (x = ax v),
//   g2 = 1 / max(1 - th^2, min_norm)  (gamma_x^2 = 1 / (1 - c|x|^2)).
template <typename V>
inline void radial_gamma(const V& n2, const Consts<typename V::value_type>& k, V* n, V* t,
                         V* th, V* ax, V* g2) {
  *n = vmax(n2, V(k.min_norm2)).sqrt();
  *t = V(k.sc) * *n;
  *th = vmin(*t, V(k.t_max)).tanh();
  *ax = *th / *t;
  *g2 = V(1) / vmax(V(1) - *th * *th, V(k.min_norm));
}

}  // namespace poincare_bn
