// The sampler of csrc/include/pllm/sample.cuh compiled for the CPU emulator (pllm/emu_runtime.h, implemented in
// csrc/lora_emu.cpp), so CI (no GPU) runs the device code itself. Compiled with -ffp-contract=off; the kernel uses
// rounded products / sums / divisions, fmaf and pllm/fmath.cuh's exp / log only, so emulated results are the device's
// bits.
#define PLLM_EMULATE 1
#include "pllm/sample_launch.cuh"
#include "pllm_launchers.h"

void pllm_sample_tokens_emu(uintptr_t tokens, uintptr_t logprobs, uintptr_t scores, uintptr_t temperature,
                            uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, uintptr_t seed, uintptr_t step,
                            int64_t batch, int64_t vocab, int64_t row_stride, int dtype) {
  pllm::emu::sample_tokens_entry(tokens, logprobs, scores, temperature, top_k, top_p, min_p, seed, step, batch, vocab,
                                 row_stride, dtype, nullptr);
}
