// Per-row sorting-free sampler on raw pointers (no torch): sample_tokens. Semantics: pllm_kernels/reference/decoding.py
// (sample_ref / uniform_ref); algorithm: the Triton kernel's (pllm_kernels/triton/decoding.py, _sample_kernel):
//
//   temperature 0: greedy (argmax, lowest index on ties); else top-k, then top-p over the renormalised top-k set,
//   then min-p, then a Gumbel-max draw  argmax_{v in K} (w_v - W) / T + g(seed, step, v)  (ties: lowest index),
//   g = -log(-log u) with the spec's counter-based uniform (lowbias32, 24 bits). Returned: the token and
//   w_tok - lse(w) (the row's own log-softmax, before temperature and filters).
//
// One block per row, kSampleThreads threads; thread i reads the elements i, i + kSampleThreads, ... (scalar loads of
// fp32 / fp16 / bf16, fp32 arithmetic: every score is exact in float32, as in the Triton kernel). Every kept set of
// the spec is a prefix of the (score descending, index ascending) order, described by a threshold (t, cut): the
// tokens whose order-preserving int32 key is > t, plus those whose key equals t and whose index is <= cut. Passes:
//   1. W = max w, the lowest index holding it (greedy);
//   2. s1 = sum exp(w - W) (log-prob), sT = sum exp((w - W) / T) (the mass q up to a common factor);
//   3. top-k: bisection on the key with counting passes (early exit when the set key >= mid is exactly k tokens);
//      top-p: bisection with mass passes inside the top-k set (early exit when the set is the smallest prefix);
//      a boundary inside a group of equal scores: bisection on the token index (counting passes);
//   4. Gumbel-max over the kept set (min-p: exp((w - W) / T) >= min_p).
// Reductions: per-thread sequences in index order, then pllm::block_reduce (xor butterfly, warps left to right);
// counts and indices travel as floats (exact: V <= 2^24). exp / log are pllm/fmath.cuh's and divisions are rounded
// divisions, so the CPU emulator (sample_emu.cpp) has the device's bits; a row's result never depends on the batch.
#pragma once

#include "pllm/decoding.cuh"

namespace pllm {
namespace smp {

constexpr int kSampleThreads = 512;     // threads per row (block)
constexpr int64_t kMaxVocab = 1 << 24;  // counts and indices are exact in float32
constexpr int kKeyNegInf = -2139095041; // key(-inf): below every other float's key
constexpr int kKeyPosInf = 2139095040;  // key(+inf)

}  // namespace smp

namespace PLLM_KNS {

struct SampleParams {
  int64_t* tokens;             // (B,)
  float* logprobs;             // (B,)
  const void* scores;          // (B, V), unit stride along V
  const float* temperature;    // (B,)
  const int32_t* top_k;        // (B,)
  const float* top_p;          // (B,)
  const float* min_p;          // (B,)
  const int64_t* seed;         // (B,)
  const int64_t* step;         // (B,)
  int B, V;
  int64_t s_b;                 // row stride of scores (elements)
};

PLLM_DEV float div_rn(float a, float b) {
#if defined(PLLM_EMULATE)
  return a / b;
#else
  return __fdiv_rn(a, b);
#endif
}

PLLM_DEV uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The per-row part of uniform_ref: hash(hash(seed_lo ^ C) ^ seed_hi ^ step_lo).
PLLM_DEV uint32_t row_hash(int64_t seed, int64_t step) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint32_t h = lowbias32(static_cast<uint32_t>(s) ^ 0x9E3779B9u);
  return lowbias32(h ^ static_cast<uint32_t>(s >> 32) ^ static_cast<uint32_t>(static_cast<uint64_t>(step)));
}

// g = -log(-log u), u = ((hash(h_row ^ v) >> 8) + 0.5) / 2^24. -log u from u itself for u < 1/2 (exact), else
// -log1p(-(1 - u)) with 1 - u exact (Goldberg's log1p), so the large Gumbel values keep full precision.
PLLM_DEV float gumbel(uint32_t h_row, int v) {
  const int top = static_cast<int>(lowbias32(h_row ^ static_cast<uint32_t>(v)) >> 8);
  const float inv24 = 1.0f / 16777216.0f;
  if (top < 8388608) {
    const float u = mul_rn(add_rn(static_cast<float>(top), 0.5f), inv24);
    return -log_det(-log_det(u));
  }
  const float x = mul_rn(add_rn(static_cast<float>(16777216 - top), -0.5f), inv24);
  const float y = add_rn(1.0f, -x);
  const float nlu = y == 1.0f ? x : div_rn(mul_rn(log_det(y), x), add_rn(y, -1.0f));
  return -log_det(nlu);
}

// Order-preserving int32 key of a float (-0.0 keyed as +0.0) and its inverse.
PLLM_DEV int fkey(float w) {
  if (w == 0.0f) return 0;
  const int bits = static_cast<int>(float_to_bits(w));
  return bits ^ ((bits >> 31) & 0x7FFFFFFF);
}

PLLM_DEV float unkey(int key) { return bits_to_float(static_cast<uint32_t>(key ^ ((key >> 31) & 0x7FFFFFFF))); }

template <typename T>
PLLM_DEV float load_w(const T* row, int v) {
  return to_float<T>(row[v]);
}

// Block-wide min of a non-negative integer-valued float (the lowest index among candidates).
PLLM_DEV float block_min_idx(float v, float* red, int& parity) {
  const float r = -block_reduce<true>(-v, red, parity);
  parity ^= 1;
  return r;
}

PLLM_DEV float block_max(float v, float* red, int& parity) {
  const float r = block_reduce<true>(v, red, parity);
  parity ^= 1;
  return r;
}

PLLM_DEV float block_sum(float v, float* red, int& parity) {
  const float r = block_reduce<false>(v, red, parity);
  parity ^= 1;
  return r;
}

// Smallest index i with #{v <= i : key_v == t} >= need (bisection on the index, counting passes).
template <typename T>
PLLM_DEV int index_cut(const T* row, int V, int t, int need, float* red, int& parity) {
  int lo = 0;
  int hi = V - 1;
  while (lo < hi) {  // block-uniform
    const int mid = lo + (hi - lo) / 2;
    float cnt = 0.0f;
    for (int v = tid(); v <= mid; v += nthreads()) cnt = add_rn(cnt, fkey(load_w<T>(row, v)) == t ? 1.0f : 0.0f);
    cnt = block_sum(cnt, red, parity);
    if (cnt >= static_cast<float>(need)) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// A prefix (t, cut) of the (score desc, index asc) order: key > t, plus key == t and index <= cut; its size and mass.
struct Prefix {
  int t;
  int cut;
  float count;
  float mass;
};

// The prefix holding `target` tokens (count mode) or the smallest one with mass >= target (MASS), inside the prefix
// `in` (the search only looks at keys above in.t, so every set key >= mid lies inside it).
template <typename T, bool MASS>
PLLM_DEV Prefix search_prefix(const T* row, int V, float target, const Prefix in, float W, float inv_t, float* red,
                              int& parity) {
  int64_t lo = in.t;
  int64_t hi = smp::kKeyPosInf;
  float cnt_lo = in.count, mass_lo = in.mass;
  float cnt_hi = 0.0f, mass_hi = 0.0f;  // the set key >= hi + 1 (initially empty)
  bool exact = false;
  while (lo < hi) {  // block-uniform
    const int mid = static_cast<int>(lo + (hi - lo + 1) / 2);
    float cnt = 0.0f, mass = 0.0f, wmin = INFINITY;
    for (int v = tid(); v < V; v += nthreads()) {
      const float w = load_w<T>(row, v);
      if (fkey(w) >= mid) {
        cnt = add_rn(cnt, 1.0f);
        mass = add_rn(mass, exp_det(mul_rn(add_rn(w, -W), inv_t)));
        if (MASS) wmin = fminf(wmin, w);
      }
    }
    cnt = block_sum(cnt, red, parity);
    mass = block_sum(mass, red, parity);
    bool ok, ex;
    if (MASS) {
      wmin = -block_max(-wmin, red, parity);
      ok = mass >= target;
      // exact: dropping the last member (a token of the smallest score) falls below the target
      ex = ok && add_rn(mass, -exp_det(mul_rn(add_rn(wmin, -W), inv_t))) < target;
    } else {
      ok = cnt >= target;
      ex = cnt == target;
    }
    if (ex) {
      lo = hi = mid;
      exact = true;
      cnt_lo = cnt;
      mass_lo = mass;
    } else if (ok) {
      lo = mid;
      cnt_lo = cnt;
      mass_lo = mass;
    } else {
      hi = mid - 1;
      cnt_hi = cnt;
      mass_hi = mass;
    }
  }
  Prefix out;
  out.t = static_cast<int>(lo);
  out.cut = lo == in.t ? in.cut : V;  // the group at in.t is the one the enclosing prefix may cut
  out.count = cnt_lo;
  out.mass = mass_lo;
  if (!exact) {
    // key >= t holds enough, key > t not: the boundary is inside the group of tokens with key t
    const float n_eq = add_rn(cnt_lo, -cnt_hi);
    const float e_t = exp_det(mul_rn(add_rn(unkey(out.t), -W), inv_t));
    float need;
    if (MASS) {
      need = e_t > 0.0f ? ceilf(div_rn(add_rn(target, -mass_hi), e_t)) : n_eq;
      need = fminf(fmaxf(need, 1.0f), n_eq);
    } else {
      need = add_rn(target, -cnt_hi);
    }
    if (need < n_eq && out.t != smp::kKeyNegInf) {
      out.cut = index_cut<T>(row, V, out.t, static_cast<int>(need), red, parity);
    }
    out.count = add_rn(cnt_hi, need);
    out.mass = fmaf(need, e_t, mass_hi);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// sample_tokens: grid (B,), block (kSampleThreads,). T: the scores' dtype.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
PLLM_KERNEL(smp::kSampleThreads) sample_tokens_kernel(const SampleParams p) {
  PLLM_SMEM float red[2 * dec::kWarp];
  const int b = bid_x();
  const int V = p.V;
  const int i0 = tid();
  const int nt = nthreads();
  const T* row = static_cast<const T*>(p.scores) + static_cast<int64_t>(b) * p.s_b;
  int parity = 0;

  // pass 1: the maximum and the lowest index holding it
  float mx = -INFINITY;
  int arg = V;
  for (int v = i0; v < V; v += nt) {
    const float w = load_w<T>(row, v);
    if (w > mx) {
      mx = w;
      arg = v;
    }
  }
  const float W0 = block_max(mx, red, parity);
  const float argf = block_min_idx(mx == W0 ? static_cast<float>(arg) : static_cast<float>(V), red, parity);
  const float W = W0 > -INFINITY ? W0 : 0.0f;  // a row without finite scores (refused by the ops) stays defined

  const float T_ = p.temperature[b];
  const bool greedy = !(T_ > 0.0f);
  const float inv_t = greedy ? 1.0f : div_rn(1.0f, T_);

  // pass 2: sum exp(w - W) (log-prob) and the mass sum exp((w - W) / T)
  float s1 = 0.0f, sT = 0.0f;
  for (int v = i0; v < V; v += nt) {
    const float d = add_rn(load_w<T>(row, v), -W);
    s1 = add_rn(s1, exp_det(d));
    if (!greedy) sT = add_rn(sT, exp_det(mul_rn(d, inv_t)));
  }
  s1 = block_sum(s1, red, parity);
  const float lse = add_rn(W, log_det(s1));

  int tok = static_cast<int>(argf);
  if (!greedy) {
    const int k = p.top_k[b];
    const float tp = p.top_p[b];
    const float mp = p.min_p[b];
    sT = block_sum(sT, red, parity);
    Prefix keep{smp::kKeyNegInf, V, static_cast<float>(V), sT};  // everything
    if (k > 0 && k < V) {
      keep = search_prefix<T, false>(row, V, static_cast<float>(k), keep, W, inv_t, red, parity);
    }
    if (tp < 1.0f && keep.count > 1.0f) {
      keep = search_prefix<T, true>(row, V, mul_rn(tp, keep.mass), keep, W, inv_t, red, parity);
    }
    // Gumbel-max over the kept set (min-p on the way)
    const uint32_t h_row = row_hash(p.seed[b], p.step[b]);
    float best = -INFINITY;
    int bi = V;
    for (int v = i0; v < V; v += nt) {
      const float w = load_w<T>(row, v);
      const int key = fkey(w);
      if (!(w > -INFINITY) || key < keep.t || (key == keep.t && v > keep.cut)) continue;
      const float d = mul_rn(add_rn(w, -W), inv_t);
      if (mp > 0.0f && !(exp_det(d) >= mp)) continue;
      const float g = add_rn(d, gumbel(h_row, v));
      if (g > best) {
        best = g;
        bi = v;
      }
    }
    const float G = block_max(best, red, parity);
    tok = static_cast<int>(block_min_idx(best == G ? static_cast<float>(bi) : static_cast<float>(V), red, parity));
  }
  if (i0 == 0) {
    if (tok >= V) tok = 0;  // no candidate (a row without finite scores)
    p.tokens[b] = tok;
    p.logprobs[b] = add_rn(load_w<T>(row, tok), -lse);
  }
}

}  // namespace PLLM_KNS
}  // namespace pllm
