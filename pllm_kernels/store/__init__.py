"""Adapter and user store: PEFT LoRA import (safetensors; ``.bin`` only with ``weights_only``), slot pools of
stacked per-target buffers with leases for calls in flight, and user profiles (every asset of a user)."""

from pllm_kernels.store.adapter_store import (
    AdapterInUseError,
    AdapterStore,
    GroupBuffers,
    SlotLease,
    SlotsBusyError,
    TargetBuffers,
    TargetSpec,
    UnknownUserError,
    UserProfile,
)
from pllm_kernels.store.decoding import DecodingPolicy
from pllm_kernels.store.peft_import import AdapterError, LoRAAdapter, LoRAModuleWeights, load_peft_adapter

__all__ = [
    "AdapterError",
    "AdapterInUseError",
    "AdapterStore",
    "DecodingPolicy",
    "GroupBuffers",
    "LoRAAdapter",
    "LoRAModuleWeights",
    "SlotLease",
    "SlotsBusyError",
    "TargetBuffers",
    "TargetSpec",
    "UnknownUserError",
    "UserProfile",
    "load_peft_adapter",
]
