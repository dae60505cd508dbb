"""Patch a loaded Hugging Face causal LM in place to serve many users' LoRA adapters in one batch.

::

    pm = patch_model(model, num_slots=16, max_rank=16)          # target layers -> MultiLoRALinear
    pm.register_user("alice", "/adapters/alice")                 # PEFT dir (adapter_config.json + safetensors)
    pm.add_adapter("shared", shared_state_dict, config=cfg)
    pm.add_user("bob", [("shared", 0.5), ("bob-own", 1.0)])    # K weighted adapters
    out = pm.generate(input_ids, attention_mask=mask, users=["alice", None, "bob"], max_new_tokens=32)
    pm.unpatch()                                                  # the original modules are back

A forward pre-hook on the model builds the :class:`pllm_kernels.batch.PersonalBatch` once per forward call
(prefill and every decode step of ``generate``) from the rows' users and the current tokens' attention mask; the
patched layers only read it. Rows follow the same order through the KV-cache decode steps, so per-row routing
holds for the whole generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from pllm_kernels.hf.targets import PatchError, find_targets
from pllm_kernels.modules.multi_lora import LoRAContext, LoRAGroup, MultiLoRALinear
from pllm_kernels.store.adapter_store import AdapterStore, TargetSpec, UserProfile

__all__ = ["PersonalizedModel", "patch_model", "unpatch_model"]

_ATTR = "_pllm_personalized"


def _batch_input(args, kwargs) -> tuple[str, torch.Tensor] | None:
    """``("input_ids", (B, S) tensor)`` or ``("inputs_embeds", (B, S, H) tensor)`` of a forward call."""
    x = kwargs.get("input_ids")
    if x is None and args:
        x = args[0]
    if isinstance(x, torch.Tensor) and x.dim() >= 2:
        return "input_ids", x
    emb = kwargs.get("inputs_embeds")
    if isinstance(emb, torch.Tensor) and emb.dim() == 3:
        return "inputs_embeds", emb
    return None


class PersonalizedModel(nn.Module):
    """A patched causal LM plus its :class:`AdapterStore`. ``forward`` / ``generate`` take ``users=[...]``.

    Attributes: ``model`` (the patched HF model), ``store`` (adapters, users, slots), ``context`` (per-forward
    routing shared by the layers), ``patched`` (target name -> :class:`MultiLoRALinear`).
    """

    def __init__(self, model: nn.Module, store: AdapterStore, context: LoRAContext,
                 patched: dict[str, MultiLoRALinear], how: str):
        super().__init__()
        self.model = model
        self.__dict__["store"] = store
        self.__dict__["context"] = context
        self.__dict__["patched"] = patched
        self.__dict__["how"] = how
        self.__dict__["_hooks"] = [
            model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            model.register_forward_hook(self._post_hook, always_call=True),
        ]

    # ---------------------------------------------------------------------------------------- hooks
    def _pre_hook(self, module, args, kwargs):
        ctx = self.context
        if ctx.rows is None:
            ctx.batch = None
            return None
        found = _batch_input(args, kwargs)
        if found is None:
            raise RuntimeError("personalized forward needs input_ids (B, S) or inputs_embeds (B, S, H)")
        arg, x = found
        store = self.store
        if x.device != store.device:
            raise RuntimeError(
                f"{arg} is on {x.device} but the adapter slot buffers are on {store.device}: move the model with "
                f"model.to(...) / .cuda() after patch_model (the slot buffers follow it) and pass inputs on the "
                f"model's device, or move the store alone with store.to({str(x.device)!r})"
            )
        row_slots, row_weights = ctx.rows
        if row_slots.device != x.device:  # routed before the model (and its store) moved
            ctx.rows = (row_slots.to(x.device), row_weights.to(x.device))
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        ctx.begin(int(x.shape[0]), int(x.shape[1]), mask if isinstance(mask, torch.Tensor) else None)
        return None

    def _post_hook(self, module, args, output):
        self.context.end()
        return None

    # ------------------------------------------------------------------------------------ store API
    def add_adapter(self, name: str, source, config=None, **kw):
        """Register a PEFT LoRA adapter (directory, or state dict + config). See :meth:`AdapterStore.add_adapter`."""
        return self.store.add_adapter(name, source, config, **kw)

    def add_user(self, user_id: str, adapters, **kw) -> UserProfile:
        """Register a user with weighted adapters, e.g. ``[("shared", 0.5), ("own", 1.0)]``."""
        return self.store.add_user(user_id, adapters, **kw)

    def register_user(self, user_id: str, source=None, config=None, **kw) -> UserProfile:
        """Register a user and their own PEFT adapter in one all-or-nothing step (see the store)."""
        return self.store.register_user(user_id, source, config, **kw)

    def profile(self, user_id: str) -> UserProfile:
        return self.store.profile(user_id)

    # ------------------------------------------------------------------------------------- routing
    @contextmanager
    def users(self, users: Sequence[str | None] | None):
        """Route every forward inside the block by ``users`` (one entry per row; ``None`` = base model)."""
        if users is None:
            with self.context.using(None, None):
                yield self
            return
        if isinstance(users, str):
            raise TypeError("users must be a sequence with one entry per row, not a string")
        row_slots, row_weights, active = self.store.resolve(list(users))
        with self.context.using(row_slots, row_weights, active):
            yield self

    def _check_rows(self, users, x):
        if users is not None and isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] != len(users):
            raise ValueError(f"got {len(users)} users for a batch of {x.shape[0]} rows")

    def forward(self, input_ids=None, attention_mask=None, users: Sequence[str | None] | None = None, **kwargs):
        """The model's forward with per-row users (``None`` rows, or ``users=None``, run the base model)."""
        self._check_rows(users, input_ids if input_ids is not None else kwargs.get("inputs_embeds"))
        with self.users(users):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, input_ids=None, attention_mask=None, users: Sequence[str | None] | None = None, **kwargs):
        """``model.generate`` with per-row users: left padding, KV cache, greedy or sampling."""
        self._check_rows(users, input_ids)
        with self.users(users):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # ------------------------------------------------------------------------------------- unpatch
    def unpatch(self) -> nn.Module:
        """Put the original layers back and remove the hooks; returns the (unpatched) model."""
        return unpatch_model(self)

    def extra_repr(self) -> str:
        return f"targets={len(self.patched)} ({self.how}), slots={self.store.num_slots}, max_rank={self.store.max_rank}"


#: Sibling projections that read the same input: their adapters run as the slices of one lora_apply call.
INPUT_SHARING_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _input_groups(found) -> list[list[str]]:
    """Targets under one parent whose leaf names form an input-sharing group (>= 2 present, same in_features)."""
    by_parent: dict[tuple[str, int], list[tuple[int, str, int]]] = {}
    for name, _, fin, _ in found:
        parent, _, leaf = name.rpartition(".")
        for gi, leaves in enumerate(INPUT_SHARING_GROUPS):
            if leaf in leaves:
                by_parent.setdefault((parent, gi), []).append((leaves.index(leaf), name, fin))
    groups = []
    for members in by_parent.values():
        members.sort()
        if len(members) >= 2 and len({fin for _, _, fin in members}) == 1:
            groups.append([name for _, name, _ in members])
    return groups


def patch_model(model: nn.Module, *, num_slots: int = 8, max_rank: int = 16, target_modules=None,
                dtype: torch.dtype | None = None, fuse_projections: bool = True) -> PersonalizedModel:
    """Patch ``model`` (a loaded HF causal LM) in place: target layers become :class:`MultiLoRALinear`.

    Args:
        num_slots: adapter slots per target: the most distinct adapters one batch may use ("max users").
        max_rank: the largest LoRA rank that can be registered.
        target_modules: ``None`` (the architecture's map: every attention / MLP projection; a generic walker for
            unknown architectures), ``"all-linear"``, or leaf names such as ``["q_proj", "v_proj"]``.
        dtype: of the slot buffers (default: each target's weight dtype).
        fuse_projections: run the adapters of projections that read the same input (q/k/v, gate/up) as the
            slices of one multi-slice ``lora_apply`` (x read once, 4 instead of 7 calls per Llama layer).
    Returns:
        a :class:`PersonalizedModel`; ``.unpatch()`` (or :func:`unpatch_model`) reverts.
    """
    if getattr(model, _ATTR, None) is not None:
        raise PatchError(f"{type(model).__name__} is already patched; unpatch it first")
    found, how = find_targets(model, target_modules)
    weight = found[0][1].weight
    dtype = dtype or weight.dtype
    device = weight.device
    specs = [TargetSpec(name, fin, fout) for name, _, fin, fout in found]
    groups = _input_groups(found) if fuse_projections else []
    store = AdapterStore(specs, num_slots=num_slots, max_rank=max_rank, dtype=dtype, device=device, groups=groups)
    runtimes = {g.name: LoRAGroup(g) for g in store.groups.values()}
    context = LoRAContext(num_slots)
    patched: dict[str, MultiLoRALinear] = {}
    for name, mod, fin, fout in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        group = None
        if name in store.group_of:
            g, i = store.group_of[name]
            group = (runtimes[g.name], i, name)
        wrapped = MultiLoRALinear(mod, store.buffers[name], context, fin, fout, group=group, name=name,
                                  on_apply=store.follow)
        setattr(parent, child, wrapped)
        patched[name] = wrapped
    pm = PersonalizedModel(model, store, context, patched, how)
    model.__dict__[_ATTR] = pm
    return pm


def unpatch_model(model_or_pm) -> nn.Module:
    """Revert :func:`patch_model`: the original layer objects are put back and the hooks removed."""
    pm = model_or_pm if isinstance(model_or_pm, PersonalizedModel) else getattr(model_or_pm, _ATTR, None)
    if pm is None:
        raise PatchError("this model is not patched")
    model = pm.model
    for name, wrapped in pm.patched.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if getattr(parent, child) is wrapped:
            setattr(parent, child, wrapped.base_layer)
    for h in pm._hooks:
        h.remove()
    pm._hooks.clear()
    pm.patched.clear()
    model.__dict__.pop(_ATTR, None)
    return model
