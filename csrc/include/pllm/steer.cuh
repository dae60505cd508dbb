// Per-token activation steering on raw pointers (no torch): steer_add, and steer_rmsnorm (steering fused with the
// RMSNorm that reads the steered residual next). Semantics: pllm_kernels/reference/steer.py (ActAdd / CAA additions,
// steering-vectors' ablation operators, repeng's norm-preserving addition; K slots per token applied in order).
//
// One block per token row (Liger-Kernel / vLLM RMSNorm layout): the row lives in registers as fp32, 16 values per
// thread, so hidden <= steer::kMaxHidden (16384, 1024 threads). The block has roundup32(ceil(H / 16)) threads and
// depends on H only. Element layout (the same for 16-byte and scalar loads, so both give the same bits): with
// VEC = 16 / sizeof(T) and NT threads, thread i holds the VEC-element chunks c = i + j * NT, j < 16 / VEC, i.e.
// elements c * VEC + q (q < VEC); elements >= H are held as 0 and never loaded or stored.
//
// Arithmetic (fp32, every multiply-add an explicit fmaf, so the device build and the CPU emulator give the same bits;
// no rsqrt approximation: 1 / sqrtf):
//   ADD            x <- fma(s, v, x)
//   ABLATE(_ADD)   c = (x.v) / (v.v) if v.v > 0;  x <- fma(-c, v, x)  [ABLATE_ADD: then x <- fma(s, v, x)]
//                  (= x - (x.u) u with u = v / |v|: one reduction round for both dot products)
//   NORM_PRESERVE  y = fma(s, v, x);  x <- y * (sqrt(x.x) / sqrt(y.y)) if y.y > 0 else y
//   other mode ids behave as ADD (as the Triton and torch backends do).
// Vector and weight chunks are streamed (ABLATE and NORM_PRESERVE read the vector twice, for the dot products and
// for the update, the second time from L1 / L2), so every variant fits the 64 registers of a 1024-thread block.
// Dot products: each thread's sequential FMA chain (j ascending, q ascending), the warp's xor butterfly (16, 8, 4, 2,
// 1: every lane ends with the same bits), then the warp sums added left to right by every thread. A fixed order
// that depends on H and the dtype only: a token's result never depends on the batch or on the other rows.
//
// A token whose K slots are all -1 (or >= num_slots) reads no vector and writes nothing to h: its row keeps its bits,
// and NaN / inf in vectors it does not use cannot reach it. A steered row is rounded to h's dtype once; the fused norm
// reads it as stored:
//   n = x * (1 / sqrtf(sum(x^2) / H + eps));  LLAMA: out = T(w * float(T(n)));  GEMMA: out = T(n * (1 + w)).
#pragma once

#include "pllm/kernel_prims.cuh"

namespace pllm {
namespace steer {

constexpr int kWarp = 32;
constexpr int kValsPerThread = 16;  // fp32 row values per thread (registers)
constexpr int kMaxThreads = 1024;
constexpr int kMaxHidden = kValsPerThread * kMaxThreads;  // 16384 (the Triton kernels' limit too)

enum Mode : int { kAdd = 0, kAblate = 1, kAblateAdd = 2, kNormPreserve = 3 };
enum Norm : int { kNormNone = 0, kNormLlama = 1, kNormGemma = 2 };

// Threads per block (one row per block) for hidden size H: 16 values per thread, whole warps.
PLLM_HD int64_t block_threads(int64_t H) {
  const int64_t need = (H + kValsPerThread - 1) / kValsPerThread;
  const int64_t t = (need + kWarp - 1) / kWarp * kWarp;
  return t < kWarp ? kWarp : t;
}

}  // namespace steer

namespace PLLM_KNS {

// Parameters (by value). Element strides; the innermost strides of h, out and vectors are 1; weight, slot_modes,
// token_slots (T, K) and token_scales (T, K) are contiguous.
struct SteerParams {
  void* h;                 // (T, H) activations, steered in place
  void* out;               // (T, H) RMSNorm output (NORM kernels)
  const void* w;           // (H,) norm weight (NORM kernels)
  const void* vec;         // (L, H) steering vectors
  const int32_t* modes;    // (L,)
  const int32_t* slots;    // (T, K)
  const float* scales;     // (T, K)
  int T, H, L, K;
  int64_t sht, svl, sot;   // row strides of h, vectors, out
  float eps;
  int norm;                // steer::Norm
};

// ---- row I/O ------------------------------------------------------------------------------------------------------
// 16-byte load / store of data this kernel also writes (h): plain global accesses, not the read-only path.
PLLM_DEV uint4 ld16_rw(const void* p) {
#if defined(PLLM_EMULATE)
  uint4 u;
  std::memcpy(&u, p, 16);
  return u;
#else
  return *reinterpret_cast<const uint4*>(p);
#endif
}

PLLM_DEV void st16(void* p, const uint4& u) {
#if defined(PLLM_EMULATE)
  std::memcpy(p, &u, 16);
#else
  *reinterpret_cast<uint4*>(p) = u;
#endif
}

// N consecutive elements of type E (N * sizeof(E) a multiple of 16, 16-byte aligned) as floats, read-only data.
template <typename E, int N>
PLLM_DEV void ld_vals16(const E* p, float* f) {
  constexpr int PER = 16 / sizeof(E);
  static_assert(N % PER == 0, "whole 16-byte vectors");
#pragma unroll
  for (int b = 0; b < N / PER; ++b) unpack16<E>(ld16(p + b * PER), f + b * PER);
}

// One chunk of this thread's row values (layout above): elements [e0, e0 + VEC) of `row` (type E) as floats, 0 beyond
// H. RW: the row is written by this kernel (h): plain loads; else the read-only path.
template <typename E, int VEC, bool VEC_OK, bool RW>
PLLM_DEV void load_chunk(const E* row, int H, int e0, float (&f)[VEC]) {
  if (VEC_OK) {
    // H % VEC == 0 and 16-byte aligned rows: a chunk is entirely inside or outside [0, H)
    if (e0 < H) {
      if (RW && sizeof(E) * VEC == 16) {
        unpack16<E>(ld16_rw(row + e0), f);
      } else {
        ld_vals16<E, VEC>(row + e0, f);
      }
    } else {
#pragma unroll
      for (int q = 0; q < VEC; ++q) f[q] = 0.0f;
    }
  } else {
#pragma unroll
    if (e0 + VEC <= H) {
#pragma unroll
      for (int q = 0; q < VEC; ++q) f[q] = to_float<E>(row[e0 + q]);
    } else {
#pragma unroll
      for (int q = 0; q < VEC; ++q) f[q] = (e0 + q < H) ? to_float<E>(row[e0 + q]) : 0.0f;
    }
  }
}

// Store this thread's values of a row of type T (rounded once), elements < H only.
template <typename T, int VEC, int CH, bool VEC_OK>
PLLM_DEV void store_row(T* row, int H, int i0, int nt, const float (&f)[CH][VEC]) {
#pragma unroll
  for (int j = 0; j < CH; ++j) {
    const int e0 = (i0 + j * nt) * VEC;
    if (VEC_OK) {
      if (e0 < H) {
        T e[VEC];
#pragma unroll
        for (int q = 0; q < VEC; ++q) e[q] = from_float<T>(f[j][q]);
        uint4 u;
        std::memcpy(&u, static_cast<const void*>(e), 16);
        st16(row + e0, u);
      }
    } else {
#pragma unroll
      for (int q = 0; q < VEC; ++q) {
        if (e0 + q < H) row[e0 + q] = from_float<T>(f[j][q]);
      }
    }
  }
}

// ---- block reduction ----------------------------------------------------------------------------------------------
// Sums N values over the block in the canonical order (see the header comment); every thread gets the same bits.
// `red` holds 2 buffers of N * 32 floats; consecutive calls alternate buffers (`parity`), so a buffer is rewritten
// only after the barrier of the next call, when every thread has read it.
template <int N>
PLLM_DEV void block_sum(float (&v)[N], float* red, int parity) {
#pragma unroll
  for (int n = 0; n < N; ++n) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[n] += shfl_xor(v[n], off);
  }
  float* buf = red + parity * (N * steer::kWarp);
  const int w = warp_id();
  if (lane_id() == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) buf[n * steer::kWarp + w] = v[n];
  }
  sync_block();
  const int nw = num_warps();
#pragma unroll
  for (int n = 0; n < N; ++n) {
    float s = buf[n * steer::kWarp];
    for (int i = 1; i < nw; ++i) s += buf[n * steer::kWarp + i];
    v[n] = s;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The kernel: grid (T,), block (steer::block_threads(H),). T: activation dtype (h, out); V: vectors' dtype (T or
// float); W: norm weight's dtype (T or float; unused without NORM); VEC_OK: 16-byte loads / stores (every row
// 16-byte aligned, H % VEC == 0), else scalar accesses with the same element layout.
// ---------------------------------------------------------------------------------------------------------------
template <typename T, typename V, typename W, bool VEC_OK, bool NORM>
PLLM_KERNEL(steer::kMaxThreads) steer_kernel(const SteerParams p) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int CH = steer::kValsPerThread / VEC;
  static_assert(sizeof(V) >= sizeof(T) && sizeof(W) >= sizeof(T), "vectors / weight: T or float");
  PLLM_SMEM float red[2 * 2 * steer::kWarp];

  const int t = bid_x();
  const int i0 = tid();
  const int nt = nthreads();
  const int H = p.H;
  T* hrow = static_cast<T*>(p.h) + static_cast<int64_t>(t) * p.sht;

  // The row in registers; vector and weight chunks are loaded where they are used.
  float x[CH][VEC];
#pragma unroll
  for (int j = 0; j < CH; ++j) load_chunk<T, VEC, VEC_OK, true>(hrow, H, (i0 + j * nt) * VEC, x[j]);

  int parity = 0;
  bool touched = false;
  for (int k = 0; k < p.K; ++k) {
    const int64_t tk = static_cast<int64_t>(t) * p.K + k;
    const int slot = p.slots[tk];
    if (slot < 0 || slot >= p.L) continue;  // no entry: the vector is never read (block-uniform branch)
    touched = true;
    const int mode = p.modes[slot];
    const float s = p.scales[tk];
    const V* vrow = static_cast<const V*>(p.vec) + static_cast<int64_t>(slot) * p.svl;
    if (mode == steer::kAblate || mode == steer::kAblateAdd || mode == steer::kNormPreserve) {
      const bool np = mode == steer::kNormPreserve;
      // pass 1: ablate: (x.v, v.v); norm-preserve: (x.x, y.y) with y = fma(s, v, x)
      float d[2] = {0.0f, 0.0f};
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        float v[VEC];
        load_chunk<V, VEC, VEC_OK, false>(vrow, H, (i0 + j * nt) * VEC, v);
#pragma unroll
        for (int q = 0; q < VEC; ++q) {
          if (np) {
            const float y = fmaf(s, v[q], x[j][q]);
            d[0] = fmaf(x[j][q], x[j][q], d[0]);
            d[1] = fmaf(y, y, d[1]);
          } else {
            d[0] = fmaf(x[j][q], v[q], d[0]);
            d[1] = fmaf(v[q], v[q], d[1]);
          }
        }
      }
      block_sum<2>(d, red, parity);
      parity ^= 1;
      // pass 2: the update
      const bool nz = d[1] > 0.0f;
      const float c = np ? (nz ? sqrtf(d[0]) / sqrtf(d[1]) : 1.0f) : (nz ? d[0] / d[1] : 0.0f);
      const float sa = mode == steer::kAblateAdd ? s : 0.0f;
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        float v[VEC];
        load_chunk<V, VEC, VEC_OK, false>(vrow, H, (i0 + j * nt) * VEC, v);
#pragma unroll
        for (int q = 0; q < VEC; ++q) {
          if (np) {
            const float y = fmaf(s, v[q], x[j][q]);
            x[j][q] = nz ? y * c : y;
          } else {
            float r = nz ? fmaf(-c, v[q], x[j][q]) : x[j][q];
            if (mode == steer::kAblateAdd) r = fmaf(sa, v[q], r);
            x[j][q] = r;
          }
        }
      }
    } else {  // ADD (and unknown mode ids)
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        float v[VEC];
        load_chunk<V, VEC, VEC_OK, false>(vrow, H, (i0 + j * nt) * VEC, v);
#pragma unroll
        for (int q = 0; q < VEC; ++q) x[j][q] = fmaf(s, v[q], x[j][q]);
      }
    }
  }

  if (touched) {
    store_row<T, VEC, CH, VEC_OK>(hrow, H, i0, nt, x);
    if (NORM) {  // the norm reads the steered state as stored (rounded to T)
#pragma unroll
      for (int j = 0; j < CH; ++j) {
#pragma unroll
        for (int q = 0; q < VEC; ++q) x[j][q] = to_float<T>(from_float<T>(x[j][q]));
      }
    }
  }

  if (NORM) {
    float d[1] = {0.0f};
#pragma unroll
    for (int j = 0; j < CH; ++j) {
#pragma unroll
      for (int q = 0; q < VEC; ++q) d[0] = fmaf(x[j][q], x[j][q], d[0]);
    }
    block_sum<1>(d, red, parity);
    const float inv = 1.0f / sqrtf(d[0] / static_cast<float>(H) + p.eps);
    const bool gemma = p.norm == steer::kNormGemma;
    const W* wrow = static_cast<const W*>(p.w);
#pragma unroll
    for (int j = 0; j < CH; ++j) {
      float wv[VEC];
      load_chunk<W, VEC, VEC_OK, false>(wrow, H, (i0 + j * nt) * VEC, wv);
#pragma unroll
      for (int q = 0; q < VEC; ++q) {
        const float n = x[j][q] * inv;
        x[j][q] = gemma ? n * (1.0f + wv[q]) : wv[q] * to_float<T>(from_float<T>(n));
      }
    }
    store_row<T, VEC, CH, VEC_OK>(static_cast<T*>(p.out) + static_cast<int64_t>(t) * p.sot, H, i0, nt, x);
  }
}

}  // namespace PLLM_KNS
}  // namespace pllm
