// Launcher of the per-row sampler (csrc/include/pllm/sample.cuh): plain C++ signatures declared in pllm_launchers.h.
// Three kernels (the scores' dtype), one translation unit.
#include "pllm/sample_launch.cuh"
#include "pllm_launchers.h"

void pllm_sample_tokens(uintptr_t tokens, uintptr_t logprobs, uintptr_t scores, uintptr_t temperature,
                        uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, uintptr_t seed, uintptr_t step,
                        int64_t batch, int64_t vocab, int64_t row_stride, int dtype, uintptr_t stream) {
  static const int count = pllm_cuda_device_count();
  PLLM_CHECK(count > 0, "sample_tokens: no CUDA device/driver is visible to the pllm_kernels CUDA extension");
  pllm::dev::sample_tokens_entry(tokens, logprobs, scores, temperature, top_k, top_p, min_p, seed, step, batch,
                                 vocab, row_stride, dtype, pllm::as_stream(stream));
}

std::vector<std::string> pllm_sample_kernels() {
  std::vector<std::string> out;
  for (const char* dt : {"float32", "float16", "bfloat16"}) out.push_back(std::string("sample_tokens<") + dt + ">");
  return out;
}

std::vector<std::pair<std::string, int64_t>> pllm_sample_constants() {
  return {{"sample_threads", pllm::smp::kSampleThreads}, {"max_vocab", pllm::smp::kMaxVocab}};
}
