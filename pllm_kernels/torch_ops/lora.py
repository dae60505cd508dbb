"""Vectorised torch implementations of the multi-LoRA ops (spec: :mod:`pllm_kernels.reference.lora`).

Arguments are the routing tensors of :class:`pllm_kernels.ops.meta.LoRAMeta`, already validated by the op layer.
Two strategies for ``lora_apply`` (``strategy=``):

* ``"runs"``: one pair of matmuls per run of equal (k, slot) in sorted pair order (Punica SGMV on the host):
  each adapter's weights are read once per forward, nothing is padded to the largest rank. Best for prefill and
  shared adapters.
* ``"gather"``: gather every pair's weights and use batched matmuls (Punica BGMV): one gather instead of a
  Python loop per adapter. Best for distinct-adapter decode.
* ``"auto"``: gather for many short runs (decode), runs otherwise.

Accumulation uses ``index_put_(accumulate=True)``, not ``index_add_``: on multi-threaded CPU torch the latter takes
~40 ms per small call when the cores are busy (OpenMP contention), ~10000x the 4 us of the former.

Isolation (every strategy): a pair with slot ``-1`` (or out of range), the padding beyond a slot's rank and a
rank-0 slot are never read into a row's result, so NaN / inf there cannot reach any row.
"""

from __future__ import annotations

import torch

from pllm_kernels.reference.lora import slice_offsets
from pllm_kernels.torch_ops.memo import memo

__all__ = ["STRATEGIES", "lora_apply_torch", "lora_expand_torch", "lora_shrink_torch"]

STRATEGIES = ("auto", "gather", "runs")
GATHER_MIN_RUNS = 2  # one (k, slot) run: its two matmuls beat gathering a weight copy per token
GATHER_MAX_PAIRS_PER_RUN = 4  # long runs (prefill): one matmul pair per run reads each weight once
GATHER_MAX_ELEMS = 1 << 22  # cap on the gathered weight elements (16 MiB in fp32); above it, loop over runs


def _acc(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _runs(token_slots: torch.Tensor, sorted_pairs: torch.Tensor, num_slots: int) -> list:
    """Runs of equal (k, slot) in sorted pair order, as ``[(k, slot, pair_rows, start)]`` (``pair_rows`` =
    ``sorted_pairs[start : start + len]``). Host-side (syncs on CUDA); memoized per routing."""
    return memo(sorted_pairs, ("runs", num_slots), lambda sp, ts: list(_compute_runs(ts, sp, num_slots)), token_slots)


def _compute_runs(token_slots: torch.Tensor, sorted_pairs: torch.Tensor, num_slots: int):
    T = token_slots.shape[0]
    order = sorted_pairs.long()
    slots = token_slots.t().reshape(-1).long()[order]
    valid = (slots >= 0) & (slots < num_slots)
    key = torch.where(valid, (order // max(T, 1)) * num_slots + slots, torch.full_like(slots, -1))
    uniq, counts = torch.unique_consecutive(key, return_counts=True)
    start = 0
    for u, c in zip(uniq.tolist(), counts.tolist()):
        if u >= 0:
            k, slot = divmod(u, num_slots)
            yield k, slot, order[start : start + c], start
        start += c


def _ranks(slot_ranks: torch.Tensor, max_rank: int) -> list[int]:
    return memo(slot_ranks, ("ranks", max_rank), lambda r: r.clamp(0, max_rank).tolist())


def lora_shrink_torch(out, x, lora_a, slot_ranks, token_slots, sorted_pairs) -> None:
    """``out[s, k*T+t, :r] = x[t] @ lora_a[slot, s, :r].T``, zeros elsewhere. out ``(S, K*T, R)`` fp32/fp64."""
    T = token_slots.shape[0]
    R = lora_a.shape[2]
    out.zero_()
    ranks = _ranks(slot_ranks, R)
    acc = out.dtype
    for _, slot, rows, _ in _runs(token_slots, sorted_pairs, lora_a.shape[0]):
        r = ranks[slot]
        if r == 0:
            continue
        xs = x[rows % T].to(acc)  # (n, h_in)
        out[:, rows, :r] = torch.einsum("nh,srh->snr", xs, lora_a[slot, :, :r].to(acc))


def lora_expand_torch(y, v, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs,
                      slice_sizes) -> None:
    """``y[t, slice s] += sum_k w[t,k] * scale[slot] * v[s, k*T+t, :r] @ lora_b[slot, slice s, :r].T`` in place."""
    T = token_slots.shape[0]
    R = lora_b.shape[2]
    acc = _acc(y.dtype, v.dtype)
    delta = torch.zeros(y.shape, dtype=acc, device=y.device)
    touched = torch.zeros(T, dtype=torch.bool, device=y.device)
    ranks = _ranks(slot_ranks, R)
    offsets = slice_offsets(slice_sizes)
    weights = token_weights.to(acc)
    scales = slot_scales.to(acc)
    for k, slot, rows, _ in _runs(token_slots, sorted_pairs, lora_b.shape[0]):
        tokens = rows % T
        touched[tokens] = True
        r = ranks[slot]
        if r == 0:
            continue
        coef = (weights[tokens, k] * scales[slot])[:, None]
        parts = [
            v[s, rows, :r].to(acc) @ lora_b[slot, offsets[s] : offsets[s + 1], :r].to(acc).t()
            for s in range(len(slice_sizes))
        ]
        delta.index_put_((tokens,), coef * torch.cat(parts, dim=1), accumulate=True)
    y[touched] = (y[touched].to(acc) + delta[touched]).to(y.dtype)


def choose_strategy(strategy: str, num_runs: int, num_pairs: int, gathered_elems: int) -> str:
    """Resolve ``strategy`` (see the module docstring) from the run count and sizes (host ints)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy != "auto":
        return strategy
    gather = (num_runs >= GATHER_MIN_RUNS and num_pairs <= GATHER_MAX_PAIRS_PER_RUN * num_runs
              and gathered_elems <= GATHER_MAX_ELEMS)
    return "gather" if gather else "runs"


def lora_apply_torch(y, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs,
                     slice_sizes, *, strategy: str = "auto") -> None:
    """Fused shrink + expand in torch: ``y += sum_k w * scale * (x @ A[slot].T) @ B[slot].T`` per token."""
    T, K = token_slots.shape
    L, S, R, H = lora_a.shape
    N = lora_b.shape[1]
    acc = _acc(x.dtype)
    offsets = slice_offsets(slice_sizes)
    runs = _runs(token_slots, sorted_pairs, L)
    if not runs:
        return
    P = K * T
    if choose_strategy(strategy, len(runs), P, P * (S * R * H + N * R)) == "gather":
        _apply_gathered(y, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, offsets, acc)
        return
    # Per-run loop: the run plan (tokens per run, positions in sorted order) is memoized per forward; per call,
    # one vectorized product gives every pair's weight * scale, each run reads a view of it (no per-run indexing).
    order, slot_sorted, plan = memo(sorted_pairs, ("apply_runs", L), lambda sp, ts: _run_plan(ts, sp, L), token_slots)
    coef = (token_weights.t().reshape(-1).index_select(0, order).to(acc)
            * slot_scales.index_select(0, slot_sorted).to(acc))[:, None]
    ranks = _ranks(slot_ranks, R)
    for _k, slot, tokens, start, n in plan:
        r = ranks[slot]
        if r == 0:
            continue
        xs = x.index_select(0, tokens)
        a = lora_a[slot, :, :r].reshape(S * r, H)
        if xs.dtype != acc:
            xs, a = xs.to(acc), a.to(acc)
        v = torch.mm(xs, a.t()).mul_(coef[start : start + n])  # (n, S*r)
        b = lora_b[slot, :, :r]
        if b.dtype != acc:
            b = b.to(acc)
        if S == 1:
            d = torch.mm(v, b.t())
        else:
            d = torch.cat([torch.mm(v[:, s * r : (s + 1) * r], b[offsets[s] : offsets[s + 1]].t()) for s in range(S)],
                          dim=1)
        y.index_put_((tokens,), d if d.dtype == y.dtype else d.to(y.dtype), accumulate=True)


def _apply_gathered(y, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, offsets, acc):
    """Gathered (BGMV-like) path over the valid pairs only: pairs without an adapter are never gathered, the rank is
    cut to the largest rank the batch uses, and rank padding is replaced by zeros with ``torch.where`` (not
    multiplied by 0, which keeps NaN) only when the used ranks differ; so nothing a row is not routed to reaches it."""
    T, K = token_slots.shape
    L, S, R, H = lora_a.shape
    N = lora_b.shape[1]
    # index_select, not advanced indexing: the latter is ~100x slower on multi-threaded CPU torch.
    sc, pair, tok, used, idx, one_per_token = memo(token_slots, ("gather", L), lambda ts: _gather_plan(ts, L))
    if not used:
        return
    ranks = _ranks(slot_ranks, R)
    r = max(ranks[s] for s in used)
    if r == 0:
        return
    P = sc.shape[0]
    coef = token_weights.t().reshape(-1).index_select(0, pair).to(acc) * slot_scales.index_select(0, sc).to(acc)
    a = lora_a.index_select(0, sc)[:, :, :r].to(acc).reshape(P, S * r, H)  # (P, S*r, H)
    v = torch.bmm(a, x.index_select(0, tok).to(acc)[:, :, None]).view(P, S, r)
    b = lora_b.index_select(0, sc)[:, :, :r].to(acc)  # (P, N, r)
    if any(ranks[s] != r for s in used):  # mixed ranks: cut each pair's padding
        keep = torch.arange(r, device=x.device)[None, :] < slot_ranks.index_select(0, sc)[:, None]
        v = torch.where(keep[:, None, :], v, 0.0)
        b = torch.where(keep[:, None, :], b, 0.0)
    v = v * coef[:, None, None]
    if S == 1:
        d = torch.bmm(b, v.view(P, r, 1)).view(P, N)
    else:
        d = torch.cat([torch.bmm(b[:, offsets[s] : offsets[s + 1]], v[:, s, :, None]) for s in range(S)], 1).view(P, N)
    if one_per_token:  # each touched token has exactly one valid pair: d's rows are the tokens idx (same order)
        y.index_copy_(0, idx, (y.index_select(0, idx).to(acc) + d).to(y.dtype))
        return
    delta = torch.zeros(T, N, dtype=acc, device=y.device).index_put_((tok,), d, accumulate=True)
    y.index_copy_(0, idx, (y.index_select(0, idx).to(acc) + delta.index_select(0, idx)).to(y.dtype))


def _run_plan(token_slots, sorted_pairs, num_slots):
    """``(order, slot of each sorted pair (clamped), [(k, slot, tokens, start, n)])``: what the per-run loop of
    :func:`lora_apply_torch` derives from the routing alone (once per forward)."""
    T = token_slots.shape[0]
    runs = _compute_runs(token_slots, sorted_pairs, num_slots)
    order = sorted_pairs.long()
    slot_sorted = token_slots.t().reshape(-1).index_select(0, order).long().clamp(0, num_slots - 1)
    return order, slot_sorted, [(k, slot, rows - k * T, start, int(rows.numel())) for k, slot, rows, start in runs]


def _gather_plan(token_slots, num_slots):
    """Per-forward part of the gathered path, over the valid pairs only (k-major): their slot, pair index, token,
    the slots used (host), the touched tokens, and whether each touched token has a single valid pair."""
    T, K = token_slots.shape
    flat = token_slots.t().reshape(-1).long()
    valid = (flat >= 0) & (flat < num_slots)
    pair = valid.nonzero().squeeze(1)
    sc = flat.index_select(0, pair)
    tok = pair % T
    per_token = valid.view(K, T).sum(0)
    idx = (per_token > 0).nonzero().squeeze(1)
    one = bool((per_token <= 1).all())
    if one:  # order the pairs by token so d's rows line up with idx
        order = torch.argsort(tok, stable=True)
        pair, sc, tok = pair[order], sc[order], tok[order]
    return sc, pair, tok, sorted(set(sc.tolist())), idx, one
