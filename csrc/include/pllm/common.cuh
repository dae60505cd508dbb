// Torch-free helpers shared by every pllm CUDA kernel and launcher.
// Only CUDA / standard headers here: no torch, no Python (ENGINEERING.md section 3).
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace pllm {

// ---------------------------------------------------------------------------------------------------------------
// Errors. Launchers throw std::runtime_error; pybind11 turns it into a Python RuntimeError.
// ---------------------------------------------------------------------------------------------------------------
[[noreturn]] inline void throw_error(const char* file, int line, const std::string& what) {
  std::ostringstream os;
  os << "pllm_kernels: " << what << " (" << file << ":" << line << ")";
  throw std::runtime_error(os.str());
}

inline void cuda_check(cudaError_t err, const char* expr, const char* file, int line) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // reset a non-sticky error so later calls do not report it again
    std::ostringstream os;
    os << "CUDA error " << static_cast<int>(err) << " (" << cudaGetErrorName(err) << ": " << cudaGetErrorString(err)
       << ") in `" << expr << "`";
    throw_error(file, line, os.str());
  }
}

}  // namespace pllm

// Throw std::runtime_error with file/line if a CUDA runtime call fails.
#define PLLM_CUDA_CHECK(expr) ::pllm::cuda_check((expr), #expr, __FILE__, __LINE__)

// Check the last kernel launch (launch-configuration errors; does not synchronize).
#define PLLM_CUDA_CHECK_LAUNCH() ::pllm::cuda_check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

// Argument check for launchers: PLLM_CHECK(n >= 0, "n must be >= 0, got " << n);
#define PLLM_CHECK(cond, msg)                                              \
  do {                                                                     \
    if (!(cond)) {                                                         \
      std::ostringstream pllm_check_os_;                                   \
      pllm_check_os_ << "check failed: " #cond ": " << msg;                \
      ::pllm::throw_error(__FILE__, __LINE__, pllm_check_os_.str());       \
    }                                                                      \
  } while (0)

namespace pllm {

// ---------------------------------------------------------------------------------------------------------------
// Dtype codes. Fixed ABI between Python (pllm_kernels/ops) and every CUDA launcher: never renumber.
// ---------------------------------------------------------------------------------------------------------------
enum DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

inline int dtype_size(int code) {
  switch (code) {
    case kFloat32: return 4;
    case kFloat16: return 2;
    case kBFloat16: return 2;
    default: return 0;
  }
}

template <int Code> struct DTypeTraits;
template <> struct DTypeTraits<kFloat32> { using type = float; };
template <> struct DTypeTraits<kFloat16> { using type = __half; };
template <> struct DTypeTraits<kBFloat16> { using type = __nv_bfloat16; };

// Conversions to/from float for all supported element types.
template <typename T> __host__ __device__ __forceinline__ float to_float(T x);
template <> __host__ __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __host__ __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __host__ __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T> __host__ __device__ __forceinline__ T from_float(float x);
template <> __host__ __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __host__ __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// Launcher argument check of a pointer passed as an integer: "<op>: <name>: null pointer" / "... not N-byte aligned".
inline void check_arg_ptr(uintptr_t q, const char* op, const char* name, int align) {
  PLLM_CHECK(q != 0, op << ": " << name << ": null pointer");
  PLLM_CHECK(q % static_cast<uintptr_t>(align) == 0,
             op << ": " << name << ": pointer not " << align << "-byte aligned");
}

template <typename T> inline T* as_ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace pllm

// Dispatch a runtime dtype code to a C++ type `scalar_t` inside the body:
//   PLLM_DISPATCH_FLOAT_TYPES(dtype, "lora_shrink", { kernel<scalar_t><<<...>>>(...); });
#define PLLM_DISPATCH_FLOAT_TYPES(CODE, NAME, ...)                                                  \
  do {                                                                                              \
    switch (static_cast<int>(CODE)) {                                                               \
      case ::pllm::kFloat32: { using scalar_t = float; __VA_ARGS__; } break;                        \
      case ::pllm::kFloat16: { using scalar_t = __half; __VA_ARGS__; } break;                       \
      case ::pllm::kBFloat16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; } break;               \
      default: PLLM_CHECK(false, NAME << ": unsupported dtype code " << static_cast<int>(CODE));     \
    }                                                                                               \
  } while (0)
