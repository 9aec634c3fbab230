// What each CUDA thread of the GEMMLOWP kernels does, written once for two compilers: nvcc builds it into the
// kernels (gemmlowp.cu passes blockIdx / gridDim / threadIdx as a Thread), and a plain C++ compiler builds it
// into the host emulator (tests/cuda_emulation.cpp), which runs every (block, thread) of the same launch in
// turn.  So the indexing, the tiling and the arithmetic of the CUDA kernels are tested bit for bit on
// machines without a GPU; only the launch itself and the memory system are not.
//
// Bits: every step uses an explicitly rounded intrinsic (__fsub_rn, __fmul_rn, __fadd_rn), which nvcc never
// fuses into an FMA (gemmlowp.cu is also built with --fmad=false; the emulator with -ffp-contract=off).
// clamp keeps NaN and is fmaxf/fminf otherwise; rounding is rintf (round half to even), as ATen's nearbyint.
// No synchronisation anywhere: each element is read and written by exactly one thread.

#pragma once

#include <algorithm>
#include <cstdint>

#ifdef __CUDACC__
#define ACIQ_DEVICE __device__ __forceinline__
#define ACIQ_LDG(p) __ldg(p)
#define ACIQ_UNROLL _Pragma("unroll")
#else  // host emulation: the CUDA types and intrinsics used below, with the same IEEE float32 semantics
#include <cmath>
#define ACIQ_DEVICE inline
#define ACIQ_LDG(p) (*(p))
#define ACIQ_UNROLL
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
using std::fmaxf;
using std::fminf;
using std::isnan;
using std::rintf;
#endif

namespace aciq_device {

constexpr int kThreads = 256;  // every launch uses blocks of kThreads threads
// Per tensor, each block owns tiles of kUnroll * kThreads float4s, and a thread issues all of its kUnroll
// loads (x and noise) before it computes or stores anything: enough bytes in flight per SM to saturate HBM
// (one float4 per thread per step, the first version, reached 68 % of copy_ on an H200).  Load u of all the
// threads of a block is one contiguous run of kThreads float4s (4 KiB): coalesced.
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
// division).  Channels with scale == 0 are left as they are.
template <bool kNoise, typename index_t>
ACIQ_DEVICE void per_channel_thread(Thread t, float* __restrict__ x, const float* __restrict__ noise, index_t n,
                                    index_t channels, index_t inner, const float* __restrict__ scale,
                                    const float* __restrict__ inv_scale, const float* __restrict__ offset,
                                    float qmax) {
  const index_t stride = static_cast<index_t>(t.grid) * kThreads;
  for (index_t i = static_cast<index_t>(t.block) * kThreads + t.thread; i < n; i += stride) {
    const index_t c = (i / inner) % channels;
    const float s = ACIQ_LDG(scale + c);
    if (s == 0.0f) continue;
    x[i] = fake_quant(x[i], kNoise ? noise[i] : 0.0f, kNoise, s, ACIQ_LDG(inv_scale + c), ACIQ_LDG(offset + c),
                      qmax);
  }
}

}  // namespace aciq_device
