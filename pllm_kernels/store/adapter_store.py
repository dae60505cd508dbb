"""Adapter and user store: slot pools of stacked per-target LoRA buffers, users -> K weighted adapters.

Layout (the lora ops' spec, :mod:`pllm_kernels.reference.lora`): every patched target owns
``lora_a (num_slots, 1, max_rank, in)``, ``lora_b (num_slots, out, max_rank)``, ``slot_ranks (num_slots,)`` int32
and ``slot_scales (num_slots,)`` float32. An adapter occupies the *same* slot index in every target; a target the
adapter does not cover (``target_modules``, ``layers_to_transform``) has rank 0 in that slot.

Registered adapters live in host memory; they are copied into a slot when a batch needs them (slots are reused
least-recently-used first). More distinct adapters in one batch than slots is an error for now.

Placement: the buffers live on one device in one floating dtype (:attr:`AdapterStore.device` / ``dtype``).
:meth:`AdapterStore.to` moves them (weights cast, ``slot_ranks`` int32 and ``slot_scales`` float32 kept, grouped
targets kept as views of their group); a patched model calls :meth:`AdapterStore.follow` from ``model.to(...)``,
``.half()``, ``.cuda()``, so the buffers move with the model.

A user's profile is a list of ``(adapter, weight)`` pairs (shared + personal adapters as in OPPU / PROPER /
FDLoRA, mixtures as in iLoRA): the K weighted slots of the batch metadata.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from pllm_kernels.store.peft_import import AdapterError, LoRAAdapter, load_peft_adapter

__all__ = ["AdapterStore", "GroupBuffers", "TargetSpec", "TargetBuffers", "UserProfile", "UnknownUserError"]


def _norm_device(device) -> torch.device:
    """``device`` with its index filled in (``"cuda"`` -> ``cuda:<current>``), as tensors report it."""
    d = torch.device(device)
    if d.index is None and d.type not in ("cpu", "meta"):
        d = torch.empty(0, device=d).device
    return d


class UnknownUserError(KeyError):
    """A batch names a user that was never registered."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "unknown user"


@dataclass(frozen=True)
class TargetSpec:
    """A patched layer: ``in_features`` -> ``sum(slice_sizes)`` outputs (one slice unless fused adapters)."""

    name: str
    in_features: int
    out_features: int
    slice_sizes: tuple[int, ...] = ()

    def slices(self) -> tuple[int, ...]:
        return self.slice_sizes or (self.out_features,)


class TargetBuffers:
    """The stacked slot buffers of one target (read by :class:`pllm_kernels.modules.MultiLoRALinear`).

    ``views``: ``(lora_a, lora_b)`` slices of a :class:`GroupBuffers` to use instead of own storage; such a
    member stores ``scale * B`` with a scale of 1 (``folded_scale``), so the group can run with one scale per slot.
    """

    def __init__(self, spec: TargetSpec, num_slots: int, max_rank: int, dtype, device, views=None):
        self.spec = spec
        S = len(spec.slices())
        if views is None:
            self.lora_a = torch.zeros(num_slots, S, max_rank, spec.in_features, dtype=dtype, device=device)
            self.lora_b = torch.zeros(num_slots, spec.out_features, max_rank, dtype=dtype, device=device)
        else:
            self.lora_a, self.lora_b = views
        self.folded_scale = views is not None
        self.slot_ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.slot_scales = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.ranks_host = [0] * num_slots  # host mirror: lets a layer skip itself without a device sync
        self.slice_sizes = list(spec.slices())
        self.zero_padded = True  # the store keeps every slot zero beyond its rank (and zero when empty)

    def active(self, slots) -> bool:
        """Whether any of ``slots`` (host ints) has weights at this target."""
        rh = self.ranks_host
        return any(rh[s] for s in slots)


class GroupBuffers:
    """Targets that read the same input (q/k/v, gate/up) stacked as the slices of one multi-slice buffer, so one
    ``lora_apply`` call serves all of them and reads x once (vLLM / SGLang fuse q/k/v LoRA the same way).

    ``lora_a (L, S, R, in)``, ``lora_b (L, sum(out), R)``; the members' :class:`TargetBuffers` are views of them.
    A slot's group rank is the largest of its members' ranks (the rest is zero padding, so it adds nothing) and its
    scale is 1: members fold their own scale into B. ``members``: target names in slice order.
    """

    def __init__(self, name: str, specs: Sequence[TargetSpec], num_slots: int, max_rank: int, dtype, device):
        if len(specs) < 2 or len({t.in_features for t in specs}) != 1 or any(len(t.slices()) != 1 for t in specs):
            raise ValueError(f"group {name!r}: needs >= 2 single-slice targets with the same in_features")
        self.name = name
        self.members = [t.name for t in specs]
        self.slice_sizes = [t.out_features for t in specs]
        self.offsets = [sum(self.slice_sizes[:i]) for i in range(len(specs))]
        h = specs[0].in_features
        self.lora_a = torch.zeros(num_slots, len(specs), max_rank, h, dtype=dtype, device=device)
        self.lora_b = torch.zeros(num_slots, sum(self.slice_sizes), max_rank, dtype=dtype, device=device)
        self.slot_ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.slot_scales = torch.ones(num_slots, dtype=torch.float32, device=device)
        self.ranks_host = [0] * num_slots

    def member_views(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        off, n = self.offsets[i], self.slice_sizes[i]
        return self.lora_a[:, i : i + 1], self.lora_b[:, off : off + n]

    def active(self, slots) -> bool:
        rh = self.ranks_host
        return any(rh[s] for s in slots)


@dataclass
class UserProfile:
    """A user's personalization assets: K weighted LoRA adapters (more asset kinds come with later layers)."""

    user_id: str
    adapters: list[tuple[str, float]] = field(default_factory=list)

    @property
    def k(self) -> int:
        return len(self.adapters)


class AdapterStore:
    """Adapters (by name), users (by id) and the slot pool they are served from.

    Args:
        targets: the patched layers (name as in the model's ``named_modules()``).
        num_slots: slot capacity: the most distinct adapters one batch may use.
        max_rank: the largest LoRA rank accepted.
        dtype, device: of the slot buffers (the model's); :meth:`to` moves them later (a patched model does it
            from ``model.to(...)``).
    """

    def __init__(self, targets: Sequence[TargetSpec], num_slots: int = 8, max_rank: int = 16,
                 dtype=torch.float32, device="cpu", groups: Sequence[Sequence[str]] = ()):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        self.num_slots = int(num_slots)
        self.max_rank = int(max_rank)
        if not dtype.is_floating_point:
            raise TypeError(f"the slot buffers need a floating dtype, got {dtype}")
        self.dtype = dtype
        self.device = _norm_device(device)
        self.targets: dict[str, TargetSpec] = {t.name: t for t in targets}
        self.groups: dict[str, GroupBuffers] = {}
        self.group_of: dict[str, tuple[GroupBuffers, int]] = {}  # target name -> (group, slice index)
        for names in groups:
            unknown = [n for n in names if n not in self.targets]
            if unknown:
                raise ValueError(f"groups: unknown target(s) {unknown}")
            g = GroupBuffers("+".join(names), [self.targets[n] for n in names], self.num_slots, self.max_rank,
                             dtype, self.device)
            self.groups[g.name] = g
            for i, n in enumerate(names):
                if n in self.group_of:
                    raise ValueError(f"groups: target {n!r} is in two groups")
                self.group_of[n] = (g, i)
        self.buffers: dict[str, TargetBuffers] = {}
        for t in targets:
            views = None
            if t.name in self.group_of:
                g, i = self.group_of[t.name]
                views = g.member_views(i)
            self.buffers[t.name] = TargetBuffers(t, self.num_slots, self.max_rank, dtype, self.device, views)
        self.adapters: dict[str, LoRAAdapter] = {}
        self.users: dict[str, UserProfile] = {}
        self._slot_of: dict[str, int] = {}
        self._owner: list[str | None] = [None] * self.num_slots
        self._last_used = [0] * self.num_slots
        self._clock = itertools.count(1)
        self.loads = 0  # adapter -> slot copies so far (a cache-miss counter)

    # ------------------------------------------------------------------------------------------ adapters
    def _validate(self, adapter: LoRAAdapter) -> None:
        for mod, w in adapter.modules.items():
            spec = self.targets.get(mod)
            if spec is None:
                leaf = mod.rsplit(".", 1)[-1]
                if leaf in ("lm_head", "embed_tokens", "wte", "wpe", "embed_out") or "embed" in leaf:
                    raise AdapterError(
                        f"adapter {adapter.name!r}: LoRA on {mod} (embedding / lm_head) is not supported"
                    )
                raise AdapterError(
                    f"adapter {adapter.name!r}: module {mod} is not a patched target of this model "
                    f"(the adapter was made for another model, or patch with target_modules including {leaf!r})"
                )
            r, fin = w.a.shape
            fout = w.b.shape[0]
            if fin != spec.in_features or fout != spec.out_features:
                raise AdapterError(
                    f"adapter {adapter.name!r}: shape mismatch at {mod}: lora_A {tuple(w.a.shape)} / lora_B "
                    f"{tuple(w.b.shape)} imply {fin} -> {fout} features but the model's layer is "
                    f"{spec.in_features} -> {spec.out_features} (adapter made for another base model?)"
                )
            if r > self.max_rank:
                raise AdapterError(
                    f"adapter {adapter.name!r}: rank {r} at {mod} exceeds the store's max_rank={self.max_rank}"
                )
            if len(spec.slices()) != 1:
                raise AdapterError(f"adapter {adapter.name!r}: {mod} is a multi-slice target; not supported yet")
            if not torch.isfinite(w.a).all() or not torch.isfinite(w.b).all():
                raise AdapterError(f"adapter {adapter.name!r}: non-finite weights at {mod}")

    def _parse(self, name: str, source, config) -> LoRAAdapter:
        adapter = source if isinstance(source, LoRAAdapter) else load_peft_adapter(source, config, name=name)
        adapter.name = name
        self._validate(adapter)
        return adapter

    def add_adapter(self, name: str, source, config=None, *, replace: bool = False) -> LoRAAdapter:
        """Register a PEFT LoRA adapter (directory, state dict + config, or a parsed :class:`LoRAAdapter`).

        Validated completely (file, features, every module's shape) before anything is stored.
        """
        if name in self.adapters and not replace:
            raise AdapterError(f"adapter {name!r} is already registered (pass replace=True)")
        adapter = self._parse(name, source, config)
        self._commit_adapters({name: adapter})
        return adapter

    def _commit_adapters(self, adapters: Mapping[str, LoRAAdapter]) -> None:
        for name, adapter in adapters.items():
            if name in self._slot_of:  # replaced: the resident copy is stale
                self._free_slot(self._slot_of[name])
            self.adapters[name] = adapter

    def remove_adapter(self, name: str) -> None:
        users = [u for u, p in self.users.items() if any(a == name for a, _ in p.adapters)]
        if users:
            raise AdapterError(f"adapter {name!r} is used by users {users}; remove them first")
        if name not in self.adapters:
            raise AdapterError(f"unknown adapter {name!r}")
        if name in self._slot_of:
            self._free_slot(self._slot_of[name])
        del self.adapters[name]

    # --------------------------------------------------------------------------------------------- users
    @staticmethod
    def _norm_entries(adapters) -> list[tuple[str, float]]:
        if isinstance(adapters, str):
            adapters = [adapters]
        out = []
        for e in adapters:
            if isinstance(e, str):
                out.append((e, 1.0))
            else:
                n, w = e
                out.append((str(n), float(w)))
        return out

    def add_user(self, user_id: str, adapters, *, replace: bool = False) -> UserProfile:
        """Register a user with K weighted adapters: ``"name"``, ``[("shared", 0.5), ("mine", 1.0)]``."""
        return self.register_user(user_id, adapters=adapters, replace=replace)

    def register_user(self, user_id: str, source=None, config=None, *, weight: float = 1.0, adapters=(),
                      adapter_name: str | None = None, replace: bool = False) -> UserProfile:
        """Register a user, optionally importing their personal adapter in the same all-or-nothing step.

        Args:
            user_id: the user's id (a string).
            source, config: the user's own PEFT adapter (directory, or state dict + config), stored as
                ``adapter_name`` (default: the user id) with weight ``weight``.
            adapters: further ``(adapter_name, weight)`` entries of already registered adapters (e.g. a shared
                adapter), or names (weight 1).
        Nothing is stored if any part fails (bad file, shape mismatch, unknown adapter name).
        """
        if not isinstance(user_id, str):
            raise TypeError(f"user ids are strings, got {type(user_id).__name__}")
        if user_id in self.users and not replace:
            raise AdapterError(f"user {user_id!r} is already registered (pass replace=True)")
        entries = self._norm_entries(adapters)
        new: dict[str, LoRAAdapter] = {}
        if source is not None:
            aname = adapter_name or user_id
            if aname in self.adapters and not replace:
                raise AdapterError(f"adapter {aname!r} is already registered (pass replace=True or adapter_name=)")
            new[aname] = self._parse(aname, source, config)
            entries = [(aname, float(weight))] + entries
        if not entries:
            raise AdapterError(f"user {user_id!r}: give an adapter source or adapters=[...]")
        for aname, w in entries:
            if aname not in self.adapters and aname not in new:
                raise AdapterError(f"user {user_id!r}: unknown adapter {aname!r} (register it with add_adapter)")
            if not (w == w and abs(w) != float("inf")):
                raise AdapterError(f"user {user_id!r}: weight of {aname!r} must be finite, got {w}")
        self._commit_adapters(new)
        profile = UserProfile(user_id, entries)
        self.users[user_id] = profile
        return profile

    def remove_user(self, user_id: str) -> None:
        if user_id not in self.users:
            raise UnknownUserError(f"unknown user {user_id!r}")
        del self.users[user_id]

    def profile(self, user_id: str) -> UserProfile:
        try:
            return self.users[user_id]
        except KeyError:
            raise UnknownUserError(f"unknown user {user_id!r} (registered: {self._some_users()})") from None

    def _some_users(self) -> str:
        names = list(self.users)
        return ", ".join(map(repr, names[:8])) + (f", ... ({len(names)} users)" if len(names) > 8 else "") or "none"

    # --------------------------------------------------------------------------------------------- slots
    def _free_slot(self, slot: int) -> None:
        name = self._owner[slot]
        if name is not None:
            del self._slot_of[name]
        self._owner[slot] = None
        for buf in [*self.buffers.values(), *self.groups.values()]:
            buf.ranks_host[slot] = 0
            buf.slot_ranks[slot] = 0

    def _load(self, name: str, slot: int) -> None:
        adapter = self.adapters[name]
        self._free_slot(slot)
        for tname, buf in self.buffers.items():
            w = adapter.modules.get(tname)
            buf.lora_a[slot].zero_()  # zero padding beyond the rank: TargetBuffers.zero_padded
            buf.lora_b[slot].zero_()
            if w is None:
                buf.slot_ranks[slot] = 0
                buf.slot_scales[slot] = 0.0
                buf.ranks_host[slot] = 0
                continue
            r = w.rank
            buf.lora_a[slot, 0, :r].copy_(w.a.to(self.dtype))
            if buf.folded_scale:  # scale * B rounded once, from at least float32 (float64 for float64 buffers)
                acc = torch.promote_types(self.dtype, torch.float32)
                buf.lora_b[slot, :, :r].copy_((w.b.to(acc) * w.scale).to(self.dtype))
            else:
                buf.lora_b[slot, :, :r].copy_(w.b.to(self.dtype))
            buf.slot_ranks[slot] = r
            buf.slot_scales[slot] = 1.0 if buf.folded_scale else w.scale
            buf.ranks_host[slot] = r
        for g in self.groups.values():
            r = max(self.buffers[m].ranks_host[slot] for m in g.members)
            g.slot_ranks[slot] = r
            g.ranks_host[slot] = r
        self._owner[slot] = name
        self._slot_of[name] = slot
        self.loads += 1

    # ----------------------------------------------------------------------------------------- placement
    def to(self, device=None, dtype: torch.dtype | None = None) -> AdapterStore:
        """Move the slot buffers to ``device`` and / or cast the adapter weights to ``dtype`` (a floating dtype).

        ``slot_ranks`` stay int32 and ``slot_scales`` float32 (only their device changes); a grouped target's
        ``lora_a`` / ``lora_b`` stay views of its group's moved tensors. A device move copies the buffers; a dtype
        change (or leaving ``meta``, whose tensors hold no values) allocates new buffers and loads the resident
        adapters again from their host copies into the same slots, so ``model.half()`` then ``model.float()``
        loses no precision. The routing :meth:`resolve` builds and later slot loads use the new placement.
        Not thread-safe with a concurrent forward. Returns ``self``.
        """
        device = self.device if device is None else _norm_device(device)
        dtype = self.dtype if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"the slot buffers need a floating dtype, got {dtype}")
        if device == self.device and dtype == self.dtype:
            return self
        fresh = dtype != self.dtype or self.device.type == "meta"

        def weights(t: torch.Tensor) -> torch.Tensor:
            return torch.zeros(t.shape, dtype=dtype, device=device) if fresh else t.to(device)

        def small(t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
            if self.device.type == "meta":
                return torch.full(t.shape, fill, dtype=t.dtype, device=device)
            return t.to(device)

        # Everything is allocated before anything is replaced: a failed move (out of memory) changes nothing.
        new_groups = {n: (weights(g.lora_a), weights(g.lora_b), small(g.slot_ranks), small(g.slot_scales, 1.0))
                      for n, g in self.groups.items()}
        new_bufs = {n: (None if n in self.group_of else (weights(b.lora_a), weights(b.lora_b)),
                        small(b.slot_ranks), small(b.slot_scales)) for n, b in self.buffers.items()}
        for n, g in self.groups.items():
            g.lora_a, g.lora_b, g.slot_ranks, g.slot_scales = new_groups[n]
        for n, buf in self.buffers.items():
            ab, buf.slot_ranks, buf.slot_scales = new_bufs[n]
            if ab is None:  # a group member: views of the group's new tensors
                g, i = self.group_of[n]
                ab = g.member_views(i)
            buf.lora_a, buf.lora_b = ab
        self.device, self.dtype = device, dtype
        if fresh:  # the new buffers are zero: put the resident adapters back (not counted as cache misses)
            loads = self.loads
            for slot, name in enumerate(list(self._owner)):
                if name is not None:
                    self._load(name, slot)
            self.loads = loads
        return self

    def follow(self, fn) -> None:
        """Follow a conversion of the model: ``fn`` is the function ``nn.Module._apply`` maps over its tensors
        (``model.to(...)``, ``.half()``, ``.bfloat16()``, ``.float()``, ``.cuda()``, ``.cpu()``, ``.to_empty()``).

        The buffers go where ``fn`` sends a tensor of the store's dtype on the store's device: a device change
        moves them, a floating dtype change casts the weights (ranks and scales keep their dtypes). Cheap when
        nothing changes, so every patched layer calls it.
        """
        probe = fn(torch.zeros((), dtype=self.dtype, device=self.device))
        if isinstance(probe, torch.Tensor):
            self.to(probe.device, probe.dtype if probe.is_floating_point() else None)

    def acquire(self, names: Sequence[str]) -> dict[str, int]:
        """Make every adapter in ``names`` resident; returns name -> slot. Evicts least-recently-used slots."""
        need = list(dict.fromkeys(names))
        if len(need) > self.num_slots:
            raise RuntimeError(
                f"this batch uses {len(need)} distinct adapters but the store has {self.num_slots} slots; "
                "patch with a larger num_slots (max_users) or split the batch"
            )
        for n in need:
            if n not in self.adapters:
                raise AdapterError(f"unknown adapter {n!r}")
        now = next(self._clock)
        needed = set(need)
        for n in need:
            if n in self._slot_of:
                self._last_used[self._slot_of[n]] = now
        for n in need:
            if n in self._slot_of:
                continue
            free = [s for s in range(self.num_slots) if self._owner[s] is None]
            if free:
                slot = free[0]
            else:
                cands = [s for s in range(self.num_slots) if self._owner[s] not in needed]
                slot = min(cands, key=lambda s: self._last_used[s])
            self._load(n, slot)
            self._last_used[slot] = now
        return {n: self._slot_of[n] for n in need}

    def resolve(self, users: Sequence[str | None]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Users per row -> ``(row_slots (B, K) int32, row_weights (B, K) float32, active slots)``.

        ``None`` rows get slot -1 (the base model). K = the most adapters of any user in the batch (>= 1).
        Unknown users raise :class:`UnknownUserError` naming them.
        """
        profiles = []
        unknown = []
        for u in users:
            if u is None:
                profiles.append(None)
            elif u in self.users:
                profiles.append(self.users[u])
            else:
                unknown.append(u)
        if unknown:
            raise UnknownUserError(
                f"unknown user(s) {', '.join(map(repr, dict.fromkeys(unknown)))} (registered: {self._some_users()})"
            )
        names = [a for p in profiles if p is not None for a, _ in p.adapters]
        slot_of = self.acquire(names)
        K = max([p.k for p in profiles if p is not None] + [1])
        slots = [[-1] * K for _ in profiles]
        weights = [[0.0] * K for _ in profiles]
        for b, p in enumerate(profiles):
            if p is None:
                continue
            for k, (a, w) in enumerate(p.adapters):
                slots[b][k] = slot_of[a]
                weights[b][k] = w
        row_slots = torch.tensor(slots, dtype=torch.int32).reshape(len(profiles), K).to(self.device)
        row_weights = torch.tensor(weights, dtype=torch.float32).reshape(len(profiles), K).to(self.device)
        return row_slots, row_weights, sorted(set(slot_of.values()))
