"""CUDA launchers of the per-token steering ops (kernels: ``csrc/include/pllm/steer.cuh``).

Same arguments and semantics as the Triton launchers in :mod:`pllm_kernels.triton.steer` (the spec is
:mod:`pllm_kernels.reference.steer`): ``h (T, H)`` steered in place, ``vectors (L, H)``, ``token_slots (T, K)``
(``-1`` = none, applied in order k = 0..K-1), ``token_scales (T, K)``, ``slot_modes (L,)`` (add 0, ablate 1,
ablate_add 2, norm_preserve 3); ``steer_rmsnorm`` also writes the Llama- (``weight_offset`` 0) or Gemma-style (1)
RMSNorm of the steered rows into ``out (T, H)``.

One block per token row (Liger-Kernel's RMSNorm layout), the row in registers as fp32 (``hidden <= 16384``), vector
and weight chunks streamed; 16-byte loads and stores where every row is 16-byte aligned and ``H`` is a multiple of
``16 / itemsize`` (else scalar accesses with the same element layout: same bits). Dot products and norms use a fixed
reduction order (per-thread FMA chains, the warp's xor butterfly, warps left to right): a token's result depends on
its own row only, never on the batch. Rows whose slots are all ``-1`` are not written (bit for bit untouched), and a
vector no token uses is never read. fp16 / bf16 / fp32 activations with fp32 arithmetic; vectors and the norm weight
may be float32 or ``h``'s dtype (other dtypes are converted to float32 here, which is what the spec computes in).

This module only converts arguments: tensors become data pointers and element strides (copies only for layouts the
kernels do not take), and the current CUDA stream is passed, so launches are stream-ordered and CUDA-graph capturable.
``_emulate=True`` (tests) runs the very same kernels on CPU tensors through the extension's CPU emulator.
"""

from __future__ import annotations

import torch

from pllm_kernels.cuda._common import DTYPE_CODES, device_of, extension, launch
from pllm_kernels.cuda.lora import supports as _device_supports

__all__ = ["MAX_HIDDEN", "steer_add_cuda", "steer_rmsnorm_cuda", "supports", "variant"]

MAX_HIDDEN = 16384  # csrc/include/pllm/steer.cuh steer::kMaxHidden (checked against the extension by the tests)
_DTYPES = DTYPE_CODES


def supports(device, dtype) -> str | None:
    """``None`` when the CUDA steering kernels can run on ``h`` of ``device`` / ``dtype``, else the reason why not
    (a CUDA device, the extension built for its architecture, float32 / float16 / bfloat16)."""
    return _device_supports(device, dtype)


def _C():
    return extension("steer_add", "steering")


def _device_of(tensors, op: str, emulate: bool) -> torch.device:
    return device_of(tensors, f"{op}_cuda", emulate, None if emulate else _C())


def _dtype_code(dtype: torch.dtype, op: str) -> int:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise RuntimeError(f"{op}_cuda: the CUDA steering kernels take float32 / float16 / bfloat16 activations, "
                           f"got {dtype}") from None


def _side(t: torch.Tensor, act: torch.dtype) -> torch.Tensor:
    """vectors / weight as the kernels take them: float32 or the activations' dtype, unit innermost stride, no
    negative strides (float64 / other 16-bit dtypes become float32: exact for 16-bit, the spec's fp32 for float64)."""
    if t.dtype not in (torch.float32, act):
        t = t.to(torch.float32)
    if (t.shape[-1] > 1 and t.stride(-1) != 1) or any(s < 0 for s in t.stride()):
        t = t.contiguous()
    return t


def _rows_target(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when the kernels can update it in place (unit column stride), else a contiguous working copy."""
    if (t.shape[1] <= 1 or t.stride(1) == 1) and t.stride(0) >= 0:
        return t
    return t.contiguous()


def _routing(token_slots, token_scales, T: int, op: str):
    slots = token_slots[:, None] if token_slots.dim() == 1 else token_slots
    scales = token_scales[:, None] if token_scales.dim() == 1 else token_scales
    if slots.dim() != 2 or slots.shape[0] != T or slots.shape[1] < 1 or tuple(scales.shape) != tuple(slots.shape):
        raise RuntimeError(f"{op}_cuda: token_slots / token_scales must be (T={T}, K), got {tuple(slots.shape)} and "
                           f"{tuple(scales.shape)}")
    if slots.dtype != torch.int32 or not slots.is_contiguous():
        i32 = torch.iinfo(torch.int32)
        slots = slots.clamp(i32.min, i32.max).to(torch.int32).contiguous()  # out-of-range ids stay out of range
    if scales.dtype != torch.float32 or not scales.is_contiguous():
        scales = scales.to(torch.float32).contiguous()
    return slots, scales


def _modes(slot_modes, L: int, op: str) -> torch.Tensor:
    if slot_modes.dim() != 1 or slot_modes.shape[0] != L:
        raise RuntimeError(f"{op}_cuda: slot_modes must be (L={L},), got {tuple(slot_modes.shape)}")
    return slot_modes if slot_modes.dtype == torch.int32 and slot_modes.is_contiguous() else \
        slot_modes.to(torch.int32).contiguous()


def _check(h, vectors, op: str):
    if h.dim() != 2 or vectors.dim() != 2 or vectors.shape[1] != h.shape[1]:
        raise RuntimeError(f"{op}_cuda: h must be (T, H) and vectors (L, H), got {tuple(h.shape)} and "
                           f"{tuple(vectors.shape)}")
    if vectors.shape[0] < 1:
        raise RuntimeError(f"{op}_cuda: vectors needs at least one slot")
    if h.shape[1] > MAX_HIDDEN:
        raise RuntimeError(f"{op}_cuda: hidden={h.shape[1]} exceeds the CUDA steering kernels' {MAX_HIDDEN}")


def _run(name: str, args: list, device: torch.device, emulate: bool) -> None:
    launch(_C(), name, args, device, emulate)


# ------------------------------------------------------------------------------------------------ launchers
def steer_add_cuda(h, vectors, token_slots, token_scales, slot_modes, *, _emulate=False) -> None:
    """Steer ``h (T, H)`` in place (see the module docstring and :func:`pllm_kernels.ops.steer_add`)."""
    op = "steer_add"
    device = _device_of([h, vectors, token_slots, token_scales, slot_modes], op, _emulate)
    dtype = _dtype_code(h.dtype, op)
    _check(h, vectors, op)
    T, H = h.shape
    if T == 0 or H == 0:
        return
    vectors = _side(vectors, h.dtype)
    L = vectors.shape[0]
    slots, scales = _routing(token_slots, token_scales, T, op)
    modes = _modes(slot_modes, L, op)
    target = _rows_target(h)
    args = [target.data_ptr(), vectors.data_ptr(), modes.data_ptr(), slots.data_ptr(), scales.data_ptr(),
            T, H, L, slots.shape[1], target.stride(0), vectors.stride(0), dtype, _DTYPES[vectors.dtype]]
    _run(op, args, device, _emulate)
    if target is not h:
        h.copy_(target)


def steer_rmsnorm_cuda(out, h, weight, eps, vectors, token_slots, token_scales, slot_modes, weight_offset, *,
                       _emulate=False) -> None:
    """Steer ``h`` in place and write ``RMSNorm(h)`` into ``out (T, H)`` (see
    :func:`pllm_kernels.ops.steer_rmsnorm`); ``weight_offset`` 0 (Llama-style) or 1 (Gemma-style)."""
    op = "steer_rmsnorm"
    device = _device_of([out, h, weight, vectors, token_slots, token_scales, slot_modes], op, _emulate)
    dtype = _dtype_code(h.dtype, op)
    _check(h, vectors, op)
    T, H = h.shape
    if out.dtype != h.dtype or tuple(out.shape) != (T, H) or out.dim() != 2:
        raise RuntimeError(f"{op}_cuda: out must be a {h.dtype} tensor of shape {(T, H)}, got {out.dtype} "
                           f"{tuple(out.shape)}")
    if weight.dim() != 1 or weight.shape[0] != H:
        raise RuntimeError(f"{op}_cuda: weight must be (H={H},), got {tuple(weight.shape)}")
    if float(weight_offset) not in (0.0, 1.0):
        raise RuntimeError(f"{op}_cuda: weight_offset must be 0.0 (Llama-style) or 1.0 (Gemma-style), "
                           f"got {weight_offset!r}")
    if T == 0 or H == 0:
        return
    vectors, weight = _side(vectors, h.dtype), _side(weight, h.dtype)
    L = vectors.shape[0]
    slots, scales = _routing(token_slots, token_scales, T, op)
    modes = _modes(slot_modes, L, op)
    target, out_t = _rows_target(h), _rows_target(out)
    args = [out_t.data_ptr(), target.data_ptr(), weight.data_ptr(), vectors.data_ptr(), modes.data_ptr(),
            slots.data_ptr(), scales.data_ptr(), T, H, L, slots.shape[1], target.stride(0), vectors.stride(0),
            out_t.stride(0), float(eps), float(weight_offset), dtype, _DTYPES[vectors.dtype], _DTYPES[weight.dtype]]
    _run(op, args, device, _emulate)
    if target is not h:
        h.copy_(target)
    if out_t is not out:
        out.copy_(out_t)


def variant(h, vectors, out=None, weight=None) -> str:
    """Name of the kernel variant (dtypes; ``vec16`` or ``scalar`` accesses) a launch with these tensors runs (after
    the conversions the launchers make). For tests and benchmarks."""
    vectors = _side(vectors, h.dtype)
    norm = out is not None
    if norm:
        weight = _side(weight, h.dtype)
    target = _rows_target(h)
    out_t = _rows_target(out) if norm else target
    return _C().steer_variant(target.data_ptr(), out_t.data_ptr(), weight.data_ptr() if norm else 0,
                              vectors.data_ptr(), h.shape[1], target.stride(0), vectors.stride(0), out_t.stride(0),
                              _DTYPES[h.dtype], _DTYPES[vectors.dtype], _DTYPES[weight.dtype] if norm else 0, norm)
