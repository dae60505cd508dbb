// Instantiates the steering kernels and typed launchers for __half activations (one dtype per file: parallel nvcc
// jobs); vectors and the norm weight are __half or float32.
#define PLLM_STEER_DEFINE_LAUNCHERS 1
#define PLLM_STEER_TYPED_ONLY 1
#include "pllm/steer_launch.cuh"

namespace pllm {
namespace dev {
template void steer_typed<__half, __half, __half>(const SteerParams&, bool, cudaStream_t);
template void steer_typed<__half, float, __half>(const SteerParams&, bool, cudaStream_t);
template void steer_typed<__half, __half, float>(const SteerParams&, bool, cudaStream_t);
template void steer_typed<__half, float, float>(const SteerParams&, bool, cudaStream_t);
}  // namespace dev
}  // namespace pllm
