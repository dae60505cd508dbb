"""``nn.Module``s that serve a personalized batch (no transformers import)."""

from pllm_kernels.modules.multi_lora import LoRAGroup, MultiLoRALinear

__all__ = ["LoRAGroup", "MultiLoRALinear"]
