"""``PersonalBatch``: everything the patched layers need to personalize one forward, one typed part per layer.

Built once per forward (prefill and every decode step) from the request's :class:`~pllm_kernels.batch.BatchPlan`,
on the tokens' device, with torch ops only and no host synchronization, and read by every patched layer. It
belongs to one call: layers keep their per-forward scratch (``scratch``) here, never on the module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pllm_kernels.batch.routing import LoRAMeta, _as_2d, build_lora_meta, tokens_from_rows

__all__ = ["PersonalBatch", "SteerBatch"]


@dataclass
class SteerBatch:
    """Per-token steering of one forward: ``token_slots`` / ``token_scales`` ``(T, len(layers), Ks)`` (``-1`` = none;
    padding positions are ``-1``), the layers' tables (``layer -> (vectors, modes)``), and whether the fused
    steer + next-RMSNorm path serves this forward (``fused``: no autograd, so the residual may be steered in
    place)."""

    layers: tuple[int, ...]
    token_slots: torch.Tensor
    token_scales: torch.Tensor
    tables: dict
    fused: bool = False

    def __post_init__(self):
        self.index = {layer: i for i, layer in enumerate(self.layers)}

    def at(self, layer: int):
        """``(token_slots (T, Ks), token_scales (T, Ks), vectors, modes)`` of ``layer``, or ``None``."""
        i = self.index.get(layer)
        if i is None:
            return None
        vectors, modes = self.tables[layer]
        return self.token_slots[:, i], self.token_scales[:, i], vectors, modes


@dataclass
class PersonalBatch:
    """The personalization of one forward, keyed by token.

    * ``lora``: token -> adapter slot(s) + weight routing (:class:`LoRAMeta`), or ``None`` (no adapters).
    * ``lora_slots``: the slots the batch uses (host ints; lets a layer skip itself without a sync), ``None`` =
      unknown (the layer runs).
    * ``steering``: per-token steering (:class:`SteerBatch`) or ``None``.
    * ``prompts``, ``decoding``: the soft-prompt and decoding parts (``None`` when not in use).
    * ``scratch``: per-forward values shared between layers (e.g. a q/k/v group's deltas); never shared between
      concurrent forwards.
    """

    lora: LoRAMeta | None = None
    lora_slots: tuple[int, ...] | None = None
    steering: SteerBatch | None = None
    prompts: Any = None
    decoding: Any = None
    scratch: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_rows(
        cls,
        row_slots: torch.Tensor,
        num_slots: int,
        row_weights: torch.Tensor | None = None,
        *,
        lengths: torch.Tensor | None = None,
        num_tokens: int | None = None,
        attention_mask: torch.Tensor | None = None,
        seq_len: int | None = None,
        chunk: int | None = None,
        out: LoRAMeta | None = None,
        active_slots=None,
    ) -> PersonalBatch:
        """Build the batch from per-row slots ``(B,)`` / ``(B, K)`` (``-1`` = no adapter); see
        :func:`~pllm_kernels.batch.tokens_from_rows` for the packed and padded layouts."""
        if not isinstance(row_slots, torch.Tensor):
            raise ValueError(f"row_slots must be a torch.Tensor, got {type(row_slots).__name__}")
        if row_slots.dim() not in (1, 2):
            raise ValueError(f"row_slots must have shape (B,) or (B, K), got {tuple(row_slots.shape)}")
        slots, weights = tokens_from_rows(
            _as_2d(row_slots), row_weights, lengths=lengths, num_tokens=num_tokens, attention_mask=attention_mask,
            seq_len=seq_len,
        )
        meta = build_lora_meta(slots, num_slots, weights, chunk=chunk, out=out)
        return cls(lora=meta, lora_slots=None if active_slots is None else tuple(active_slots))
