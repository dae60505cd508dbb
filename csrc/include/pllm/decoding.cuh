// Personalized decoding kernels on raw pointers (no torch): mixing log-prob sources (Context Steering / CFG / CoSteer /
// AMULET / GenARM, MOD's reverse-KL case). Semantics: pllm_kernels/reference/decoding.py:
//
//   out[b] = log_softmax( sum_i coefs[b, i] * log_softmax(sources[i, b]) )      sources (S, B, V), coefs (B, S)
//
// Sources with coefficient 0 are not read; a token that a source with a non-zero coefficient rules out (-inf) is -inf.
//
// One block per row (as the Triton kernel: one program per row), kMixThreads threads streaming the vocabulary in
// chunks of VEC = 16 / sizeof(T) elements (chunk c of the row is handled by thread c % kMixThreads), three passes:
//   1. per source i with c_i != 0: m_i = max_v x_iv (0 if the row is all -inf);
//   2. w_v = sum_i c_i (x_iv - m_i) (-inf if ruled out) -- log_softmax(sum_i c_i log_softmax(x_i)) equals
//      log_softmax(sum_i c_i (x_i - m_i)) for any per-source constants, and the maxima keep the likely tokens' terms
//      small (precise) for large contrast coefficients; an online (max, sum of exp) per thread, then W = max over
//      the block and lse = W + log(sum_t s_t exp(M_t - W));
//   3. out_v = w_v - lse (w recomputed exactly as in pass 2).
// Passes 2 and 3 re-read the sources from L2 / L1. Every multiply-add is an explicit fmaf, products feeding a sum are
// rounded on their own (mul_rn), exp / log are pllm/fmath.cuh's: the device and the CPU emulator give the same bits.
// Reductions (max: any order; sums: per-thread sequence, xor butterfly, warps left to right) depend on V and the dtype
// only: a row's result never depends on the batch. fp32 / fp16 / bf16 sources (16-byte loads when every row is
// 16-byte aligned and V % VEC == 0, else scalar loads of the same elements), fp32 arithmetic and output.
#pragma once

#include "pllm/fmath.cuh"

namespace pllm {
namespace dec {

constexpr int kWarp = 32;
constexpr int kMixThreads = 512;     // threads per row (block)
constexpr int kMaxSources = 64;      // sources per call (coefficients and maxima live in shared memory)

}  // namespace dec

namespace PLLM_KNS {

// Element strides; the innermost strides of sources and out are 1; coefs is (B, S) with any strides.
struct MixParams {
  float* out;            // (B, V) float32
  const void* src;       // (S, B, V)
  const float* coefs;    // (B, S)
  int S, B, V;
  int64_t s_src_s, s_src_b, s_coef_b, s_coef_s, s_out_b;
};

// Block-wide max (MAX) or sum of one value per thread, in the canonical order (xor butterfly, then the warp results
// left to right); every thread gets the same bits. `red` holds 2 x 32 floats, consecutive calls alternate `parity`.
template <bool MAX>
PLLM_DEV float block_reduce(float v, float* red, int parity) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = shfl_xor(v, off);
    v = MAX ? fmaxf(v, o) : add_rn(v, o);
  }
  float* buf = red + parity * dec::kWarp;
  if (lane_id() == 0) buf[warp_id()] = v;
  sync_block();
  const int nw = num_warps();
  float s = buf[0];
  for (int w = 1; w < nw; ++w) s = MAX ? fmaxf(s, buf[w]) : add_rn(s, buf[w]);
  return s;
}

// The VEC elements [e0, e0 + VEC) of a row as floats: 16-byte loads (VEC_OK: the chunk is entirely inside [0, V)), or
// scalar loads of the elements < V (the others -inf).
template <typename T, int VEC, bool VEC_OK>
PLLM_DEV void load_src_chunk(const T* row, int64_t e0, int V, float (&x)[VEC]) {
  if (VEC_OK) {
    unpack16<T>(ld16(row + e0), x);
  } else {
#pragma unroll
    for (int q = 0; q < VEC; ++q) x[q] = e0 + q < V ? to_float<T>(row[e0 + q]) : -INFINITY;
  }
}

// w of the chunk at e0 (pass 2 / 3): sum over the sources with c != 0 of c (x - m), -inf where such a source is -inf.
template <typename T, int VEC, bool VEC_OK>
PLLM_DEV void mix_chunk(const T* row0, int64_t s_src_s, const float* cs, const float* ms, int S, int64_t e0, int V,
                        float (&w)[VEC]) {
  bool ruled[VEC];
#pragma unroll
  for (int q = 0; q < VEC; ++q) {
    w[q] = 0.0f;
    ruled[q] = false;
  }
  for (int i = 0; i < S; ++i) {
    const float c = cs[i];
    if (c == 0.0f) continue;
    const float m = ms[i];
    float x[VEC];
    load_src_chunk<T, VEC, VEC_OK>(row0 + i * s_src_s, e0, V, x);
#pragma unroll
    for (int q = 0; q < VEC; ++q) {
      ruled[q] = ruled[q] || x[q] == -INFINITY;
      w[q] = fmaf(c, add_rn(x[q], -m), w[q]);
    }
  }
#pragma unroll
  for (int q = 0; q < VEC; ++q) {
    if (ruled[q] || e0 + q >= V) w[q] = -INFINITY;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// mix_logprobs: grid (B,), block (kMixThreads,). T: the sources' dtype.
// ---------------------------------------------------------------------------------------------------------------
template <typename T, bool VEC_OK>
PLLM_KERNEL(dec::kMixThreads) mix_logprobs_kernel(const MixParams p) {
  constexpr int VEC = 16 / sizeof(T);
  PLLM_SMEM float cs[dec::kMaxSources];
  PLLM_SMEM float ms[dec::kMaxSources];
  PLLM_SMEM float red[2 * dec::kWarp];

  const int b = bid_x();
  const int i0 = tid();
  const int64_t step = static_cast<int64_t>(nthreads()) * VEC;
  const int V = p.V;
  const int S = p.S;
  const T* row0 = static_cast<const T*>(p.src) + static_cast<int64_t>(b) * p.s_src_b;
  if (i0 < S) cs[i0] = p.coefs[static_cast<int64_t>(b) * p.s_coef_b + static_cast<int64_t>(i0) * p.s_coef_s];
  sync_block();

  // pass 1: the maxima of the sources that count
  int parity = 0;
  for (int i = 0; i < S; ++i) {
    if (cs[i] == 0.0f) continue;  // block-uniform
    const T* row = row0 + i * p.s_src_s;
    float mx = -INFINITY;
    for (int64_t e0 = static_cast<int64_t>(i0) * VEC; e0 < V; e0 += step) {
      float x[VEC];
      load_src_chunk<T, VEC, VEC_OK>(row, e0, V, x);
#pragma unroll
      for (int q = 0; q < VEC; ++q) mx = fmaxf(mx, x[q]);
    }
    mx = block_reduce<true>(mx, red, parity);
    parity ^= 1;
    if (i0 == 0) ms[i] = mx > -INFINITY ? mx : 0.0f;
  }
  sync_block();

  // pass 2: online (max, sum of exp) of w per thread, then the block's log-sum-exp
  float M = -INFINITY;
  float sum = 0.0f;
  for (int64_t e0 = static_cast<int64_t>(i0) * VEC; e0 < V; e0 += step) {
    float w[VEC];
    mix_chunk<T, VEC, VEC_OK>(row0, p.s_src_s, cs, ms, S, e0, V, w);
#pragma unroll
    for (int q = 0; q < VEC; ++q) {
      if (w[q] > M) {
        sum = fmaf(sum, exp_det(add_rn(M, -w[q])), 1.0f);
        M = w[q];
      } else if (w[q] > -INFINITY) {
        sum = add_rn(sum, exp_det(add_rn(w[q], -M)));
      }
    }
  }
  const float W = block_reduce<true>(M, red, parity);
  parity ^= 1;
  const float mine = M > -INFINITY ? mul_rn(sum, exp_det(add_rn(M, -W))) : 0.0f;
  const float total = block_reduce<false>(mine, red, parity);
  const float lse = add_rn(W, log_det(total));

  // pass 3: out = w - lse
  float* out_row = p.out + static_cast<int64_t>(b) * p.s_out_b;
  for (int64_t e0 = static_cast<int64_t>(i0) * VEC; e0 < V; e0 += step) {
    float w[VEC];
    mix_chunk<T, VEC, VEC_OK>(row0, p.s_src_s, cs, ms, S, e0, V, w);
#pragma unroll
    for (int q = 0; q < VEC; ++q) w[q] = add_rn(w[q], -lse);
    if (VEC_OK) {
#pragma unroll
      for (int k = 0; k < VEC / 4; ++k) {
        uint4 u;
        std::memcpy(&u, static_cast<const void*>(w + 4 * k), 16);
#if defined(PLLM_EMULATE)
        std::memcpy(out_row + e0 + 4 * k, &u, 16);
#else
        *reinterpret_cast<uint4*>(out_row + e0 + 4 * k) = u;
#endif
      }
    } else {
#pragma unroll
      for (int q = 0; q < VEC; ++q) {
        if (e0 + q < V) out_row[e0 + q] = w[q];
      }
    }
  }
}

}  // namespace PLLM_KNS
}  // namespace pllm
