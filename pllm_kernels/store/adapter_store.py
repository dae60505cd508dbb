"""Adapter and user store: slot pools of stacked per-target LoRA buffers, users -> K weighted adapters.

Layout (the lora ops' spec, :mod:`pllm_kernels.reference.lora`): every patched target owns
``lora_a (num_slots, 1, max_rank, in)``, ``lora_b (num_slots, out, max_rank)``, ``slot_ranks (num_slots,)`` int32
and ``slot_scales (num_slots,)`` float32. An adapter occupies the *same* slot index in every target; a target the
adapter does not cover (``target_modules``, ``layers_to_transform``) has rank 0 in that slot.

Registered adapters live in host memory; they are copied into a slot when a batch needs them (slots are reused
least-recently-used first). More distinct adapters in one batch than slots is an error.

Concurrency: every method takes the store's lock, so registrations, removals and slot acquisition are atomic.
:meth:`AdapterStore.lease` pins the slots a request uses until the lease is released (a forward / generate in
flight): pinned slots are never evicted, and a request that needs more free slots than the unpinned ones waits up
to ``busy_timeout`` seconds for other requests to finish, then fails with :class:`SlotsBusyError`. Replacing or
removing an adapter that a request in flight uses fails with :class:`AdapterInUseError`.

Adapter values are checked finite **in the dtype of the slot buffers** (with the scale folded in where a grouped
target stores ``scale * B``), so an fp16 model refuses a ``lora_B`` of 1e5 at registration instead of serving inf.

Placement: the buffers live on one device in one floating dtype (:attr:`AdapterStore.device` / ``dtype``).
:meth:`AdapterStore.to` moves them (weights cast, ``slot_ranks`` int32 and ``slot_scales`` float32 kept, grouped
targets kept as views of their group); a patched model calls :meth:`AdapterStore.follow` from ``model.to(...)``,
``.half()``, ``.cuda()``, so the buffers move with the model.

A user's profile is a list of ``(adapter, weight)`` pairs (shared + personal adapters as in OPPU / PROPER /
FDLoRA, mixtures as in iLoRA): the K weighted slots of the batch metadata.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pllm_kernels.store.decoding import DecodingPolicy
from pllm_kernels.store.inputs import InputAssets, SteeringEntry, load_soft_prompt, load_vectors
from pllm_kernels.store.peft_import import AdapterError, LoRAAdapter, LoRAModuleWeights, load_peft_adapter
from pllm_kernels.store.slots import SlotLease, SlotPool, SlotsBusyError, lease_pools

__all__ = [
    "AdapterInUseError",
    "AdapterStore",
    "GroupBuffers",
    "SlotLease",
    "SlotsBusyError",
    "TargetBuffers",
    "TargetSpec",
    "UnknownUserError",
    "UserProfile",
]


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


class AdapterInUseError(AdapterError):
    """An adapter cannot be replaced or removed while a request in flight uses it."""


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
    """Every personalization asset of one user; a request resolves it into one row plan
    (:class:`pllm_kernels.batch.RowPlan`).

    * ``adapters``: K weighted LoRA adapters ``[(adapter name, weight)]`` (shared + personal, mixtures).
    * ``owned``: the adapters registered *for* this user (``register_user(source=...)``): removed with the user
      when no other user references them.
    * ``steering``, ``soft_prompt``, ``decoding``, ``seed``: input-layer and decoding assets (filled by the
      steering / soft-prompt and decoding APIs; empty means "none").
    """

    user_id: str
    adapters: list[tuple[str, float]] = field(default_factory=list)
    owned: list[str] = field(default_factory=list)
    steering: list[Any] = field(default_factory=list)
    soft_prompt: Any = None
    decoding: DecodingPolicy | None = None
    seed: int | None = None

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
        busy_timeout: seconds a request waits for slots pinned by requests in flight before
            :class:`SlotsBusyError` (0 = fail at once).
    """

    def __init__(self, targets: Sequence[TargetSpec], num_slots: int = 8, max_rank: int = 16,
                 dtype=torch.float32, device="cpu", groups: Sequence[Sequence[str]] = (), busy_timeout: float = 30.0):
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be an int >= 1, got {num_slots!r}")
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
            raise ValueError(f"max_rank must be an int >= 1, got {max_rank!r}")
        self.num_slots = int(num_slots)
        self.max_rank = int(max_rank)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"the slot buffers need a floating dtype, got {dtype}")
        self.dtype = dtype
        self.device = _norm_device(device)
        self.busy_timeout = float(busy_timeout)
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
        self._pool = SlotPool(self.num_slots, "lora")
        self.inputs: InputAssets | None = None  # steering tables + soft prompts (configure_inputs)
        self._serial = itertools.count()
        self._clock = itertools.count(1)
        self._lock = threading.RLock()
        self._unpinned = threading.Condition(self._lock)
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
            self._check_values(adapter.name, mod, w, self.dtype)

    def _slot_values(self, target: str, w: LoRAModuleWeights, dtype: torch.dtype):
        """``(A, B, scale)`` as a slot of ``target`` stores them in ``dtype`` (grouped targets fold the scale)."""
        if target in self.group_of:  # scale * B rounded once, from at least float32
            acc = torch.promote_types(dtype, torch.float32)
            return w.a.to(dtype), (w.b.to(acc) * w.scale).to(dtype), 1.0
        return w.a.to(dtype), w.b.to(dtype), w.scale

    def _check_values(self, name: str, target: str, w: LoRAModuleWeights, dtype: torch.dtype) -> None:
        """Finite in the slot buffers' dtype, scale finite in float32 (the ``slot_scales`` dtype)."""
        if not (isinstance(w.scale, (int, float)) and math.isfinite(w.scale) and abs(w.scale) < 3.4e38):
            raise AdapterError(f"adapter {name!r}: the LoRA scale (lora_alpha / r) at {target} is {w.scale}; it "
                               "must be finite in float32")
        a, b, _ = self._slot_values(target, w, dtype)
        for what, t in (("lora_A", a), ("lora_B", b)):
            if not bool(torch.isfinite(t).all()):
                raise AdapterError(
                    f"adapter {name!r}: non-finite {what} values at {target} in the slot buffers' dtype {dtype} "
                    "(NaN / inf in the file, or values beyond the dtype's range"
                    f"{', after folding the scale' if target in self.group_of and what == 'lora_B' else ''})"
                )

    def _parse(self, name: str, source, config) -> LoRAAdapter:
        adapter = source if isinstance(source, LoRAAdapter) else load_peft_adapter(source, config, name=name)
        adapter.name = name
        self._validate(adapter)
        return adapter

    def _users_of(self, adapter: str) -> list[str]:
        return [u for u, p in self.users.items() if any(a == adapter for a, _ in p.adapters)]

    def add_adapter(self, name: str, source, config=None, *, replace: bool = False) -> LoRAAdapter:
        """Register a PEFT LoRA adapter (directory, state dict + config, or a parsed :class:`LoRAAdapter`).

        Validated completely (file, features, every module's shape and values) before anything is stored.
        ``replace=True`` replaces an adapter of that name for every user that references it (not while a request
        in flight uses it: :class:`AdapterInUseError`).
        """
        if not isinstance(name, str) or not name:
            raise AdapterError(f"adapter names are non-empty strings, got {name!r}")
        with self._lock:
            if name in self.adapters and not replace:
                raise AdapterError(f"adapter {name!r} is already registered (pass replace=True)")
        adapter = self._parse(name, source, config)  # parsing (file I/O) outside the lock
        with self._lock:
            if name in self.adapters and not replace:
                raise AdapterError(f"adapter {name!r} is already registered (pass replace=True)")
            self._check_not_in_flight([name], "replace")
            self._commit_adapters({name: adapter})
        return adapter

    def _check_not_in_flight(self, names, what: str) -> None:
        busy = [n for n in names if self._pool.pinned(n)]
        if busy:
            raise AdapterInUseError(f"cannot {what} adapter(s) {busy}: a forward / generate in flight uses them; "
                                    "retry when it has finished")

    def _commit_adapters(self, adapters: Mapping[str, LoRAAdapter]) -> None:
        for name, adapter in adapters.items():
            if name in self._slot_of:  # replaced: the resident copy is stale
                self._free_slot(self._slot_of[name])
            self.adapters[name] = adapter

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            users = self._users_of(name)
            if users:
                raise AdapterError(f"adapter {name!r} is used by users {users}; remove them first")
            if name not in self.adapters:
                raise AdapterError(f"unknown adapter {name!r}")
            self._check_not_in_flight([name], "remove")
            if name in self._slot_of:
                self._free_slot(self._slot_of[name])
            del self.adapters[name]
            for p in self.users.values():
                if name in p.owned:
                    p.owned.remove(name)

    # --------------------------------------------------------------------------------------------- users
    @staticmethod
    def _norm_entries(adapters) -> list[tuple[str, float]]:
        if isinstance(adapters, str):
            adapters = [adapters]
        out = []
        for e in adapters:
            if isinstance(e, str):
                out.append((e, 1.0))
                continue
            try:
                n, w = e
                out.append((str(n), float(w)))
            except (TypeError, ValueError):
                raise AdapterError(f"adapters: each entry is a name or a (name, weight) pair, got {e!r}") from None
        return out

    def add_user(self, user_id: str, adapters=(), *, replace: bool = False) -> UserProfile:
        """Register a user with K weighted adapters: ``"name"``, ``[("shared", 0.5), ("mine", 1.0)]``, or none
        (a user served by steering / a soft prompt only)."""
        return self.register_user(user_id, adapters=adapters, replace=replace, _allow_empty=True)

    def register_user(self, user_id: str, source=None, config=None, *, weight: float = 1.0, adapters=(),
                      adapter_name: str | None = None, replace: bool = False, _allow_empty: bool = False
                      ) -> UserProfile:
        """Register a user, optionally importing their personal adapter in the same all-or-nothing step.

        Args:
            user_id: the user's id (a string).
            source, config: the user's own PEFT adapter (directory, or state dict + config), stored as
                ``adapter_name`` (default: the user id) with weight ``weight``; owned by the user (removed with it).
            adapters: further ``(adapter_name, weight)`` entries of already registered adapters (e.g. a shared
                adapter), or names (weight 1).
            replace: replace an existing user of this id (and the personal adapter it owns). An adapter that
                other users reference is never replaced here: use ``add_adapter(name, ..., replace=True)``.
        Nothing is stored if any part fails (bad file, shape mismatch, unknown adapter name, in use).
        """
        if not isinstance(user_id, str) or not user_id:
            raise TypeError(f"user ids are non-empty strings, got {user_id!r}")
        entries = self._norm_entries(adapters)
        aname = None
        if source is not None:
            aname = adapter_name or user_id
            if not isinstance(aname, str):
                raise AdapterError(f"adapter_name must be a string, got {aname!r}")
            self._check_register(user_id, aname, replace)
            parsed = self._parse(aname, source, config)  # parsing (file I/O) outside the lock
            entries = [(aname, float(weight))] + entries
        if not entries and not _allow_empty:
            raise AdapterError(f"user {user_id!r}: give an adapter source or adapters=[...]")
        with self._lock:
            if aname is not None:
                self._check_register(user_id, aname, replace)
            for n, w in entries:
                if n not in self.adapters and n != aname:
                    raise AdapterError(f"user {user_id!r}: unknown adapter {n!r} (register it with add_adapter)")
                if not math.isfinite(w):
                    raise AdapterError(f"user {user_id!r}: weight of {n!r} must be finite, got {w}")
            old = self.users.get(user_id)
            drop = [] if old is None else [a for a in old.owned if a != aname and a not in dict(entries)
                                           and self._users_of(a) == [user_id]]
            self._check_not_in_flight(drop + ([aname] if aname in self.adapters else []), "replace")
            if aname is not None:
                self._commit_adapters({aname: parsed})
            profile = UserProfile(user_id, entries, owned=[aname] if aname is not None else [])
            if old is not None:  # keep the other assets of a replaced user
                profile.owned += [a for a in old.owned if a not in profile.owned and a not in drop]
                profile.steering, profile.soft_prompt = old.steering, old.soft_prompt
                profile.decoding, profile.seed = old.decoding, old.seed
            self.users[user_id] = profile
            for a in drop:
                self._drop_adapter(a)
        return profile

    def _check_register(self, user_id: str, aname: str, replace: bool) -> None:
        with self._lock:
            if user_id in self.users and not replace:
                raise AdapterError(f"user {user_id!r} is already registered (pass replace=True)")
            if aname in self.adapters:
                others = [u for u in self._users_of(aname) if u != user_id]
                owner = user_id in self.users and aname in self.users[user_id].owned
                if others:
                    raise AdapterError(
                        f"adapter {aname!r} is already registered and used by users {others}: register_user never "
                        f"replaces it; pass adapter_name= for a personal adapter, or replace the shared one by name "
                        f"with add_adapter({aname!r}, ..., replace=True)"
                    )
                if not (replace and owner):
                    raise AdapterError(f"adapter {aname!r} is already registered (pass adapter_name=, or "
                                       "replace=True to replace this user's own adapter)")

    def _drop_adapter(self, name: str) -> None:
        if name in self._slot_of:
            self._free_slot(self._slot_of[name])
        self.adapters.pop(name, None)

    def remove_user(self, user_id: str) -> None:
        """Remove a user and the adapters it owns that no other user references."""
        with self._lock:
            if user_id not in self.users:
                raise UnknownUserError(f"unknown user {user_id!r}")
            p = self.users[user_id]
            drop = [a for a in p.owned if self._users_of(a) == [user_id]]
            self._check_not_in_flight(drop, "remove")
            keys = [e.key for e in p.steering]
            if self.inputs is not None and self.inputs.pinned(keys):
                raise AdapterInUseError(f"cannot remove user {user_id!r}: a request in flight uses its steering")
            del self.users[user_id]
            for a in drop:
                self._drop_adapter(a)
            if self.inputs is not None:
                self.inputs.drop(keys)

    # ------------------------------------------------------------------------------------- input layer
    def configure_inputs(self, num_layers: int, hidden: int, steer_slots: int) -> InputAssets:
        """Enable steering tables / soft prompts for a model of ``num_layers`` decoder layers of width ``hidden``."""
        with self._lock:
            self.inputs = InputAssets(num_layers, hidden, steer_slots, self.device)
            return self.inputs

    def _inputs(self) -> InputAssets:
        if self.inputs is None:
            raise RuntimeError("this store has no input layer (patch the model with patch_model to steer it)")
        return self.inputs

    def _profile_or_new(self, user_id: str) -> UserProfile:
        if not isinstance(user_id, str) or not user_id:
            raise TypeError(f"user ids are non-empty strings, got {user_id!r}")
        if user_id not in self.users:
            self.users[user_id] = UserProfile(user_id)
        return self.users[user_id]

    def add_steering(self, user_id: str, layer: int | None, vector, scale: float = 1.0, mode="add"
                     ) -> list[SteeringEntry]:
        """Add steering vector(s) to a user (created if new); repeatable, entries accumulate in order.

        ``vector``: a ``(hidden,)`` tensor, a ``{layer: tensor}`` dict, or a file (safetensors / ``.pt``) holding
        either; with ``layer=None`` every layer of a dict / file is added. ``mode``: ``"add"``, ``"ablate"``,
        ``"ablate_add"`` or ``"norm_preserve"`` (:mod:`pllm_kernels.reference.steer`). All-or-nothing: a bad vector
        leaves the profile unchanged."""
        inputs = self._inputs()
        found = load_vectors(vector, what=f"user {user_id!r}: steering vector")
        if layer is not None:
            if None in found:
                found = {layer: found[None]}
            elif layer in found:
                found = {layer: found[layer]}
            else:
                raise ValueError(f"user {user_id!r}: the vectors given are for layers {sorted(found)}, not {layer}")
        elif None in found:
            raise ValueError(f"user {user_id!r}: layer is required for a single vector")
        checked = [inputs.check_vector(user_id, lyr, v, scale, mode) for lyr, v in sorted(found.items())]
        with self._lock:
            p = self._profile_or_new(user_id)
            new = []
            for lyr, v, sc, md in checked:
                e = SteeringEntry((user_id, next(self._serial)), lyr, v, sc, md)
                inputs.entries[e.key] = e
                new.append(e)
            p.steering = p.steering + new
            return new

    def remove_steering(self, user_id: str, layer: int | None = None) -> int:
        """Remove the user's steering entries (at ``layer``, or all); returns how many were removed."""
        with self._lock:
            p = self.profile(user_id)
            gone = [e for e in p.steering if layer is None or e.layer == layer]
            keys = [e.key for e in gone]
            if self.inputs is not None and self.inputs.pinned(keys):
                raise AdapterInUseError(f"user {user_id!r}: a request in flight uses these steering vectors")
            p.steering = [e for e in p.steering if e not in gone]
            if self.inputs is not None:
                self.inputs.drop(keys)
            return len(gone)

    def add_soft_prompt(self, user_id: str, embeds) -> torch.Tensor:
        """Give a user (created if new) a soft prompt: ``(n, hidden)`` virtual token embeddings (a tensor, or a PEFT
        prompt-tuning adapter / file); replaces the previous one."""
        e = self._inputs().check_prompt(user_id, load_soft_prompt(embeds, what=f"user {user_id!r}: soft prompt"))
        with self._lock:
            self._profile_or_new(user_id).soft_prompt = e
        return e

    def set_decoding(self, user_id: str, policy: DecodingPolicy | None = None, **fields) -> DecodingPolicy | None:
        """Set a user's (created if new) decoding policy: a :class:`DecodingPolicy`, or its fields as keywords
        (``contrast=``, ``context=``, ``reward_weights=``, ``beta=``, ``reward_top_k=``, ``temperature=``,
        ``top_k=``, ``top_p=``, ``min_p=``, ``seed=``); ``None`` with no fields clears it. Validated first:
        a bad value raises ``ValueError`` naming the field and changes nothing."""
        if policy is not None and fields:
            raise ValueError("give a DecodingPolicy or keyword fields, not both")
        if policy is None and fields:
            policy = DecodingPolicy(**fields)
        if policy is not None and not isinstance(policy, DecodingPolicy):
            raise TypeError(f"policy must be a DecodingPolicy, got {type(policy).__name__}")
        with self._lock:
            self._profile_or_new(user_id).decoding = policy
        return policy

    def remove_soft_prompt(self, user_id: str) -> None:
        with self._lock:
            self.profile(user_id).soft_prompt = None

    def profile(self, user_id: str) -> UserProfile:
        with self._lock:
            try:
                return self.users[user_id]
            except KeyError:
                raise UnknownUserError(f"unknown user {user_id!r} (registered: {self._some_users()})") from None

    def _some_users(self) -> str:
        names = list(self.users)
        return ", ".join(map(repr, names[:8])) + (f", ... ({len(names)} users)" if len(names) > 8 else "") or "none"

    # --------------------------------------------------------------------------------------------- slots
    @property
    def _slot_of(self) -> dict[str, int]:
        """Resident adapters: name -> slot."""
        return self._pool.slot_of

    def _free_slot(self, slot: int) -> None:
        self._pool.free(slot)
        for buf in [*self.buffers.values(), *self.groups.values()]:
            buf.ranks_host[slot] = 0
            buf.slot_ranks[slot] = 0

    def _load(self, name: str, slot: int) -> None:
        """Copy adapter ``name`` into ``slot`` of every target; on failure the slot is left empty (rank 0)."""
        adapter = self.adapters[name]
        self._free_slot(slot)
        # Convert (and check) everything before writing, so a failure leaves no half-loaded slot.
        values = {}
        for tname in self.buffers:
            w = adapter.modules.get(tname)
            if w is not None:
                self._check_values(name, tname, w, self.dtype)
                values[tname] = (*self._slot_values(tname, w, self.dtype), w.rank)
        for tname, buf in self.buffers.items():
            buf.lora_a[slot].zero_()  # zero padding beyond the rank (the kernels never read it anyway)
            buf.lora_b[slot].zero_()
            if tname not in values:
                buf.slot_ranks[slot] = 0
                buf.slot_scales[slot] = 0.0
                buf.ranks_host[slot] = 0
                continue
            a, b, scale, r = values[tname]
            buf.lora_a[slot, 0, :r].copy_(a)
            buf.lora_b[slot, :, :r].copy_(b)
            buf.slot_ranks[slot] = r
            buf.slot_scales[slot] = scale
            buf.ranks_host[slot] = r
        for g in self.groups.values():
            r = max(self.buffers[m].ranks_host[slot] for m in g.members)
            g.slot_ranks[slot] = r
            g.ranks_host[slot] = r
        self._pool.take(name, slot)
        self.loads += 1

    # ----------------------------------------------------------------------------------------- placement
    def to(self, device=None, dtype: torch.dtype | None = None) -> AdapterStore:
        """Move the slot buffers to ``device`` and / or cast the adapter weights to ``dtype`` (a floating dtype).

        ``slot_ranks`` stay int32 and ``slot_scales`` float32 (only their device changes); a grouped target's
        ``lora_a`` / ``lora_b`` stay views of its group's moved tensors. A device move copies the buffers; a dtype
        change (or leaving ``meta``, whose tensors hold no values) allocates new buffers and loads the resident
        adapters again from their host copies into the same slots, so ``model.half()`` then ``model.float()``
        loses no precision. Routing built afterwards and later slot loads use the new placement.
        Not to be called while a forward is in flight. Returns ``self``.
        """
        device = self.device if device is None else _norm_device(device)
        dtype = self.dtype if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"the slot buffers need a floating dtype, got {dtype}")
        if device == self.device and dtype == self.dtype:
            return self
        with self._lock:
            return self._move(device, dtype)

    def _move(self, device: torch.device, dtype: torch.dtype) -> AdapterStore:
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
        if self.inputs is not None:
            self.inputs.to(device)
        self.device, self.dtype = device, dtype
        if fresh:  # the new buffers are zero: put the resident adapters back (not counted as cache misses)
            loads = self.loads
            for slot, name in enumerate(list(self._pool.owner)):
                if name is not None:
                    try:
                        self._load(name, slot)
                    except AdapterError:  # not representable in the new dtype: refused when a batch asks for it
                        self._free_slot(slot)
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

    def lease(self, names: Sequence[str], timeout: float | None = None, steering=None) -> SlotLease:
        """Make every adapter in ``names`` (and every steering entry of ``steering``: layer -> entry keys)
        resident and pin their slots until the lease is released; ``lease.slot_of["lora"][name]`` is an adapter's
        slot, ``lease.slot_of[f"steer{layer}"][key]`` a vector's.

        Evicts least-recently-used unpinned slots. When the free and unpinned slots are too few because other
        requests hold them, waits up to ``timeout`` seconds (default ``busy_timeout``) for releases, then raises
        :class:`SlotsBusyError`. More distinct assets than slots raises at once. All or nothing across tables."""
        timeout = self.busy_timeout if timeout is None else float(timeout)
        with self._lock:
            for n in dict.fromkeys(names):
                if n not in self.adapters:
                    raise AdapterError(f"unknown adapter {n!r}")
            requests = [(self._pool, list(names), self._load_checked)]
            if steering:
                requests += self.inputs.steer_requests(steering)
            return lease_pools(self._unpinned, requests, timeout, self._clock, self._busy_message)

    def _load_checked(self, name: str, slot: int) -> None:
        try:
            self._load(name, slot)
        except Exception:
            self._pool.last_used[slot] = 0
            raise

    def _busy_message(self, pool: SlotPool, missing: int, available: int) -> str:
        what = "adapters" if pool is self._pool else f"steering vectors at layer {pool.name[5:]}"
        if available < 0:
            return (f"this batch uses {missing} distinct {what} but the store has {pool.num_slots} slots for them; "
                    "patch with a larger num_slots / steer_slots or split the batch")
        return (f"this batch needs {missing} more slot(s) for {what} but only {available} of {pool.num_slots} are "
                f"free: the others are pinned by requests in flight (waited {self.busy_timeout:g} s); raise the "
                "slot count or busy_timeout, or send fewer distinct users at once")

    def acquire(self, names: Sequence[str]) -> dict[str, int]:
        """Make every adapter in ``names`` resident without pinning; returns name -> slot (single-threaded use)."""
        with self.lease(names, timeout=0) as lease:
            return dict(lease.slot_of["lora"])

    @property
    def in_flight(self) -> int:
        """Pins held by requests in flight (0 when idle)."""
        return sum(self._pool.pins) + (self.inputs.in_flight() if self.inputs is not None else 0)

    def check_consistent(self) -> None:
        """Assert the slot bookkeeping is consistent (tests, debugging): owners, ranks and pins agree."""
        with self._lock:
            pool = self._pool
            assert all(p >= 0 for p in pool.pins), pool.pins
            for name, slot in pool.slot_of.items():
                assert pool.owner[slot] == name, (name, slot, pool.owner[slot])
                assert name in self.adapters, name
            for slot, name in enumerate(pool.owner):
                if name is None:
                    assert all(b.ranks_host[slot] == 0 for b in self.buffers.values()), slot
                    continue
                assert self._slot_of.get(name) == slot, (slot, name)
                ad = self.adapters[name]
                for tname, buf in self.buffers.items():
                    w = ad.modules.get(tname)
                    r = 0 if w is None else w.rank
                    assert buf.ranks_host[slot] == r == int(buf.slot_ranks[slot]), (slot, name, tname)
            if self.inputs is not None:
                self.inputs.check_consistent()
