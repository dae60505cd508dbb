"""Triton kernels for per-token activation steering, plain and fused with the next RMSNorm.

Semantics: :mod:`pllm_kernels.reference.steer`. One program per token row: the row (``hidden`` <= 16384) lives in
registers, the K entries are applied in order (each needs the whole row for its dot product / norm), the row is
written once, and, in the fused variant, normalised in the same pass (Liger-Kernel's one-row-per-program RMSNorm
layout), so steering a layer costs no extra pass over the activations. Vector loads of slot ``-1`` are masked off
(never read), and rows without an entry are not stored (bit-for-bit untouched).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["MAX_HIDDEN", "STEER_CONFIGS", "aot_variants", "steer_add_triton", "steer_rmsnorm_triton", "steer_blocks"]

MAX_HIDDEN = 16384
# BLOCK_H (next power of two of hidden) -> warps: <= 16 fp32 values per thread.
STEER_CONFIGS = {1024: 2, 2048: 4, 4096: 8, 8192: 16, 16384: 16}
_ABLATE = tl.constexpr(1)
_ABLATE_ADD = tl.constexpr(2)
_NORM_PRESERVE = tl.constexpr(3)


@triton.jit
def _steer_kernel(
    h_ptr, out_ptr, w_ptr, vec_ptr, modes_ptr, slots_ptr, scales_ptr,
    H, L, eps, w_off,
    sht, svl, sst, ssk, sct, sck, sot,
    K: tl.constexpr, BLOCK_H: tl.constexpr, NORM: tl.constexpr, GEMMA: tl.constexpr,
):
    """Grid ``(T,)``. Steers row ``t`` of ``h`` in place; with ``NORM`` also writes its RMSNorm to ``out``."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    m = offs < H
    h_row = h_ptr + t * sht + offs
    raw = tl.load(h_row, mask=m, other=0.0)
    x = raw.to(tl.float32)
    touched = 0
    for k in tl.static_range(K):
        slot = tl.load(slots_ptr + t * sst + k * ssk)
        ok = (slot >= 0) & (slot < L)
        slot_c = tl.where(ok, slot, 0).to(tl.int64)
        s = tl.load(scales_ptr + t * sct + k * sck)
        mode = tl.load(modes_ptr + slot_c)
        v = tl.load(vec_ptr + slot_c * svl + offs, mask=offs < tl.where(ok, H, 0), other=0.0).to(tl.float32)
        nv = tl.sqrt(tl.sum(v * v, axis=0))
        u = v / tl.where(nv > 0, nv, 1.0)
        abl = (mode == _ABLATE) | (mode == _ABLATE_ADD)
        proj = tl.sum(x * u, axis=0)
        y = x - tl.where(abl, proj, 0.0) * u
        y = y + tl.where(mode == _ABLATE, 0.0, s) * v
        ny = tl.sqrt(tl.sum(y * y, axis=0))
        nx = tl.sqrt(tl.sum(x * x, axis=0))
        keep = (mode == _NORM_PRESERVE) & (ny > 0)
        y = y * tl.where(keep, nx / tl.where(ny > 0, ny, 1.0), 1.0)
        x = tl.where(ok, y, x)
        touched += ok.to(tl.int32)
    if touched > 0:
        rounded = x.to(raw.dtype)
        tl.store(h_row, rounded, mask=m)
        x = rounded.to(tl.float32)  # the norm reads the steered state as stored
    if NORM:
        var = tl.sum(x * x, axis=0) / H
        n = x * tl.rsqrt(var + eps)
        w = tl.load(w_ptr + offs, mask=m, other=0.0)
        if GEMMA:
            o = n * (w_off + w.to(tl.float32))
        else:
            o = w.to(tl.float32) * n.to(raw.dtype).to(tl.float32)
        tl.store(out_ptr + t * sot + offs, o.to(raw.dtype), mask=m)


def steer_blocks(hidden: int) -> dict:
    """Launch constants for a row of ``hidden`` features: ``BLOCK_H`` and ``num_warps``."""
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden={hidden} exceeds the Triton steering kernels' {MAX_HIDDEN}")
    block = max(1024, triton.next_power_of_2(hidden))
    return {"BLOCK_H": block, "num_warps": STEER_CONFIGS[block]}


def _launch(h, out, weight, eps, w_off, vectors, token_slots, token_scales, slot_modes, norm, gemma):
    T, H = h.shape
    if T == 0:
        return
    K = token_slots.shape[1]
    cfg = steer_blocks(H)
    w = weight if weight is not None else h  # dummy pointer when not normalising
    o = out if out is not None else h
    _steer_kernel[(T,)](
        h, o, w, vectors, slot_modes, token_slots, token_scales,
        H, vectors.shape[0], float(eps), float(w_off),
        h.stride(0), vectors.stride(0), token_slots.stride(0), token_slots.stride(1), token_scales.stride(0),
        token_scales.stride(1), o.stride(0),
        K=K, BLOCK_H=cfg["BLOCK_H"], NORM=norm, GEMMA=gemma, num_warps=cfg["num_warps"],
    )


def steer_add_triton(h, vectors, token_slots, token_scales, slot_modes) -> None:
    """Steer ``h (T, H)`` in place (rows: unit inner stride). See :func:`pllm_kernels.ops.steer_add`."""
    _launch(h, None, None, 0.0, 0.0, vectors, token_slots, token_scales, slot_modes, False, False)


def steer_rmsnorm_triton(out, h, weight, eps, vectors, token_slots, token_scales, slot_modes, weight_offset) -> None:
    """Steer ``h`` in place and write ``RMSNorm(h)`` into ``out``. See :func:`pllm_kernels.ops.steer_rmsnorm`."""
    _launch(h, out, weight, eps, weight_offset, vectors, token_slots, token_scales, slot_modes, True,
            weight_offset != 0.0)


def aot_variants(act_dtype: str = "bf16"):
    """``(name, kernel, signature, constexprs, attrs, options)`` of every production variant (AOT compile test)."""
    for block, warps in STEER_CONFIGS.items():
        for norm, gemma in ((False, False), (True, False), (True, True)):
            for k in (1, 2):
                cx = {"K": k, "BLOCK_H": block, "NORM": norm, "GEMMA": gemma}
                sig, attrs = {}, {}
                for i, arg in enumerate(_steer_kernel.arg_names):
                    if arg in cx:
                        sig[arg] = "constexpr"
                    elif arg.endswith("_ptr"):
                        sig[arg] = {"h_ptr": "*" + act_dtype, "out_ptr": "*" + act_dtype, "w_ptr": "*" + act_dtype,
                                    "vec_ptr": "*fp32", "modes_ptr": "*i32", "slots_ptr": "*i32",
                                    "scales_ptr": "*fp32"}[arg]
                        attrs[(i,)] = [["tt.divisibility", 16]]
                    elif arg in ("eps", "w_off"):
                        sig[arg] = "fp32"
                    else:
                        sig[arg] = "i32"
                        if arg in ("H", "sht", "svl", "sot"):
                            attrs[(i,)] = [["tt.divisibility", 16]]
                name = f"steer_h{block}_k{k}" + ("_rmsnorm_gemma" if gemma else "_rmsnorm" if norm else "")
                yield name, _steer_kernel, sig, cx, attrs, {"num_warps": warps}
