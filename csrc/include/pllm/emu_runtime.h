// A small CPU emulator of the CUDA execution model, used only to run the pllm device code on the host in tests
// (the CI machines have no GPU). Compiled into csrc/lora_emu.cpp with PLLM_EMULATE defined; kernels written with the
// primitives of pllm/kernel_prims.cuh run unchanged on it.
//
// Model: blocks run one after another; the threads of a block are cooperative user-level contexts (ucontext) that run
// in thread-index order until they reach a barrier. __syncthreads waits for every live thread of the block; a warp
// shuffle is a warp barrier that requires all 32 lanes (full-mask shuffles only). A barrier that can never be
// released (divergent __syncthreads, a shuffle with exited lanes) is reported as an error, as is a block size that is
// not a multiple of 32. cp.async copies are deferred until the thread's cp.async.wait_group releases their group, so
// reading a stage before waiting (or before the barrier that follows the wait) reads stale data; in the "eager" mode
// (pllm_emu_config) they land at issue instead, so refilling a stage that other threads still read corrupts it; threads
// can also run in reverse index order. Dynamic shared memory starts filled with 0xFF bytes (NaN floats). Shared memory
// of a kernel is a static buffer of that kernel.
#pragma once

#include <cuda_runtime.h>  // dim3 (host-usable)

#include <cstddef>
#include <cstdint>
#include <functional>

namespace pllm {
namespace emu_rt {

int thread_idx();
int block_dim();
int block_idx(int axis);
int grid_dim(int axis);
void sync_block();
float shfl_xor(float v, int mask);
void* dyn_smem();
void cp_async16(void* smem_dst, const void* gmem_src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int n);
// Warp-collective mma.m16n8k16 (row.col, f16 / bf16 inputs, f32 accumulate): d += A * B with the PTX fragment layouts
// (a: 4 packed pairs, b: 2 packed pairs, d: 4 floats per lane); a warp barrier like a shuffle (all 32 lanes). The
// products are exact in fp32 and summed in k order: the device's accumulation order is not specified, so results
// agree with the device within rounding, not bit for bit.
void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, bool bf16);

// Run `body` for every thread of every block of `grid` x `block`, with `smem_bytes` of dynamic shared memory.
// Throws std::runtime_error on emulation errors (deadlock, bad block size).
void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body);

}  // namespace emu_rt
}  // namespace pllm
