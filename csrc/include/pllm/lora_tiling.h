// Index and tiling arithmetic of the multi-LoRA kernels (csrc/include/pllm/lora.cuh), shared by device code, the
// host launchers (csrc/lora*.cu) and the CPU emulator (csrc/lora_emu.cpp). Plain C++: no CUDA, no torch headers,
// so the same functions are compiled for the device and for host-side tests (exposed as _C.lora_* helpers).
//
// Conventions (the spec is pllm_kernels/reference/lora.py):
//   x (T, h_in), lora_a (L, S, R, h_in), lora_b (L, N_total, R), v (S, K*T, R) fp32 with pair row p = k*T + t,
//   y (T, N_total) with slice s owning columns [off_s, off_s + size_s).
//
// Canonical arithmetic (why every path gives the same bits, whatever the batch):
//   * shrink  v[s, p, i] = sum_h x[t, h] * A[slot, s, i, h]. h is cut into steps of 32 * VEC elements (VEC = 16 bytes
//     of the element type); lane l of a step owns elements [l*VEC, l*VEC + VEC) of it; splits are runs of
//     kStepsPerSplit steps. Per (split, lane) a sequential fp32 FMA chain (steps ascending, elements ascending);
//     the 32 lane partials of a split are summed by the xor butterfly (offsets 16, 8, 4, 2, 1); split partials are
//     added left to right. This is a deterministic split-K whose shape depends on h_in and the dtype only.
//   * expand  delta[t, c] = sum_k coef_k * dot_k with dot_k = sequential FMA over i < rank_k of v * B and
//     coef_k = w[t, k] * scale[slot]; k ascending, d = fma(coef_k, dot_k, d) from d = +0; y = y + delta once.
//   BGMV, SGMV and fused kernels all compute exactly this, so a token's result does not depend on the path, the
//   batch size, the launch configuration or the other tokens.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PLLM_HD __host__ __device__ __forceinline__
#else
#define PLLM_HD inline
#endif

namespace pllm {
namespace lora {

constexpr int kWarp = 32;
constexpr int kStepsPerSplit = 4;         // canonical shrink split = 4 steps (1024 fp16/bf16 or 512 fp32 elements)
constexpr int kMaxSlicesPerLaunch = 8;    // slices per expand / fused launch (SliceGroup); more -> several groups

// Auto path thresholds (the same first guesses as pllm_kernels/triton/lora.py choose_path).
constexpr int64_t kBgmvMaxPairs = 64;     // T*K <= this: gather (BGMV) kernels; else segmented (SGMV)
constexpr int64_t kFusedMaxPairs = 8;     // lora_apply: T*K <= this: fused kernel when it fits
constexpr int64_t kFusedMaxSR = 256;      // fused: R*S outputs per pair
constexpr int64_t kFusedMaxABytes = 128 * 1024;  // fused: one slot's A (R*S*h_in*elem) re-read by every block
constexpr int64_t kFusedSingleMaxPairs = kBgmvMaxPairs;  // lora_apply, one slice: fused at every decode size
constexpr int64_t kMaxSmemBytes = 48 * 1024;     // dynamic shared memory we allow without opt-in

// Tile sizes of the kernels (the launchers and the tests read them from here).
constexpr int kShrinkBgmvWarps = 4;       // warps per BGMV shrink block (they share the splits of h_in)
constexpr int kSgmvRows = 16;             // SGMV shrink / expand: token rows per block (a chunk is cut in 16s)
constexpr int kSgmvShrinkCols = 16;       // SGMV shrink: combined outputs per block
constexpr int kSgmvShrinkThreads = 512;   // 16 warps, each a 4 x 4 (rows x outputs) register tile
constexpr int kSgmvExpandCols = 64;       // SGMV expand: y columns per block
constexpr int kSgmvExpandThreads = 256;   // 16 rows x 16 column lanes, 4 columns each
constexpr int kExpandRankChunk = 32;      // SGMV expand: rank elements per pipeline stage
constexpr int kExpandBgmvThreads = 128;   // BGMV expand: y columns per block (one per thread)
constexpr int kFusedThreads = 256;        // fused: threads per block = y columns per tile

// kPathSgmvTc: SGMV with the tensor-core shrink (fp16 / bf16; opt-in, never chosen by auto: see lora.cuh); its
// expand is the SGMV expand, and for float32 it is plain SGMV.
enum Path : int { kPathAuto = 0, kPathSgmv = 1, kPathBgmv = 2, kPathFused = 3, kPathSgmvTc = 4 };
enum Op : int { kOpShrink = 0, kOpExpand = 1, kOpApply = 2 };

PLLM_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- canonical shrink decomposition of h_in ---------------------------------------------------------------------
PLLM_HD int vec_elems(int elem_bytes) { return 16 / elem_bytes; }
PLLM_HD int64_t shrink_step(int vec) { return static_cast<int64_t>(kWarp) * vec; }
PLLM_HD int64_t shrink_split(int vec) { return static_cast<int64_t>(kStepsPerSplit) * kWarp * vec; }
PLLM_HD int64_t shrink_num_steps(int64_t H, int vec) { return cdiv(H, shrink_step(vec)); }
PLLM_HD int64_t shrink_num_splits(int64_t H, int vec) { return cdiv(H, shrink_split(vec)); }

// Owner of element h: split, step, lane and position inside the lane's VEC elements.
struct LanePos {
  int64_t split;
  int64_t step;
  int lane;
  int elem;
};
PLLM_HD LanePos shrink_lane_pos(int64_t h, int vec) {
  LanePos p;
  p.step = h / shrink_step(vec);
  const int64_t in_step = h - p.step * shrink_step(vec);
  p.lane = static_cast<int>(in_step / vec);
  p.elem = static_cast<int>(in_step - static_cast<int64_t>(p.lane) * vec);
  p.split = p.step / kStepsPerSplit;
  return p;
}
// Inverse: first element of (step, lane).
PLLM_HD int64_t shrink_lane_base(int64_t step, int lane, int vec) { return step * shrink_step(vec) + static_cast<int64_t>(lane) * vec; }

// ---- warp reduce-scatter of 2^log2n values (used with log2n = 0 .. 4) --------------------------------------------
// Stage st (offset 16 >> st) keeps the upper half of the remaining values in lanes whose bit (4 - st) is set; after
// log2n stages every lane holds one value and plain butterfly stages finish the sum. Each value is summed with the
// full xor butterfly tree, so the result is bitwise the same whatever log2n is.
PLLM_HD bool rs_keep_upper(int lane, int stage) { return ((lane >> (4 - stage)) & 1) != 0; }
PLLM_HD int rs_value_index(int lane, int log2n) { return (lane >> (5 - log2n)) & ((1 << log2n) - 1); }
// The lane that writes value q (lowest lane holding it).
PLLM_HD int rs_writer_lane(int q, int log2n) { return q << (5 - log2n); }

// ---- routing -----------------------------------------------------------------------------------------------------
PLLM_HD int64_t pair_index(int64_t k, int64_t t, int64_t T) { return k * T + t; }
PLLM_HD int64_t pair_k(int64_t p, int64_t T) { return p / T; }
PLLM_HD int64_t pair_token(int64_t p, int64_t T) { return p - (p / T) * T; }
PLLM_HD bool slot_valid(int64_t slot, int64_t L) { return slot >= 0 && slot < L; }
PLLM_HD int clamp_rank(int64_t r, int64_t R) { return static_cast<int>(r < 0 ? 0 : (r > R ? R : r)); }
// Combined shrink output n in [0, R*S): slice-minor, so a slot of rank r uses exactly n < r*S (vLLM pads to R).
PLLM_HD int combined_slice(int n, int S) { return n % S; }
PLLM_HD int combined_row(int n, int S) { return n / S; }
PLLM_HD int combined_index(int s, int i, int S) { return i * S + s; }
// SGMV: the token of position `pos` (row m of a chunk of column kc) if it is routed there, else -1.
PLLM_HD int64_t sgmv_row_token(int64_t m, int64_t len, int64_t chunk, int64_t pos, int64_t pair, int64_t kc, int64_t T) {
  if (m >= len || m >= chunk || pos < kc * T || pos >= (kc + 1) * T) return -1;
  const int64_t t = pair - kc * T;
  return (t >= 0 && t < T) ? t : -1;
}

// ---- slices of different widths -----------------------------------------------------------------------------------
// A launch covers up to kMaxSlicesPerLaunch slices; a flat tile index j maps to (slice in group, tile in slice) so
// that no tile straddles two slices. Passed to kernels by value.
struct SliceGroup {
  int base;                              // first slice of the group
  int count;                             // slices in the group
  int off[kMaxSlicesPerLaunch];          // first y column of each slice
  int size[kMaxSlicesPerLaunch];         // width of each slice
  int tile_start[kMaxSlicesPerLaunch + 1];  // first flat tile of each slice; tile_start[count] = tiles in the group
};
struct TilePos {
  int slice;   // slice index inside the group
  int off;     // first y column of that slice
  int size;    // its width
  int tile;    // tile index inside the slice
};
PLLM_HD TilePos tile_slice(const SliceGroup& g, int j) {
  int s = 0;
  for (int q = 1; q < g.count; ++q) s += (j >= g.tile_start[q]) ? 1 : 0;
  TilePos p;
  p.slice = s;
  p.off = g.off[s];
  p.size = g.size[s];
  p.tile = j - g.tile_start[s];
  return p;
}

// ---- shared-memory footprints (bytes) -------------------------------------------------------------------------------
PLLM_HD int64_t shrink_bgmv_smem(int64_t H, int vec, int nt) { return shrink_num_splits(H, vec) * nt * 4; }
PLLM_HD int64_t expand_bgmv_smem(int64_t K, int64_t R) { return K * R * 4 + K * 12; }
PLLM_HD int64_t fused_smem(int64_t K, int64_t S, int64_t R, int64_t H, int vec) {
  const int64_t rs = R * S;
  return K * shrink_num_splits(H, vec) * rs * 4 + K * rs * 4 + K * 12;
}

// ---- path choice -------------------------------------------------------------------------------------------------
// Same rule as pllm_kernels.triton.lora.choose_path (fused also needs its shared memory to fit). Returns a Path, or -1
// for an invalid request (fused asked for shrink / expand).
PLLM_HD int choose_path(int path, int op, int64_t pairs, int64_t S, int64_t R, int64_t H, int elem_bytes, int64_t K) {
  if (path == kPathFused && op != kOpApply) return -1;
  if (path == kPathSgmvTc) return (elem_bytes == 2 && op != kOpExpand) ? kPathSgmvTc : kPathSgmv;
  if (path != kPathAuto) return path;
  if (op == kOpApply && pairs <= kFusedMaxPairs && R * S <= kFusedMaxSR && S <= kMaxSlicesPerLaunch &&
      R * S * H * elem_bytes <= kFusedMaxABytes && fused_smem(K, S, R, H, vec_elems(elem_bytes)) <= kMaxSmemBytes) {
    return kPathFused;
  }
  // One slice (o_proj, down_proj): one launch at every decode size (the per-layer launch budget), whatever A's size.
  if (op == kOpApply && S == 1 && pairs <= kFusedSingleMaxPairs && R <= kFusedMaxSR &&
      fused_smem(K, S, R, H, vec_elems(elem_bytes)) <= kMaxSmemBytes) {
    return kPathFused;
  }
  return pairs <= kBgmvMaxPairs ? kPathBgmv : kPathSgmv;
}

}  // namespace lora
}  // namespace pllm
