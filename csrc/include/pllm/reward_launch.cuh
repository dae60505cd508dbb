// Host-side launch logic of the token-level reward guidance (csrc/include/pllm/reward.cuh): argument checks, variant
// choice (logits' dtype), grid. Shared by the device build (namespace pllm::dev: csrc/reward.cu) and the CPU emulator
// build (namespace pllm::emu: csrc/reward_emu.cpp).
#pragma once

#include "pllm/reward.cuh"

#include <climits>
#include <cstdint>
#include <string>

namespace pllm {
namespace PLLM_KNS {

template <typename T, typename C = T, bool SEP = false>
void reward_launch_typed(const RewardParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.B), 1, 1);
  const dim3 block(rwd::kRewardThreads, 1, 1);
#if defined(PLLM_EMULATE)
  (void)stream;
  emu_rt::launch(grid, block, 0, [&]() { reward_guided_kernel<T, C, SEP>(p); });
#else
  reward_guided_kernel<T, C, SEP><<<grid, block, 0, stream>>>(p);
  PLLM_CUDA_CHECK_LAUNCH();
#endif
}

inline void reward_check_sizes(int64_t B, int64_t V) {
  PLLM_CHECK(B >= 0 && B <= INT32_MAX, "reward_guided: batch out of range: " << B);
  PLLM_CHECK(V >= 1 && V <= rwd::kMaxVocab,
             "reward_guided: the CUDA kernel takes vocabularies of 1.." << rwd::kMaxVocab << " tokens, got " << V);
}

inline void reward_check_ptr(uintptr_t q, const char* name, int align) {
  check_arg_ptr(q, "reward_guided", name, align);
}

inline RewardParams reward_params(uintptr_t out, uintptr_t logits, uintptr_t cand, uintptr_t reward, uintptr_t beta,
                                  uintptr_t top_k, int64_t B, int64_t V, int64_t s_x, int64_t s_c, int64_t s_r,
                                  int64_t s_o) {
  RewardParams p{};
  p.out = reinterpret_cast<float*>(out);
  p.logits = reinterpret_cast<const void*>(logits);
  p.cand = reinterpret_cast<const void*>(cand);
  p.reward = reinterpret_cast<const float*>(reward);
  p.beta = reinterpret_cast<const float*>(beta);
  p.top_k = reinterpret_cast<const int32_t*>(top_k);
  p.B = static_cast<int>(B);
  p.V = static_cast<int>(V);
  p.s_x = s_x;
  p.s_c = s_c;
  p.s_r = s_r;
  p.s_o = s_o;
  return p;
}

// The entry point behind pllm_reward_guided_cand[_emu]: float32 logits (the values), candidates from the rows of
// `cand` (dtype `cand_dtype`): the guidance step of fused_sample.
inline void reward_guided_cand_entry(uintptr_t out, uintptr_t logits, uintptr_t cand, uintptr_t reward, uintptr_t beta,
                                     uintptr_t top_k, int64_t B, int64_t V, int64_t s_x, int64_t s_c, int64_t s_r,
                                     int64_t s_o, int cand_dtype, cudaStream_t stream) {
  const int esize = dtype_size(cand_dtype);
  PLLM_CHECK(esize > 0, "reward_guided: unsupported candidate dtype code " << cand_dtype
                                                                            << " (0 float32, 1 float16, 2 bfloat16)");
  reward_check_sizes(B, V);
  PLLM_CHECK(s_x >= 0 && s_c >= 0 && s_r >= 0 && s_o >= 0, "reward_guided: the row strides must be >= 0");
  if (B == 0) return;
  reward_check_ptr(out, "out", 4);
  reward_check_ptr(logits, "logits", 4);
  reward_check_ptr(cand, "cand", esize);
  reward_check_ptr(reward, "reward", 4);
  reward_check_ptr(beta, "beta", 4);
  reward_check_ptr(top_k, "top_k", 4);
  const RewardParams p = reward_params(out, logits, cand, reward, beta, top_k, B, V, s_x, s_c, s_r, s_o);
  switch (cand_dtype) {
    case kFloat32: reward_launch_typed<float, float, true>(p, stream); break;
    case kFloat16: reward_launch_typed<float, __half, true>(p, stream); break;
    default: reward_launch_typed<float, __nv_bfloat16, true>(p, stream);
  }
}

// The entry point behind pllm_reward_guided[_emu].
inline void reward_guided_entry(uintptr_t out, uintptr_t logits, uintptr_t reward, uintptr_t beta, uintptr_t top_k,
                                int64_t B, int64_t V, int64_t s_x, int64_t s_r, int64_t s_o, int dtype,
                                cudaStream_t stream) {
  const int esize = dtype_size(dtype);
  PLLM_CHECK(esize > 0, "reward_guided: unsupported dtype code " << dtype << " (0 float32, 1 float16, 2 bfloat16)");
  reward_check_sizes(B, V);
  PLLM_CHECK(s_x >= 0 && s_r >= 0 && s_o >= 0, "reward_guided: the row strides must be >= 0");
  if (B == 0) return;
  reward_check_ptr(out, "out", 4);
  reward_check_ptr(logits, "logits", esize);
  reward_check_ptr(reward, "reward", 4);
  reward_check_ptr(beta, "beta", 4);
  reward_check_ptr(top_k, "top_k", 4);
  const RewardParams p = reward_params(out, logits, 0, reward, beta, top_k, B, V, s_x, 0, s_r, s_o);
  switch (dtype) {
    case kFloat32: reward_launch_typed<float>(p, stream); break;
    case kFloat16: reward_launch_typed<__half>(p, stream); break;
    default: reward_launch_typed<__nv_bfloat16>(p, stream);
  }
}

}  // namespace PLLM_KNS
}  // namespace pllm
