// Per-sample activation statistics (stats.per_sample_stats): what one piece of a row sums up, how
// pieces combine, and how a row's sums become its statistics.  Shared by the CPU kernel
// (cpu_quantization.cpp), the CUDA kernel (gemmlowp_device.cuh) and its host emulator, so that every device
// finishes a row the same way; only the summation order of the pieces differs between CPU and GPU.
//
// The columns of a row: min, max, mean, std (population), kurtosis (Pearson), mean |x|, mean |x - mean|,
// from two reads of the row:
//   pass 1: min, max, sum x, sum |x|;          pass 2 (c = x - mean): sum |c|, sum z^2, sum z^4, z = c / s
// with s = max(max - mean, mean - min), so |z| <= 1 and z^4 cannot overflow float32 whatever the scale.
// min / max use `v < lo ? v : lo`, which skips NaN; a NaN anywhere in a row makes sum |x| NaN, and finish1
// then sets min and max to NaN (the caller's finite check names the layer).

#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define ACIQ_HD __host__ __device__ __forceinline__
#else
#define ACIQ_HD inline
#endif

namespace aciq_stats {

#ifndef __CUDACC__
using std::isfinite;
using std::isnan;
using std::sqrt;
#endif

constexpr int kColumns = 7;  // min, max, mean, std, kurtosis, mean_abs, b

// Partial sums of one piece of a row; a default-constructed one is empty (the identity of combine).
struct Pass1 {
  double lo = INFINITY, hi = -INFINITY, sum = 0.0, sum_abs = 0.0;
};
struct Pass2 {
  double sum_abs = 0.0, sum_z2 = 0.0, sum_z4 = 0.0;
};
// What pass 2 needs from pass 1.
struct Centre {
  float mean, inv_scale;
  double scale;
};

// `into` += the piece after it.
ACIQ_HD void combine(Pass1& into, const Pass1& c) {
  into.lo = c.lo < into.lo ? c.lo : into.lo;
  into.hi = c.hi > into.hi ? c.hi : into.hi;
  into.sum += c.sum;
  into.sum_abs += c.sum_abs;
}

ACIQ_HD void combine(Pass2& into, const Pass2& c) {
  into.sum_abs += c.sum_abs;
  into.sum_z2 += c.sum_z2;
  into.sum_z4 += c.sum_z4;
}

// Columns min, max, mean and mean |x| of a row of m elements into out[0..6], and its centre for pass 2.
ACIQ_HD Centre finish1(const Pass1& p, int64_t m, double* out) {
  const double n = static_cast<double>(m);
  double lo = p.lo, hi = p.hi;
  if (isnan(p.sum_abs)) lo = hi = NAN;
  double mean = p.sum / n;
  if (lo == hi) mean = lo;  // constant row: exact mean, so every c is 0
  out[0] = lo;
  out[1] = hi;
  out[2] = mean;
  out[5] = p.sum_abs / n;
  const float mean_f = static_cast<float>(mean);
  const double above = hi - static_cast<double>(mean_f), below = static_cast<double>(mean_f) - lo;
  const double scale = above < below ? below : above;  // std::max, NaN included
  Centre c{mean_f, 0.0f, 0.0};
  if (scale > 0.0 && isfinite(scale)) {
    c.scale = scale;
    c.inv_scale = static_cast<float>(1.0 / scale);
  }
  return c;
}

// Columns std, kurtosis and mean |x - mean| into out.
ACIQ_HD void finish2(const Pass2& p, const Centre& c, int64_t m, double* out) {
  const double n = static_cast<double>(m);
  out[6] = p.sum_abs / n;
  if (c.scale > 0.0 && p.sum_z2 > 0.0) {
    const double var_z = p.sum_z2 / n;
    out[3] = sqrt(var_z) * c.scale;
    out[4] = (p.sum_z4 / n) / (var_z * var_z);
  } else {
    // constant row: 0 and 0; a NaN or infinite row: NaN (its min / max already fail the finite check)
    const bool finite = isfinite(out[0]) && isfinite(out[1]);
    out[3] = finite ? 0.0 : NAN;
    out[4] = finite ? 0.0 : NAN;
  }
}

}  // namespace aciq_stats
