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

__all__ = ["BatchPlan", "RowPlan", "resolve_plan"]


@dataclass(frozen=True)
class RowPlan:
    """One row's personalization. ``user`` ``None`` = the base model (every part empty).

    * ``adapters``: ``((adapter name, weight), ...)``, the K weighted LoRA adapters of the row.
    * ``lora_slots``: the slot each adapter occupies for this request (pinned).
    * ``profile``: the user's profile as resolved (steering, soft prompt, decoding parts are read from it by the
      layers that use them).
    """

    user: str | None
    adapters: tuple[tuple[str, float], ...] = ()
    lora_slots: tuple[int, ...] = ()
    profile: UserProfile | None = None


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
                         self.lease)


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
        lease = store.lease(names, timeout=timeout) if names else None
    slot_of = lease.slot_of if lease is not None else {}
    K = max([p.k for p in profiles if p is not None] + [1])
    rows, slots, weights = [], [], []
    for u, p in zip(users, profiles):
        ads = () if p is None else tuple(p.adapters)
        row_slots = tuple(slot_of[a] for a, _ in ads)
        rows.append(RowPlan(u, ads, row_slots, p))
        slots.append(list(row_slots) + [-1] * (K - len(ads)))
        weights.append([w for _, w in ads] + [0.0] * (K - len(ads)))
    B = len(rows)
    return BatchPlan(
        rows=tuple(rows),
        lora_slots=torch.tensor(slots, dtype=torch.int32).reshape(B, K).to(store.device),
        lora_weights=torch.tensor(weights, dtype=torch.float32).reshape(B, K).to(store.device),
        active_slots=tuple(lease.slots) if lease is not None else (),
        lease=lease,
    )
