// Helpers shared by the Python bindings of the GEMMLOWP kernels: the CPU kernel (cpu_quantization.cpp) and
// the CUDA one (int_quantization.cpp).  Argument checks whose messages name the extension take its name as
// `prefix` ("_gemmlowp_cpu", "_gemmlowp_cuda"); the device checks, which differ, stay in each binding.
//
// Header-only (inline definitions), and only ATen/c10 headers: it is compiled by the host compiler into each
// extension separately, never by nvcc.

#pragma once

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace aciq_kernels {

// Argument errors: a plain std::runtime_error (RuntimeError in Python) with a message built here, raised from
// one non-inlined place.  Not TORCH_CHECK: its c10::Error carries a C++ backtrace, and on the GPU machine
// (torch 2.11, extension built by GCC 13) raising c10::Error from these checks segfaulted at some call sites.
[[noreturn]] __attribute__((noinline)) inline void fail(const std::string& msg) { throw std::runtime_error(msg); }

// "[2, 3]"
inline std::string shape_str(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(sizes[i]);
  }
  return out + "]";
}

// The kernels read and write float32 only.
inline void check_float32(const char* prefix, const at::Tensor& t, const char* what) {
  if (t.scalar_type() != at::kFloat) {
    fail(std::string(prefix) + ": " + what + " must be float32, got " + c10::toString(t.scalar_type()) +
         " (gemmlowp_quantize converts other dtypes before calling the kernel)");
  }
}

// Noise is added element for element, so it has x's shape.
inline void check_noise_shape(const char* prefix, const at::Tensor& x, const at::Tensor& noise) {
  if (noise.sizes() != x.sizes()) {
    fail(std::string(prefix) + ": noise must have the shape of x " + shape_str(x.sizes()) + ", got " +
         shape_str(noise.sizes()));
  }
}

// A per-channel parameter: one value per channel of x along `dim`.
inline void check_param_shape(const char* prefix, const at::Tensor& p, const char* what, int64_t channels,
                              int64_t dim) {
  if (p.dim() != 1 || p.numel() != channels) {
    fail(std::string(prefix) + ": per-channel " + what + " needs " + std::to_string(channels) +
         " values (x.size(" + std::to_string(dim) + ")), got shape " + shape_str(p.sizes()));
  }
}

// The channel dimension `dim` of x, checked and made non-negative.
inline int64_t channel_dim(const char* prefix, const at::Tensor& x, int64_t dim) {
  if (x.dim() == 0) fail(std::string(prefix) + ": per-channel quantization needs at least one dimension");
  if (dim < -x.dim() || dim >= x.dim()) {
    fail(std::string(prefix) + ": dim " + std::to_string(dim) + " is out of range");
  }
  return dim < 0 ? dim + x.dim() : dim;
}

// per_sample_stats reads rows of a contiguous [N, M] tensor, M >= 1 (N may be 0).
inline void check_stats_input(const char* prefix, const at::Tensor& x) {
  if (x.dim() != 2 || !x.is_contiguous()) {
    fail(std::string(prefix) + ": per_sample_stats takes a contiguous [N, M] tensor, got " + shape_str(x.sizes()) +
         (x.is_contiguous() ? "" : " (not contiguous)"));
  }
  if (x.size(1) == 0 && x.size(0) > 0) {
    fail(std::string(prefix) + ": per_sample_stats needs at least one element per sample");
  }
}

// Writing through data_ptr bypasses ATen, so bump x's version counter as an in-place ATen op would: autograd
// then refuses stale saved tensors, and an inference tensor outside InferenceMode is refused (same error).
inline void mark_modified(const at::Tensor& x) {
  if (x.is_inference() && !c10::InferenceMode::is_enabled()) {
    fail("Inplace update to inference tensor outside InferenceMode is not allowed (as for ATen's in-place ops); "
         "quantize a clone, or run under torch.inference_mode()");
  }
  x.unsafeGetTensorImpl()->bump_version();
}

// A view of `t` whose logical order is its memory order, when `t` is dense (contiguous, channels_last, a
// transpose...): the kernel then works in place on it.  Returns the permutation through `perm` (false when
// `t` is not dense).
inline bool dense_order(const at::Tensor& t, std::vector<int64_t>& perm) {
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

// Where the kernel can work directly on x's memory, or else a contiguous copy (copied back afterwards).
struct Work {
  at::Tensor x, noise;
  bool copied = false;
  int64_t dim = 0;
};

// x itself, a dense permuted view of it, or a contiguous copy to be copied back; noise lined up with it.
inline Work prepare(const at::Tensor& x, const std::optional<at::Tensor>& noise, int64_t dim) {
  Work w;
  std::vector<int64_t> perm;
  if (x.is_contiguous()) {
    w.x = x;
    w.dim = dim;
    if (noise.has_value()) w.noise = noise->contiguous();
  } else if (dense_order(x, perm)) {
    w.x = x.permute(perm);
    w.dim = std::find(perm.begin(), perm.end(), dim) - perm.begin();
    // The same permutation lines the noise up element for element (no copy when it has x's strides).
    if (noise.has_value()) w.noise = noise->permute(perm).contiguous();
  } else {
    w.x = x.contiguous();
    w.copied = true;
    w.dim = dim;
    if (noise.has_value()) w.noise = noise->contiguous();
  }
  return w;
}

}  // namespace aciq_kernels
