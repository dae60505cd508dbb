// The token-level reward guidance of csrc/include/pllm/reward.cuh compiled for the CPU emulator (pllm/emu_runtime.h,
// implemented in csrc/lora_emu.cpp), so CI (no GPU) runs the device code itself. Compiled with -ffp-contract=off; the
// kernel uses rounded products / sums and pllm/fmath.cuh's exp / log only, so emulated results are the device's bits.
#define PLLM_EMULATE 1
#include "pllm/reward_launch.cuh"
#include "pllm_launchers.h"

void pllm_reward_guided_emu(uintptr_t out, uintptr_t logits, uintptr_t reward, uintptr_t beta, uintptr_t top_k,
                            int64_t batch, int64_t vocab, int64_t logits_stride, int64_t reward_stride,
                            int64_t out_stride, int dtype) {
  pllm::emu::reward_guided_entry(out, logits, reward, beta, top_k, batch, vocab, logits_stride, reward_stride,
                                 out_stride, dtype, nullptr);
}

void pllm_reward_guided_cand_emu(uintptr_t out, uintptr_t logits, uintptr_t cand, uintptr_t reward, uintptr_t beta,
                                 uintptr_t top_k, int64_t batch, int64_t vocab, int64_t logits_stride,
                                 int64_t cand_stride, int64_t reward_stride, int64_t out_stride, int cand_dtype) {
  pllm::emu::reward_guided_cand_entry(out, logits, cand, reward, beta, top_k, batch, vocab, logits_stride, cand_stride,
                                      reward_stride, out_stride, cand_dtype, nullptr);
}
