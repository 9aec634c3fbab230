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

// Where this thread is (blockDim.x is the size the launch below gives: kThreads, or kRowThreads for the
// per-row statistics kernels, which the *_thread functions assume).
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
                       const float* __restrict__ offset, const float* __restrict__ qmax) {
  per_channel_thread<kNoise, index_t>(this_thread(), x, noise, n, channels, inner, scale, inv_scale, offset, qmax);
}

template <class P>
__global__ void __launch_bounds__(kThreads)
    stats_lanes_kernel(const float* __restrict__ x, int64_t rows, int64_t m, int64_t lanes,
                       const aciq_stats::Centre* __restrict__ centres, P* __restrict__ part) {
  stats_lanes_thread<P>(this_thread(), x, rows, m, lanes, centres, part);
}

template <class P>
__global__ void __launch_bounds__(kThreads)
    stats_groups_kernel(const P* __restrict__ part, int64_t rows, int64_t lanes, P* __restrict__ grouped) {
  stats_groups_thread<P>(this_thread(), part, rows, lanes, grouped);
}

template <class P>
__global__ void __launch_bounds__(kRowThreads)
    stats_rows_kernel(const P* __restrict__ grouped, int64_t rows, int64_t m, int64_t lanes,
                      aciq_stats::Centre* __restrict__ centres, double* __restrict__ out) {
  stats_rows_thread<P>(this_thread(), grouped, rows, m, lanes, centres, out);
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
                               const float* scale, const float* inv_scale, const float* offset, const float* qmax,
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

int64_t gemmlowp_cuda_stats_workspace_bytes(int64_t rows, int64_t m) { return stats_workspace_bytes(rows, m); }

namespace {

// One pass of the statistics: every (row, lane), then the groups of lanes, then each row (stats_*_thread).
template <class P>
void stats_pass(const float* x, int64_t rows, int64_t m, P* part, P* grouped, aciq_stats::Centre* centres,
                double* out, int sms, cudaStream_t stream) {
  const int64_t lanes = stats_lanes(m);
  const auto lane_blocks = static_cast<unsigned>(strided_grid(rows * lanes, sms));
  const auto group_blocks = static_cast<unsigned>(strided_grid(rows * stats_groups(lanes), sms));
  const auto row_blocks = static_cast<unsigned>(row_grid(rows, sms));
  stats_lanes_kernel<P><<<lane_blocks, kThreads, 0, stream>>>(x, rows, m, lanes, centres, part);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  stats_groups_kernel<P><<<group_blocks, kThreads, 0, stream>>>(part, rows, lanes, grouped);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  stats_rows_kernel<P><<<row_blocks, kRowThreads, 0, stream>>>(grouped, rows, m, lanes, centres, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Per-sample statistics of a contiguous float32 [rows, m] CUDA buffer into out ([rows, 7] float64), with a
// scratch buffer of gemmlowp_cuda_stats_workspace_bytes(rows, m) bytes (256-byte aligned).  rows, m >= 1.
void gemmlowp_cuda_per_sample_stats(const float* x, int64_t rows, int64_t m, double* out, void* workspace,
                                    int device) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int sms = multiprocessors(device);
  const StatsWorkspace ws = stats_workspace(workspace, rows, m);
  stats_pass(x, rows, m, ws.part1, ws.grouped1, ws.centres, out, sms, stream);  // writes the centres
  stats_pass(x, rows, m, ws.part2, ws.grouped2, ws.centres, out, sms, stream);  // reads them
}
