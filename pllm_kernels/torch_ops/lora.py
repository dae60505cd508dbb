"""Vectorised torch implementations of the multi-LoRA ops (spec: :mod:`pllm_kernels.reference.lora`).

Arguments are the routing tensors of :class:`pllm_kernels.ops.meta.LoRAMeta`, already validated by the op layer.
Two strategies for ``lora_apply`` (``strategy=``):

* ``"runs"``: one pair of matmuls per run of equal (k, slot) in sorted pair order (Punica SGMV on the host):
  each adapter's weights are read once per forward, nothing is padded to the largest rank. Best for prefill and
  shared adapters.
* ``"gather"``: gather every pair's weights and use batched matmuls (Punica BGMV): one gather instead of a
  Python loop per adapter. Best for distinct-adapter decode.
* ``"dense"``: the slot buffers read in place over the span of slots the batch uses, nothing gathered or copied
  per call: a handful of BLAS calls per layer, against a cached transposed copy of B with the padding beyond each
  rank zeroed. When the tokens spread over the slots (decode: one user per row), one ``bmm`` over the span's
  slots, each with its own tokens (padded to the most any slot has), a multiply by routing weight * scale, and
  per slice one ``bmm`` + ``index_put_`` onto the tokens; when few slots serve many tokens, one ``mm`` over all
  the span's slots (``x @ A_span.T``), the per-token coefficients (zero for other slots and beyond a slot's
  rank), and one ``addmm_`` per slice straight into its output. Best for decode on CPU, where per-op overhead
  dominates. fp32 / fp64 only (a bf16
  / fp16 matmul would round the shrink output); needs ``lora_b`` with a version counter (not made under
  ``inference_mode``) for its cache.
* ``"auto"``: dense for decode-sized calls whose used-slot span is small, gather for other calls with many
  short runs (decode), runs otherwise.

``y`` may also be a list of per-slice outputs (``(T, N_s)`` each): every strategy writes each slice's delta into
its own tensor (the dense strategy directly; the others through one temporary).

Accumulation uses ``index_put_(accumulate=True)``, not ``index_add_``: on multi-threaded CPU torch the latter takes
~40 ms per small call when the cores are busy (OpenMP contention), ~10000x the 4 us of the former.

Isolation (every strategy): a pair with slot ``-1`` (or out of range), the padding beyond a slot's rank and a
rank-0 slot are never read into a row's result, so NaN / inf there cannot reach any row.
"""

from __future__ import annotations

import threading
import weakref

import torch

from pllm_kernels.reference.lora import slice_offsets
from pllm_kernels.torch_ops.memo import memo

__all__ = ["STRATEGIES", "dense_runner", "lora_apply_torch", "lora_expand_torch", "lora_shrink_torch"]

STRATEGIES = ("auto", "gather", "runs", "dense")
GATHER_MIN_RUNS = 2  # one (k, slot) run: its two matmuls beat gathering a weight copy per token
GATHER_MAX_PAIRS_PER_RUN = 4  # long runs (prefill): one matmul pair per run reads each weight once
GATHER_MAX_ELEMS = 1 << 22  # cap on the gathered weight elements (16 MiB in fp32); above it, loop over runs
DENSE_MAX_WORK = 512  # tokens * slot span: above it the dense matmuls' wasted work beats gathering
DENSE_MAX_SPAN_PER_SLOT = 4  # slot span / slots used: a sparse span reads too many unused slots


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
    """Resolve ``strategy`` among gather / runs (see the module docstring) from the run count and sizes (host
    ints); ``auto`` tried the dense strategy first (:func:`_dense_plan`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy not in ("auto", "dense"):
        return strategy
    gather = (num_runs >= GATHER_MIN_RUNS and num_pairs <= GATHER_MAX_PAIRS_PER_RUN * num_runs
              and gathered_elems <= GATHER_MAX_ELEMS)
    return "gather" if gather else "runs"


def lora_apply_torch(y, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs,
                     slice_sizes, *, strategy: str = "auto") -> None:
    """Fused shrink + expand in torch: ``y += sum_k w * scale * (x @ A[slot].T) @ B[slot].T`` per token.

    ``y``: ``(T, sum(slice_sizes))``, or a list of per-slice outputs ``(T, N_s)``."""
    if strategy in ("auto", "dense"):
        dense = _dense_plan(x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, slice_sizes,
                            force=strategy == "dense")
        if dense is not None:
            dense.run(y if isinstance(y, (list, tuple)) else dense.split(y), x)
            return
        if strategy == "dense":  # not servable densely (dtype, inference-mode buffers, a non-finite slot)
            strategy = "auto"
    T, K = token_slots.shape
    L, S, R, H = lora_a.shape
    N = lora_b.shape[1]
    acc = _acc(x.dtype)
    offsets = slice_offsets(slice_sizes)
    if isinstance(y, (list, tuple)):
        ys = list(y)
    else:
        ys = [y[:, offsets[s] : offsets[s + 1]] for s in range(S)] if S > 1 else [y]
    runs = _runs(token_slots, sorted_pairs, L)
    if not runs:
        return
    P = K * T
    chosen = choose_strategy(strategy, len(runs), P, P * (S * R * H + N * R))
    if len(ys) > 1 and isinstance(y, (list, tuple)):  # per-slice outputs: one temporary, added on touched rows
        tmp = torch.zeros(T, N, dtype=ys[0].dtype, device=x.device)
        lora_apply_torch(tmp, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights,
                         sorted_pairs, slice_sizes, strategy=chosen)
        touched = ((token_slots >= 0) & (token_slots < L)).any(1, keepdim=True)
        for s, ys_ in enumerate(ys):
            ys_.copy_(torch.where(touched, ys_ + tmp[:, offsets[s] : offsets[s + 1]], ys_))
        return
    y = ys[0] if len(ys) == 1 and isinstance(y, (list, tuple)) else y
    if chosen == "gather":
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


# ------------------------------------------------------------------------------------------------ dense
_BT_CACHE: dict = {}
_BT_LOCK = threading.Lock()


def _bt_cached(lora_b: torch.Tensor, slot_ranks: torch.Tensor, slot_scales: torch.Tensor, offsets: tuple):
    """``(bts, bad slots)``: per slice ``s`` a contiguous ``(L, R, N_s)`` copy of ``B[:, slice s, :]`` transposed and
    scaled by the slot's scale (``bts[s][l, r] = scale[l] * B[l, slice s, r]``) with the padding beyond each slot's
    rank zeroed; slots holding a non-finite value within their rank (after scaling) are zeroed and listed in ``bad``
    (a batch using one of them takes another strategy, which propagates the value as the spec does). Cached on the
    buffers (their version counters: the store writes slots in place); ``None`` for inference tensors (no version
    counter)."""
    if lora_b.is_inference() or slot_ranks.is_inference() or slot_scales.is_inference():
        return None
    key = (id(lora_b), tuple(lora_b.shape), lora_b.stride(), lora_b.dtype, id(slot_scales), offsets)
    stamp = (lora_b.data_ptr(), lora_b._version, slot_ranks.data_ptr(), slot_ranks._version, slot_scales.data_ptr(),
             slot_scales._version)
    hit = _BT_CACHE.get(key)
    if hit is not None and hit[0]() is lora_b and hit[1] == stamp:
        return hit[2]
    L, N, R = lora_b.shape
    acc = _acc(lora_b.dtype)
    with torch.inference_mode(False), torch.no_grad():
        ranks = slot_ranks.clamp(0, R).to(lora_b.device)
        keep = torch.arange(R, device=lora_b.device)[None, :] < ranks[:, None]  # (L, R)
        scales = slot_scales.to(device=lora_b.device, dtype=acc)[:, None, None]
        bt = torch.where(keep[:, :, None], lora_b.detach().permute(0, 2, 1).to(acc) * scales, 0)  # (L, R, N)
        finite = torch.isfinite(bt).reshape(L, -1).all(1)
        bad = frozenset(int(i) for i in (~finite).nonzero().flatten().tolist())
        if bad:
            bt[~finite] = 0
        bts = tuple(bt[:, :, offsets[i] : offsets[i + 1]].contiguous() for i in range(len(offsets) - 1))
    value = (bts, bad)
    with _BT_LOCK:
        if len(_BT_CACHE) > 256:
            _BT_CACHE.clear()
        _BT_CACHE[key] = (weakref.ref(lora_b), stamp, value)
    return value


def _dense_routing(token_slots, token_weights, L, acc):
    """Per-forward part of the dense strategy (memoized on the routing): the slot span ``[lo, hi)``, the slots used,
    ``hit (T, span)`` (token routed to the slot) and ``w (T, span)`` (sum over k of the routing weights of the
    token's pairs on that slot), whether every token has an adapter, and ``touched (T, 1)``."""
    T, K = token_slots.shape
    flat = token_slots.long()
    valid = (flat >= 0) & (flat < L)
    used = sorted(set(flat[valid].tolist()))
    if not used:
        return None
    lo, hi = used[0], used[-1] + 1
    span = hi - lo
    rows = torch.arange(T, device=flat.device)[:, None].expand(T, K)[valid]
    cols = flat[valid] - lo
    w = torch.zeros(T, span, dtype=acc, device=flat.device)
    w.index_put_((rows, cols), token_weights.to(acc)[valid], accumulate=True)
    hit = torch.zeros(T, span, dtype=torch.bool, device=flat.device)
    hit[rows, cols] = True
    touched = valid.any(1, keepdim=True)
    # Per slot of the span, its tokens (padded to the most any slot has): the batched form reads each slot's
    # weights in place (no gather) and computes only the routed tokens' products.
    pair_tok = rows.tolist()
    pair_col = cols.tolist()
    pair_w = token_weights.to(acc)[valid]
    lists = [[] for _ in range(span)]
    for i, (t, col) in enumerate(zip(pair_tok, pair_col)):
        lists[col].append((t, i))
    m = max(len(v) for v in lists)
    idx = torch.zeros(span, m, dtype=torch.long, device=flat.device)
    pw = torch.zeros(span, m, dtype=acc, device=flat.device)
    pos, tok, order = [], [], []
    for col, entries in enumerate(lists):
        for j, (t, i) in enumerate(entries):
            pos.append(col * m + j)
            tok.append(t)
            order.append(i)
    pos_t = torch.tensor(pos, dtype=torch.long, device=flat.device)
    tok_t = torch.tensor(tok, dtype=torch.long, device=flat.device)
    idx.view(-1)[pos_t] = tok_t
    pw.view(-1)[pos_t] = pair_w[torch.tensor(order, dtype=torch.long, device=flat.device)]
    full = len(pos) == span * m
    unit = bool((pair_w == 1).all())  # every routing weight 1: no multiply
    ident = m == 1 and full and span == T and tok == list(range(T))  # slot lo + i serves token i, only it
    padded = (m, idx, pw, pos_t, tok_t, full, unit, ident)
    return lo, hi, used, hit, w, bool(touched.all()), touched, padded


_A_FINITE: dict = {}


def _all_finite(lora_a: torch.Tensor) -> bool:
    """Whether every value of the slot buffer is finite (cached on its version counter; ``False`` when it has none):
    then ``v * 0`` is 0 wherever a token's coefficient is 0, and the dense path can skip its mask."""
    if lora_a.is_inference():
        return False
    key = id(lora_a)
    stamp = (lora_a.data_ptr(), lora_a._version, tuple(lora_a.shape), lora_a.dtype)
    hit = _A_FINITE.get(key)
    if hit is not None and hit[0]() is lora_a and hit[1] == stamp:
        return hit[2]
    ok = bool(torch.isfinite(lora_a).all())
    if len(_A_FINITE) > 256:
        _A_FINITE.clear()
    _A_FINITE[key] = (weakref.ref(lora_a), stamp, ok)
    return ok


class _DensePlan:
    """One target's dense-strategy call for one routing, with every view and mask it needs prepared (cached by
    :func:`_dense_plan` while the routing and the buffers are unchanged): :meth:`run` is a few BLAS calls.

    * ``padded`` (tokens spread over the slots): ``v = bmm(x per slot (span, m, H), A_span^T)``, then per slice
      ``bmm(v_s, B^T_s)`` scattered onto the tokens; when slot ``lo + i`` serves exactly token ``i`` (decode, one
      user per row in slot order) x is not gathered and each slice is one in-place ``baddbmm_`` into its output.
    * ``mm`` (few slots, many tokens): ``v = x @ A_span^T`` over all the span's slots, times the per-token
      coefficients (0 for the token's other slots and beyond a slot's rank), then one ``addmm_`` per slice.
    """

    __slots__ = ("kind", "offsets", "T", "span", "m", "H", "S", "R", "at", "bs", "coef", "mask", "idx", "pos", "tok",
                 "full", "ident", "all_touched", "touched", "cols")

    def split(self, y: torch.Tensor) -> list:
        o = self.offsets
        return [y[:, o[s] : o[s + 1]] for s in range(self.S)] if self.S > 1 else [y]

    def run_rows(self, outs, x: torch.Tensor) -> None:
        """:meth:`run` for the one-user-per-row decode form (``ident``) on ``(T, 1, N_s)`` outputs and a ``(T, 1, H)``
        input, contiguous and of the plan's dtype (a decode step's own tensors: no 2-D views to make)."""
        v = torch.bmm(x, self.at)  # (T, 1, S*R)
        if self.coef is not None:
            v.mul_(self.coef)
        if self.mask is not None:
            v.masked_fill_(self.mask, 0)
        if self.S == 1:
            outs[0].baddbmm_(v, self.bs[0])
            return
        for out, cols, b in zip(outs, self.cols, self.bs):
            out.baddbmm_(v[cols], b)

    def run(self, ys, x: torch.Tensor) -> None:
        R = self.R
        if self.kind == "padded":
            if self.ident:
                xs = x.view(self.span, 1, self.H) if x.is_contiguous() else x.reshape(self.span, 1, self.H)
            else:
                xs = x.index_select(0, self.idx).view(self.span, self.m, self.H)
            v = torch.bmm(xs, self.at)  # (span, m, S*R)
            if self.coef is not None:
                v.mul_(self.coef)
            if self.mask is not None:
                v.masked_fill_(self.mask, 0)
            for s, out in enumerate(ys):
                vs = v[:, :, s * R : (s + 1) * R] if self.S > 1 else v
                if self.ident and out.dtype == v.dtype:
                    out.unsqueeze(1).baddbmm_(vs, self.bs[s])
                    continue
                d = torch.bmm(vs, self.bs[s]).view(self.span * self.m, -1)  # (span * m, N_s)
                if not self.full:
                    d = d.index_select(0, self.pos)
                out.index_put_((self.tok,), d if d.dtype == out.dtype else d.to(out.dtype), accumulate=True)
            return
        T, span, S = self.T, self.span, self.S
        v = torch.mm(x, self.at).view(T, span, S, R)
        v.mul_(self.coef)  # (T, span, S, R): this token's slots, within their ranks; zero elsewhere ...
        if self.mask is not None:  # ... unless padding or an unused slot holds inf / NaN (0 * inf = NaN): cut it
            v.masked_fill_(self.mask, 0)
        v = v.permute(2, 0, 1, 3).reshape(S, T, span * R) if S > 1 else v.view(1, T, span * R)
        for s, out in enumerate(ys):
            if self.all_touched and out.dtype == v.dtype:
                out.addmm_(v[s], self.bs[s])
            else:  # rows without an adapter keep their bits (adding 0 would turn -0.0 into +0.0)
                d = torch.mm(v[s], self.bs[s])
                out.copy_(torch.where(self.touched, out + d.to(out.dtype), out))


def _build_plan(routing, lora_a, bts, slot_ranks, offsets, T, acc) -> _DensePlan:
    lo, hi, _used, hit_, w, all_touched, touched, padded = routing
    L, S, R, H = lora_a.shape
    span = hi - lo
    p = _DensePlan()
    p.offsets, p.T, p.span, p.H, p.S, p.R = offsets, T, span, H, S, R
    p.cols = tuple((slice(None), slice(None), slice(s * R, (s + 1) * R)) for s in range(S))  # slice s of v
    finite = _all_finite(lora_a)
    a_span = lora_a[lo:hi]
    if T > 2 * padded[0] and T > 1:  # tokens spread over the slots: the batched form skips the others' products
        m, idx, pw, pos, tok, full, unit, ident = padded
        p.kind, p.m, p.idx, p.pos, p.tok, p.full, p.ident = "padded", m, idx.view(-1), pos, tok, full, ident
        p.at = a_span.reshape(span, S * R, H).transpose(1, 2)
        p.bs = tuple(b[lo:hi] for b in bts)  # (span, R, N_s) each, contiguous
        p.coef = None if unit else pw[:, :, None]  # routing weights (padding rows: 0, dropped anyway)
        p.mask = None
        if not finite:  # 0 * inf: cut entries beyond each slot's rank (and padding rows)
            r = torch.arange(R, device=pw.device)
            keep = (pw[:, :, None] != 0) & (r[None, None, :] < slot_ranks[lo:hi, None, None].to(pw.device))
            p.mask = ~keep.repeat(1, 1, S)
        return p
    in_rank = torch.arange(R, device=w.device)[None, :] < slot_ranks[lo:hi, None].to(w.device)  # (span, R)
    keep = (hit_[:, :, None] & in_rank[None]).unsqueeze(2)  # (T, span, 1, R)
    p.kind, p.all_touched, p.touched = "mm", all_touched, touched
    p.at = a_span.reshape(span * S * R, H).t()
    p.bs = tuple(b.view(L * R, -1)[lo * R : hi * R] for b in bts)  # (span*R, N_s) each
    p.coef = torch.where(keep, w[:, :, None, None], 0)
    p.mask = None if finite else ~keep
    return p


_PLAN_CACHE: dict = {}


def _stamps(ts, tw, la, lb, sr, ss) -> tuple:
    """(address, version) of the routing and buffer tensors a plan depends on (inline: ~16 calls per step)."""
    return (ts.data_ptr(), ts._version, tw.data_ptr(), tw._version, la.data_ptr(), la._version, lb.data_ptr(),
            lb._version, sr.data_ptr(), sr._version, ss.data_ptr(), ss._version)


def _dense_plan(x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, slice_sizes, force=False):
    """The cached :class:`_DensePlan` of this call, or ``None`` when the dense strategy cannot serve it (dtype not
    fp32 / fp64, buffers without a version counter, a used slot with a non-finite value) or, unless ``force``,
    would be slow for it (too many tokens times slots, or a sparse slot span).

    A plan is valid while the routing and the buffers are the same tensors with the same contents: checked by
    (address, version) of each, so a hit costs one tuple compare; routing tensors without a version counter
    (made under ``inference_mode``) are compared by value (:func:`memo`)."""
    key = (id(token_slots), id(token_weights), id(lora_a), id(lora_b), id(slot_ranks), id(slot_scales), force)
    hit = _PLAN_CACHE.get(key)
    if hit is not None and hit[2] is not None and hit[0] is x.dtype and hit[1] == tuple(slice_sizes):
        r = hit[2]
        if r[0]() is token_slots and r[1]() is token_weights and r[2]() is lora_a and r[3]() is lora_b \
                and r[4]() is slot_ranks and r[5]() is slot_scales \
                and hit[3] == _stamps(token_slots, token_weights, lora_a, lora_b, slot_ranks, slot_scales):
            return hit[4]
    return _dense_plan_slow(key, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, slice_sizes,
                            force)


def _dense_plan_slow(key, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, slice_sizes, force):
    if x.dtype not in (torch.float32, torch.float64) or lora_a.dtype != x.dtype or lora_b.dtype != x.dtype:
        return None
    if not lora_a.is_contiguous() or lora_a.is_inference() or slot_ranks.is_inference() or \
            slot_scales.is_inference() or lora_b.is_inference():
        return None
    L = lora_a.shape[0]
    T = token_slots.shape[0]
    acc = x.dtype
    routing = memo(token_slots, ("dense", L, acc), lambda ts, tw: _dense_routing(ts, tw, L, acc), token_weights)
    if routing is None:
        return None
    sizes = tuple(slice_sizes)
    stamp = (lora_a.data_ptr(), lora_a._version, lora_b.data_ptr(), lora_b._version, slot_ranks.data_ptr(),
             slot_ranks._version, slot_scales.data_ptr(), slot_scales._version)
    hit = _PLAN_CACHE.get(key)
    if hit is not None and hit[5] is routing and hit[6] == stamp and hit[0] is x.dtype and hit[1] == sizes:
        return hit[4]
    plan = _new_plan(routing, lora_a, lora_b, slot_ranks, slot_scales, sizes, T, acc, force)
    fast = None  # the one-compare check of the next calls: only for routing tensors with a version counter
    if not token_slots.is_inference() and not token_weights.is_inference():
        fast = tuple(weakref.ref(t) for t in (token_slots, token_weights, lora_a, lora_b, slot_ranks, slot_scales))
    stamps = None if fast is None else _stamps(token_slots, token_weights, lora_a, lora_b, slot_ranks, slot_scales)
    with _BT_LOCK:
        if len(_PLAN_CACHE) > 1024:
            _PLAN_CACHE.clear()
        _PLAN_CACHE[key] = (x.dtype, sizes, fast, stamps, plan, routing, stamp)
    return plan


def dense_runner(x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, slice_sizes):
    """``(run, run_rows)``: this call's dense plan's bound ``run(ys, x)`` (``ys``: one output per slice) and, for the
    one-user-per-row decode form, ``run_rows(outs, x)`` on ``(T, 1, N_s)`` / ``(T, 1, H)`` tensors (else None);
    ``(None, None)`` when the ``auto`` strategy would not take the dense form for it. Valid while every tensor
    argument is the same object with the same version (the caller checks; see
    :class:`pllm_kernels.ops.lora.PreparedLoRA`)."""
    plan = _dense_plan(x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, slice_sizes)
    if plan is None:
        return None, None
    rows = plan.run_rows if plan.kind == "padded" and plan.ident else None
    return plan.run, rows


def _new_plan(routing, lora_a, lora_b, slot_ranks, slot_scales, sizes, T, acc, force):
    lo, hi, used = routing[0], routing[1], routing[2]
    span = hi - lo
    if not force and (T * span > DENSE_MAX_WORK or span > DENSE_MAX_SPAN_PER_SLOT * len(used)):
        return None
    offsets = tuple(slice_offsets(sizes))
    cached = _bt_cached(lora_b, slot_ranks, slot_scales, offsets)
    if cached is None:
        return None
    bts, bad = cached
    if bad and any(s in bad for s in used):
        return None
    with torch.inference_mode(False), torch.no_grad():
        return _build_plan(routing, lora_a, bts, slot_ranks, offsets, T, acc)


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
