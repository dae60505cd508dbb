"""The per-forward LoRA routing metadata consumed by every lora op (built by :mod:`pllm_kernels.batch`).

Token-level, sort-by-index design (vLLM ``LoRAKernelMeta``) with SGLang-csgmv-style fixed-size chunks, extended
to K weighted slots per token. Every field is a device tensor of a size fixed by ``(num_tokens, K, num_slots,
chunk)`` so the buffers can be preallocated once and refilled for CUDA-graph replay; nothing here needs a
host synchronization to build or to use.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LoRAMeta(NamedTuple):
    """Routing of ``num_tokens`` tokens, each to K weighted adapter slots of a ``num_slots`` buffer.

    Pair index ``p = k * num_tokens + t`` (k-major) names token ``t``'s k-th slot.

    * ``token_slots``   ``(T, K)`` int32, ``-1`` = no adapter (out-of-range ids are routed nowhere).
    * ``token_weights`` ``(T, K)`` float32.
    * ``sorted_pairs``  ``(K*T,)`` int32: pairs stably sorted by (k, slot), "no adapter" last within each k.
    * ``seg_slot``      ``(K, G)`` int32: slot of each chunk (``-1`` = unused chunk).
    * ``seg_start``     ``(K, G)`` int32: first position of the chunk in ``sorted_pairs``.
    * ``seg_len``       ``(K, G)`` int32: rows in the chunk, ``0 <= len <= chunk``.

    ``G = ceil(T / chunk) + num_slots`` bounds the chunks of one k column. The chunks of one k column never
    touch the same token twice, so an expand over one k column is race-free.
    """

    token_slots: torch.Tensor
    token_weights: torch.Tensor
    sorted_pairs: torch.Tensor
    seg_slot: torch.Tensor
    seg_start: torch.Tensor
    seg_len: torch.Tensor
    num_slots: int
    chunk: int

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]

    @property
    def k(self) -> int:
        return self.token_slots.shape[1]

    @property
    def device(self) -> torch.device:
        return self.token_slots.device
