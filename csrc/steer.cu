// Launchers of the per-token steering kernels (csrc/include/pllm/steer.cuh): plain C++ signatures declared in
// pllm_launchers.h. The kernels of each activation dtype are instantiated in csrc/steer_f32.cu, steer_f16.cu,
// steer_bf16.cu (parallel nvcc jobs); this file holds the entry points, argument checks and host-side helpers.
#include "pllm/steer_launch.cuh"
#include "pllm_launchers.h"

namespace {

cudaStream_t steer_stream(uintptr_t stream, const char* op) {
  static const int count = pllm_cuda_device_count();
  PLLM_CHECK(count > 0, op << ": no CUDA device/driver is visible to the pllm_kernels CUDA extension");
  return pllm::as_stream(stream);
}

const char* short_dtype(int code) { return pllm::dtype_name(code); }

std::string variant_name(bool norm, int dtype, int vec_dtype, int w_dtype, bool vec16) {
  std::string s = norm ? "steer_rmsnorm<" : "steer_add<";
  s += short_dtype(dtype);
  s += ",v=";
  s += short_dtype(vec_dtype);
  if (norm) {
    s += ",w=";
    s += short_dtype(w_dtype);
  }
  s += vec16 ? ",vec16>" : ",scalar>";
  return s;
}

}  // namespace

void pllm_steer_add(uintptr_t h, uintptr_t vectors, uintptr_t slot_modes, uintptr_t token_slots,
                    uintptr_t token_scales, int64_t num_tokens, int64_t hidden, int64_t num_slots, int64_t k,
                    int64_t h_stride0, int64_t v_stride0, int dtype, int vec_dtype, uintptr_t stream) {
  pllm::dev::steer_add_entry(h, vectors, slot_modes, token_slots, token_scales, num_tokens, hidden, num_slots, k,
                             h_stride0, v_stride0, dtype, vec_dtype, steer_stream(stream, "steer_add"));
}

void pllm_steer_rmsnorm(uintptr_t out, uintptr_t h, uintptr_t weight, uintptr_t vectors, uintptr_t slot_modes,
                        uintptr_t token_slots, uintptr_t token_scales, int64_t num_tokens, int64_t hidden,
                        int64_t num_slots, int64_t k, int64_t h_stride0, int64_t v_stride0, int64_t out_stride0,
                        double eps, double weight_offset, int dtype, int vec_dtype, int w_dtype, uintptr_t stream) {
  pllm::dev::steer_rmsnorm_entry(out, h, weight, vectors, slot_modes, token_slots, token_scales, num_tokens, hidden,
                                 num_slots, k, h_stride0, v_stride0, out_stride0, eps, weight_offset, dtype, vec_dtype,
                                 w_dtype, steer_stream(stream, "steer_rmsnorm"));
}

std::vector<std::string> pllm_steer_kernels() {
  std::vector<std::string> out;
  for (int dt : {pllm::kFloat32, pllm::kFloat16, pllm::kBFloat16}) {
    std::vector<int> others = {dt};
    if (dt != pllm::kFloat32) others.push_back(pllm::kFloat32);
    for (int vd : others) {
      for (bool v16 : {true, false}) out.push_back(variant_name(false, dt, vd, dt, v16));
      for (int wd : others) {
        for (bool v16 : {true, false}) out.push_back(variant_name(true, dt, vd, wd, v16));
      }
    }
  }
  return out;
}

std::string pllm_steer_variant(uintptr_t h, uintptr_t out, uintptr_t weight, uintptr_t vectors, int64_t hidden,
                               int64_t h_stride0, int64_t v_stride0, int64_t out_stride0, int dtype, int vec_dtype,
                               int w_dtype, bool norm) {
  const int esize = pllm::dtype_size(dtype);
  PLLM_CHECK(esize > 0 && pllm::dtype_size(vec_dtype) > 0 && pllm::dtype_size(w_dtype) > 0, "bad dtype code");
  pllm::dev::SteerParams p{};
  p.h = reinterpret_cast<void*>(h);
  p.out = reinterpret_cast<void*>(out);
  p.w = reinterpret_cast<const void*>(weight);
  p.vec = reinterpret_cast<const void*>(vectors);
  p.H = static_cast<int>(hidden);
  p.sht = h_stride0;
  p.svl = v_stride0;
  p.sot = out_stride0;
  p.norm = norm ? pllm::steer::kNormLlama : pllm::steer::kNormNone;
  const bool v16 = pllm::dev::steer_vec_ok(p, esize, pllm::dtype_size(vec_dtype));
  return variant_name(norm, dtype, vec_dtype, norm ? w_dtype : dtype, v16);
}

std::vector<std::pair<std::string, int64_t>> pllm_steer_constants() {
  namespace S = pllm::steer;
  return {
      {"warp", S::kWarp},
      {"vals_per_thread", S::kValsPerThread},
      {"max_threads", S::kMaxThreads},
      {"max_hidden", S::kMaxHidden},
  };
}

int64_t pllm_steer_block_threads(int64_t hidden) {
  PLLM_CHECK(hidden >= 0 && hidden <= pllm::steer::kMaxHidden, "hidden out of range [0, 16384]: " << hidden);
  return pllm::steer::block_threads(hidden);
}
