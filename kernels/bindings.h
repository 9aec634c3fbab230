// The Python interface of both kernel extensions, written once: the CPU binding (cpu_quantization.cpp) and the
// CUDA one (int_quantization.cpp) each pass their own functions and the device name used in the docstrings.
// Host compiler only (pybind11), like common.h.

#pragma once

#include <torch/python.h>

#include <string>

namespace aciq_kernels {

template <class Quantize, class QuantizePerChannel, class PerSampleStats>
void bind_kernels(py::module_& m, const std::string& device, Quantize quantize_,
                  QuantizePerChannel quantize_per_channel_, PerSampleStats per_sample_stats,
                  const std::string& stats_note) {
  // pybind11 copies the docstrings, so temporaries are fine here.
  m.doc() = ("GEMMLOWP fake quantization, fused and in place, for float32 " + device + " tensors").c_str();
  m.def("quantize_", quantize_,
        ("In-place per-tensor GEMMLOWP fake quantization (float32, " + device + ")").c_str(), py::arg("x"),
        py::arg("noise"), py::arg("scale"), py::arg("inv_scale"), py::arg("offset"), py::arg("qmax"));
  m.def("quantize_per_channel_", quantize_per_channel_,
        "In-place per-channel GEMMLOWP fake quantization along `dim`, one qmax per channel (float32); channels "
        "with scale 0 pass through",
        py::arg("x"), py::arg("noise"), py::arg("scale"), py::arg("inv_scale"), py::arg("offset"), py::arg("dim"),
        py::arg("qmax"));
  m.def("per_sample_stats", per_sample_stats,
        ("Per-row min, max, mean, std, kurtosis, mean |x|, mean |x - mean| of a contiguous float32 [N, M] " + device +
         " tensor, as float64 [N, 7]" + stats_note)
            .c_str(),
        py::arg("x"));
}

}  // namespace aciq_kernels
