// Per-row token-level reward guidance on raw pointers (no torch): reward_guided. Semantics:
// pllm_kernels/reference/decoding.py (reward_guided_ref); algorithm: the Triton kernel's
// (pllm_kernels/triton/decoding.py, _reward_kernel):
//
//   out[b] = log_softmax_C( log_softmax(x) + beta[b] * r )   over the candidates C, exactly -inf elsewhere,
//   C = the first top_k[b] tokens of x = logits[b] in (logit descending, index ascending) order (every token when
//   top_k[b] is 0 or >= V). log_softmax is shift-invariant, so log_softmax(x) is replaced by x - M (M = max x).
//
// One block per row, kRewardThreads threads; thread i reads the elements i, i + kRewardThreads, ... (scalar loads of
// fp32 / fp16 / bf16 logits, float32 rewards; fp32 arithmetic). Passes:
//   0. candidates (top_k in 1..V-1): the sampler's count bisection on the order-preserving int32 keys of x, early
//      exit, + an index bisection when the k-th logit is tied (pllm/sample.cuh search_prefix): a prefix (t, cut);
//   1. M = max x;  2. G = max g over C, g = (x - M) + beta r;  3. s = sum_C exp(g - G);  4. out = g - (G + log s).
// Reductions: per-thread sequences in index order, then pllm::block_reduce (fixed order); exp / log are
// pllm/fmath.cuh's, products / sums rounded on their own, so the CPU emulator (reward_emu.cpp) has the device's bits;
// a row's result never depends on the batch. The row loops are not unrolled (#pragma unroll 1): unrolled, ptxas
// spilled the float32 variant on sm_80 (a 16-byte stack frame at 40 registers).
#pragma once

#include "pllm/sample.cuh"

namespace pllm {
namespace rwd {

constexpr int kRewardThreads = 512;     // threads per row (block)
constexpr int64_t kMaxVocab = 1 << 24;  // counts and indices are exact in float32

}  // namespace rwd

namespace PLLM_KNS {

struct RewardParams {
  float* out;                  // (B, V) float32, unit stride along V
  const void* logits;          // (B, V), unit stride along V
  const void* cand;            // (B, V), unit stride along V: the logits the candidates come from (SEP kernels only)
  const float* reward;         // (B, V) float32, unit stride along V
  const float* beta;           // (B,)
  const int32_t* top_k;        // (B,)
  int B, V;
  int64_t s_x, s_r, s_o;       // row strides (elements)
  int64_t s_c;                 // row stride of cand
};

// ---------------------------------------------------------------------------------------------------------------
// reward_guided: grid (B,), block (kRewardThreads,). T: the logits' dtype. SEP: the candidates are the first top_k
// tokens of another row, `cand` (dtype C), while the values are the logits' (fused_sample: guidance on the mixed
// log-probs, candidates from the base logits); without SEP, C = T and the logits are the candidates' source.
// ---------------------------------------------------------------------------------------------------------------
template <typename T, typename C = T, bool SEP = false>
PLLM_KERNEL(rwd::kRewardThreads) reward_guided_kernel(const RewardParams p) {
  static_assert(SEP || std::is_same<T, C>::value, "without a separate candidate row, C is the logits' dtype");
  PLLM_SMEM float red[2 * dec::kWarp];
  const int b = bid_x();
  const int V = p.V;
  const int i0 = tid();
  const int nt = nthreads();
  const T* row = static_cast<const T*>(p.logits) + static_cast<int64_t>(b) * p.s_x;
  const float* rrow = p.reward + static_cast<int64_t>(b) * p.s_r;
  float* orow = p.out + static_cast<int64_t>(b) * p.s_o;
  const C* crow = SEP ? static_cast<const C*>(p.cand) + static_cast<int64_t>(b) * p.s_c
                      : reinterpret_cast<const C*>(row);
  int parity = 0;
  const float beta = p.beta[b];
  const int k = p.top_k[b];

  // pass 0: the candidates, a prefix (t, cut) of the (logit desc, index asc) order; everything when k is 0 or >= V
  Prefix cand{smp::kKeyNegInf, V, static_cast<float>(V), 0.0f};
  if (k > 0 && k < V) {
    cand = search_prefix<C, false>(crow, V, static_cast<float>(k), cand, 0.0f, 1.0f, red, parity);
  }
  const int ct = cand.t;
  const int ccut = cand.cut;

  // pass 1: M = max x
  float mx = -INFINITY;
#pragma unroll 1
  for (int v = i0; v < V; v += nt) mx = fmaxf(mx, load_w<T>(row, v));
  const float M0 = block_max(mx, red, parity);
  const float M = M0 > -INFINITY ? M0 : 0.0f;

  // pass 2: G = max over C of g = (x - M) + beta r
  float gm = -INFINITY;
#pragma unroll 1
  for (int v = i0; v < V; v += nt) {
    const float x = load_w<T>(row, v);
    const int key = SEP ? fkey(load_w<C>(crow, v)) : fkey(x);
    if (key > ct || (key == ct && v <= ccut)) gm = fmaxf(gm, add_rn(add_rn(x, -M), mul_rn(beta, rrow[v])));
  }
  const float G0 = block_max(gm, red, parity);
  const float G = G0 > -INFINITY ? G0 : 0.0f;

  // pass 3: s = sum over C of exp(g - G)
  float s = 0.0f;
#pragma unroll 1
  for (int v = i0; v < V; v += nt) {
    const float x = load_w<T>(row, v);
    const int key = SEP ? fkey(load_w<C>(crow, v)) : fkey(x);
    if (key > ct || (key == ct && v <= ccut)) {
      s = add_rn(s, exp_det(add_rn(add_rn(add_rn(x, -M), mul_rn(beta, rrow[v])), -G)));
    }
  }
  s = block_sum(s, red, parity);
  const float lse = add_rn(G, log_det(s));

  // pass 4: write g - lse on C, -inf elsewhere
#pragma unroll 1
  for (int v = i0; v < V; v += nt) {
    const float x = load_w<T>(row, v);
    const int key = SEP ? fkey(load_w<C>(crow, v)) : fkey(x);
    float o = -INFINITY;
    if (key > ct || (key == ct && v <= ccut)) o = add_rn(add_rn(add_rn(x, -M), mul_rn(beta, rrow[v])), -lse);
    orow[v] = o;
  }
}

}  // namespace PLLM_KNS
}  // namespace pllm
