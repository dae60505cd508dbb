// pybind11 module pllm_kernels._C: torch-free bindings of the launchers declared in csrc/pllm_launchers.h.
// C++ exceptions (std::runtime_error from launchers) surface as Python RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "pllm_launchers.h"

#ifndef PLLM_VERSION_STR
#error "PLLM_VERSION_STR is defined by setup.py from pllm_kernels/_version.py"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pllm_kernels CUDA extension (torch-free: raw device pointers, streams as integers, static cudart)";
  m.attr("__version__") = PLLM_VERSION_STR;
  // Dtype codes shared with every launcher.
  m.attr("DTYPE_FLOAT32") = 0;
  m.attr("DTYPE_FLOAT16") = 1;
  m.attr("DTYPE_BFLOAT16") = 2;

  m.def("device_count", &pllm_cuda_device_count, "Number of visible CUDA devices; 0 when no driver/device.");
  m.def("runtime_version", &pllm_cuda_runtime_version, "CUDA runtime version compiled in, e.g. '13.0'.");
  m.def("driver_version", &pllm_cuda_driver_version, "CUDA driver version, or 'none' without a driver.");
  m.def("compiled_archs", &pllm_compiled_archs, "SASS architectures compiled into the extension, e.g. [80, 90].");
  m.def("ptx_arch", &pllm_ptx_arch, "Architecture whose PTX is embedded (JIT on newer GPUs); 0 if none.");
  m.def("device_name", &pllm_device_name, py::arg("index"), "Name of CUDA device `index`.");
  m.def("device_capability", &pllm_device_capability, py::arg("index"),
        "Compute capability of device `index` as major*10+minor.");
  m.def("fill_f32", &pllm_fill_f32, py::arg("ptr"), py::arg("n"), py::arg("value"), py::arg("stream") = 0,
        "out[i] = value for i < n; ptr: float32 device pointer, stream: cudaStream_t as int (async).");
}
