"""The spec checked against an independent dense formulation (per-token merged weights, W_eff = W + s*B@A)."""

import torch
from lora_cases import make_case
from utils import assert_close

from pllm_kernels.reference.lora import lora_apply_ref, lora_shrink_ref


def dense_delta(c):
    """delta[t] = sum_k w * scale * x[t] @ (B[slot, :, :r] @ A_cat[slot, :r]).T, slices handled as blocks."""
    T, K = c.token_slots.shape
    x = c.x.double()
    out = torch.zeros(T, sum(c.slice_sizes), dtype=torch.float64)
    off = [0]
    for n in c.slice_sizes:
        off.append(off[-1] + n)
    for t in range(T):
        for k in range(K):
            slot = int(c.token_slots[t, k])
            if slot < 0:
                continue
            r = int(c.slot_ranks[slot])
            for s in range(len(c.slice_sizes)):
                w_delta = c.lora_b[slot, off[s] : off[s + 1], :r].double() @ c.lora_a[slot, s, :r].double()
                out[t, off[s] : off[s + 1]] += (
                    float(c.token_weights[t, k]) * float(c.slot_scales[slot]) * (w_delta @ x[t])
                )
    return out


def test_apply_matches_dense_merged_weights():
    c = make_case(T=11, h_in=13, slice_sizes=(6, 3, 3), ranks=(4, 1, 0, 3), max_rank=4, K=2, seed=3)
    y0 = c.y.double()
    y = lora_apply_ref(y0.clone(), c.x.double(), c.lora_a.double(), c.lora_b.double(), c.token_slots,
                       c.token_weights, c.slot_ranks, c.slot_scales, c.slice_sizes)
    assert_close(y, y0 + dense_delta(c), torch.float64)


def test_rows_without_adapter_untouched_and_padding_ignored():
    c = make_case(T=6, h_in=8, ranks=(2, 3), max_rank=4, slots=[[-1], [0], [-1], [1], [0], [-1]], seed=1)
    y0 = c.y.clone()
    y = lora_apply_ref(c.y.clone(), c.x, c.lora_a, c.lora_b, c.token_slots, None, c.slot_ranks, c.slot_scales)
    for t in (0, 2, 5):
        assert torch.equal(y[t], y0[t])
    assert not torch.equal(y[1], y0[1])
    # Changing the padding rows beyond a slot's rank changes nothing.
    a2 = c.lora_a.clone()
    a2[0, :, 2:] = 1e3
    v1 = lora_shrink_ref(c.x, c.lora_a, c.token_slots, c.slot_ranks)
    v2 = lora_shrink_ref(c.x, a2, c.token_slots, c.slot_ranks)
    assert torch.equal(v1, v2)
