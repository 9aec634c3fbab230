// GEMMLOWP fake quantization on the GPU: one fused, in-place pass over a contiguous float32 buffer.
//
// What each thread does lives in gemmlowp_device.cuh (shared with the host emulator that tests it without a
// GPU); this file only defines the __global__ entry points and launches them.  Same bits as the PyTorch
// reference run on CUDA.  The checks and the layout handling live in int_quantization.cpp, so this file
// includes only c10/cuda headers (not ATen.h: a much faster nvcc pass; and never ATen/cuda/CUDAContext.h,
// which pulls in cuSPARSE headers a bare toolkit lacks).

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "gemmlowp_device.cuh"

namespace {

using namespace aciq_device;

__device__ __forceinline__ Thread this_thread() {
  return Thread{static_cast<int64_t>(blockIdx.x), static_cast<int64_t>(gridDim.x), static_cast<int>(threadIdx.x)};
}

template <bool kNoise>
__global__ void __launch_bounds__(kThreads)
    per_tensor_vec4(float4* __restrict__ x, const float4* __restrict__ noise, int64_t n4, float* __restrict__ tail,
                    const float* __restrict__ tail_noise, int tail_n, float scale, float inv_scale, float offset,
                    float qmax) {
  per_tensor_vec4_thread<kNoise>(this_thread(), x, noise, n4, tail, tail_noise, tail_n, scale, inv_scale, offset,
                                 qmax);
}

template <bool kNoise>
__global__ void __launch_bounds__(kThreads)
    per_tensor_scalar(float* __restrict__ x, const float* __restrict__ noise, int64_t n, float scale,
                      float inv_scale, float offset, float qmax) {
  per_tensor_scalar_thread<kNoise>(this_thread(), x, noise, n, scale, inv_scale, offset, qmax);
}

template <bool kNoise, typename index_t>
__global__ void __launch_bounds__(kThreads)
    per_channel_kernel(float* __restrict__ x, const float* __restrict__ noise, index_t n, index_t channels,
                       index_t inner, const float* __restrict__ scale, const float* __restrict__ inv_scale,
                       const float* __restrict__ offset, float qmax) {
  per_channel_thread<kNoise, index_t>(this_thread(), x, noise, n, channels, inner, scale, inv_scale, offset, qmax);
}

int multiprocessors(int device) {
  static int sm_count[64] = {0};
  int& sms = sm_count[device & 63];
  if (sms == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

}  // namespace

// Launchers called by int_quantization.cpp on contiguous float32 CUDA buffers (noise may be null).
void gemmlowp_cuda_per_tensor(float* x, const float* noise, int64_t n, float scale, float inv_scale, float offset,
                              float qmax, int device) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const PerTensorLaunch launch = plan_per_tensor(x, noise, n, multiprocessors(device));
  const auto grid = static_cast<unsigned>(launch.grid);
  if (launch.vec4) {
    float* tail = x + launch.n4 * 4;
    if (noise != nullptr) {
      per_tensor_vec4<true><<<grid, kThreads, 0, stream>>>(
          reinterpret_cast<float4*>(x), reinterpret_cast<const float4*>(noise), launch.n4, tail,
          noise + launch.n4 * 4, launch.tail_n, scale, inv_scale, offset, qmax);
    } else {
      per_tensor_vec4<false><<<grid, kThreads, 0, stream>>>(reinterpret_cast<float4*>(x), nullptr, launch.n4,
                                                            tail, nullptr, launch.tail_n, scale, inv_scale,
                                                            offset, qmax);
    }
  } else if (noise != nullptr) {
    per_tensor_scalar<true><<<grid, kThreads, 0, stream>>>(x, noise, n, scale, inv_scale, offset, qmax);
  } else {
    per_tensor_scalar<false><<<grid, kThreads, 0, stream>>>(x, nullptr, n, scale, inv_scale, offset, qmax);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gemmlowp_cuda_per_channel(float* x, const float* noise, int64_t n, int64_t channels, int64_t inner,
                               const float* scale, const float* inv_scale, const float* offset, float qmax,
                               int device) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int64_t grid = strided_grid(n, multiprocessors(device));
  const auto blocks = static_cast<unsigned>(grid);
  if (fits_uint32(n, grid)) {
    const auto n32 = static_cast<uint32_t>(n), c32 = static_cast<uint32_t>(channels);
    const auto in32 = static_cast<uint32_t>(inner);
    if (noise != nullptr) {
      per_channel_kernel<true, uint32_t>
          <<<blocks, kThreads, 0, stream>>>(x, noise, n32, c32, in32, scale, inv_scale, offset, qmax);
    } else {
      per_channel_kernel<false, uint32_t>
          <<<blocks, kThreads, 0, stream>>>(x, nullptr, n32, c32, in32, scale, inv_scale, offset, qmax);
    }
  } else {
    if (noise != nullptr) {
      per_channel_kernel<true, int64_t>
          <<<blocks, kThreads, 0, stream>>>(x, noise, n, channels, inner, scale, inv_scale, offset, qmax);
    } else {
      per_channel_kernel<false, int64_t>
          <<<blocks, kThreads, 0, stream>>>(x, nullptr, n, channels, inner, scale, inv_scale, offset, qmax);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
