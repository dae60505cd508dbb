"""Tiny random causal LMs and random PEFT adapters, offline (no hub downloads): for tests, the demo, benchmarks.

``tiny_model("llama")`` builds a seeded random model from a config; ``peft_reference(base, specs)`` builds the
PEFT incumbent (a deep copy of ``base`` with several LoRA adapters, random non-zero B) and returns each adapter's
state dict + config, ready for :meth:`PersonalizedModel.add_adapter`.
"""

from __future__ import annotations

import copy

import torch

__all__ = ["ARCHS", "MORE_ARCHS", "tiny_config", "tiny_model", "peft_reference", "llama_1b_config",
           "left_padded_batch"]

ARCHS = ("llama", "mistral", "qwen2", "gemma2", "gemma3", "phi3", "gpt2")
#: The other architectures with a target map (pllm_kernels.hf.targets.ARCH_TARGETS): Qwen3, Mixtral (MoE; attention
#: targets), Gemma 1, OLMo, OLMo-2 (post-norm), Granite.
MORE_ARCHS = ("qwen3", "mixtral", "gemma", "olmo", "olmo2", "granite")

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)


def tiny_config(arch: str, **overrides):
    """A small config of ``arch`` (one of :data:`ARCHS` or :data:`MORE_ARCHS`) with ``overrides`` applied."""
    import transformers as tf

    if arch == "gpt2":
        kw = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=256, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        kw.update(overrides)
        return tf.GPT2Config(**kw)
    kw = dict(_COMMON)
    if arch in ("gemma2", "gemma3"):
        kw.update(head_dim=16, sliding_window=8)
    if arch == "gemma":
        kw.update(head_dim=16)
    if arch == "mixtral":
        kw.update(num_local_experts=2, num_experts_per_tok=1)
    kw.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(overrides)
    cls = {
        "llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "gemma2": tf.Gemma2Config,
        "gemma3": tf.Gemma3TextConfig, "phi3": tf.Phi3Config, "qwen3": tf.Qwen3Config, "mixtral": tf.MixtralConfig,
        "gemma": tf.GemmaConfig, "olmo": tf.OlmoConfig, "olmo2": tf.Olmo2Config, "granite": tf.GraniteConfig,
    }[arch]
    return cls(**kw)


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, device="cpu", **overrides):
    """A seeded random causal LM of ``arch`` in eval mode (eager attention: deterministic on CPU)."""
    import transformers as tf

    cfg = tiny_config(arch, **overrides)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    if arch == "gemma3":
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg)
    # Random norms too: the default ones are all-ones / zeros and would hide layout bugs.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.to(device=device, dtype=dtype).eval()


def llama_1b_config(**overrides):
    """A ~1.1B-parameter Llama-shaped config (TinyLlama-1.1B shapes) for GPU benchmarks (random weights)."""
    import transformers as tf

    kw = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
              num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
    kw.update(overrides)
    return tf.LlamaConfig(**kw)


def peft_reference(base, specs: dict, seed: int = 0):
    """PEFT model over a deep copy of ``base`` with one LoRA adapter per ``specs`` entry (name -> LoraConfig kwargs).

    ``init_lora_weights=False`` gives random non-zero B. Returns ``(peft_model, {name: (state_dict, config)})``.
    """
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(base)
    peft_model = None
    for i, (name, kw) in enumerate(specs.items()):
        kw = dict(kw)
        kw.setdefault("init_lora_weights", False)
        kw.setdefault("lora_dropout", 0.0)
        cfg = LoraConfig(**kw)
        torch.manual_seed(seed + 1000 + i)
        if peft_model is None:
            peft_model = get_peft_model(model, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    peft_model.eval()
    out = {}
    for name in specs:
        sd = get_peft_model_state_dict(peft_model, adapter_name=name)
        out[name] = ({k: v.detach().clone() for k, v in sd.items()}, peft_model.peft_config[name])
    return peft_model, out


def left_padded_batch(lengths, vocab_size: int, seed: int = 0, pad_id: int = 0, device="cpu"):
    """``(input_ids, attention_mask)`` of random prompts of the given lengths, left padded."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.full((len(lengths), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, S - n:] = torch.randint(1, vocab_size, (n,), generator=g)
        mask[b, S - n:] = 1
    return ids.to(device), mask.to(device)
