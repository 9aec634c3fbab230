// Python binding of the CUDA GEMMLOWP kernels (gemmlowp.cu): argument checks and tensor layout.
//
// The kernels want one contiguous float32 buffer on the GPU.  A dense tensor (contiguous, channels_last,
// transposed...) is handled in place through a permuted view whose logical order is its memory order; any
// other layout is quantized in a contiguous copy that is copied back, so the call is always in place.

#include <ATen/ATen.h>
#include <torch/python.h>

#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

void gemmlowp_cuda_per_tensor(float* x, const float* noise, int64_t n, float scale, float inv_scale, float offset,
                              float qmax, int device);
void gemmlowp_cuda_per_channel(float* x, const float* noise, int64_t n, int64_t channels, int64_t inner,
                               const float* scale, const float* inv_scale, const float* offset, float qmax,
                               int device);

namespace {

// Argument errors: a plain std::runtime_error (RuntimeError in Python) with a message built here, raised from
// one non-inlined place.  Not TORCH_CHECK: its c10::Error carries a C++ backtrace, and on the GPU machine
// (torch 2.11, extension built by GCC 13) raising c10::Error from these checks segfaulted at some call sites.
[[noreturn]] __attribute__((noinline)) void fail(const std::string& msg) { throw std::runtime_error(msg); }

// "[2, 3]"
std::string shape_str(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(sizes[i]);
  }
  return out + "]";
}

void check_tensor(const at::Tensor& t, const at::Tensor& x, const char* what) {
  if (!t.device().is_cuda()) {
    fail(std::string("_gemmlowp_cuda: ") + what + " is on " + t.device().str() +
         "; the CUDA kernel takes CUDA tensors only (use the 'cpu' backend for CPU tensors)");
  }
  if (t.device() != x.device()) {
    fail(std::string("_gemmlowp_cuda: ") + what + " is on " + t.device().str() + " but x is on " +
         x.device().str());
  }
  if (t.scalar_type() != at::kFloat) {
    fail(std::string("_gemmlowp_cuda: ") + what + " must be float32, got " + c10::toString(t.scalar_type()) +
         " (gemmlowp_quantize converts other dtypes before calling the kernel)");
  }
}

void check_noise(const at::Tensor& x, const std::optional<at::Tensor>& noise) {
  if (!noise.has_value()) return;
  check_tensor(*noise, x, "noise");
  if (noise->sizes() != x.sizes()) {
    fail("_gemmlowp_cuda: noise must have the shape of x " + shape_str(x.sizes()) + ", got " +
         shape_str(noise->sizes()));
  }
}

void check_param(const at::Tensor& p, const at::Tensor& x, const char* what, int64_t channels, int64_t dim) {
  check_tensor(p, x, what);
  if (p.dim() != 1 || p.numel() != channels) {
    fail(std::string("_gemmlowp_cuda: per-channel ") + what + " needs " + std::to_string(channels) +
         " values (x.size(" + std::to_string(dim) + ")), got shape " + shape_str(p.sizes()));
  }
}

// Writing through data_ptr bypasses ATen, so bump x's version counter as an in-place ATen op would: autograd
// then refuses stale saved tensors, and an inference tensor outside InferenceMode is refused (same error).
void mark_modified(const at::Tensor& x) {
  if (x.is_inference() && !c10::InferenceMode::is_enabled()) {
    fail("Inplace update to inference tensor outside InferenceMode is not allowed (as for ATen's in-place ops); "
         "quantize a clone, or run under torch.inference_mode()");
  }
  x.unsafeGetTensorImpl()->bump_version();
}

// Permutation that puts a dense tensor's dimensions in memory order (false when `t` is not dense).
bool dense_order(const at::Tensor& t, std::vector<int64_t>& perm) {
  const int64_t nd = t.dim();
  perm.resize(nd);
  for (int64_t d = 0; d < nd; ++d) perm[d] = d;
  if (!t.is_non_overlapping_and_dense()) return false;
  std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) {
    const bool a1 = t.size(a) == 1, b1 = t.size(b) == 1;
    if (a1 != b1) return a1;  // size-1 dimensions (any stride) first: they do not move anything
    return t.stride(a) > t.stride(b);
  });
  return t.permute(perm).is_contiguous();
}

struct Work {
  at::Tensor x, noise;
  bool copied = false;
  int64_t dim = 0;
};

// x itself, a dense permuted view of it, or a contiguous copy to be copied back; noise lined up with it.
Work prepare(const at::Tensor& x, const std::optional<at::Tensor>& noise, int64_t dim) {
  Work w;
  std::vector<int64_t> perm;
  if (x.is_contiguous()) {
    w.x = x;
    w.dim = dim;
    if (noise.has_value()) w.noise = noise->contiguous();
  } else if (dense_order(x, perm)) {
    w.x = x.permute(perm);
    w.dim = std::find(perm.begin(), perm.end(), dim) - perm.begin();
    if (noise.has_value()) w.noise = noise->permute(perm).contiguous();
  } else {
    w.x = x.contiguous();
    w.copied = true;
    w.dim = dim;
    if (noise.has_value()) w.noise = noise->contiguous();
  }
  return w;
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
                                 const at::Tensor& inv_scale, const at::Tensor& offset, int64_t dim, double qmax) {
  check_tensor(x, x, "x");
  check_noise(x, noise);
  if (x.dim() == 0) fail("_gemmlowp_cuda: per-channel quantization needs at least one dimension");
  if (dim < -x.dim() || dim >= x.dim()) fail("_gemmlowp_cuda: dim " + std::to_string(dim) + " is out of range");
  if (dim < 0) dim += x.dim();
  const int64_t channels = x.size(dim);
  check_param(scale, x, "scale", channels, dim);
  check_param(inv_scale, x, "inv_scale", channels, dim);
  check_param(offset, x, "offset", channels, dim);
  mark_modified(x);
  if (x.numel() == 0) return x;
  const c10::cuda::CUDAGuard guard(x.device());
  Work w = prepare(x, noise, dim);
  const at::Tensor s = scale.contiguous(), inv = inv_scale.contiguous(), off = offset.contiguous();
  int64_t inner = 1;
  for (int64_t d = w.dim + 1; d < w.x.dim(); ++d) inner *= w.x.size(d);
  gemmlowp_cuda_per_channel(w.x.data_ptr<float>(), w.noise.defined() ? w.noise.data_ptr<float>() : nullptr,
                            w.x.numel(), channels, inner, s.data_ptr<float>(), inv.data_ptr<float>(),
                            off.data_ptr<float>(), static_cast<float>(qmax), x.get_device());
  if (w.copied) x.copy_(w.x);
  return x;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "GEMMLOWP fake quantization, fused and in place, for float32 CUDA tensors";
  m.def("quantize_", &quantize_, "In-place per-tensor GEMMLOWP fake quantization (float32, CUDA)", py::arg("x"),
        py::arg("noise"), py::arg("scale"), py::arg("inv_scale"), py::arg("offset"), py::arg("qmax"));
  m.def("quantize_per_channel_", &quantize_per_channel_,
        "In-place per-channel GEMMLOWP fake quantization along `dim`; channels with scale 0 pass through",
        py::arg("x"), py::arg("noise"), py::arg("scale"), py::arg("inv_scale"), py::arg("offset"), py::arg("dim"),
        py::arg("qmax"));
}
