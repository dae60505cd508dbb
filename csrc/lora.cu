// Launchers of the batched multi-LoRA kernels (csrc/include/pllm/lora.cuh): plain C++ signatures declared in
// pllm_launchers.h. The kernels of each dtype are instantiated in csrc/lora_f32.cu, lora_f16.cu, lora_bf16.cu
// (parallel nvcc jobs); this file holds the entry points, argument checks and the host-side helper exports.
#include "pllm/lora_launch.cuh"
#include "pllm_launchers.h"

namespace {

using pllm::lora::cdiv;

// SM count of the current device (only steers launch choices, never results).
int current_device_sms() {
  int dev = 0;
  int n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();
    return 132;
  }
  return n > 0 ? n : 132;
}

pllm::dev::LaunchEnv device_env(uintptr_t stream, const char* op) {
  static const int count = pllm_cuda_device_count();
  PLLM_CHECK(count > 0, op << ": no CUDA device/driver is visible to the pllm_kernels CUDA extension");
  return pllm::dev::LaunchEnv{pllm::as_stream(stream), current_device_sms()};
}

}  // namespace

void pllm_lora_shrink(uintptr_t x, uintptr_t lora_a, uintptr_t slot_ranks, uintptr_t token_slots,
                      uintptr_t sorted_pairs, uintptr_t seg_slot, uintptr_t seg_start, uintptr_t seg_len, uintptr_t out,
                      int64_t num_tokens, int64_t h_in, int64_t num_slots, int64_t num_slices, int64_t max_rank,
                      int64_t k, int64_t num_chunks, int64_t chunk, int64_t x_stride0, int64_t a_stride0,
                      int64_t a_stride1, int64_t a_stride2, int dtype, int path, uintptr_t stream) {
  pllm::dev::shrink_entry(x, lora_a, slot_ranks, token_slots, sorted_pairs, seg_slot, seg_start, seg_len, out,
                          num_tokens, h_in, num_slots, num_slices, max_rank, k, num_chunks, chunk, x_stride0, a_stride0,
                          a_stride1, a_stride2, dtype, path, device_env(stream, "lora_shrink"));
}

void pllm_lora_expand(uintptr_t y, uintptr_t v, uintptr_t lora_b, uintptr_t slot_ranks, uintptr_t slot_scales,
                      uintptr_t token_slots, uintptr_t token_weights, uintptr_t sorted_pairs, uintptr_t seg_slot,
                      uintptr_t seg_start, uintptr_t seg_len, int64_t num_tokens, int64_t num_slots, int64_t max_rank,
                      int64_t k, int64_t num_chunks, int64_t chunk, const std::vector<int64_t>& slice_sizes,
                      int64_t y_stride0, int64_t b_stride0, int64_t b_stride1, int dtype, int path, uintptr_t stream) {
  pllm::dev::expand_entry(y, v, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot,
                          seg_start, seg_len, num_tokens, num_slots, max_rank, k, num_chunks, chunk, slice_sizes,
                          y_stride0, b_stride0, b_stride1, dtype, path, device_env(stream, "lora_expand"));
}

void pllm_lora_apply(uintptr_t y, uintptr_t x, uintptr_t lora_a, uintptr_t lora_b, uintptr_t slot_ranks,
                     uintptr_t slot_scales, uintptr_t token_slots, uintptr_t token_weights, uintptr_t sorted_pairs,
                     uintptr_t seg_slot, uintptr_t seg_start, uintptr_t seg_len, uintptr_t v_scratch,
                     int64_t num_tokens, int64_t h_in, int64_t num_slots, int64_t num_slices, int64_t max_rank,
                     int64_t k, int64_t num_chunks, int64_t chunk, const std::vector<int64_t>& slice_sizes,
                     int64_t x_stride0, int64_t a_stride0, int64_t a_stride1, int64_t a_stride2, int64_t y_stride0,
                     int64_t b_stride0, int64_t b_stride1, int dtype, int path, uintptr_t stream) {
  pllm::dev::apply_entry(y, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs,
                         seg_slot, seg_start, seg_len, v_scratch, num_tokens, h_in, num_slots, num_slices, max_rank, k,
                         num_chunks, chunk, slice_sizes, x_stride0, a_stride0, a_stride1, a_stride2, y_stride0,
                         b_stride0, b_stride1, dtype, path, device_env(stream, "lora_apply"));
}

void pllm_lora_apply_sliced(const std::vector<uintptr_t>& ys, const std::vector<int64_t>& y_strides, uintptr_t x,
                             uintptr_t lora_a, uintptr_t lora_b, uintptr_t slot_ranks, uintptr_t slot_scales,
                             uintptr_t token_slots, uintptr_t token_weights, uintptr_t sorted_pairs, uintptr_t seg_slot,
                             uintptr_t seg_start, uintptr_t seg_len, uintptr_t v_scratch, int64_t num_tokens,
                             int64_t h_in, int64_t num_slots, int64_t num_slices, int64_t max_rank, int64_t k,
                             int64_t num_chunks, int64_t chunk, const std::vector<int64_t>& slice_sizes,
                             int64_t x_stride0, int64_t a_stride0, int64_t a_stride1, int64_t a_stride2,
                             int64_t b_stride0, int64_t b_stride1, int dtype, int path, uintptr_t stream) {
  pllm::dev::apply_sliced_entry(ys, y_strides, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights,
                               sorted_pairs, seg_slot, seg_start, seg_len, v_scratch, num_tokens, h_in, num_slots,
                               num_slices, max_rank, k, num_chunks, chunk, slice_sizes, x_stride0, a_stride0,
                               a_stride1, a_stride2, b_stride0, b_stride1, dtype, path, device_env(stream, "lora_apply"));
}

int pllm_lora_choose_path(int path, int op, int64_t num_tokens, int64_t k, int64_t num_slices, int64_t max_rank,
                          int64_t h_in, int dtype) {
  const int esize = pllm::dtype_size(dtype);
  PLLM_CHECK(esize > 0, "unsupported dtype code " << dtype);
  PLLM_CHECK(op >= pllm::lora::kOpShrink && op <= pllm::lora::kOpApply, "op must be 0 (shrink), 1 (expand) or 2 (apply)");
  return pllm::dev::resolve_path(path, op, num_tokens, k, num_slices, max_rank, h_in, esize);
}

std::vector<std::string> pllm_lora_kernels() {
  std::vector<std::string> out;
  for (const char* dt : {"float32", "float16", "bfloat16"}) {
    const std::string d(dt);
    for (const char* ld : {"vec16", "scalar"}) {
      const std::string l(ld);
      for (const char* nt : {"nt1", "nt4"}) out.push_back("lora_shrink_bgmv<" + d + "," + l + "," + nt + ">");
      out.push_back("lora_shrink_sgmv<" + d + "," + l + ",16x16,cp.async x2>");
      if (d != "float32") out.push_back("lora_shrink_sgmv_tc<" + d + "," + l + ",16x16,mma.m16n8k16,cp.async x2>");
      out.push_back("lora_expand_sgmv<" + d + "," + l + ",16x64,cp.async x2>");
      out.push_back("lora_fused<" + d + "," + l + ">");
    }
    for (const char* rc : {"r16", "r64", "generic"}) out.push_back("lora_expand_bgmv<" + d + ",vec16," + rc + ">");
    out.push_back("lora_expand_bgmv<" + d + ",scalar,generic>");
  }
  return out;
}

std::vector<std::pair<std::string, int64_t>> pllm_lora_constants() {
  namespace L = pllm::lora;
  return {
      {"warp", L::kWarp},
      {"steps_per_split", L::kStepsPerSplit},
      {"max_slices_per_launch", L::kMaxSlicesPerLaunch},
      {"bgmv_max_pairs", L::kBgmvMaxPairs},
      {"fused_max_pairs", L::kFusedMaxPairs},
      {"fused_max_sr", L::kFusedMaxSR},
      {"fused_max_a_bytes", L::kFusedMaxABytes},
      {"max_smem_bytes", L::kMaxSmemBytes},
      {"shrink_bgmv_warps", L::kShrinkBgmvWarps},
      {"sgmv_rows", L::kSgmvRows},
      {"sgmv_shrink_cols", L::kSgmvShrinkCols},
      {"sgmv_shrink_threads", L::kSgmvShrinkThreads},
      {"sgmv_expand_cols", L::kSgmvExpandCols},
      {"sgmv_expand_threads", L::kSgmvExpandThreads},
      {"expand_rank_chunk", L::kExpandRankChunk},
      {"expand_bgmv_threads", L::kExpandBgmvThreads},
      {"fused_threads", L::kFusedThreads},
  };
}

std::vector<int64_t> pllm_lora_lane_pos(int64_t h, int elem_bytes) {
  PLLM_CHECK(elem_bytes == 2 || elem_bytes == 4, "elem_bytes must be 2 or 4");
  PLLM_CHECK(h >= 0, "h must be >= 0");
  const pllm::lora::LanePos p = pllm::lora::shrink_lane_pos(h, pllm::lora::vec_elems(elem_bytes));
  return {p.split, p.step, p.lane, p.elem};
}

std::vector<std::vector<int64_t>> pllm_lora_slice_groups(const std::vector<int64_t>& slice_sizes, int block_n) {
  PLLM_CHECK(block_n >= 1, "block_n must be >= 1");
  std::vector<std::vector<int64_t>> out;
  for (const pllm::lora::SliceGroup& g : pllm::dev::make_slice_groups(slice_sizes, block_n)) {
    std::vector<int64_t> row = {g.base, g.count};
    for (int q = 0; q < pllm::lora::kMaxSlicesPerLaunch; ++q) row.push_back(g.off[q]);
    for (int q = 0; q < pllm::lora::kMaxSlicesPerLaunch; ++q) row.push_back(g.size[q]);
    for (int q = 0; q <= pllm::lora::kMaxSlicesPerLaunch; ++q) row.push_back(g.tile_start[q]);
    out.push_back(row);
  }
  return out;
}

std::vector<int64_t> pllm_lora_tile_slice(const std::vector<int64_t>& slice_sizes, int block_n, int group, int j) {
  const auto groups = pllm::dev::make_slice_groups(slice_sizes, block_n);
  PLLM_CHECK(group >= 0 && group < static_cast<int>(groups.size()), "group out of range");
  const pllm::lora::SliceGroup& g = groups[group];
  PLLM_CHECK(j >= 0 && j < g.tile_start[g.count], "tile out of range");
  const pllm::lora::TilePos p = pllm::lora::tile_slice(g, j);
  return {p.slice, p.off, p.size, p.tile};
}

std::vector<int64_t> pllm_lora_reduce_scatter_map(int lane, int log2n, int stage) {
  PLLM_CHECK(lane >= 0 && lane < 32 && log2n >= 0 && log2n <= 5 && stage >= 0 && stage < 5, "bad arguments");
  const int q = pllm::lora::rs_value_index(lane, log2n);
  return {pllm::lora::rs_keep_upper(lane, stage) ? 1 : 0, q, pllm::lora::rs_writer_lane(q, log2n)};
}

std::vector<int64_t> pllm_lora_smem_bytes(int64_t h_in, int64_t k, int64_t num_slices, int64_t max_rank, int elem_bytes,
                                          int nt) {
  PLLM_CHECK(elem_bytes == 2 || elem_bytes == 4, "elem_bytes must be 2 or 4");
  const int vec = pllm::lora::vec_elems(elem_bytes);
  return {pllm::lora::shrink_bgmv_smem(h_in, vec, nt), pllm::lora::expand_bgmv_smem(k, max_rank),
          pllm::lora::fused_smem(k, num_slices, max_rank, h_in, vec)};
}
