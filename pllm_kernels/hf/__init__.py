"""Hugging Face layer: patch a causal LM once, serve many users' LoRA adapters in one batch.

``patch_model(model, num_slots=..., max_rank=..., target_modules=...) -> PersonalizedModel`` (``.unpatch()``
reverts); ``PersonalizedModel.register_user / add_adapter / add_user`` fill its :class:`AdapterStore`;
``forward(..., users=[...])`` and ``generate(..., users=[...])`` route rows to users (``None`` = base model).
transformers is imported only by the functions that need it; peft only by tests, the demo and benchmarks.
"""

from pllm_kernels.hf.decoding import (
    ContrastLogitsProcessor,
    GenerationOutput,
    RewardGuidanceLogitsProcessor,
    personalized_generate,
)
from pllm_kernels.hf.patch import PersonalizedModel, patch_model, unpatch_model
from pllm_kernels.hf.targets import ARCH_TARGETS, PatchError, find_targets
from pllm_kernels.store import AdapterError, AdapterStore, DecodingPolicy, UnknownUserError, UserProfile

__all__ = [
    "ARCH_TARGETS",
    "AdapterError",
    "AdapterStore",
    "ContrastLogitsProcessor",
    "DecodingPolicy",
    "GenerationOutput",
    "RewardGuidanceLogitsProcessor",
    "personalized_generate",
    "PatchError",
    "PersonalizedModel",
    "UnknownUserError",
    "UserProfile",
    "find_targets",
    "patch_model",
    "unpatch_model",
]
