"""Vectorised torch implementation of per-token steering (spec: :mod:`pllm_kernels.reference.steer`).

One pass per K column over the whole ``(T, H)`` block; rows without an entry are selected back with
``torch.where`` (never multiplied by 0), so a NaN / inf in a slot no token uses cannot reach any row, and untouched
rows keep their exact bits.
"""

from __future__ import annotations

import torch

from pllm_kernels.reference.steer import ABLATE, ABLATE_ADD, NORM_PRESERVE
from pllm_kernels.torch_ops.memo import memo

__all__ = ["steer_add_torch", "steer_rmsnorm_torch"]


def _additive(h, vectors, token_slots, token_scales, acc):
    """All slots are ADD: ``x = h + sum_k s_k v_k`` over the valid entries (a gather, a multiply, an add)."""
    T, K = token_slots.shape
    L = vectors.shape[0]
    sl = token_slots.long()
    ok = (sl >= 0) & (sl < L)
    v = vectors.index_select(0, sl.clamp(0, L - 1).reshape(-1)).view(T, K, -1).to(acc)
    s = torch.where(ok, token_scales.to(acc), 0.0)[:, :, None]
    delta = torch.where(ok[:, :, None], s * v, 0.0)
    return h.to(acc) + (delta[:, 0] if K == 1 else delta.sum(1)), ok.any(1)


def _steer(h, vectors, token_slots, token_scales, slot_modes):
    """Returns ``(steered (T, H) in the accumulation dtype, touched (T,) bool)``; does not write ``h``."""
    T, K = token_slots.shape
    L = vectors.shape[0]
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    if memo(slot_modes, "steer_all_add", lambda m: bool((m == 0).all())):
        return _additive(h, vectors, token_slots, token_scales, acc)
    x = h.to(acc)
    touched = torch.zeros(T, dtype=torch.bool, device=h.device)
    for k in range(K):
        sl = token_slots[:, k].long()
        ok = (sl >= 0) & (sl < L)
        sc = sl.clamp(0, L - 1)
        v = torch.where(ok[:, None], vectors.index_select(0, sc).to(acc), 0.0)  # (T, H)
        mode = torch.where(ok, slot_modes.index_select(0, sc).long(), 0)
        s = torch.where(ok, token_scales[:, k].to(acc), 0.0)[:, None]
        nv = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        u = torch.where(nv > 0, v / torch.where(nv > 0, nv, 1.0), 0.0)
        abl = ((mode == ABLATE) | (mode == ABLATE_ADD))[:, None]
        y = x - torch.where(abl, (x * u).sum(-1, keepdim=True), 0.0) * u
        y = y + torch.where((mode == ABLATE)[:, None], 0.0, s) * v
        keep_norm = (mode == NORM_PRESERVE)[:, None]
        ny = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
        nx = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        y = torch.where(keep_norm & (ny > 0), y * (nx / torch.where(ny > 0, ny, 1.0)), y)
        x = torch.where(ok[:, None], y, x)
        touched |= ok
    return x, touched


def steer_add_torch(h, vectors, token_slots, token_scales, slot_modes) -> None:
    """Steer ``h (T, H)`` in place."""
    x, touched = _steer(h, vectors, token_slots, token_scales, slot_modes)
    h.copy_(torch.where(touched[:, None], x.to(h.dtype), h))


def steer_rmsnorm_torch(out, h, weight, eps, vectors, token_slots, token_scales, slot_modes, weight_offset) -> None:
    """Steer ``h`` in place and write ``RMSNorm(h)`` into ``out (T, H)``."""
    x, touched = _steer(h, vectors, token_slots, token_scales, slot_modes)
    h.copy_(torch.where(touched[:, None], x.to(h.dtype), h))
    xs = h.to(x.dtype)  # the steered state as stored (rounded to h's dtype), as the unfused norm would read it
    n = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps)
    if weight_offset == 0.0:
        out.copy_(weight * n.to(h.dtype))
    else:
        out.copy_(n * (weight_offset + weight.to(x.dtype)))
