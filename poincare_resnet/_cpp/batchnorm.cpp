// Poincare midpoint batch norm on NCHW tangent maps: fused forward and hand-written backward.
//
// Per pixel (see poincare_resnet/nn/_kernels.py::batchnorm_forward, which this reproduces):
//   x = expmap0(v) = ax v,   m = (-mu) (+) x = A (x - mu) - B mu   (formed explicitly),
//   mn = |project(m)|,  at = atanh(sqrt(c) mn)   (d(x, mu) = 2 at / sqrt(c)),
//   w = r (x) m = s_w m,  w' = gyr[beta, -mu] w = e_mu mu + e_w m + e_b beta,
//   o = beta (+) w' = o_mu mu + o_w m + o_b beta,  out = logmap0(project(o)) = lg o.
// All Mobius maths is scalar arithmetic per pixel on a few inner products; the channel loops
// only form those inner products and the final combination. Each pack of pixels (one or two
// SIMD vectors) runs the whole chain with its C channel lines hot in L1. Tasks are (image,
// block of kBlock pixels); reductions go through per-task partial sums, so results do not
// depend on the thread count.
//
// Kernels:
//   mid_forward   v -> [sum gamma^2 x (C), sum gamma^2]            (gyromidpoint sums)
//   mid_backward  gradient of the above w.r.t. v
//   bn_var        (v, mu) -> sum at^2                               (batch variance)
//   bn_out        (v, mu, beta, r) -> out
//   bn_backward   gradients of <g, out> + g_s * sum at^2 w.r.t. v, mu, beta, r
//   bn_train_forward / bn_train_backward: the whole map with batch statistics (the above plus
//                 the [C]-sized maths between the reductions), one call each way
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "checks.h"
#include "fastmath.h"

#include <algorithm>
#include <vector>

using at::vec::Vectorized;

namespace {

constexpr int64_t kBlock = 256;  // pixels per task

// K SIMD vectors processed together: independent per-pixel chains for instruction-level
// parallelism (one chain alone is latency-bound: divisions, SLEEF tanh/atanh, sqrt).
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
template <typename T, int K>
inline Pack<T, K> blend(const Pack<T, K>& a, const Pack<T, K>& b, const Pack<T, K>& mask) {
  Pack<T, K> r;
  for (int j = 0; j < K; ++j) r.v[j] = Vectorized<T>::blendv(a.v[j], b.v[j], mask.v[j]);
  return r;
}

// a where mask, else 0
template <typename V>
inline V sel(const V& mask, const V& a) {
  return blend(V(0), a, mask);
}

// Load / store m (clamped to [0, size]) values; the rest of the lanes read as 0.
template <typename V, typename T>
inline V ld(const T* p, int64_t m) {
  using Vec = Vectorized<T>;
  constexpr int64_t VS = Vec::size();
  V r;
  for (int j = 0; j < int(V::size() / VS); ++j) {
    const int64_t mj = std::min<int64_t>(std::max<int64_t>(m - j * VS, 0), VS);
    r.v[j] = mj == VS ? Vec::loadu(p + j * VS) : (mj > 0 ? Vec::loadu(p + j * VS, mj) : Vec(0));
  }
  return r;
}

template <typename V, typename T>
inline void st(const V& x, T* p, int64_t m) {
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

template <typename V>
inline typename V::value_type hsum(const V& x) {
  using T = typename V::value_type;
  T buf[V::size()];
  st(x, buf, V::size());
  T s = 0;
  for (int64_t i = 0; i < V::size(); ++i) s += buf[i];
  return s;
}

// SIMD vectors per pack (measured on AVX512: 2 beats 1 by ~25% in forward and backward).
constexpr int kPackForward = 2;
constexpr int kPackBackward = 2;

// Constants and per-call global scalars (inner products of mu and beta, and r); the loops are
// not auto-vectorised (see the [C]-sized maths below).
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

// Adjoints of the global scalars, accumulated per lane over the pixels of a task.
template <typename V>
struct Globals {
  V m2{0}, b2{0}, bm{0}, gd{0}, big_b2{0}, uv{0}, r{0};
};
constexpr int kGlobals = 7;

// ---------------------------------------------------------------- stage 1: x and m's coefficients
// x = ax v (expmap0). With d = x - mu formed explicitly,
//   m = (-mu) (+) x = A d - B mu,  A = (1 - c|mu|^2) / den,  B = c|d|^2 / den,
//   den = (1 - c|mu|^2)(1 - c|x|^2) + c|d|^2,
// which equals the closed form's a1 mu + a2 v but has no cancellation between O(1) terms when
// x ~ mu near the boundary (there the closed form's coefficients lose ~1e-3 in float32).
template <typename V>
struct S1 {
  V n2, d2;  // inputs |v|^2, then |d|^2
  V n, t, inv_t, th, ax, omx, den_raw, inv_den, A, B;
};

template <typename V>
inline void stage1a(S1<V>& s, const Consts<typename V::value_type>& k) {
  s.n = vmax(s.n2, V(k.min_norm2)).sqrt();
  s.t = V(k.sc) * s.n;
  s.inv_t = V(1) / s.t;
  s.th = vmin(s.t, V(k.t_max)).tanh();
  s.ax = s.th * s.inv_t;
  s.omx = V(1) - s.th * s.th;  // 1 - c|x|^2
}

template <typename V>
inline void stage1b(S1<V>& s, const Consts<typename V::value_type>& k) {
  const V c(k.c), omm(k.omm);
  const V cd2 = c * s.d2;
  s.den_raw = omm * s.omx + cd2;
  s.inv_den = V(1) / vmax(s.den_raw, V(k.min_norm));
  s.A = omm * s.inv_den;
  s.B = cd2 * s.inv_den;
}

// Reverse of stage 1: from the adjoints of A and B (and the inner products that the adjoint of
// ax needs) to those of n2 and d2 (and m2).
//   g_ax = <adjoint of d, v> = A s_v + 2 g_d2 dv  with s_v = <adjoint of m, v>, dv = <d, v>.
template <typename V>
inline void stage1_back(const S1<V>& s, const Consts<typename V::value_type>& k, const V& g_A,
                        const V& g_B, const V& s_v, const V& dv, V* g_n2, V* g_d2,
                        Globals<V>& G) {
  const V one(1), c(k.c), omm(k.omm);
  const V inv = s.inv_den;
  const V g_den = (s.A * g_A + s.B * g_B).neg() * inv;
  const V g_denr = sel(s.den_raw >= V(k.min_norm), g_den);
  const V g_omm = g_A * inv + s.omx * g_denr;
  const V g_omx = omm * g_denr;
  const V gd2 = c * (g_B * inv + g_denr);
  G.m2 = G.m2 - c * g_omm;
  const V g_ax = s.A * s_v + V(2) * gd2 * dv;
  const V g_th = V(-2) * s.th * g_omx + g_ax * s.inv_t;
  V g_t = (s.ax * s.inv_t * g_ax).neg();
  g_t = g_t + sel(s.t <= V(k.t_max), g_th * (one - s.th * s.th));
  const V g_n = V(k.sc) * g_t;
  *g_n2 = sel(s.n2 >= V(k.min_norm2), g_n / (V(2) * s.n));
  *g_d2 = gd2;
}

// ---------------------------------------------------------------- stage 2: the rest, per pixel
template <typename V>
struct S2 {
  V q, mm, mb;  // inputs |m|^2, <m, mu>, <m, beta>
  V mn0, big, shrink, mn, u, at;
  V inv_u, thr, s_w, mnn, uw, vw, ga, gb, e_mu, e_w, e_b, bw, w2, den2_raw, inv_den2;
  V o_b, o_mu, o_w, o2, on, scon, inv_scon, s, lg;
};

template <typename V>
inline V quad(const Consts<typename V::value_type>& k, const V& cm, const V& cw, const V& cb,
              const V& mnn, const V& mm, const V& mb) {
  return cm * cm * V(k.m2) + cw * cw * mnn + cb * cb * V(k.b2) +
         V(2) * (cm * cw * mm + cm * cb * V(k.bm) + cw * cb * mb);
}

template <bool kOut, typename V>
inline void stage2(S2<V>& s, const Consts<typename V::value_type>& k) {
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

// Reverse of stage 2. Seeds: adjoints of the output coefficients k_mu = lg o_mu, k_b = lg o_b,
// k_w = lg o_w (kOut only) and of at. Results: adjoints of q, mm, mb; globals accumulated.
template <bool kOut, typename V>
inline void stage2_back(const S2<V>& s, const Consts<typename V::value_type>& k, const V& g_kmu,
                        const V& g_kb, const V& g_kw, const V& g_at_seed, V* g_q_out,
                        V* g_mm_out, V* g_mb_out, Globals<V>& G) {
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
    const V g_d2r = sel(s.den2_raw >= V(k.min_norm), g_den2);
    // den2_raw = 1 + 2c bw + c^2 b2 w2,  A2 = 1 + 2c bw + c w2
    const V g_bw = V(2 * k.c) * (g_d2r + g_a2);
    const V g_w2 = V(k.c2 * k.b2) * g_d2r + c * g_a2;
    G.b2 = G.b2 + c2 * s.w2 * g_d2r;
    // w2 = quad(e_mu, e_w, e_b)
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
    const V g_rat = g_thr * (one - s.thr * s.thr);
    G.r = G.r + g_rat * s.at;
    g_at = g_at + g_rat * V(k.r);
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

// ---------------------------------------------------------------- midpoint sums
template <typename V>
inline void radial_gamma(const V& n2, const Consts<typename V::value_type>& k, V* n, V* t,
                         V* th, V* ax, V* g2) {
  *n = vmax(n2, V(k.min_norm2)).sqrt();
  *t = V(k.sc) * *n;
  *th = vmin(*t, V(k.t_max)).tanh();
  *ax = *th / *t;
  *g2 = V(1) / vmax(V(1) - *th * *th, V(k.min_norm));
}

template <typename T>
void mid_forward_impl(const T* v, T* part, int64_t B, int64_t C, int64_t P,
                      const Consts<T>& k) {
  using V = Pack<T, kPackForward>;
  const int64_t nblk = (P + kBlock - 1) / kBlock;
  constexpr int64_t VS = V::size();
  at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc((C + 1) * VS);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblk, p0 = (task % nblk) * kBlock;
      const int64_t n = std::min(kBlock, P - p0);
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

// With var_a/var_b (per pixel, [B, P]) it also adds g_var (var_a x + var_b mu): the gradient of
// g_var * sum at^2 that backward_impl<true, true> left in coefficient form.
template <typename T>
void mid_backward_impl(const T* v, const T* g_s1, T g_s0, T* grad_v, bool accumulate,
                       int64_t B, int64_t C, int64_t P, const Consts<T>& k,
                       const T* var_a = nullptr, const T* var_b = nullptr,
                       const T* mu = nullptr, T g_var = T(0)) {
  using V = Pack<T, kPackBackward>;
  const int64_t nblk = (P + kBlock - 1) / kBlock;
  constexpr int64_t VS = V::size();
  at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    const V one(1);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblk, p0 = (task % nblk) * kBlock;
      const int64_t n = std::min(kBlock, P - p0);
      const T* vb = v + b * C * P + p0;
      T* gvb = grad_v + b * C * P + p0;
      for (int64_t i = 0; i < n; i += VS) {
        const int64_t m = std::min<int64_t>(VS, n - i);
        V n2(0), gv(0);
        for (int64_t ch = 0; ch < C; ++ch) {
          const V x = ld<V>(vb + ch * P + i, m);
          n2 = n2 + x * x;
          gv = gv + x * V(g_s1[ch]);
        }
        V nn, t, th, ax, g2;
        radial_gamma(n2, k, &nn, &t, &th, &ax, &g2);
        const V w = g2 * ax;
        // w = g2 ax; g2 = 1 / max(1 - th^2, min); ax = th / t; th = tanh(min(t, t_max))
        const V g_g2 = V(g_s0) + gv * ax;
        const V g_ax = gv * g2;
        const V e_ok = (one - th * th) >= V(k.min_norm);
        V g_th = sel(e_ok, V(2) * th * g2 * g2 * g_g2) + g_ax / t;
        V g_t = (ax / t * g_ax).neg() + sel(t <= V(k.t_max), g_th * (one - th * th));
        const V g_n2 = sel(n2 >= V(k.min_norm2), V(k.sc) * g_t / (V(2) * nn));
        V two_gn2 = V(2) * g_n2;
        V vb_coef(0);
        if (var_a != nullptr) {
          const int64_t pix = b * P + p0 + i;
          two_gn2 = two_gn2 + V(g_var) * ld<V>(var_a + pix, m);
          vb_coef = V(g_var) * ld<V>(var_b + pix, m);
        }
        for (int64_t ch = 0; ch < C; ++ch) {
          const V x = ld<V>(vb + ch * P + i, m);
          V gv = w * V(g_s1[ch]) + two_gn2 * x;
          if (var_a != nullptr) gv = gv + vb_coef * V(mu[ch]);
          if (accumulate) gv = gv + ld<V>(gvb + ch * P + i, m);
          st(gv, gvb + ch * P + i, m);
        }
      }
    }
  });
}

// ---------------------------------------------------------------- variance and output
// Per pixel pack, two passes over the channels form every inner product the chain needs:
//   pass 1: |v|^2 (then stage 1a: ax), and <v, mu>, <v, beta>, <g, mu>, <g, beta>, <g, v>;
//   pass 2: with d = ax v - mu formed explicitly, |d|^2, <d, mu>, <d, beta>, <d, v>, <g, d>;
// (the optional ones as asked), then stage 1b (A, B). Since m = A d - B mu, the products of m
// follow from those of d with no cancellation between large terms (d is the small vector):
//   |m|^2 = A^2 |d|^2 - 2AB <d, mu> + B^2 |mu|^2,  <m, mu> = A <d, mu> - B |mu|^2, ...
template <typename V>
struct Front {
  S1<V> s;
  V dmu{0}, db{0}, dv{0}, vm{0}, vb{0};     // products of d and v with mu, beta, v
  V g_mu{0}, g_b{0}, g_v{0}, g_d{0};        // products of the output gradient g
  V q, mm, mb, md, mv, g_m;                 // |m|^2, <m, mu>, <m, beta>, <m, d>, <m, v>, <g, m>
};

// kDots: also the products with v (backward); beta, g: nullptr when not wanted.
template <bool kDots, typename V>
inline void front(Front<V>& f, const typename V::value_type* vb,
                  const typename V::value_type* gb, int64_t P, int64_t C, int64_t i, int64_t m,
                  const typename V::value_type* mu, const typename V::value_type* beta,
                  const Consts<typename V::value_type>& k) {
  V n2(0);
  for (int64_t ch = 0; ch < C; ++ch) {
    const V x = ld<V>(vb + ch * P + i, m);
    n2 = n2 + x * x;
    if constexpr (kDots) {
      const V muc(mu[ch]);
      f.vm = f.vm + x * muc;
      if (beta != nullptr) f.vb = f.vb + x * V(beta[ch]);
      if (gb != nullptr) {
        const V g = ld<V>(gb + ch * P + i, m);
        f.g_mu = f.g_mu + g * muc;
        f.g_b = f.g_b + g * V(beta[ch]);
        f.g_v = f.g_v + g * x;
      }
    }
  }
  f.s.n2 = n2;
  stage1a(f.s, k);
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
      if (gb != nullptr) f.g_d = f.g_d + ld<V>(gb + ch * P + i, m) * d;
    }
  }
  f.s.d2 = d2;
  stage1b(f.s, k);
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
inline V form_m(const S1<V>& s, const V& x, const V& muc, V* d_out = nullptr) {
  const V d = s.ax * x - muc;
  if (d_out != nullptr) *d_out = d;
  return s.A * d - s.B * muc;
}

template <typename T>
void var_impl(const T* v, const T* mu, T* part, int64_t B, int64_t C, int64_t P,
              const Consts<T>& k) {
  using V = Pack<T, kPackForward>;
  const int64_t nblk = (P + kBlock - 1) / kBlock;
  constexpr int64_t VS = V::size();
  at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblk, p0 = (task % nblk) * kBlock;
      const int64_t n = std::min(kBlock, P - p0);
      const T* vb = v + b * C * P + p0;
      V acc(0);
      for (int64_t i = 0; i < n; i += VS) {
        const int64_t m = std::min<int64_t>(VS, n - i);
        Front<V> f;
        front<false>(f, vb, nullptr, P, C, i, m, mu, nullptr, k);
        S2<V> s2;
        s2.q = f.q;
        stage2<false>(s2, k);
        acc = acc + sel(valid_lanes<V>(m), s2.at * s2.at);
      }
      part[task] = hsum(acc);
    }
  });
}

template <typename T>
void out_impl(const T* v, const T* mu, const T* beta, T* out, int64_t B, int64_t C, int64_t P,
              const Consts<T>& k) {
  using V = Pack<T, kPackForward>;
  const int64_t nblk = (P + kBlock - 1) / kBlock;
  constexpr int64_t VS = V::size();
  at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblk, p0 = (task % nblk) * kBlock;
      const int64_t n = std::min(kBlock, P - p0);
      const T* vb = v + b * C * P + p0;
      T* ob = out + b * C * P + p0;
      for (int64_t i = 0; i < n; i += VS) {
        const int64_t m = std::min<int64_t>(VS, n - i);
        Front<V> f;
        front<false>(f, vb, nullptr, P, C, i, m, mu, beta, k);
        S2<V> s2;
        s2.q = f.q;
        s2.mm = f.mm;
        s2.mb = f.mb;
        stage2<true>(s2, k);
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

// Backward of L = <g, out> (kOut) + g_s * sum at^2. part: [tasks, 2 C + kGlobals] holding the
// per-task sums of the mu and beta channel adjoints and of the global-scalar adjoints.
// With gm = adjoint of m = k_w g + 2 g_q m + g_mm mu + g_mb beta (its products with d, mu and v
// follow from those of its four terms) and gd = adjoint of d = A gm + 2 g_d2 d:
//   grad v = ax gd + 2 g_n2 v,  grad mu += k_mu g + g_mm m - gd - B gm,
//   grad beta += k_b g + g_mb m.
//
// kVar (train mode, with kOut): also the gradient of S = sum at^2 with unit weight, which the
// caller scales by g_S = dL/dS once this pass has reduced dL/dr. Per pixel it is
//   dS/dv_c = var_a x_c + var_b mu_c   (stored in var_a, var_b [B, P]: two scalars a pixel),
// and dS/dmu_c sums to  sum_p (Q1 x_c) + mu_c (sum_p Q2) + 2 Gm2 mu_c  (part: C + 2 more
// columns). Derivation: with gm = 2 g_q m, gd = A gm + 2 g_d2 d, m = A d - B mu, d = ax x - mu,
//   gd = P1 d + P2 mu  (P1 = 2 g_q A^2 + 2 g_d2, P2 = -2 g_q A B),
//   dS/dv = ax gd + 2 g_n2 x,   dS/dmu (per pixel) = -gd - B gm.
template <bool kOut, typename T, bool kVar = false>
void backward_impl(const T* v, const T* mu, const T* beta, const T* grad, T g_s, T* grad_v,
                   bool accumulate, T* part, int64_t B, int64_t C, int64_t P,
                   const Consts<T>& k, T* var_a = nullptr, T* var_b = nullptr) {
  static_assert(!kVar || kOut, "kVar needs kOut");
  using V = Pack<T, kPackBackward>;
  const int64_t nblk = (P + kBlock - 1) / kBlock;
  constexpr int64_t VS = V::size();
  const int64_t width = 2 * C + kGlobals + (kVar ? C + 2 : 0);
  at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc((kVar ? 3 : 2) * C * VS);
    const V two(2);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblk, p0 = (task % nblk) * kBlock;
      const int64_t n = std::min(kBlock, P - p0);
      const T* vb = v + b * C * P + p0;
      const T* gb = kOut ? grad + b * C * P + p0 : nullptr;
      T* gvb = grad_v + b * C * P + p0;
      std::fill(acc.begin(), acc.end(), T(0));
      Globals<V> G, G1;
      V q2sum(0);
      for (int64_t i = 0; i < n; i += VS) {
        const int64_t m = std::min<int64_t>(VS, n - i);
        Front<V> f;
        front<true>(f, vb, gb, P, C, i, m, mu, kOut ? beta : nullptr, k);
        const S1<V>& s1 = f.s;
        S2<V> s2;
        s2.q = f.q;
        s2.mm = f.mm;
        s2.mb = f.mb;
        stage2<kOut>(s2, k);
        const V g_at = sel(valid_lanes<V>(m), V(2 * g_s) * s2.at);
        V g_q, g_mm, g_mb;
        stage2_back<kOut>(s2, k, f.g_mu, f.g_b, f.g_m, g_at, &g_q, &g_mm, &g_mb, G);
        V k_mu(0), k_b(0), k_w(0);
        if constexpr (kOut) {
          k_mu = s2.lg * s2.o_mu;
          k_b = s2.lg * s2.o_b;
          k_w = s2.lg * s2.o_w;
        }
        const V two_gq = two * g_q;
        const V s_d = k_w * f.g_d + two_gq * f.md + g_mm * f.dmu + g_mb * f.db;
        const V s_mu = k_w * f.g_mu + two_gq * f.mm + g_mm * V(k.m2) + g_mb * V(k.bm);
        const V s_v = k_w * f.g_v + two_gq * f.mv + g_mm * f.vm + g_mb * f.vb;
        V g_n2, g_d2;
        stage1_back(s1, k, s_d, s_mu.neg(), s_v, f.dv, &g_n2, &g_d2, G);
        const V two_gn2 = two * g_n2, two_gd2 = two * g_d2;
        V vq1(0);
        if constexpr (kVar) {
          V g_q1, g_mm1, g_mb1;
          const V zero(0);
          stage2_back<false>(s2, k, zero, zero, zero, sel(valid_lanes<V>(m), two * s2.at), &g_q1,
                             &g_mm1, &g_mb1, G1);
          const V tq = two * g_q1;
          V g_n2_1, g_d2_1;
          stage1_back(s1, k, tq * f.md, (tq * f.mm).neg(), tq * f.mv, f.dv, &g_n2_1, &g_d2_1,
                      G1);
          const V A = s1.A, Bc = s1.B, ax = s1.ax;
          const V P1 = tq * A * A + two * g_d2_1;
          const V P2 = (tq * A * Bc).neg();
          const int64_t pix = b * P + p0 + i;
          st(P1 * ax * ax + two * g_n2_1, var_a + pix, m);
          st(ax * (P2 - P1), var_b + pix, m);
          const V tab = tq * A * Bc;
          vq1 = ((P1 + tab) * ax).neg();
          q2sum = q2sum + sel(valid_lanes<V>(m), P1 - P2 + tab + tq * Bc * Bc);
        }
        for (int64_t ch = 0; ch < C; ++ch) {
          const V x = ld<V>(vb + ch * P + i, m);
          const V muc(mu[ch]);
          V d;
          const V mv = form_m(s1, x, muc, &d);
          V gm = two_gq * mv + g_mm * muc;
          V amu = g_mm * mv;
          T* am = acc.data() + ch * VS;
          if constexpr (kOut) {
            const V g = ld<V>(gb + ch * P + i, m);
            const V bc(beta[ch]);
            gm = gm + k_w * g + g_mb * bc;
            amu = amu + k_mu * g;
            T* ab = acc.data() + (C + ch) * VS;
            st(ld<V>(ab, VS) + k_b * g + g_mb * mv, ab, VS);
          }
          const V gd = s1.A * gm + two_gd2 * d;
          amu = amu - gd - s1.B * gm;
          st(ld<V>(am, VS) + amu, am, VS);
          V gv = s1.ax * gd + two_gn2 * x;
          if (accumulate) gv = gv + ld<V>(gvb + ch * P + i, m);
          st(gv, gvb + ch * P + i, m);
          if constexpr (kVar) {
            T* av = acc.data() + (2 * C + ch) * VS;
            st(ld<V>(av, VS) + vq1 * x, av, VS);
          }
        }
      }
      T* pt = part + task * width;
      for (int64_t ch = 0; ch < 2 * C; ++ch) pt[ch] = hsum(ld<V>(acc.data() + ch * VS, VS));
      if constexpr (kVar) {
        T* pv = pt + 2 * C + kGlobals;
        for (int64_t ch = 0; ch < C; ++ch) pv[ch] = hsum(ld<V>(acc.data() + (2 * C + ch) * VS, VS));
        pv[C] = hsum(q2sum);
        pv[C + 1] = hsum(G1.m2);
      }
      pt[2 * C + 0] = hsum(G.m2);
      pt[2 * C + 1] = hsum(G.b2);
      pt[2 * C + 2] = hsum(G.bm);
      pt[2 * C + 3] = hsum(G.gd);
      pt[2 * C + 4] = hsum(G.big_b2);
      pt[2 * C + 5] = hsum(G.uv);
      pt[2 * C + 6] = hsum(G.r);
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
  const int64_t tasks = B * ((P + kBlock - 1) / kBlock);
  auto part = torch::zeros({std::max<int64_t>(tasks, 1), C + 1}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "mid_forward", [&] {
    auto k = make_consts<scalar_t>(c, t_max, 0.0, min_norm, nullptr, nullptr, 0, 0.0);
    mid_forward_impl<scalar_t>(v.data_ptr<scalar_t>(), part.data_ptr<scalar_t>(), B, C, P, k);
  });
  return part.sum(0);
}

// The gradient buffer: a new one, or `into` (the gradient is then added to it in place).
torch::Tensor grad_buffer(const char* op, const torch::Tensor& v,
                          const std::optional<torch::Tensor>& into) {
  if (!into.has_value() || !into->defined()) return torch::empty_like(v);
  ck::check_tensor(op, "into", *into, v.scalar_type(), "the dtype of v");
  ck::check_sizes(op, "into", *into, v.sizes(), "the shape of v");
  return *into;
}

torch::Tensor mid_backward(torch::Tensor v, torch::Tensor g_s1, double g_s0, double c,
                           double t_max, double min_norm, std::optional<torch::Tensor> into) {
  check_map("mid_backward", v);
  check_vec("mid_backward", "g_s1", g_s1, v);
  const int64_t B = v.size(0), C = v.size(1), P = pixels(v);
  const bool accumulate = into.has_value() && into->defined();
  auto grad_v = grad_buffer("mid_backward", v, into);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "mid_backward", [&] {
    auto k = make_consts<scalar_t>(c, t_max, 0.0, min_norm, nullptr, nullptr, 0, 0.0);
    mid_backward_impl<scalar_t>(v.data_ptr<scalar_t>(), g_s1.data_ptr<scalar_t>(),
                                scalar_t(g_s0), grad_v.data_ptr<scalar_t>(), accumulate, B,
                                C, P, k);
  });
  return grad_v;
}

torch::Tensor bn_var(torch::Tensor v, torch::Tensor mu, double c, double t_max, double proj_eps,
                     double min_norm) {
  check_map("bn_var", v);
  check_vec("bn_var", "mu", mu, v);
  const int64_t B = v.size(0), C = v.size(1), P = pixels(v);
  const int64_t tasks = B * ((P + kBlock - 1) / kBlock);
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

// Returns (grad_v, grad_mu [C], grad_beta [C], grad_r [1]) of <grad, out> + g_s * sum at^2
// (grad undefined: the variance sum alone); with `into`, grad_v is added to it in place.
std::vector<torch::Tensor> bn_backward(torch::Tensor v, torch::Tensor mu, torch::Tensor beta,
                                       std::optional<torch::Tensor> grad, double g_s, double r,
                                       double c, double t_max, double proj_eps,
                                       double min_norm, std::optional<torch::Tensor> into) {
  check_map("bn_backward", v);
  check_vec("bn_backward", "mu", mu, v);
  check_vec("bn_backward", "beta", beta, v);
  const bool has_out = grad.has_value() && grad->defined();
  torch::Tensor g;
  if (has_out) {
    g = *grad;
    check_grad("bn_backward", g, v);
  }
  const int64_t B = v.size(0), C = v.size(1), P = pixels(v);
  const int64_t tasks = B * ((P + kBlock - 1) / kBlock);
  const bool accumulate = into.has_value() && into->defined();
  auto grad_v = grad_buffer("bn_backward", v, into);
  auto part = torch::zeros({std::max<int64_t>(tasks, 1), 2 * C + kGlobals}, v.options());
  torch::Tensor grad_mu, grad_beta, grad_r;
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "bn_backward", [&] {
    using T = scalar_t;
    const T* m = mu.data_ptr<T>();
    const T* bt = beta.data_ptr<T>();
    auto k = make_consts<T>(c, t_max, proj_eps, min_norm, m, bt, C, r);
    if (has_out) {
      backward_impl<true, T>(v.data_ptr<T>(), m, bt, g.data_ptr<T>(), T(g_s),
                             grad_v.data_ptr<T>(), accumulate, part.data_ptr<T>(), B, C, P, k);
    } else {
      backward_impl<false, T>(v.data_ptr<T>(), m, bt, nullptr, T(g_s), grad_v.data_ptr<T>(),
                              accumulate, part.data_ptr<T>(), B, C, P, k);
    }
    reduce_backward_part<T>(part.sum(0), mu, beta, k, C, &grad_mu, &grad_beta, &grad_r);
  });
  return {grad_v, grad_mu, grad_beta, grad_r};
}

// ---------------------------------------------------------------- train mode, end to end
// The [C]-sized maths between the reductions, in double, forward and reverse (the closed
// form's midpoint_from_sums, _radial for beta = expmap0(bias), and r = |w| / sqrt(var + eps)).
// Not auto-vectorised: with -ffp-contract=fast the vectorised body and the scalar remainder of
// a loop round differently, so results would depend on the buffers' addresses.
#pragma GCC push_options
#pragma GCC optimize("no-tree-vectorize")
struct Small {
  int64_t C = 0;
  double c = 0, sc = 0, count = 0, min_norm = 0;
  // midpoint
  std::vector<double> s1, m, mu0, mu;
  double s0 = 0, den0 = 0, den = 0, e = 0, ec = 0, sq = 0, dd = 0, norm0 = 0, normc = 0;
  double radius = 0;
  bool proj = false;
  // beta
  std::vector<double> bt, beta;
  double bt2 = 0, bn = 0, t = 0, th = 0, alpha = 0, t_max = 0;
  // variance and r
  double S = 0, var = 0, w = 0, r = 0, bn_eps = 0;
};

std::vector<double> to_doubles(const torch::Tensor& t) {
  auto d = t.detach().to(torch::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

torch::Tensor from_doubles(const std::vector<double>& x, const torch::TensorOptions& opt) {
  // a copy: from_blob only borrows x's memory (and .to() returns it as is for double)
  return torch::from_blob(const_cast<double*>(x.data()), {int64_t(x.size())},
                          torch::TensorOptions().dtype(torch::kDouble))
      .to(opt, /*non_blocking=*/false, /*copy=*/true);
}

double norm2(const std::vector<double>& x) {
  double s = 0;
  for (double a : x) s += a * a;
  return s;
}

void small_midpoint(Small& z, const std::vector<double>& sums, double proj_eps) {
  const int64_t C = z.C;
  z.s1.assign(sums.begin(), sums.begin() + C);
  z.s0 = sums[C];
  z.den0 = z.s0 - z.count / 2;
  z.den = std::max(z.den0, z.min_norm);
  z.m.resize(C);
  for (int64_t i = 0; i < C; ++i) z.m[i] = z.s1[i] / z.den;
  z.e = 1 - z.c * norm2(z.m);
  z.ec = std::max(z.e, z.min_norm);
  z.sq = std::sqrt(z.ec);
  z.dd = 1 + z.sq;
  z.mu0.resize(C);
  for (int64_t i = 0; i < C; ++i) z.mu0[i] = z.m[i] / z.dd;
  z.radius = (1 - proj_eps) / z.sc;
  z.norm0 = std::sqrt(norm2(z.mu0));
  z.normc = std::max(z.norm0, z.min_norm);
  z.proj = z.normc > z.radius;
  z.mu = z.mu0;
  if (z.proj) {
    for (int64_t i = 0; i < C; ++i) z.mu[i] = z.mu0[i] / z.normc * z.radius;
  }
}

// adjoint of mu -> adjoints of (s1, s0)
std::vector<double> small_midpoint_back(const Small& z, const std::vector<double>& g_mu) {
  const int64_t C = z.C;
  std::vector<double> g_mu0(g_mu);
  if (z.proj) {
    double g_normc = 0;
    for (int64_t i = 0; i < C; ++i) {
      g_mu0[i] = g_mu[i] * z.radius / z.normc;
      g_normc -= g_mu[i] * z.mu0[i] * z.radius / (z.normc * z.normc);
    }
    if (z.norm0 >= z.min_norm) {
      for (int64_t i = 0; i < C; ++i) g_mu0[i] += g_normc * z.mu0[i] / z.norm0;
    }
  }
  std::vector<double> g_m(C);
  double g_dd = 0;
  for (int64_t i = 0; i < C; ++i) {
    g_m[i] = g_mu0[i] / z.dd;
    g_dd -= g_mu0[i] * z.m[i] / (z.dd * z.dd);
  }
  const double g_e = z.e >= z.min_norm ? g_dd / (2 * z.sq) : 0.0;
  const double g_mm2 = -z.c * g_e;
  std::vector<double> g_sums(C + 1);
  double g_den = 0;
  for (int64_t i = 0; i < C; ++i) {
    g_m[i] += 2 * z.m[i] * g_mm2;
    g_sums[i] = g_m[i] / z.den;
    g_den -= g_m[i] * z.s1[i] / (z.den * z.den);
  }
  g_sums[C] = z.den0 >= z.min_norm ? g_den : 0.0;
  return g_sums;
}

void small_beta(Small& z, const torch::Tensor& beta_t) {
  z.bt = to_doubles(beta_t);
  z.bt2 = norm2(z.bt);
  z.bn = std::sqrt(std::max(z.bt2, z.min_norm * z.min_norm));
  z.t = z.sc * z.bn;
  z.th = std::tanh(std::min(z.t, z.t_max));
  z.alpha = z.th / z.t;
  z.beta.resize(z.C);
  for (int64_t i = 0; i < z.C; ++i) z.beta[i] = z.bt[i] * z.alpha;
}

std::vector<double> small_beta_back(const Small& z, const std::vector<double>& g_beta) {
  std::vector<double> g_bt(z.C);
  double g_alpha = 0;
  for (int64_t i = 0; i < z.C; ++i) {
    g_bt[i] = g_beta[i] * z.alpha;
    g_alpha += g_beta[i] * z.bt[i];
  }
  const double g_th = g_alpha / z.t;
  double g_n = -z.alpha / z.bn * g_alpha;
  if (z.t <= z.t_max) g_n += z.sc * g_th * (1 - z.th * z.th);
  const double g_bt2 = z.bt2 >= z.min_norm * z.min_norm ? g_n / (2 * z.bn) : 0.0;
  for (int64_t i = 0; i < z.C; ++i) g_bt[i] += 2 * z.bt[i] * g_bt2;
  return g_bt;
}

void small_rescale(Small& z) {
  z.var = z.S * (4 / z.c) / z.count;
  z.r = std::abs(z.w) / std::sqrt(z.var + z.bn_eps);
}

Small make_small(const torch::Tensor& v, const torch::Tensor& sums, const torch::Tensor& beta_t,
                 double S, double w, double c, double bn_eps, double proj_eps, double t_max,
                 double min_norm) {
  Small z;
  z.C = v.size(1);
  z.c = c;
  z.sc = std::sqrt(c);
  z.count = double(v.size(0) * pixels(v));
  z.min_norm = min_norm;
  z.t_max = t_max;
  z.bn_eps = bn_eps;
  z.w = w;
  small_midpoint(z, to_doubles(sums), proj_eps);
  small_beta(z, beta_t);
  z.S = S;
  return z;
}

#pragma GCC pop_options

// Returns (out, mu [C], var [], sums [C + 1], S []): mu and var for the running statistics,
// sums and S (the two reductions) for the backward pass.
std::vector<torch::Tensor> bn_train_forward(torch::Tensor v, torch::Tensor beta_t, double w,
                                            double c, double bn_eps, double proj_eps,
                                            double t_max, double min_norm) {
  check_map("bn_train_forward", v);
  check_bias("bn_train_forward", beta_t, v);
  auto sums = mid_forward(v, c, t_max, min_norm);
  Small z = make_small(v, sums, beta_t, 0.0, w, c, bn_eps, proj_eps, t_max, min_norm);
  auto mu = from_doubles(z.mu, v.options());
  auto S = bn_var(v, mu, c, t_max, proj_eps, min_norm);
  z.S = S.item<double>();
  small_rescale(z);
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
  Small z = make_small(v, sums, beta_t, S.item<double>(), w, c, bn_eps, proj_eps, t_max,
                       min_norm);
  small_rescale(z);
  auto mu = from_doubles(z.mu, v.options());
  auto beta = from_doubles(z.beta, v.options());
  // One pass: the gradient through the output map, and the variance sum's gradient with unit
  // weight in coefficient form (backward_impl<true, T, true>); a second pass (the midpoint
  // sums' gradient) adds both scaled terms. Without need_v only the first pass runs, without
  // the variance chain.
  const int64_t B = v.size(0), C = v.size(1), P = pixels(v);
  const int64_t tasks = B * ((P + kBlock - 1) / kBlock);
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
      backward_impl<true, T, true>(v.data_ptr<T>(), m, beta.data_ptr<T>(), g.data_ptr<T>(),
                                   T(0), grad_v.data_ptr<T>(), false, part.data_ptr<T>(), B, C,
                                   P, k, var_a.data_ptr<T>(), var_b.data_ptr<T>());
    } else {  // only the parameters' gradients: no variance chain
      backward_impl<true, T>(v.data_ptr<T>(), m, beta.data_ptr<T>(), g.data_ptr<T>(), T(0),
                             grad_v.data_ptr<T>(), false, part.data_ptr<T>(), B, C, P, k);
    }
    auto tot = part.sum(0);
    reduce_backward_part<T>(tot.narrow(0, 0, 2 * C + kGlobals), mu, beta, k, C, &res_mu,
                            &res_beta, &res_r);
    if (need_v) {
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
  auto g_bt = from_doubles(small_beta_back(z, to_doubles(res_beta)), torch::kDouble);
  auto g_w_t = torch::full({}, g_w, torch::TensorOptions().dtype(torch::kDouble));
  if (!need_v) return {torch::Tensor(), g_bt, g_w_t};
  // through sigma^2 (g_S times the unit-weight gradient) and mu (the midpoint sums)
  const auto g_mu_var = to_doubles(unit_mu);
  std::vector<double> g_mu_tot(z.C);
  for (int64_t i = 0; i < z.C; ++i) g_mu_tot[i] = g_mu[i] + g_S * g_mu_var[i];
  const auto g_sums = small_midpoint_back(z, g_mu_tot);
  std::vector<double> g_s1(g_sums.begin(), g_sums.begin() + z.C);
  auto g_s1_t = from_doubles(g_s1, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "bn_train_backward_mid", [&] {
    using T = scalar_t;
    auto k = make_consts<T>(c, t_max, 0.0, min_norm, nullptr, nullptr, 0, 0.0);
    mid_backward_impl<T>(v.data_ptr<T>(), g_s1_t.data_ptr<T>(), T(g_sums[z.C]),
                         grad_v.data_ptr<T>(), true, B, C, P, k, var_a.data_ptr<T>(),
                         var_b.data_ptr<T>(), mu.data_ptr<T>(), T(g_S));
  });
  return {grad_v, g_bt, g_w_t};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mid_forward", &mid_forward, "gyromidpoint sums [sum gamma^2 x, sum gamma^2]");
  m.def("mid_backward", &mid_backward, "backward of mid_forward");
  m.def("bn_var", &bn_var, "sum of atanh(sqrt(c) |(-mu) + x|)^2 over pixels");
  m.def("bn_out", &bn_out, "batch-norm output map");
  m.def("bn_backward", &bn_backward, "batch-norm backward");
  m.def("bn_train_forward", &bn_train_forward, "batch norm with batch statistics");
  m.def("bn_train_backward", &bn_train_backward, "backward of bn_train_forward");
}
