"""CUDA launchers of the batched multi-LoRA ops (kernels: ``csrc/include/pllm/lora.cuh``).

Same arguments and semantics as the Triton launchers in :mod:`pllm_kernels.triton.lora` (the spec is
:mod:`pllm_kernels.reference.lora`): ``x (T, h_in)``, ``lora_a (L, S, R, h_in)``, ``lora_b (L, N_total, R)``,
``v (S, K*T, R)`` float32 with pair row ``p = k*T + t``, ``y (T, N_total)``; slot ``-1`` (or ``>= L``) = no adapter.

Kernels (Punica SGMV/BGMV, vLLM/S-LoRA routing, all fp32 accumulation, no float atomics):

* BGMV (gather, decode): one block per (token-slot pair, group of outputs) for shrink, per (token, 128 columns) for
  expand; K slots of a token summed in registers; y read-modify-written once.
* SGMV (segmented, prefill): one block per (chunk of one slot, tile), token rows gathered through ``sorted_pairs``;
  x / A and v / B tiles staged in shared memory by a cp.async double buffer.
* fused (decode, ``lora_apply`` only): shrink and expand in one kernel, v kept in shared memory.

Every path evaluates the same fixed-order fp32 arithmetic (``csrc/include/pllm/lora_tiling.h``): results are bitwise
identical across paths and batch sizes (a token's delta is the same alone, in a batch of 64 or of 300). Rows with no
routed slot are never written. fp16 / bf16 / fp32; 16-byte vector loads where pointers and strides allow (else scalar).
The price of that guarantee: no tensor cores by default (CUDA-core FMAs everywhere), so large prefill shrinks are
slower than the Triton SGMV kernel's ``tl.dot``; decode sizes are bandwidth-bound and unaffected.

Tensor cores, opt-in: ``path="sgmv_tc"`` (or ``PLLM_CUDA_TENSOR_CORES=1`` / :func:`set_tensor_cores`, which turns
``auto``'s SGMV choice into it) runs the SGMV shrink of fp16 / bf16 on ``mma.m16n8k16`` (fp32 accumulation, the
same routing, staging and zero-fill; expand and float32 stay on the FMA kernels). A token's result is then still
independent of its batch among SGMV calls, but differs within rounding from the BGMV / fused (decode) kernels.

This module only converts arguments: tensors become data pointers and element strides (copies are made only for
layouts the kernels do not take: non-unit innermost strides, non-int32 routing), the current CUDA stream is passed, so
launches are stream-ordered and CUDA-graph capturable. ``_emulate=True`` (tests) runs the very same kernels on CPU
tensors through the extension's CPU emulator.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

from pllm_kernels import _ext
from pllm_kernels.cuda._common import DTYPE_CODES, device_of, extension, launch

__all__ = ["PATHS", "choose_path", "lora_apply_cuda", "lora_expand_cuda", "lora_shrink_cuda", "set_tensor_cores",
           "supports", "tensor_cores"]

PATHS = {"auto": 0, "sgmv": 1, "bgmv": 2, "fused": 3, "sgmv_tc": 4}
_PATH_NAMES = {v: k for k, v in PATHS.items()}
_OPS = {"shrink": 0, "expand": 1, "apply": 2}
_DTYPES = DTYPE_CODES
EMU_NUM_SMS = 132  # SM count the emulator plans for (launch choices only, never results)
MAX_SLICED_OUTPUTS = 8  # lora::kMaxSlicesPerLaunch: per-slice outputs of one lora_apply launch
_HALF = (torch.float16, torch.bfloat16)
_TENSOR_CORES = [os.environ.get("PLLM_CUDA_TENSOR_CORES", "0").strip().lower() in ("1", "true", "yes", "on")]


def tensor_cores() -> bool:
    """Whether ``auto`` runs fp16 / bf16 SGMV shrinks on tensor cores (``PLLM_CUDA_TENSOR_CORES=1``, or
    :func:`set_tensor_cores`); off by default: results then stay bitwise identical across paths and batch sizes."""
    return _TENSOR_CORES[0]


def set_tensor_cores(enabled: bool) -> bool:
    """Turn the tensor-core SGMV shrink on / off for ``auto`` (process-wide); returns the previous setting."""
    prev = _TENSOR_CORES[0]
    _TENSOR_CORES[0] = bool(enabled)
    return prev


def _auto_tc(path: str, op: str, T: int, K: int, S: int, R: int, H: int, dtype: torch.dtype) -> str:
    """``path``, or ``sgmv_tc`` where ``auto`` resolves to SGMV and tensor cores are on (fp16 / bf16)."""
    if path != "auto" or not _TENSOR_CORES[0] or dtype not in _HALF:
        return path
    return "sgmv_tc" if choose_path("auto", op, T, K, S, R, H, dtype) == "sgmv" else path


# ------------------------------------------------------------------------------------------------ capability
@functools.lru_cache(maxsize=64)
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


@functools.lru_cache(maxsize=64)
def _arch_ok(cap: int) -> bool:
    return _ext.arch_supported(cap)


def supports(device, dtype) -> str | None:
    """``None`` when the CUDA kernels can run on tensors of ``device`` / ``dtype``, else the reason why not.

    Needs: a CUDA device, the extension built with code for its architecture, and float32 / float16 / bfloat16
    (float64 is the reference's precision and runs in torch)."""
    device = torch.device(device)
    if dtype not in _DTYPES:
        return f"dtype {dtype} is not supported by the CUDA kernels (float32, float16, bfloat16)"
    if device.type != "cuda":
        return f"the CUDA kernels need CUDA tensors, got device {device}"
    if not _ext.cuda_ext_usable():
        return str(_ext.capabilities().get("reason") or "the CUDA extension is not usable")
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _capability(index)
    if not _arch_ok(cap):
        return f"the CUDA extension has no code for sm_{cap} (built for {_ext.ext().compiled_archs()})"
    return None


def choose_path(path: str, op: str, num_tokens: int, k: int, num_slices: int, max_rank: int, h_in: int,
                dtype: torch.dtype) -> str:
    """The path (``sgmv`` / ``bgmv`` / ``fused``) a call resolves to, from the extension's own rule
    (``lora::choose_path``: the thresholds of :func:`pllm_kernels.triton.lora.choose_path`)."""
    code = _C().lora_choose_path(_path_code(path), _OPS[op], int(num_tokens), int(k), int(num_slices), int(max_rank),
                                 int(h_in), _dtype_code(dtype))
    return _PATH_NAMES[code]


# ------------------------------------------------------------------------------------------------ argument plumbing
def _C():
    return extension()


def _path_code(path: str) -> int:
    try:
        return PATHS[path]
    except KeyError:
        raise ValueError(f"path must be one of {list(PATHS)}, got {path!r}") from None


def _dtype_code(dtype: torch.dtype) -> int:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise RuntimeError(f"the CUDA lora kernels take float32 / float16 / bfloat16, got {dtype}") from None


def _device_of(tensors: Sequence[torch.Tensor], op: str, emulate: bool) -> torch.device:
    return device_of(tensors, f"lora_{op}_cuda", emulate)


def _inner_unit(t: torch.Tensor) -> torch.Tensor:
    """``t`` if its innermost stride is 1 (or irrelevant) and no stride is negative, else a contiguous copy."""
    if (t.shape[-1] <= 1 or t.stride(-1) == 1) and all(s >= 0 for s in t.stride()):
        return t
    return t.contiguous()


def _i32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


def _slots2d(token_slots: torch.Tensor) -> torch.Tensor:
    return _i32(token_slots[:, None] if token_slots.dim() == 1 else token_slots)


def _check_act(name: str, t: torch.Tensor, dtype: torch.dtype, dim: int, op: str):
    if t.dim() != dim:
        raise RuntimeError(f"lora_{op}_cuda: {name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise RuntimeError(f"lora_{op}_cuda: {name} has dtype {t.dtype}, expected {dtype}")


def _run(op: str, args: list, device: torch.device, emulate: bool) -> None:
    launch(_C(), f"lora_{op}", args, device, emulate, (EMU_NUM_SMS,))


def _rmw_target(y: torch.Tensor) -> torch.Tensor:
    """y itself if the kernels can update it in place (unit column stride), else a contiguous working copy."""
    if (y.shape[1] <= 1 or y.stride(1) == 1) and y.stride(0) >= 0:
        return y
    return y.contiguous()


# ------------------------------------------------------------------------------------------------ launchers
def lora_shrink_cuda(x, lora_a, slot_ranks, token_slots, sorted_pairs, seg_slot, seg_start, seg_len, out, *, chunk,
                     path="auto", _emulate=False) -> None:
    """``out[s, k*T+t, :r] = x[t] @ lora_a[slot, s, :r].T`` (fp32), zeros elsewhere (Punica/vLLM shrink).

    x ``(T, h_in)`` any row stride; lora_a ``(L, S, R, h_in)``; slot_ranks ``(L,)``; token_slots ``(T, K)``;
    sorted_pairs ``(K*T,)``; seg_* ``(K, G)``; out ``(S, K*T, R)`` float32 contiguous, fully overwritten.
    ``path``: auto | sgmv | bgmv | sgmv_tc (auto: BGMV for ``T*K <= 64``, else SGMV, on tensor cores when
    :func:`tensor_cores` is on)."""
    device = _device_of([x, lora_a, slot_ranks, token_slots, sorted_pairs, seg_slot, seg_start, seg_len, out],
                        "shrink", _emulate)
    dtype_code = _dtype_code(x.dtype)
    _check_act("x", x, x.dtype, 2, "shrink")
    _check_act("lora_a", lora_a, x.dtype, 4, "shrink")
    T, H = x.shape
    L, S, R, H_a = lora_a.shape
    token_slots = _slots2d(token_slots)
    K = token_slots.shape[1]
    if H_a != H or token_slots.shape[0] != T:
        raise RuntimeError(f"lora_shrink_cuda: shapes disagree: x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)}, "
                           f"token_slots {tuple(token_slots.shape)}")
    if out.dtype != torch.float32 or not out.is_contiguous() or tuple(out.shape) != (S, K * T, R):
        raise RuntimeError(f"lora_shrink_cuda: out must be a contiguous float32 tensor of shape {(S, K * T, R)}, "
                           f"got {out.dtype} {tuple(out.shape)}")
    x, lora_a = _inner_unit(x), _inner_unit(lora_a)
    ranks, pairs = _i32(slot_ranks), _i32(sorted_pairs)
    seg_slot, seg_start, seg_len = _i32(seg_slot), _i32(seg_start), _i32(seg_len)
    G = seg_slot.shape[1] if seg_slot.dim() == 2 else 0
    args = [x.data_ptr(), lora_a.data_ptr(), ranks.data_ptr(), token_slots.data_ptr(), pairs.data_ptr(),
            seg_slot.data_ptr(), seg_start.data_ptr(), seg_len.data_ptr(), out.data_ptr(),
            T, H, L, S, R, K, G, int(chunk), x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
            dtype_code, _path_code(_auto_tc(path, "shrink", T, K, S, R, H, x.dtype))]
    _run("shrink", args, device, _emulate)


def lora_expand_cuda(y, v, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot,
                     seg_start, seg_len, slice_sizes, *, chunk, path="auto", _emulate=False) -> None:
    """``y[t, off_s:off_s+n_s] += sum_k w[t,k] * scale[slot] * v[s, k*T+t, :r] @ lora_b[slot, off_s:.., :r].T``.

    y ``(T, sum(slice_sizes))`` in place, any row stride; v ``(S, K*T, R)`` float32; lora_b ``(L, N_total, R)``;
    slot_scales ``(L,)`` float32; token_weights ``(T, K)`` float32; slice_sizes: ints (may differ, GQA; any count).
    Each token's K slots are summed in fp32 and y is updated once (no atomics)."""
    device = _device_of([y, v, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot,
                         seg_start, seg_len], "expand", _emulate)
    dtype_code = _dtype_code(y.dtype)
    _check_act("y", y, y.dtype, 2, "expand")
    _check_act("lora_b", lora_b, y.dtype, 3, "expand")
    if v.dim() != 3:
        raise RuntimeError(f"lora_expand_cuda: v must be (S, K*T, R), got shape {tuple(v.shape)}")
    T, N = y.shape
    L, N_b, R = lora_b.shape
    S = v.shape[0]
    token_slots = _slots2d(token_slots)
    K = token_slots.shape[1]
    sizes = [int(n) for n in slice_sizes]
    if N_b != N or sum(sizes) != N or len(sizes) != S or tuple(v.shape) != (S, K * T, R) or token_slots.shape[0] != T:
        raise RuntimeError(f"lora_expand_cuda: shapes disagree: y {tuple(y.shape)}, v {tuple(v.shape)}, lora_b "
                           f"{tuple(lora_b.shape)}, slice_sizes {sizes}, token_slots {tuple(token_slots.shape)}")
    v, lora_b = _f32(v), _inner_unit(lora_b)
    weights = _f32(token_weights[:, None] if token_weights.dim() == 1 else token_weights)
    ranks, scales, pairs = _i32(slot_ranks), _f32(slot_scales), _i32(sorted_pairs)
    seg_slot, seg_start, seg_len = _i32(seg_slot), _i32(seg_start), _i32(seg_len)
    G = seg_slot.shape[1] if seg_slot.dim() == 2 else 0
    target = _rmw_target(y)
    args = [target.data_ptr(), v.data_ptr(), lora_b.data_ptr(), ranks.data_ptr(), scales.data_ptr(),
            token_slots.data_ptr(), weights.data_ptr(), pairs.data_ptr(), seg_slot.data_ptr(), seg_start.data_ptr(),
            seg_len.data_ptr(), T, L, R, K, G, int(chunk), sizes, target.stride(0), lora_b.stride(0),
            lora_b.stride(1), dtype_code, _path_code(path)]
    _run("expand", args, device, _emulate)
    if target is not y:
        y.copy_(target)


def lora_apply_cuda(y, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs,
                    seg_slot, seg_start, seg_len, slice_sizes, *, chunk, path="auto", _emulate=False) -> None:
    """``y += sum_k w * scale * (x @ A.T) @ B.T`` per token and slice (shrink + expand, one update of y).

    ``y``: ``(T, sum(slice_sizes))``, or a tuple / list of one output per slice (``(T, slice_sizes[s])`` each, any
    row stride, at most 8 slices): slice ``s``'s columns go straight into ``y[s]`` (the q / k / v outputs of a
    grouped projection), same kernels and bits.
    ``path="fused"`` (auto for ``T*K <= 8`` with a small A): one kernel, v in shared memory. Otherwise shrink into
    an fp32 ``(S, K*T, R)`` scratch and expand, both on the BGMV (``T*K <= 64``) or SGMV path. Same results on
    every path, bit for bit (``sgmv_tc``: see the module docstring)."""
    sliced = isinstance(y, (list, tuple))
    ys = list(y) if sliced else [y]
    device = _device_of([*ys, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs,
                         seg_slot, seg_start, seg_len], "apply", _emulate)
    dtype_code = _dtype_code(x.dtype)
    _check_act("x", x, x.dtype, 2, "apply")
    for i, t in enumerate(ys):
        _check_act(f"y[{i}]" if sliced else "y", t, x.dtype, 2, "apply")
    _check_act("lora_a", lora_a, x.dtype, 4, "apply")
    _check_act("lora_b", lora_b, x.dtype, 3, "apply")
    T, H = x.shape
    L, S, R, H_a = lora_a.shape
    token_slots = _slots2d(token_slots)
    K = token_slots.shape[1]
    sizes = [int(n) for n in slice_sizes]
    N = sum(sizes)
    if sliced:
        if len(ys) != S or len(ys) > MAX_SLICED_OUTPUTS or [t.shape for t in ys] != [(T, n) for n in sizes]:
            raise RuntimeError(f"lora_apply_cuda: per-slice outputs must be {min(S, MAX_SLICED_OUTPUTS)} or fewer "
                               f"tensors of shapes {[(T, n) for n in sizes]}, got {[tuple(t.shape) for t in ys]}")
    elif y.shape[1] != N:
        raise RuntimeError(f"lora_apply_cuda: y has {y.shape[1]} columns but slice_sizes sum to {N}")
    if (H_a != H or ys[0].shape[0] != T or tuple(lora_b.shape) != (L, N, R) or len(sizes) != S
            or token_slots.shape[0] != T):
        raise RuntimeError(f"lora_apply_cuda: shapes disagree: y {[tuple(t.shape) for t in ys]}, x {tuple(x.shape)}, "
                           f"lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}, slice_sizes {sizes}, "
                           f"token_slots {tuple(token_slots.shape)}")
    if T == 0 or R == 0:
        return
    x, lora_a, lora_b = _inner_unit(x), _inner_unit(lora_a), _inner_unit(lora_b)
    weights = _f32(token_weights[:, None] if token_weights.dim() == 1 else token_weights)
    ranks, scales, pairs = _i32(slot_ranks), _f32(slot_scales), _i32(sorted_pairs)
    seg_slot, seg_start, seg_len = _i32(seg_slot), _i32(seg_start), _i32(seg_len)
    G = seg_slot.shape[1] if seg_slot.dim() == 2 else 0
    path = _auto_tc(path, "apply", T, K, S, R, H, x.dtype)
    resolved = _C().lora_choose_path(_path_code(path), _OPS["apply"], T, K, S, R, H, dtype_code)
    scratch = None
    if resolved != PATHS["fused"]:
        scratch = torch.empty((S, K * T, R), dtype=torch.float32, device=device)
    targets = [_rmw_target(t) for t in ys]
    common = [x.data_ptr(), lora_a.data_ptr(), lora_b.data_ptr(), ranks.data_ptr(), scales.data_ptr(),
              token_slots.data_ptr(), weights.data_ptr(), pairs.data_ptr(), seg_slot.data_ptr(), seg_start.data_ptr(),
              seg_len.data_ptr(), 0 if scratch is None else scratch.data_ptr(), T, H, L, S, R, K, G, int(chunk), sizes,
              x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2)]
    if sliced:
        args = [[t.data_ptr() for t in targets], [t.stride(0) for t in targets], *common, lora_b.stride(0),
                lora_b.stride(1), dtype_code, resolved]
        _run("apply_sliced", args, device, _emulate)
    else:
        args = [targets[0].data_ptr(), *common, targets[0].stride(0), lora_b.stride(0), lora_b.stride(1), dtype_code,
                resolved]
        _run("apply", args, device, _emulate)
    for t, target in zip(ys, targets):
        if target is not t:
            t.copy_(target)


lora_apply_cuda.sliced_outputs = True  # the op layer passes per-slice outputs straight through (<= 8 slices)
