// GEMMLOWP fake quantization on the GPU: one fused, in-place pass over a contiguous float32 buffer.
//
// Same bits as the PyTorch reference run on CUDA (separate ATen kernels, one float32 rounding per step):
// every step uses an explicitly rounded intrinsic (__fsub_rn, __fmul_rn, __fadd_rn), which nvcc never fuses
// into an FMA (the file is also built with --fmad=false).  clamp keeps NaN and is fmaxf/fminf otherwise,
// and rounding is rintf (round half to even), as ATen's nearbyint.  The checks and the layout handling live
// in int_quantization.cpp; this file only launches, so it includes only c10/cuda headers (not ATen.h: a much
// faster nvcc pass; and never ATen/cuda/CUDAContext.h, which pulls in cuSPARSE headers a bare toolkit lacks).

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float fake_quant(float x, float noise, bool has_noise, float scale, float inv_scale,
                                            float offset, float qmax) {
  float v = __fmul_rn(__fsub_rn(x, offset), inv_scale);
  if (has_noise) v = __fadd_rn(v, noise);
  // clamp: NaN stays NaN; fmaxf/fminf otherwise.  -0.0 comes out +0.0, as ATen 2.11's CUDA clamp_ was seen
  // to do (it never shows in y: gemmlowp_qparams never gives offset -0.0).
  v = isnan(v) ? v : fminf(fmaxf(v, 0.0f), qmax);
  return __fadd_rn(__fmul_rn(rintf(v), scale), offset);
}

// Per tensor: 16-byte accesses over the first n4 float4s (when the pointers allow), then the tail.
template <bool kNoise>
__global__ void per_tensor_vec4(float4* __restrict__ x, const float4* __restrict__ noise, int64_t n4,
                                float* __restrict__ tail, const float* __restrict__ tail_noise, int tail_n,
                                float scale, float inv_scale, float offset, float qmax) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n4; i += stride) {
    float4 v = x[i];
    float4 r = kNoise ? noise[i] : make_float4(0.f, 0.f, 0.f, 0.f);
    v.x = fake_quant(v.x, r.x, kNoise, scale, inv_scale, offset, qmax);
    v.y = fake_quant(v.y, r.y, kNoise, scale, inv_scale, offset, qmax);
    v.z = fake_quant(v.z, r.z, kNoise, scale, inv_scale, offset, qmax);
    v.w = fake_quant(v.w, r.w, kNoise, scale, inv_scale, offset, qmax);
    x[i] = v;
  }
  if (blockIdx.x == 0 && static_cast<int>(threadIdx.x) < tail_n) {
    const int t = threadIdx.x;
    tail[t] = fake_quant(tail[t], kNoise ? tail_noise[t] : 0.0f, kNoise, scale, inv_scale, offset, qmax);
  }
}

template <bool kNoise>
__global__ void per_tensor_scalar(float* __restrict__ x, const float* __restrict__ noise, int64_t n, float scale,
                                  float inv_scale, float offset, float qmax) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    x[i] = fake_quant(x[i], kNoise ? noise[i] : 0.0f, kNoise, scale, inv_scale, offset, qmax);
  }
}

// Per channel over a contiguous (outer, channels, inner) layout; 32-bit indices when they fit (cheaper
// division).  Channels with scale == 0 are left as they are.
template <bool kNoise, typename index_t>
__global__ void per_channel_kernel(float* __restrict__ x, const float* __restrict__ noise, index_t n,
                                   index_t channels, index_t inner, const float* __restrict__ scale,
                                   const float* __restrict__ inv_scale, const float* __restrict__ offset,
                                   float qmax) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const index_t c = (i / inner) % channels;
    const float s = __ldg(scale + c);
    if (s == 0.0f) continue;
    x[i] = fake_quant(x[i], kNoise ? noise[i] : 0.0f, kNoise, s, __ldg(inv_scale + c), __ldg(offset + c), qmax);
  }
}

// Enough blocks to fill the device a few times over; the grid-stride loops cover the rest.
int grid_for(int64_t items, int device) {
  static int sm_count[64] = {0};
  int& sms = sm_count[device & 63];
  if (sms == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t wanted = (items + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min(wanted, cap)));
}

}  // namespace

// Launchers called by int_quantization.cpp on contiguous float32 CUDA buffers (noise may be null).
void gemmlowp_cuda_per_tensor(float* x, const float* noise, int64_t n, float scale, float inv_scale, float offset,
                              float qmax, int device) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                       (noise == nullptr || reinterpret_cast<uintptr_t>(noise) % 16 == 0);
  if (aligned && n >= 4) {
    const int64_t n4 = n / 4;
    const int tail_n = static_cast<int>(n - n4 * 4);
    const int grid = grid_for(n4, device);
    if (noise != nullptr) {
      per_tensor_vec4<true><<<grid, kThreads, 0, stream>>>(
          reinterpret_cast<float4*>(x), reinterpret_cast<const float4*>(noise), n4, x + n4 * 4, noise + n4 * 4,
          tail_n, scale, inv_scale, offset, qmax);
    } else {
      per_tensor_vec4<false><<<grid, kThreads, 0, stream>>>(reinterpret_cast<float4*>(x), nullptr, n4,
                                                            x + n4 * 4, nullptr, tail_n, scale, inv_scale, offset,
                                                            qmax);
    }
  } else {
    const int grid = grid_for(n, device);
    if (noise != nullptr) {
      per_tensor_scalar<true><<<grid, kThreads, 0, stream>>>(x, noise, n, scale, inv_scale, offset, qmax);
    } else {
      per_tensor_scalar<false><<<grid, kThreads, 0, stream>>>(x, nullptr, n, scale, inv_scale, offset, qmax);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gemmlowp_cuda_per_channel(float* x, const float* noise, int64_t n, int64_t channels, int64_t inner,
                               const float* scale, const float* inv_scale, const float* offset, float qmax,
                               int device) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int grid = grid_for(n, device);
  // 32-bit indices need room for i + stride without wrapping.
  const bool small = n + static_cast<int64_t>(grid) * kThreads < (int64_t{1} << 32);
  if (small) {
    const auto n32 = static_cast<uint32_t>(n), c32 = static_cast<uint32_t>(channels);
    const auto in32 = static_cast<uint32_t>(inner);
    if (noise != nullptr) {
      per_channel_kernel<true, uint32_t>
          <<<grid, kThreads, 0, stream>>>(x, noise, n32, c32, in32, scale, inv_scale, offset, qmax);
    } else {
      per_channel_kernel<false, uint32_t>
          <<<grid, kThreads, 0, stream>>>(x, nullptr, n32, c32, in32, scale, inv_scale, offset, qmax);
    }
  } else {
    if (noise != nullptr) {
      per_channel_kernel<true, int64_t>
          <<<grid, kThreads, 0, stream>>>(x, noise, n, channels, inner, scale, inv_scale, offset, qmax);
    } else {
      per_channel_kernel<false, int64_t>
          <<<grid, kThreads, 0, stream>>>(x, nullptr, n, channels, inner, scale, inv_scale, offset, qmax);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
