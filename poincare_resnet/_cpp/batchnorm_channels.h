// The [C]-sized maths of the train-mode batch norm between the reductions over the map, in
// double, forward and reverse (the closed form's midpoint_from_sums, _radial for
// beta = expmap0(bias), and r = |w| / sqrt(var + eps)); batchnorm.cpp runs the passes over the
// map around it. With the midpoint sums s1 = sum gamma^2 x [C], s0 = sum gamma^2 over N pixels:
//   m = s1 / max(s0 - N/2, min),  mu0 = m / (1 + sqrt(max(1 - c|m|^2, min))),
//   mu = project(mu0) (scaled onto radius (1 - proj_eps) / sqrt(c) when beyond it),
//   beta = expmap0(bias) = bias tanh(min(t, t_max)) / t,  t = sqrt(c) |bias|,
//   var = S 4 / (c N) (S = sum at^2),  r = |w| / sqrt(var + bn_eps).
// Not auto-vectorised: with -ffp-contract=fast the vectorised body and the scalar remainder of
// a loop round differently, so results would depend on the buffers' addresses.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace poincare_bn {

#pragma GCC push_options
#pragma GCC optimize("no-tree-vectorize")
// The [C]-sized quantities of one call, kept for the reverse pass (count = N, the pixels).
struct ChannelStats {
  int64_t C = 0;
  double c = 0, sc = 0, count = 0, min_norm = 0;
  // midpoint: s1, s0 the sums; den0 = s0 - N/2, den = max(den0, min); m = s1 / den;
  // e = 1 - c|m|^2, ec = max(e, min), sq = sqrt(ec), dd = 1 + sq; mu0 = m / dd;
  // norm0 = |mu0|, normc = max(norm0, min); proj = normc > radius; mu = project(mu0)
  std::vector<double> s1, m, mu0, mu;
  double s0 = 0, den0 = 0, den = 0, e = 0, ec = 0, sq = 0, dd = 0, norm0 = 0, normc = 0;
  double radius = 0;
  bool proj = false;
  // beta = alpha bt: bt the bias, bt2 = |bt|^2, bn = sqrt(max(bt2, min^2)), t = sqrt(c) bn,
  // th = tanh(min(t, t_max)), alpha = th / t
  std::vector<double> bt, beta;
  double bt2 = 0, bn = 0, t = 0, th = 0, alpha = 0, t_max = 0;
  // variance and rescale: S = sum at^2, var = 4 S / (c N), w the weight, r = |w| / sqrt(var + eps)
  double S = 0, var = 0, w = 0, r = 0, bn_eps = 0;
};

inline std::vector<double> to_doubles(const torch::Tensor& t) {
  auto d = t.detach().to(torch::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

inline torch::Tensor from_doubles(const std::vector<double>& x, const torch::TensorOptions& opt) {
  // a copy: from_blob only borrows x's memory (and .to() returns it as is for double)
  return torch::from_blob(const_cast<double*>(x.data()), {int64_t(x.size())},
                          torch::TensorOptions().dtype(torch::kDouble))
      .to(opt, /*non_blocking=*/false, /*copy=*/true);
}

inline double norm2(const std::vector<double>& x) {
  double s = 0;
  for (double a : x) s += a * a;
  return s;
}

// mu from the midpoint sums (s1 [C], s0).
inline void midpoint_from_sums(ChannelStats& z, const std::vector<double>& sums, double proj_eps) {
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

// Reverse of midpoint_from_sums: the adjoint of mu -> those of (s1 [C], s0), in one vector.
inline std::vector<double> midpoint_from_sums_backward(const ChannelStats& z, const std::vector<double>& g_mu) {
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

// beta = expmap0(bias).
inline void centre_from_bias(ChannelStats& z, const torch::Tensor& beta_t) {
  z.bt = to_doubles(beta_t);
  z.bt2 = norm2(z.bt);
  z.bn = std::sqrt(std::max(z.bt2, z.min_norm * z.min_norm));
  z.t = z.sc * z.bn;
  z.th = std::tanh(std::min(z.t, z.t_max));
  z.alpha = z.th / z.t;
  z.beta.resize(z.C);
  for (int64_t i = 0; i < z.C; ++i) z.beta[i] = z.bt[i] * z.alpha;
}

// Reverse of centre_from_bias: the adjoint of beta -> that of the bias.
inline std::vector<double> centre_from_bias_backward(const ChannelStats& z, const std::vector<double>& g_beta) {
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

// var and r from S.
inline void rescale_from_variance(ChannelStats& z) {
  z.var = z.S * (4 / z.c) / z.count;
  z.r = std::abs(z.w) / std::sqrt(z.var + z.bn_eps);
}

// mu and beta for a map of `count` pixels and C = beta_t's channels (S, var and r: later).
inline ChannelStats make_channel_stats(int64_t count, const torch::Tensor& sums,
                                       const torch::Tensor& beta_t, double S, double w, double c,
                                       double bn_eps, double proj_eps, double t_max,
                                       double min_norm) {
  ChannelStats z;
  z.C = beta_t.numel();
  z.c = c;
  z.sc = std::sqrt(c);
  z.count = double(count);
  z.min_norm = min_norm;
  z.t_max = t_max;
  z.bn_eps = bn_eps;
  z.w = w;
  midpoint_from_sums(z, to_doubles(sums), proj_eps);
  centre_from_bias(z, beta_t);
  z.S = S;
  return z;
}

#pragma GCC pop_options

}  // namespace poincare_bn
