"""Batched multi-LoRA ops: ``torch.ops.pllm.lora_shrink / lora_expand / lora_apply``.

Semantics: :mod:`pllm_kernels.reference.lora` (the spec). Routing: :class:`pllm_kernels.ops.meta.LoRAMeta`.
The public functions below validate arguments (errors are ``ValueError`` naming the argument), then run the op,
which picks a backend per call (:mod:`pllm_kernels.ops._backend`). The ops are registered as custom ops that
mutate preallocated outputs and return nothing: opaque, graph-capturable nodes under ``torch.compile``, where the
public functions call them through ``torch.ops.pllm``; in eager mode they call the same body directly, which
skips the dispatcher's overhead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pllm_kernels.ops._backend import Impl, OpTable, default_backend
from pllm_kernels.ops._checks import _backend_arg, _check_tensor, _check_values_enabled, _dispatch, _fail
from pllm_kernels.ops.meta import LoRAMeta
from pllm_kernels.torch_ops import lora as torch_lora
from pllm_kernels.torch_ops.memo import memo

__all__ = ["PreparedLoRA", "lora_shrink", "lora_expand", "lora_apply", "prepare_lora_apply", "shrink_out_shape"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ------------------------------------------------------------------------------------------- custom ops
def _triton():
    from pllm_kernels.triton import lora as tl_lora

    return tl_lora


def _no_float64(device, dtype):
    return "float64 runs in torch" if dtype == torch.float64 else None


def _cuda():
    from pllm_kernels.cuda import lora as cu_lora

    return cu_lora


def _launcher(name: str):
    """The lora_apply launcher of backend ``name`` (for its capability attributes)."""
    return _triton().lora_apply_triton if name == "triton" else _cuda().lora_apply_cuda


def _cuda_supports(device, dtype):
    return _cuda().supports(device, dtype)


def _pick(table: OpTable, backend: str, device, dtype, num_pairs: int):
    """The table's choice, except that ``auto`` keeps prefill-sized calls (``num_pairs > CUDA_AUTO_MAX_PAIRS``) on
    Triton: by default the CUDA kernels use no tensor cores (the price of batch-invariant results), so Triton's SGMV
    is faster there, unless the CUDA tensor-core shrink is on (``PLLM_CUDA_TENSOR_CORES=1``) for fp16 / bf16;
    ``backend="cuda"`` always runs them."""
    name, impl = table.pick(backend, device, dtype)
    if name == "cuda" and backend == "auto" and num_pairs > CUDA_AUTO_MAX_PAIRS and table.impls["triton"] is not None \
            and not (dtype in (torch.float16, torch.bfloat16) and _cuda().tensor_cores()):
        return "triton", table.impls["triton"]
    return name, impl


CUDA_AUTO_MAX_PAIRS = 64  # token-slot pairs: decode sizes go to the CUDA kernels under auto

# The backend tables: torch, Triton and the CUDA extension's kernels (same launcher signatures as Triton's).
_SHRINK = OpTable("lora_shrink", torch=Impl(torch_lora.lora_shrink_torch),
                  triton=Impl(lambda *a, **k: _triton().lora_shrink_triton(*a, **k), _no_float64),
                  cuda=Impl(lambda *a, **k: _cuda().lora_shrink_cuda(*a, **k), _cuda_supports))
_EXPAND = OpTable("lora_expand", torch=Impl(torch_lora.lora_expand_torch),
                  triton=Impl(lambda *a, **k: _triton().lora_expand_triton(*a, **k), _no_float64),
                  cuda=Impl(lambda *a, **k: _cuda().lora_expand_cuda(*a, **k), _cuda_supports))
_APPLY = OpTable("lora_apply", torch=Impl(torch_lora.lora_apply_torch),
                 triton=Impl(lambda *a, **k: _triton().lora_apply_triton(*a, **k), _no_float64),
                 cuda=Impl(lambda *a, **k: _cuda().lora_apply_cuda(*a, **k), _cuda_supports))


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
    backend: str,
) -> None:
    name, impl = _pick(_SHRINK, backend, x.device, x.dtype, token_slots.numel())
    if name == "torch":
        impl.fn(out, x, lora_a, slot_ranks, token_slots, sorted_pairs)
    else:
        impl.fn(x, lora_a, slot_ranks, token_slots, sorted_pairs, seg_slot, seg_start, seg_len, out, chunk=chunk)


_lora_shrink_op = torch.library.custom_op("pllm::lora_shrink", mutates_args=("out",))(_lora_shrink_impl)


@_lora_shrink_op.register_fake
def _(out, x, lora_a, slot_ranks, token_slots, sorted_pairs, seg_slot, seg_start, seg_len, chunk, backend):
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
    backend: str,
) -> None:
    name, impl = _pick(_EXPAND, backend, y.device, torch.float64 if v.dtype == torch.float64 else y.dtype,
                       token_slots.numel())
    if name == "torch":
        impl.fn(y, v, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, slice_sizes)
    else:
        impl.fn(y, v, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot, seg_start,
                seg_len, tuple(slice_sizes), chunk=chunk)


_lora_expand_op = torch.library.custom_op("pllm::lora_expand", mutates_args=("y",))(_lora_expand_impl)


@_lora_expand_op.register_fake
def _(y, v, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot, seg_start, seg_len,
      slice_sizes, chunk, backend):
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
    backend: str,
    strategy: str,
) -> None:
    if x.is_cpu and (backend == "auto" or backend == "torch"):  # what the table picks there (per-call fast path)
        name, impl = "torch", _APPLY.impls["torch"]
    else:
        name, impl = _pick(_APPLY, backend, x.device, x.dtype, token_slots.numel())
    if name == "torch":
        impl.fn(y, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, slice_sizes,
                strategy=strategy)
    else:
        impl.fn(y, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot,
                seg_start, seg_len, tuple(slice_sizes), chunk=chunk)


_lora_apply_op = torch.library.custom_op("pllm::lora_apply", mutates_args=("y",))(_lora_apply_impl)


@_lora_apply_op.register_fake
def _(y, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot, seg_start,
      seg_len, slice_sizes, chunk, backend, strategy):
    return None


def _lora_apply_sliced_impl(
    ys: list[torch.Tensor],
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
    backend: str,
    strategy: str,
) -> None:
    """``lora_apply`` with one output tensor per slice. Backends whose launcher takes per-slice outputs write
    them directly (torch; Triton when ``lora_apply_triton.sliced_outputs``; the CUDA kernels for up to 8 slices);
    otherwise one temporary ``(T, sum(slice_sizes))`` is then added into each output on the touched rows."""
    if x.is_cpu and (backend == "auto" or backend == "torch"):  # what the table picks there (per-call fast path)
        name, impl = "torch", _APPLY.impls["torch"]
    else:
        name, impl = _pick(_APPLY, backend, x.device, x.dtype, token_slots.numel())
    if name == "torch":
        impl.fn(ys, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs,
                slice_sizes, strategy=strategy)
        return
    if getattr(_launcher(name), "sliced_outputs", False) and (name != "cuda" or len(ys) <= _cuda().MAX_SLICED_OUTPUTS):
        impl.fn(tuple(ys), x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs,
                seg_slot, seg_start, seg_len, tuple(slice_sizes), chunk=chunk)
        return
    tmp = torch.zeros(x.shape[0], sum(slice_sizes), dtype=ys[0].dtype, device=x.device)
    impl.fn(tmp, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot,
            seg_start, seg_len, tuple(slice_sizes), chunk=chunk)
    touched = ((token_slots >= 0) & (token_slots < lora_a.shape[0])).any(1, keepdim=True)
    off = 0
    for out, n in zip(ys, slice_sizes):
        out.copy_(torch.where(touched, out + tmp[:, off : off + n], out))
        off += n


_lora_apply_sliced_op = torch.library.custom_op("pllm::lora_apply_sliced", mutates_args=("ys",))(
    _lora_apply_sliced_impl)


@_lora_apply_sliced_op.register_fake
def _(ys, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot, seg_start,
      seg_len, slice_sizes, chunk, backend, strategy):
    return None


# ------------------------------------------------------------------------------------------- validation
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
    if ts.numel() and not memo(ts, ("slots_ok", num_slots), lambda t: bool(((t >= -1) & (t < num_slots)).all())):
        lo, hi = int(ts.min()), int(ts.max())
        _fail("token_slots", f"slot ids must be -1 or in [0, {num_slots}), got values in [{lo}, {hi}]")
    ranks = slot_ranks
    ranks_ok = memo(ranks, ("ranks_ok", max_rank), lambda r: bool(((r >= 0) & (r <= max_rank)).all()))
    if not ranks_ok:
        _fail("slot_ranks", f"ranks must be in [0, {max_rank}] (the buffer's rank), got {slot_ranks.tolist()}")
    if slot_scales is not None and not memo(slot_scales, "finite", lambda t: bool(torch.isfinite(t).all())):
        _fail("slot_scales", f"must be finite, got {slot_scales.tolist()}")
    tw = meta.token_weights
    if not memo(tw, "finite", lambda t: bool(torch.isfinite(t).all())):
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
    backend: str | None = None,
) -> torch.Tensor:
    """``v[s, k*T+t, :r] = x[t] @ lora_a[slot, s, :r].T`` (Punica SGMV/BGMV shrink, multi-slice).

    Args: x ``(T, h_in)``; lora_a ``(L, S, R, h_in)``; slot_ranks ``(L,)`` int32; meta routes the T tokens.
    out: preallocated ``(S, K*T, R)`` float32 (float64 for float64 x), contiguous. Returns ``out``.
    backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"torch"`` or ``None`` (the process default, ``PLLM_BACKEND``).
    """
    backend = _backend_arg(backend)
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
        meta.chunk, backend,
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
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``y[t, off_s:off_s+n_s] += sum_k w[t,k] * scale[slot] * v[s, k*T+t, :r] @ lora_b[slot, off_s:off_s+n_s, :r].T``.

    Args: y ``(T, sum(slice_sizes))`` updated in place (any strides); v ``(S, K*T, R)`` float32;
    lora_b ``(L, sum(slice_sizes), R)``; slot_ranks ``(L,)`` int32; slot_scales ``(L,)`` float32;
    slice_sizes: output width per slice (default one slice); backend as in :func:`lora_shrink`. Returns ``y``.
    """
    backend = _backend_arg(backend)
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
        meta.seg_start, meta.seg_len, sizes, meta.chunk, backend,
    )
    return y


def lora_apply(
    y: torch.Tensor | Sequence[torch.Tensor],
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slot_ranks: torch.Tensor,
    slot_scales: torch.Tensor,
    meta: LoRAMeta,
    slice_sizes: Sequence[int] | None = None,
    *,
    backend: str | None = None,
    strategy: str = "auto",
    validate: bool = True,
):
    """Fused shrink + expand: ``y += sum_k w * scale * (x @ A[slot].T) @ B[slot].T`` per token. Returns ``y``.

    Shapes as in :func:`lora_shrink` and :func:`lora_expand`; y ``(T, sum(slice_sizes))`` is updated in place.
    ``y`` may instead be a list of one output per slice, ``(T, slice_sizes[s])`` each (any row stride): slice
    ``s``'s delta goes straight into ``y[s]``, e.g. the separate q / k / v projection outputs served by one call
    over their stacked adapters.
    ``validate=False`` skips the argument checks, for callers that checked their buffers once and build the
    routing themselves (``MultiLoRALinear``: about 150 calls per decode step); the kernels still never read out
    of bounds (out-of-range slots are routed nowhere, ranks are clamped), but errors are no longer reported.
    backend as in :func:`lora_shrink`; ``strategy`` (torch backend only): ``"auto"``, ``"dense"``, ``"gather"`` or
    ``"runs"`` (see :mod:`pllm_kernels.torch_ops.lora`).
    """
    sliced = isinstance(y, (list, tuple))
    if not validate:
        sizes = slice_sizes or ([t.shape[1] for t in y] if sliced else [y.shape[1]])
        if not isinstance(sizes, list):
            sizes = list(sizes)
        if sliced:
            _dispatch(_lora_apply_sliced_op, _lora_apply_sliced_impl,
                      y if isinstance(y, list) else list(y), x, lora_a, lora_b, slot_ranks, slot_scales,
                      meta.token_slots, meta.token_weights, meta.sorted_pairs, meta.seg_slot, meta.seg_start,
                      meta.seg_len, sizes, meta.chunk, backend or default_backend(), strategy)
        else:
            _dispatch(_lora_apply_op, _lora_apply_impl,
                      y, x, lora_a, lora_b, slot_ranks, slot_scales, meta.token_slots, meta.token_weights,
                      meta.sorted_pairs, meta.seg_slot, meta.seg_start, meta.seg_len, sizes, meta.chunk,
                      backend or default_backend(), strategy)
        return y
    backend = _backend_arg(backend)
    if strategy not in torch_lora.STRATEGIES:
        _fail("strategy", f"must be one of {torch_lora.STRATEGIES}, got {strategy!r}")
    _validate_x_a(x, lora_a)
    L, S, R, _ = lora_a.shape
    if sliced:
        ys = list(y)
        if len(ys) != S:
            _fail("y", f"a list of outputs needs one per slice: got {len(ys)} for {S} slices")
        _check_tensor("lora_b", lora_b, dim=3, dtypes=_FLOATS, device=x.device)
        if lora_b.dtype != x.dtype:
            _fail("lora_b", f"dtype {lora_b.dtype} differs from the activations' {x.dtype}")
        if lora_b.shape[0] != L:
            _fail("lora_b", f"has {lora_b.shape[0]} slots but lora_a has {L}")
        if slice_sizes is None:
            slice_sizes = [t.shape[1] if isinstance(t, torch.Tensor) and t.dim() == 2 else -1 for t in ys]
        for i, t in enumerate(ys):
            _check_tensor(f"y[{i}]", t, dim=2, dtypes=_FLOATS, device=x.device)
            if t.dtype != x.dtype:
                _fail(f"y[{i}]", f"dtype {t.dtype} differs from x's {x.dtype}")
            if t.shape[0] != x.shape[0]:
                _fail(f"y[{i}]", f"has {t.shape[0]} rows but x has {x.shape[0]} tokens")
            if t.stride(1) != 1:
                _fail(f"y[{i}]", "columns must be contiguous (stride 1)")
    else:
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
    if sliced:
        for i, (t, n) in enumerate(zip(ys, sizes)):
            if t.shape[1] != n:
                _fail(f"y[{i}]", f"has {t.shape[1]} columns but slice {i} is {n} wide")
    _check_slot_values(meta, slot_ranks, R, slot_scales)
    if sliced:
        _dispatch(_lora_apply_sliced_op, _lora_apply_sliced_impl,
            ys, x, lora_a, lora_b, slot_ranks, slot_scales, meta.token_slots, meta.token_weights, meta.sorted_pairs,
            meta.seg_slot, meta.seg_start, meta.seg_len, sizes, meta.chunk, backend, strategy,
        )
        return y
    _dispatch(_lora_apply_op, _lora_apply_impl,
        y, x, lora_a, lora_b, slot_ranks, slot_scales, meta.token_slots, meta.token_weights, meta.sorted_pairs,
        meta.seg_slot, meta.seg_start, meta.seg_len, sizes, meta.chunk, backend, strategy,
    )
    return y


# ------------------------------------------------------------------------------------------- prepared calls
class PreparedLoRA:
    """``lora_apply`` bound to one routing and one set of slot buffers, for a caller that makes the same call again
    and again (a patched layer at every decode step of a request): ``prepared(ys, x)`` does exactly what
    ``lora_apply(ys, x, lora_a, lora_b, slot_ranks, slot_scales, meta, slice_sizes, validate=False)`` does, in a
    few BLAS calls and no per-call planning, as long as :meth:`valid` holds for the call's arguments: the same
    ``meta`` object and buffer tensors, none of them written since (version counters), and an ``x`` of the same
    dtype and rows on the CPU. Made by :func:`prepare_lora_apply`; ``ys`` is a list of one output per slice."""

    __slots__ = ("meta", "tensors", "versions", "dtype", "rows", "run", "run_rows")

    def __init__(self, meta: LoRAMeta, tensors: tuple, dtype: torch.dtype, rows: int, run, run_rows=None):
        self.meta, self.tensors, self.dtype, self.rows, self.run = meta, tensors, dtype, rows, run
        # decode, row i served by slot lo + i alone: run_rows(outs, x) on (T, 1, N_s) outputs / (T, 1, H) input
        # (contiguous, of this dtype), the same bits without 2-D views; None for other routings
        self.run_rows = run_rows
        self.versions = tuple(t._version for t in tensors)

    def valid(self, meta: LoRAMeta, x: torch.Tensor, lora_a, lora_b, slot_ranks, slot_scales) -> bool:
        t = self.tensors
        return (meta is self.meta and x.dtype is self.dtype and x.shape[0] == self.rows and x.is_cpu
                and lora_a is t[2] and lora_b is t[3] and slot_ranks is t[4] and slot_scales is t[5]
                and self.versions == (t[0]._version, t[1]._version, t[2]._version, t[3]._version, t[4]._version,
                                      t[5]._version))

    def __call__(self, ys: list, x: torch.Tensor) -> None:
        self.run(ys, x)


def prepare_lora_apply(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slot_ranks: torch.Tensor,
                       slot_scales: torch.Tensor, meta: LoRAMeta, slice_sizes: Sequence[int],
                       *, backend: str | None = None, strategy: str = "auto") -> PreparedLoRA | None:
    """A :class:`PreparedLoRA` for calls like this one, or ``None`` where there is no faster form than
    :func:`lora_apply` itself: only the torch backend's dense strategy on CPU tensors (decode-sized calls,
    fp32 / fp64) is prepared, with routing and buffers that have version counters (not made under
    ``inference_mode``). Arguments as for :func:`lora_apply`, already validated by the caller (e.g. by a first
    ``lora_apply(..., validate=True)``)."""
    backend = backend or default_backend()
    if not x.is_cpu or backend not in ("auto", "torch") or strategy not in ("auto", "dense") \
            or torch.compiler.is_compiling():
        return None
    tensors = (meta.token_slots, meta.token_weights, lora_a, lora_b, slot_ranks, slot_scales)
    if any(t.is_inference() for t in tensors):
        return None
    run, run_rows = torch_lora.dense_runner(x, lora_a, lora_b, slot_ranks, slot_scales, meta.token_slots,
                                            meta.token_weights, list(slice_sizes))
    return None if run is None else PreparedLoRA(meta, tensors, x.dtype, x.shape[0], run, run_rows)
