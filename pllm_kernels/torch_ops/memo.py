"""A small host-side cache of values derived from (small) device tensors, valid while the tensor is unchanged.

The routing metadata is built once per forward and read by every patched layer: what is derived from it on the
host (validation, the torch backend's run plans) is computed once per forward instead of once per layer.

A hit needs the same tensor object (weak reference) *and* equal contents (a snapshot is compared): version
counters cannot be used, because tensors made under ``torch.inference_mode()`` have none, and a buffer refilled in
place (``LoRAMetaBuffers``) must not return a stale plan. The comparison costs one pass over a routing-sized
tensor. Thread-safe: entries are replaced whole, never mutated.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["memo"]

_MEMO: dict = {}
_LOCK = threading.Lock()
_MAX_ENTRIES = 512


def _same(snap: torch.Tensor, t: torch.Tensor) -> bool:
    return snap.shape == t.shape and snap.dtype == t.dtype and snap.device == t.device and torch.equal(snap, t)


def memo(t: torch.Tensor, tag: Any, fn: Callable[..., Any], *deps: torch.Tensor) -> Any:
    """``fn(t, *deps)`` cached on ``t`` (and the tensors ``deps`` it also reads) while their contents are unchanged.

    ``fn`` is called with snapshots (copies) of ``t`` and ``deps`` and must read nothing else that can change."""
    key = (id(t), tag)
    hit = _MEMO.get(key)
    if hit is not None:
        ref, snaps, dep_refs, value = hit
        if ref() is t and len(dep_refs) == len(deps) and all(r() is d for r, d in zip(dep_refs, deps)) \
                and all(_same(s, x) for s, x in zip(snaps, (t, *deps))):
            return value
    with torch.inference_mode(False), torch.no_grad():
        snaps = tuple(x.detach().clone() for x in (t, *deps))
    value = fn(*snaps)
    entry = (weakref.ref(t), snaps, tuple(weakref.ref(d) for d in deps), value)
    with _LOCK:
        if len(_MEMO) > _MAX_ENTRIES:
            _MEMO.clear()
        _MEMO[key] = entry
    return value
