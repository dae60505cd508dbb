"""GPU-only checks of the lora ops (skipped on CPU CI): bf16/fp16 Triton paths at real sizes, CUDA-graph capture and
replay with refilled routing buffers, torch.compile(fullgraph=True) on CUDA."""

import os

import pytest
import torch
from lora_cases import make_case
from utils import assert_close

from pllm_kernels.batch import LoRAMetaBuffers, build_lora_meta
from pllm_kernels.ops import lora as ops
from pllm_kernels.reference.lora import lora_apply_ref

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def triton_backend():
    from pllm_kernels.ops._backend import set_default_backend

    prev = set_default_backend(os.environ.get("PLLM_TEST_BACKEND", "triton"))
    yield
    set_default_backend(prev)


def _ref(c):
    return lora_apply_ref(c.y.double().cpu().clone(), c.x.double().cpu(), c.lora_a.double().cpu(),
                          c.lora_b.double().cpu(), c.token_slots.cpu(), c.token_weights.cpu(), c.slot_ranks.cpu(),
                          c.slot_scales.cpu(), c.slice_sizes)


GPU_CASES = [
    dict(T=1, h_in=4096, slice_sizes=(4096, 1024, 1024), ranks=(16,), max_rank=16),
    dict(T=64, h_in=4096, slice_sizes=(4096,), ranks=tuple([16] * 64), max_rank=16, slots=list(range(64))),
    dict(T=37, h_in=2049, slice_sizes=(111, 64), ranks=(1, 8, 16, 64, 8), max_rank=64, K=2),
    dict(T=300, h_in=1024, slice_sizes=(2048, 2048), ranks=(8, 64, 16), max_rank=64, none_frac=0.3),
    dict(T=2048, h_in=512, slice_sizes=(512,), ranks=(8, 16), max_rank=16, x_noncontig=True, y_noncontig=True),
    dict(T=50, h_in=256, slice_sizes=(128,), ranks=(8,), max_rank=8, none_frac=1.0),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_apply_gpu_matches_reference(case, dtype):
    c = make_case(dtype=dtype, seed=case, device="cuda", **GPU_CASES[case])
    y0, expected = c.y.clone(), _ref(c)
    ops.lora_apply(c.y, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes)
    torch.cuda.synchronize()
    # fp32 on GPU: tl.dot runs in ieee fp32 for fp32 inputs, so the fp32 row of the table applies.
    assert_close(c.y, expected, dtype)
    untouched = (c.token_slots < 0).all(dim=1)
    assert torch.equal(c.y[untouched], y0[untouched])


def test_cuda_graph_capture_and_replay():
    T, L = 48, 6
    c = make_case(T=T, h_in=512, slice_sizes=(256, 64, 64), ranks=(8, 16, 1, 16, 8, 4), max_rank=16,
                  dtype=torch.bfloat16, device="cuda")
    bufs = LoRAMetaBuffers(T, 1, L, "cuda")
    x, y = c.x.clone(), torch.empty_like(c.y)
    y_base = c.y.clone()

    def step():
        y.copy_(y_base)
        ops.lora_apply(y, x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, bufs.meta, c.slice_sizes)

    # make_case draws random token weights and the reference reads them: the captured fill must route them too
    bufs.fill(c.token_slots, c.token_weights)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm up (Triton compiles here)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        bufs.fill(c.token_slots, c.token_weights)
        step()
    for seed in range(3):
        slots = torch.randint(-1, L, (T, 1), generator=torch.Generator().manual_seed(seed)).cuda()
        c.token_slots.copy_(slots)  # the captured fill reads this tensor
        g.replay()
        torch.cuda.synchronize()
        c.meta = build_lora_meta(slots, L, c.token_weights)
        c.y = y_base.clone()
        assert_close(y, _ref(c), torch.bfloat16)


def test_torch_compile_fullgraph_cuda():
    c = make_case(T=16, h_in=256, slice_sizes=(128, 64), ranks=(8, 16), max_rank=16, K=2, dtype=torch.float16,
                  device="cuda")

    def layer(x, y, meta):
        y = y * 1.0
        ops.lora_apply(y, x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, meta, c.slice_sizes)
        return y

    got = torch.compile(layer, fullgraph=True)(c.x, c.y, c.meta)
    assert_close(got, layer(c.x, c.y, c.meta), torch.float16)
