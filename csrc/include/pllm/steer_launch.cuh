// Host-side launch logic of the steering kernels (csrc/include/pllm/steer.cuh): argument checks, variant choice
// (activation / vector / weight dtypes, 16-byte or scalar accesses), grid. Shared by the device build (namespace
// pllm::dev: csrc/steer.cu + the per-dtype csrc/steer_*.cu files that instantiate the kernels) and the CPU emulator
// build (namespace pllm::emu: csrc/steer_emu.cpp), like lora_launch.cuh.
//
// The typed launchers (steer_typed<T, V, W>) are defined only where PLLM_STEER_DEFINE_LAUNCHERS is set, the
// dtype-dispatching entry points only where PLLM_STEER_TYPED_ONLY is not.
#pragma once

#include "pllm/steer.cuh"

#include <climits>
#include <cstdint>
#include <string>
#include <vector>

namespace pllm {
namespace PLLM_KNS {

inline bool steer_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether the 16-byte variant can run: every row 16-byte aligned and H a multiple of VEC = 16 / sizeof(T).
// (A vector / weight chunk is VEC * sizeof(V or W) >= 16 bytes: whole 16-byte loads from an aligned row.)
inline bool steer_vec_ok(const SteerParams& p, int esize, int vsize) {
  const int vec = 16 / esize;
  bool ok = p.H % vec == 0 && steer_aligned16(p.h) && p.sht % vec == 0 && steer_aligned16(p.vec) &&
            (p.svl * vsize) % 16 == 0;
  if (p.norm != steer::kNormNone) ok = ok && steer_aligned16(p.out) && p.sot % vec == 0 && steer_aligned16(p.w);
  return ok;
}

template <typename T, typename V, typename W>
void steer_typed(const SteerParams& p, bool vec_ok, cudaStream_t stream);

template <typename Kernel>
void steer_launch_kernel(Kernel kernel, const SteerParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.T), 1, 1);
  const dim3 block(static_cast<unsigned>(steer::block_threads(p.H)), 1, 1);
#if defined(PLLM_EMULATE)
  (void)stream;
  emu_rt::launch(grid, block, 0, [&]() { kernel(p); });
#else
  kernel<<<grid, block, 0, stream>>>(p);
  PLLM_CUDA_CHECK_LAUNCH();
#endif
}

#if !defined(PLLM_STEER_TYPED_ONLY)
inline void steer_check_ptr(const void* p, const char* name, size_t align) {
  PLLM_CHECK(p != nullptr, name << ": null pointer");
  PLLM_CHECK(reinterpret_cast<uintptr_t>(p) % align == 0, name << ": pointer not " << align << "-byte aligned");
}

inline int steer_as_int(int64_t v, const char* name) {
  PLLM_CHECK(v >= 0 && v <= INT32_MAX, name << " out of range [0, 2^31): " << v);
  return static_cast<int>(v);
}

// Plain launcher arguments -> parameters, with range checks. norm: steer::Norm.
inline SteerParams make_steer_params(uintptr_t out, uintptr_t h, uintptr_t weight, uintptr_t vectors,
                                     uintptr_t slot_modes, uintptr_t token_slots, uintptr_t token_scales, int64_t T,
                                     int64_t H, int64_t L, int64_t K, int64_t sht, int64_t svl, int64_t sot,
                                     double eps, int norm) {
  SteerParams p{};
  p.h = reinterpret_cast<void*>(h);
  p.out = reinterpret_cast<void*>(out);
  p.w = reinterpret_cast<const void*>(weight);
  p.vec = reinterpret_cast<const void*>(vectors);
  p.modes = reinterpret_cast<const int32_t*>(slot_modes);
  p.slots = reinterpret_cast<const int32_t*>(token_slots);
  p.scales = reinterpret_cast<const float*>(token_scales);
  p.T = steer_as_int(T, "num_tokens");
  p.H = steer_as_int(H, "hidden");
  p.L = steer_as_int(L, "num_slots");
  p.K = steer_as_int(K, "k");
  PLLM_CHECK(H <= steer::kMaxHidden,
             "hidden=" << H << " exceeds the CUDA steering kernels' " << steer::kMaxHidden << " (one row per block)");
  PLLM_CHECK(L >= 1, "num_slots must be >= 1, got " << L);
  PLLM_CHECK(K >= 1, "k (slots per token) must be >= 1, got " << K);
  PLLM_CHECK(T * K < (int64_t(1) << 31), "num_tokens * k out of range: " << T * K);
  PLLM_CHECK(sht >= 0 && svl >= 0 && sot >= 0, "strides must be >= 0");
  p.sht = sht;
  p.svl = svl;
  p.sot = sot;
  PLLM_CHECK(eps >= 0.0, "eps must be >= 0, got " << eps);
  p.eps = static_cast<float>(eps);
  p.norm = norm;
  return p;
}

// dtype codes: dtype (h, out), vec_dtype in {float32, dtype}, w_dtype in {float32, dtype} (steer_rmsnorm only).
inline void steer_launch(const SteerParams& p, int dtype, int vec_dtype, int w_dtype, cudaStream_t stream) {
  const char* op = p.norm == steer::kNormNone ? "steer_add" : "steer_rmsnorm";
  const int esize = dtype_size(dtype);
  PLLM_CHECK(esize > 0, op << ": unsupported dtype code " << dtype << " (0 float32, 1 float16, 2 bfloat16)");
  PLLM_CHECK(vec_dtype == dtype || vec_dtype == kFloat32,
             op << ": vectors must be float32 or h's dtype (" << dtype_name(dtype) << "), got dtype code "
                << vec_dtype);
  if (p.norm != steer::kNormNone) {
    PLLM_CHECK(w_dtype == dtype || w_dtype == kFloat32,
               op << ": weight must be float32 or h's dtype (" << dtype_name(dtype) << "), got dtype code "
                  << w_dtype);
  } else {
    w_dtype = dtype;
  }
  if (p.T == 0 || p.H == 0) return;
  steer_check_ptr(p.h, "h", esize);
  steer_check_ptr(p.vec, "vectors", dtype_size(vec_dtype));
  steer_check_ptr(p.modes, "slot_modes", 4);
  steer_check_ptr(p.slots, "token_slots", 4);
  steer_check_ptr(p.scales, "token_scales", 4);
  if (p.norm != steer::kNormNone) {
    steer_check_ptr(p.out, "out", esize);
    steer_check_ptr(p.w, "weight", dtype_size(w_dtype));
  }
  const bool vec_ok = steer_vec_ok(p, esize, dtype_size(vec_dtype));
  const bool vf = vec_dtype == kFloat32;
  const bool wf = w_dtype == kFloat32;
  switch (dtype) {
    case kFloat32: steer_typed<float, float, float>(p, vec_ok, stream); break;
    case kFloat16:
      if (vf && wf) steer_typed<__half, float, float>(p, vec_ok, stream);
      else if (vf) steer_typed<__half, float, __half>(p, vec_ok, stream);
      else if (wf) steer_typed<__half, __half, float>(p, vec_ok, stream);
      else steer_typed<__half, __half, __half>(p, vec_ok, stream);
      break;
    default:
      if (vf && wf) steer_typed<__nv_bfloat16, float, float>(p, vec_ok, stream);
      else if (vf) steer_typed<__nv_bfloat16, float, __nv_bfloat16>(p, vec_ok, stream);
      else if (wf) steer_typed<__nv_bfloat16, __nv_bfloat16, float>(p, vec_ok, stream);
      else steer_typed<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16>(p, vec_ok, stream);
      break;
  }
}

// The entry points behind pllm_steer_{add,rmsnorm}[_emu].
inline void steer_add_entry(uintptr_t h, uintptr_t vectors, uintptr_t slot_modes, uintptr_t token_slots,
                            uintptr_t token_scales, int64_t T, int64_t H, int64_t L, int64_t K, int64_t sht,
                            int64_t svl, int dtype, int vec_dtype, cudaStream_t stream) {
  const SteerParams p = make_steer_params(0, h, 0, vectors, slot_modes, token_slots, token_scales, T, H, L, K, sht,
                                          svl, 0, 0.0, steer::kNormNone);
  steer_launch(p, dtype, vec_dtype, dtype, stream);
}

inline void steer_rmsnorm_entry(uintptr_t out, uintptr_t h, uintptr_t weight, uintptr_t vectors, uintptr_t slot_modes,
                                uintptr_t token_slots, uintptr_t token_scales, int64_t T, int64_t H, int64_t L,
                                int64_t K, int64_t sht, int64_t svl, int64_t sot, double eps, double weight_offset,
                                int dtype, int vec_dtype, int w_dtype, cudaStream_t stream) {
  PLLM_CHECK(weight_offset == 0.0 || weight_offset == 1.0,
             "weight_offset must be 0 (Llama-style norm) or 1 (Gemma-style), got " << weight_offset);
  const SteerParams p = make_steer_params(out, h, weight, vectors, slot_modes, token_slots, token_scales, T, H, L, K,
                                          sht, svl, sot, eps,
                                          weight_offset == 0.0 ? steer::kNormLlama : steer::kNormGemma);
  steer_launch(p, dtype, vec_dtype, w_dtype, stream);
}
#endif  // !PLLM_STEER_TYPED_ONLY

#if defined(PLLM_STEER_DEFINE_LAUNCHERS)
// Typed launcher: one of the four kernels of (T, V, W). Without the norm the kernel does not depend on W (W = T).
template <typename T, typename V, typename W>
void steer_typed(const SteerParams& p, bool vec_ok, cudaStream_t stream) {
  if (p.norm == steer::kNormNone) {
    if (vec_ok) steer_launch_kernel(steer_kernel<T, V, T, true, false>, p, stream);
    else steer_launch_kernel(steer_kernel<T, V, T, false, false>, p, stream);
  } else {
    if (vec_ok) steer_launch_kernel(steer_kernel<T, V, W, true, true>, p, stream);
    else steer_launch_kernel(steer_kernel<T, V, W, false, true>, p, stream);
  }
}
#endif  // PLLM_STEER_DEFINE_LAUNCHERS

}  // namespace PLLM_KNS
}  // namespace pllm
