// Host emulator of the CUDA GEMMLOWP kernels (kernels/gemmlowp.cu), for tests on machines without a GPU.
//
// It plans each launch as gemmlowp.cu does (plan_per_tensor, strided_grid, fits_uint32) and then runs the
// per-thread code of gemmlowp_device.cuh for every (block, thread) of that launch, one after the other.  The
// kernels never synchronise and no two threads touch one element, so running the threads in turn gives the
// bits the GPU gives.  Built by tests/test_cuda_emulation.py with a plain C++ compiler and -ffp-contract=off;
// called through ctypes.  `max_grid` > 0 caps the grid, so that the grid-stride loops run more than once.

#include <cstdint>
#include <vector>

#include "../../kernels/gemmlowp_device.cuh"

using namespace aciq_device;

namespace {

template <class Body>
void run_grid(int64_t grid, Body body, int threads = kThreads) {
  for (int64_t block = 0; block < grid; ++block) {
    for (int thread = 0; thread < threads; ++thread) body(Thread{block, grid, thread});
  }
}

int64_t capped(int64_t grid, int64_t max_grid) { return max_grid > 0 ? std::min(grid, max_grid) : grid; }

template <bool kNoise, typename index_t>
void per_channel(float* x, const float* noise, int64_t n, int64_t channels, int64_t inner, const float* scale,
                 const float* inv_scale, const float* offset, const float* qmax, int64_t grid) {
  run_grid(grid, [&](Thread t) {
    per_channel_thread<kNoise, index_t>(t, x, noise, static_cast<index_t>(n), static_cast<index_t>(channels),
                                        static_cast<index_t>(inner), scale, inv_scale, offset, qmax);
  });
}

}  // namespace

extern "C" {

// Returns 1 when the 16-byte path ran, 0 for the scalar one.
int emulate_per_tensor(float* x, const float* noise, int64_t n, float scale, float inv_scale, float offset,
                       float qmax, int sms, int64_t max_grid) {
  const PerTensorLaunch launch = plan_per_tensor(x, noise, n, sms);
  const int64_t grid = capped(launch.grid, max_grid);
  if (launch.vec4) {
    auto* x4 = reinterpret_cast<float4*>(x);
    const auto* noise4 = reinterpret_cast<const float4*>(noise);
    float* tail = x + launch.n4 * 4;
    if (noise != nullptr) {
      run_grid(grid, [&](Thread t) {
        per_tensor_vec4_thread<true>(t, x4, noise4, launch.n4, tail, noise + launch.n4 * 4, launch.tail_n, scale,
                                     inv_scale, offset, qmax);
      });
    } else {
      run_grid(grid, [&](Thread t) {
        per_tensor_vec4_thread<false>(t, x4, nullptr, launch.n4, tail, nullptr, launch.tail_n, scale, inv_scale,
                                      offset, qmax);
      });
    }
    return 1;
  }
  if (noise != nullptr) {
    run_grid(grid, [&](Thread t) { per_tensor_scalar_thread<true>(t, x, noise, n, scale, inv_scale, offset, qmax); });
  } else {
    run_grid(grid,
             [&](Thread t) { per_tensor_scalar_thread<false>(t, x, nullptr, n, scale, inv_scale, offset, qmax); });
  }
  return 0;
}

// Returns 32 or 64: the index width used (force64 picks the 64-bit instantiation, as for huge tensors).
int emulate_per_channel(float* x, const float* noise, int64_t n, int64_t channels, int64_t inner,
                        const float* scale, const float* inv_scale, const float* offset, const float* qmax, int sms,
                        int64_t max_grid, int force64) {
  const int64_t grid = capped(strided_grid(n, sms), max_grid);
  if (!force64 && fits_uint32(n, grid)) {
    if (noise != nullptr) {
      per_channel<true, uint32_t>(x, noise, n, channels, inner, scale, inv_scale, offset, qmax, grid);
    } else {
      per_channel<false, uint32_t>(x, nullptr, n, channels, inner, scale, inv_scale, offset, qmax, grid);
    }
    return 32;
  }
  if (noise != nullptr) {
    per_channel<true, int64_t>(x, noise, n, channels, inner, scale, inv_scale, offset, qmax, grid);
  } else {
    per_channel<false, int64_t>(x, nullptr, n, channels, inner, scale, inv_scale, offset, qmax, grid);
  }
  return 64;
}

// The six kernels of gemmlowp_cuda_per_sample_stats, in stream order, on a workspace of the size it gets.
// Returns the lanes per row.
int64_t emulate_per_sample_stats(const float* x, int64_t rows, int64_t m, double* out, int sms, int64_t max_grid) {
  using aciq_stats::Pass1;
  using aciq_stats::Pass2;
  const int64_t lanes = stats_lanes(m);
  std::vector<unsigned char> buffer(static_cast<size_t>(stats_workspace_bytes(rows, m)));
  const StatsWorkspace ws = stats_workspace(buffer.data(), rows, m);
  const int64_t lane_blocks = capped(strided_grid(rows * lanes, sms), max_grid);
  const int64_t group_blocks = capped(strided_grid(rows * stats_groups(lanes), sms), max_grid);
  const int64_t row_blocks = capped(row_grid(rows, sms), max_grid);
  run_grid(lane_blocks, [&](Thread t) { stats_lanes_thread<Pass1>(t, x, rows, m, lanes, nullptr, ws.part1); });
  run_grid(group_blocks, [&](Thread t) { stats_groups_thread<Pass1>(t, ws.part1, rows, lanes, ws.grouped1); });
  run_grid(row_blocks, [&](Thread t) { stats_rows_thread<Pass1>(t, ws.grouped1, rows, m, lanes, ws.centres, out); },
           kRowThreads);
  run_grid(lane_blocks, [&](Thread t) { stats_lanes_thread<Pass2>(t, x, rows, m, lanes, ws.centres, ws.part2); });
  run_grid(group_blocks, [&](Thread t) { stats_groups_thread<Pass2>(t, ws.part2, rows, lanes, ws.grouped2); });
  run_grid(row_blocks, [&](Thread t) { stats_rows_thread<Pass2>(t, ws.grouped2, rows, m, lanes, ws.centres, out); },
           kRowThreads);
  return lanes;
}

}  // extern "C"
