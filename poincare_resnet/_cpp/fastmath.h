// Fast float32 transcendental functions for the native kernels, on ATen's SIMD Vectorized types.
//
// SLEEF's 1-ulp tanh, atanh, sinh, cosh, asinh and log1p cost several times a plain exp or log;
// in the layers' per-pixel and per-element chains they were the largest cost. For float each
// function here is one fast exp or log plus a few arithmetic operations, and switches to its odd
// Taylor series for small arguments, where the closed form would cancel (the largest relative
// error is ~1e-6, below what the float32 layer tests allow). For double (the tests, gradcheck)
// each returns SLEEF's or the exact closed form, so the float64 kernels keep matching PyTorch to
// rounding. (residual.cpp keeps its own exp/log1p tanh and atanh: with these, its float32 test
// of the alpha gradient at alpha = 0 against the PyTorch closed form failed, 1.05 > 0.40.)
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/bit_cast.h>

#include <limits>
#include <type_traits>

namespace poincare_fastmath {

template <typename V>
inline V odd_series(const V& x, const V& x2, double c3, double c5, double c7, double c9) {
  using T = typename V::value_type;
  V poly = at::vec::fmadd(V(T(c9)), x2, V(T(c7)));
  poly = at::vec::fmadd(poly, x2, V(T(c5)));
  poly = at::vec::fmadd(poly, x2, V(T(c3)));
  return at::vec::fmadd(x * x2, poly, x);
}

// |y| with the sign of x, for y >= 0 (exact; at::vec's float copysign is a call into SLEEF).
template <typename V>
inline V with_sign_of(const V& y, const V& x) {
  using T = typename V::value_type;
  return y | (x & V(T(-0.0)));
}

// The bits of a float vector as int32 lanes (a register cast where ATen has no such cast).
inline at::vec::Vectorized<int32_t> float_bits(const at::vec::Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castps_si512(x);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_castps_si256(x);
#else
  return at::vec::cast<int32_t>(x);
#endif
}

// Cephes' logf polynomial f^3 P(f) (z = f^2) of log(1 + f) = f - f^2/2 + f^3 P(f), for
// f = m - 1 with m in [sqrt(1/2), sqrt(2)) (float; relative error below 1e-7).
template <typename V>
inline V log_series(const V& f, const V& z) {
  V y = at::vec::fmadd(V(7.0376836292e-2f), f, V(-1.1514610310e-1f));
  y = at::vec::fmadd(y, f, V(1.1676998740e-1f));
  y = at::vec::fmadd(y, f, V(-1.2420140846e-1f));
  y = at::vec::fmadd(y, f, V(1.4249322787e-1f));
  y = at::vec::fmadd(y, f, V(-1.6668057665e-1f));
  y = at::vec::fmadd(y, f, V(2.0000714765e-1f));
  y = at::vec::fmadd(y, f, V(-2.4999993993e-1f));
  y = at::vec::fmadd(y, f, V(3.3333331174e-1f));
  return y * f * z;
}

// log(x) for finite x >= the smallest normal number (no special cases). double: SLEEF. float:
// inline (SLEEF's is a function call, around which the compiler spills every vector register
// live in the loop): x = 2^e m with m in [sqrt(1/2), sqrt(2)), log(m) = f - f^2/2 + f^3 P(f),
// f = m - 1, with Cephes' logf polynomial (relative error below 1e-7), and e log 2 split into
// two parts. For NaN or +inf the float result would come from the bits (~89 and ~88.7): the
// callers below select the IEEE value.
template <typename V>
inline V log_normal(const V& x) {
  using T = typename V::value_type;
  if constexpr (std::is_same_v<T, double>) {
    return x.log();
  } else {
    const V one(1.0f);
    const V mant_mask(c10::bit_cast<float>(0x007fffffu));
    const V exp_mask(c10::bit_cast<float>(0x7f800000u));
    V m = (x & mant_mask) | one;  // [1, 2)
    // the bits of 2^e are (e + 127) 2^23: exact as a float
    V e = at::vec::convert_to_fp_of_same_size<float>(float_bits(x & exp_mask)) *
              V(1.0f / 8388608.0f) - V(127.0f);
    V big = m > V(1.41421356237f);
    m = V::blendv(m, m * V(0.5f), big);
    e = V::blendv(e, e + one, big);
    V f = m - one;
    V z = f * f;
    V y = log_series(f, z);
    y = at::vec::fmadd(e, V(-2.12194440e-4f), y);
    y = at::vec::fmadd(V(-0.5f), z, y);
    return at::vec::fmadd(e, V(0.693359375f), f + y);
  }
}

template <typename V>
inline V log(const V& x);

// log(x) for x >= 1 (or any positive normal x), +inf or NaN: log(+inf) = +inf, log(NaN) = NaN
// (AVX512: the IEEE log; elsewhere by one select, x itself where !(x < inf)).
template <typename V>
inline V log_ge1(const V& x) {
  using T = typename V::value_type;
  if constexpr (std::is_same_v<T, double>) {
    return x.log();
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    return poincare_fastmath::log(x);
#else
    return V::blendv(x, log_normal(x), x < V(std::numeric_limits<T>::infinity()));
#endif
  }
}

// Cephes' logf polynomial: log(m) for m in [sqrt(1/2), sqrt(2)), f = m - 1, without e log 2.
template <typename V>
inline V log_mantissa(const V& f) {
  V z = f * f;
  V y = log_series(f, z);
  y = at::vec::fmadd(V(-0.5f), z, y);
  return f + y;
}

// IEEE log for every float: log(NaN) = NaN, log(+inf) = +inf, log(+-0) = -inf, log(x < 0) = NaN,
// denormals exact. Selects, no branches. AVX512: the exponent and mantissa come from
// getexp/getmant, which give these special values by themselves (getexp(0) = -inf, getexp(inf)
// = inf, getmant(x < 0) = NaN, denormals normalised) and cost fewer instructions than the bits;
// e log 2 is one product (its rounding, ~2e-9 relative, is far below the polynomial's 1e-7), so
// that e = +-inf is not met by a second term of the other sign. Elsewhere: the bits
// (log_normal), with denormals scaled by 2^23 and the special values selected.
template <typename V>
inline V log(const V& x) {
  using T = typename V::value_type;
  if constexpr (std::is_same_v<T, double>) {
    return x.log();
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_nan);
    __m512 e = _mm512_getexp_ps(x);
    const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356237f), _CMP_GT_OQ);
    m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
    e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.0f));
    return at::vec::fmadd(V(e), V(0.693147180559945f), log_mantissa(V(m) - V(1.0f)));
#else
    constexpr T inf = std::numeric_limits<T>::infinity();
    const V zero(0.0f);
    const V sub = x < V(std::numeric_limits<T>::min());  // denormal, zero or negative
    const V xs = V::blendv(x, x * V(8388608.0f), sub);
    V y = log_normal(xs) - (sub & V(23.0f * 0.693147180559945f));
    y = V::blendv(x, y, x < V(inf));           // +inf, NaN: x itself
    y = V::blendv(y, V(-inf), x == zero);      // +-0
    return V::blendv(y, V(std::numeric_limits<T>::quiet_NaN()), x < zero);
#endif
  }
}

constexpr double kSeriesBelow = 0.125;  // |x| below which the odd series is used (float)

// An odd function sign(x) f(a), a = |x|, from its closed form big = f(a) and the coefficients of
// its series, which replaces the closed form below kSeriesBelow (where the latter cancels).
template <typename V>
inline V odd_blend(const V& x, const V& a, const V& big, double c3, double c5, double c7,
                   double c9) {
  using T = typename V::value_type;
  V series = odd_series(a, a * a, c3, c5, c7, c9);
  return with_sign_of(V::blendv(big, series, a < V(T(kSeriesBelow))), x);
}

// asinh(q); also returns sqrt(1 + q^2). double: sign(q) log1p(|q| + q^2 / (1 + sqrt(1 + q^2))).
// float: sign(q) log(|q| + sqrt(1 + q^2)), series through q^9 for |q| < 1/8. From |q| = 2^12
// (float; 2^27 double) on, sqrt(1 + q^2) rounds to |q|: there asinh(q) = sign(q)(log|q| + log 2)
// and the root is |q|, so neither overflows with q^2 (above ~1.8e19 in float32); the same select
// takes NaN (-> NaN) and +-inf (-> +-inf, root +inf).
template <typename V>
inline V asinh(const V& q, V* root) {
  using T = typename V::value_type;
  constexpr T kHuge = std::is_same_v<T, double> ? T(134217728.0) : T(4096.0);
  const V one(1), ln2(T(0.6931471805599453));
  V a = q.abs();
  V moderate = a < V(kHuge);  // false for NaN, inf and huge |q|
  V r = V::blendv(a, (one + a * a).sqrt(), moderate);
  *root = r;
  if constexpr (std::is_same_v<T, double>) {
    V small = (a + a * a / (one + r)).log1p();
    V huge = a.log() + ln2;
    // below 2^-26 asinh(q) = q to rounding (and SLEEF's log1p flushes denormals to 0)
    small = V::blendv(small, a, a < V(T(1.4901161193847656e-08)));
    return V::blendv(huge, small, moderate).copysign(q);
  } else {
    V lg = log_ge1(V::blendv(a, a + r, moderate)) + V::blendv(ln2, V(0), moderate);
    return odd_blend(q, a, lg, -1.0 / 6, 3.0 / 40, -15.0 / 336, 105.0 / 3456);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// float on AVX512: the same with the selects folded into masked instructions (the sqrt and
// the add of the root only in the moderate lanes, log 2 added in the others).
template <>
inline at::vec::Vectorized<float> asinh(const at::vec::Vectorized<float>& q,
                                        at::vec::Vectorized<float>* root) {
  using V = at::vec::Vectorized<float>;
  const __m512 a = q.abs();
  const __mmask16 moderate = _mm512_cmp_ps_mask(a, _mm512_set1_ps(4096.0f), _CMP_LT_OQ);
  const __m512 r = _mm512_mask_sqrt_ps(a, moderate, _mm512_fmadd_ps(a, a, _mm512_set1_ps(1.0f)));
  *root = r;
  __m512 lg = poincare_fastmath::log(V(_mm512_mask_add_ps(a, moderate, a, r)));
  lg = _mm512_mask_add_ps(lg, _knot_mask16(moderate), lg, _mm512_set1_ps(0.693147180559945f));
  return odd_blend(q, V(a), V(lg), -1.0 / 6, 3.0 / 40, -15.0 / 336, 105.0 / 3456);
}
#endif

// sinh(x) (float) from E = exp(x) and a = |x|: (E - 1/E)/2, or for a < 1/2 the odd series
// through x^9 (relative error ~2e-6 at worst there), where the closed form cancels.
template <typename V>
inline V sinh_from_exp(const V& x, const V& a, const V& E) {
  using T = typename V::value_type;
  V big = (E - E.reciprocal()) * V(T(0.5));
  V series = odd_series(x, x * x, 1.0 / 6, 1.0 / 120, 1.0 / 5040, 1.0 / 362880);
  return V::blendv(big, series, a < V(T(0.5)));
}

// sinh(g) for finite |g| <= 80 or NaN (the FC kernel's clamped argument; not for +-inf).
// double: SLEEF. float: (E - 1/E)/2 with E = exp(g) (the fast 20-ulp exp), series through g^9
// for |g| < 1/2 (relative error ~2e-6 at worst there). The fast exp clamps its argument, NaN
// included, to a finite range: E + 0 g (one fma) carries a NaN g into the result.
template <typename V>
inline V sinh_bounded(const V& g) {
  using T = typename V::value_type;
  if constexpr (std::is_same_v<T, double>) {
    return g.sinh();
  } else {
    V E = at::vec::fmadd(V(T(0)), g, g.exp_u20());
    return sinh_from_exp(g, g.abs(), E);
  }
}

// sinh(g) for every g: as sinh_bounded on |g|, with the sign of g, so both signs overflow to
// +-inf together (from |g| ~ 88.4 on, where the fast exp overflows; true overflow at 89.4).
template <typename V>
inline V sinh(const V& g) {
  using T = typename V::value_type;
  if constexpr (std::is_same_v<T, double>) {
    return g.sinh();
  } else {
    V a = g.abs();
    V mag = sinh_from_exp(a, a, a.exp_u20());
    return V::blendv(g, with_sign_of(mag, g), a < V(std::numeric_limits<T>::infinity()));
  }
}

// (sinh(x), cosh(x)) for x >= 0. float: cosh = sqrt(1 + sinh^2) (no cancellation, cosh >= 1).
template <typename V>
inline void sinh_cosh(const V& x, V* sh, V* ch) {
  using T = typename V::value_type;
  if constexpr (std::is_same_v<T, double>) {
    *sh = x.sinh();
    *ch = x.cosh();
  } else {
    *sh = sinh(x);
    // sqrt(1 + sinh^2) = sinh (rounded) from sinh = 2^12 on, where sinh^2 would overflow later
    *ch = V::blendv(*sh, (V(T(1)) + *sh * *sh).sqrt(), *sh < V(T(4096)));
  }
}

// tanh(x). double: SLEEF. float: sign(x) (1 - 2e/(1 + e)), e = exp(-2|x|), series below 1/8.
// (Near saturation 1 - 2e/(1 + e) rounds once, so 1 - tanh^2 keeps its relative accuracy.)
template <typename V>
inline V tanh(const V& x) {
  using T = typename V::value_type;
  if constexpr (std::is_same_v<T, double>) {
    return x.tanh();
  } else {
    const V one(1);
    V a = x.abs();
    V e = (V(T(-2)) * a).exp_u20();
    return odd_blend(x, a, one - (e + e) / (one + e), -1.0 / 3, 2.0 / 15, -17.0 / 315,
                     62.0 / 2835);
  }
}

// atanh(x) (NaN for |x| > 1, +-inf at +-1). double: SLEEF. float: sign(x) log((1 + |x|)/(1 - |x|))/2, series below 1/8.
template <typename V>
inline V atanh(const V& x) {
  using T = typename V::value_type;
  if constexpr (std::is_same_v<T, double>) {
    return x.atanh();
  } else {
    const V one(1);
    V a = x.abs();
    // (1 + a)/(1 - a): >= 1 for a < 1, +inf at a = 1 (atanh = +-inf), < 0 for a > 1 (NaN)
    V ratio = (one + a) / (one - a);
    V lg = V::blendv(V(std::numeric_limits<T>::quiet_NaN()), log_ge1(ratio), ratio >= V(0));
    V big = V(T(0.5)) * lg;
    return odd_blend(x, a, big, 1.0 / 3, 1.0 / 5, 1.0 / 7, 1.0 / 9);
  }
}

}  // namespace poincare_fastmath
