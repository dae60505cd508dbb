// pybind11 module pllm_kernels._C: torch-free bindings of the launchers declared in csrc/pllm_launchers.h.
// C++ exceptions (std::runtime_error from launchers) surface as Python RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "pllm_launchers.h"

#ifndef PLLM_VERSION_STR
#error "PLLM_VERSION_STR is defined by setup.py from pllm_kernels/_version.py"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pllm_kernels CUDA extension (torch-free: raw device pointers, streams as integers, static cudart)";
  m.attr("__version__") = PLLM_VERSION_STR;
  // Dtype codes shared with every launcher.
  m.attr("DTYPE_FLOAT32") = 0;
  m.attr("DTYPE_FLOAT16") = 1;
  m.attr("DTYPE_BFLOAT16") = 2;

  m.def("device_count", &pllm_cuda_device_count, "Number of visible CUDA devices; 0 when no driver/device.");
  m.def("runtime_version", &pllm_cuda_runtime_version, "CUDA runtime version compiled in, e.g. '13.0'.");
  m.def("driver_version", &pllm_cuda_driver_version, "CUDA driver version, or 'none' without a driver.");
  m.def("compiled_archs", &pllm_compiled_archs, "SASS architectures compiled into the extension, e.g. [80, 90].");
  m.def("ptx_arch", &pllm_ptx_arch, "Architecture whose PTX is embedded (JIT on newer GPUs); 0 if none.");
  m.def("device_name", &pllm_device_name, py::arg("index"), "Name of CUDA device `index`.");
  m.def("device_capability", &pllm_device_capability, py::arg("index"),
        "Compute capability of device `index` as major*10+minor.");
  m.def("fill_f32", &pllm_fill_f32, py::arg("ptr"), py::arg("n"), py::arg("value"), py::arg("stream") = 0,
        "out[i] = value for i < n; ptr: float32 device pointer, stream: cudaStream_t as int (async).");

  // ---- batched multi-LoRA (csrc/lora.cu; semantics pllm_kernels/reference/lora.py) ------------------------------
  m.attr("LORA_PATHS") = py::dict(py::arg("auto") = 0, py::arg("sgmv") = 1, py::arg("bgmv") = 2, py::arg("fused") = 3,
                                  py::arg("sgmv_tc") = 4);
  m.attr("LORA_OPS") = py::dict(py::arg("shrink") = 0, py::arg("expand") = 1, py::arg("apply") = 2);
  const char* shrink_doc =
      "lora_shrink(x, lora_a, slot_ranks, token_slots, sorted_pairs, seg_slot, seg_start, seg_len, out, num_tokens, "
      "h_in, num_slots, num_slices, max_rank, k, num_chunks, chunk, x_stride0, a_stride0, a_stride1, a_stride2, "
      "dtype, path, stream): out[s, k*T+t, :r] = x[t] @ lora_a[slot, s, :r].T (fp32, fully overwritten). Pointers "
      "as ints, element strides, dtype code, path code (LORA_PATHS), cudaStream_t as int. Asynchronous.";
  const char* expand_doc =
      "lora_expand(y, v, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot, "
      "seg_start, seg_len, num_tokens, num_slots, max_rank, k, num_chunks, chunk, slice_sizes, y_stride0, b_stride0, "
      "b_stride1, dtype, path, stream): y[t, slice cols] += sum_k w * scale * v[s, k*T+t, :r] @ B[slot, cols, :r].T.";
  const char* apply_doc =
      "lora_apply(y, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot, "
      "seg_start, seg_len, v_scratch, num_tokens, h_in, num_slots, num_slices, max_rank, k, num_chunks, chunk, "
      "slice_sizes, x_stride0, a_stride0, a_stride1, a_stride2, y_stride0, b_stride0, b_stride1, dtype, path, "
      "stream): fused shrink + expand (v_scratch (S, K*T, R) fp32 needed unless the path resolves to fused).";
  m.def("lora_shrink", &pllm_lora_shrink, shrink_doc);
  m.def("lora_expand", &pllm_lora_expand, expand_doc);
  m.def("lora_apply", &pllm_lora_apply, apply_doc);
  m.def("lora_apply_sliced", &pllm_lora_apply_sliced,
        "lora_apply_sliced(ys, y_strides, x, lora_a, ... as lora_apply without y / y_stride0 ...): lora_apply with one "
        "output pointer and row stride per slice (at most 8 slices); same kernels and bits.");
  m.def("lora_apply_sliced_emu", &pllm_lora_apply_sliced_emu,
        "lora_apply_sliced on the CPU emulator (host pointers; last argument num_sms instead of the stream). Tests only.");
  m.def("lora_shrink_emu", &pllm_lora_shrink_emu,
        "lora_shrink on the CPU emulator (host pointers; last argument num_sms instead of the stream). Tests only.");
  m.def("lora_expand_emu", &pllm_lora_expand_emu,
        "lora_expand on the CPU emulator (host pointers; last argument num_sms instead of the stream). Tests only.");
  m.def("lora_apply_emu", &pllm_lora_apply_emu,
        "lora_apply on the CPU emulator (host pointers; last argument num_sms instead of the stream). Tests only.");
  m.def("emu_config", &pllm_emu_config, py::arg("cp_async_eager"), py::arg("reverse_thread_order"),
        "CPU emulator modes: cp.async copies land at issue (else at their wait); threads run in reverse order.");
  m.def("lora_choose_path", &pllm_lora_choose_path, py::arg("path"), py::arg("op"), py::arg("num_tokens"),
        py::arg("k"), py::arg("num_slices"), py::arg("max_rank"), py::arg("h_in"), py::arg("dtype"),
        "The path code (1 sgmv, 2 bgmv, 3 fused) a lora call with these sizes runs; op 0 shrink, 1 expand, 2 apply.");
  m.def("lora_kernels", &pllm_lora_kernels, "Names of the compiled multi-LoRA kernel variants.");
  m.def(
      "lora_constants",
      []() {
        py::dict d;
        for (const auto& kv : pllm_lora_constants()) d[py::str(kv.first)] = kv.second;
        return d;
      },
      "Tile sizes and path thresholds of the multi-LoRA kernels (csrc/include/pllm/lora_tiling.h).");
  m.def("lora_lane_pos", &pllm_lora_lane_pos, py::arg("h"), py::arg("elem_bytes"),
        "Canonical shrink owner of input element h: [split, step, lane, elem].");
  m.def("lora_slice_groups", &pllm_lora_slice_groups, py::arg("slice_sizes"), py::arg("block_n"),
        "Slice launch groups: [base, count, off[8], size[8], tile_start[9]] per group.");
  m.def("lora_tile_slice", &pllm_lora_tile_slice, py::arg("slice_sizes"), py::arg("block_n"), py::arg("group"),
        py::arg("j"), "Flat tile j of a slice group -> [slice in group, first column, width, tile in slice].");
  m.def("lora_reduce_scatter_map", &pllm_lora_reduce_scatter_map, py::arg("lane"), py::arg("log2n"), py::arg("stage"),
        "Warp reduce-scatter: [keeps upper half at stage, value index held, writer lane of that value].");
  m.def("lora_smem_bytes", &pllm_lora_smem_bytes, py::arg("h_in"), py::arg("k"), py::arg("num_slices"),
        py::arg("max_rank"), py::arg("elem_bytes"), py::arg("nt"),
        "Dynamic shared memory bytes of [bgmv shrink, bgmv expand, fused] for these sizes.");

  // ---- per-token activation steering (csrc/steer.cu; semantics pllm_kernels/reference/steer.py) -----------------
  const char* steer_add_doc =
      "steer_add(h, vectors, slot_modes, token_slots, token_scales, num_tokens, hidden, num_slots, k, h_stride0, "
      "v_stride0, dtype, vec_dtype, stream): steer h (T, H) in place, each token's K slots applied in order (modes: add "
      "0, ablate 1, ablate_add 2, norm_preserve 3); rows whose slots are all -1 are not written. Pointers as ints, "
      "element row strides, dtype codes (vec_dtype: float32 or dtype), cudaStream_t as int. Asynchronous.";
  const char* steer_rmsnorm_doc =
      "steer_rmsnorm(out, h, weight, vectors, slot_modes, token_slots, token_scales, num_tokens, hidden, num_slots, k, "
      "h_stride0, v_stride0, out_stride0, eps, weight_offset, dtype, vec_dtype, w_dtype, stream): steer h in place "
      "(as steer_add) and write RMSNorm(h steered) into out (T, H); weight_offset 0 Llama-style, 1 Gemma-style.";
  m.def("steer_add", &pllm_steer_add, steer_add_doc);
  m.def("steer_rmsnorm", &pllm_steer_rmsnorm, steer_rmsnorm_doc);
  m.def("steer_add_emu", &pllm_steer_add_emu,
        "steer_add on the CPU emulator (host pointers; no stream argument). Tests only.");
  m.def("steer_rmsnorm_emu", &pllm_steer_rmsnorm_emu,
        "steer_rmsnorm on the CPU emulator (host pointers; no stream argument). Tests only.");
  m.def("steer_kernels", &pllm_steer_kernels, "Names of the compiled steering kernel variants.");
  m.def("steer_variant", &pllm_steer_variant, py::arg("h"), py::arg("out"), py::arg("weight"), py::arg("vectors"),
        py::arg("hidden"), py::arg("h_stride0"), py::arg("v_stride0"), py::arg("out_stride0"), py::arg("dtype"),
        py::arg("vec_dtype"), py::arg("w_dtype"), py::arg("norm"),
        "The steering kernel variant (16-byte or scalar accesses) a call with these pointers and strides runs.");
  m.def(
      "steer_constants",
      []() {
        py::dict d;
        for (const auto& kv : pllm_steer_constants()) d[py::str(kv.first)] = kv.second;
        return d;
      },
      "Constants of the steering kernels (csrc/include/pllm/steer.cuh): values per thread, max threads, max hidden.");
  m.def("steer_block_threads", &pllm_steer_block_threads, py::arg("hidden"),
        "Threads per block (one token row per block) of the steering kernels for a hidden size.");

  // ---- personalized decoding (csrc/decoding.cu; semantics pllm_kernels/reference/decoding.py) --------------------
  m.def("mix_logprobs", &pllm_mix_logprobs,
        "mix_logprobs(out, sources, coefs, num_sources, batch, vocab, src_stride0, src_stride1, coef_stride0, "
        "coef_stride1, out_stride0, dtype, stream): out (B, V) float32 = log_softmax(sum_i coefs[b, i] * "
        "log_softmax(sources[i, b])); sources (S, B, V) of dtype, coefs (B, S) float32. Pointers as ints, element "
        "strides, cudaStream_t as int. Asynchronous.");
  m.def("mix_logprobs_emu", &pllm_mix_logprobs_emu,
        "mix_logprobs on the CPU emulator (host pointers; no stream argument). Tests only.");
  m.def("decoding_kernels", &pllm_decoding_kernels, "Names of the compiled decoding kernel variants.");
  m.def(
      "decoding_constants",
      []() {
        py::dict d;
        for (const auto& kv : pllm_decoding_constants()) d[py::str(kv.first)] = kv.second;
        return d;
      },
      "Constants of the decoding kernels (csrc/include/pllm/decoding.cuh).");
  m.def("fmath_eval", &pllm_fmath_eval, py::arg("fn"), py::arg("xs"),
        "The kernels' exp / log (csrc/include/pllm/fmath.cuh: same bits on the GPU and the emulator) on the host.");

  // ---- per-row sampler (csrc/sample.cu; semantics pllm_kernels/reference/decoding.py sample_ref) ----------------
  m.def("sample_tokens", &pllm_sample_tokens,
        "sample_tokens(tokens, logprobs, scores, temperature, top_k, top_p, min_p, seed, step, batch, vocab, "
        "row_stride, dtype, stream): one token (int64) and its log-prob (float32) per row of scores (B, V) of dtype; "
        "per-row parameters (B,). Pointers as ints, element strides, cudaStream_t as int. Asynchronous.");
  m.def("sample_tokens_emu", &pllm_sample_tokens_emu,
        "sample_tokens on the CPU emulator (host pointers; no stream argument). Tests only.");
  m.def("sample_kernels", &pllm_sample_kernels, "Names of the compiled sampler kernel variants.");
  m.def(
      "sample_constants",
      []() {
        py::dict d;
        for (const auto& kv : pllm_sample_constants()) d[py::str(kv.first)] = kv.second;
        return d;
      },
      "Constants of the sampler kernel (csrc/include/pllm/sample.cuh).");

  // ---- token-level reward guidance (csrc/reward.cu; semantics pllm_kernels/reference/decoding.py reward_guided_ref)
  m.def("reward_guided", &pllm_reward_guided,
        "reward_guided(out, logits, reward, beta, top_k, batch, vocab, logits_stride, reward_stride, out_stride, "
        "dtype, stream): out (B, V) float32 = log_softmax over the top_k candidates of log_softmax(logits) + beta * "
        "reward (token rewards (B, V) float32), -inf elsewhere; per-row beta / top_k (B,). Pointers as ints, element "
        "strides, cudaStream_t as int. Asynchronous.");
  m.def("reward_guided_emu", &pllm_reward_guided_emu,
        "reward_guided on the CPU emulator (host pointers; no stream argument). Tests only.");
  m.def("reward_guided_cand", &pllm_reward_guided_cand,
        "reward_guided_cand(out, logits, cand, reward, beta, top_k, batch, vocab, logits_stride, cand_stride, "
        "reward_stride, out_stride, cand_dtype, stream): reward_guided on float32 logits (the values) with the "
        "candidates taken from the rows of `cand` (dtype code cand_dtype): the guidance step of fused_sample.");
  m.def("reward_guided_cand_emu", &pllm_reward_guided_cand_emu,
        "reward_guided_cand on the CPU emulator (host pointers; no stream argument). Tests only.");
  m.def("reward_kernels", &pllm_reward_kernels, "Names of the compiled reward-guidance kernel variants.");
  m.def(
      "reward_constants",
      []() {
        py::dict d;
        for (const auto& kv : pllm_reward_constants()) d[py::str(kv.first)] = kv.second;
        return d;
      },
      "Constants of the reward-guidance kernel (csrc/include/pllm/reward.cuh).");
}
