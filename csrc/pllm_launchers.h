// Plain C++ declarations of every CUDA launcher in csrc/*.cu.
// Included by python_bindings/*.cpp, which are compiled by the host compiler: no CUDA or torch headers here.
// Conventions: device pointers and streams are passed as uintptr_t (tensor.data_ptr(),
// torch.cuda.current_stream().cuda_stream); dtype codes: 0 = float32, 1 = float16, 2 = bfloat16.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

// ---- probe.cu: capabilities ----------------------------------------------------------------------------------
// Number of visible CUDA devices; 0 (never throws) when there is no driver or no device.
int pllm_cuda_device_count();
// CUDA runtime version the extension was built with (static cudart), e.g. "13.0".
std::string pllm_cuda_runtime_version();
// Installed driver's CUDA version, e.g. "13.0", or "none" when no driver is present.
std::string pllm_cuda_driver_version();
// SASS architectures compiled into the extension, e.g. {80, 90}.
std::vector<int> pllm_compiled_archs();
// Architecture whose PTX is embedded (JIT for newer GPUs), 0 if none.
int pllm_ptx_arch();
// Name of device `index`; throws std::runtime_error for an invalid index.
std::string pllm_device_name(int index);
// Compute capability of device `index` as major*10+minor (e.g. 90); throws for an invalid index.
int pllm_device_capability(int index);

// ---- probe.cu: smoke-test kernel -----------------------------------------------------------------------------
// out[i] = value for i in [0, n) on `stream` (asynchronous). `ptr` is a float32 device pointer.
void pllm_fill_f32(uintptr_t ptr, int64_t n, float value, uintptr_t stream);
