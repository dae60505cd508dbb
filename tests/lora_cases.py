"""Random multi-LoRA problems shared by the op, Triton and CUDA tests (fresh random inputs, never zeros)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pllm_kernels.batch import build_lora_meta


@dataclass
class LoRACase:
    x: torch.Tensor
    y: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    slot_ranks: torch.Tensor
    slot_scales: torch.Tensor
    token_slots: torch.Tensor
    token_weights: torch.Tensor
    slice_sizes: list
    meta: object

    def args64(self):
        """Float64 copies for evaluating the reference."""
        return dict(
            x=self.x.double(), y=self.y.double(), lora_a=self.lora_a.double(), lora_b=self.lora_b.double(),
        )


def make_case(T=7, h_in=32, slice_sizes=(24,), ranks=(8, 4, 1), max_rank=8, K=1, dtype=torch.float32,
              none_frac=0.25, seed=0, slots=None, x_noncontig=False, y_noncontig=False, chunk=None,
              device="cpu", neg_zeros=False) -> LoRACase:
    """``neg_zeros``: every third column of y holds -0.0 (in every row), so that a "+ 0" write to a row without
    adapter changes its bits (see ``utils.assert_bitwise_equal``); adapted rows are unaffected numerically."""
    g = torch.Generator().manual_seed(seed)
    L = len(ranks)
    S = len(slice_sizes)
    N = sum(slice_sizes)
    # Scale so outputs are O(1): x ~ 1, A ~ 1/sqrt(h), B ~ 1/sqrt(r).
    a = torch.randn(L, S, max_rank, h_in, generator=g) / h_in**0.5
    b = torch.randn(L, N, max_rank, generator=g) / max_rank**0.5
    # Padding beyond each slot's rank holds garbage that every backend must ignore.
    # Non-contiguous views are cut after the cast: .to() of a non-dense view (another dtype or device) is contiguous.
    cast = dict(dtype=dtype, device=device)
    if x_noncontig:
        x = torch.randn(T, 2 * h_in, generator=g).to(**cast)[:, ::2]
    else:
        x = torch.randn(T, h_in, generator=g)
    if y_noncontig:
        y = torch.randn(T, N + 5, generator=g).to(**cast)[:, 3 : 3 + N]
    else:
        y = torch.randn(T, N, generator=g)
    if slots is None:
        slots = torch.randint(0, L, (T, K), generator=g)
        drop = torch.rand(T, K, generator=g) < none_frac
        slots = torch.where(drop, torch.full_like(slots, -1), slots)
    slots = torch.as_tensor(slots).reshape(T, -1).to(torch.int32)
    K = slots.shape[1]
    weights = (torch.rand(T, K, generator=g) + 0.5).float()
    scales = (torch.rand(L, generator=g) + 0.5).float()
    x, y, a, b = x.to(**cast), y.to(**cast), a.to(**cast), b.to(**cast)
    if neg_zeros:
        y[:, ::3] = -0.0
    slots, weights = slots.to(device), weights.to(device)
    return LoRACase(
        x=x, y=y, lora_a=a, lora_b=b,
        slot_ranks=torch.tensor(ranks, dtype=torch.int32, device=device),
        slot_scales=scales.to(device), token_slots=slots, token_weights=weights, slice_sizes=list(slice_sizes),
        meta=build_lora_meta(slots, L, weights, chunk=chunk),
    )
