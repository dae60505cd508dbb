"""Tiny random models and adapters, offline, for examples, docs and users' own tests (imports transformers lazily).

``tiny_model("llama")`` builds a seeded random causal LM from a config; ``peft_reference(base, specs)`` builds
PEFT LoRA adapters (random non-zero B) over a copy of it and returns each adapter's state dict + config;
``left_padded_batch(lengths, vocab)`` makes a left-padded batch of random prompts.
"""

from pllm_kernels.testing.tiny import (
    ARCHS,
    MORE_ARCHS,
    left_padded_batch,
    llama_1b_config,
    peft_reference,
    tiny_config,
    tiny_model,
)

__all__ = ["ARCHS", "MORE_ARCHS", "left_padded_batch", "llama_1b_config", "peft_reference", "tiny_config", "tiny_model"]
