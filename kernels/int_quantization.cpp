// Python binding of the CUDA GEMMLOWP kernels (gemmlowp.cu): argument checks and tensor layout.
//
// The kernels want one contiguous float32 buffer on the GPU.  A dense tensor (contiguous, channels_last,
// transposed...) is handled in place through a permuted view whose logical order is its memory order; any
// other layout is quantized in a contiguous copy that is copied back, so the call is always in place.

#include <ATen/ATen.h>
#include <torch/python.h>

#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <optional>
#include <string>

#include "bindings.h"
#include "common.h"

void gemmlowp_cuda_per_tensor(float* x, const float* noise, int64_t n, float scale, float inv_scale, float offset,
                              float qmax, int device);
void gemmlowp_cuda_per_channel(float* x, const float* noise, int64_t n, int64_t channels, int64_t inner,
                               const float* scale, const float* inv_scale, const float* offset, const float* qmax,
                               int device);

int64_t gemmlowp_cuda_stats_workspace_bytes(int64_t rows, int64_t m);
void gemmlowp_cuda_per_sample_stats(const float* x, int64_t rows, int64_t m, double* out, void* workspace,
                                    int device);

namespace {

using namespace aciq_kernels;

constexpr const char* kPrefix = "_gemmlowp_cuda";  // names the extension in argument errors

void check_tensor(const at::Tensor& t, const at::Tensor& x, const char* what) {
  if (!t.device().is_cuda()) {
    fail(std::string(kPrefix) + ": " + what + " is on " + t.device().str() +
         "; the CUDA kernel takes CUDA tensors only (use the 'cpu' backend for CPU tensors)");
  }
  if (t.device() != x.device()) {
    fail(std::string(kPrefix) + ": " + what + " is on " + t.device().str() + " but x is on " + x.device().str());
  }
  check_float32(kPrefix, t, what);
}

void check_noise(const at::Tensor& x, const std::optional<at::Tensor>& noise) {
  if (!noise.has_value()) return;
  check_tensor(*noise, x, "noise");
  check_noise_shape(kPrefix, x, *noise);
}

void check_param(const at::Tensor& p, const at::Tensor& x, const char* what, int64_t channels, int64_t dim) {
  check_tensor(p, x, what);
  check_param_shape(kPrefix, p, what, channels, dim);
}

at::Tensor quantize_(at::Tensor x, const std::optional<at::Tensor>& noise, double scale, double inv_scale,
                     double offset, double qmax) {
  check_tensor(x, x, "x");
  check_noise(x, noise);
  mark_modified(x);
  if (x.numel() == 0) return x;
  const c10::cuda::CUDAGuard guard(x.device());
  Work w = prepare(x, noise, 0);
  gemmlowp_cuda_per_tensor(w.x.data_ptr<float>(), w.noise.defined() ? w.noise.data_ptr<float>() : nullptr,
                           w.x.numel(), static_cast<float>(scale), static_cast<float>(inv_scale),
                           static_cast<float>(offset), static_cast<float>(qmax), x.get_device());
  if (w.copied) x.copy_(w.x);
  return x;
}

at::Tensor quantize_per_channel_(at::Tensor x, const std::optional<at::Tensor>& noise, const at::Tensor& scale,
                                 const at::Tensor& inv_scale, const at::Tensor& offset, int64_t dim,
                                 const at::Tensor& qmax) {
  check_tensor(x, x, "x");
  check_noise(x, noise);
  dim = channel_dim(kPrefix, x, dim);
  const int64_t channels = x.size(dim);
  check_param(scale, x, "scale", channels, dim);
  check_param(inv_scale, x, "inv_scale", channels, dim);
  check_param(offset, x, "offset", channels, dim);
  check_param(qmax, x, "qmax", channels, dim);
  mark_modified(x);
  if (x.numel() == 0) return x;
  const c10::cuda::CUDAGuard guard(x.device());
  Work w = prepare(x, noise, dim);
  const at::Tensor s = scale.contiguous(), inv = inv_scale.contiguous(), off = offset.contiguous();
  const at::Tensor qm = qmax.contiguous();
  int64_t inner = 1;
  for (int64_t d = w.dim + 1; d < w.x.dim(); ++d) inner *= w.x.size(d);
  gemmlowp_cuda_per_channel(w.x.data_ptr<float>(), w.noise.defined() ? w.noise.data_ptr<float>() : nullptr,
                            w.x.numel(), channels, inner, s.data_ptr<float>(), inv.data_ptr<float>(),
                            off.data_ptr<float>(), qm.data_ptr<float>(), x.get_device());
  if (w.copied) x.copy_(w.x);
  return x;
}

// Per-sample statistics of a contiguous float32 [N, M] CUDA tensor (stats.per_sample_stats): [N, 7]
// float64 on the same device, two reads of x, deterministic (gemmlowp_device.cuh).
at::Tensor per_sample_stats(const at::Tensor& x) {
  check_tensor(x, x, "x");
  check_stats_input(kPrefix, x);
  const int64_t rows = x.size(0), m = x.size(1);
  at::Tensor out = at::empty({rows, 7}, x.options().dtype(at::kDouble));
  if (rows == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor workspace = at::empty({gemmlowp_cuda_stats_workspace_bytes(rows, m)}, x.options().dtype(at::kByte));
  gemmlowp_cuda_per_sample_stats(x.data_ptr<float>(), rows, m, out.data_ptr<double>(), workspace.data_ptr(),
                                 x.get_device());
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  aciq_kernels::bind_kernels(m, "CUDA", &quantize_, &quantize_per_channel_, &per_sample_stats,
                             " on its device (two reads per row, deterministic)");
}
