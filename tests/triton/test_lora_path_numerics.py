"""A token's LoRA delta does not depend on the path its batch takes (fused for tiny batches, BGMV for decode sizes,
SGMV for prefill): same token, same adapter, batches of 1, 32 and 100 tokens through ``backend="triton"`` with the
auto path, and every path forced explicitly. SGMV keeps the shrink output fp32-accurate on tensor cores (hi + lo
split), like BGMV and fused keep it in fp32."""

from __future__ import annotations

import pytest
import torch
from utils import assert_close

from pllm_kernels.batch import build_lora_meta
from pllm_kernels.ops import lora as ops
from pllm_kernels.triton.lora import choose_path, lora_apply_triton

pytestmark = pytest.mark.interpreter


def _weights(dtype, L=3, S=2, R=16, H=64, sizes=(48, 16)):
    g = torch.Generator().manual_seed(2)
    a = (torch.randn(L, S, R, H, generator=g) / H**0.5).to(dtype)
    b = (torch.randn(L, sum(sizes), R, generator=g) / R**0.5).to(dtype)
    return a, b, torch.tensor([16, 8, 4], dtype=torch.int32), torch.tensor([2.0, 1.0, 0.5]), list(sizes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_delta_same_on_every_path(dtype):
    a, b, ranks, scales, sizes = _weights(dtype)
    g = torch.Generator().manual_seed(5)
    probe = torch.randn(1, 64, generator=g).to(dtype)
    deltas = {}
    for T in (1, 32, 100):
        x = torch.cat([probe, torch.randn(T - 1, 64, generator=g).to(dtype)])
        slots = torch.cat([torch.tensor([[1]]), torch.randint(0, 3, (T - 1, 1), generator=g)]).to(torch.int32)
        meta = build_lora_meta(slots, 3)
        y = torch.zeros(T, sum(sizes), dtype=dtype)
        ops.lora_apply(y, x, a, b, ranks, scales, meta, sizes, backend="triton")
        deltas[f"auto T={T} ({choose_path('auto', T, 'apply', sr=32, num_slices=2, a_bytes=0)})"] = y[0].float()
        for path in ("sgmv", "bgmv", "fused") if T == 32 else ():
            y = torch.zeros(T, sum(sizes), dtype=dtype)
            lora_apply_triton(y, x, a, b, ranks, scales, meta.token_slots, meta.token_weights, meta.sorted_pairs,
                              meta.seg_slot, meta.seg_start, meta.seg_len, sizes, chunk=meta.chunk, path=path)
            deltas[path] = y[0].float()
    ref = deltas["bgmv"]
    for name, d in deltas.items():
        if dtype == torch.float32:
            assert_close(d, ref, torch.float32, scale=float(ref.abs().max()), msg=name)
        else:  # fp16 outputs: at most one rounding step of the output apart
            ulp = torch.finfo(torch.float16).eps * ref.abs().clamp_min(2**-14)
            assert bool(((d - ref).abs() <= ulp + 1e-7).all()), f"{name}: max diff {float((d - ref).abs().max())}"
