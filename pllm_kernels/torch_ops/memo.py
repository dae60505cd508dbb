"""A small host-side cache of values derived from (small) device tensors, valid while the tensor is unchanged.

The routing metadata is built once per forward and read by every patched layer: what is derived from it on the
host (validation, the torch backend's run plans) is computed once per forward instead of once per layer.

A hit needs the same tensor object (weak reference) *and* unchanged contents: for tensors with a version counter
the same storage and version (any in-place write bumps it: ``LoRAMetaBuffers`` refilled in place never returns a
stale plan), for tensors made under ``torch.inference_mode()`` (which have none) an equal snapshot, which costs
one pass over a routing-sized tensor. Thread-safe: entries are replaced whole, never mutated.
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


def _stamp(t: torch.Tensor):
    """``(storage address, version)`` of a tensor with a version counter, else ``None``."""
    if t.is_inference():
        return None
    return (t.data_ptr(), t._version)


def _unchanged(snap: torch.Tensor, stamp, t: torch.Tensor) -> bool:
    if stamp is not None:  # same object, storage and version: only shape / dtype could differ (metadata ops)
        return not t.is_inference() and stamp == (t.data_ptr(), t._version) and snap.shape == t.shape \
            and snap.dtype == t.dtype
    return _same(snap, t)


def memo(t: torch.Tensor, tag: Any, fn: Callable[..., Any], *deps: torch.Tensor) -> Any:
    """``fn(t, *deps)`` cached on ``t`` (and the tensors ``deps`` it also reads) while their contents are unchanged.

    ``fn`` is called with snapshots (copies) of ``t`` and ``deps`` and must read nothing else that can change."""
    key = (id(t), tag)
    hit = _MEMO.get(key)
    if hit is not None:
        ref, snaps, stamps, dep_refs, value = hit
        if ref() is t and len(dep_refs) == len(deps) and all(r() is d for r, d in zip(dep_refs, deps)) \
                and all(_unchanged(s, st, x) for s, st, x in zip(snaps, stamps, (t, *deps))):
            return value
    tensors = (t, *deps)
    stamps = tuple(_stamp(x) for x in tensors)
    with torch.inference_mode(False), torch.no_grad():
        snaps = tuple(x.detach().clone() for x in tensors)
    value = fn(*snaps)
    entry = (weakref.ref(t), snaps, stamps, tuple(weakref.ref(d) for d in deps), value)
    with _LOCK:
        if len(_MEMO) > _MAX_ENTRIES:
            _MEMO.clear()
        _MEMO[key] = entry
    return value
