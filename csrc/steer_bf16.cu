// Instantiates the steering kernels and typed launchers for __nv_bfloat16 activations (one dtype per file: parallel nvcc
// jobs); vectors and the norm weight are __nv_bfloat16 or float32.
#define PLLM_STEER_DEFINE_LAUNCHERS 1
#define PLLM_STEER_TYPED_ONLY 1
#include "pllm/steer_launch.cuh"

namespace pllm {
namespace dev {
template void steer_typed<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16>(const SteerParams&, bool, cudaStream_t);
template void steer_typed<__nv_bfloat16, float, __nv_bfloat16>(const SteerParams&, bool, cudaStream_t);
template void steer_typed<__nv_bfloat16, __nv_bfloat16, float>(const SteerParams&, bool, cudaStream_t);
template void steer_typed<__nv_bfloat16, float, float>(const SteerParams&, bool, cudaStream_t);
}  // namespace dev
}  // namespace pllm
