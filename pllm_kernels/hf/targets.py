"""Which layers of a Hugging Face causal LM are LoRA targets: per-architecture maps and a generic walker.

Targets are the projections inside the decoder blocks (the ``nn.ModuleList`` of layers): ``nn.Linear``,
GPT-2's ``Conv1D`` (weight ``(in, out)``) and fused projections such as Phi-3's ``qkv_proj`` / ``gate_up_proj``
(PEFT trains one LoRA over the fused output, so they are single-slice targets). Embeddings and ``lm_head`` are not
targets.
"""

from __future__ import annotations

from torch import nn

__all__ = ["ARCH_TARGETS", "find_decoder_layers", "find_targets", "linear_features", "PatchError"]

_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: model_type -> leaf names of the target projections (the default target set).
ARCH_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}


class PatchError(ValueError):
    """The model cannot be patched (unknown layout, nothing to target, already patched, ...)."""


def _conv1d_cls():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers always has it
        return ()
    return (Conv1D,)


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear-like module, or ``None`` if it is not one we can wrap."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    conv = _conv1d_cls()
    if conv and isinstance(module, conv):
        return int(module.weight.shape[0]), int(module.weight.shape[1])  # Conv1D weight is (in, out)
    return None


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the longest ``nn.ModuleList`` of same-class modules holding linear layers."""
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if not any(linear_features(sub) is not None for sub in mod[0].modules()):
            continue
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        raise PatchError(
            f"{type(model).__name__}: found no decoder layers (an nn.ModuleList of blocks containing nn.Linear or "
            "Conv1D projections); this architecture needs a target map in pllm_kernels.hf.targets.ARCH_TARGETS"
        )
    return best


def _leaf_matches(name: str, targets) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(leaf == t or name.endswith("." + t) or name == t for t in targets)


def find_targets(model: nn.Module, target_modules=None) -> tuple[list[tuple[str, nn.Module, int, int]], str]:
    """Target layers of ``model``: ``[(name, module, in_features, out_features)]`` and how they were chosen.

    Args:
        target_modules: ``None`` (the architecture's map, else every projection in the decoder blocks),
            ``"all-linear"`` (every ``nn.Linear`` / ``Conv1D`` in the decoder blocks), or leaf names / suffixes.
    """
    prefix, layers = find_decoder_layers(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if target_modules is None:
        if model_type in ARCH_TARGETS:
            targets, how = ARCH_TARGETS[model_type], f"target map for {model_type!r}"
        else:
            targets, how = None, f"generic walker ({model_type!r} has no target map)"
    elif target_modules == "all-linear" or target_modules == ["all-linear"]:
        targets, how = None, "all-linear"
    else:
        targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
        how = f"target_modules={list(targets)}"
    found = []
    unsupported = []
    for name, mod in model.named_modules():
        if not name.startswith(prefix + "."):
            continue
        if targets is not None and not _leaf_matches(name, targets):
            continue
        feats = linear_features(mod)
        if feats is None:
            if targets is not None and any(True for _ in mod.parameters(recurse=False)):
                unsupported.append(f"{name} ({type(mod).__name__})")
            continue
        found.append((name, mod, feats[0], feats[1]))
    if unsupported:
        raise PatchError(f"cannot wrap {', '.join(unsupported[:4])}: only nn.Linear and Conv1D layers are supported")
    if not found:
        raise PatchError(
            f"{type(model).__name__}: no nn.Linear / Conv1D layer under {prefix!r} matches "
            f"{how}; pass target_modules=[...] naming the projections to serve LoRA on"
        )
    return found, how
