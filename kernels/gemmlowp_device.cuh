// What each CUDA thread of the GEMMLOWP kernels and of the per-sample statistics kernel does, written once for
// two compilers: nvcc builds it into the kernels (gemmlowp.cu passes blockIdx / gridDim / threadIdx as a
// Thread), and a plain C++ compiler builds it into the host emulator (tests/cuda_emulation/emulator.cpp), which
// runs every (block, thread) of the same launch in turn.  So the indexing, the tiling and the arithmetic of the
// CUDA kernels are tested bit for bit on machines without a GPU; only the launch itself and the memory system
// are not.
//
// Bits: every step uses an explicitly rounded intrinsic (__fsub_rn, __fmul_rn, __fadd_rn), which nvcc never
// fuses into an FMA (gemmlowp.cu is also built with --fmad=false; the emulator with -ffp-contract=off).
// clamp keeps NaN and is fmaxf/fminf otherwise; rounding is rintf (round half to even), as ATen's nearbyint.
// No synchronisation anywhere: each element is written by exactly one thread, and kernels that need another
// kernel's results come after it on the stream.

#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "stats_math.h"

#ifdef __CUDACC__
#define ACIQ_DEVICE __device__ __forceinline__
#define ACIQ_LDG(p) __ldg(p)
#define ACIQ_UNROLL _Pragma("unroll")
#define ACIQ_UNROLL4 _Pragma("unroll 4")
#else  // host emulation: the CUDA types and intrinsics used below, with the same IEEE float32 semantics
#include <cmath>
#define ACIQ_DEVICE inline
#define ACIQ_LDG(p) (*(p))
#define ACIQ_UNROLL
#define ACIQ_UNROLL4
#ifndef __restrict__
#define __restrict__
#endif
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
using std::fabs;
using std::fmaxf;
using std::fminf;
using std::isnan;
using std::rintf;
#endif

namespace aciq_device {

constexpr int kThreads = 256;  // every launch uses blocks of kThreads threads
// Per tensor, each block owns tiles of kUnroll * kThreads float4s, and a thread issues all of its kUnroll
// loads (x and noise) before it computes or stores anything: enough bytes in flight per SM to saturate HBM
// (on an H200: 3.90 TB/s in place, 0.95 of copy_'s 4.10).  Load u of all the threads of a block is one
// contiguous run of kThreads float4s (4 KiB): coalesced.
constexpr int kUnroll = 4;
constexpr int64_t kTile = static_cast<int64_t>(kUnroll) * kThreads;
constexpr int64_t kMaxGrid = int64_t{1} << 30;

// Where a thread is in its launch (blockDim is always kThreads).
struct Thread {
  int64_t block, grid;
  int thread;
};

ACIQ_DEVICE float fake_quant(float x, float noise, bool has_noise, float scale, float inv_scale, float offset,
                             float qmax) {
  float v = __fmul_rn(__fsub_rn(x, offset), inv_scale);
  if (has_noise) v = __fadd_rn(v, noise);
  // clamp: NaN stays NaN; fmaxf/fminf otherwise.  A -0.0 here never shows in the result, which is
  // rint(v) * scale + offset with offset never -0.0 (gemmlowp_qparams normalises it).
  v = isnan(v) ? v : fminf(fmaxf(v, 0.0f), qmax);
  return __fadd_rn(__fmul_rn(rintf(v), scale), offset);
}

// ---- per tensor ---------------------------------------------------------------------------------------------

// How gemmlowp.cu launches the per-tensor kernel over n floats: the 16-byte path (per_tensor_vec4_thread: n4
// float4s, then the tail_n < 4 floats after them) when x and noise are 16-byte aligned and n >= 4, one block
// per tile (a grid-stride loop covers what kMaxGrid leaves over); else the scalar path (per_tensor_scalar_thread)
// on a grid from strided_grid.
struct PerTensorLaunch {
  bool vec4;
  int64_t grid, n4;
  int tail_n;
};

// Enough blocks to fill the device (sms multiprocessors) a few times over; the loops cover the rest.
inline int64_t strided_grid(int64_t items, int sms) {
  return std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, int64_t{sms} * 32));
}

inline PerTensorLaunch plan_per_tensor(const float* x, const float* noise, int64_t n, int sms) {
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                       (noise == nullptr || reinterpret_cast<uintptr_t>(noise) % 16 == 0);
  if (!aligned || n < 4) return PerTensorLaunch{false, strided_grid(n, sms), 0, 0};
  const int64_t n4 = n / 4;
  const int64_t grid = std::clamp<int64_t>((n4 + kTile - 1) / kTile, 1, kMaxGrid);
  return PerTensorLaunch{true, grid, n4, static_cast<int>(n - n4 * 4)};
}

// The first n4 float4s of x, then (block 0) the tail_n < 4 floats after them.
template <bool kNoise>
ACIQ_DEVICE void per_tensor_vec4_thread(Thread t, float4* __restrict__ x, const float4* __restrict__ noise,
                                        int64_t n4, float* __restrict__ tail, const float* __restrict__ tail_noise,
                                        int tail_n, float scale, float inv_scale, float offset, float qmax) {
  const int64_t tiles = (n4 + kTile - 1) / kTile;
  for (int64_t tile = t.block; tile < tiles; tile += t.grid) {
    const int64_t first = tile * kTile + t.thread;
    float4 v[kUnroll];
    float4 r[kUnroll];
ACIQ_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = first + static_cast<int64_t>(u) * kThreads;
      if (i < n4) {
        v[u] = x[i];
        r[u] = kNoise ? noise[i] : make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
ACIQ_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = first + static_cast<int64_t>(u) * kThreads;
      if (i < n4) {
        float4 q;
        q.x = fake_quant(v[u].x, r[u].x, kNoise, scale, inv_scale, offset, qmax);
        q.y = fake_quant(v[u].y, r[u].y, kNoise, scale, inv_scale, offset, qmax);
        q.z = fake_quant(v[u].z, r[u].z, kNoise, scale, inv_scale, offset, qmax);
        q.w = fake_quant(v[u].w, r[u].w, kNoise, scale, inv_scale, offset, qmax);
        x[i] = q;
      }
    }
  }
  if (t.block == 0 && t.thread < tail_n) {
    const int k = t.thread;
    tail[k] = fake_quant(tail[k], kNoise ? tail_noise[k] : 0.0f, kNoise, scale, inv_scale, offset, qmax);
  }
}

// ---- scalar paths: grid-stride over elements ------------------------------------------------------------------

template <bool kNoise>
ACIQ_DEVICE void per_tensor_scalar_thread(Thread t, float* __restrict__ x, const float* __restrict__ noise,
                                          int64_t n, float scale, float inv_scale, float offset, float qmax) {
  const int64_t stride = t.grid * kThreads;
  for (int64_t i = t.block * kThreads + t.thread; i < n; i += stride) {
    x[i] = fake_quant(x[i], kNoise ? noise[i] : 0.0f, kNoise, scale, inv_scale, offset, qmax);
  }
}

// 32-bit indices need room for i + stride without wrapping.
inline bool fits_uint32(int64_t n, int64_t grid) { return n + grid * kThreads < (int64_t{1} << 32); }

// Per channel over a contiguous (outer, channels, inner) layout, index_t = uint32_t when fits_uint32 (cheaper
// division).  Channels with scale == 0 are left as they are; each channel has its own qmax (bit allocation gives
// channels different level counts).
template <bool kNoise, typename index_t>
ACIQ_DEVICE void per_channel_thread(Thread t, float* __restrict__ x, const float* __restrict__ noise, index_t n,
                                    index_t channels, index_t inner, const float* __restrict__ scale,
                                    const float* __restrict__ inv_scale, const float* __restrict__ offset,
                                    const float* __restrict__ qmax) {
  const index_t stride = static_cast<index_t>(t.grid) * kThreads;
  for (index_t i = static_cast<index_t>(t.block) * kThreads + t.thread; i < n; i += stride) {
    const index_t c = (i / inner) % channels;
    const float s = ACIQ_LDG(scale + c);
    if (s == 0.0f) continue;
    x[i] = fake_quant(x[i], kNoise ? noise[i] : 0.0f, kNoise, s, ACIQ_LDG(inv_scale + c), ACIQ_LDG(offset + c),
                      ACIQ_LDG(qmax + c));
  }
}

// ---- per-sample statistics (stats_math.h) -------------------------------------------------------------------
// A row of m elements is read by stats_lanes(m) lanes: lane p takes elements p, p + lanes, p + 2 lanes, ...
// (consecutive threads read consecutive addresses), summed in float over runs of kRun elements, each run added
// to a double.  Six kernels on one stream, none synchronising inside: for pass 1, one thread per (row, lane)
// writes the lane's partial; one thread per (row, group of kGroup lanes) combines a group in lane order; one
// thread per row combines its groups in order and finishes pass 1 (stats_centre_thread); the same three for
// pass 2.  The lanes depend on m only, so a sample's statistics are the same bits whatever its batch, the
// device's size or the run; they differ from the CPU kernel's in the last bits (another summation order).

constexpr int64_t kMaxLanes = 1024;
constexpr int64_t kLaneMin = 64;  // elements per lane, at least, below kMaxLanes lanes
constexpr int64_t kRun = 64;      // float sums cover runs of kRun elements of a lane
constexpr int64_t kGroup = 32;    // lanes combined by one thread: two short sequential steps, not one long one
constexpr int kRowThreads = 32;   // block size of the per-row kernels: rows spread over many multiprocessors

inline int64_t stats_lanes(int64_t m) { return std::clamp<int64_t>(m / kLaneMin, 1, kMaxLanes); }
ACIQ_HD int64_t stats_groups(int64_t lanes) { return (lanes + kGroup - 1) / kGroup; }

inline int64_t row_grid(int64_t rows, int sms) {
  return std::max<int64_t>(1, std::min<int64_t>((rows + kRowThreads - 1) / kRowThreads, int64_t{sms} * 32));
}

// Elements p, p + lanes, ... of row (m > p): the calls run in lane order over runs of kRun.
template <class Visit>
ACIQ_DEVICE void for_lane_runs(const float* __restrict__ row, int64_t m, int64_t lanes, int64_t p, Visit visit) {
  const int64_t count = (m - 1 - p) / lanes + 1;
  for (int64_t j0 = 0; j0 < count; j0 += kRun) {
    const int len = static_cast<int>(count - j0 < kRun ? count - j0 : kRun);
    visit(row + p + j0 * lanes, len);
  }
}

ACIQ_DEVICE aciq_stats::Pass1 lane_pass1(const float* __restrict__ row, int64_t m, int64_t lanes, int64_t p) {
  float lo = INFINITY, hi = -INFINITY;
  aciq_stats::Pass1 r{};
  for_lane_runs(row, m, lanes, p, [&](const float* __restrict__ q, int len) {
    float s = 0.0f, a = 0.0f;
ACIQ_UNROLL4
    for (int k = 0; k < len; ++k) {
      const float v = ACIQ_LDG(q + k * lanes);
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
      s = __fadd_rn(s, v);
      a = __fadd_rn(a, fabsf(v));
    }
    r.sum += static_cast<double>(s);
    r.sum_abs += static_cast<double>(a);
  });
  r.lo = lo;
  r.hi = hi;
  return r;
}

ACIQ_DEVICE aciq_stats::Pass2 lane_pass2(const float* __restrict__ row, int64_t m, int64_t lanes, int64_t p,
                                         const aciq_stats::Centre& c) {
  aciq_stats::Pass2 r{};
  for_lane_runs(row, m, lanes, p, [&](const float* __restrict__ q, int len) {
    float a = 0.0f, q2 = 0.0f, q4 = 0.0f;
ACIQ_UNROLL4
    for (int k = 0; k < len; ++k) {
      const float d = __fsub_rn(ACIQ_LDG(q + k * lanes), c.mean);
      const float z = __fmul_rn(d, c.inv_scale);
      const float z2 = __fmul_rn(z, z);
      a = __fadd_rn(a, fabsf(d));
      q2 = __fadd_rn(q2, z2);
      q4 = __fadd_rn(q4, __fmul_rn(z2, z2));
    }
    r.sum_abs += static_cast<double>(a);
    r.sum_z2 += static_cast<double>(q2);
    r.sum_z4 += static_cast<double>(q4);
  });
  return r;
}

// Pass 1 (centres == nullptr) or pass 2 over every (row, lane): part[row * lanes + lane].  Grid from
// strided_grid(rows * lanes, sms), blocks of kThreads.
template <class P>
ACIQ_DEVICE void stats_lanes_thread(Thread t, const float* __restrict__ x, int64_t rows, int64_t m, int64_t lanes,
                                    const aciq_stats::Centre* __restrict__ centres, P* __restrict__ part) {
  const int64_t items = rows * lanes;
  for (int64_t g = t.block * kThreads + t.thread; g < items; g += t.grid * kThreads) {
    const int64_t r = g / lanes, p = g - r * lanes;
    if constexpr (std::is_same_v<P, aciq_stats::Pass1>) {
      part[g] = lane_pass1(x + r * m, m, lanes, p);
    } else {
      part[g] = lane_pass2(x + r * m, m, lanes, p, centres[r]);
    }
  }
}

// part[row * lanes + lane] -> grouped[row * groups + group], lanes in order.  Grid from
// strided_grid(rows * groups, sms), blocks of kThreads.
template <class P>
ACIQ_DEVICE void stats_groups_thread(Thread t, const P* __restrict__ part, int64_t rows, int64_t lanes,
                                     P* __restrict__ grouped) {
  const int64_t groups = stats_groups(lanes), items = rows * groups;
  for (int64_t g = t.block * kThreads + t.thread; g < items; g += t.grid * kThreads) {
    const int64_t r = g / groups, first = (g - r * groups) * kGroup;
    const int64_t last = first + kGroup < lanes ? first + kGroup : lanes;
    P acc{};
    for (int64_t k = first; k < last; ++k) aciq_stats::combine(acc, part[r * lanes + k]);
    grouped[g] = acc;
  }
}

// One thread per row (grid from row_grid(rows, sms), blocks of kRowThreads): its groups in order, then
// finish1 into out and centres[row] (pass 1) or finish2 into out (pass 2).
template <class P>
ACIQ_DEVICE void stats_rows_thread(Thread t, const P* __restrict__ grouped, int64_t rows, int64_t m, int64_t lanes,
                                   aciq_stats::Centre* __restrict__ centres, double* __restrict__ out) {
  const int64_t groups = stats_groups(lanes);
  for (int64_t r = t.block * kRowThreads + t.thread; r < rows; r += t.grid * kRowThreads) {
    P acc{};
    for (int64_t k = 0; k < groups; ++k) aciq_stats::combine(acc, grouped[r * groups + k]);
    if constexpr (std::is_same_v<P, aciq_stats::Pass1>) {
      centres[r] = aciq_stats::finish1(acc, m, out + r * aciq_stats::kColumns);
    } else {
      aciq_stats::finish2(acc, centres[r], m, out + r * aciq_stats::kColumns);
    }
  }
}

// The scratch memory of one statistics call, carved from one buffer of stats_workspace_bytes(rows, m).
struct StatsWorkspace {
  aciq_stats::Pass1 *part1, *grouped1;
  aciq_stats::Pass2 *part2, *grouped2;
  aciq_stats::Centre* centres;
};

inline int64_t align256(int64_t bytes) { return (bytes + 255) / 256 * 256; }

// Offsets of the StatsWorkspace regions in its buffer; the last one is the total size.
inline void stats_workspace_offsets(int64_t rows, int64_t m, int64_t* at) {
  const int64_t lanes = stats_lanes(m), groups = stats_groups(lanes);
  const int64_t sizes[5] = {
      rows * lanes * static_cast<int64_t>(sizeof(aciq_stats::Pass1)),
      rows * groups * static_cast<int64_t>(sizeof(aciq_stats::Pass1)),
      rows * lanes * static_cast<int64_t>(sizeof(aciq_stats::Pass2)),
      rows * groups * static_cast<int64_t>(sizeof(aciq_stats::Pass2)),
      rows * static_cast<int64_t>(sizeof(aciq_stats::Centre)),
  };
  at[0] = 0;
  for (int i = 0; i < 5; ++i) at[i + 1] = at[i] + align256(sizes[i]);
}

inline int64_t stats_workspace_bytes(int64_t rows, int64_t m) {
  int64_t at[6];
  stats_workspace_offsets(rows, m, at);
  return at[5];
}

inline StatsWorkspace stats_workspace(void* buffer, int64_t rows, int64_t m) {
  int64_t at[6];
  stats_workspace_offsets(rows, m, at);
  auto* base = static_cast<unsigned char*>(buffer);
  return StatsWorkspace{reinterpret_cast<aciq_stats::Pass1*>(base + at[0]),
                        reinterpret_cast<aciq_stats::Pass1*>(base + at[1]),
                        reinterpret_cast<aciq_stats::Pass2*>(base + at[2]),
                        reinterpret_cast<aciq_stats::Pass2*>(base + at[3]),
                        reinterpret_cast<aciq_stats::Centre*>(base + at[4])};
}

}  // namespace aciq_device
