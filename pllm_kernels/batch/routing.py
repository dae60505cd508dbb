"""LoRA routing metadata (:class:`LoRAMeta`) built from per-token or per-row slots.

Built once per forward, on the tokens' device, with torch ops only and without a host synchronization
(no ``.item()``, ``.tolist()``, ``torch.unique`` or data-dependent shapes), so it can run inside CUDA-graph
capture and write into preallocated buffers (:class:`LoRAMetaBuffers`).
"""

from __future__ import annotations

import torch

from pllm_kernels.ops.meta import LoRAMeta

__all__ = ["LoRAMeta", "LoRAMetaBuffers", "build_lora_meta", "choose_chunk", "tokens_from_rows"]


def choose_chunk(num_pairs: int) -> int:
    """Rows per SGMV chunk (the kernels' BLOCK_M): small for decode-sized batches, larger for prefill."""
    if num_pairs <= 64:
        return 16
    if num_pairs <= 1024:
        return 32
    return 64


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t[:, None] if t.dim() == 1 else t


def build_lora_meta(
    token_slots: torch.Tensor,
    num_slots: int,
    token_weights: torch.Tensor | None = None,
    chunk: int | None = None,
    out: LoRAMeta | None = None,
) -> LoRAMeta:
    """Sort, count and chunk the token -> slot routing (see :class:`LoRAMeta`).

    Args:
        token_slots: ``(T,)`` or ``(T, K)`` integer slot ids, ``-1`` = no adapter. Ids ``>= num_slots`` are
            routed nowhere here (the ops layer reports them as errors when validation is on).
        num_slots: size of the slot buffer (L).
        token_weights: ``(T, K)`` weights of each slot (default ones).
        chunk: rows per chunk (default :func:`choose_chunk`).
        out: preallocated metadata of identical shapes to write into (CUDA graphs); returned.
    """
    if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
        raise ValueError(f"num_slots must be an int >= 1, got {num_slots!r}")
    if not isinstance(token_slots, torch.Tensor):
        raise ValueError(f"token_slots must be a torch.Tensor, got {type(token_slots).__name__}")
    if token_slots.dim() not in (1, 2):
        raise ValueError(f"token_slots must have shape (T,) or (T, K), got {tuple(token_slots.shape)}")
    token_slots = _as_2d(token_slots)
    if token_slots.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"token_slots must be an integer tensor, got dtype {token_slots.dtype}")
    T, K = token_slots.shape
    if K < 1:
        raise ValueError(f"token_slots must have K >= 1 slot columns, got shape {tuple(token_slots.shape)}")
    device = token_slots.device
    if chunk is None:
        chunk = out.chunk if out is not None else choose_chunk(T * K)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    L = num_slots
    G = -(-T // chunk) + L

    slots = token_slots.to(torch.int64)
    valid = (slots >= 0) & (slots < L)
    key_slot = torch.where(valid, slots, torch.full_like(slots, L))  # (T, K); L = "no adapter" bucket
    k_idx = torch.arange(K, device=device, dtype=torch.int64)
    key = (k_idx[:, None] * (L + 1) + key_slot.t()).reshape(-1)  # (K*T,), k-major pairs
    _, sorted_pairs = torch.sort(key, stable=True)

    counts_all = torch.zeros(K * (L + 1), dtype=torch.int64, device=device)
    counts_all.scatter_add_(0, key, torch.ones_like(key))
    counts = counts_all.view(K, L + 1)[:, :L]  # (K, L)
    # Start of each slot's run in sorted order: column k occupies [k*T, (k+1)*T).
    starts = torch.cumsum(counts, dim=1) - counts + k_idx[:, None] * T  # (K, L)
    n_chunks = (counts + chunk - 1) // chunk  # (K, L)
    chunk_end = torch.cumsum(n_chunks, dim=1)  # inclusive (K, L)
    g = torch.arange(G, device=device, dtype=torch.int64).expand(K, G).contiguous()
    slot_of_g = torch.searchsorted(chunk_end, g, right=True)  # (K, G) in [0, L]
    used = slot_of_g < L
    slot_c = slot_of_g.clamp(max=L - 1)
    idx_in_slot = g - torch.gather(chunk_end - n_chunks, 1, slot_c)
    seg_start = torch.gather(starts, 1, slot_c) + idx_in_slot * chunk
    seg_len = (torch.gather(counts, 1, slot_c) - idx_in_slot * chunk).clamp(0, chunk) * used
    seg_slot = torch.where(used, slot_c, torch.full_like(slot_c, -1))
    seg_start = seg_start * used

    if token_weights is None:
        weights = torch.ones(T, K, dtype=torch.float32, device=device)
    else:
        if not isinstance(token_weights, torch.Tensor):
            raise ValueError(f"token_weights must be a torch.Tensor, got {type(token_weights).__name__}")
        weights = _as_2d(token_weights)
        if weights.shape != (T, K):
            raise ValueError(f"token_weights must have shape {(T, K)} like token_slots, got {tuple(weights.shape)}")
        # A copy, never the caller's tensor: editing it later must not change this routing.
        weights = weights.to(device=device, dtype=torch.float32, copy=True).contiguous()

    # Ids outside int32 are clamped (not wrapped) before the cast: 2**32 + 1 stays out of range (and is reported
    # by the ops' validation) instead of becoming slot 1. Always a copy of the caller's tensor.
    i32 = torch.iinfo(torch.int32)
    fresh = LoRAMeta(
        token_slots=slots.clamp(i32.min, i32.max).to(torch.int32).contiguous(),
        token_weights=weights,
        sorted_pairs=sorted_pairs.to(torch.int32),
        seg_slot=seg_slot.to(torch.int32),
        seg_start=seg_start.to(torch.int32),
        seg_len=seg_len.to(torch.int32),
        num_slots=L,
        chunk=chunk,
    )
    if out is None:
        return fresh
    if out.num_slots != L or out.chunk != chunk:
        raise ValueError(f"out buffers were made for num_slots={out.num_slots}, chunk={out.chunk}")
    for name in ("token_slots", "token_weights", "sorted_pairs", "seg_slot", "seg_start", "seg_len"):
        dst, src = getattr(out, name), getattr(fresh, name)
        if dst.shape != src.shape:
            raise ValueError(f"out.{name} has shape {tuple(dst.shape)}, expected {tuple(src.shape)}")
        dst.copy_(src)
    return out


class LoRAMetaBuffers:
    """Preallocated :class:`LoRAMeta` storage for a fixed (padded) token count, for CUDA-graph capture.

    ``fill(token_slots, token_weights)`` rebuilds the metadata in place; the tensors' addresses never change.
    """

    def __init__(self, num_tokens: int, k: int, num_slots: int, device, chunk: int | None = None):
        chunk = chunk or choose_chunk(num_tokens * k)
        G = -(-num_tokens // chunk) + num_slots

        def i32(*shape):
            return torch.zeros(shape, dtype=torch.int32, device=device)

        self.meta = LoRAMeta(
            token_slots=i32(num_tokens, k) - 1,
            token_weights=torch.ones(num_tokens, k, dtype=torch.float32, device=device),
            sorted_pairs=i32(k * num_tokens),
            seg_slot=i32(k, G) - 1,
            seg_start=i32(k, G),
            seg_len=i32(k, G),
            num_slots=num_slots,
            chunk=chunk,
        )

    def fill(self, token_slots: torch.Tensor, token_weights: torch.Tensor | None = None) -> LoRAMeta:
        return build_lora_meta(token_slots, self.meta.num_slots, token_weights, out=self.meta)


def tokens_from_rows(
    row_slots: torch.Tensor,
    row_weights: torch.Tensor | None = None,
    *,
    lengths: torch.Tensor | None = None,
    num_tokens: int | None = None,
    attention_mask: torch.Tensor | None = None,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Expand per-row (per-sequence) slots to per-token slots, in the order the model flattens tokens.

    Args:
        row_slots: ``(B,)`` or ``(B, K)`` slot ids per row (``-1`` = no adapter).
        row_weights: ``(B, K)`` weights per row, or ``None``.
        lengths + num_tokens: packed layout (varlen prefill / decode): row ``b`` owns ``lengths[b]`` consecutive
            tokens and ``num_tokens == lengths.sum()`` (passed so no host sync is needed).
        attention_mask: padded layout ``(B, S)``: every row owns ``S`` tokens; masked positions (0) get ``-1``.
        seq_len: padded layout without a mask: every row owns ``seq_len`` tokens.
    Returns:
        ``(token_slots (T, K), token_weights (T, K) or None)``.
    """
    row_slots = _as_2d(row_slots)
    B, K = row_slots.shape
    if row_weights is not None:
        row_weights = _as_2d(row_weights)
        if row_weights.shape != (B, K):
            raise ValueError(f"row_weights must have shape {(B, K)}, got {tuple(row_weights.shape)}")
    if lengths is not None:
        if num_tokens is None:
            raise ValueError("num_tokens is required with lengths (it avoids a host synchronization)")
        lengths = lengths.to(device=row_slots.device)
        if lengths.shape != (B,):
            raise ValueError(f"lengths must have shape {(B,)}, got {tuple(lengths.shape)}")
        slots = torch.repeat_interleave(row_slots, lengths, dim=0, output_size=num_tokens)
        weights = None
        if row_weights is not None:
            weights = torch.repeat_interleave(row_weights, lengths, dim=0, output_size=num_tokens)
        return slots, weights
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B:
            raise ValueError(f"attention_mask must have shape (B={B}, S), got {tuple(attention_mask.shape)}")
        seq_len = attention_mask.shape[1]
    if seq_len is None:
        raise ValueError("give lengths + num_tokens (packed), attention_mask or seq_len (padded)")
    slots = row_slots[:, None, :].expand(B, seq_len, K)
    if attention_mask is not None:
        keep = attention_mask.to(device=row_slots.device, dtype=torch.bool)[:, :, None]
        slots = torch.where(keep, slots, torch.full_like(slots, -1))
    weights = None
    if row_weights is not None:
        weights = row_weights[:, None, :].expand(B, seq_len, K).reshape(B * seq_len, K)
    return slots.reshape(B * seq_len, K), weights
