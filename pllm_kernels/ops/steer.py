"""Per-token activation steering ops: ``torch.ops.pllm.steer_add`` and ``torch.ops.pllm.steer_rmsnorm``.

Semantics: :mod:`pllm_kernels.reference.steer` (the spec: ADD / ABLATE / ABLATE_ADD / NORM_PRESERVE, K entries per
token applied in order, ``-1`` = none). The public functions validate (``ValueError`` naming the argument), then
run the op on the backend of their table (:mod:`pllm_kernels.ops._backend`).
"""

from __future__ import annotations

import torch

from pllm_kernels.ops._backend import Impl, OpTable
from pllm_kernels.ops._checks import FLOATS, _backend_arg, _check_tensor, _check_values_enabled, _dispatch, _fail
from pllm_kernels.reference.steer import MODES
from pllm_kernels.torch_ops import steer as torch_steer
from pllm_kernels.torch_ops.memo import memo

__all__ = ["MODES", "steer_add", "steer_rmsnorm"]


def _triton():
    from pllm_kernels.triton import steer as tl_steer

    return tl_steer


def _triton_supports(device, dtype):
    if dtype == torch.float64:
        return "float64 runs in torch"
    return None


def _cuda():
    from pllm_kernels.cuda import steer as cu_steer

    return cu_steer


def _cuda_supports(device, dtype):
    return _cuda().supports(device, dtype)


_STEER = OpTable("steer_add", torch=Impl(torch_steer.steer_add_torch),
                 triton=Impl(lambda *a: _triton().steer_add_triton(*a), _triton_supports),
                 cuda=Impl(lambda *a: _cuda().steer_add_cuda(*a), _cuda_supports))
_STEER_NORM = OpTable("steer_rmsnorm", torch=Impl(torch_steer.steer_rmsnorm_torch),
                      triton=Impl(lambda *a: _triton().steer_rmsnorm_triton(*a), _triton_supports),
                      cuda=Impl(lambda *a: _cuda().steer_rmsnorm_cuda(*a), _cuda_supports))


def _rows_ok(h: torch.Tensor) -> bool:
    from pllm_kernels.triton.steer import MAX_HIDDEN

    return h.stride(1) == 1 and h.shape[1] <= MAX_HIDDEN


def _steer_add_impl(h: torch.Tensor, vectors: torch.Tensor, token_slots: torch.Tensor, token_scales: torch.Tensor,
                    slot_modes: torch.Tensor, backend: str) -> None:
    name, impl = _STEER.pick(backend, h.device, h.dtype)
    if name != "torch" and not _rows_ok(h):  # kernels want unit inner stride: run on a copy
        tmp = h.contiguous()
        impl.fn(tmp, vectors, token_slots, token_scales, slot_modes)
        h.copy_(tmp)
        return
    impl.fn(h, vectors, token_slots, token_scales, slot_modes)


_steer_add_op = torch.library.custom_op("pllm::steer_add", mutates_args=("h",))(_steer_add_impl)


@_steer_add_op.register_fake
def _(h, vectors, token_slots, token_scales, slot_modes, backend):
    return None


def _steer_rmsnorm_impl(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float, vectors: torch.Tensor,
                        token_slots: torch.Tensor, token_scales: torch.Tensor, slot_modes: torch.Tensor,
                        weight_offset: float, backend: str) -> None:
    name, impl = _STEER_NORM.pick(backend, h.device, h.dtype)
    if name != "torch" and not (_rows_ok(h) and out.stride(1) == 1):
        tmp, tmp_out = h.contiguous(), torch.empty_like(out, memory_format=torch.contiguous_format)
        impl.fn(tmp_out, tmp, weight.contiguous(), eps, vectors, token_slots, token_scales, slot_modes, weight_offset)
        h.copy_(tmp)
        out.copy_(tmp_out)
        return
    impl.fn(out, h, weight, eps, vectors, token_slots, token_scales, slot_modes, weight_offset)


_steer_rmsnorm_op = torch.library.custom_op("pllm::steer_rmsnorm", mutates_args=("out", "h"))(_steer_rmsnorm_impl)


@_steer_rmsnorm_op.register_fake
def _(out, h, weight, eps, vectors, token_slots, token_scales, slot_modes, weight_offset, backend):
    return None


def _validate(h, vectors, token_slots, token_scales, slot_modes, values=True):
    _check_tensor("h", h, dim=2, dtypes=FLOATS)
    T, H = h.shape
    _check_tensor("vectors", vectors, dim=2, dtypes=FLOATS, device=h.device)
    if vectors.shape[1] != H:
        _fail("vectors", f"has {vectors.shape[1]} features but h has hidden size {H} (shape (num_slots, hidden))")
    if vectors.shape[0] < 1:
        _fail("vectors", "needs at least one slot")
    if vectors.stride(1) != 1:
        _fail("vectors", "rows must be contiguous (stride 1 along hidden)")
    L = vectors.shape[0]
    _check_tensor("token_slots", token_slots, dtypes=(torch.int32, torch.int64), device=h.device)
    if token_slots.dim() == 1:
        token_slots = token_slots[:, None]
    if token_slots.dim() != 2 or token_slots.shape[0] != T or token_slots.shape[1] < 1:
        _fail("token_slots", f"expected shape (T={T},) or (T={T}, K>=1), got {tuple(token_slots.shape)}")
    K = token_slots.shape[1]
    if token_scales is None:
        token_scales = torch.ones(T, K, dtype=torch.float32, device=h.device)
    _check_tensor("token_scales", token_scales, dtypes=FLOATS, device=h.device)
    if token_scales.dim() == 1:
        token_scales = token_scales[:, None]
    if tuple(token_scales.shape) != (T, K):
        _fail("token_scales", f"expected shape {(T, K)} like token_slots, got {tuple(token_scales.shape)}")
    _check_tensor("slot_modes", slot_modes, dim=1, dtypes=(torch.int32, torch.int64), device=h.device)
    if slot_modes.shape[0] != L:
        _fail("slot_modes", f"has {slot_modes.shape[0]} entries but vectors has {L} slots")
    # never alias the caller's routing (kernels read int32 / fp32); clamp before the cast so ids stay out of range
    i32 = torch.iinfo(torch.int32)
    token_slots = token_slots.clamp(i32.min, i32.max).to(torch.int32, copy=True).contiguous()
    token_scales = token_scales.to(torch.float32, copy=True).contiguous()
    slot_modes = slot_modes.to(torch.int32).contiguous()
    if values and _check_values_enabled():
        if token_slots.numel() and not memo(token_slots, ("steer_slots", L),
                                            lambda t: bool(((t >= -1) & (t < L)).all())):
            _fail("token_slots", f"slot ids must be -1 or in [0, {L}), got values in "
                                 f"[{int(token_slots.min())}, {int(token_slots.max())}]")
        if not bool(torch.isfinite(token_scales).all()):
            _fail("token_scales", "must be finite")
        if not memo(slot_modes, "steer_modes", lambda m: bool(((m >= 0) & (m < len(MODES))).all())):
            _fail("slot_modes", f"modes are 0..{len(MODES) - 1} ({MODES}), got {slot_modes.tolist()}")
    return token_slots, token_scales, slot_modes


def steer_add(h: torch.Tensor, vectors: torch.Tensor, token_slots: torch.Tensor,
              token_scales: torch.Tensor | None = None, slot_modes: torch.Tensor | None = None, *,
              backend: str | None = None, validate: bool = True) -> torch.Tensor:
    """Steer ``h (T, H)`` in place: for each token, its K vector slots applied in order (reference: ActAdd / CAA /
    StyleVector addition, ``steering-vectors``' ablation operators, repeng's norm-preserving addition).

    Args:
        h: ``(T, H)`` activations (any strides), updated in place.
        vectors: ``(L, H)`` vector table (any float dtype; arithmetic in float32).
        token_slots: ``(T,)`` or ``(T, K)`` int slot per token, ``-1`` = none.
        token_scales: same shape, float strengths (default 1).
        slot_modes: ``(L,)`` int mode of each slot (``MODES``: add 0, ablate 1, ablate_add 2, norm_preserve 3;
            default all add).
        backend: ``"auto"``, ``"triton"``, ``"torch"``, ``"cuda"`` or ``None`` (the process default).
        validate: ``False`` skips the value checks (slot range, finite scales, modes: host syncs) for callers that
            built the routing themselves (the patched model's steering points after their first call).
    Returns ``h``.
    """
    backend = _backend_arg(backend)
    if slot_modes is None and isinstance(vectors, torch.Tensor):
        slot_modes = torch.zeros(vectors.shape[0], dtype=torch.int32, device=vectors.device)
    ts, sc, md = _validate(h, vectors, token_slots, token_scales, slot_modes, values=validate)
    _dispatch(_steer_add_op, _steer_add_impl, h, vectors, ts, sc, md, backend)
    return h


def steer_rmsnorm(h: torch.Tensor, weight: torch.Tensor, eps: float, vectors: torch.Tensor, token_slots: torch.Tensor,
                  token_scales: torch.Tensor | None = None, slot_modes: torch.Tensor | None = None, *,
                  weight_offset: float = 0.0, out: torch.Tensor | None = None,
                  backend: str | None = None, validate: bool = True) -> torch.Tensor:
    """Fused steering + RMSNorm in one pass: steer ``h`` in place (as :func:`steer_add`) and return
    ``RMSNorm(h_steered)`` ``(T, H)`` in ``h``'s dtype.

    ``weight (H,)`` and ``eps`` of the norm; ``weight_offset`` 0 for the Llama / Mistral / Qwen / Phi-3 norm
    (``weight * normed.to(dtype)``), 1 for Gemma's (``normed * (1 + weight)`` in float32). ``out``: optional
    preallocated ``(T, H)`` output; ``validate`` as in :func:`steer_add`."""
    backend = _backend_arg(backend)
    if slot_modes is None and isinstance(vectors, torch.Tensor):
        slot_modes = torch.zeros(vectors.shape[0], dtype=torch.int32, device=vectors.device)
    ts, sc, md = _validate(h, vectors, token_slots, token_scales, slot_modes, values=validate)
    _check_tensor("weight", weight, dim=1, dtypes=FLOATS, device=h.device)
    if weight.shape[0] != h.shape[1]:
        _fail("weight", f"has {weight.shape[0]} entries but h has hidden size {h.shape[1]}")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        _fail("eps", f"must be a non-negative float, got {eps!r}")
    if weight_offset not in (0.0, 1.0):
        _fail("weight_offset", f"must be 0.0 (Llama-style norm) or 1.0 (Gemma-style), got {weight_offset!r}")
    if out is None:
        out = torch.empty_like(h, memory_format=torch.contiguous_format)
    else:
        _check_tensor("out", out, dim=2, dtypes=(h.dtype,), device=h.device)
        if out.shape != h.shape:
            _fail("out", f"expected shape {tuple(h.shape)}, got {tuple(out.shape)}")
    _dispatch(_steer_rmsnorm_op, _steer_rmsnorm_impl, out, h, weight, float(eps), vectors, ts, sc, md,
              float(weight_offset), backend)
    return out
