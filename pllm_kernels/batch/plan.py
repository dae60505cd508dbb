"""The per-row plan: what each row of one request gets from its user's profile, resolved once per request.

``resolve_plan(store, users)`` reads every row's :class:`~pllm_kernels.store.UserProfile` under the store's lock
and pins the adapter slots the request needs (:meth:`~pllm_kernels.store.AdapterStore.lease`) until
:meth:`BatchPlan.release`. Each forward of the request (prefill and every decode step) builds its
:class:`~pllm_kernels.batch.PersonalBatch` from this plan. A plan belongs to one call: nothing in it is shared with
concurrent calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pllm_kernels.store.adapter_store import AdapterStore, SlotLease, UnknownUserError, UserProfile

__all__ = ["BatchPlan", "RowPlan", "SteerPlan", "resolve_plan"]


@dataclass(frozen=True)
class RowPlan:
    """One row's personalization. ``user`` ``None`` = the base model (every part empty).

    * ``adapters``: ``((adapter name, weight), ...)``, the K weighted LoRA adapters of the row.
    * ``lora_slots``: the slot each adapter occupies for this request (pinned).
    * ``profile``: the user's profile as resolved (its steering entries, soft prompt and decoding settings).
    """

    user: str | None
    adapters: tuple[tuple[str, float], ...] = ()
    lora_slots: tuple[int, ...] = ()
    profile: UserProfile | None = None


@dataclass
class SteerPlan:
    """Steering of one request: for each steered layer (``layers``, host ints), per row up to Ks entries.

    * ``slots`` ``(B, len(layers), Ks)`` int32 slot in that layer's table (``-1`` = none); ``scales`` same shape.
    * ``tables``: layer -> ``(vectors (steer_slots, hidden) float32, modes (steer_slots,) int32)`` on device.
    """

    layers: tuple[int, ...]
    slots: torch.Tensor
    scales: torch.Tensor
    tables: dict

    def to(self, device) -> SteerPlan:
        return SteerPlan(self.layers, self.slots.to(device), self.scales.to(device), self.tables)


@dataclass
class BatchPlan:
    """The plans of every row of one request, plus the tensors the per-forward batch is built from.

    * ``rows``: one :class:`RowPlan` per row.
    * ``lora_slots`` ``(B, K)`` int32 / ``lora_weights`` ``(B, K)`` float32 on the store's device: ``-1`` / 0
      where a row has fewer than K adapters (or none). ``active_slots``: the slots in use (host ints).
    """

    rows: tuple[RowPlan, ...]
    lora_slots: torch.Tensor
    lora_weights: torch.Tensor
    active_slots: tuple[int, ...] = ()
    lease: SlotLease | None = field(default=None, repr=False)
    steering: SteerPlan | None = None
    soft_prompts: tuple | None = None  # per row: (n, hidden) float32 host tensor or None; None = no row has one

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def release(self) -> None:
        """Unpin the request's slots (idempotent)."""
        if self.lease is not None:
            self.lease.release()

    def to(self, device) -> BatchPlan:
        """The same plan with its tensors on ``device`` (the lease is shared, not duplicated)."""
        if self.lora_slots.device == torch.device(device):
            return self
        return BatchPlan(self.rows, self.lora_slots.to(device), self.lora_weights.to(device), self.active_slots,
                         self.lease, None if self.steering is None else self.steering.to(device), self.soft_prompts)


def resolve_plan(store: AdapterStore, users: Sequence[str | None], *, timeout: float | None = None) -> BatchPlan:
    """Resolve ``users`` (one entry per row, ``None`` = base model) into a pinned :class:`BatchPlan`.

    Raises :class:`UnknownUserError` naming every unknown user, ``TypeError`` for entries that are not strings,
    :class:`~pllm_kernels.store.SlotsBusyError` when requests in flight hold the slots needed.
    """
    if isinstance(users, (str, bytes)) or not isinstance(users, Sequence):
        raise TypeError(f"users must be a list with one user id (or None) per row, got {type(users).__name__}"
                        + (f" {users!r}" if isinstance(users, str) else ""))
    bad = [u for u in users if u is not None and not isinstance(u, str)]
    if bad:
        raise TypeError(f"users: entries are user ids (str) or None, got {bad[0]!r}")
    with store._lock:  # profiles and slots from one consistent state
        unknown = [u for u in users if u is not None and u not in store.users]
        if unknown:
            raise UnknownUserError(
                f"unknown user(s) {', '.join(map(repr, dict.fromkeys(unknown)))} (registered: {store._some_users()})"
            )
        profiles = [None if u is None else store.users[u] for u in users]
        names = [a for p in profiles if p is not None for a, _ in p.adapters]
        steering: dict[int, list] = {}
        for p in profiles:
            for e in (p.steering if p is not None else ()):
                steering.setdefault(e.layer, []).append(e.key)
        lease = store.lease(names, timeout=timeout, steering=steering) if (names or steering) else None
    slot_of = lease.slot_of["lora"] if lease is not None else {}
    K = max([p.k for p in profiles if p is not None] + [1])
    rows, slots, weights = [], [], []
    for u, p in zip(users, profiles):
        ads = () if p is None else tuple(p.adapters)
        row_slots = tuple(slot_of[a] for a, _ in ads)
        rows.append(RowPlan(u, ads, row_slots, p))
        slots.append(list(row_slots) + [-1] * (K - len(ads)))
        weights.append([w for _, w in ads] + [0.0] * (K - len(ads)))
    B = len(rows)
    steer = None
    if steering:
        layers = sorted(steering)
        ks = max(sum(1 for e in p.steering if e.layer == lyr) for p in profiles if p is not None for lyr in layers)
        s_slots = torch.full((B, len(layers), ks), -1, dtype=torch.int32)
        s_scales = torch.zeros(B, len(layers), ks, dtype=torch.float32)
        for b, p in enumerate(profiles):
            for li, lyr in enumerate(layers):
                entries = [e for e in (p.steering if p is not None else ()) if e.layer == lyr]
                for k, e in enumerate(entries):
                    s_slots[b, li, k] = lease.slot_of[f"steer{lyr}"][e.key]
                    s_scales[b, li, k] = e.scale
        tables = {lyr: store.inputs.tables[lyr] for lyr in layers}
        steer = SteerPlan(tuple(layers), s_slots.to(store.device), s_scales.to(store.device), tables)
    prompts = None
    if any(p is not None and p.soft_prompt is not None for p in profiles):
        prompts = tuple(None if p is None else p.soft_prompt for p in profiles)
    return BatchPlan(
        rows=tuple(rows),
        lora_slots=torch.tensor(slots, dtype=torch.int32).reshape(B, K).to(store.device),
        lora_weights=torch.tensor(weights, dtype=torch.float32).reshape(B, K).to(store.device),
        active_slots=tuple(sorted(set(slot_of.values()))),
        lease=lease,
        steering=steer,
        soft_prompts=prompts,
    )
