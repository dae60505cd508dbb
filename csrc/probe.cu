// Capability probe and a minimal real kernel, used to check that building, importing and launching work.
#include "pllm/common.cuh"
#include "pllm_launchers.h"

#include <algorithm>

#ifndef PLLM_PTX_ARCH
#define PLLM_PTX_ARCH 0
#endif

namespace {

__global__ void fill_f32_kernel(float* __restrict__ out, int64_t n, float value) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = value;
  }
}

std::string version_string(int v) {
  // CUDA encodes versions as 1000*major + 10*minor.
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

}  // namespace

int pllm_cuda_device_count() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // no driver / no device: clear the error, report 0
    return 0;
  }
  return count;
}

std::string pllm_cuda_runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess || v <= 0) {
    cudaGetLastError();
    // Static cudart: fall back to the compile-time version.
    v = CUDART_VERSION;
  }
  return version_string(v);
}

std::string pllm_cuda_driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess || v <= 0) {
    cudaGetLastError();
    return "none";
  }
  return version_string(v);
}

std::vector<int> pllm_compiled_archs() {
#if defined(__CUDA_ARCH_LIST__)
  // nvcc >= 11.5 defines e.g. __CUDA_ARCH_LIST__ = 800,900 (also in host compilation).
  const int list[] = {__CUDA_ARCH_LIST__};
  const int scale = 10;
#elif defined(PLLM_ARCH_LIST)
  // Passed by setup.py as -DPLLM_ARCH_LIST=80,90.
  const int list[] = {PLLM_ARCH_LIST};
  const int scale = 1;
#else
  const int list[] = {0};
  const int scale = 0;
#endif
  std::vector<int> out;
  if (scale == 0) return out;
  for (int a : list) out.push_back(a / scale);
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

int pllm_ptx_arch() { return PLLM_PTX_ARCH; }

static void check_device_index(int index) {
  const int count = pllm_cuda_device_count();
  PLLM_CHECK(index >= 0 && index < count, "device index " << index << " out of range (device count " << count << ")");
}

std::string pllm_device_name(int index) {
  check_device_index(index);
  cudaDeviceProp prop;
  PLLM_CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
  return std::string(prop.name);
}

int pllm_device_capability(int index) {
  check_device_index(index);
  int major = 0, minor = 0;
  PLLM_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, index));
  PLLM_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, index));
  return major * 10 + minor;
}

void pllm_fill_f32(uintptr_t ptr, int64_t n, float value, uintptr_t stream) {
  PLLM_CHECK(n >= 0, "n must be >= 0, got " << n);
  if (n == 0) return;
  PLLM_CHECK(ptr != 0, "null pointer");
  PLLM_CHECK(ptr % alignof(float) == 0, "pointer not 4-byte aligned");
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>(pllm::ceil_div(n, kThreads), 65535LL * 8);
  fill_f32_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, pllm::as_stream(stream)>>>(
      pllm::as_ptr<float>(ptr), n, value);
  PLLM_CUDA_CHECK_LAUNCH();
}
