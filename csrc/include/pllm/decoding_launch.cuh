// Host-side launch logic of the decoding kernels (csrc/include/pllm/decoding.cuh): argument checks, variant choice
// (source dtype, 16-byte or scalar loads), grid. Shared by the device build (namespace pllm::dev: csrc/decoding.cu)
// and the CPU emulator build (namespace pllm::emu: csrc/decoding_emu.cpp).
#pragma once

#include "pllm/decoding.cuh"

#include <climits>
#include <cstdint>
#include <string>

namespace pllm {
namespace PLLM_KNS {

// Whether the 16-byte variant can run: every source row and out row 16-byte aligned, V a multiple of VEC.
inline bool mix_vec_ok(const MixParams& p, int esize) {
  const int vec = 16 / esize;
  const auto al = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  return p.V % vec == 0 && al(p.src) && al(p.out) && p.s_src_s % vec == 0 && p.s_src_b % vec == 0 &&
         p.s_out_b % 4 == 0;
}

template <typename T, bool VEC_OK>
void mix_launch_typed(const MixParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.B), 1, 1);
  const dim3 block(dec::kMixThreads, 1, 1);
#if defined(PLLM_EMULATE)
  (void)stream;
  emu_rt::launch(grid, block, 0, [&]() { mix_logprobs_kernel<T, VEC_OK>(p); });
#else
  mix_logprobs_kernel<T, VEC_OK><<<grid, block, 0, stream>>>(p);
  PLLM_CUDA_CHECK_LAUNCH();
#endif
}

// The entry point behind pllm_mix_logprobs[_emu].
inline void mix_logprobs_entry(uintptr_t out, uintptr_t sources, uintptr_t coefs, int64_t S, int64_t B, int64_t V,
                               int64_t s_src_s, int64_t s_src_b, int64_t s_coef_b, int64_t s_coef_s,
                               int64_t s_out_b, int dtype, cudaStream_t stream) {
  const int esize = dtype_size(dtype);
  PLLM_CHECK(esize > 0, "mix_logprobs: unsupported dtype code " << dtype << " (0 float32, 1 float16, 2 bfloat16)");
  PLLM_CHECK(S >= 1 && S <= dec::kMaxSources,
             "mix_logprobs: the CUDA kernel takes 1.." << dec::kMaxSources << " sources, got " << S);
  PLLM_CHECK(B >= 0 && B <= INT32_MAX, "mix_logprobs: batch out of range: " << B);
  PLLM_CHECK(V >= 1 && V <= INT32_MAX, "mix_logprobs: vocabulary out of range: " << V);
  PLLM_CHECK(s_src_s >= 0 && s_src_b >= 0 && s_coef_b >= 0 && s_coef_s >= 0 && s_out_b >= 0,
             "mix_logprobs: strides must be >= 0");
  if (B == 0) return;
  MixParams p{};
  p.out = reinterpret_cast<float*>(out);
  p.src = reinterpret_cast<const void*>(sources);
  p.coefs = reinterpret_cast<const float*>(coefs);
  const auto check_ptr = [](const void* q, const char* name, int align) {
    check_arg_ptr(reinterpret_cast<uintptr_t>(q), "mix_logprobs", name, align);
  };
  check_ptr(p.out, "out", 4);
  check_ptr(p.src, "sources", esize);
  check_ptr(p.coefs, "coefs", 4);
  p.S = static_cast<int>(S);
  p.B = static_cast<int>(B);
  p.V = static_cast<int>(V);
  p.s_src_s = s_src_s;
  p.s_src_b = s_src_b;
  p.s_coef_b = s_coef_b;
  p.s_coef_s = s_coef_s;
  p.s_out_b = s_out_b;
  const bool v16 = mix_vec_ok(p, esize);
  switch (dtype) {
    case kFloat32: v16 ? mix_launch_typed<float, true>(p, stream) : mix_launch_typed<float, false>(p, stream); break;
    case kFloat16: v16 ? mix_launch_typed<__half, true>(p, stream) : mix_launch_typed<__half, false>(p, stream); break;
    default:
      v16 ? mix_launch_typed<__nv_bfloat16, true>(p, stream) : mix_launch_typed<__nv_bfloat16, false>(p, stream);
  }
}

}  // namespace PLLM_KNS
}  // namespace pllm
