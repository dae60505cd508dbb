"""``nn.Module``s and hooks that serve a personalized batch (no transformers import)."""

from pllm_kernels.modules.multi_lora import LoRAGroup, MultiLoRALinear
from pllm_kernels.modules.steering import SteeringHook, SteerRMSNorm, norm_kind

__all__ = ["LoRAGroup", "MultiLoRALinear", "SteerRMSNorm", "SteeringHook", "norm_kind"]
