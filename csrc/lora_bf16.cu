// Instantiates the multi-LoRA kernels and typed launchers for __nv_bfloat16 (one dtype per file: parallel nvcc jobs).
#define PLLM_LORA_DEFINE_LAUNCHERS 1
#define PLLM_LORA_TYPED_ONLY 1
#include "pllm/lora_launch.cuh"

namespace pllm {
namespace dev {
template void shrink_typed<__nv_bfloat16>(const ShrinkParams&, int, const LaunchEnv&);
template void expand_typed<__nv_bfloat16>(const ExpandParams&, const std::vector<lora::SliceGroup>&, int, const LaunchEnv&);
template void fused_typed<__nv_bfloat16>(const FusedParams&, const LaunchEnv&);
}  // namespace dev
}  // namespace pllm
