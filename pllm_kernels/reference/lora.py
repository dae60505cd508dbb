"""Reference (specification) of the batched multi-LoRA ops. Plain torch, loops allowed, float64-checkable.

Follows Punica's SGMV/BGMV semantics (Chen et al., arXiv 2310.18547) as extended by vLLM/S-LoRA:
every token may use a different adapter *slot* of a stacked weight buffer, and ``-1`` means "no adapter".

Conventions shared by every backend (this file is the spec):

* ``x``            ``(num_tokens, h_in)``, any float dtype.
* ``lora_a``       ``(num_slots, num_slices, max_rank, h_in)``: one A matrix per slice (q/k/v, gate/up).
* ``lora_b``       ``(num_slots, sum(slice_sizes), max_rank)``: the B matrices of all slices stacked along
  the output axis; slice ``s`` owns output columns ``off_s : off_s + slice_sizes[s]``.
* ``slot_ranks``   ``(num_slots,)`` int: the slot's true rank ``0 <= r <= max_rank`` (rank 0 = no-op).
  Only the first ``r`` rows of A and columns of B are read; padding beyond ``r`` is ignored even if non-zero.
* ``slot_scales``  ``(num_slots,)`` float32: per-slot scale (``alpha / r`` or ``alpha / sqrt(r)``).
* ``token_slots``  ``(num_tokens, K)`` int: K >= 1 weighted slots per token; ``-1`` = no adapter.
* ``token_weights`` ``(num_tokens, K)`` float32: the weight of each of the K slots (``None`` = all ones).
* ``v`` (shrink output) ``(num_slices, K * num_tokens, max_rank)`` float32 (float64 when x is float64).
  Row ``p = k * num_tokens + t`` holds token ``t``'s k-th slot ("pair" index, k-major).

Math::

    v[s, k*T + t, i]   = x[t] . lora_a[slot, s, i]                       for i < rank[slot], else 0
    y[t, off_s + j]   += sum_k  w[t, k] * scale[slot] * sum_{i<rank} v[s, k*T+t, i] * lora_b[slot, off_s + j, i]

with ``slot = token_slots[t, k]``; pairs with ``slot == -1`` contribute nothing and rows whose slots are all
``-1`` are left bit-for-bit untouched. The delta is accumulated in float32 (float64 for float64 inputs) and
added to ``y`` once, in ``y``'s dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def slice_offsets(slice_sizes: Sequence[int]) -> list[int]:
    """``[0, n0, n0+n1, ..., sum]``: slice ``s`` owns output columns ``offsets[s] : offsets[s+1]`` (the one place
    slice offsets are computed; every backend uses it)."""
    offsets = [0]
    for n in slice_sizes:
        offsets.append(offsets[-1] + int(n))
    return offsets


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_shrink_ref(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    token_slots: torch.Tensor,
    slot_ranks: torch.Tensor,
) -> torch.Tensor:
    """Shrink: ``v[s, k*T+t, :r] = x[t] @ lora_a[slot, s, :r].T``.

    Args: x ``(T, h_in)``; lora_a ``(L, S, R, h_in)``; token_slots ``(T, K)`` (or ``(T,)`` for K = 1);
    slot_ranks ``(L,)``. Returns ``(S, K*T, R)`` in float32 (float64 for float64 x).
    """
    if token_slots.dim() == 1:
        token_slots = token_slots[:, None]
    T, K = token_slots.shape
    _, S, R, _ = lora_a.shape
    acc = _acc_dtype(x.dtype)
    v = torch.zeros(S, K * T, R, dtype=acc, device=x.device)
    slots = token_slots.tolist()
    ranks = slot_ranks.tolist()
    for t in range(T):
        for k in range(K):
            slot = slots[t][k]
            if slot < 0:
                continue
            r = ranks[slot]
            if r == 0:
                continue
            for s in range(S):
                v[s, k * T + t, :r] = lora_a[slot, s, :r].to(acc) @ x[t].to(acc)
    return v


def lora_expand_ref(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: torch.Tensor,
    token_weights: torch.Tensor | None,
    slot_ranks: torch.Tensor,
    slot_scales: torch.Tensor,
    slice_sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Expand: ``y[t, off_s:off_s+n_s] += sum_k w[t,k] * scale[slot] * v[s, k*T+t, :r] @ B_s[slot, :, :r].T``.

    (``B_s = lora_b[:, off_s:off_s+n_s]``.)

    Args: y ``(T, sum(slice_sizes))`` (updated in place and returned); v ``(S, K*T, R)``;
    lora_b ``(L, sum(slice_sizes), R)``; token_slots/token_weights ``(T, K)``; slot_ranks, slot_scales ``(L,)``;
    slice_sizes: output width of each slice (default: one slice of ``lora_b.shape[1]``).
    """
    if token_slots.dim() == 1:
        token_slots = token_slots[:, None]
    T, K = token_slots.shape
    S = v.shape[0]
    if slice_sizes is None:
        slice_sizes = [lora_b.shape[1]]
    offsets = slice_offsets(slice_sizes)
    acc = _acc_dtype(y.dtype) if v.dtype != torch.float64 else torch.float64
    delta = torch.zeros(T, y.shape[1], dtype=acc, device=y.device)
    touched = [False] * T
    slots = token_slots.tolist()
    ranks = slot_ranks.tolist()
    weights = [[1.0] * K for _ in range(T)] if token_weights is None else token_weights.tolist()
    scales = slot_scales.tolist()
    for t in range(T):
        for k in range(K):
            slot = slots[t][k]
            if slot < 0:
                continue
            touched[t] = True
            r = ranks[slot]
            if r == 0:
                continue
            coef = weights[t][k] * scales[slot]
            for s in range(S):
                b = lora_b[slot, offsets[s] : offsets[s + 1], :r].to(acc)
                delta[t, offsets[s] : offsets[s + 1]] += coef * (b @ v[s, k * T + t, :r].to(acc))
    for t in range(T):
        if touched[t]:
            y[t] = (y[t].to(acc) + delta[t]).to(y.dtype)
    return y


def lora_apply_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: torch.Tensor,
    token_weights: torch.Tensor | None,
    slot_ranks: torch.Tensor,
    slot_scales: torch.Tensor,
    slice_sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Fused shrink + expand: ``y += sum_k w * scale * (x @ A.T) @ B.T`` per token (see module docstring)."""
    v = lora_shrink_ref(x, lora_a, token_slots, slot_ranks)
    return lora_expand_ref(y, v, lora_b, token_slots, token_weights, slot_ranks, slot_scales, slice_sizes)
