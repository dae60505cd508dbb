// The steering kernels of csrc/include/pllm/steer.cuh compiled for the CPU emulator (pllm/emu_runtime.h, implemented
// in csrc/lora_emu.cpp), so CI (no GPU) runs the device code itself: element layout, masks, the block reductions and
// their barriers and shuffles. Compiled by the host C++ compiler (setup.py: csrc/*.cpp) with -ffp-contract=off; the
// kernels spell every multiply-add as fmaf and use IEEE division and sqrtf, so emulated results are the device's bits.
#define PLLM_EMULATE 1
#define PLLM_STEER_DEFINE_LAUNCHERS 1
#include "pllm/steer_launch.cuh"
#include "pllm_launchers.h"

void pllm_steer_add_emu(uintptr_t h, uintptr_t vectors, uintptr_t slot_modes, uintptr_t token_slots,
                        uintptr_t token_scales, int64_t num_tokens, int64_t hidden, int64_t num_slots, int64_t k,
                        int64_t h_stride0, int64_t v_stride0, int dtype, int vec_dtype) {
  pllm::emu::steer_add_entry(h, vectors, slot_modes, token_slots, token_scales, num_tokens, hidden, num_slots, k,
                             h_stride0, v_stride0, dtype, vec_dtype, nullptr);
}

void pllm_steer_rmsnorm_emu(uintptr_t out, uintptr_t h, uintptr_t weight, uintptr_t vectors, uintptr_t slot_modes,
                            uintptr_t token_slots, uintptr_t token_scales, int64_t num_tokens, int64_t hidden,
                            int64_t num_slots, int64_t k, int64_t h_stride0, int64_t v_stride0, int64_t out_stride0,
                            double eps, double weight_offset, int dtype, int vec_dtype, int w_dtype) {
  pllm::emu::steer_rmsnorm_entry(out, h, weight, vectors, slot_modes, token_slots, token_scales, num_tokens, hidden,
                                 num_slots, k, h_stride0, v_stride0, out_stride0, eps, weight_offset, dtype, vec_dtype,
                                 w_dtype, nullptr);
}
