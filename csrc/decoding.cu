// Launcher of the decoding kernels (csrc/include/pllm/decoding.cuh): plain C++ signatures declared in
// pllm_launchers.h. Six kernels (source dtype x 16-byte / scalar loads), one translation unit.
#include "pllm/decoding_launch.cuh"
#include "pllm_launchers.h"

void pllm_mix_logprobs(uintptr_t out, uintptr_t sources, uintptr_t coefs, int64_t num_sources, int64_t batch,
                       int64_t vocab, int64_t src_stride0, int64_t src_stride1, int64_t coef_stride0,
                       int64_t coef_stride1, int64_t out_stride0, int dtype, uintptr_t stream) {
  static const int count = pllm_cuda_device_count();
  PLLM_CHECK(count > 0, "mix_logprobs: no CUDA device/driver is visible to the pllm_kernels CUDA extension");
  pllm::dev::mix_logprobs_entry(out, sources, coefs, num_sources, batch, vocab, src_stride0, src_stride1,
                                coef_stride0, coef_stride1, out_stride0, dtype, pllm::as_stream(stream));
}

std::vector<std::string> pllm_decoding_kernels() {
  std::vector<std::string> out;
  for (const char* dt : {"float32", "float16", "bfloat16"}) {
    for (const char* ld : {"vec16", "scalar"}) out.push_back(std::string("mix_logprobs<") + dt + "," + ld + ">");
  }
  return out;
}

std::vector<std::pair<std::string, int64_t>> pllm_decoding_constants() {
  return {{"mix_threads", pllm::dec::kMixThreads}, {"max_sources", pllm::dec::kMaxSources}};
}
