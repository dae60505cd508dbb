// Plain C++ declarations of every CUDA launcher in csrc/*.cu.
// Included by python_bindings/*.cpp, which are compiled by the host compiler: no CUDA or torch headers here.
// Conventions: device pointers and streams are passed as uintptr_t (tensor.data_ptr(),
// torch.cuda.current_stream().cuda_stream); dtype codes: 0 = float32, 1 = float16, 2 = bfloat16.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

// ---- probe.cu: capabilities ----------------------------------------------------------------------------------
// Number of visible CUDA devices; 0 (never throws) when there is no driver or no device.
int pllm_cuda_device_count();
// CUDA runtime version the extension was built with (static cudart), e.g. "13.0".
std::string pllm_cuda_runtime_version();
// Installed driver's CUDA version, e.g. "13.0", or "none" when no driver is present.
std::string pllm_cuda_driver_version();
// SASS architectures compiled into the extension, e.g. {80, 90}.
std::vector<int> pllm_compiled_archs();
// Architecture whose PTX is embedded (JIT for newer GPUs), 0 if none.
int pllm_ptx_arch();
// Name of device `index`; throws std::runtime_error for an invalid index.
std::string pllm_device_name(int index);
// Compute capability of device `index` as major*10+minor (e.g. 90); throws for an invalid index.
int pllm_device_capability(int index);

// ---- probe.cu: smoke-test kernel -----------------------------------------------------------------------------
// out[i] = value for i in [0, n) on `stream` (asynchronous). `ptr` is a float32 device pointer.
void pllm_fill_f32(uintptr_t ptr, int64_t n, float value, uintptr_t stream);

// ---- lora.cu: batched multi-LoRA (shrink / expand / apply; BGMV, SGMV, fused) -----------------------------------
#include <utility>

// Semantics: pllm_kernels/reference/lora.py; kernel design: csrc/include/pllm/lora.cuh. All sizes are element counts,
// strides are element strides (the innermost stride of x, lora_a, lora_b, y must be 1). out / v (S, K*T, R) float32,
// token_slots / sorted_pairs / seg_* / slot_ranks int32 and token_weights / slot_scales float32 are contiguous.
// path: 0 auto, 1 sgmv, 2 bgmv, 3 fused (apply only). Asynchronous on `stream`; std::runtime_error on bad arguments
// or when no CUDA device is present. Every path gives bitwise identical results (see lora_tiling.h).
//   x (T, h_in); lora_a (L, S, R, h_in); lora_b (L, sum(slice_sizes), R); y (T, sum(slice_sizes));
//   token_slots / token_weights (T, K); sorted_pairs (K*T,); seg_slot / seg_start / seg_len (K, G).
void pllm_lora_shrink(uintptr_t x, uintptr_t lora_a, uintptr_t slot_ranks, uintptr_t token_slots,
                      uintptr_t sorted_pairs, uintptr_t seg_slot, uintptr_t seg_start, uintptr_t seg_len, uintptr_t out,
                      int64_t num_tokens, int64_t h_in, int64_t num_slots, int64_t num_slices, int64_t max_rank,
                      int64_t k, int64_t num_chunks, int64_t chunk, int64_t x_stride0, int64_t a_stride0,
                      int64_t a_stride1, int64_t a_stride2, int dtype, int path, uintptr_t stream);
void pllm_lora_expand(uintptr_t y, uintptr_t v, uintptr_t lora_b, uintptr_t slot_ranks, uintptr_t slot_scales,
                      uintptr_t token_slots, uintptr_t token_weights, uintptr_t sorted_pairs, uintptr_t seg_slot,
                      uintptr_t seg_start, uintptr_t seg_len, int64_t num_tokens, int64_t num_slots, int64_t max_rank,
                      int64_t k, int64_t num_chunks, int64_t chunk, const std::vector<int64_t>& slice_sizes,
                      int64_t y_stride0, int64_t b_stride0, int64_t b_stride1, int dtype, int path, uintptr_t stream);
// v_scratch: (S, K*T, R) float32 for the sgmv / bgmv paths (shrink then expand); may be 0 when the path is fused.
// lora_apply with one output per slice: ys[s] (row stride y_strides[s], unit column stride) receives slice s's columns
// (S <= 8). Same kernels, paths and bits as pllm_lora_apply.
void pllm_lora_apply_sliced(const std::vector<uintptr_t>& ys, const std::vector<int64_t>& y_strides, uintptr_t x,
                             uintptr_t lora_a, uintptr_t lora_b, uintptr_t slot_ranks, uintptr_t slot_scales,
                             uintptr_t token_slots, uintptr_t token_weights, uintptr_t sorted_pairs, uintptr_t seg_slot,
                             uintptr_t seg_start, uintptr_t seg_len, uintptr_t v_scratch, int64_t num_tokens,
                             int64_t h_in, int64_t num_slots, int64_t num_slices, int64_t max_rank, int64_t k,
                             int64_t num_chunks, int64_t chunk, const std::vector<int64_t>& slice_sizes,
                             int64_t x_stride0, int64_t a_stride0, int64_t a_stride1, int64_t a_stride2,
                             int64_t b_stride0, int64_t b_stride1, int dtype, int path, uintptr_t stream);
void pllm_lora_apply_sliced_emu(const std::vector<uintptr_t>& ys, const std::vector<int64_t>& y_strides, uintptr_t x,
                             uintptr_t lora_a, uintptr_t lora_b, uintptr_t slot_ranks, uintptr_t slot_scales,
                             uintptr_t token_slots, uintptr_t token_weights, uintptr_t sorted_pairs, uintptr_t seg_slot,
                             uintptr_t seg_start, uintptr_t seg_len, uintptr_t v_scratch, int64_t num_tokens,
                             int64_t h_in, int64_t num_slots, int64_t num_slices, int64_t max_rank, int64_t k,
                             int64_t num_chunks, int64_t chunk, const std::vector<int64_t>& slice_sizes,
                             int64_t x_stride0, int64_t a_stride0, int64_t a_stride1, int64_t a_stride2,
                             int64_t b_stride0, int64_t b_stride1, int dtype, int path, int num_sms);
void pllm_lora_apply(uintptr_t y, uintptr_t x, uintptr_t lora_a, uintptr_t lora_b, uintptr_t slot_ranks,
                     uintptr_t slot_scales, uintptr_t token_slots, uintptr_t token_weights, uintptr_t sorted_pairs,
                     uintptr_t seg_slot, uintptr_t seg_start, uintptr_t seg_len, uintptr_t v_scratch,
                     int64_t num_tokens, int64_t h_in, int64_t num_slots, int64_t num_slices, int64_t max_rank,
                     int64_t k, int64_t num_chunks, int64_t chunk, const std::vector<int64_t>& slice_sizes,
                     int64_t x_stride0, int64_t a_stride0, int64_t a_stride1, int64_t a_stride2, int64_t y_stride0,
                     int64_t b_stride0, int64_t b_stride1, int dtype, int path, uintptr_t stream);
// The path a call resolves to (1 sgmv, 2 bgmv, 3 fused); op: 0 shrink, 1 expand, 2 apply. Throws for bad requests.
int pllm_lora_choose_path(int path, int op, int64_t num_tokens, int64_t k, int64_t num_slices, int64_t max_rank,
                          int64_t h_in, int dtype);
// Names of the compiled kernel variants (dtype x load width x tile / rank specialisation).
std::vector<std::string> pllm_lora_kernels();
// Tiling constants and thresholds (name -> value), for tests and the Python side.
std::vector<std::pair<std::string, int64_t>> pllm_lora_constants();
// Host-side evaluation of the __host__ __device__ index helpers (lora_tiling.h), for CPU tests:
// canonical shrink owner of element h: (split, step, lane, elem).
std::vector<int64_t> pllm_lora_lane_pos(int64_t h, int elem_bytes);
// slice groups of `block_n`-column tiles: per group (base, count, off[8], size[8], tile_start[9]).
std::vector<std::vector<int64_t>> pllm_lora_slice_groups(const std::vector<int64_t>& slice_sizes, int block_n);
// flat tile j of group `group` -> (slice in group, first column, width, tile in slice).
std::vector<int64_t> pllm_lora_tile_slice(const std::vector<int64_t>& slice_sizes, int block_n, int group, int j);
// warp reduce-scatter: (keep_upper at stage, value index, writer lane of that value).
std::vector<int64_t> pllm_lora_reduce_scatter_map(int lane, int log2n, int stage);
// shared memory bytes of (bgmv shrink, bgmv expand, fused) for the sizes.
std::vector<int64_t> pllm_lora_smem_bytes(int64_t h_in, int64_t k, int64_t num_slices, int64_t max_rank, int elem_bytes,
                                          int nt);

// ---- lora_emu.cpp: the same kernels on the CPU emulator (tests only) -------------------------------------------
// Emulator modes: cp.async copies land at issue (true) or at their wait (false, default); threads of a block run in
// reverse index order (true) or in order (false, default). Tests run both to expose read-before-wait and
// refill-while-read hazards.
void pllm_emu_config(bool cp_async_eager, bool reverse_thread_order);
// Identical arguments with host pointers (CPU tensors); `num_sms` replaces the stream (it only steers variant and
// split choices, never results). Slow: tiny shapes only.
void pllm_lora_shrink_emu(uintptr_t x, uintptr_t lora_a, uintptr_t slot_ranks, uintptr_t token_slots,
                          uintptr_t sorted_pairs, uintptr_t seg_slot, uintptr_t seg_start, uintptr_t seg_len,
                          uintptr_t out, int64_t num_tokens, int64_t h_in, int64_t num_slots, int64_t num_slices,
                          int64_t max_rank, int64_t k, int64_t num_chunks, int64_t chunk, int64_t x_stride0,
                          int64_t a_stride0, int64_t a_stride1, int64_t a_stride2, int dtype, int path, int num_sms);
void pllm_lora_expand_emu(uintptr_t y, uintptr_t v, uintptr_t lora_b, uintptr_t slot_ranks, uintptr_t slot_scales,
                          uintptr_t token_slots, uintptr_t token_weights, uintptr_t sorted_pairs, uintptr_t seg_slot,
                          uintptr_t seg_start, uintptr_t seg_len, int64_t num_tokens, int64_t num_slots,
                          int64_t max_rank, int64_t k, int64_t num_chunks, int64_t chunk,
                          const std::vector<int64_t>& slice_sizes, int64_t y_stride0, int64_t b_stride0,
                          int64_t b_stride1, int dtype, int path, int num_sms);
void pllm_lora_apply_emu(uintptr_t y, uintptr_t x, uintptr_t lora_a, uintptr_t lora_b, uintptr_t slot_ranks,
                         uintptr_t slot_scales, uintptr_t token_slots, uintptr_t token_weights, uintptr_t sorted_pairs,
                         uintptr_t seg_slot, uintptr_t seg_start, uintptr_t seg_len, uintptr_t v_scratch,
                         int64_t num_tokens, int64_t h_in, int64_t num_slots, int64_t num_slices, int64_t max_rank,
                         int64_t k, int64_t num_chunks, int64_t chunk, const std::vector<int64_t>& slice_sizes,
                         int64_t x_stride0, int64_t a_stride0, int64_t a_stride1, int64_t a_stride2,
                         int64_t y_stride0, int64_t b_stride0, int64_t b_stride1, int dtype, int path, int num_sms);

// ---- steer.cu: per-token activation steering (steer_add, steer_rmsnorm) ------------------------------------------
// Semantics: pllm_kernels/reference/steer.py; kernel design: csrc/include/pllm/steer.cuh. Sizes are element counts,
// strides element strides (the innermost stride of h, out and vectors must be 1); slot_modes (L,) int32, token_slots
// (T, K) int32 and token_scales (T, K) float32 are contiguous; weight (H,) is contiguous. dtype: h / out; vec_dtype
// (vectors) and w_dtype (weight) are float32 or dtype. hidden <= 16384. Asynchronous on `stream`; std::runtime_error
// on bad arguments or when no CUDA device is present. Rows whose K slots are all -1 (or >= num_slots) are not written.
void pllm_steer_add(uintptr_t h, uintptr_t vectors, uintptr_t slot_modes, uintptr_t token_slots,
                    uintptr_t token_scales, int64_t num_tokens, int64_t hidden, int64_t num_slots, int64_t k,
                    int64_t h_stride0, int64_t v_stride0, int dtype, int vec_dtype, uintptr_t stream);
// weight_offset: 0 Llama-style norm (weight * T(n)), 1 Gemma-style ((1 + weight) * n).
void pllm_steer_rmsnorm(uintptr_t out, uintptr_t h, uintptr_t weight, uintptr_t vectors, uintptr_t slot_modes,
                        uintptr_t token_slots, uintptr_t token_scales, int64_t num_tokens, int64_t hidden,
                        int64_t num_slots, int64_t k, int64_t h_stride0, int64_t v_stride0, int64_t out_stride0,
                        double eps, double weight_offset, int dtype, int vec_dtype, int w_dtype, uintptr_t stream);
// Names of the compiled steering kernel variants, and the one a call with these pointers / strides would run.
std::vector<std::string> pllm_steer_kernels();
std::string pllm_steer_variant(uintptr_t h, uintptr_t out, uintptr_t weight, uintptr_t vectors, int64_t hidden,
                               int64_t h_stride0, int64_t v_stride0, int64_t out_stride0, int dtype, int vec_dtype,
                               int w_dtype, bool norm);
// Constants (name -> value) and the threads per block (one row per block) for a hidden size.
std::vector<std::pair<std::string, int64_t>> pllm_steer_constants();
int64_t pllm_steer_block_threads(int64_t hidden);
// steer_emu.cpp: the same kernels on the CPU emulator (host pointers, no stream; tests only).
void pllm_steer_add_emu(uintptr_t h, uintptr_t vectors, uintptr_t slot_modes, uintptr_t token_slots,
                        uintptr_t token_scales, int64_t num_tokens, int64_t hidden, int64_t num_slots, int64_t k,
                        int64_t h_stride0, int64_t v_stride0, int dtype, int vec_dtype);
void pllm_steer_rmsnorm_emu(uintptr_t out, uintptr_t h, uintptr_t weight, uintptr_t vectors, uintptr_t slot_modes,
                            uintptr_t token_slots, uintptr_t token_scales, int64_t num_tokens, int64_t hidden,
                            int64_t num_slots, int64_t k, int64_t h_stride0, int64_t v_stride0, int64_t out_stride0,
                            double eps, double weight_offset, int dtype, int vec_dtype, int w_dtype);

// ---- decoding.cu: mixing log-prob sources (mix_logprobs) ---------------------------------------------------------
// Semantics: pllm_kernels/reference/decoding.py; kernel design: csrc/include/pllm/decoding.cuh. out (B, V) float32 =
// log_softmax(sum_i coefs[b, i] * log_softmax(sources[i, b])); sources (S, B, V) of `dtype` with unit innermost
// stride, coefs (B, S) float32 (any strides), out with unit innermost stride; 1 <= S <= 64. Element strides.
// Asynchronous on `stream`; std::runtime_error on bad arguments or when no CUDA device is present.
void pllm_mix_logprobs(uintptr_t out, uintptr_t sources, uintptr_t coefs, int64_t num_sources, int64_t batch,
                       int64_t vocab, int64_t src_stride0, int64_t src_stride1, int64_t coef_stride0,
                       int64_t coef_stride1, int64_t out_stride0, int dtype, uintptr_t stream);
std::vector<std::string> pllm_decoding_kernels();
std::vector<std::pair<std::string, int64_t>> pllm_decoding_constants();
// decoding_emu.cpp: the same kernel on the CPU emulator (host pointers, no stream; tests only), and the kernels'
// exp / log (pllm/fmath.cuh) evaluated on the host ("exp" or "log"), for accuracy tests.
void pllm_mix_logprobs_emu(uintptr_t out, uintptr_t sources, uintptr_t coefs, int64_t num_sources, int64_t batch,
                           int64_t vocab, int64_t src_stride0, int64_t src_stride1, int64_t coef_stride0,
                           int64_t coef_stride1, int64_t out_stride0, int dtype);
std::vector<float> pllm_fmath_eval(const std::string& fn, const std::vector<float>& xs);

// ---- sample.cu: per-row sorting-free sampler (sample_tokens) -----------------------------------------------------
// Semantics: pllm_kernels/reference/decoding.py (sample_ref); kernel design: csrc/include/pllm/sample.cuh. scores (B, V)
// of `dtype` with unit innermost stride and row stride `row_stride` (elements), 1 <= V <= 2^24; per-row temperature /
// top_p / min_p float32, top_k int32, seed / step int64 (B,); writes tokens (B,) int64 and logprobs (B,) float32.
// Asynchronous on `stream`; std::runtime_error on bad arguments or when no CUDA device is present.
void pllm_sample_tokens(uintptr_t tokens, uintptr_t logprobs, uintptr_t scores, uintptr_t temperature,
                        uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, uintptr_t seed, uintptr_t step,
                        int64_t batch, int64_t vocab, int64_t row_stride, int dtype, uintptr_t stream);
std::vector<std::string> pllm_sample_kernels();
std::vector<std::pair<std::string, int64_t>> pllm_sample_constants();
// sample_emu.cpp: the same kernel on the CPU emulator (host pointers, no stream; tests only).
void pllm_sample_tokens_emu(uintptr_t tokens, uintptr_t logprobs, uintptr_t scores, uintptr_t temperature,
                            uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, uintptr_t seed, uintptr_t step,
                            int64_t batch, int64_t vocab, int64_t row_stride, int dtype);

// ---- reward.cu: token-level reward guidance (reward_guided) ------------------------------------------------------
// Semantics: pllm_kernels/reference/decoding.py (reward_guided_ref, token rewards); kernel design:
// csrc/include/pllm/reward.cuh. logits (B, V) of `dtype`, reward (B, V) float32 and out (B, V) float32, each with
// unit innermost stride and its own row stride (elements), 1 <= V <= 2^24; per-row beta float32 and top_k int32 (B,).
// Asynchronous on `stream`; std::runtime_error on bad arguments or when no CUDA device is present.
void pllm_reward_guided(uintptr_t out, uintptr_t logits, uintptr_t reward, uintptr_t beta, uintptr_t top_k,
                        int64_t batch, int64_t vocab, int64_t logits_stride, int64_t reward_stride, int64_t out_stride,
                        int dtype, uintptr_t stream);
// The guidance step of fused_sample: float32 logits (the values), candidates = the first top_k tokens of `cand`'s rows
// (dtype `cand_dtype`, stride `cand_stride`).
void pllm_reward_guided_cand(uintptr_t out, uintptr_t logits, uintptr_t cand, uintptr_t reward, uintptr_t beta,
                             uintptr_t top_k, int64_t batch, int64_t vocab, int64_t logits_stride, int64_t cand_stride,
                             int64_t reward_stride, int64_t out_stride, int cand_dtype, uintptr_t stream);
std::vector<std::string> pllm_reward_kernels();
std::vector<std::pair<std::string, int64_t>> pllm_reward_constants();
// reward_emu.cpp: the same kernel on the CPU emulator (host pointers, no stream; tests only).
void pllm_reward_guided_cand_emu(uintptr_t out, uintptr_t logits, uintptr_t cand, uintptr_t reward, uintptr_t beta,
                                 uintptr_t top_k, int64_t batch, int64_t vocab, int64_t logits_stride,
                                 int64_t cand_stride, int64_t reward_stride, int64_t out_stride, int cand_dtype);
void pllm_reward_guided_emu(uintptr_t out, uintptr_t logits, uintptr_t reward, uintptr_t beta, uintptr_t top_k,
                            int64_t batch, int64_t vocab, int64_t logits_stride, int64_t reward_stride,
                            int64_t out_stride, int dtype);
