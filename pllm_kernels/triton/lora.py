"""Triton kernels for batched multi-LoRA: shrink, expand and fused shrink+expand.

Semantics: :mod:`pllm_kernels.reference.lora` (the spec). Routing metadata: :class:`pllm_kernels.ops.meta.LoRAMeta`.
Shapes: ``x (T, h_in)``, ``lora_a (L, S, R, h_in)``, ``lora_b (L, N_total, R)``, ``v (S, K*T, R)`` float32 with
pair row ``p = k*T + t``, ``y (T, N_total)`` with slice ``s`` owning columns ``off_s : off_s + slice_sizes[s]``.

Kernels (all accumulate in fp32; stacked weights + index arithmetic, no pointer tables):

* ``_lora_shrink_sgmv_kernel``  segmented (SGMV, Punica; chunked like SGLang csgmv): one program per
  (chunk of one slot, N tile, K split). x rows are gathered through ``sorted_pairs`` (``t = p - k*T``), never
  permuted. **Multi-slice**: the combined output index ``n in [0, rank*S)`` is ``(slice n % S, rank row n // S)``
  so one N tile covers all S slices and the x tile is read once for all of them (vLLM re-reads x per slice).
  N tiles at or beyond ``rank*S`` exit at once, so a rank-8 slot of an R=64 buffer does 1/8 of the work and
  bytes (vLLM pads to max rank). **Split-K** when the grid would not fill the GPU (SGLang #26962, Punica),
  sized from the grid and the SM count (:func:`split_k_for`): relaxed fp32 ``atomic_add`` into the zeroed
  output (``sem="relaxed"``: no GPU-scope fence around each add), or, inside ``lora_apply`` on the BGMV path,
  one partial per split that the expand sums.
* ``_lora_shrink_bgmv_kernel``  gather (BGMV, Punica/vLLM V1 token-level): one program per (pair, N tile,
  K split), slot looked up per token, no sorting. CUDA-core FMA + reduction: M = 1 cannot use tensor cores.
* ``_lora_expand_sgmv_kernel``  segmented expand (SGMV): one program per (chunk, N tile) of one k column,
  launched once per k column: the chunks of one column never touch a token twice, so the read-modify-write of
  ``y`` is race-free without atomics. The rank loop stops at the slot's rank. The fp32 v is split into
  ``hi + lo`` in the weights' dtype and both go through ``tl.dot`` (two fp16/bf16 tensor-core MMAs, fp32
  accumulation), so v keeps ~fp32 precision and a token's delta matches the BGMV / fused paths (which keep v in
  fp32) whatever path its batch takes; fp32 weights keep fp32 v with ``input_precision="ieee"``.
* ``_lora_expand_bgmv_kernel``  gather expand for decode: one program per (token, N tile), the token's K slots
  summed in registers (one deterministic read-modify-write of y), v kept in fp32. Inside ``lora_apply`` it reads
  the BGMV shrink's split-K partials and sums them in a fixed order (no atomics, no memset: two launches).
* ``_lora_fused_kernel``  shrink + expand in one kernel for small token counts (vLLM PR #38432 idea): one
  program per (token, N split); it computes v for all K slots and S slices into registers (v never leaves
  them, held slice-major so each slice's B rows are one contiguous run), then streams its share of B tiles.
  Each program re-reads A (from L2), which bounds its use to small ``T`` (see :func:`choose_path`).

**LoRA-B loads** (every expand-type kernel): B is ``(N, R)`` with the rank contiguous, so a B tile is read along
the rank. Its load mask uses only a bound the compiler can see is a multiple of 8 (``ceil8(rank)`` inside the
buffer, ``VEC_R``), so the loads are 16 bytes wide (``ld.global.v4`` / 16-byte ``cp.async``, checked by
tests/triton/test_lora_aot.py); entries past the slot's rank are then zeroed with ``tl.where`` (the buffer's
padding may hold anything, NaN included, and must never reach a row).

Slices of different widths (GQA q/k/v) are handled by mapping a flat tile index onto (slice, tile in slice)
through scalar tile starts (up to ``_MAX_SLICES`` per launch; more slices are launched in groups), so no tile
straddles two slices. Each slice of a launch group writes through its own output pointer and row stride
(``y0..y3``): the column windows of one ``y``, or one separate tensor per slice (q / k / v outputs in place).
Tokens with no adapter (slot < 0 or >= num_slots) are never loaded nor stored.
Host side: no ``.item()`` / ``.tolist()`` on device tensors; grids depend only on shapes. Block sizes, warps,
stages and split-K come from :mod:`pllm_kernels.triton.lora_configs` (defaults + a per-shape / GPU table).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from pllm_kernels.triton import lora_configs as _cfgs

__all__ = [
    "LORA_CONFIGS",
    "aot_variants",
    "choose_path",
    "lora_apply_triton",
    "lora_expand_triton",
    "lora_shrink_triton",
]

# ----------------------------------------------------------------------------------------------------------------
# Launch configurations: hand-picked defaults (LORA_CONFIGS) overlaid per shape and GPU by the table in
# lora_configs.json (see lora_configs.py). tests/triton/test_lora_aot.py compiles the defaults and every table entry
# for sm_80 and sm_90. SGMV kernels use BLOCK_M = the metadata chunk (16 / 32 / 64, batch.choose_chunk).
# ----------------------------------------------------------------------------------------------------------------
LORA_CONFIGS: dict[str, dict[str, int]] = _cfgs.DEFAULTS
SGMV_CHUNKS = (16, 32, 64)  # BLOCK_M values that run in production (batch.choose_chunk)
BGMV_MAX_PAIRS = 64  # auto: T*K <= this -> BGMV gather kernels (decode), else SGMV (prefill)
FUSED_MAX_PAIRS = 8  # auto: T*K <= this -> fused kernel for lora_apply (when FUSED_MAX_SR / S allow)
FUSED_MAX_SR = 256  # fused kernel keeps v as (K, next_pow2(R*S)) fp32 registers; beyond this, BGMV
FUSED_MAX_A_BYTES = 128 * 1024  # fused kernel: each program reads one slot's whole A (R*S*h_in) on one SM
# auto: single-slice lora_apply (o_proj, down_proj) takes the fused kernel up to this many pairs whatever A's size:
# with the q/k/v and gate/up groups at two launches (BGMV shrink + per-slice expand), a Llama layer's LoRA then
# stays within 6 launches at every decode size (issue "Decode at serving speed"). Above FUSED_MAX_PAIRS each fused
# program re-reads its slot's A from L2 per column split; the GPU suite's bench_lora measures what that costs.
FUSED_SINGLE_MAX_PAIRS = BGMV_MAX_PAIRS
MAX_SPLIT_K = _cfgs.SPLIT_LIMIT  # largest split-K (partials summed by the BGMV expand)
DEFAULT_NUM_SMS = 132  # H100 SXM; used when no GPU is present (interpreter, AOT)
_MAX_SLICES = 4  # slices per expand/fused launch (qkv = 3, gate_up = 2); more are launched in groups
_NO_TILE = 1 << 30  # tile start of an unused slice


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _tile_slice(j, off0, off1, off2, off3, size0, size1, size2, size3, ts1, ts2, ts3):
    """Flat tile index ``j`` -> (slice in group, first column of the slice, slice width, tile index in slice)."""
    s = (j >= ts1).to(tl.int32) + (j >= ts2).to(tl.int32) + (j >= ts3).to(tl.int32)
    off = tl.where(s == 0, off0, tl.where(s == 1, off1, tl.where(s == 2, off2, off3)))
    size = tl.where(s == 0, size0, tl.where(s == 1, size1, tl.where(s == 2, size2, size3)))
    tstart = tl.where(s == 0, 0, tl.where(s == 1, ts1, tl.where(s == 2, ts2, ts3)))
    return s, off, size, j - tstart


@triton.jit
def _slice_out(s, y0_ptr, y1_ptr, y2_ptr, y3_ptr, syt0, syt1, syt2, syt3):
    """Output of slice ``s`` of the launch group: its own tensor (first column of the slice) and row stride."""
    y_ptr = tl.where(s == 0, y0_ptr, tl.where(s == 1, y1_ptr, tl.where(s == 2, y2_ptr, y3_ptr)))
    syt = tl.where(s == 0, syt0, tl.where(s == 1, syt1, tl.where(s == 2, syt2, syt3)))
    return y_ptr, syt


@triton.jit
def _rank_limit(rank, VEC_R: tl.constexpr):
    """Load bound of the rank dimension as the compiler must see it to emit 128-bit loads of B (and v).

    A mask ``offs_r < rank`` with ``rank`` read from memory has unknown alignment, so B (rank contiguous) would be
    read 2 bytes at a time. With ``VEC_R = 8`` (the launcher sets it when the buffer's rank ``R`` and the B / v row
    strides are multiples of 8, see :func:`vec_r`) the load mask is ``offs_r < ceil8(rank)``: still inside the
    buffer (``R`` is a multiple of 8), a multiple of 8 the compiler can see, and the rank-8 slot of an R = 64 buffer
    still reads only 8 columns. The entries in ``[rank, ceil8(rank))`` are then zeroed with ``tl.where`` by the
    caller (never by a multiplication: the padding beyond a slot's rank may hold NaN / inf)."""
    if VEC_R > 1:
        return (rank + VEC_R - 1) // VEC_R * VEC_R
    return rank


@triton.jit
def _vec_stride(stride, VEC_R: tl.constexpr):
    """``stride`` with its divisibility by ``VEC_R`` visible to the compiler (``x // 8 * 8`` is a no-op on the
    multiples of 8 :func:`vec_r` guarantees; ``tl.multiple_of`` on a scalar argument is ignored)."""
    if VEC_R > 1:
        return stride // VEC_R * VEC_R
    return stride


@triton.jit
def _lora_shrink_sgmv_kernel(
    x_ptr, a_ptr, ranks_ptr, pairs_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr, out_ptr,
    T, H, num_slots, max_rank, G, split_k,
    sxt, sxh, sa0, sa1, sa2, sa3, sp, sg0, sg1, sok, so0, so1, so2,
    S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """SGMV shrink. Grid ``(K*G chunks, cdiv(R*S, BLOCK_N), split_k)``; writes ``out[s, p, i]`` (fp32): split
    ``pid_k`` adds into it (``ATOMIC``: relaxed fp32 atomics, no fences) or stores partial ``pid_k`` at
    ``out + pid_k * sok`` (summed by the consumer)."""
    pid_seg = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    kc = pid_seg // G
    g = pid_seg - kc * G
    seg = kc * sg0 + g * sg1
    slot = tl.load(seg_slot_ptr + seg)
    if (slot < 0) | (slot >= num_slots):
        return
    rank = tl.minimum(tl.maximum(tl.load(ranks_ptr + slot).to(tl.int32), 0), max_rank)
    n_used = rank * S
    if pid_n * BLOCK_N >= n_used:
        return
    start = tl.load(seg_start_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    offs_m = tl.arange(0, BLOCK_M)
    pos = start + offs_m
    m_ok = (offs_m < length) & (pos >= 0) & (pos < T * (kc + 1)) & (pos >= T * kc)
    p = tl.load(pairs_ptr + pos * sp, mask=m_ok, other=0)
    t = p - kc * T
    m_ok = m_ok & (t >= 0) & (t < T)
    t = tl.where(m_ok, t, 0)
    p = tl.where(m_ok, p, 0)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_used
    s_idx = offs_n % S
    i_idx = offs_n // S
    a_rows = a_ptr + slot.to(tl.int64) * sa0 + s_idx * sa1 + i_idx * sa2  # (BLOCK_N,) row starts of A
    x_rows = x_ptr + t.to(tl.int64) * sxt  # (BLOCK_M,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, H, BLOCK_K * split_k):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        xt = tl.load(x_rows[:, None] + offs_k[None, :] * sxh, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_rows[None, :] + offs_k[:, None] * sa3, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(xt.to(at.dtype), at, acc, input_precision="ieee")
    ptrs = out_ptr + p.to(tl.int64)[:, None] * so1 + (s_idx * so0 + i_idx * so2)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if ATOMIC:  # relaxed: only the sum matters, no ordering with other memory (no MEMBAR.GPU around each add)
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs + pid_k.to(tl.int64) * sok, acc, mask=mask)


@triton.jit
def _lora_shrink_bgmv_kernel(
    x_ptr, a_ptr, ranks_ptr, slots_ptr, out_ptr,
    T, H, num_slots, max_rank, split_k,
    sxt, sxh, sa0, sa1, sa2, sa3, sst, ssk, sok, so0, so1, so2,
    S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
):
    """BGMV shrink. Grid ``(K*T pairs, cdiv(R*S, BLOCK_N), split_k)``; one token-slot pair per program. Split-K
    as in the SGMV shrink: relaxed atomics (``ATOMIC``) or partial ``pid_k`` stored at ``out + pid_k * sok``."""
    p = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    kc = p // T
    t = p - kc * T
    slot = tl.load(slots_ptr + t * sst + kc * ssk)
    if (slot < 0) | (slot >= num_slots):
        return
    rank = tl.minimum(tl.maximum(tl.load(ranks_ptr + slot).to(tl.int32), 0), max_rank)
    n_used = rank * S
    if pid_n * BLOCK_N >= n_used:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_used
    s_idx = offs_n % S
    i_idx = offs_n // S
    a_rows = a_ptr + slot.to(tl.int64) * sa0 + s_idx * sa1 + i_idx * sa2
    x_row = x_ptr + t.to(tl.int64) * sxt
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, H, BLOCK_K * split_k):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        xv = tl.load(x_row + offs_k * sxh, mask=k_ok, other=0.0).to(tl.float32)
        at = tl.load(a_rows[:, None] + offs_k[None, :] * sa3, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += at.to(tl.float32) * xv[None, :]
    v = tl.sum(acc, axis=1)
    ptrs = out_ptr + s_idx * so0 + p.to(tl.int64) * so1 + i_idx * so2
    if ATOMIC:
        tl.atomic_add(ptrs, v, mask=n_ok, sem="relaxed")
    else:
        tl.store(ptrs + pid_k.to(tl.int64) * sok, v, mask=n_ok)


@triton.jit
def _lora_expand_sgmv_kernel(
    y0_ptr, y1_ptr, y2_ptr, y3_ptr, v_ptr, b_ptr, ranks_ptr, scales_ptr, w_ptr, pairs_ptr, seg_slot_ptr, seg_start_ptr,
    seg_len_ptr,
    T, num_slots, max_rank, kc, s_base,
    off0, off1, off2, off3, size0, size1, size2, size3, ts1, ts2, ts3,
    syt0, syt1, syt2, syt3, syn, sv0, sv1, sv2, sb0, sb1, sb2, swt, swk, sp, sg0, sg1,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, VEC_R: tl.constexpr,
):
    """SGMV expand of k column ``kc``. Grid ``(G chunks, total N tiles of the slice group)``."""
    g = tl.program_id(0)
    j = tl.program_id(1)
    seg = kc * sg0 + g * sg1
    slot = tl.load(seg_slot_ptr + seg)
    if (slot < 0) | (slot >= num_slots):
        return
    rank = tl.minimum(tl.maximum(tl.load(ranks_ptr + slot).to(tl.int32), 0), max_rank)
    if rank == 0:
        return
    r_lim = _rank_limit(rank, VEC_R)
    sb0, sb1 = _vec_stride(sb0, VEC_R), _vec_stride(sb1, VEC_R)
    sv0, sv1 = _vec_stride(sv0, VEC_R), _vec_stride(sv1, VEC_R)
    s, off, size, jt = _tile_slice(j, off0, off1, off2, off3, size0, size1, size2, size3, ts1, ts2, ts3)
    start = tl.load(seg_start_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    offs_m = tl.arange(0, BLOCK_M)
    pos = start + offs_m
    m_ok = (offs_m < length) & (pos >= T * kc) & (pos < T * (kc + 1))
    p = tl.load(pairs_ptr + pos * sp, mask=m_ok, other=0)
    t = p - kc * T
    m_ok = m_ok & (t >= 0) & (t < T)
    t = tl.where(m_ok, t, 0)
    p = tl.where(m_ok, p, 0)
    coef = tl.load(w_ptr + t * swt + kc * swk, mask=m_ok, other=0.0) * tl.load(scales_ptr + slot)

    offs_n = jt * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < size
    cols = off + offs_n
    v_rows = v_ptr + (s_base + s).to(tl.int64) * sv0 + p.to(tl.int64) * sv1  # (BLOCK_M,)
    b_cols = b_ptr + slot.to(tl.int64) * sb0 + cols.to(tl.int64) * sb1  # (BLOCK_N,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i0 in range(0, rank, BLOCK_R):
        offs_r = i0 + tl.arange(0, BLOCK_R)
        r_in = offs_r < r_lim  # vectorizable bound (see _rank_limit); tl.where below zeroes ranks >= the slot's
        r_ok = offs_r < rank
        vt = tl.load(v_rows[:, None] + offs_r[None, :] * sv2, mask=m_ok[:, None] & r_in[None, :], other=0.0)
        vt = tl.where(r_ok[None, :], vt, tl.zeros_like(vt))
        bt = tl.load(b_cols[None, :] + offs_r[:, None] * sb2, mask=r_in[:, None] & n_ok[None, :], other=0.0)
        bt = tl.where(r_ok[:, None], bt, tl.zeros_like(bt))
        if bt.dtype == tl.float32:
            acc = tl.dot(vt, bt, acc, input_precision="ieee")
        else:  # v stays fp32-accurate on tensor cores: v = hi + lo, both in the weights' dtype (2 MMAs, not 1)
            hi = vt.to(bt.dtype)
            lo = (vt - hi.to(tl.float32)).to(bt.dtype)
            acc = tl.dot(hi, bt, acc)
            acc = tl.dot(lo, bt, acc)
    y_ptr, syt = _slice_out(s, y0_ptr, y1_ptr, y2_ptr, y3_ptr, syt0, syt1, syt2, syt3)
    y_ptrs = y_ptr + t.to(tl.int64)[:, None] * syt + offs_n[None, :] * syn
    mask = m_ok[:, None] & n_ok[None, :]
    yv = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (yv.to(tl.float32) + acc * coef[:, None]).to(yv.dtype), mask=mask)


@triton.jit
def _lora_expand_bgmv_kernel(
    y0_ptr, y1_ptr, y2_ptr, y3_ptr, v_ptr, b_ptr, ranks_ptr, scales_ptr, slots_ptr, w_ptr,
    T, K, num_slots, max_rank, s_base,
    off0, off1, off2, off3, size0, size1, size2, size3, ts1, ts2, ts3,
    syt0, syt1, syt2, syt3, syn, svq, sv0, sv1, sv2, sb0, sb1, sb2, sst, ssk, swt, swk,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, VEC_R: tl.constexpr, P: tl.constexpr,
):
    """BGMV expand. Grid ``(T, total N tiles)``; the K slots of the token are summed before one y update.
    ``P > 1``: v is ``P`` split-K partials of the shrink (``v + q * svq``), summed here in a fixed order
    (deterministic, no atomics, no zeroing launch)."""
    t = tl.program_id(0)
    j = tl.program_id(1)
    sb0, sb1 = _vec_stride(sb0, VEC_R), _vec_stride(sb1, VEC_R)
    sv0, sv1, svq = _vec_stride(sv0, VEC_R), _vec_stride(sv1, VEC_R), _vec_stride(svq, VEC_R)
    s, off, size, jt = _tile_slice(j, off0, off1, off2, off3, size0, size1, size2, size3, ts1, ts2, ts3)
    offs_n = jt * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < size
    cols = off + offs_n
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    touched = 0
    for kc in range(K):
        slot = tl.load(slots_ptr + t * sst + kc * ssk)
        ok = (slot >= 0) & (slot < num_slots)
        touched += ok.to(tl.int32)
        slot = tl.where(ok, slot, 0)
        rank = tl.minimum(tl.maximum(tl.load(ranks_ptr + slot).to(tl.int32), 0), max_rank)
        rank = tl.where(ok, rank, 0)
        r_lim = _rank_limit(rank, VEC_R)
        coef = tl.load(w_ptr + t * swt + kc * swk) * tl.load(scales_ptr + slot)
        v_row = v_ptr + (s_base + s).to(tl.int64) * sv0 + (kc * T + t).to(tl.int64) * sv1
        b_cols = b_ptr + slot.to(tl.int64) * sb0 + cols.to(tl.int64) * sb1
        for i0 in range(0, rank, BLOCK_R):
            offs_r = i0 + tl.arange(0, BLOCK_R)
            r_in = offs_r < r_lim  # vectorizable bound (see _rank_limit); tl.where zeroes ranks >= the slot's
            r_ok = offs_r < rank
            if P == 1:
                vv = tl.load(v_row + offs_r * sv2, mask=r_in, other=0.0)
            else:
                offs_q = tl.arange(0, P).to(tl.int64)
                vv = tl.sum(tl.load(v_row + offs_q[:, None] * svq + offs_r[None, :] * sv2, mask=r_in[None, :],
                                    other=0.0), axis=0)
            vv = tl.where(r_ok, vv * coef, 0.0)
            bt = tl.load(b_cols[:, None] + offs_r[None, :] * sb2, mask=n_ok[:, None] & r_in[None, :], other=0.0)
            bt = tl.where(r_ok[None, :], bt, tl.zeros_like(bt))
            acc += bt.to(tl.float32) * vv[None, :]
    if touched == 0:
        return
    delta = tl.sum(acc, axis=1)
    y_ptr, syt = _slice_out(s, y0_ptr, y1_ptr, y2_ptr, y3_ptr, syt0, syt1, syt2, syt3)
    y_ptrs = y_ptr + t.to(tl.int64) * syt + offs_n * syn
    yv = tl.load(y_ptrs, mask=n_ok, other=0.0)
    tl.store(y_ptrs, (yv.to(tl.float32) + delta).to(yv.dtype), mask=n_ok)


@triton.jit
def _lora_fused_kernel(
    y0_ptr, y1_ptr, y2_ptr, y3_ptr, x_ptr, a_ptr, b_ptr, ranks_ptr, scales_ptr, slots_ptr, w_ptr,
    T, H, num_slots, max_rank, n_split, total_tiles,
    off0, off1, off2, off3, size0, size1, size2, size3, ts1, ts2, ts3,
    sxt, sxh, sa0, sa1, sa2, sa3, syt0, syt1, syt2, syt3, syn, sb0, sb1, sb2, sst, ssk, swt, swk,
    S: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, S_PAD: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, VEC_R: tl.constexpr,
):
    """Fused shrink+expand. Grid ``(T, n_split)``: v ``(K, S, R)`` stays in fp32 registers; program ``pid1`` owns
    the flat N tiles ``pid1, pid1 + n_split, ...`` (slice by slice).

    v is held slice-major (``j = s * R_PAD + i``) so that the expand of slice ``s`` reads B rows ``[0, R_PAD)`` of
    its columns as one contiguous, 128-bit vectorizable run (rank-major would interleave the slices)."""
    t = tl.program_id(0)
    pid1 = tl.program_id(1)
    offs_j = tl.arange(0, S_PAD * R_PAD)  # combined (slice s = j // R_PAD, rank row i = j % R_PAD)
    s_of_j = offs_j // R_PAD
    i_of_j = offs_j % R_PAD
    k_ids = tl.arange(0, K_PAD)
    x_row = x_ptr + t.to(tl.int64) * sxt
    vmat = tl.zeros((K_PAD, S_PAD * R_PAD), dtype=tl.float32)
    touched = 0
    for kc in tl.static_range(K):
        slot = tl.load(slots_ptr + t * sst + kc * ssk)
        ok = (slot >= 0) & (slot < num_slots)
        touched += ok.to(tl.int32)
        slot = tl.where(ok, slot, 0)
        rank = tl.where(ok, tl.minimum(tl.maximum(tl.load(ranks_ptr + slot).to(tl.int32), 0), max_rank), 0)
        j_ok = (i_of_j < rank) & (s_of_j < S)
        a_rows = a_ptr + slot.to(tl.int64) * sa0 + s_of_j * sa1 + i_of_j * sa2
        part = tl.zeros((S_PAD * R_PAD, BLOCK_K), dtype=tl.float32)
        for h0 in range(0, tl.where(rank > 0, H, 0), BLOCK_K):
            offs_h = h0 + tl.arange(0, BLOCK_K)
            h_ok = offs_h < H
            xv = tl.load(x_row + offs_h * sxh, mask=h_ok, other=0.0).to(tl.float32)
            at = tl.load(a_rows[:, None] + offs_h[None, :] * sa3, mask=j_ok[:, None] & h_ok[None, :], other=0.0)
            part += at.to(tl.float32) * xv[None, :]
        v = tl.sum(part, axis=1)
        vmat = tl.where(k_ids[:, None] == kc, v[None, :], vmat)
    if touched == 0:
        return
    offs_i = tl.arange(0, R_PAD)
    sb0, sb1 = _vec_stride(sb0, VEC_R), _vec_stride(sb1, VEC_R)
    for s in tl.static_range(S):
        off = off0 if s == 0 else (off1 if s == 1 else (off2 if s == 2 else off3))
        size = size0 if s == 0 else (size1 if s == 1 else (size2 if s == 2 else size3))
        ts = 0 if s == 0 else (ts1 if s == 1 else (ts2 if s == 2 else ts3))
        y_ptr = y0_ptr if s == 0 else (y1_ptr if s == 1 else (y2_ptr if s == 2 else y3_ptr))
        syt = syt0 if s == 0 else (syt1 if s == 1 else (syt2 if s == 2 else syt3))
        # v of slice s for every k slot: (K_PAD, R_PAD)
        vks = tl.sum(tl.reshape(tl.where(s_of_j[None, :] == s, vmat, 0.0), (K_PAD, S_PAD, R_PAD)), axis=1)
        first = ts + (pid1 - ts % n_split + n_split) % n_split  # first flat tile >= ts owned by this program
        for j in range(first, ts + tl.cdiv(size, BLOCK_N), n_split):
            offs_n = (j - ts) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < size
            cols = off + offs_n
            acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
            for kc in tl.static_range(K):
                slot = tl.load(slots_ptr + t * sst + kc * ssk)
                ok = (slot >= 0) & (slot < num_slots)
                slot = tl.where(ok, slot, 0)
                rank = tl.where(ok, tl.minimum(tl.maximum(tl.load(ranks_ptr + slot).to(tl.int32), 0), max_rank), 0)
                r_lim = _rank_limit(rank, VEC_R)
                coef = tl.where(ok, tl.load(w_ptr + t * swt + kc * swk) * tl.load(scales_ptr + slot), 0.0)
                r_ok = offs_i < rank
                vk = tl.where(r_ok, tl.sum(tl.where(k_ids[:, None] == kc, vks, 0.0), axis=0) * coef, 0.0)
                b_ptrs = b_ptr + slot.to(tl.int64) * sb0 + cols.to(tl.int64)[:, None] * sb1 + (offs_i * sb2)[None, :]
                bt = tl.load(b_ptrs, mask=n_ok[:, None] & (offs_i < r_lim)[None, :], other=0.0)
                bt = tl.where(r_ok[None, :], bt, tl.zeros_like(bt))
                acc += bt.to(tl.float32) * vk[None, :]
            delta = tl.sum(acc, axis=1)
            y_ptrs = y_ptr + t.to(tl.int64) * syt + offs_n * syn
            yv = tl.load(y_ptrs, mask=n_ok, other=0.0)
            tl.store(y_ptrs, (yv.to(tl.float32) + delta).to(yv.dtype), mask=n_ok)


# ----------------------------------------------------------------------------------------------------------------
# Host-side helpers (pure functions of shapes: shared by the launchers and the AOT test)
# ----------------------------------------------------------------------------------------------------------------
_SM_CACHE: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda" or not torch.cuda.is_available():
        return DEFAULT_NUM_SMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_CACHE:
        _SM_CACHE[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_CACHE[idx]


def sgmv_block_m(chunk: int) -> int:
    """BLOCK_M of the SGMV kernels for a metadata chunk size (power of two, >= 16 for tl.dot)."""
    return max(16, triton.next_power_of_2(int(chunk)))


def fused_blocks(max_rank: int, num_slices: int, tile: int | None = None) -> dict[str, int]:
    """Register-tile sizes of the fused kernel for a (max_rank, S) buffer.

    ``BLOCK_SR = next_pow2(R*S)`` is what :func:`choose_path` compares with ``FUSED_MAX_SR`` (the CUDA backend
    applies the same rule); the kernel holds v slice-major as ``S_PAD x R_PAD`` (powers of two, ``R_PAD >= 8``
    for 16-byte B loads), at most twice that. ``BLOCK_N >= 32``: with 16 output columns per B tile (R = 64,
    S = 3) ptxas (13.x, as Triton 3.9 drives it) caps the kernel at 80 registers and spills one."""
    sr = max(16, triton.next_power_of_2(max_rank * num_slices))
    s_pad, r_pad = triton.next_power_of_2(num_slices), max(8, triton.next_power_of_2(max_rank))
    side = max(16, (tile or LORA_CONFIGS["fused"]["FUSED_TILE"]) // (s_pad * r_pad))
    return {"BLOCK_SR": sr, "S_PAD": s_pad, "R_PAD": r_pad, "BLOCK_K": side, "BLOCK_N": max(32, side)}


def split_k_for(programs: int, h_in: int, block_k: int, num_sms: int, max_split: int = MAX_SPLIT_K) -> int:
    """Split-K factor (power of two) so that ``programs * split`` reaches ``num_sms`` (one full wave: decode grids
    are a few programs), each split keeping at least one ``block_k`` of ``h_in``, at most ``max_split``."""
    split = 1
    cap = min(max_split, max(1, triton.cdiv(h_in, block_k)))
    while split * 2 <= cap and programs * split < num_sms:
        split *= 2
    return split


def _split_of(cfg: dict, programs: int, h_in: int, num_sms: int) -> int:
    if "SPLIT_K" in cfg:  # fixed by the table: clipped to a power of two with >= one BLOCK_K per split
        split, cap = 1, min(cfg["SPLIT_K"], max(1, triton.cdiv(h_in, cfg["BLOCK_K"])))
        while split * 2 <= cap:
            split *= 2
        return split
    return split_k_for(programs, h_in, cfg["BLOCK_K"], num_sms, cfg.get("MAX_SPLIT_K", MAX_SPLIT_K))


def choose_path(path: str, num_pairs: int, op: str, *, sr: int = 0, num_slices: int = 1, a_bytes: int = 0) -> str:
    """Resolve ``path`` for ``op`` in {shrink, expand, apply} (a pure function of shapes: no host sync).

    ``auto``: decode-sized batches (``T*K <= BGMV_MAX_PAIRS``) use the gather (BGMV) kernels, which need no
    sorting and waste no tensor-core rows on one-token chunks (SGLang #10286); prefill-sized batches use the
    segmented (SGMV) kernels, which read each adapter's weights once per chunk on tensor cores. ``lora_apply``
    uses the fused kernel when ``T*K <= FUSED_MAX_PAIRS``, v fits in registers (``sr = next_pow2(R*S) <=
    FUSED_MAX_SR``, ``S <= 4``) and one slot's A (``a_bytes = R*S*h_in*itemsize``) is at most
    ``FUSED_MAX_A_BYTES``: every fused program streams a whole A from L2 on one SM, so a large A makes it slower
    than BGMV shrink + expand despite the saved launch; single-slice calls take it up to
    ``FUSED_SINGLE_MAX_PAIRS`` whatever A's size (the launch budget per decoder layer). These thresholds are first
    guesses from the byte counts (research notes section 7), to be tuned by the GPU benchmark."""
    if path not in ("auto", "sgmv", "bgmv", "fused"):
        raise ValueError(f"path must be one of auto/sgmv/bgmv/fused, got {path!r}")
    if path == "fused" and op != "apply":
        raise ValueError(f"path='fused' exists only for lora_apply, not lora_{op}")
    if path != "auto":
        return path
    if (op == "apply" and num_pairs <= FUSED_MAX_PAIRS and sr <= FUSED_MAX_SR and num_slices <= _MAX_SLICES
            and a_bytes <= FUSED_MAX_A_BYTES):
        return "fused"
    if op == "apply" and num_slices == 1 and num_pairs <= FUSED_SINGLE_MAX_PAIRS and sr <= FUSED_MAX_SR:
        return "fused"  # the launch budget: one launch for o_proj / down_proj at any decode size
    return "bgmv" if num_pairs <= BGMV_MAX_PAIRS else "sgmv"


def slice_groups(slice_sizes: Sequence[int], block_n: int) -> tuple[tuple[int, tuple[int, ...], int], ...]:
    """Split the slices into launch groups of <= _MAX_SLICES: ``(s_base, 11 slice ints, total_tiles)``.

    The 11 ints are ``off0..3, size0..3, ts1..3`` (column offset, width and first flat tile of each slice).
    Cached: it runs on every launch (hundreds per decode step), always with the model's few slice layouts."""
    return _slice_groups(tuple(int(n) for n in slice_sizes), int(block_n))


@functools.lru_cache(maxsize=1024)
def _slice_groups(sizes: tuple[int, ...], block_n: int) -> tuple[tuple[int, tuple[int, ...], int], ...]:
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    groups = []
    for base in range(0, len(sizes), _MAX_SLICES):
        offs, szs, tstarts = [0] * 4, [0] * 4, [_NO_TILE] * 4
        tiles = 0
        for i, s in enumerate(range(base, min(base + _MAX_SLICES, len(sizes)))):
            offs[i], szs[i], tstarts[i] = offsets[s], sizes[s], tiles
            tiles += triton.cdiv(sizes[s], block_n)
        if tiles > 0:
            groups.append((base, tuple(offs + szs + tstarts[1:]), tiles))
    return tuple(groups)


def _shrink_constexprs(path: str, num_slices: int, chunk: int, atomic: bool, cfg: dict | None = None) -> dict:
    cfg = cfg or _cfgs.config_for("shrink_" + path, m=sgmv_block_m(chunk))
    c = {"S": num_slices, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"], "ATOMIC": atomic}
    if path == "sgmv":
        c["BLOCK_M"] = sgmv_block_m(chunk)
    return c


def vec_r(max_rank: int, *strides: int) -> int:
    """``VEC_R`` of the expand kernels: 8 when the buffer's rank and the given B / v strides are multiples of 8
    (then the rank dimension is loaded 16 bytes at a time, see ``_rank_limit``), else 1 (element-wise loads)."""
    return 8 if max_rank % 8 == 0 and all(int(st) % 8 == 0 for st in strides) else 1


def _expand_constexprs(path: str, chunk: int, vec: int = 8, cfg: dict | None = None, partials: int = 1) -> dict:
    cfg = cfg or _cfgs.config_for("expand_" + path, m=sgmv_block_m(chunk))
    c = {"BLOCK_N": cfg["BLOCK_N"], "BLOCK_R": cfg["BLOCK_R"], "VEC_R": vec}
    if path == "sgmv":
        c["BLOCK_M"] = sgmv_block_m(chunk)
    else:
        c["P"] = partials
    return c


def _fused_constexprs(max_rank: int, num_slices: int, k: int, vec: int = 8, cfg: dict | None = None) -> dict:
    b = fused_blocks(max_rank, num_slices, (cfg or LORA_CONFIGS["fused"])["FUSED_TILE"])
    return {"S": num_slices, "K": k, "K_PAD": triton.next_power_of_2(k), "S_PAD": b["S_PAD"], "R_PAD": b["R_PAD"],
            "BLOCK_K": b["BLOCK_K"], "BLOCK_N": b["BLOCK_N"], "VEC_R": vec}


def _launch_opts(name: str, chunk: int = 16, cfg: dict | None = None) -> dict:
    cfg = cfg or _cfgs.config_for(name, m=sgmv_block_m(chunk))
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _config(kernel: str, device: torch.device, **shape: int) -> dict:
    return _cfgs.lookup(kernel, device, **shape)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _launch_shrink(x, lora_a, slot_ranks, token_slots, sorted_pairs, seg_slot, seg_start, seg_len, *, chunk, path,
                   out=None):
    """Launch the shrink (``x``, ``lora_a`` non-empty); ``path`` resolved. Returns ``(v, split)``.

    ``out`` given (the public contract): zeroed, then split-K sums into it with relaxed atomics. ``out=None`` (inside
    ``lora_apply``, whose expand reads v only below each slot's rank and only for routed pairs): nothing is zeroed;
    BGMV stores its ``split`` partials into a fresh ``(split, S, K*T, R)`` buffer that the BGMV expand sums (no
    atomics, deterministic, no memset launch); SGMV uses a fresh ``(S, K*T, R)`` (zeroed + atomics only when split)."""
    T, H = x.shape
    L, S, R, _ = lora_a.shape
    K = token_slots.shape[1]
    m = sgmv_block_m(chunk)
    kernel = "shrink_" + path
    cfg = _config(kernel, x.device, pairs=T * K, rank=R * S, dim=H, **({"m": m} if path == "sgmv" else {}))
    n_tiles = triton.cdiv(R * S, cfg["BLOCK_N"])
    programs = (triton.cdiv(T * K, m) if path == "sgmv" else T * K) * n_tiles  # busy programs (no sync)
    split = _split_of(cfg, programs, H, _num_sms(x.device))
    if out is None and path == "bgmv":
        v = torch.empty((split, S, K * T, R), dtype=torch.float32, device=x.device)
        atomic, dst, sok = False, v[0], v.stride(0)
    else:
        if out is None:
            out = (torch.zeros if split > 1 else torch.empty)((S, K * T, R), dtype=torch.float32, device=x.device)
        else:
            out.zero_()  # no-adapter pairs and rank padding are zeros; split-K accumulates into it
        v = dst = out
        atomic, sok = split > 1, 0
    opts = _launch_opts(kernel, chunk, cfg)
    if path == "sgmv":
        G = seg_slot.shape[1]
        _lora_shrink_sgmv_kernel[(K * G, n_tiles, split)](
            x, lora_a, slot_ranks, sorted_pairs, seg_slot, seg_start, seg_len, dst,
            T, H, L, R, G, split,
            x.stride(0), x.stride(1), *lora_a.stride(), sorted_pairs.stride(0), *seg_slot.stride(), sok,
            *dst.stride(), **_shrink_constexprs("sgmv", S, chunk, atomic, cfg), **opts,
        )
    else:
        _lora_shrink_bgmv_kernel[(K * T, n_tiles, split)](
            x, lora_a, slot_ranks, token_slots, dst,
            T, H, L, R, split,
            x.stride(0), x.stride(1), *lora_a.stride(), *token_slots.stride(), sok, *dst.stride(),
            **_shrink_constexprs("bgmv", S, chunk, atomic, cfg), **opts,
        )
    return v, split


def _outputs(y, slice_sizes) -> tuple[list, int]:
    """Per-slice outputs and their shared column stride: the column slices of one ``(T, sum(slice_sizes))`` tensor,
    or the given tuple / list of one ``(T, n_s)`` tensor per slice (any row stride, column stride 1)."""
    if isinstance(y, torch.Tensor):
        views, off = [], 0
        for n in slice_sizes:
            views.append(y[:, off : off + n])
            off += n
        return views, y.stride(1)
    ys = list(y)
    if len(ys) != len(slice_sizes):
        raise ValueError(f"y: got {len(ys)} output tensors for {len(slice_sizes)} slices")
    for i, (t, n) in enumerate(zip(ys, slice_sizes)):
        if t.dim() != 2 or t.shape[1] != n or t.shape[0] != ys[0].shape[0]:
            raise ValueError(f"y[{i}]: expected shape ({ys[0].shape[0]}, {n}), got {tuple(t.shape)}")
        if n > 1 and t.stride(1) != 1:
            raise ValueError(f"y[{i}]: columns must be contiguous (stride 1), got stride {t.stride(1)}")
    return ys, 1


def _group_outputs(views: list, s_base: int) -> tuple[list, list]:
    """The 4 output tensors and row strides of the launch group starting at slice ``s_base`` (unused: repeated)."""
    group = views[s_base : s_base + _MAX_SLICES]
    group = group + [group[0]] * (_MAX_SLICES - len(group))
    return group, [t.stride(0) for t in group]


def _num_rows(y) -> int:
    return y.shape[0] if isinstance(y, torch.Tensor) else (y[0].shape[0] if len(y) else 0)


def _launch_expand(y, v, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot,
                   seg_start, seg_len, slice_sizes, *, chunk, path, partials=1):
    """Launch the expand; ``path`` resolved; ``v`` is ``(S, K*T, R)`` or (BGMV) ``(partials, S, K*T, R)``."""
    T = _num_rows(y)
    views, syn = _outputs(y, slice_sizes)
    L, N, R = lora_b.shape
    K = token_slots.shape[1]
    m = sgmv_block_m(chunk)
    kernel = "expand_" + path
    cfg = _config(kernel, lora_b.device, pairs=T * K, rank=R, dim=N, **({"m": m} if path == "sgmv" else {}))
    groups = slice_groups(slice_sizes, cfg["BLOCK_N"])
    v3, svq = (v[0], v.stride(0)) if v.dim() == 4 else (v, 0)
    vec = vec_r(R, lora_b.stride(0), lora_b.stride(1), v3.stride(0), v3.stride(1), svq)
    opts = _launch_opts(kernel, chunk, cfg)
    if path == "sgmv":
        G = seg_slot.shape[1]
        for kc in range(K):
            for s_base, sl, tiles in groups:
                ys, syt = _group_outputs(views, s_base)
                _lora_expand_sgmv_kernel[(G, tiles)](
                    *ys, v3, lora_b, slot_ranks, slot_scales, token_weights, sorted_pairs, seg_slot, seg_start,
                    seg_len, T, L, R, kc, s_base, *sl,
                    *syt, syn, *v3.stride(), *lora_b.stride(), *token_weights.stride(), sorted_pairs.stride(0),
                    *seg_slot.stride(),
                    **_expand_constexprs("sgmv", chunk, vec, cfg), **opts,
                )
    else:
        for s_base, sl, tiles in groups:
            ys, syt = _group_outputs(views, s_base)
            _lora_expand_bgmv_kernel[(T, tiles)](
                *ys, v3, lora_b, slot_ranks, slot_scales, token_slots, token_weights,
                T, K, L, R, s_base, *sl,
                *syt, syn, svq, *v3.stride(), *lora_b.stride(), *token_slots.stride(), *token_weights.stride(),
                **_expand_constexprs("bgmv", chunk, vec, cfg, partials), **opts,
            )


def lora_shrink_triton(
    x, lora_a, slot_ranks, token_slots, sorted_pairs, seg_slot, seg_start, seg_len, out, *, chunk, path="auto"
) -> None:
    """``out[s, k*T+t, :r] = x[t] @ lora_a[slot, s, :r].T`` (fp32), zeros elsewhere (Punica/vLLM shrink).

    x ``(T, h_in)`` any strides; lora_a ``(L, S, R, h_in)``; slot_ranks ``(L,)``; token_slots ``(T, K)``;
    sorted_pairs ``(K*T,)``; seg_* ``(K, G)``; out ``(S, K*T, R)`` float32, fully overwritten.
    ``path``: auto | sgmv | bgmv (see :func:`choose_path`). Split-K (sized so the grid fills the SMs) adds into
    ``out`` with relaxed fp32 atomics."""
    T, H = x.shape
    L, S, R, _ = lora_a.shape
    K = token_slots.shape[1]
    path = choose_path(path, T * K, "shrink")
    if T == 0 or R == 0 or S == 0 or H == 0:
        out.zero_()
        return
    _launch_shrink(x, lora_a, slot_ranks, token_slots, sorted_pairs, seg_slot, seg_start, seg_len, chunk=chunk,
                   path=path, out=out)


def lora_expand_triton(
    y, v, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot, seg_start, seg_len,
    slice_sizes, *, chunk, path="auto",
) -> None:
    """``y[t, off_s:off_s+n_s] += sum_k w[t,k] * scale[slot] * v[s, k*T+t, :r] @ lora_b[slot, off_s:.., :r].T``.

    y ``(T, sum(slice_sizes))`` in place, any strides, or a tuple / list of one ``(T, n_s)`` tensor per slice (any
    row stride, column stride 1: q / k / v outputs written in place by the same launch); v ``(S, K*T, R)`` fp32;
    lora_b ``(L, N_total, R)``; slot_scales ``(L,)`` fp32; token_weights ``(T, K)`` fp32; slice_sizes: python ints
    (may differ, GQA). SGMV launches once per k column (race-free); BGMV sums the K slots of a token in registers.
    Up to 4 slices per launch (more: one launch per group of 4)."""
    T = _num_rows(y)
    R = lora_b.shape[2]
    K = token_slots.shape[1]
    path = choose_path(path, T * K, "expand")
    if T == 0 or R == 0:
        return
    _launch_expand(y, v, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot,
                   seg_start, seg_len, slice_sizes, chunk=chunk, path=path)


def lora_apply_triton(
    y, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot, seg_start,
    seg_len, slice_sizes, *, chunk, path="auto",
) -> None:
    """``y += sum_k w * scale * (x @ A.T) @ B.T`` per token and slice (shrink + expand). ``y``: one
    ``(T, sum(slice_sizes))`` tensor or one ``(T, n_s)`` tensor per slice (see :func:`lora_expand_triton`).

    ``path="fused"`` (auto for ``T*K <= FUSED_MAX_PAIRS``): one kernel, v in registers, K slots summed in one
    program (deterministic). Otherwise shrink + expand through an fp32 scratch (vLLM ``add_lora_linear``), both on
    the BGMV or SGMV path: BGMV (decode) passes split-K partials to the expand, which sums them (two launches, no
    atomics, no memset); SGMV (prefill) splits K only for small grids, with relaxed atomics."""
    T, H = x.shape
    L, S, R, _ = lora_a.shape
    K = token_slots.shape[1]
    _outputs(y, slice_sizes)  # per-slice outputs: refused before anything is launched
    if T == 0 or R == 0 or S == 0:
        return
    blocks = fused_blocks(R, S)
    path = choose_path(path, T * K, "apply", sr=blocks["BLOCK_SR"], num_slices=S,
                       a_bytes=R * S * H * lora_a.element_size())
    if path != "fused":
        if H == 0:
            return
        v, split = _launch_shrink(x, lora_a, slot_ranks, token_slots, sorted_pairs, seg_slot, seg_start, seg_len,
                                  chunk=chunk, path=path)
        _launch_expand(y, v, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot,
                       seg_start, seg_len, slice_sizes, chunk=chunk, path=path, partials=split if path == "bgmv" else 1)
        return
    if S > _MAX_SLICES:
        raise ValueError(f"the fused kernel handles at most {_MAX_SLICES} slices, got {S}")
    if T == 0:
        return
    cfg = _config("fused", x.device, pairs=T * K, rank=R * S, dim=H)
    cx = _fused_constexprs(R, S, K, vec_r(R, lora_b.stride(0), lora_b.stride(1)), cfg)
    (_, sl, tiles), = slice_groups(slice_sizes, cx["BLOCK_N"])
    n_split = max(1, min(tiles, triton.cdiv(_num_sms(x.device), T)))
    views, syn = _outputs(y, slice_sizes)
    ys, syt = _group_outputs(views, 0)
    _lora_fused_kernel[(T, n_split)](
        *ys, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights,
        T, H, L, R, n_split, tiles, *sl,
        x.stride(0), x.stride(1), *lora_a.stride(), *syt, syn, *lora_b.stride(), *token_slots.stride(),
        *token_weights.stride(),
        **cx, **_launch_opts("fused", cfg=cfg),
    )


# The op layer (ops.lora_apply with one output per slice) passes a tuple of outputs when the launcher says it can.
lora_expand_triton.sliced_outputs = True
lora_apply_triton.sliced_outputs = True


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation table (tests/triton/test_lora_aot.py)
# ----------------------------------------------------------------------------------------------------------------
_UNIT_STRIDES = ("sxh", "sa3", "syn", "sb2", "so2", "sv2", "sp")  # JIT specializes these == 1 (contiguous rows)
# Ints the JIT sees as multiples of 16 for real model shapes (hidden sizes, ranks, slice widths): same hint in AOT.
_DIV16_ARGS = ("H", "sxt", "sa0", "sa1", "sa2", "syt0", "syt1", "syt2", "syt3", "sb0", "sb1", "sv0", "sv1", "svq",
               "so0", "so1", "sok", "off0", "off1", "off2", "off3", "size0", "size1", "size2", "size3")
_PTR_TYPES = {
    "x_ptr": "act", "a_ptr": "act", "b_ptr": "act", "y0_ptr": "act", "y1_ptr": "act", "y2_ptr": "act",
    "y3_ptr": "act", "out_ptr": "fp32", "v_ptr": "fp32",
    "scales_ptr": "fp32", "w_ptr": "fp32",
}


def aot_variants(act_dtype: str = "fp16"):
    """Yield ``(name, kernel, signature, constexprs, attrs, options)`` for every production kernel variant.

    ``act_dtype`` is the Triton type of x / weights / y (``fp16`` or ``bf16``). Constexprs and launch options
    come from the same helpers the launchers use; innermost unit strides are constexpr 1 and pointers / model
    dimensions carry the divisibility-by-16 hint, as the JIT specializes them for contiguous real-model shapes."""

    def build(name, kernel, constexprs, options):
        cx = {**constexprs, **{n: 1 for n in _UNIT_STRIDES if n in kernel.arg_names}}
        sig, attrs = {}, {}
        for i, arg in enumerate(kernel.arg_names):
            if arg in cx:
                sig[arg] = "constexpr"
                continue
            if arg.endswith("_ptr"):
                kind = _PTR_TYPES.get(arg, "i32")
                sig[arg] = "*" + (act_dtype if kind == "act" else kind)
            else:
                sig[arg] = "i32"
            if arg.endswith("_ptr") or arg in _DIV16_ARGS:
                attrs[(i,)] = [["tt.divisibility", 16]]
        return name, kernel, sig, cx, attrs, options

    def configs(kernel, m=None):  # the defaults, then every table entry that differs from them
        default = _cfgs.config_for(kernel, m=m)
        yield "", default
        for label, cfg in _cfgs.table_configs(kernel, m):
            if cfg != default:
                yield "_" + label, cfg

    for chunk in SGMV_CHUNKS:
        for label, cfg in configs("shrink_sgmv", chunk):
            # split-K changes the epilogue only: the atomic one for the defaults at BLOCK_M = 64, both for entries
            for atomic in (False, True) if label or chunk == max(SGMV_CHUNKS) else (False,):
                yield build(f"shrink_sgmv_m{chunk}{label}{'_splitk' if atomic else ''}", _lora_shrink_sgmv_kernel,
                            _shrink_constexprs("sgmv", 3, chunk, atomic, cfg), _launch_opts("shrink_sgmv", chunk, cfg))
        for label, cfg in configs("expand_sgmv", chunk):
            for vec in (8, 1) if not label and chunk == max(SGMV_CHUNKS) else (8,):  # VEC_R = 1: R % 8 != 0
                yield build(f"expand_sgmv_m{chunk}{label}{'_vec1' if vec == 1 else ''}", _lora_expand_sgmv_kernel,
                            _expand_constexprs("sgmv", chunk, vec, cfg), _launch_opts("expand_sgmv", chunk, cfg))
    for label, cfg in configs("shrink_bgmv"):
        for atomic in (False, True):
            yield build(f"shrink_bgmv{label}{'_splitk' if atomic else ''}", _lora_shrink_bgmv_kernel,
                        _shrink_constexprs("bgmv", 3, 16, atomic, cfg), _launch_opts("shrink_bgmv", cfg=cfg))
    for label, cfg in configs("expand_bgmv"):
        # P = split-K partials summed while loading v (1 .. MAX_SPLIT_K; registers grow with P: both ends)
        for vec, parts in ((8, 1), (8, MAX_SPLIT_K), (1, 1)) if not label else ((8, 1), (8, MAX_SPLIT_K)):
            yield build(f"expand_bgmv{label}_p{parts}{'_vec1' if vec == 1 else ''}", _lora_expand_bgmv_kernel,
                        _expand_constexprs("bgmv", 16, vec, cfg, parts), _launch_opts("expand_bgmv", cfg=cfg))
    for label, cfg in configs("fused"):
        shapes = ((16, 3, 1, 8), (64, 3, 2, 8)) + (((12, 3, 1, 1),) if not label else ())
        for rank, s, k, vec in shapes:
            yield build(f"fused_r{rank}_s{s}_k{k}{label}{'_vec1' if vec == 1 else ''}", _lora_fused_kernel,
                        _fused_constexprs(rank, s, k, vec, cfg), _launch_opts("fused", cfg=cfg))
