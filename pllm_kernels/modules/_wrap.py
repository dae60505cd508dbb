"""State-dict transparency for wrapper modules: a wrapper keeping the original module as ``<inner>`` saves and loads
the unwrapped model's keys (``q_proj.weight``, not ``q_proj.base_layer.weight``)."""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module

__all__ = ["call_inner", "make_transparent"]


# torch's registries of global module hooks: dicts that torch fills and empties in place (bound once: this check
# runs per wrapped layer and decode step)
_GLOBAL_HOOKS = (_module._global_forward_hooks, _module._global_forward_pre_hooks, _module._global_backward_hooks,
                 _module._global_backward_pre_hooks)


def call_inner(mod: nn.Module, *args, **kwargs):
    """``mod(*args, **kwargs)``, skipping ``nn.Module.__call__``'s hook machinery when no hook of any kind is
    registered (its overhead, a few microseconds, is paid per wrapped layer and decode step); with any hook the
    full call runs, so hooks (and forwards replaced by accelerate) behave as without the wrapper."""
    g = _GLOBAL_HOOKS
    if (mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or mod._backward_pre_hooks
            or g[0] or g[1] or g[2] or g[3]):
        return mod(*args, **kwargs)
    return mod.forward(*args, **kwargs)


def make_transparent(module: nn.Module, inner: str) -> None:
    """Register the hooks on ``module`` (a wrapper whose original is the submodule ``inner``)."""

    def unwrap(mod, state_dict, prefix, local_metadata) -> None:
        """``<prefix><inner>.<key>`` -> ``<prefix><key>``, metadata included (the unwrapped model's keys)."""
        pre = prefix + inner + "."
        for k in [k for k in state_dict if k.startswith(pre)]:
            state_dict[prefix + k[len(pre):]] = state_dict.pop(k)  # these keys are the latest: order is kept
        meta = getattr(state_dict, "_metadata", None)
        if meta is not None:
            for k in [k for k in meta if k == pre[:-1] or k.startswith(pre)]:
                meta[prefix[:-1] if k == pre[:-1] else prefix + k[len(pre):]] = meta.pop(k)

    def wrap(mod, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        """The unwrapped model's keys go to ``<inner>`` (keys that already name it load as they are)."""
        pre = prefix + inner + "."
        for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(pre)]:
            state_dict[pre + k[len(prefix):]] = state_dict.pop(k)

    if hasattr(module, "register_state_dict_post_hook"):  # public since torch 2.5; the private forms before
        module.register_state_dict_post_hook(unwrap)
        module.register_load_state_dict_pre_hook(wrap)
    else:  # pragma: no cover - old torch
        module._register_state_dict_hook(unwrap)
        module._register_load_state_dict_pre_hook(wrap, with_module=True)
