"""Patch a loaded Hugging Face causal LM in place to serve many users' LoRA adapters in one batch.

::

    pm = patch_model(model, num_slots=16, max_rank=16)          # target layers -> MultiLoRALinear
    pm.register_user("alice", "/adapters/alice")                 # PEFT dir (adapter_config.json + safetensors)
    pm.add_adapter("shared", shared_state_dict, config=cfg)
    pm.add_user("bob", [("shared", 0.5), ("bob-own", 1.0)])    # K weighted adapters
    out = pm.generate(input_ids, attention_mask=mask, users=["alice", None, "bob"], max_new_tokens=32)
    pm.unpatch()                                                  # the original modules are back

Each call resolves its users into a :class:`pllm_kernels.batch.BatchPlan` (the adapter slots it needs are pinned
until the call returns). A forward pre-hook on the model builds the :class:`pllm_kernels.batch.PersonalBatch` once
per forward (prefill and every decode step of ``generate``) from that plan and the current tokens' attention mask;
the patched layers only read it; a decode step (one token per row) reuses the routing its call built for the
first decode step (a fresh ``PersonalBatch`` each forward all the same). Rows follow the same order through the
KV-cache decode steps, so per-row routing holds for the whole generation. ``generate(..., decode="static" |
"graph" | "compile")`` runs our own loop over a static KV cache and fixed buffers instead of HF's
(:mod:`pllm_kernels.hf.static_decode`).

Concurrency contract: ``forward`` / ``generate`` may be called from several threads on one patched model. Each
call's plan and batches are private to its thread (context variables), slot acquisition is atomic, and slots used
by a call in flight are never evicted; a call that needs more slots than the calls in flight leave free waits for
them up to ``store.busy_timeout`` seconds, then raises :class:`pllm_kernels.store.SlotsBusyError`. Registering and
removing users / adapters is safe at any time (an adapter in use by a call in flight cannot be replaced or removed:
:class:`pllm_kernels.store.AdapterInUseError`). Moving the model (``model.to``) while calls are in flight is not
supported. The GPU work of concurrent calls is ordered by the CUDA stream each thread uses.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from pllm_kernels.batch import ForwardContext, resolve_plan
from pllm_kernels.hf.targets import PatchError, find_decoder_layers, find_targets
from pllm_kernels.modules.multi_lora import LoRAGroup, MultiLoRALinear
from pllm_kernels.modules.steering import SteeringHook, SteerRMSNorm, norm_kind
from pllm_kernels.ops._backend import BACKENDS
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

    Attributes: ``model`` (the patched HF model), ``store`` (adapters, users, slots), ``context`` (per-call
    routing shared by the layers, private to each thread), ``patched`` (target name -> :class:`MultiLoRALinear`).
    """

    def __init__(self, model: nn.Module, store: AdapterStore, context: ForwardContext,
                 patched: dict[str, MultiLoRALinear], how: str, steering=None):
        super().__init__()
        self.model = model
        self.__dict__["store"] = store
        self.__dict__["context"] = context
        self.__dict__["patched"] = patched
        self.__dict__["how"] = how
        self.__dict__["steering_points"] = steering or {"hooks": [], "norms": {}}
        self.__dict__["_hooks"] = [
            model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            model.register_forward_hook(self._post_hook, always_call=True),
        ]

    # ---------------------------------------------------------------------------------------- hooks
    def _pre_hook(self, module, args, kwargs):
        if torch.compiler.is_compiling():  # compiled static decode: the layers read ForwardContext.compiled's batch
            return None
        ctx = self.context
        if ctx.pinned_batch is not None:  # static decoding pushes its prebuilt batch (fresh scratch per forward)
            found = _batch_input(args, kwargs)
            if found is None:
                raise RuntimeError("personalized forward needs input_ids (B, S) or inputs_embeds (B, S, H)")
            ctx.begin(int(found[1].shape[0]), int(found[1].shape[1]))
            return None
        plan = ctx.plan
        if plan is None or not (plan.active_slots or plan.steering is not None):
            ctx.begin(0, 0)  # pushes "no batch" for this forward
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
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        with ctx.request(plan.to(x.device)):  # routed before the model (and its store) moved
            ctx.begin(int(x.shape[0]), int(x.shape[1]), mask if isinstance(mask, torch.Tensor) else None)
        return None

    def _post_hook(self, module, args, output):
        if torch.compiler.is_compiling():
            return None
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

    def add_steering(self, user_id: str, layer: int | None, vector, scale: float = 1.0, mode: str = "add"):
        """Add a steering vector to a user (created if new): ``vector (hidden,)`` added as ``scale * vector`` to the
        output of decoder block ``layer`` (0-based; ``hidden_states[layer + 1]``) at every position of the user's
        rows, prompt and generated tokens alike. Repeatable (entries accumulate, applied in order). ``vector`` may
        be a ``{layer: tensor}`` dict or a file (safetensors / ``.pt``, as saved from steering-vectors' or repeng's
        vectors); ``layer=None`` then adds every layer in it. ``mode``: ``"add"``, ``"ablate"`` (project the
        direction out; scale ignored), ``"ablate_add"``, ``"norm_preserve"``. See :meth:`AdapterStore.add_steering`.
        """
        return self.store.add_steering(user_id, layer, vector, scale, mode)

    def remove_steering(self, user_id: str, layer: int | None = None) -> int:
        """Remove a user's steering vectors (at ``layer``, or all); returns how many."""
        return self.store.remove_steering(user_id, layer)

    def add_soft_prompt(self, user_id: str, embeds) -> torch.Tensor:
        """Give a user (created if new) a soft prompt: ``(n, hidden)`` virtual token embeddings placed right before
        the row's first real token (prompt tuning / PPlug). A tensor, or a PEFT prompt-tuning adapter dir / file."""
        return self.store.add_soft_prompt(user_id, embeds)

    def remove_soft_prompt(self, user_id: str) -> None:
        self.store.remove_soft_prompt(user_id)

    def set_decoding(self, user_id: str, policy=None, **fields):
        """Set a user's (created if new) decoding policy for :meth:`personalized_generate`: contrast (``contrast=``
        lambda with ``context=`` token ids), reward guidance (``reward_weights=``, ``beta=``, ``reward_top_k=``),
        sampling (``temperature=`` (0 = greedy), ``top_k=``, ``top_p=``, ``min_p=``) and ``seed=``. See
        :class:`pllm_kernels.store.DecodingPolicy`."""
        return self.store.set_decoding(user_id, policy, **fields)

    def personalized_generate(self, input_ids, attention_mask=None, users=None, **kwargs):
        """Decode a mixed batch where every row follows its user's decoding policy (plain / contrasted /
        reward-guided, own sampling parameters and seed), composing with LoRA, steering and soft prompts.
        Returns a :class:`pllm_kernels.hf.decoding.GenerationOutput` (``tokens``, ``logprobs``, ``finished``).
        See :func:`pllm_kernels.hf.decoding.personalized_generate`."""
        from pllm_kernels.hf.decoding import personalized_generate

        return personalized_generate(self, input_ids, attention_mask, users, **kwargs)

    def remove_user(self, user_id: str) -> None:
        """Remove a user and the personal adapters no other user references (see :meth:`AdapterStore.remove_user`)."""
        self.store.remove_user(user_id)

    def remove_adapter(self, name: str) -> None:
        """Remove an adapter no user references."""
        self.store.remove_adapter(name)

    def profile(self, user_id: str) -> UserProfile:
        """The user's profile (every asset); raises :class:`UnknownUserError` naming the user."""
        return self.store.profile(user_id)

    # ------------------------------------------------------------------------------------- routing
    @contextmanager
    def users(self, users: Sequence[str | None] | None):
        """Serve every forward inside the block (in this thread) with ``users`` (one entry per row; ``None`` = base
        model). The adapter slots the users need are pinned until the block exits."""
        if users is None:
            with self.context.request(None):
                yield self
            return
        plan = resolve_plan(self.store, users)
        try:
            with self.context.request(plan):
                yield self
        finally:
            plan.release()

    def set_backend(self, backend: str | None = None, strategy: str = "auto") -> None:
        """Backend of every patched layer's ``lora_apply`` (``None`` = the process default, ``PLLM_BACKEND``);
        ``strategy`` for the torch backend (``auto`` / ``dense`` / ``gather`` / ``runs``)."""
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if strategy not in ("auto", "dense", "gather", "runs"):
            raise ValueError(f"strategy must be 'auto', 'dense', 'gather' or 'runs', got {strategy!r}")
        for layer in self.patched.values():
            layer.__dict__["lora_backend"] = backend
            layer.__dict__["lora_strategy"] = strategy

    def _check_rows(self, users, x):
        if users is None:
            return
        if isinstance(users, (str, bytes)):
            raise TypeError(f"users must be a list with one user id (or None) per row, not the string {users!r}; "
                            f"for one row write users=[{users!r}]")
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] != len(users):
            raise ValueError(f"users: got {len(users)} users for a batch of {x.shape[0]} rows")

    def _position_ids(self, x, attention_mask, kwargs):
        """Position ids from the attention mask (left padding), as ``generate`` makes them, unless given: for
        models with absolute (learned) position embeddings such as GPT-2. Rotary models are shift-invariant, so
        they need none and keep the plain forward's output bit for bit."""
        if "position_ids" in kwargs or not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            return
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or not self._absolute_positions():
            return
        pos = attention_mask.long().cumsum(-1) - 1
        pos.masked_fill_(attention_mask == 0, 1)
        kwargs["position_ids"] = pos[:, -x.shape[1]:]

    def _absolute_positions(self) -> bool:
        """Whether the model takes ``position_ids`` and has absolute position embeddings (no rotary config)."""
        takes = self.__dict__.get("_abs_pos")
        if takes is None:
            takes = self._takes("position_ids")
            cfg = getattr(self.model, "config", None)
            rotary = any(getattr(cfg, a, None) is not None for a in ("rope_theta", "rope_parameters", "rope_scaling"))
            takes = takes and not rotary
            self.__dict__["_abs_pos"] = takes
        return takes

    def forward(self, input_ids=None, attention_mask=None, users: Sequence[str | None] | None = None, **kwargs):
        """The model's forward with per-row users (``None`` rows, or ``users=None``, run the base model).

        Without ``position_ids``, models with absolute position embeddings (GPT-2) get them from
        ``attention_mask`` as ``generate`` makes them, so a left-padded row gets the positions it would have alone.
        With soft prompts in the batch the returned logits are still aligned with ``input_ids`` (the virtual
        positions are dropped)."""
        x = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        self._check_rows(users, x)
        with self.users(users):
            plan = self.context.plan
            if plan is not None and plan.soft_prompts is not None:
                return self._forward_prompted(plan, input_ids, attention_mask, kwargs)
            self._position_ids(x, attention_mask, kwargs)
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, input_ids=None, attention_mask=None, users: Sequence[str | None] | None = None,
                 decode: str = "eager", **kwargs):
        """``model.generate`` with per-row users: left padding, KV cache, greedy or sampling.

        ``decode``: ``"eager"`` (HF's ``generate``), ``"static"`` (our loop over a static KV cache and fixed input
        and routing buffers, run eagerly), ``"graph"`` (that loop with the decode step captured as a CUDA graph per
        batch-size bucket, replayed across steps and calls) or ``"compile"`` (the static step under
        ``torch.compile``); see :mod:`pllm_kernels.hf.static_decode` for what the static modes serve.

        Returns prompt + new tokens, like ``model.generate(input_ids)``; with soft prompts in the batch, only the
        new tokens (the model runs from ``inputs_embeds``, as HF's generate does)."""
        from pllm_kernels.hf.static_decode import DECODE_MODES, static_generate

        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(map(repr, DECODE_MODES))}, got {decode!r}")
        self._check_rows(users, input_ids if input_ids is not None else kwargs.get("inputs_embeds"))
        with self.users(users):
            plan = self.context.plan
            if decode != "eager":
                return static_generate(self, input_ids, attention_mask, plan, decode, kwargs)
            if plan is not None and plan.soft_prompts is not None:
                embeds, mask, _, _ = self._splice(plan, input_ids, attention_mask, kwargs)
                return self.model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def static_decode_stats(self) -> dict:
        """Counters of the static decode paths (all calls together): ``calls``, ``captures`` (CUDA graphs
        captured), ``replays``, ``compiles`` (compiled steps made), ``runners`` (cached static states now)."""
        from pllm_kernels.hf.static_decode import _state

        pool, stats = _state(self)
        return {**stats, "runners": pool.count()}

    def clear_static_decode(self) -> int:
        """Free the cached static decode states (KV caches, buffers, CUDA graphs, compiled steps) not in use;
        returns how many were freed."""
        from pllm_kernels.hf.static_decode import _state

        return _state(self)[0].clear()

    # ------------------------------------------------------------------------------------- soft prompts
    def _splice(self, plan, input_ids, attention_mask, kwargs):
        """``(inputs_embeds (B, S + n_max, H), mask, position_ids, index (B, S))``: each row's soft prompt placed
        right before its first real token, rows aligned by extra left padding; ``index[b, j]`` is where column
        ``j`` of the input went."""
        if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
            raise ValueError("soft prompts are spliced into the prompt: pass the whole prompt without a cache, or use "
                             "generate for incremental decoding")
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            if input_ids is None:
                raise ValueError("input_ids or inputs_embeds is required")
            embeds = self.model.get_input_embeddings()(input_ids)
        B, S, H = embeds.shape
        device = embeds.device
        mask = torch.ones(B, S, dtype=torch.long, device=device) if attention_mask is None else attention_mask.long()
        prompts = list(plan.soft_prompts)
        if len(prompts) != B:  # rows repeated (num_return_sequences) are spliced after generate expands them
            raise ValueError(f"users: got {len(prompts)} users for a batch of {B} rows")
        ns = [0 if p is None else int(p.shape[0]) for p in prompts]
        n_max = max(ns)
        first = torch.where(mask.bool().any(1), mask.bool().float().argmax(1), torch.full((B,), S, device=device))
        j = torch.arange(S, device=device)[None, :]
        n_t = torch.tensor(ns, device=device)[:, None]
        index = (n_max - n_t) + j + n_t * (j >= first[:, None])  # (B, S)
        new = embeds.new_zeros(B, S + n_max, H)
        new_mask = mask.new_zeros(B, S + n_max)
        new.scatter_(1, index[:, :, None].expand(B, S, H), embeds)
        new_mask.scatter_(1, index, mask)
        for b, p in enumerate(prompts):
            if p is None:
                continue
            start = n_max - ns[b] + int(first[b])
            new[b, start:start + ns[b]] = p.to(device=device, dtype=embeds.dtype)
            new_mask[b, start:start + ns[b]] = 1
        pos = (new_mask.cumsum(-1) - 1).masked_fill(new_mask == 0, 1)
        return new, new_mask, pos, index

    def _forward_prompted(self, plan, input_ids, attention_mask, kwargs):
        embeds, mask, pos, index = self._splice(plan, input_ids, attention_mask, kwargs)
        if "position_ids" not in kwargs and self._takes("position_ids"):
            kwargs["position_ids"] = pos
        out = self.model(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        logits = getattr(out, "logits", None)
        if isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[1] == embeds.shape[1]:
            out["logits"] = logits.gather(1, index[:, :, None].expand(-1, -1, logits.shape[-1]))
        return out

    def _takes(self, arg: str) -> bool:
        cache = self.__dict__.setdefault("_takes_args", {})
        if arg not in cache:
            try:
                cache[arg] = arg in inspect.signature(self.model.forward).parameters
            except (TypeError, ValueError):
                cache[arg] = False
        return cache[arg]

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
                dtype: torch.dtype | None = None, fuse_projections: bool = True, backend: str | None = None,
                busy_timeout: float = 30.0, steer_slots: int = 64, fuse_steering: bool = True) -> PersonalizedModel:
    """Patch ``model`` (a loaded HF causal LM) in place: target layers become :class:`MultiLoRALinear`.

    Args:
        num_slots: adapter slots per target: the most distinct adapters one batch may use ("max users").
        max_rank: the largest LoRA rank that can be registered.
        target_modules: ``None`` (the architecture's map: every attention / MLP projection; a generic walker for
            unknown architectures), ``"all-linear"``, or leaf names such as ``["q_proj", "v_proj"]``.
        dtype: of the slot buffers (default: each target's weight dtype).
        fuse_projections: run the adapters of projections that read the same input (q/k/v, gate/up) as the
            slices of one multi-slice ``lora_apply`` (x read once, 4 instead of 7 calls per Llama layer).
        backend: of the layers' ``lora_apply`` (``None`` = the process default; see
            :meth:`PersonalizedModel.set_backend`).
        busy_timeout: seconds a call waits for adapter slots held by calls in flight (see the concurrency contract).
        steer_slots: rows of each layer's steering-vector table (distinct vectors one batch may use per layer).
        fuse_steering: steer through the next RMSNorm (one fused pass) where the architecture allows (Llama,
            Mistral, Qwen, Gemma, Phi-3 norms) in forwards without autograd; else a forward hook on the block.
    Returns:
        a :class:`PersonalizedModel`; ``.unpatch()`` (or :func:`unpatch_model`) reverts.
    """
    if not isinstance(model, nn.Module):
        raise PatchError(f"model must be a torch.nn.Module (a loaded HF causal LM), got {type(model).__name__}")
    if getattr(model, _ATTR, None) is not None:
        raise PatchError(f"{type(model).__name__} is already patched; unpatch it first")
    _check_model_kind(model)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    found, how = find_targets(model, target_modules)
    weight = found[0][1].weight
    dtype = dtype or weight.dtype
    device = weight.device
    specs = [TargetSpec(name, fin, fout) for name, _, fin, fout in found]
    groups = _input_groups(found) if fuse_projections else []
    store = AdapterStore(specs, num_slots=num_slots, max_rank=max_rank, dtype=dtype, device=device, groups=groups,
                         busy_timeout=busy_timeout)
    runtimes = {g.name: LoRAGroup(g) for g in store.groups.values()}
    context = ForwardContext(num_slots)
    patched: dict[str, MultiLoRALinear] = {}
    for name, mod, fin, fout in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        group = None
        if name in store.group_of:
            g, i = store.group_of[name]
            group = (runtimes[g.name], i, name)
        wrapped = MultiLoRALinear(mod, store.buffers[name], context, fin, fout, group=group, name=name,
                                  on_apply=store.follow, backend=backend)
        setattr(parent, child, wrapped)
        patched[name] = wrapped
    steering = _install_steering(model, store, context, steer_slots, fuse_steering, backend)
    pm = PersonalizedModel(model, store, context, patched, how, steering)
    model.__dict__[_ATTR] = pm
    return pm


def _hidden_size(model: nn.Module, layers) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int):
            return v
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "embedding_dim"):
        return int(emb.embedding_dim)
    raise PatchError(f"{type(model).__name__}: cannot tell the hidden size (no config.hidden_size)")


def _install_steering(model, store, context, steer_slots, fuse, backend) -> dict:
    """Steering points on every decoder block: a forward hook on the block, and (``fuse``) the RMSNorm that reads
    its output next (the following block's ``input_layernorm``, or the final norm) wrapped to steer + normalise in
    one pass."""
    prefix, layers = find_decoder_layers(model)
    store.configure_inputs(len(layers), _hidden_size(model, layers), steer_slots)
    parent = model.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else model
    norms: dict[tuple[nn.Module, str], tuple[nn.Module, SteerRMSNorm]] = {}
    hooks = []
    for i, block in enumerate(layers):
        host, attr = (layers[i + 1], "input_layernorm") if i + 1 < len(layers) else (parent, "norm")
        base = getattr(host, attr, None)
        fused = bool(fuse and isinstance(base, nn.Module) and norm_kind(base) is not None)
        if fused:
            wrapped = SteerRMSNorm(base, context, i, backend=backend)
            setattr(host, attr, wrapped)
            norms[(host, attr)] = (base, wrapped)
        hooks.append(block.register_forward_hook(SteeringHook(context, i, fused, backend=backend)))
    return {"hooks": hooks, "norms": norms}


def _check_model_kind(model: nn.Module) -> None:
    """Refuse models the per-row routing does not serve, naming what is missing."""
    cfg = getattr(model, "config", None)
    name = type(model).__name__
    if cfg is not None and getattr(cfg, "is_encoder_decoder", False):
        raise PatchError(
            f"{name} is an encoder-decoder model ({getattr(cfg, 'model_type', '?')}): only decoder-only causal LMs "
            "are supported (the per-row routing follows the decoder's tokens; an encoder's tokens have another "
            "layout). Load a decoder-only model (AutoModelForCausalLM)"
        )
    if cfg is not None and hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is None:
        raise PatchError(f"{name} has no language-model head: patch a causal LM (AutoModelForCausalLM), not the "
                         "bare decoder")


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
    for h in pm._hooks + pm.steering_points["hooks"]:
        h.remove()
    pm._hooks.clear()
    for (host, attr), (base, wrapped) in pm.steering_points["norms"].items():
        if getattr(host, attr) is wrapped:
            setattr(host, attr, base)
    pm.steering_points["norms"].clear()
    pm.patched.clear()
    pool = pm.__dict__.pop("_static_pool", None)  # static decode states hold the patched model's tensors
    if pool is not None:
        pool.clear()
    model.__dict__.pop(_ATTR, None)
    return model
