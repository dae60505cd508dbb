// Instantiates the steering kernels and typed launchers for float activations (one dtype per file: parallel nvcc
// jobs); vectors and the norm weight are float or float32.
#define PLLM_STEER_DEFINE_LAUNCHERS 1
#define PLLM_STEER_TYPED_ONLY 1
#include "pllm/steer_launch.cuh"

namespace pllm {
namespace dev {
template void steer_typed<float, float, float>(const SteerParams&, bool, cudaStream_t);
}  // namespace dev
}  // namespace pllm
