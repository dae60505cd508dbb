"""Adapter and user store: PEFT LoRA import (safetensors; ``.bin`` only with ``weights_only``), slot pools of
stacked per-target buffers, and user profiles (K weighted adapters per user)."""

from pllm_kernels.store.adapter_store import (
    AdapterStore,
    GroupBuffers,
    TargetBuffers,
    TargetSpec,
    UnknownUserError,
    UserProfile,
)
from pllm_kernels.store.peft_import import AdapterError, LoRAAdapter, LoRAModuleWeights, load_peft_adapter

__all__ = [
    "AdapterError",
    "AdapterStore",
    "GroupBuffers",
    "LoRAAdapter",
    "LoRAModuleWeights",
    "TargetBuffers",
    "TargetSpec",
    "UnknownUserError",
    "UserProfile",
    "load_peft_adapter",
]
