// GEMMLOWP fake quantization on the CPU: one fused, in-place pass over a float32 tensor.
//
// It must give the same bits as the PyTorch reference (reference_quantize_ in grid.py):
//   v = (x - offset) * inv_scale  [+ noise];  v = clamp(v, 0, qmax);  q = rint(v);  y = q * scale + offset
// one IEEE float32 operation per step.  So: built with -ffp-contract=off (no FMA), no -ffast-math, and the
// loops are written so that GCC vectorises them with the baseline x86-64 instruction set (SSE2), keeping
// the binary portable.  The pass is memory-bound, so SSE2 is enough to reach copy bandwidth.
//
// Details that keep the bits equal to ATen's CPU kernels:
//  * clamp is written as `v < 0 ? 0 : v` / `v > qmax ? qmax : v`: a NaN fails both comparisons and stays the
//    same NaN, and -0.0 stays -0.0 (as ATen's clamp does);
//  * round-half-even without SSE4.1: for 0 <= v <= 65535, (v + 1.5 * 2^23) - 1.5 * 2^23 is rint(v) in the
//    default rounding mode, because the sum lands where the float spacing is exactly 1.  The sign of v is
//    copied back so that -0.0 rounds to -0.0 like nearbyint (it only shows when offset is -0.0).
// -fno-trapping-math (setup.py) only lets GCC vectorise the per-channel pass-through select.
// Threads come from at::parallel_for (OpenMP in PyTorch's CPU builds), so torch.set_num_threads applies.

#include <ATen/ATen.h>
#include <torch/python.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "bindings.h"
#include "common.h"
#include "stats_math.h"

namespace {

using namespace aciq_kernels;
using namespace aciq_stats;

constexpr float kRintMagic = 12582912.0f;  // 1.5 * 2^23
constexpr int64_t kGrain = 1 << 15;         // elements per task: below this, threads cost more than they save

// Quantize one element: the definition, step by step (inlined into the vectorised loops below).
inline float fake_quant(float x, float noise, bool has_noise, float scale, float inv_scale, float offset,
                        float qmax) {
  float v = (x - offset) * inv_scale;
  if (has_noise) v = v + noise;
  v = v < 0.0f ? 0.0f : v;
  v = v > qmax ? qmax : v;
  float q = (v + kRintMagic) - kRintMagic;
  q = std::copysign(q, v);
  return q * scale + offset;
}

// Contiguous run with one set of parameters (the whole tensor, or one channel's run of `inner` elements).
template <bool kNoise>
void quantize_run(float* __restrict x, const float* __restrict noise, int64_t n, float scale, float inv_scale,
                  float offset, float qmax) {
  for (int64_t i = 0; i < n; ++i) {
    x[i] = fake_quant(x[i], kNoise ? noise[i] : 0.0f, kNoise, scale, inv_scale, offset, qmax);
  }
}

// Run along the channel dimension itself (inner == 1): parameters change every element.  Channels with
// scale == 0 keep their value.
template <bool kNoise>
void quantize_channels(float* __restrict x, const float* __restrict noise, int64_t channels,
                       const float* __restrict scale, const float* __restrict inv_scale,
                       const float* __restrict offset, const float* __restrict qmax) {
  for (int64_t c = 0; c < channels; ++c) {
    const float xc = x[c], s = scale[c];
    const float y = fake_quant(xc, kNoise ? noise[c] : 0.0f, kNoise, s, inv_scale[c], offset[c], qmax[c]);
    x[c] = s == 0.0f ? xc : y;
  }
}

constexpr const char* kPrefix = "_gemmlowp_cpu";  // names the extension in argument errors

void check_tensor(const at::Tensor& t, const char* what) {
  if (!t.device().is_cpu()) {
    fail(std::string(kPrefix) + ": " + what + " is on " + t.device().str() +
         "; the CPU kernel takes CPU tensors only (use the 'cuda' backend for CUDA tensors)");
  }
  check_float32(kPrefix, t, what);
}

void check_noise(const at::Tensor& x, const std::optional<at::Tensor>& noise) {
  if (!noise.has_value()) return;
  check_tensor(*noise, "noise");
  check_noise_shape(kPrefix, x, *noise);
}

void check_param(const at::Tensor& p, const char* what, int64_t channels, int64_t dim) {
  check_tensor(p, what);
  check_param_shape(kPrefix, p, what, channels, dim);
}

template <bool kNoise>
void per_tensor(float* x, const float* noise, int64_t n, float scale, float inv_scale, float offset, float qmax) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    quantize_run<kNoise>(x + begin, kNoise ? noise + begin : nullptr, end - begin, scale, inv_scale, offset,
                         qmax);
  });
}

template <bool kNoise>
void per_channel(float* x, const float* noise, int64_t outer, int64_t channels, int64_t inner, const float* scale,
                 const float* inv_scale, const float* offset, const float* qmax) {
  if (inner == 1) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(channels, 1));
    at::parallel_for(0, outer, grain, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        const int64_t base = o * channels;
        quantize_channels<kNoise>(x + base, kNoise ? noise + base : nullptr, channels, scale, inv_scale, offset,
                                  qmax);
      }
    });
    return;
  }
  // One task item per (outer, channel) row of `inner` contiguous elements.
  const int64_t rows = outer * channels;
  const int64_t grain = std::max<int64_t>(1, kGrain / inner);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t c = r % channels;
      if (scale[c] == 0.0f) continue;  // pass-through channel
      const int64_t base = r * inner;
      quantize_run<kNoise>(x + base, kNoise ? noise + base : nullptr, inner, scale[c], inv_scale[c], offset[c],
                           qmax[c]);
    }
  });
}

at::Tensor quantize_(at::Tensor x, const std::optional<at::Tensor>& noise, double scale, double inv_scale,
                     double offset, double qmax) {
  check_tensor(x, "x");
  check_noise(x, noise);
  mark_modified(x);
  if (x.numel() == 0) return x;
  Work w = prepare(x, noise, 0);
  float* data = w.x.data_ptr<float>();
  const auto s = static_cast<float>(scale), inv = static_cast<float>(inv_scale);
  const auto off = static_cast<float>(offset), qm = static_cast<float>(qmax);
  if (w.noise.defined()) {
    per_tensor<true>(data, w.noise.data_ptr<float>(), w.x.numel(), s, inv, off, qm);
  } else {
    per_tensor<false>(data, nullptr, w.x.numel(), s, inv, off, qm);
  }
  if (w.copied) x.copy_(w.x);
  return x;
}

at::Tensor quantize_per_channel_(at::Tensor x, const std::optional<at::Tensor>& noise, const at::Tensor& scale,
                                 const at::Tensor& inv_scale, const at::Tensor& offset, int64_t dim,
                                 const at::Tensor& qmax) {
  check_tensor(x, "x");
  check_noise(x, noise);
  dim = channel_dim(kPrefix, x, dim);
  const int64_t channels = x.size(dim);
  check_param(scale, "scale", channels, dim);
  check_param(inv_scale, "inv_scale", channels, dim);
  check_param(offset, "offset", channels, dim);
  check_param(qmax, "qmax", channels, dim);
  mark_modified(x);
  if (x.numel() == 0) return x;
  Work w = prepare(x, noise, dim);
  const at::Tensor s = scale.contiguous(), inv = inv_scale.contiguous(), off = offset.contiguous();
  const at::Tensor qmc = qmax.contiguous();
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < w.dim; ++d) outer *= w.x.size(d);
  for (int64_t d = w.dim + 1; d < w.x.dim(); ++d) inner *= w.x.size(d);
  float* data = w.x.data_ptr<float>();
  const float* qm = qmc.data_ptr<float>();
  if (w.noise.defined()) {
    per_channel<true>(data, w.noise.data_ptr<float>(), outer, channels, inner, s.data_ptr<float>(),
                      inv.data_ptr<float>(), off.data_ptr<float>(), qm);
  } else {
    per_channel<false>(data, nullptr, outer, channels, inner, s.data_ptr<float>(), inv.data_ptr<float>(),
                       off.data_ptr<float>(), qm);
  }
  if (w.copied) x.copy_(w.x);
  return x;
}

// ---------------------------------------------------------------------------------------------------------
// Per-sample activation statistics (stats.per_sample_stats) of each row of a contiguous float32
// [N, M] tensor, in two reads of each row and no temporary; what the passes sum and how a row is finished:
// stats_math.h.  Sums are float32 over kLanes interleaved lanes within blocks of kBlock elements (vectorisable
// without reassociation), each block is added to a double, blocks into fixed chunks of kChunk elements, chunks
// into the row in index order.  The chunk grid depends only on M, never on the thread count: a row is either
// processed by one task (N >= threads) or its chunks are spread over tasks (N < threads) and their partials
// combined in the same order, so the result is bit-identical for any torch.set_num_threads.

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 1024;
constexpr int64_t kChunk = 16 * kBlock;

inline double lane_sum(const float* acc) {
  double s = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) s += static_cast<double>(acc[j]);
  return s;
}

Pass1 chunk_pass1(const float* __restrict x, int64_t n) {
  Pass1 r{};
  float lo[kLanes], hi[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) {
    lo[j] = INFINITY;
    hi[j] = -INFINITY;
  }
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(kBlock, n - b);
    const float* p = x + b;
    float s[kLanes] = {}, a[kLanes] = {};
    const int64_t full = len - len % kLanes;
    for (int64_t i = 0; i < full; i += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) {
        const float v = p[i + j];
        lo[j] = v < lo[j] ? v : lo[j];
        hi[j] = v > hi[j] ? v : hi[j];
        s[j] += v;
        a[j] += std::fabs(v);
      }
    }
    for (int64_t i = full; i < len; ++i) {
      const float v = p[i];
      const int64_t j = i - full;
      lo[j] = v < lo[j] ? v : lo[j];
      hi[j] = v > hi[j] ? v : hi[j];
      s[j] += v;
      a[j] += std::fabs(v);
    }
    r.sum += lane_sum(s);
    r.sum_abs += lane_sum(a);
  }
  for (int64_t j = 0; j < kLanes; ++j) {
    r.lo = std::min<double>(r.lo, lo[j]);
    r.hi = std::max<double>(r.hi, hi[j]);
  }
  return r;
}

Pass2 chunk_pass2(const float* __restrict x, int64_t n, float mean, float inv_scale) {
  Pass2 r{};
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(kBlock, n - b);
    const float* p = x + b;
    float a[kLanes] = {}, q2[kLanes] = {}, q4[kLanes] = {};
    const int64_t full = len - len % kLanes;
    for (int64_t i = 0; i < full; i += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) {
        const float c = p[i + j] - mean;
        const float z = c * inv_scale;
        const float z2 = z * z;
        a[j] += std::fabs(c);
        q2[j] += z2;
        q4[j] += z2 * z2;
      }
    }
    for (int64_t i = full; i < len; ++i) {
      const int64_t j = i - full;
      const float c = p[i] - mean;
      const float z = c * inv_scale;
      const float z2 = z * z;
      a[j] += std::fabs(c);
      q2[j] += z2;
      q4[j] += z2 * z2;
    }
    r.sum_abs += lane_sum(a);
    r.sum_z2 += lane_sum(q2);
    r.sum_z4 += lane_sum(q4);
  }
  return r;
}

at::Tensor per_sample_stats(const at::Tensor& x) {
  check_tensor(x, "x");
  check_stats_input(kPrefix, x);
  const int64_t rows = x.size(0), m = x.size(1);
  at::Tensor out = at::empty({rows, kColumns}, x.options().dtype(at::kDouble));
  if (rows == 0) return out;
  const float* data = x.data_ptr<float>();
  double* o = out.data_ptr<double>();
  const int64_t chunks = (m + kChunk - 1) / kChunk;
  auto chunk_len = [&](int64_t k) { return std::min(kChunk, m - k * kChunk); };

  if (rows >= at::get_num_threads() || chunks == 1) {
    // one task per row: both passes back to back, the row still in cache for the second
    const int64_t grain = std::max<int64_t>(1, kGrain / m);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* row = data + r * m;
        Pass1 p1{};
        for (int64_t k = 0; k < chunks; ++k) combine(p1, chunk_pass1(row + k * kChunk, chunk_len(k)));
        const Centre c = finish1(p1, m, o + r * kColumns);
        Pass2 p2{};
        for (int64_t k = 0; k < chunks; ++k) {
          combine(p2, chunk_pass2(row + k * kChunk, chunk_len(k), c.mean, c.inv_scale));
        }
        finish2(p2, c, m, o + r * kColumns);
      }
    });
    return out;
  }

  // few rows: the chunks of every row are the tasks, partials combined per row in chunk order
  const int64_t tasks = rows * chunks;
  std::vector<Pass1> part1(tasks);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / chunks, k = t % chunks;
      part1[t] = chunk_pass1(data + r * m + k * kChunk, chunk_len(k));
    }
  });
  std::vector<Centre> centres(rows);
  for (int64_t r = 0; r < rows; ++r) {
    Pass1 p1{};
    for (int64_t k = 0; k < chunks; ++k) combine(p1, part1[r * chunks + k]);
    centres[r] = finish1(p1, m, o + r * kColumns);
  }
  std::vector<Pass2> part2(tasks);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / chunks, k = t % chunks;
      part2[t] = chunk_pass2(data + r * m + k * kChunk, chunk_len(k), centres[r].mean, centres[r].inv_scale);
    }
  });
  for (int64_t r = 0; r < rows; ++r) {
    Pass2 p2{};
    for (int64_t k = 0; k < chunks; ++k) combine(p2, part2[r * chunks + k]);
    finish2(p2, centres[r], m, o + r * kColumns);
  }
  return out;
}


// ---------------------------------------------------------------------------------------------------------
// Histogram binning (observers.HistogramObserver._accumulate): x is a contiguous float32 tensor read as rows of
// its first dimension (a sample each; a 0-d or 1-d tensor is rows of one value); of each row the values at
// offsets 0, stride, 2 stride, ... are binned (stride 1: every value; observers.sample_stride picks it), with
//   counts[clamp(floor((x - lo) * scale) - start, 0, bins - 1)] += 1      (NaN counts in bin 0)
// in the float32 steps of the PyTorch expression there, so both give the same bins.  The strided values are read
// in place (no gathered copy).  floor is taken by truncation after clamping to +-2^30 (SSE2 has no floor; every
// bin index in a window is far inside that range, so a clamped value lands in the same end bin).  Indices are
// computed a block at a time (vectorisable), then counted into kWays interleaved histograms (runs of one bin, such
// as a ReLU's zeros, do not serialise on one counter); every task has its own, summed at the end: integer sums,
// the same counts for any thread count.

constexpr int64_t kWays = 4;
constexpr float kFloorRange = 1073741824.0f;  // 2^30

void histogram_accumulate_(const at::Tensor& x, at::Tensor& counts, double lo, double scale, double start,
                           int64_t stride) {
  check_tensor(x, "x");
  if (!x.is_contiguous()) fail(std::string(kPrefix) + ": histogram_accumulate_ takes a contiguous tensor");
  if (counts.device().type() != at::kCPU || counts.scalar_type() != at::kLong || counts.dim() != 1 ||
      !counts.is_contiguous() || counts.size(0) < 1)
    fail(std::string(kPrefix) + ": histogram_accumulate_ counts must be a contiguous 1-d int64 CPU tensor");
  if (stride < 1) fail(std::string(kPrefix) + ": histogram_accumulate_ needs a stride >= 1");
  const int64_t bins = counts.size(0), total = x.numel();
  if (total == 0) return;
  const int64_t rows = x.dim() >= 2 ? x.size(0) : total, row = total / rows;
  const int64_t taken = (row + stride - 1) / stride;  // values binned per row
  const int64_t n = rows * taken;
  const float lo_f = static_cast<float>(lo), scale_f = static_cast<float>(scale),
              start_f = static_cast<float>(start);
  const int32_t top = static_cast<int32_t>(bins - 1), start_i = static_cast<int32_t>(start);
  const float* data = x.data_ptr<float>();
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kGrain));
  std::vector<int64_t> partial(tasks * kWays * bins, 0);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    int32_t idx[kBlock];
    float v[kBlock];
    for (int64_t t = begin; t < end; ++t) {
      int64_t* h = partial.data() + t * kWays * bins;
      const int64_t a = n * t / tasks, b = n * (t + 1) / tasks;
      int64_t r = a / taken, k = a % taken;  // the row and the position in it of binned value a
      for (int64_t i = a; i < b; i += kBlock) {
        const int64_t len = std::min(kBlock, b - i);
        const float* p;
        if (stride == 1) {
          p = data + i;  // every value: the binned values are the tensor itself
        } else {
          for (int64_t j = 0; j < len; ++j) {
            v[j] = data[r * row + k * stride];
            if (++k == taken) k = 0, ++r;
          }
          p = v;
        }
        for (int64_t j = 0; j < len; ++j) {
          float u = (p[j] - lo_f) * scale_f;
          u = u == u ? u : start_f;  // NaN: floor(start) - start = bin 0
          u = u > kFloorRange ? kFloorRange : u;
          u = u < -kFloorRange ? -kFloorRange : u;
          int32_t q = static_cast<int32_t>(u);
          q -= static_cast<float>(q) > u ? 1 : 0;  // truncation -> floor
          q -= start_i;
          q = q < 0 ? 0 : q;
          idx[j] = q > top ? top : q;
        }
        int64_t j = 0;
        for (; j + kWays <= len; j += kWays) {
          for (int64_t w = 0; w < kWays; ++w) ++h[w * bins + idx[j + w]];
        }
        for (; j < len; ++j) ++h[idx[j]];
      }
    }
  });
  int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t t = 0; t < tasks * kWays; ++t) {
    for (int64_t j = 0; j < bins; ++j) c[j] += partial[t * bins + j];
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  aciq_kernels::bind_kernels(m, "CPU", &quantize_, &quantize_per_channel_, &per_sample_stats,
                             " (two reads per row, deterministic for any thread count)");
  m.def("histogram_accumulate_", &histogram_accumulate_,
        "Add the values at offsets 0, stride, 2 stride, ... of each row (first dimension) of the float32 CPU tensor "
        "x to int64 counts at bin clamp(floor((x - lo) * scale) - start, 0, bins - 1) (HistogramObserver's binning)",
        py::arg("x"), py::arg("counts"), py::arg("lo"), py::arg("scale"), py::arg("start"), py::arg("stride") = 1);
}
