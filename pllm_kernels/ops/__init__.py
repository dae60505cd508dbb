"""The op layer: the only place that registers ``torch.ops.pllm.*``, validates arguments and picks a backend."""

from pllm_kernels.ops.decoding import (
    SamplingParams,
    contrast_logits,
    fused_sample,
    mix_logprobs,
    reward_guided_logprobs,
    sample_tokens,
)
from pllm_kernels.ops.lora import (
    PreparedLoRA,
    lora_apply,
    lora_expand,
    lora_shrink,
    prepare_lora_apply,
    shrink_out_shape,
)
from pllm_kernels.ops.meta import LoRAMeta
from pllm_kernels.ops.steer import MODES, steer_add, steer_rmsnorm

__all__ = ["LoRAMeta", "MODES", "PreparedLoRA", "SamplingParams", "contrast_logits", "fused_sample", "lora_apply",
           "lora_expand", "lora_shrink", "mix_logprobs", "prepare_lora_apply", "reward_guided_logprobs",
           "sample_tokens", "shrink_out_shape", "steer_add", "steer_rmsnorm"]
