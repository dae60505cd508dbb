// Batched multi-LoRA kernels on raw pointers (no torch): shrink and expand, gather (BGMV, decode) and segmented
// (SGMV, prefill), and a fused shrink + expand for decode sizes. Semantics: pllm_kernels/reference/lora.py.
//
// Every kernel evaluates the canonical arithmetic of pllm/lora_tiling.h (fp32 FMA chains in a fixed order, the xor
// butterfly, split partials added left to right), so BGMV, SGMV and fused results are bitwise identical and a token's
// result never depends on the batch it is in. No float atomics: each v element and each y element is written by
// exactly one thread, y once per token (read-modify-write in y's dtype).
//
// Routing: slot -1 or >= L = no adapter (never read, never written); ranks clamped to [0, R]; only the first `rank`
// rows of A and columns of B are read (a rank-8 slot of an R = 64 buffer does 1/8 of the work).
//
// Tensor cores: only in the opt-in SGMV shrink of path kPathSgmvTc (fp16 / bf16; lora_shrink_sgmv_tc_kernel). An
// mma accumulates its k products in a hardware-defined order, so that kernel cannot give the bits of the BGMV / fused
// (CUDA-core) kernels: with it a token's result changes (within rounding) when the batch crosses the BGMV / SGMV
// threshold, which is why `auto` never picks it. Decode (bandwidth-bound) loses nothing without them; the default
// prefill shrink runs on fp32 FMAs from shared memory (about 1 FMA per shared-memory byte).
#pragma once

#include "pllm/kernel_prims.cuh"

namespace pllm {
namespace PLLM_KNS {

// ---------------------------------------------------------------------------------------------------------------
// Parameters (passed by value). Element strides; the innermost stride of x, lora_a, lora_b, y is 1; v, token_slots,
// token_weights and the routing arrays are contiguous.
// ---------------------------------------------------------------------------------------------------------------
struct ShrinkParams {
  const void* x;             // (T, H)
  const void* a;             // (L, S, R, H)
  const int32_t* ranks;      // (L,)
  const int32_t* slots;      // (T, K)
  const int32_t* pairs;      // (K*T,) sorted pairs (SGMV)
  const int32_t* seg_slot;   // (K, G)
  const int32_t* seg_start;  // (K, G)
  const int32_t* seg_len;    // (K, G)
  float* out;                // (S, K*T, R)
  int T, H, L, S, R, K, G, chunk;
  int64_t sxt, sa0, sa1, sa2;
};

// Per-slice outputs (lora_apply with one output tensor per slice, e.g. the q / k / v projections): slice s of the
// launch writes row t, column j of its own output at ptr[s] + t * stride[s] + j; `on` = 0: the slices are column
// ranges of y. One slice group only (S <= kMaxSlicesPerLaunch).
struct YSlices {
  void* ptr[lora::kMaxSlicesPerLaunch];
  int64_t stride[lora::kMaxSlicesPerLaunch];
  int on;
};

struct ExpandParams {
  void* y;                   // (T, N)
  const float* v;            // (S, K*T, R)
  const void* b;             // (L, N, R)
  const int32_t* ranks;      // (L,)
  const float* scales;       // (L,)
  const int32_t* slots;      // (T, K)
  const float* weights;      // (T, K)
  const int32_t* pairs;
  const int32_t* seg_slot;
  const int32_t* seg_start;
  const int32_t* seg_len;
  int T, L, R, K, G, chunk, S;
  int64_t syt, sb0, sb1;
  lora::SliceGroup grp;
  YSlices ys;
};

struct FusedParams {
  void* y;
  const void* x;
  const void* a;
  const void* b;
  const int32_t* ranks;
  const float* scales;
  const int32_t* slots;
  const float* weights;
  int T, H, L, S, R, K;
  int64_t sxt, sa0, sa1, sa2, syt, sb0, sb1;
  lora::SliceGroup grp;      // all S slices (S <= kMaxSlicesPerLaunch)
  YSlices ys;
};

// The output element of token t, column col of slice tp.slice of the launch's slice group: in y (at the slice's
// column offset) or in that slice's own output (YSlices).
template <typename T>
PLLM_DEV T* y_elem(void* y, int64_t syt, const YSlices& ys, const lora::TilePos& tp, int t, int col) {
  if (ys.on) return static_cast<T*>(ys.ptr[tp.slice]) + static_cast<int64_t>(t) * ys.stride[tp.slice] + col;
  return static_cast<T*>(y) + static_cast<int64_t>(t) * syt + tp.off + col;
}

// Slot of pair (t, k) if routed (valid id), else -1; and its clamped rank.
PLLM_DEV int routed_slot(const int32_t* slots, int t, int k, int K, int L) {
  const int s = slots[static_cast<int64_t>(t) * K + k];
  return lora::slot_valid(s, L) ? s : -1;
}

// ---------------------------------------------------------------------------------------------------------------
// Canonical shrink partial of one split for NT outputs (rows of A) of one token: lane `lane`'s fp32 FMA chain over
// the steps of split `split`, then the butterfly. Returns the sum of output rs_value_index(lane, LOG2NT).
// ---------------------------------------------------------------------------------------------------------------
template <typename T, bool VEC_OK, int LOG2NT>
PLLM_DEV float shrink_split_partial(const T* PLLM_RESTRICT x_row, const T* const (&a_rows)[1 << LOG2NT],
                                    const bool (&a_ok)[1 << LOG2NT], int H, int split, int lane) {
  constexpr int NT = 1 << LOG2NT;
  constexpr int VEC = 16 / sizeof(T);
  constexpr int STEP = 32 * VEC;
  constexpr int SPW = lora::kStepsPerSplit;
  float acc[NT];
#pragma unroll
  for (int q = 0; q < NT; ++q) acc[q] = 0.0f;
  const int64_t split_base = static_cast<int64_t>(split) * SPW * STEP;
  if (VEC_OK) {
    // H % VEC == 0 and every row 16-byte aligned: a lane's group is entirely inside or outside [0, H).
    // Issue all loads of the split first (up to SPW * (NT + 1) 16-byte loads in flight), then the FMA chains.
    uint4 xv[SPW];
    uint4 av[SPW][NT];
#pragma unroll
    for (int js = 0; js < SPW; ++js) {
      const int64_t h0 = split_base + static_cast<int64_t>(js) * STEP + static_cast<int64_t>(lane) * VEC;
      const bool in = h0 < H;
      xv[js] = in ? ld16(x_row + h0) : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
      for (int q = 0; q < NT; ++q) av[js][q] = (in && a_ok[q]) ? ld16(a_rows[q] + h0) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int js = 0; js < SPW; ++js) {
      const int64_t h0 = split_base + static_cast<int64_t>(js) * STEP + static_cast<int64_t>(lane) * VEC;
      if (h0 < H) {
        float xf[VEC];
        unpack16<T>(xv[js], xf);
#pragma unroll
        for (int q = 0; q < NT; ++q) {
          float af[VEC];
          unpack16<T>(av[js][q], af);
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[q] = fmaf(xf[e], af[e], acc[q]);
        }
      }
    }
  } else {
    for (int js = 0; js < SPW; ++js) {
      const int64_t h0 = split_base + static_cast<int64_t>(js) * STEP + static_cast<int64_t>(lane) * VEC;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int64_t h = h0 + e;
        if (h < H) {
          const float xf = ld_f<T>(x_row + h);
#pragma unroll
          for (int q = 0; q < NT; ++q) {
            if (a_ok[q]) acc[q] = fmaf(xf, ld_f<T>(a_rows[q] + h), acc[q]);
          }
        }
      }
    }
  }
  return warp_reduce_scatter<LOG2NT>(acc);
}

// ---------------------------------------------------------------------------------------------------------------
// BGMV shrink. Grid (K*T pairs, cdiv(R*S, NT)); block = up to kShrinkBgmvWarps warps that share the splits of h_in
// (warp w computes splits w, w + nwarps, ...); split partials go to shared memory and are added in split order.
// Every block writes all NT outputs of its pair (zeros for no-adapter pairs and rows >= rank): out fully written.
// Dynamic smem: num_splits * NT floats.
// ---------------------------------------------------------------------------------------------------------------
template <typename T, bool VEC_OK, int LOG2NT>
PLLM_KERNEL(lora::kShrinkBgmvWarps * 32) lora_shrink_bgmv_kernel(const ShrinkParams p) {
  constexpr int NT = 1 << LOG2NT;
  constexpr int VEC = 16 / sizeof(T);
  PLLM_DYN_SMEM(float, part);
  const int pair = bid_x();
  const int n0 = bid_y() * NT;
  const int RS = p.R * p.S;
  const int kc = pair / p.T;
  const int t = pair - kc * p.T;
  const int slot = routed_slot(p.slots, t, kc, p.K, p.L);
  const int rank = slot >= 0 ? lora::clamp_rank(p.ranks[slot], p.R) : 0;
  const int n_used = rank * p.S;
  float* out_pair = p.out + static_cast<int64_t>(pair) * p.R;  // + s * (K*T*R) + i
  const int64_t so0 = static_cast<int64_t>(p.K) * p.T * p.R;
  if (n0 >= n_used) {  // no adapter, or rows beyond the slot's rank: zeros (block-uniform exit)
    for (int q = tid(); q < NT; q += nthreads()) {
      const int n = n0 + q;
      if (n < RS) out_pair[lora::combined_slice(n, p.S) * so0 + lora::combined_row(n, p.S)] = 0.0f;
    }
    return;
  }
  const T* x = static_cast<const T*>(p.x);
  const T* a = static_cast<const T*>(p.a);
  const T* x_row = x + static_cast<int64_t>(t) * p.sxt;
  const T* a_rows[NT];
  bool a_ok[NT];
#pragma unroll
  for (int q = 0; q < NT; ++q) {
    const int n = n0 + q;
    a_ok[q] = n < n_used;
    const int s = lora::combined_slice(n, p.S);
    const int i = lora::combined_row(n, p.S);
    a_rows[q] = a_ok[q] ? a + static_cast<int64_t>(slot) * p.sa0 + s * p.sa1 + i * p.sa2 : a;
  }
  const int splits = static_cast<int>(lora::shrink_num_splits(p.H, VEC));
  const int lane = lane_id();
  for (int w = warp_id(); w < splits; w += num_warps()) {
    const float r = shrink_split_partial<T, VEC_OK, LOG2NT>(x_row, a_rows, a_ok, p.H, w, lane);
    if (lane == lora::rs_writer_lane(lora::rs_value_index(lane, LOG2NT), LOG2NT)) {
      part[w * NT + lora::rs_value_index(lane, LOG2NT)] = r;
    }
  }
  sync_block();
  for (int q = tid(); q < NT; q += nthreads()) {
    const int n = n0 + q;
    if (n >= RS) continue;
    float val = 0.0f;
    if (n < n_used) {
      val = part[q];
      for (int w = 1; w < splits; ++w) val += part[w * NT + q];
    }
    out_pair[lora::combined_slice(n, p.S) * so0 + lora::combined_row(n, p.S)] = val;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Pieces shared by the SGMV shrink kernels (FMA and tensor-core): the block's tile, its token rows and the stage loader.
// ---------------------------------------------------------------------------------------------------------------
struct SgmvShrinkTile {
  int kc, slot, n_used, n0, m0, start, len;
};

// The tile of block (bid_x, bid_y, bid_z): false when it has nothing to compute (invalid slot, outputs beyond the
// slot's rank, rows beyond its chunk): uniform over the block, so the caller returns before any barrier.
PLLM_DEV bool sgmv_shrink_tile(const ShrinkParams& p, SgmvShrinkTile& t) {
  const int seg = bid_x();
  t.kc = seg / p.G;
  const int64_t seg_idx = static_cast<int64_t>(t.kc) * p.G + (seg - t.kc * p.G);
  t.slot = p.seg_slot[seg_idx];
  if (!lora::slot_valid(t.slot, p.L)) return false;
  t.n_used = lora::clamp_rank(p.ranks[t.slot], p.R) * p.S;
  t.n0 = bid_y() * lora::kSgmvShrinkCols;
  if (t.n0 >= t.n_used) return false;
  t.m0 = bid_z() * lora::kSgmvRows;
  t.start = p.seg_start[seg_idx];
  t.len = p.seg_len[seg_idx] < p.chunk ? p.seg_len[seg_idx] : p.chunk;
  return t.m0 < t.len;
}

// Threads < kSgmvRows: token and pair of row tid() of the tile (-1 when none); the caller syncs the block.
PLLM_DEV void sgmv_shrink_rows(const ShrinkParams& p, const SgmvShrinkTile& t, int* row_tok, int* row_pair) {
  if (tid() < lora::kSgmvRows) {
    const int m = t.m0 + tid();
    const int64_t pos = static_cast<int64_t>(t.start) + m;
    int64_t tok = -1, pr = -1;
    if (m < t.len && pos >= static_cast<int64_t>(t.kc) * p.T && pos < static_cast<int64_t>(t.kc + 1) * p.T) {
      pr = p.pairs[pos];
      tok = lora::sgmv_row_token(m, t.len, p.chunk, pos, pr, t.kc, p.T);
    }
    row_tok[tid()] = static_cast<int>(tok);
    row_pair[tid()] = tok >= 0 ? static_cast<int>(pr) : -1;
  }
}

// Shared memory of the SGMV shrink kernels: two stages of x and A rows ([stage][row][lane]: lane l's 16 bytes of the
// step) and the tile's token / pair per row.
struct SgmvShrinkSmem {
  uint4 xs[2][lora::kSgmvRows][32];
  uint4 as[2][lora::kSgmvShrinkCols][32];
  int row_tok[lora::kSgmvRows];
  int row_pair[lora::kSgmvRows];
};

// Stage j of the x rows and A rows (combined outputs) of the tile: 16 + 16 rows x 32 lane chunks of 16 bytes
// (32 * VEC elements of h). cp.async when rows are 16-byte aligned (zero-fill outside h / unrouted rows / outputs
// beyond the rank), else synchronous scalar loads with the same zero-fill.
template <typename T, bool VEC_OK>
PLLM_DEV void sgmv_shrink_load_stage(const ShrinkParams& p, const SgmvShrinkTile& t, const int* row_tok,
                                     uint4 (*xs)[32], uint4 (*as)[32], int j) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int STEP = 32 * VEC;
  constexpr int ROWS = lora::kSgmvRows;
  constexpr int COLS = lora::kSgmvShrinkCols;
  const T* x = static_cast<const T*>(p.x);
  const T* a = static_cast<const T*>(p.a);
  for (int idx = tid(); idx < (ROWS + COLS) * 32; idx += nthreads()) {
    const int r = idx >> 5;
    const int c = idx & 31;
    const int64_t h0 = static_cast<int64_t>(j) * STEP + static_cast<int64_t>(c) * VEC;
    const T* src = x;
    bool ok;
    uint4* dst;
    if (r < ROWS) {
      const int tok = row_tok[r];
      ok = tok >= 0;
      if (ok) src = x + static_cast<int64_t>(tok) * p.sxt + h0;
      dst = &xs[r][c];
    } else {
      const int n = t.n0 + (r - ROWS);
      ok = n < t.n_used;
      if (ok) {
        src = a + static_cast<int64_t>(t.slot) * p.sa0 + lora::combined_slice(n, p.S) * p.sa1 +
              lora::combined_row(n, p.S) * p.sa2 + h0;
      } else {
        src = a;
      }
      dst = &as[r - ROWS][c];
    }
    if (VEC_OK) {
      // H % VEC == 0: the 16 bytes are entirely inside or outside the row.
      const bool in = ok && h0 < p.H;
      cp_async16(dst, in ? static_cast<const void*>(src) : static_cast<const void*>(a), in ? 16 : 0);
    } else {
      T e[VEC];
#pragma unroll
      for (int q = 0; q < VEC; ++q) e[q] = (ok && h0 + q < p.H) ? src[q] : from_float<T>(0.0f);
      std::memcpy(dst, e, 16);
    }
  }
}

// The prologue of both SGMV shrink kernels: the tile and its rows (block-synchronized); false = nothing to do (uniform
// over the block: the caller returns before any other barrier).
PLLM_DEV bool sgmv_shrink_begin(const ShrinkParams& p, SgmvShrinkTile& t, SgmvShrinkSmem& sm) {
  if (!sgmv_shrink_tile(p, t)) return false;
  sgmv_shrink_rows(p, t, sm.row_tok, sm.row_pair);
  sync_block();
  return true;
}

// ---------------------------------------------------------------------------------------------------------------
// SGMV shrink. Grid (K*G chunks, cdiv(R*S, 16), cdiv(chunk, 16)); block = 16 warps on a tile of 16 rows (tokens of
// one chunk, gathered through sorted_pairs) x 16 combined outputs; warp (wm, wn) owns a 4 x 4 register tile. The x and
// A tiles of one step (32 * VEC elements of h) are staged in shared memory by a cp.async double buffer (synchronous
// scalar loads when rows are not 16-byte aligned). After the last step of each split the warp reduce-scatters its 16
// lane partials (canonical butterfly) and adds them to its running total. Writes only routed rows, rows < rank: the
// launcher zero-fills `out` first.
// ---------------------------------------------------------------------------------------------------------------
template <typename T, bool VEC_OK>
PLLM_KERNEL(lora::kSgmvShrinkThreads) lora_shrink_sgmv_kernel(const ShrinkParams p) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int SPW = lora::kStepsPerSplit;
  PLLM_SMEM SgmvShrinkSmem sm;
  SgmvShrinkTile tile;
  if (!sgmv_shrink_begin(p, tile, sm)) return;
  auto& xs = sm.xs;
  auto& as = sm.as;
  const int* row_tok = sm.row_tok;
  const int* row_pair = sm.row_pair;
  const int nsteps = static_cast<int>(lora::shrink_num_steps(p.H, VEC));
  auto load_stage = [&](int stage, int j) {
    sgmv_shrink_load_stage<T, VEC_OK>(p, tile, row_tok, xs[stage], as[stage], j);
  };

  const int wi = warp_id();
  const int mrow0 = (wi >> 2) * 4;
  const int ncol0 = (wi & 3) * 4;
  const int lane = lane_id();
  const bool warp_active = (tile.m0 + mrow0 < tile.len) && (tile.n0 + ncol0 < tile.n_used);
  float acc[16];
#pragma unroll
  for (int q = 0; q < 16; ++q) acc[q] = 0.0f;
  float total = 0.0f;

  load_stage(0, 0);
  cp_async_commit();
  for (int j = 0; j < nsteps; ++j) {
    if (j + 1 < nsteps) load_stage((j + 1) & 1, j + 1);
    cp_async_commit();  // possibly empty group: keeps the wait count uniform
    cp_async_wait<1>();  // this thread's copies of step j have landed
    sync_block();        // ... and everyone else's
    if (warp_active) {
      const int st = j & 1;
      float xf[4][VEC];
#pragma unroll
      for (int mm = 0; mm < 4; ++mm) unpack16<T>(xs[st][mrow0 + mm][lane], xf[mm]);
#pragma unroll
      for (int nn = 0; nn < 4; ++nn) {
        float af[VEC];
        unpack16<T>(as[st][ncol0 + nn][lane], af);
#pragma unroll
        for (int mm = 0; mm < 4; ++mm) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[mm * 4 + nn] = fmaf(xf[mm][e], af[e], acc[mm * 4 + nn]);
        }
      }
      if ((j % SPW) == SPW - 1 || j == nsteps - 1) {  // end of split j / SPW
        const float r = warp_reduce_scatter<4>(acc);
        total = (j < SPW) ? r : total + r;
#pragma unroll
        for (int q = 0; q < 16; ++q) acc[q] = 0.0f;
      }
    }
    sync_block();  // stage j & 1 is refilled by the next iteration
  }
  if (warp_active && (lane & 1) == 0) {
    const int q = lora::rs_value_index(lane, 4);
    const int m = mrow0 + (q >> 2);
    const int n = tile.n0 + ncol0 + (q & 3);
    if (row_tok[m] >= 0 && n < tile.n_used) {
      const int64_t so0 = static_cast<int64_t>(p.K) * p.T * p.R;
      p.out[lora::combined_slice(n, p.S) * so0 + static_cast<int64_t>(row_pair[m]) * p.R +
            lora::combined_row(n, p.S)] = total;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// SGMV shrink on tensor cores (opt-in path kPathSgmvTc, fp16 / bf16): the grid, block, routing and cp.async double
// buffer of lora_shrink_sgmv_kernel (a 16-token x 16-output tile, 32 * VEC = 256 elements of h per stage), but warp w
// multiplies k-chunk w (elements 16w .. 16w+15 of the stage) of the tile with two mma.m16n8k16 (outputs 0-7, 8-15),
// accumulating over the stages in fp32 registers. The 16 warps' partial tiles are then summed in shared memory in warp
// order (fixed: the result does not depend on scheduling). Rows without a routed token and outputs beyond the slot's
// rank are zero-filled in shared memory (never read from A's padding) and never written.
// ---------------------------------------------------------------------------------------------------------------
template <typename T, bool VEC_OK>
PLLM_KERNEL(lora::kSgmvShrinkThreads) lora_shrink_sgmv_tc_kernel(const ShrinkParams p) {
  static_assert(sizeof(T) == 2, "the tensor-core shrink takes float16 / bfloat16");
  constexpr int VEC = 16 / sizeof(T);  // 8: a 16-byte chunk holds half an mma k-chunk
  constexpr int STEP = 32 * VEC;
  constexpr int ROWS = lora::kSgmvRows;
  constexpr int COLS = lora::kSgmvShrinkCols;
  static_assert(ROWS == 16 && COLS == 16 && STEP == 16 * (lora::kSgmvShrinkThreads / 32),
                "one mma k-chunk per warp and stage, two n-halves per tile");
  PLLM_SMEM SgmvShrinkSmem sm;
  SgmvShrinkTile tile;
  if (!sgmv_shrink_begin(p, tile, sm)) return;
  auto& xs = sm.xs;
  auto& as = sm.as;
  const int* row_tok = sm.row_tok;
  const int* row_pair = sm.row_pair;
  const int nsteps = static_cast<int>(lora::shrink_num_steps(p.H, VEC));
  auto load_stage = [&](int stage, int j) {
    sgmv_shrink_load_stage<T, VEC_OK>(p, tile, row_tok, xs[stage], as[stage], j);
  };

  const int w = warp_id();
  const int lane = lane_id();
  const int g = lane >> 2;
  const int t = lane & 3;
  float acc[2][4];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[h][e] = 0.0f;

  load_stage(0, 0);
  cp_async_commit();
  for (int j = 0; j < nsteps; ++j) {
    if (j + 1 < nsteps) load_stage((j + 1) & 1, j + 1);
    cp_async_commit();
    cp_async_wait<1>();
    sync_block();
    const int st = j & 1;
    // k-chunk w of the stage = 16-byte chunks 2w (k 0-7) and 2w+1 (k 8-15) of every row; word t of a chunk holds
    // k = 2t, 2t+1 of it.
    uint32_t af[4], bf[2];
    std::memcpy(&af[0], reinterpret_cast<const unsigned char*>(&xs[st][g][2 * w]) + 4 * t, 4);
    std::memcpy(&af[1], reinterpret_cast<const unsigned char*>(&xs[st][g + 8][2 * w]) + 4 * t, 4);
    std::memcpy(&af[2], reinterpret_cast<const unsigned char*>(&xs[st][g][2 * w + 1]) + 4 * t, 4);
    std::memcpy(&af[3], reinterpret_cast<const unsigned char*>(&xs[st][g + 8][2 * w + 1]) + 4 * t, 4);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      std::memcpy(&bf[0], reinterpret_cast<const unsigned char*>(&as[st][8 * h + g][2 * w]) + 4 * t, 4);
      std::memcpy(&bf[1], reinterpret_cast<const unsigned char*>(&as[st][8 * h + g][2 * w + 1]) + 4 * t, 4);
      mma_m16n8k16<T>(acc[h], af, bf);
    }
    sync_block();  // stage j & 1 is refilled by the next iteration
  }
  // Sum of the 16 warps' tiles, in warp order, through the (now idle) x stages: red[w][row][col].
  float* red = reinterpret_cast<float*>(&xs[0][0][0]);
  static_assert(sizeof(xs) >= sizeof(float) * (lora::kSgmvShrinkThreads / 32) * ROWS * COLS, "reduction buffer");
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e >= 2 ? 8 : 0);
      const int col = 8 * h + 2 * t + (e & 1);
      red[(w * ROWS + row) * COLS + col] = acc[h][e];
    }
  }
  sync_block();
  if (tid() < ROWS * COLS) {
    const int row = tid() / COLS;
    const int col = tid() % COLS;
    const int n = tile.n0 + col;
    if (row_tok[row] >= 0 && n < tile.n_used) {
      float total = red[row * COLS + col];
      for (int q = 1; q < lora::kSgmvShrinkThreads / 32; ++q) total += red[(q * ROWS + row) * COLS + col];
      const int64_t so0 = static_cast<int64_t>(p.K) * p.T * p.R;
      p.out[lora::combined_slice(n, p.S) * so0 + static_cast<int64_t>(row_pair[row]) * p.R +
            lora::combined_row(n, p.S)] = total;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Canonical expand dot of one y column: sum_{i < rank} v[i * vstride] * B_row[i], sequential fp32 FMA.
// RCAP > 0: rank <= RCAP, loads fully unrolled (all 16-byte loads of the row in flight before the FMAs).
// ---------------------------------------------------------------------------------------------------------------
template <typename T, bool VEC_OK, int RCAP>
PLLM_DEV float expand_dot(const float* PLLM_RESTRICT vrow, int vstride, const T* PLLM_RESTRICT brow, int rank) {
  constexpr int VEC = 16 / sizeof(T);
  float dot = 0.0f;
  if (VEC_OK && RCAP > 0) {
    constexpr int NV = RCAP > 0 ? (RCAP + VEC - 1) / VEC : 1;
    uint4 bv[NV];
#pragma unroll
    for (int c = 0; c < NV; ++c) bv[c] = (c * VEC < rank) ? ld16(brow + c * VEC) : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int c = 0; c < NV; ++c) {
      if (c * VEC < rank) {
        float bf[VEC];
        unpack16<T>(bv[c], bf);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const int i = c * VEC + e;
          if (i < rank) dot = fmaf(vrow[i * vstride], bf[e], dot);
        }
      }
    }
  } else if (VEC_OK) {
    for (int i0 = 0; i0 < rank; i0 += VEC) {
      float bf[VEC];
      unpack16<T>(ld16(brow + i0), bf);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int i = i0 + e;
        if (i < rank) dot = fmaf(vrow[i * vstride], bf[e], dot);
      }
    }
  } else {
    for (int i = 0; i < rank; ++i) dot = fmaf(vrow[i * vstride], ld_f<T>(brow + i), dot);
  }
  return dot;
}

// y[t, c] = y[t, c] + d in y's dtype.
template <typename T>
PLLM_DEV void y_update(T* yp, float d) {
  *yp = from_float<T>(to_float<T>(*yp) + d);
}

// ---------------------------------------------------------------------------------------------------------------
// BGMV expand. Grid (T, tiles of the slice group); block = 128 threads = 128 y columns of one slice. The token's K
// (slot, rank, coef) and v rows are staged in shared memory; each thread sums its column's K contributions in k order
// and updates y once. Tokens with no routed slot return before touching y. Dynamic smem: K * R floats + 3K words.
// ---------------------------------------------------------------------------------------------------------------
template <typename T, bool VEC_OK, int RCAP>
PLLM_KERNEL_MB(lora::kExpandBgmvThreads, 4) lora_expand_bgmv_kernel(const ExpandParams p) {
  PLLM_DYN_SMEM(float, vs);                                    // [K][R]
  int* ks_slot = reinterpret_cast<int*>(vs + static_cast<int64_t>(p.K) * p.R);  // [K]
  int* ks_rank = ks_slot + p.K;                                // [K]
  float* ks_coef = reinterpret_cast<float*>(ks_rank + p.K);    // [K]
  const int t = bid_x();
  const lora::TilePos tp = lora::tile_slice(p.grp, bid_y());
  const int s = p.grp.base + tp.slice;
  for (int k = tid(); k < p.K; k += nthreads()) {
    const int slot = routed_slot(p.slots, t, k, p.K, p.L);
    const int rank = slot >= 0 ? lora::clamp_rank(p.ranks[slot], p.R) : 0;
    ks_slot[k] = slot;
    ks_rank[k] = rank;
    ks_coef[k] = rank > 0 ? p.weights[static_cast<int64_t>(t) * p.K + k] * p.scales[slot] : 0.0f;
  }
  const int64_t sv0 = static_cast<int64_t>(p.K) * p.T * p.R;
  for (int idx = tid(); idx < p.K * p.R; idx += nthreads()) {
    const int k = idx / p.R;
    const int i = idx - k * p.R;
    const int slot = routed_slot(p.slots, t, k, p.K, p.L);
    const int rank = slot >= 0 ? lora::clamp_rank(p.ranks[slot], p.R) : 0;
    vs[idx] = i < rank ? p.v[s * sv0 + (static_cast<int64_t>(k) * p.T + t) * p.R + i] : 0.0f;
  }
  sync_block();
  bool touched = false;
  for (int k = 0; k < p.K; ++k) touched |= ks_slot[k] >= 0;
  if (!touched) return;  // block-uniform
  const int col = tp.tile * lora::kExpandBgmvThreads + tid();
  if (col >= tp.size) return;
  const int c = tp.off + col;
  const T* b = static_cast<const T*>(p.b);
  float d = 0.0f;
  for (int k = 0; k < p.K; ++k) {
    const int rank = ks_rank[k];
    if (rank == 0) continue;  // no adapter or rank 0
    const T* brow = b + static_cast<int64_t>(ks_slot[k]) * p.sb0 + static_cast<int64_t>(c) * p.sb1;
    const float dot = expand_dot<T, VEC_OK, RCAP>(vs + static_cast<int64_t>(k) * p.R, 1, brow, rank);
    d = fmaf(ks_coef[k], dot, d);
  }
  y_update<T>(y_elem<T>(p.y, p.syt, p.ys, tp, t, col), d);
}

// ---------------------------------------------------------------------------------------------------------------
// SGMV expand. Grid (K*G chunks, tiles of the slice group, cdiv(chunk, 16)); block = 256 threads on 16 rows (tokens of
// one chunk of column kc) x 64 columns of one slice; thread (row tm, lane tn) owns columns tn + 16 b, b < 4. The chunk's
// slot B tile (64 columns x 32 rank) and the rows' v (16 x 32, fp32) go through a cp.async double buffer over the rank
// (zero-filled beyond the slot's rank). One update of y per token: a token is owned by the chunk of its first routed
// column kc; the owner adds the contributions of its later columns k > kc (other slots) by gathering their B rows, in
// k order; rows owned by an earlier column are skipped. So there is no second read-modify-write and no atomic.
// ---------------------------------------------------------------------------------------------------------------
template <typename T, bool VEC_OK>
PLLM_KERNEL(lora::kSgmvExpandThreads) lora_expand_sgmv_kernel(const ExpandParams p) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int ROWS = lora::kSgmvRows;          // 16
  constexpr int COLS = lora::kSgmvExpandCols;    // 64
  constexpr int RC = lora::kExpandRankChunk;     // 32
  constexpr int BCH = RC / VEC;                  // 16-byte chunks of one B row per stage
  constexpr int BPITCH = BCH + 1;                // +16 bytes: 2-way instead of 8-way bank conflicts
  constexpr int VCH = RC / 4;                    // 16-byte chunks of one v row per stage
  PLLM_SMEM __align__(16) float vsm[2][ROWS][RC];
  PLLM_SMEM uint4 bsm[2][COLS][BPITCH];
  PLLM_SMEM int row_tok[ROWS];
  PLLM_SMEM int row_pair[ROWS];
  PLLM_SMEM float row_coef[ROWS];

  const int seg = bid_x();
  const int kc = seg / p.G;
  const int64_t seg_idx = static_cast<int64_t>(kc) * p.G + (seg - kc * p.G);
  const int slot = p.seg_slot[seg_idx];
  if (!lora::slot_valid(slot, p.L)) return;
  const int rank = lora::clamp_rank(p.ranks[slot], p.R);
  const lora::TilePos tp = lora::tile_slice(p.grp, bid_y());
  const int s = p.grp.base + tp.slice;
  const int m0 = bid_z() * ROWS;
  const int start = p.seg_start[seg_idx];
  const int len = p.seg_len[seg_idx] < p.chunk ? p.seg_len[seg_idx] : p.chunk;
  if (m0 >= len) return;

  if (tid() < ROWS) {
    const int m = m0 + tid();
    const int64_t pos = static_cast<int64_t>(start) + m;
    int64_t tok = -1, pr = -1;
    if (m < len && pos >= static_cast<int64_t>(kc) * p.T && pos < static_cast<int64_t>(kc + 1) * p.T) {
      pr = p.pairs[pos];
      tok = lora::sgmv_row_token(m, len, p.chunk, pos, pr, kc, p.T);
    }
    if (tok >= 0) {  // owned only if no earlier column routes this token
      for (int k = 0; k < kc; ++k) {
        if (routed_slot(p.slots, static_cast<int>(tok), k, p.K, p.L) >= 0) tok = -1;
      }
    }
    row_tok[tid()] = static_cast<int>(tok);
    row_pair[tid()] = tok >= 0 ? static_cast<int>(pr) : -1;
    row_coef[tid()] = (tok >= 0 && rank > 0) ? p.weights[tok * p.K + kc] * p.scales[slot] : 0.0f;
  }
  sync_block();
  bool any = false;
  for (int m = 0; m < ROWS; ++m) any |= row_tok[m] >= 0;
  if (!any) return;  // block-uniform

  const T* b = static_cast<const T*>(p.b);
  const int64_t sv0 = static_cast<int64_t>(p.K) * p.T * p.R;
  const float* v_s = p.v + s * sv0;
  const int tm = tid() >> 4;
  const int tn = tid() & 15;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};

  if (rank > 0) {
    const T* b_slot = b + static_cast<int64_t>(slot) * p.sb0;
    auto load_stage = [&](int stage, int ic) {
      const int i_base = ic * RC;
      for (int idx = tid(); idx < ROWS * VCH + COLS * BCH; idx += nthreads()) {
        if (idx < ROWS * VCH) {
          const int r = idx / VCH;
          const int c = idx - r * VCH;
          const int i0 = i_base + c * 4;
          const int pr = row_pair[r];
          const int nvalid = pr >= 0 ? (rank - i0 < 0 ? 0 : (rank - i0 > 4 ? 4 : rank - i0)) : 0;
          const float* src = v_s + static_cast<int64_t>(pr < 0 ? 0 : pr) * p.R + i0;
          if (VEC_OK) {
            cp_async16(&vsm[stage][r][c * 4], nvalid > 0 ? static_cast<const void*>(src) : static_cast<const void*>(p.v),
                       nvalid * 4);
          } else {
            float e[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) e[q] = q < nvalid ? src[q] : 0.0f;
            std::memcpy(&vsm[stage][r][c * 4], e, 16);
          }
        } else {
          const int j = idx - ROWS * VCH;
          const int cl = j / BCH;
          const int c = j - cl * BCH;
          const int i0 = i_base + c * VEC;
          const int col = tp.tile * COLS + cl;
          const int nvalid = col < tp.size ? (rank - i0 < 0 ? 0 : (rank - i0 > VEC ? VEC : rank - i0)) : 0;
          const T* src = b_slot + static_cast<int64_t>(tp.off + (col < tp.size ? col : 0)) * p.sb1 + i0;
          if (VEC_OK) {
            cp_async16(&bsm[stage][cl][c], nvalid > 0 ? static_cast<const void*>(src) : static_cast<const void*>(b),
                       nvalid * static_cast<int>(sizeof(T)));
          } else {
            T e[VEC];
#pragma unroll
            for (int q = 0; q < VEC; ++q) e[q] = q < nvalid ? src[q] : from_float<T>(0.0f);
            std::memcpy(&bsm[stage][cl][c], e, 16);
          }
        }
      }
    };
    const int nchunks = static_cast<int>(lora::cdiv(rank, RC));
    load_stage(0, 0);
    cp_async_commit();
    for (int ic = 0; ic < nchunks; ++ic) {
      if (ic + 1 < nchunks) load_stage((ic + 1) & 1, ic + 1);
      cp_async_commit();
      cp_async_wait<1>();
      sync_block();
      const int st = ic & 1;
      const float* vrow = vsm[st][tm];
#pragma unroll
      for (int c = 0; c < BCH; ++c) {
        float bf[4][VEC];
#pragma unroll
        for (int bb = 0; bb < 4; ++bb) unpack16<T>(bsm[st][tn + 16 * bb][c], bf[bb]);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float vv = vrow[c * VEC + e];
#pragma unroll
          for (int bb = 0; bb < 4; ++bb) acc[bb] = fmaf(vv, bf[bb][e], acc[bb]);
        }
      }
      sync_block();
    }
  }

  const int t = row_tok[tm];
  if (t < 0) return;
  const float coef = row_coef[tm];
#pragma unroll
  for (int bb = 0; bb < 4; ++bb) {
    const int col = tp.tile * COLS + tn + 16 * bb;
    if (col >= tp.size) continue;
    const int c = tp.off + col;
    float d = 0.0f;
    if (rank > 0) d = fmaf(coef, acc[bb], d);
    for (int k = kc + 1; k < p.K; ++k) {  // later columns of this token: gather (canonical k order)
      const int sk = routed_slot(p.slots, t, k, p.K, p.L);
      if (sk < 0) continue;
      const int rk = lora::clamp_rank(p.ranks[sk], p.R);
      if (rk == 0) continue;
      const float ck = p.weights[static_cast<int64_t>(t) * p.K + k] * p.scales[sk];
      const T* brow = b + static_cast<int64_t>(sk) * p.sb0 + static_cast<int64_t>(c) * p.sb1;
      const float dot = expand_dot<T, VEC_OK, 0>(v_s + (static_cast<int64_t>(k) * p.T + t) * p.R, 1, brow, rk);
      d = fmaf(ck, dot, d);
    }
    y_update<T>(y_elem<T>(p.y, p.syt, p.ys, tp, t, col), d);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Fused shrink + expand for decode sizes. Grid (T, n_split); block = 256 threads. Phase 1: the block computes v of its
// token for all K slots and S slices (canonical shrink; warps take (k, group of 4 outputs, split) items; partials in
// shared memory, added in split order), so v never leaves the SM. Phase 2: tiles j = blockIdx.y, + n_split, ... of
// 256 y columns, each thread one column: the canonical expand with v from shared memory. Bitwise equal to BGMV shrink +
// BGMV expand. Each block re-reads A (from L2): meant for small T and small A (lora::choose_path).
// Dynamic smem: K * splits * R*S + K * R*S floats + 3K words.
// ---------------------------------------------------------------------------------------------------------------
template <typename T, bool VEC_OK>
PLLM_KERNEL(lora::kFusedThreads) lora_fused_kernel(const FusedParams p) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int NT = 4;
  const int RS = p.R * p.S;
  const int splits = static_cast<int>(lora::shrink_num_splits(p.H, VEC));
  PLLM_DYN_SMEM(float, part);                                               // [K][splits][RS]
  float* vs = part + static_cast<int64_t>(p.K) * splits * RS;               // [K][RS]
  int* ks_slot = reinterpret_cast<int*>(vs + static_cast<int64_t>(p.K) * RS);
  int* ks_rank = ks_slot + p.K;
  float* ks_coef = reinterpret_cast<float*>(ks_rank + p.K);
  const int t = bid_x();
  for (int k = tid(); k < p.K; k += nthreads()) {
    const int slot = routed_slot(p.slots, t, k, p.K, p.L);
    const int rank = slot >= 0 ? lora::clamp_rank(p.ranks[slot], p.R) : 0;
    ks_slot[k] = slot;
    ks_rank[k] = rank;
    ks_coef[k] = rank > 0 ? p.weights[static_cast<int64_t>(t) * p.K + k] * p.scales[slot] : 0.0f;
  }
  sync_block();
  bool touched = false;
  for (int k = 0; k < p.K; ++k) touched |= ks_slot[k] >= 0;
  if (!touched) return;  // block-uniform

  // Phase 1: v = x[t] . A rows (canonical shrink).
  const T* x_row = static_cast<const T*>(p.x) + static_cast<int64_t>(t) * p.sxt;
  const T* a = static_cast<const T*>(p.a);
  const int ngroups = (RS + NT - 1) / NT;
  const int items = p.K * ngroups * splits;
  const int lane = lane_id();
  for (int item = warp_id(); item < items; item += num_warps()) {
    const int k = item / (ngroups * splits);
    const int rem = item - k * ngroups * splits;
    const int g = rem / splits;
    const int w = rem - g * splits;
    const int n_used = ks_rank[k] * p.S;
    const int n0 = g * NT;
    if (n0 >= n_used) continue;  // warp-uniform: no adapter / beyond rank
    const T* a_rows[NT];
    bool a_ok[NT];
#pragma unroll
    for (int q = 0; q < NT; ++q) {
      const int n = n0 + q;
      a_ok[q] = n < n_used;
      a_rows[q] = a_ok[q] ? a + static_cast<int64_t>(ks_slot[k]) * p.sa0 + lora::combined_slice(n, p.S) * p.sa1 +
                                lora::combined_row(n, p.S) * p.sa2
                          : a;
    }
    const float r = shrink_split_partial<T, VEC_OK, 2>(x_row, a_rows, a_ok, p.H, w, lane);
    const int q = lora::rs_value_index(lane, 2);
    if (lane == lora::rs_writer_lane(q, 2) && n0 + q < RS) {
      part[(static_cast<int64_t>(k) * splits + w) * RS + n0 + q] = r;
    }
  }
  sync_block();
  for (int idx = tid(); idx < p.K * RS; idx += nthreads()) {
    const int k = idx / RS;
    const int n = idx - k * RS;
    float val = 0.0f;
    if (n < ks_rank[k] * p.S) {
      const float* pk = part + static_cast<int64_t>(k) * splits * RS + n;
      val = pk[0];
      for (int w = 1; w < splits; ++w) val += pk[static_cast<int64_t>(w) * RS];
    }
    vs[idx] = val;
  }
  sync_block();

  // Phase 2: expand this block's tiles.
  const T* b = static_cast<const T*>(p.b);
  const int total_tiles = p.grp.tile_start[p.grp.count];
  for (int j = bid_y(); j < total_tiles; j += grid_y()) {
    const lora::TilePos tp = lora::tile_slice(p.grp, j);
    const int col = tp.tile * lora::kFusedThreads + tid();
    if (col >= tp.size) continue;
    const int c = tp.off + col;
    const int s = tp.slice;
    float d = 0.0f;
    for (int k = 0; k < p.K; ++k) {
      const int rank = ks_rank[k];
      if (rank == 0) continue;
      const T* brow = b + static_cast<int64_t>(ks_slot[k]) * p.sb0 + static_cast<int64_t>(c) * p.sb1;
      const float dot = expand_dot<T, VEC_OK, 0>(vs + static_cast<int64_t>(k) * RS + s, p.S, brow, rank);
      d = fmaf(ks_coef[k], dot, d);
    }
    y_update<T>(y_elem<T>(p.y, p.syt, p.ys, tp, t, col), d);
  }
}

}  // namespace PLLM_KNS
}  // namespace pllm
