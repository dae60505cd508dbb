// Host-side launch logic of the multi-LoRA kernels: argument checks, path choice, variant choice (dtype, 16-byte
// vectors or scalar loads, register tile / rank specialisations), grids. Shared by the device build (namespace
// pllm::dev: csrc/lora.cu + the per-dtype csrc/lora_*.cu files that instantiate the kernels) and the CPU emulator
// build (namespace pllm::emu: csrc/lora_emu.cpp).
//
// The typed launchers (shrink_typed<T> ...) are defined only where PLLM_LORA_DEFINE_LAUNCHERS is set, and the
// dtype-dispatching entry points only where PLLM_LORA_TYPED_ONLY is not: each dtype's kernels are compiled in one
// translation unit (csrc/lora_<dtype>.cu, parallel nvcc jobs); csrc/lora.cu sees declarations only.
#pragma once

#include "pllm/lora.cuh"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <vector>

namespace pllm {
namespace PLLM_KNS {

// Everything a launch needs besides the kernel parameters.
struct LaunchEnv {
  cudaStream_t stream;
  int num_sms;  // SM count of the device (variant / split choices only: results never depend on it)
};

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
void shrink_typed(const ShrinkParams& p, int path, const LaunchEnv& env);
template <typename T>
void expand_typed(const ExpandParams& p, const std::vector<lora::SliceGroup>& groups, int path, const LaunchEnv& env);
template <typename T>
void fused_typed(const FusedParams& p, const LaunchEnv& env);

// Slice groups of up to kMaxSlicesPerLaunch slices with tiles of `block_n` columns (no tile straddles two slices).
inline std::vector<lora::SliceGroup> make_slice_groups(const std::vector<int64_t>& sizes, int block_n) {
  std::vector<lora::SliceGroup> groups;
  int64_t off = 0;
  for (size_t base = 0; base < sizes.size(); base += lora::kMaxSlicesPerLaunch) {
    lora::SliceGroup g{};
    g.base = static_cast<int>(base);
    g.count = static_cast<int>(std::min<size_t>(lora::kMaxSlicesPerLaunch, sizes.size() - base));
    int64_t tiles = 0;
    for (int q = 0; q < g.count; ++q) {
      const int64_t n = sizes[base + q];
      g.off[q] = static_cast<int>(off);
      g.size[q] = static_cast<int>(n);
      g.tile_start[q] = static_cast<int>(tiles);
      tiles += lora::cdiv(n, block_n);
      off += n;
    }
    for (int q = g.count; q <= lora::kMaxSlicesPerLaunch; ++q) g.tile_start[q] = static_cast<int>(tiles);
    PLLM_CHECK(tiles <= 65535, "too many y column tiles in one launch: " << tiles << " (max 65535)");
    groups.push_back(g);
  }
  return groups;
}

template <typename Kernel, typename Params>
void launch_kernel(Kernel kernel, dim3 grid, dim3 block, size_t smem, const LaunchEnv& env, const Params& params) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
#if defined(PLLM_EMULATE)
  emu_rt::launch(grid, block, smem, [&]() { kernel(params); });
#else
  kernel<<<grid, block, smem, env.stream>>>(params);
  PLLM_CUDA_CHECK_LAUNCH();
#endif
}

inline void zero_async(void* ptr, size_t bytes, const LaunchEnv& env) {
  if (bytes == 0) return;
#if defined(PLLM_EMULATE)
  std::memset(ptr, 0, bytes);
#else
  PLLM_CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, env.stream));
#endif
}

inline const char* path_name(int path) {
  switch (path) {
    case lora::kPathAuto: return "auto";
    case lora::kPathSgmv: return "sgmv";
    case lora::kPathBgmv: return "bgmv";
    case lora::kPathFused: return "fused";
    case lora::kPathSgmvTc: return "sgmv_tc";
    default: return "?";
  }
}

inline void check_ptr(const void* p, const char* name, size_t align) {
  PLLM_CHECK(p != nullptr, name << ": null pointer");
  PLLM_CHECK(reinterpret_cast<uintptr_t>(p) % align == 0, name << ": pointer not " << align << "-byte aligned");
}

inline void check_dims(int64_t T, int64_t L, int64_t S, int64_t R, int64_t K) {
  PLLM_CHECK(T >= 0, "num_tokens must be >= 0, got " << T);
  PLLM_CHECK(L >= 1, "num_slots must be >= 1, got " << L);
  PLLM_CHECK(S >= 1, "num_slices must be >= 1, got " << S);
  PLLM_CHECK(R >= 0, "max_rank must be >= 0, got " << R);
  PLLM_CHECK(K >= 1, "K (slots per token) must be >= 1, got " << K);
  PLLM_CHECK(K * T < (int64_t(1) << 31) && R * S < (int64_t(1) << 24) && L < (int64_t(1) << 31),
             "sizes out of range (K*T < 2^31, R*S < 2^24)");
}

inline int resolve_path(int path, int op, int64_t T, int64_t K, int64_t S, int64_t R, int64_t H, int esize) {
  PLLM_CHECK(path >= lora::kPathAuto && path <= lora::kPathSgmvTc,
             "path code must be 0..4 (auto, sgmv, bgmv, fused, sgmv_tc), got " << path);
  const int r = lora::choose_path(path, op, T * K, S, R, H, esize, K);
  PLLM_CHECK(r >= 0, "path 'fused' exists only for lora_apply");
  return r;
}

#if !defined(PLLM_LORA_TYPED_ONLY)
// Entry points (not in the per-dtype files: they would instantiate every dtype's kernels there).
template <typename F>
void dispatch_dtype(int dtype, const char* what, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat16: f(__half{}); break;
    case kBFloat16: f(__nv_bfloat16{}); break;
    default: PLLM_CHECK(false, what << ": unsupported dtype code " << dtype << " (0 float32, 1 float16, 2 bfloat16)");
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Shrink: out (S, K*T, R) fp32 contiguous, fully overwritten.
// ---------------------------------------------------------------------------------------------------------------
inline void shrink_launch(const ShrinkParams& p, int dtype, int path, const LaunchEnv& env) {
  check_dims(p.T, p.L, p.S, p.R, p.K);
  PLLM_CHECK(p.H >= 0, "h_in must be >= 0, got " << p.H);
  PLLM_CHECK(p.G >= 0 && p.chunk >= 1, "bad routing sizes: G=" << p.G << " chunk=" << p.chunk);
  const int esize = dtype_size(dtype);
  PLLM_CHECK(esize > 0, "lora_shrink: unsupported dtype code " << dtype);
  const int64_t out_elems = static_cast<int64_t>(p.S) * p.K * p.T * p.R;
  if (out_elems == 0) return;
  check_ptr(p.out, "out", 4);
  if (p.H == 0) {  // empty dot products
    zero_async(p.out, out_elems * sizeof(float), env);
    return;
  }
  check_ptr(p.x, "x", esize);
  check_ptr(p.a, "lora_a", esize);
  check_ptr(p.ranks, "slot_ranks", 4);
  check_ptr(p.slots, "token_slots", 4);
  const int rp = resolve_path(path, lora::kOpShrink, p.T, p.K, p.S, p.R, p.H, esize);
  if (rp == lora::kPathSgmv || rp == lora::kPathSgmvTc) {
    check_ptr(p.pairs, "sorted_pairs", 4);
    check_ptr(p.seg_slot, "seg_slot", 4);
    check_ptr(p.seg_start, "seg_start", 4);
    check_ptr(p.seg_len, "seg_len", 4);
  }
  dispatch_dtype(dtype, "lora_shrink", [&](auto tag) { shrink_typed<decltype(tag)>(p, rp, env); });
}

// ---------------------------------------------------------------------------------------------------------------
// Expand: y (T, sum(slice_sizes)) += ..., v (S, K*T, R) fp32 contiguous.
// ---------------------------------------------------------------------------------------------------------------
inline void expand_launch(const ExpandParams& p, const std::vector<int64_t>& slice_sizes, int dtype, int path,
                          const LaunchEnv& env) {
  check_dims(p.T, p.L, p.S, p.R, p.K);
  PLLM_CHECK(p.G >= 0 && p.chunk >= 1, "bad routing sizes: G=" << p.G << " chunk=" << p.chunk);
  PLLM_CHECK(static_cast<int64_t>(slice_sizes.size()) == p.S,
             "slice_sizes has " << slice_sizes.size() << " entries but v has " << p.S << " slices");
  for (int64_t n : slice_sizes) PLLM_CHECK(n >= 1 && n < (int64_t(1) << 30), "slice widths must be >= 1, got " << n);
  const int esize = dtype_size(dtype);
  PLLM_CHECK(esize > 0, "lora_expand: unsupported dtype code " << dtype);
  if (p.T == 0 || p.R == 0) return;
  check_ptr(p.y, "y", esize);
  check_ptr(p.v, "v", 4);
  check_ptr(p.b, "lora_b", esize);
  check_ptr(p.ranks, "slot_ranks", 4);
  check_ptr(p.scales, "slot_scales", 4);
  check_ptr(p.slots, "token_slots", 4);
  check_ptr(p.weights, "token_weights", 4);
  const int rp = resolve_path(path, lora::kOpExpand, p.T, p.K, p.S, p.R, 0, esize);
  if (rp == lora::kPathSgmv) {
    check_ptr(p.pairs, "sorted_pairs", 4);
    check_ptr(p.seg_slot, "seg_slot", 4);
    check_ptr(p.seg_start, "seg_start", 4);
    check_ptr(p.seg_len, "seg_len", 4);
  }
  const auto groups =
      make_slice_groups(slice_sizes, rp == lora::kPathSgmv ? lora::kSgmvExpandCols : lora::kExpandBgmvThreads);
  dispatch_dtype(dtype, "lora_expand", [&](auto tag) { expand_typed<decltype(tag)>(p, groups, rp, env); });
}

// ---------------------------------------------------------------------------------------------------------------
// Apply: fused kernel, or shrink into `v_scratch` (S, K*T, R) fp32 + expand.
// ---------------------------------------------------------------------------------------------------------------
inline void apply_launch(const FusedParams& f, const ShrinkParams& sp, const ExpandParams& ep,
                         const std::vector<int64_t>& slice_sizes, int dtype, int path, const LaunchEnv& env) {
  check_dims(f.T, f.L, f.S, f.R, f.K);
  const int esize = dtype_size(dtype);
  PLLM_CHECK(esize > 0, "lora_apply: unsupported dtype code " << dtype);
  PLLM_CHECK(static_cast<int64_t>(slice_sizes.size()) == f.S,
             "slice_sizes has " << slice_sizes.size() << " entries but lora_a has " << f.S << " slices");
  if (f.T == 0 || f.R == 0) return;
  const int rp = resolve_path(path, lora::kOpApply, f.T, f.K, f.S, f.R, f.H, esize);
  if (rp != lora::kPathFused) {
    PLLM_CHECK(sp.out != nullptr, "lora_apply: path '" << path_name(rp) << "' needs the fp32 v scratch (S, K*T, R)");
    shrink_launch(sp, dtype, rp, env);
    expand_launch(ep, slice_sizes, dtype, rp, env);
    return;
  }
  PLLM_CHECK(f.S <= lora::kMaxSlicesPerLaunch,
             "the fused kernel handles at most " << lora::kMaxSlicesPerLaunch << " slices, got " << f.S);
  const int64_t smem = lora::fused_smem(f.K, f.S, f.R, f.H, lora::vec_elems(esize));
  PLLM_CHECK(smem <= lora::kMaxSmemBytes,
             "the fused kernel needs " << smem << " bytes of shared memory (max " << lora::kMaxSmemBytes
                                       << "): use path 'bgmv'");
  for (int64_t n : slice_sizes) PLLM_CHECK(n >= 1 && n < (int64_t(1) << 30), "slice widths must be >= 1, got " << n);
  check_ptr(f.y, "y", esize);
  check_ptr(f.x, "x", esize);
  check_ptr(f.a, "lora_a", esize);
  check_ptr(f.b, "lora_b", esize);
  check_ptr(f.ranks, "slot_ranks", 4);
  check_ptr(f.scales, "slot_scales", 4);
  check_ptr(f.slots, "token_slots", 4);
  check_ptr(f.weights, "token_weights", 4);
  FusedParams q = f;
  q.grp = make_slice_groups(slice_sizes, lora::kFusedThreads).front();
  dispatch_dtype(dtype, "lora_apply", [&](auto tag) { fused_typed<decltype(tag)>(q, env); });
}

// ---------------------------------------------------------------------------------------------------------------
// Parameter structs from the plain launcher arguments (pllm_launchers.h), with range checks.
// ---------------------------------------------------------------------------------------------------------------
inline int as_int(int64_t v, const char* name) {
  PLLM_CHECK(v >= 0 && v <= INT32_MAX, name << " out of range [0, 2^31): " << v);
  return static_cast<int>(v);
}
template <typename P>
inline P* as_p(uintptr_t v) {
  return reinterpret_cast<P*>(v);
}

inline ShrinkParams make_shrink_params(uintptr_t x, uintptr_t a, uintptr_t ranks, uintptr_t slots, uintptr_t pairs,
                                       uintptr_t seg_slot, uintptr_t seg_start, uintptr_t seg_len, uintptr_t out,
                                       int64_t T, int64_t H, int64_t L, int64_t S, int64_t R, int64_t K, int64_t G,
                                       int64_t chunk, int64_t sxt, int64_t sa0, int64_t sa1, int64_t sa2) {
  ShrinkParams p{};
  p.x = as_p<const void>(x);
  p.a = as_p<const void>(a);
  p.ranks = as_p<const int32_t>(ranks);
  p.slots = as_p<const int32_t>(slots);
  p.pairs = as_p<const int32_t>(pairs);
  p.seg_slot = as_p<const int32_t>(seg_slot);
  p.seg_start = as_p<const int32_t>(seg_start);
  p.seg_len = as_p<const int32_t>(seg_len);
  p.out = as_p<float>(out);
  p.T = as_int(T, "num_tokens");
  p.H = as_int(H, "h_in");
  p.L = as_int(L, "num_slots");
  p.S = as_int(S, "num_slices");
  p.R = as_int(R, "max_rank");
  p.K = as_int(K, "k");
  p.G = as_int(G, "num_chunks");
  p.chunk = as_int(chunk, "chunk");
  PLLM_CHECK(sxt >= 0 && sa0 >= 0 && sa1 >= 0 && sa2 >= 0, "strides must be >= 0");
  p.sxt = sxt;
  p.sa0 = sa0;
  p.sa1 = sa1;
  p.sa2 = sa2;
  return p;
}

inline ExpandParams make_expand_params(uintptr_t y, uintptr_t v, uintptr_t b, uintptr_t ranks, uintptr_t scales,
                                       uintptr_t slots, uintptr_t weights, uintptr_t pairs, uintptr_t seg_slot,
                                       uintptr_t seg_start, uintptr_t seg_len, int64_t T, int64_t L, int64_t R,
                                       int64_t K, int64_t G, int64_t chunk, int64_t S, int64_t syt, int64_t sb0,
                                       int64_t sb1) {
  ExpandParams p{};
  p.y = as_p<void>(y);
  p.v = as_p<const float>(v);
  p.b = as_p<const void>(b);
  p.ranks = as_p<const int32_t>(ranks);
  p.scales = as_p<const float>(scales);
  p.slots = as_p<const int32_t>(slots);
  p.weights = as_p<const float>(weights);
  p.pairs = as_p<const int32_t>(pairs);
  p.seg_slot = as_p<const int32_t>(seg_slot);
  p.seg_start = as_p<const int32_t>(seg_start);
  p.seg_len = as_p<const int32_t>(seg_len);
  p.T = as_int(T, "num_tokens");
  p.L = as_int(L, "num_slots");
  p.R = as_int(R, "max_rank");
  p.K = as_int(K, "k");
  p.G = as_int(G, "num_chunks");
  p.chunk = as_int(chunk, "chunk");
  p.S = as_int(S, "num_slices");
  PLLM_CHECK(syt >= 0 && sb0 >= 0 && sb1 >= 0, "strides must be >= 0");
  p.syt = syt;
  p.sb0 = sb0;
  p.sb1 = sb1;
  return p;
}

inline FusedParams make_fused_params(uintptr_t y, uintptr_t x, uintptr_t a, uintptr_t b, uintptr_t ranks,
                                     uintptr_t scales, uintptr_t slots, uintptr_t weights, int64_t T, int64_t H,
                                     int64_t L, int64_t S, int64_t R, int64_t K, int64_t sxt, int64_t sa0, int64_t sa1,
                                     int64_t sa2, int64_t syt, int64_t sb0, int64_t sb1) {
  FusedParams p{};
  p.y = as_p<void>(y);
  p.x = as_p<const void>(x);
  p.a = as_p<const void>(a);
  p.b = as_p<const void>(b);
  p.ranks = as_p<const int32_t>(ranks);
  p.scales = as_p<const float>(scales);
  p.slots = as_p<const int32_t>(slots);
  p.weights = as_p<const float>(weights);
  p.T = as_int(T, "num_tokens");
  p.H = as_int(H, "h_in");
  p.L = as_int(L, "num_slots");
  p.S = as_int(S, "num_slices");
  p.R = as_int(R, "max_rank");
  p.K = as_int(K, "k");
  PLLM_CHECK(sxt >= 0 && sa0 >= 0 && sa1 >= 0 && sa2 >= 0 && syt >= 0 && sb0 >= 0 && sb1 >= 0,
             "strides must be >= 0");
  p.sxt = sxt;
  p.sa0 = sa0;
  p.sa1 = sa1;
  p.sa2 = sa2;
  p.syt = syt;
  p.sb0 = sb0;
  p.sb1 = sb1;
  return p;
}

// The three entry points behind pllm_lora_{shrink,expand,apply}[_emu] (same arguments, an environment to run in).
inline void shrink_entry(uintptr_t x, uintptr_t lora_a, uintptr_t slot_ranks, uintptr_t token_slots,
                         uintptr_t sorted_pairs, uintptr_t seg_slot, uintptr_t seg_start, uintptr_t seg_len,
                         uintptr_t out, int64_t T, int64_t H, int64_t L, int64_t S, int64_t R, int64_t K, int64_t G,
                         int64_t chunk, int64_t sxt, int64_t sa0, int64_t sa1, int64_t sa2, int dtype, int path,
                         const LaunchEnv& env) {
  const ShrinkParams p = make_shrink_params(x, lora_a, slot_ranks, token_slots, sorted_pairs, seg_slot, seg_start,
                                            seg_len, out, T, H, L, S, R, K, G, chunk, sxt, sa0, sa1, sa2);
  shrink_launch(p, dtype, path, env);
}

inline void expand_entry(uintptr_t y, uintptr_t v, uintptr_t lora_b, uintptr_t slot_ranks, uintptr_t slot_scales,
                         uintptr_t token_slots, uintptr_t token_weights, uintptr_t sorted_pairs, uintptr_t seg_slot,
                         uintptr_t seg_start, uintptr_t seg_len, int64_t T, int64_t L, int64_t R, int64_t K, int64_t G,
                         int64_t chunk, const std::vector<int64_t>& slice_sizes, int64_t syt, int64_t sb0,
                         int64_t sb1, int dtype, int path, const LaunchEnv& env) {
  const ExpandParams p =
      make_expand_params(y, v, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot,
                         seg_start, seg_len, T, L, R, K, G, chunk, static_cast<int64_t>(slice_sizes.size()), syt,
                         sb0, sb1);
  expand_launch(p, slice_sizes, dtype, path, env);
}

inline void apply_entry(uintptr_t y, uintptr_t x, uintptr_t lora_a, uintptr_t lora_b, uintptr_t slot_ranks,
                        uintptr_t slot_scales, uintptr_t token_slots, uintptr_t token_weights, uintptr_t sorted_pairs,
                        uintptr_t seg_slot, uintptr_t seg_start, uintptr_t seg_len, uintptr_t v_scratch, int64_t T,
                        int64_t H, int64_t L, int64_t S, int64_t R, int64_t K, int64_t G, int64_t chunk,
                        const std::vector<int64_t>& slice_sizes, int64_t sxt, int64_t sa0, int64_t sa1, int64_t sa2,
                        int64_t syt, int64_t sb0, int64_t sb1, int dtype, int path, const LaunchEnv& env) {
  const FusedParams f = make_fused_params(y, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights,
                                          T, H, L, S, R, K, sxt, sa0, sa1, sa2, syt, sb0, sb1);
  const ShrinkParams sp = make_shrink_params(x, lora_a, slot_ranks, token_slots, sorted_pairs, seg_slot, seg_start,
                                             seg_len, v_scratch, T, H, L, S, R, K, G, chunk, sxt, sa0, sa1, sa2);
  const ExpandParams ep = make_expand_params(y, v_scratch, lora_b, slot_ranks, slot_scales, token_slots,
                                             token_weights, sorted_pairs, seg_slot, seg_start, seg_len, T, L, R, K, G,
                                             chunk, S, syt, sb0, sb1);
  apply_launch(f, sp, ep, slice_sizes, dtype, path, env);
}

// lora_apply with one output per slice (`ys[s]` with row stride `y_strides[s]`, unit column stride): the same kernels,
// each slice's columns written into its own tensor; at most kMaxSlicesPerLaunch slices (one slice group).
inline void apply_sliced_entry(const std::vector<uintptr_t>& ys, const std::vector<int64_t>& y_strides, uintptr_t x,
                               uintptr_t lora_a, uintptr_t lora_b, uintptr_t slot_ranks, uintptr_t slot_scales,
                               uintptr_t token_slots, uintptr_t token_weights, uintptr_t sorted_pairs,
                               uintptr_t seg_slot, uintptr_t seg_start, uintptr_t seg_len, uintptr_t v_scratch,
                               int64_t T, int64_t H, int64_t L, int64_t S, int64_t R, int64_t K, int64_t G,
                               int64_t chunk, const std::vector<int64_t>& slice_sizes, int64_t sxt, int64_t sa0,
                               int64_t sa1, int64_t sa2, int64_t sb0, int64_t sb1, int dtype, int path,
                               const LaunchEnv& env) {
  PLLM_CHECK(S >= 1 && S <= lora::kMaxSlicesPerLaunch,
             "lora_apply: per-slice outputs take 1.." << lora::kMaxSlicesPerLaunch << " slices, got " << S);
  PLLM_CHECK(static_cast<int64_t>(ys.size()) == S && static_cast<int64_t>(y_strides.size()) == S,
             "lora_apply: one output pointer and row stride per slice: got " << ys.size() << " and "
                                                                             << y_strides.size() << " for " << S);
  const int esize = dtype_size(dtype);
  PLLM_CHECK(esize > 0, "lora_apply: unsupported dtype code " << dtype);
  YSlices sl{};
  sl.on = 1;
  for (int64_t q = 0; q < S; ++q) {
    check_ptr(as_p<const void>(ys[q]), "y[s]", esize);
    PLLM_CHECK(y_strides[q] >= 0, "y[" << q << "]: row stride must be >= 0");
    sl.ptr[q] = as_p<void>(ys[q]);
    sl.stride[q] = y_strides[q];
  }
  FusedParams f = make_fused_params(ys[0], x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights,
                                    T, H, L, S, R, K, sxt, sa0, sa1, sa2, y_strides[0], sb0, sb1);
  const ShrinkParams sp = make_shrink_params(x, lora_a, slot_ranks, token_slots, sorted_pairs, seg_slot, seg_start,
                                             seg_len, v_scratch, T, H, L, S, R, K, G, chunk, sxt, sa0, sa1, sa2);
  ExpandParams ep = make_expand_params(ys[0], v_scratch, lora_b, slot_ranks, slot_scales, token_slots,
                                       token_weights, sorted_pairs, seg_slot, seg_start, seg_len, T, L, R, K, G,
                                       chunk, S, y_strides[0], sb0, sb1);
  f.ys = sl;
  ep.ys = sl;
  apply_launch(f, sp, ep, slice_sizes, dtype, path, env);
}

#endif  // !PLLM_LORA_TYPED_ONLY

#if defined(PLLM_LORA_DEFINE_LAUNCHERS)
// ---------------------------------------------------------------------------------------------------------------
// Typed launchers (variant choice + grids). Instantiated once per dtype.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
void shrink_typed(const ShrinkParams& p, int path, const LaunchEnv& env) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vec_ok = aligned16(p.x) && aligned16(p.a) && p.H % VEC == 0 && p.sxt % VEC == 0 && p.sa0 % VEC == 0 &&
                      p.sa1 % VEC == 0 && p.sa2 % VEC == 0;
  const int64_t RS = static_cast<int64_t>(p.R) * p.S;
  const int64_t splits = lora::shrink_num_splits(p.H, VEC);
  if (path == lora::kPathBgmv) {
    const int64_t pairs = static_cast<int64_t>(p.K) * p.T;
    // 4 outputs per block when that still gives two blocks per SM, else one (more blocks for tiny decode batches).
    const int log2nt = pairs * lora::cdiv(RS, 4) >= 2 * static_cast<int64_t>(env.num_sms) ? 2 : 0;
    const int nt = 1 << log2nt;
    const int64_t smem = lora::shrink_bgmv_smem(p.H, VEC, nt);
    PLLM_CHECK(smem <= lora::kMaxSmemBytes, "lora_shrink: h_in=" << p.H << " too large for the BGMV kernel");
    const dim3 grid(static_cast<unsigned>(pairs), static_cast<unsigned>(lora::cdiv(RS, nt)), 1);
    PLLM_CHECK(grid.y <= 65535, "lora_shrink: R*S too large");
    const dim3 block(32 * static_cast<unsigned>(std::min<int64_t>(splits, lora::kShrinkBgmvWarps)));
    if (vec_ok) {
      if (log2nt == 2) launch_kernel(lora_shrink_bgmv_kernel<T, true, 2>, grid, block, smem, env, p);
      else launch_kernel(lora_shrink_bgmv_kernel<T, true, 0>, grid, block, smem, env, p);
    } else {
      if (log2nt == 2) launch_kernel(lora_shrink_bgmv_kernel<T, false, 2>, grid, block, smem, env, p);
      else launch_kernel(lora_shrink_bgmv_kernel<T, false, 0>, grid, block, smem, env, p);
    }
  } else {
    zero_async(p.out, static_cast<size_t>(p.S) * p.K * p.T * p.R * sizeof(float), env);
    const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(p.K) * p.G),
                    static_cast<unsigned>(lora::cdiv(RS, lora::kSgmvShrinkCols)),
                    static_cast<unsigned>(lora::cdiv(p.chunk, lora::kSgmvRows)));
    PLLM_CHECK(grid.y <= 65535 && grid.z <= 65535, "lora_shrink: R*S or chunk too large");
    const dim3 block(lora::kSgmvShrinkThreads);
    if constexpr (sizeof(T) == 2) {
      if (path == lora::kPathSgmvTc) {
        if (vec_ok) launch_kernel(lora_shrink_sgmv_tc_kernel<T, true>, grid, block, 0, env, p);
        else launch_kernel(lora_shrink_sgmv_tc_kernel<T, false>, grid, block, 0, env, p);
        return;
      }
    }
    if (vec_ok) launch_kernel(lora_shrink_sgmv_kernel<T, true>, grid, block, 0, env, p);
    else launch_kernel(lora_shrink_sgmv_kernel<T, false>, grid, block, 0, env, p);
  }
}

template <typename T>
void expand_typed(const ExpandParams& p0, const std::vector<lora::SliceGroup>& groups, int path,
                  const LaunchEnv& env) {
  constexpr int VEC = 16 / sizeof(T);
  const bool b_vec = aligned16(p0.b) && p0.R % VEC == 0 && p0.sb0 % VEC == 0 && p0.sb1 % VEC == 0;
  ExpandParams p = p0;
  for (const lora::SliceGroup& g : groups) {
    p.grp = g;
    const unsigned tiles = static_cast<unsigned>(g.tile_start[g.count]);
    if (path == lora::kPathBgmv) {
      const int64_t smem = lora::expand_bgmv_smem(p.K, p.R);
      PLLM_CHECK(smem <= lora::kMaxSmemBytes, "lora_expand: K * max_rank too large for the BGMV kernel");
      const dim3 grid(static_cast<unsigned>(p.T), tiles, 1);
      const dim3 block(lora::kExpandBgmvThreads);
      if (!b_vec) launch_kernel(lora_expand_bgmv_kernel<T, false, 0>, grid, block, smem, env, p);
      else if (p.R <= 16) launch_kernel(lora_expand_bgmv_kernel<T, true, 16>, grid, block, smem, env, p);
      else if (p.R <= 64) launch_kernel(lora_expand_bgmv_kernel<T, true, 64>, grid, block, smem, env, p);
      else launch_kernel(lora_expand_bgmv_kernel<T, true, 0>, grid, block, smem, env, p);
    } else {
      const bool vec_ok = b_vec && aligned16(p.v) && p.R % 4 == 0;
      const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(p.K) * p.G), tiles,
                      static_cast<unsigned>(lora::cdiv(p.chunk, lora::kSgmvRows)));
      PLLM_CHECK(grid.z <= 65535, "lora_expand: chunk too large");
      const dim3 block(lora::kSgmvExpandThreads);
      if (vec_ok) launch_kernel(lora_expand_sgmv_kernel<T, true>, grid, block, 0, env, p);
      else launch_kernel(lora_expand_sgmv_kernel<T, false>, grid, block, 0, env, p);
    }
  }
}

template <typename T>
void fused_typed(const FusedParams& p, const LaunchEnv& env) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vec_ok = aligned16(p.x) && aligned16(p.a) && p.H % VEC == 0 && p.sxt % VEC == 0 && p.sa0 % VEC == 0 &&
                      p.sa1 % VEC == 0 && p.sa2 % VEC == 0 && aligned16(p.b) && p.R % VEC == 0 &&
                      p.sb0 % VEC == 0 && p.sb1 % VEC == 0;
  const int64_t tiles = p.grp.tile_start[p.grp.count];
  const int64_t n_split = std::max<int64_t>(1, std::min<int64_t>(tiles, lora::cdiv(env.num_sms, std::max(p.T, 1))));
  const int64_t smem = lora::fused_smem(p.K, p.S, p.R, p.H, VEC);
  const dim3 grid(static_cast<unsigned>(p.T), static_cast<unsigned>(n_split), 1);
  const dim3 block(lora::kFusedThreads);
  if (vec_ok) launch_kernel(lora_fused_kernel<T, true>, grid, block, smem, env, p);
  else launch_kernel(lora_fused_kernel<T, false>, grid, block, smem, env, p);
}
#endif  // PLLM_LORA_DEFINE_LAUNCHERS

}  // namespace PLLM_KNS
}  // namespace pllm
