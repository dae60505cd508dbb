"""Slot pools: which asset occupies which row of a device table, with pins for requests in flight and LRU reuse.

One :class:`SlotPool` per table family (the LoRA slot buffers of every target share one pool; each steered layer's
vector table has its own). :func:`lease_pools` acquires slots in several pools **atomically** under the store's
lock: either every asset of a request becomes resident and pinned, or (after waiting for requests in flight to
release theirs) nothing is taken. Waiting on all pools at once, never pool by pool, rules out the deadlock of two
requests each holding what the other waits for.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Hashable, Sequence

__all__ = ["SlotLease", "SlotPool", "SlotsBusyError", "lease_pools"]


class SlotsBusyError(RuntimeError):
    """A request needs more free slots than requests in flight leave (after waiting ``busy_timeout``)."""


class SlotPool:
    """``num_slots`` rows of a table: owner key per slot, pins (requests in flight), last use (LRU)."""

    def __init__(self, num_slots: int, name: str):
        self.name = name
        self.num_slots = int(num_slots)
        self.owner: list[Hashable | None] = [None] * self.num_slots
        self.slot_of: dict[Hashable, int] = {}
        self.pins = [0] * self.num_slots
        self.last_used = [0] * self.num_slots

    def free(self, slot: int) -> None:
        key = self.owner[slot]
        if key is not None:
            del self.slot_of[key]
        self.owner[slot] = None

    def take(self, key: Hashable, slot: int) -> None:
        self.free(slot)
        self.owner[slot] = key
        self.slot_of[key] = slot

    def pinned(self, key: Hashable) -> bool:
        return key in self.slot_of and self.pins[self.slot_of[key]] > 0

    def _evictable(self, needed: set) -> list[int]:
        return [s for s in range(self.num_slots) if self.pins[s] == 0 and self.owner[s] not in needed]


class SlotLease:
    """Slots pinned for one request: ``slot_of[pool name][key] -> slot``. ``release()`` unpins them (idempotent);
    also a context manager."""

    def __init__(self, release: Callable[[], None], slot_of: dict[str, dict]):
        self._release = release
        self.slot_of = slot_of
        self._released = False

    @property
    def slots(self) -> list[int]:
        """The slots of the first pool (the LoRA adapters' for the store's leases)."""
        first = next(iter(self.slot_of.values()), {})
        return sorted(set(first.values()))

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release()

    def __enter__(self) -> SlotLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lease_pools(cond: threading.Condition, requests: Sequence[tuple[SlotPool, Sequence[Hashable], Callable]],
                timeout: float, clock: itertools.count, what: Callable[[SlotPool, int, int], str]) -> SlotLease:
    """Make every key of every ``(pool, keys, load(key, slot))`` request resident and pin it.

    Waits on ``cond`` (whose lock the caller may hold) up to ``timeout`` seconds while requests in flight pin the
    slots needed, then raises :class:`SlotsBusyError` with ``what(pool, missing, available)``. A pool asked for
    more distinct keys than it has slots raises ``RuntimeError`` at once. ``load`` failures propagate; slots loaded
    before the failure stay resident (unpinned)."""
    reqs = [(pool, list(dict.fromkeys(keys)), load) for pool, keys, load in requests]
    for pool, keys, _ in reqs:
        if len(keys) > pool.num_slots:
            raise RuntimeError(what(pool, len(keys), -1))
    deadline = time.monotonic() + timeout
    with cond:
        while True:
            short = None
            for pool, keys, _ in reqs:
                missing = [k for k in keys if k not in pool.slot_of]
                evictable = pool._evictable(set(keys))
                if len(missing) > len(evictable):
                    short = (pool, len(missing), len(evictable))
                    break
            if short is None:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise SlotsBusyError(what(*short))
            cond.wait(left)
        now = next(clock)
        for pool, keys, load in reqs:
            for k in keys:
                if k in pool.slot_of:
                    pool.last_used[pool.slot_of[k]] = now
            evictable = pool._evictable(set(keys))
            for k in keys:
                if k in pool.slot_of:
                    continue
                free = [s for s in evictable if pool.owner[s] is None]
                slot = free[0] if free else min(evictable, key=lambda s: pool.last_used[s])
                evictable.remove(slot)
                load(k, slot)
                pool.last_used[slot] = now
        slot_of = {pool.name: {k: pool.slot_of[k] for k in keys} for pool, keys, _ in reqs}
        pinned = [(pool, sorted(set(slot_of[pool.name].values()))) for pool, _, _ in reqs]
        for pool, slots in pinned:
            for s in slots:
                pool.pins[s] += 1

    def release():
        with cond:
            for pool, slots in pinned:
                for s in slots:
                    pool.pins[s] -= 1
            cond.notify_all()

    return SlotLease(release, slot_of)
