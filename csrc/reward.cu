// Launcher of the token-level reward guidance (csrc/include/pllm/reward.cuh): plain C++ signatures declared in
// pllm_launchers.h. Three kernels (the logits' dtype) + three with a separate candidate row (fused_sample), one
// translation unit.
#include "pllm/reward_launch.cuh"
#include "pllm_launchers.h"

void pllm_reward_guided(uintptr_t out, uintptr_t logits, uintptr_t reward, uintptr_t beta, uintptr_t top_k,
                        int64_t batch, int64_t vocab, int64_t logits_stride, int64_t reward_stride, int64_t out_stride,
                        int dtype, uintptr_t stream) {
  static const int count = pllm_cuda_device_count();
  PLLM_CHECK(count > 0, "reward_guided: no CUDA device/driver is visible to the pllm_kernels CUDA extension");
  pllm::dev::reward_guided_entry(out, logits, reward, beta, top_k, batch, vocab, logits_stride, reward_stride,
                                 out_stride, dtype, pllm::as_stream(stream));
}

void pllm_reward_guided_cand(uintptr_t out, uintptr_t logits, uintptr_t cand, uintptr_t reward, uintptr_t beta,
                             uintptr_t top_k, int64_t batch, int64_t vocab, int64_t logits_stride, int64_t cand_stride,
                             int64_t reward_stride, int64_t out_stride, int cand_dtype, uintptr_t stream) {
  static const int count = pllm_cuda_device_count();
  PLLM_CHECK(count > 0, "reward_guided: no CUDA device/driver is visible to the pllm_kernels CUDA extension");
  pllm::dev::reward_guided_cand_entry(out, logits, cand, reward, beta, top_k, batch, vocab, logits_stride, cand_stride,
                                      reward_stride, out_stride, cand_dtype, pllm::as_stream(stream));
}

std::vector<std::string> pllm_reward_kernels() {
  std::vector<std::string> out;
  for (const char* dt : {"float32", "float16", "bfloat16"}) out.push_back(std::string("reward_guided<") + dt + ">");
  for (const char* dt : {"float32", "float16", "bfloat16"}) {
    out.push_back(std::string("reward_guided<float32,candidates=") + dt + ">");
  }
  return out;
}

std::vector<std::pair<std::string, int64_t>> pllm_reward_constants() {
  return {{"reward_threads", pllm::rwd::kRewardThreads}, {"max_vocab", pllm::rwd::kMaxVocab}};
}
