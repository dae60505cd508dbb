"""Batched multi-LoRA ops: ``torch.ops.pllm.lora_shrink / lora_expand / lora_apply``.

Semantics: :mod:`pllm_kernels.reference.lora` (the spec). Routing: :class:`pllm_kernels.ops.meta.LoRAMeta`.
The public functions below validate arguments (errors are ``ValueError`` naming the argument), then run the op,
which picks a backend per call (:mod:`pllm_kernels.ops._backend`). The ops are registered as custom ops that
mutate preallocated outputs and return nothing: opaque, graph-capturable nodes under ``torch.compile``, where the
public functions call them through ``torch.ops.pllm``; in eager mode they call the same body directly, which
skips the dispatcher's overhead.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence

import torch

from pllm_kernels.ops._backend import pick_backend
from pllm_kernels.ops.meta import LoRAMeta

__all__ = ["lora_shrink", "lora_expand", "lora_apply", "shrink_out_shape"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------------------------- torch backend
_MEMO: dict = {}


def _memo(t: torch.Tensor, tag, fn):
    """``fn()`` cached on tensor ``t`` until ``t`` is modified in place (its version counter moves) or freed.

    The routing metadata is built once per forward and read by every patched layer: what is derived from it on
    the host (validation, the torch backend's runs) is computed once per forward instead of once per layer."""
    key = (id(t), tag)
    hit = _MEMO.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    value = fn()
    if len(_MEMO) > 512:
        _MEMO.clear()
    _MEMO[key] = (weakref.ref(t), t._version, value)
    return value


def _runs(token_slots: torch.Tensor, sorted_pairs: torch.Tensor, num_slots: int) -> list:
    """Runs of equal (k, slot) in sorted pair order, as ``[(k, slot, pair_rows, start)]`` (``pair_rows`` =
    ``sorted_pairs[start : start + len]``). Host-side (syncs on CUDA)."""
    return _memo(sorted_pairs, ("runs", num_slots, id(token_slots), token_slots._version),
                 lambda: list(_compute_runs(token_slots, sorted_pairs, num_slots)))


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


def _shrink_torch(out, x, lora_a, slot_ranks, token_slots, sorted_pairs):
    T = token_slots.shape[0]
    R = lora_a.shape[2]
    out.zero_()
    ranks = slot_ranks.clamp(0, R).tolist()
    acc = out.dtype
    for _, slot, rows, _ in _runs(token_slots, sorted_pairs, lora_a.shape[0]):
        r = ranks[slot]
        if r == 0:
            continue
        xs = x[rows % T].to(acc)  # (n, h_in)
        out[:, rows, :r] = torch.einsum("nh,srh->snr", xs, lora_a[slot, :, :r].to(acc))


def _expand_torch(y, v, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, slice_sizes):
    T = token_slots.shape[0]
    R = lora_b.shape[2]
    acc = torch.float64 if (y.dtype == torch.float64 or v.dtype == torch.float64) else torch.float32
    delta = torch.zeros(y.shape, dtype=acc, device=y.device)
    touched = torch.zeros(T, dtype=torch.bool, device=y.device)
    ranks = slot_ranks.clamp(0, R).tolist()
    offsets = [0]
    for n in slice_sizes:
        offsets.append(offsets[-1] + n)
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
        delta.index_add_(0, tokens, coef * torch.cat(parts, dim=1))
    y[touched] = (y[touched].to(acc) + delta[touched]).to(y.dtype)


def _apply_torch(y, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs,
                 slice_sizes):
    """Fused shrink + expand in torch. Long (k, slot) runs (prefill, shared adapters): one pair of matmuls per
    run on the rows gathered from the sorted order (no padding to the max rank). Many short runs (distinct-adapter
    decode): gather each pair's weights and use batched matmuls: one gather instead of a Python loop per adapter."""
    T, K = token_slots.shape
    L, S, R, H = lora_a.shape
    N = lora_b.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    offsets = [0]
    for n in slice_sizes:
        offsets.append(offsets[-1] + n)
    runs = _runs(token_slots, sorted_pairs, L)
    if not runs:
        return
    P = K * T
    gather = (len(runs) >= _GATHER_MIN_RUNS and P <= _GATHER_MAX_PAIRS_PER_RUN * len(runs)
              and P * (S * R * H + N * R) <= _GATHER_MAX_ELEMS)
    if _FORCE_STRATEGY is not None:
        gather = _FORCE_STRATEGY == "gather"
    if gather:
        # index_select, not advanced indexing: the latter is ~100x slower on multi-threaded CPU torch.
        sc, tok, coef_tok, idx = _memo(token_slots, ("gather", L, id(token_weights), token_weights._version, acc),
                                       lambda: _gather_plan(token_slots, token_weights, L, acc))
        keep = torch.arange(R, device=x.device)[None, :] < slot_ranks.index_select(0, sc)[:, None]
        coef = coef_tok * slot_scales.index_select(0, sc).to(acc)
        a = lora_a.index_select(0, sc).reshape(P, S * R, H).to(acc)
        v = torch.bmm(a, x.index_select(0, tok).to(acc)[:, :, None]).view(P, S, R)
        v = v * (keep * coef[:, None])[:, None, :]
        b = lora_b.index_select(0, sc).to(acc)  # (P, N, R)
        if S == 1:
            d = torch.bmm(b, v.view(P, R, 1))
        else:
            d = torch.cat([torch.bmm(b[:, offsets[s] : offsets[s + 1]], v[:, s, :, None]) for s in range(S)], 1)
        delta = d.view(K, T, N).sum(0) if K > 1 else d.view(T, N)
        y.index_copy_(0, idx, (y.index_select(0, idx).to(acc) + delta.index_select(0, idx)).to(y.dtype))
        return
    # Per-run loop: the run plan (tokens per run, positions in sorted order) is memoized per forward; per call,
    # one vectorized product gives every pair's weight * scale, each run reads a view of it (no per-run indexing).
    order, slot_sorted, plan = _memo(sorted_pairs, ("apply_runs", L, id(token_slots), token_slots._version),
                                     lambda: _run_plan(runs, token_slots, sorted_pairs, L))
    coef = (token_weights.t().reshape(-1).index_select(0, order).to(acc)
            * slot_scales.index_select(0, slot_sorted).to(acc))[:, None]
    ranks = slot_ranks.clamp(0, R).tolist()
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
        y.index_add_(0, tokens, d if d.dtype == y.dtype else d.to(y.dtype))


def _run_plan(runs, token_slots, sorted_pairs, num_slots):
    """``(order, slot of each sorted pair (clamped), [(k, slot, tokens, start, n)])``: what the per-run loop of
    :func:`_apply_torch` derives from the routing alone (once per forward)."""
    T = token_slots.shape[0]
    order = sorted_pairs.long()
    slot_sorted = token_slots.t().reshape(-1).index_select(0, order).long().clamp(0, num_slots - 1)
    return order, slot_sorted, [(k, slot, rows - k * T, start, int(rows.numel())) for k, slot, rows, start in runs]


def _gather_plan(token_slots, token_weights, num_slots, acc):
    """Per-forward part of the gathered path: per-pair slot (clamped), token, weight (0 = no adapter), and the
    tokens that have at least one adapter."""
    T, K = token_slots.shape
    flat = token_slots.t().reshape(-1).long()
    valid = (flat >= 0) & (flat < num_slots)
    sc = flat.clamp(0, num_slots - 1)
    tok = torch.arange(K * T, device=flat.device) % T
    coef_tok = token_weights.t().reshape(-1).to(acc) * valid
    idx = valid.view(K, T).any(0).nonzero().squeeze(1)
    return sc, tok, coef_tok, idx


_FORCE_STRATEGY: str | None = None  # tests: "gather" or "runs"
_GATHER_MIN_RUNS = 2  # one (k, slot) run: its two matmuls beat gathering a weight copy per token
_GATHER_MAX_PAIRS_PER_RUN = 4  # long runs (prefill): one matmul pair per run reads each weight once
_GATHER_MAX_ELEMS = 1 << 22  # cap on the gathered weight elements (16 MiB in fp32); above it, loop over runs


# ------------------------------------------------------------------------------------------- custom ops
def _triton():
    from pllm_kernels.triton import lora as tl_lora

    return tl_lora


def _lora_shrink_impl(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    slot_ranks: torch.Tensor,
    token_slots: torch.Tensor,
    sorted_pairs: torch.Tensor,
    seg_slot: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    chunk: int,
) -> None:
    backend = pick_backend("lora_shrink", x.device, x.dtype)
    if backend == "triton":
        _triton().lora_shrink_triton(
            x, lora_a, slot_ranks, token_slots, sorted_pairs, seg_slot, seg_start, seg_len, out, chunk=chunk
        )
    else:
        _shrink_torch(out, x, lora_a, slot_ranks, token_slots, sorted_pairs)


_lora_shrink_op = torch.library.custom_op("pllm::lora_shrink", mutates_args=("out",))(_lora_shrink_impl)


@_lora_shrink_op.register_fake
def _(out, x, lora_a, slot_ranks, token_slots, sorted_pairs, seg_slot, seg_start, seg_len, chunk):
    return None


def _lora_expand_impl(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    slot_ranks: torch.Tensor,
    slot_scales: torch.Tensor,
    token_slots: torch.Tensor,
    token_weights: torch.Tensor,
    sorted_pairs: torch.Tensor,
    seg_slot: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    slice_sizes: list[int],
    chunk: int,
) -> None:
    backend = pick_backend("lora_expand", y.device, y.dtype)
    if backend == "triton" and v.dtype != torch.float64:
        _triton().lora_expand_triton(
            y, v, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot, seg_start,
            seg_len, tuple(slice_sizes), chunk=chunk,
        )
    else:
        _expand_torch(y, v, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, slice_sizes)


_lora_expand_op = torch.library.custom_op("pllm::lora_expand", mutates_args=("y",))(_lora_expand_impl)


@_lora_expand_op.register_fake
def _(y, v, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot, seg_start, seg_len,
      slice_sizes, chunk):
    return None


def _lora_apply_impl(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slot_ranks: torch.Tensor,
    slot_scales: torch.Tensor,
    token_slots: torch.Tensor,
    token_weights: torch.Tensor,
    sorted_pairs: torch.Tensor,
    seg_slot: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    slice_sizes: list[int],
    chunk: int,
) -> None:
    backend = pick_backend("lora_apply", x.device, x.dtype)
    if backend == "triton":
        _triton().lora_apply_triton(
            y, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot,
            seg_start, seg_len, tuple(slice_sizes), chunk=chunk,
        )
        return
    _apply_torch(y, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs,
                 slice_sizes)


_lora_apply_op = torch.library.custom_op("pllm::lora_apply", mutates_args=("y",))(_lora_apply_impl)


@_lora_apply_op.register_fake
def _(y, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot, seg_start,
      seg_len, slice_sizes, chunk):
    return None


def _dispatch(op, impl, *args):
    """Under torch.compile call the registered op (an opaque graph node); in eager mode call its body directly,
    which skips the dispatcher's Python overhead (tens of microseconds per call, per layer)."""
    if torch.compiler.is_compiling():
        return op(*args)
    return impl(*args)


# ------------------------------------------------------------------------------------------- validation
def _check_values_enabled() -> bool:
    """Value checks (slot ids, ranks, scales) read device memory: skip them where a host sync is not allowed."""
    if os.environ.get("PLLM_CHECK_VALUES", "1") == "0":
        return False
    if torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _fail(arg: str, msg: str):
    raise ValueError(f"{arg}: {msg}")


def _check_tensor(name, t, *, dim=None, dtypes=None, device=None):
    if not isinstance(t, torch.Tensor):
        _fail(name, f"expected a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        _fail(name, f"expected {dim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        _fail(name, f"dtype {t.dtype} not supported (expected one of {[str(d) for d in dtypes]})")
    if device is not None and t.device != device:
        _fail(name, f"is on {t.device} but the inputs are on {device}")


def _check_meta(meta: LoRAMeta, T: int, device, num_slots: int):
    if not isinstance(meta, LoRAMeta):
        _fail("meta", f"expected a LoRAMeta (see pllm_kernels.batch.build_lora_meta), got {type(meta).__name__}")
    if meta.token_slots.dim() != 2 or meta.token_slots.shape[0] != T:
        _fail("meta", f"routes {meta.token_slots.shape[0]} tokens but the input has {T} tokens")
    if meta.num_slots != num_slots:
        _fail("meta", f"was built for num_slots={meta.num_slots} but the weight buffer has {num_slots} slots")
    for name in ("token_slots", "token_weights", "sorted_pairs", "seg_slot", "seg_start", "seg_len"):
        t = getattr(meta, name)
        if t.device != device:
            _fail(f"meta.{name}", f"is on {t.device} but the inputs are on {device}")
        if not t.is_contiguous():
            _fail(f"meta.{name}", "must be contiguous")


def _check_slot_values(meta: LoRAMeta, slot_ranks: torch.Tensor, max_rank: int, slot_scales: torch.Tensor | None):
    if not _check_values_enabled():
        return
    num_slots = slot_ranks.shape[0]
    ts = meta.token_slots
    if ts.numel() and not _memo(ts, ("slots_ok", num_slots), lambda: bool(((ts >= -1) & (ts < num_slots)).all())):
        lo, hi = int(ts.min()), int(ts.max())
        _fail("token_slots", f"slot ids must be -1 or in [0, {num_slots}), got values in [{lo}, {hi}]")
    ranks = slot_ranks
    ranks_ok = _memo(ranks, ("ranks_ok", max_rank), lambda: bool(((ranks >= 0) & (ranks <= max_rank)).all()))
    if not ranks_ok:
        _fail("slot_ranks", f"ranks must be in [0, {max_rank}] (the buffer's rank), got {slot_ranks.tolist()}")
    if slot_scales is not None and not _memo(slot_scales, "finite", lambda: bool(torch.isfinite(slot_scales).all())):
        _fail("slot_scales", f"must be finite, got {slot_scales.tolist()}")
    tw = meta.token_weights
    if not _memo(tw, "finite", lambda: bool(torch.isfinite(tw).all())):
        _fail("token_weights", "must be finite")


def _check_weights_common(x_or_y_device, slot_ranks, slot_scales, num_slots):
    _check_tensor("slot_ranks", slot_ranks, dim=1, dtypes=(torch.int32,), device=x_or_y_device)
    if slot_ranks.shape[0] != num_slots:
        _fail("slot_ranks", f"has {slot_ranks.shape[0]} entries but the weight buffer has {num_slots} slots")
    if slot_scales is not None:
        _check_tensor("slot_scales", slot_scales, dim=1, dtypes=(torch.float32,), device=x_or_y_device)
        if slot_scales.shape[0] != num_slots:
            _fail("slot_scales", f"has {slot_scales.shape[0]} entries but the weight buffer has {num_slots} slots")


def _slice_sizes(slice_sizes, lora_b, num_slices) -> list[int]:
    if slice_sizes is None:
        if num_slices != 1:
            _fail("slice_sizes", f"required with {num_slices} slices")
        slice_sizes = [lora_b.shape[1]]
    slice_sizes = [int(n) for n in slice_sizes]
    if len(slice_sizes) != num_slices:
        _fail("slice_sizes", f"has {len(slice_sizes)} entries but lora_a/v have {num_slices} slices")
    if any(n <= 0 for n in slice_sizes):
        _fail("slice_sizes", f"widths must be positive, got {slice_sizes}")
    if sum(slice_sizes) != lora_b.shape[1]:
        _fail("slice_sizes", f"sum to {sum(slice_sizes)} but lora_b has {lora_b.shape[1]} output rows")
    return slice_sizes


def shrink_out_shape(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMeta) -> tuple[int, int, int]:
    """Shape of the shrink output ``v``: ``(num_slices, K * num_tokens, max_rank)``."""
    return (lora_a.shape[1], meta.k * x.shape[0], lora_a.shape[2])


def _validate_x_a(x, lora_a):
    _check_tensor("x", x, dim=2, dtypes=_FLOATS)
    _check_tensor("lora_a", lora_a, dim=4, dtypes=_FLOATS, device=x.device)
    if lora_a.dtype != x.dtype:
        _fail("lora_a", f"dtype {lora_a.dtype} differs from x's {x.dtype}")
    if lora_a.shape[3] != x.shape[1]:
        _fail("lora_a", f"expects h_in={lora_a.shape[3]} (shape (L, S, R, h_in)) but x has {x.shape[1]} features")
    if lora_a.shape[2] < 1 or lora_a.shape[1] < 1 or lora_a.shape[0] < 1:
        _fail("lora_a", f"every dimension of (L, S, R, h_in) must be >= 1, got {tuple(lora_a.shape)}")


def _validate_y_b(y, lora_b, num_slots, dtype):
    _check_tensor("y", y, dim=2, dtypes=_FLOATS)
    _check_tensor("lora_b", lora_b, dim=3, dtypes=_FLOATS, device=y.device)
    if lora_b.dtype != dtype:
        _fail("lora_b", f"dtype {lora_b.dtype} differs from the activations' {dtype}")
    if lora_b.shape[0] != num_slots:
        _fail("lora_b", f"has {lora_b.shape[0]} slots but lora_a has {num_slots}")
    if y.shape[1] != lora_b.shape[1]:
        _fail("y", f"has {y.shape[1]} columns but lora_b produces {lora_b.shape[1]} (sum of slice widths)")


# ------------------------------------------------------------------------------------------- public API
def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    slot_ranks: torch.Tensor,
    meta: LoRAMeta,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``v[s, k*T+t, :r] = x[t] @ lora_a[slot, s, :r].T`` (Punica SGMV/BGMV shrink, multi-slice).

    Args: x ``(T, h_in)``; lora_a ``(L, S, R, h_in)``; slot_ranks ``(L,)`` int32; meta routes the T tokens.
    out: preallocated ``(S, K*T, R)`` float32 (float64 for float64 x), contiguous. Returns ``out``.
    """
    _validate_x_a(x, lora_a)
    L, S, R, _ = lora_a.shape
    _check_weights_common(x.device, slot_ranks, None, L)
    _check_meta(meta, x.shape[0], x.device, L)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = (S, meta.k * x.shape[0], R)
    if out is None:
        out = torch.empty(shape, dtype=acc, device=x.device)
    else:
        _check_tensor("out", out, dim=3, dtypes=(acc,), device=x.device)
        if tuple(out.shape) != shape:
            _fail("out", f"expected shape {shape} (S, K*T, R), got {tuple(out.shape)}")
        if not out.is_contiguous():
            _fail("out", "must be contiguous")
    _check_slot_values(meta, slot_ranks, R, None)
    _dispatch(_lora_shrink_op, _lora_shrink_impl,
        out, x, lora_a, slot_ranks, meta.token_slots, meta.sorted_pairs, meta.seg_slot, meta.seg_start, meta.seg_len,
        meta.chunk,
    )
    return out


def lora_expand(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    slot_ranks: torch.Tensor,
    slot_scales: torch.Tensor,
    meta: LoRAMeta,
    slice_sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """``y[t, off_s:off_s+n_s] += sum_k w[t,k] * scale[slot] * v[s, k*T+t, :r] @ lora_b[slot, off_s:off_s+n_s, :r].T``.

    Args: y ``(T, sum(slice_sizes))`` updated in place (any strides); v ``(S, K*T, R)`` float32;
    lora_b ``(L, sum(slice_sizes), R)``; slot_ranks ``(L,)`` int32; slot_scales ``(L,)`` float32;
    slice_sizes: output width per slice (default one slice). Returns ``y``.
    """
    _check_tensor("v", v, dim=3, dtypes=(torch.float32, torch.float64))
    L = lora_b.shape[0] if isinstance(lora_b, torch.Tensor) and lora_b.dim() == 3 else None
    _validate_y_b(y, lora_b, L, y.dtype)
    S, P, R = v.shape
    if v.device != y.device:
        _fail("v", f"is on {v.device} but y is on {y.device}")
    if lora_b.shape[2] != R:
        _fail("lora_b", f"has max rank {lora_b.shape[2]} but v has {R}")
    if not v.is_contiguous():
        _fail("v", "must be contiguous")
    _check_weights_common(y.device, slot_ranks, slot_scales, L)
    _check_meta(meta, y.shape[0], y.device, L)
    if P != meta.k * y.shape[0]:
        _fail("v", f"has {P} rows but K*T = {meta.k * y.shape[0]}")
    sizes = _slice_sizes(slice_sizes, lora_b, S)
    _check_slot_values(meta, slot_ranks, R, slot_scales)
    _dispatch(_lora_expand_op, _lora_expand_impl,
        y, v, lora_b, slot_ranks, slot_scales, meta.token_slots, meta.token_weights, meta.sorted_pairs, meta.seg_slot,
        meta.seg_start, meta.seg_len, sizes, meta.chunk,
    )
    return y


def lora_apply(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slot_ranks: torch.Tensor,
    slot_scales: torch.Tensor,
    meta: LoRAMeta,
    slice_sizes: Sequence[int] | None = None,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Fused shrink + expand: ``y += sum_k w * scale * (x @ A[slot].T) @ B[slot].T`` per token. Returns ``y``.

    Shapes as in :func:`lora_shrink` and :func:`lora_expand`; y ``(T, sum(slice_sizes))`` is updated in place.
    ``validate=False`` skips the argument checks, for callers that checked their buffers once and build the
    routing themselves (``MultiLoRALinear``: about 150 calls per decode step); the kernels still never read out
    of bounds (out-of-range slots are routed nowhere, ranks are clamped), but errors are no longer reported.
    """
    if not validate:
        _dispatch(_lora_apply_op, _lora_apply_impl,
                  y, x, lora_a, lora_b, slot_ranks, slot_scales, meta.token_slots, meta.token_weights,
                  meta.sorted_pairs, meta.seg_slot, meta.seg_start, meta.seg_len, list(slice_sizes or [y.shape[1]]),
                  meta.chunk)
        return y
    _validate_x_a(x, lora_a)
    L, S, R, _ = lora_a.shape
    _validate_y_b(y, lora_b, L, x.dtype)
    if y.dtype != x.dtype:
        _fail("y", f"dtype {y.dtype} differs from x's {x.dtype}")
    if y.device != x.device:
        _fail("y", f"is on {y.device} but x is on {x.device}")
    if y.shape[0] != x.shape[0]:
        _fail("y", f"has {y.shape[0]} rows but x has {x.shape[0]} tokens")
    if lora_b.shape[2] != R:
        _fail("lora_b", f"has max rank {lora_b.shape[2]} but lora_a has {R}")
    _check_weights_common(x.device, slot_ranks, slot_scales, L)
    _check_meta(meta, x.shape[0], x.device, L)
    sizes = _slice_sizes(slice_sizes, lora_b, S)
    _check_slot_values(meta, slot_ranks, R, slot_scales)
    _dispatch(_lora_apply_op, _lora_apply_impl,
        y, x, lora_a, lora_b, slot_ranks, slot_scales, meta.token_slots, meta.token_weights, meta.sorted_pairs,
        meta.seg_slot, meta.seg_start, meta.seg_len, sizes, meta.chunk,
    )
    return y
