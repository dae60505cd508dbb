// Host-side launch logic of the sampler (csrc/include/pllm/sample.cuh): argument checks, variant choice (scores'
// dtype), grid. Shared by the device build (namespace pllm::dev: csrc/sample.cu) and the CPU emulator build
// (namespace pllm::emu: csrc/sample_emu.cpp).
#pragma once

#include "pllm/sample.cuh"

#include <climits>
#include <cstdint>
#include <string>

namespace pllm {
namespace PLLM_KNS {

template <typename T>
void sample_launch_typed(const SampleParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.B), 1, 1);
  const dim3 block(smp::kSampleThreads, 1, 1);
#if defined(PLLM_EMULATE)
  (void)stream;
  emu_rt::launch(grid, block, 0, [&]() { sample_tokens_kernel<T>(p); });
#else
  sample_tokens_kernel<T><<<grid, block, 0, stream>>>(p);
  PLLM_CUDA_CHECK_LAUNCH();
#endif
}

// The entry point behind pllm_sample_tokens[_emu].
inline void sample_tokens_entry(uintptr_t tokens, uintptr_t logprobs, uintptr_t scores, uintptr_t temperature,
                                uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, uintptr_t seed, uintptr_t step,
                                int64_t B, int64_t V, int64_t s_b, int dtype, cudaStream_t stream) {
  const int esize = dtype_size(dtype);
  PLLM_CHECK(esize > 0, "sample_tokens: unsupported dtype code " << dtype << " (0 float32, 1 float16, 2 bfloat16)");
  PLLM_CHECK(B >= 0 && B <= INT32_MAX, "sample_tokens: batch out of range: " << B);
  PLLM_CHECK(V >= 1 && V <= smp::kMaxVocab,
             "sample_tokens: the CUDA kernel takes vocabularies of 1.." << smp::kMaxVocab << " tokens, got " << V);
  PLLM_CHECK(s_b >= 0, "sample_tokens: the row stride must be >= 0");
  if (B == 0) return;
  SampleParams p{};
  const auto check_ptr = [](uintptr_t q, const char* name, int align) {
    check_arg_ptr(q, "sample_tokens", name, align);
  };
  check_ptr(tokens, "tokens", 8);
  check_ptr(logprobs, "logprobs", 4);
  check_ptr(scores, "scores", esize);
  check_ptr(temperature, "temperature", 4);
  check_ptr(top_k, "top_k", 4);
  check_ptr(top_p, "top_p", 4);
  check_ptr(min_p, "min_p", 4);
  check_ptr(seed, "seed", 8);
  check_ptr(step, "step", 8);
  p.tokens = reinterpret_cast<int64_t*>(tokens);
  p.logprobs = reinterpret_cast<float*>(logprobs);
  p.scores = reinterpret_cast<const void*>(scores);
  p.temperature = reinterpret_cast<const float*>(temperature);
  p.top_k = reinterpret_cast<const int32_t*>(top_k);
  p.top_p = reinterpret_cast<const float*>(top_p);
  p.min_p = reinterpret_cast<const float*>(min_p);
  p.seed = reinterpret_cast<const int64_t*>(seed);
  p.step = reinterpret_cast<const int64_t*>(step);
  p.B = static_cast<int>(B);
  p.V = static_cast<int>(V);
  p.s_b = s_b;
  switch (dtype) {
    case kFloat32: sample_launch_typed<float>(p, stream); break;
    case kFloat16: sample_launch_typed<__half>(p, stream); break;
    default: sample_launch_typed<__nv_bfloat16>(p, stream);
  }
}

}  // namespace PLLM_KNS
}  // namespace pllm
