// The decoding kernels of csrc/include/pllm/decoding.cuh compiled for the CPU emulator (pllm/emu_runtime.h, implemented
// in csrc/lora_emu.cpp), so CI (no GPU) runs the device code itself. Compiled by the host C++ compiler with
// -ffp-contract=off; the kernels use fmaf, never-fused products and sums, and pllm/fmath.cuh's exp / log (IEEE-exact
// operations only), so emulated results are the device's bits.
#define PLLM_EMULATE 1
#include "pllm/decoding_launch.cuh"
#include "pllm_launchers.h"

void pllm_mix_logprobs_emu(uintptr_t out, uintptr_t sources, uintptr_t coefs, int64_t num_sources, int64_t batch,
                           int64_t vocab, int64_t src_stride0, int64_t src_stride1, int64_t coef_stride0,
                           int64_t coef_stride1, int64_t out_stride0, int dtype) {
  pllm::emu::mix_logprobs_entry(out, sources, coefs, num_sources, batch, vocab, src_stride0, src_stride1,
                                coef_stride0, coef_stride1, out_stride0, dtype, nullptr);
}

std::vector<float> pllm_fmath_eval(const std::string& fn, const std::vector<float>& xs) {
  PLLM_CHECK(fn == "exp" || fn == "log", "fmath_eval: fn must be 'exp' or 'log', got " << fn);
  std::vector<float> out(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) out[i] = fn == "exp" ? pllm::emu::exp_det(xs[i]) : pllm::emu::log_det(xs[i]);
  return out;
}
