"""The vectorised torch backend: fast on CPU, the fallback everywhere. Strategies are arguments, never flags."""

from pllm_kernels.torch_ops.lora import STRATEGIES, lora_apply_torch, lora_expand_torch, lora_shrink_torch
from pllm_kernels.torch_ops.memo import memo

__all__ = ["STRATEGIES", "lora_apply_torch", "lora_expand_torch", "lora_shrink_torch", "memo"]
