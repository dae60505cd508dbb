// Primitives of the pllm kernels, in two builds of the same source:
//   * device (nvcc, csrc/*.cu): namespace pllm::dev, real __global__ kernels, shuffles, cp.async;
//   * emulation (host compiler, PLLM_EMULATE, csrc/lora_emu.cpp): namespace pllm::emu, the same kernel bodies as
//     host functions run by pllm/emu_runtime.h, for CPU tests of the device code.
// Kernels use only what is defined here for thread indices, barriers, shuffles, shared memory and cp.async.
#pragma once

#include "pllm/common.cuh"
#include "pllm/lora_tiling.h"

#include <cmath>
#include <cstring>
#include <type_traits>

#if defined(PLLM_EMULATE)
#include "pllm/emu_runtime.h"
#define PLLM_KNS emu
#define PLLM_KERNEL(threads) inline void
#define PLLM_KERNEL_MB(threads, min_blocks) inline void
#define PLLM_DEV inline
#define PLLM_SMEM static
#define PLLM_DYN_SMEM(type, name) type* name = reinterpret_cast<type*>(::pllm::emu_rt::dyn_smem())
#define PLLM_RESTRICT
#else
#define PLLM_KNS dev
#define PLLM_KERNEL(threads) __global__ void __launch_bounds__(threads)
#define PLLM_KERNEL_MB(threads, min_blocks) __global__ void __launch_bounds__(threads, min_blocks)
#define PLLM_DEV __device__ __forceinline__
#define PLLM_SMEM __shared__
#define PLLM_DYN_SMEM(type, name)                                  \
  extern __shared__ __align__(16) unsigned char pllm_dyn_smem_[];  \
  type* name = reinterpret_cast<type*>(pllm_dyn_smem_)
#define PLLM_RESTRICT __restrict__
#endif

namespace pllm {
namespace PLLM_KNS {

#if defined(PLLM_EMULATE)
PLLM_DEV int tid() { return emu_rt::thread_idx(); }
PLLM_DEV int nthreads() { return emu_rt::block_dim(); }
PLLM_DEV int bid_x() { return emu_rt::block_idx(0); }
PLLM_DEV int bid_y() { return emu_rt::block_idx(1); }
PLLM_DEV int bid_z() { return emu_rt::block_idx(2); }
PLLM_DEV int grid_y() { return emu_rt::grid_dim(1); }
PLLM_DEV void sync_block() { emu_rt::sync_block(); }
PLLM_DEV float shfl_xor(float v, int mask) { return emu_rt::shfl_xor(v, mask); }
#else
PLLM_DEV int tid() { return static_cast<int>(threadIdx.x); }
PLLM_DEV int nthreads() { return static_cast<int>(blockDim.x); }
PLLM_DEV int bid_x() { return static_cast<int>(blockIdx.x); }
PLLM_DEV int bid_y() { return static_cast<int>(blockIdx.y); }
PLLM_DEV int bid_z() { return static_cast<int>(blockIdx.z); }
PLLM_DEV int grid_y() { return static_cast<int>(gridDim.y); }
PLLM_DEV void sync_block() { __syncthreads(); }
PLLM_DEV float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
#endif
PLLM_DEV int lane_id() { return tid() & 31; }
PLLM_DEV int warp_id() { return tid() >> 5; }
PLLM_DEV int num_warps() { return nthreads() >> 5; }

// ---- loads -------------------------------------------------------------------------------------------------------
// 16-byte load of read-only data (weights, activations); the caller guarantees 16-byte alignment.
PLLM_DEV uint4 ld16(const void* p) {
#if defined(PLLM_EMULATE)
  uint4 u;
  std::memcpy(&u, p, 16);
  return u;
#else
  return __ldg(reinterpret_cast<const uint4*>(p));
#endif
}

// The VEC = 16 / sizeof(T) elements of a 16-byte vector, as floats.
template <typename T>
PLLM_DEV void unpack16(const uint4& u, float* f) {
  constexpr int V = 16 / sizeof(T);
  T e[V];
  std::memcpy(static_cast<void*>(e), &u, 16);
#pragma unroll
  for (int i = 0; i < V; ++i) f[i] = to_float<T>(e[i]);
}

template <typename T>
PLLM_DEV float ld_f(const T* p) { return to_float<T>(*p); }

// ---- cp.async (sm_80+): 16-byte global -> shared copies, `src_bytes` < 16 zero-fills the rest ------------------
PLLM_DEV void cp_async16(void* smem_dst, const void* gmem_src, int src_bytes) {
#if defined(PLLM_EMULATE)
  emu_rt::cp_async16(smem_dst, gmem_src, src_bytes);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem_src), "r"(src_bytes));
#else
  uint4 u = make_uint4(0u, 0u, 0u, 0u);
  if (src_bytes > 0) {
    unsigned char b[16] = {0};
    const unsigned char* src = reinterpret_cast<const unsigned char*>(gmem_src);
    for (int i = 0; i < src_bytes && i < 16; ++i) b[i] = src[i];
    std::memcpy(&u, b, 16);
  }
  *reinterpret_cast<uint4*>(smem_dst) = u;
#endif
}
PLLM_DEV void cp_async_commit() {
#if defined(PLLM_EMULATE)
  emu_rt::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
PLLM_DEV void cp_async_wait() {
#if defined(PLLM_EMULATE)
  emu_rt::cp_async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ---- tensor cores (sm_80+): d += A * B, mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.f32 -------------------
// Fragments as in the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type"), g = lane / 4,
// t = lane % 4: a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..] (two elements
// per 32-bit word, the lower index in the low half); b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g];
// d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][2t..2t+1]. Warp-collective: all 32 lanes, converged.
template <typename T>
PLLM_DEV void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(sizeof(T) == 2, "tensor-core mma takes float16 / bfloat16 inputs");
#if defined(PLLM_EMULATE)
  emu_rt::mma_m16n8k16(d, a, b, std::is_same<T, __nv_bfloat16>::value);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built for an architecture without mma.m16n8k16: the launcher never selects the tensor-core path there
#endif
}

// ---- warp reductions (the canonical xor butterfly; see lora_tiling.h) --------------------------------------------
// Reduce-scatter of 2^LOG2N values over the 32 lanes: returns the full sum of value
// lora::rs_value_index(lane, LOG2N). Every value is summed with the xor butterfly 16, 8, 4, 2, 1.
// Stage ST (offset 16 >> ST) halves the values (lanes with lora::rs_keep_upper(lane, ST) keep the upper half);
// written as a compile-time recursion so that every array index is a constant (the values stay in registers).
template <int N, int ST>
PLLM_DEV float reduce_scatter_stage(const float (&v)[N], int lane) {
  constexpr int OFF = 16 >> ST;
  if constexpr (N == 1) {
    float r = v[0];
#pragma unroll
    for (int off = OFF; off > 0; off >>= 1) r += shfl_xor(r, off);
    return r;
  } else {
    constexpr int HALF = N / 2;
    const bool upper = lora::rs_keep_upper(lane, ST);
    float w[HALF];
#pragma unroll
    for (int e = 0; e < HALF; ++e) {
      const float lo = v[e];
      const float hi = v[e + HALF];
      const float recv = shfl_xor(upper ? lo : hi, OFF);
      w[e] = (upper ? hi : lo) + recv;
    }
    return reduce_scatter_stage<HALF, ST + 1>(w, lane);
  }
}

template <int LOG2N>
PLLM_DEV float warp_reduce_scatter(const float (&v)[1 << LOG2N]) {
  static_assert(LOG2N >= 0 && LOG2N <= 5, "2^LOG2N values, at most 32");
  return reduce_scatter_stage<(1 << LOG2N), 0>(v, lane_id());
}

}  // namespace PLLM_KNS
}  // namespace pllm
