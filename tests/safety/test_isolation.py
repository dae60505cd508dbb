"""Isolation (issue "one personalization plan per forward", defect 3): values no row is routed to never reach a row.

A poisoned slot buffer: slot 0 is unused and full of NaN / inf, slot 1 has rank 2 of a rank-8 buffer with NaN / inf
in the padding beyond its rank, slot 2 has rank 0 and NaN everywhere, slot 3 is clean. Tokens route to -1, 1, 2, 3
(K = 2: the second column mostly -1). On every backend and path: rows without an adapter (and rows whose only
adapter has rank 0) are bitwise unchanged, and every other row equals the float64 reference computed on a clean
copy of the buffers (the poison is where the spec says nothing is read).
"""

from __future__ import annotations

import pytest
import torch
from utils import assert_close

from pllm_kernels.batch import build_lora_meta
from pllm_kernels.ops import lora as ops
from pllm_kernels.reference.lora import lora_apply_ref

T, H, R, SIZES = 11, 24, 8, (16, 8)
RANKS = (4, 2, 0, 8)  # slot 0 unused; 1 = rank 2 with poisoned padding; 2 = rank 0 poisoned; 3 clean
SLOTS = [[-1, -1], [1, -1], [2, -1], [3, 1], [1, 3], [-1, -1], [3, -1], [2, 2], [1, 1], [-1, 2], [3, -1]]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _case(dtype, poison):
    g = torch.Generator().manual_seed(5)
    S, N = len(SIZES), sum(SIZES)
    a = torch.randn(4, S, R, H, generator=g) / H**0.5
    b = torch.randn(4, N, R, generator=g) / R**0.5
    clean_a, clean_b = a.clone(), b.clone()
    a[0], b[0] = poison, poison  # unused slot
    a[1, :, 2:], b[1, :, 2:] = poison, poison  # beyond slot 1's rank
    a[2], b[2] = poison, poison  # rank-0 slot
    # the clean copy holds what the spec reads: zeros where the poison is (never read)
    clean_a[0], clean_b[0] = 0, 0
    clean_a[1, :, 2:], clean_b[1, :, 2:] = 0, 0
    clean_a[2], clean_b[2] = 0, 0
    x = torch.randn(T, H, generator=g)
    y = torch.randn(T, N, generator=g)
    y[0, :3] = -0.0  # signed zeros in an untouched row must stay signed
    y[5, 1] = -0.0
    slots = torch.tensor(SLOTS, dtype=torch.int32)
    w = torch.rand(T, 2, generator=g) + 0.5
    ranks = torch.tensor(RANKS, dtype=torch.int32)
    scales = torch.rand(4, generator=g) + 0.5
    meta = build_lora_meta(slots, 4, w)
    cast = dict(dtype=dtype)
    return dict(x=x.to(**cast), y=y.to(**cast), a=a.to(**cast), b=b.to(**cast), clean_a=clean_a, clean_b=clean_b,
                slots=slots, w=w, ranks=ranks, scales=scales, meta=meta)


def _check(c, y, dtype):
    expected = lora_apply_ref(c["y"].double().clone(), c["x"].double(), c["clean_a"].to(dtype).double(),
                              c["clean_b"].to(dtype).double(), c["slots"], c["w"], c["ranks"], c["scales"], SIZES)
    untouched = torch.tensor([all(s < 0 or RANKS[s] == 0 for s in row) for row in SLOTS])
    assert torch.isfinite(y).all(), "poison reached a row"
    no_adapter = torch.tensor([all(s < 0 for s in row) for row in SLOTS])
    assert torch.equal(_bits(y[no_adapter]), _bits(c["y"][no_adapter])), "a row without adapter changed"
    # rows whose only adapters have rank 0 hold y + 0 (values unchanged; the reference may turn -0.0 into +0.0)
    assert torch.equal(y[untouched], c["y"][untouched])
    assert_close(y, expected, dtype, msg="rows with adapters")


POISONS = [float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("poison", POISONS, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("strategy", ["gather", "runs", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_torch_apply_isolated(strategy, dtype, poison):
    c = _case(dtype, poison)
    y = c["y"].clone()
    ops.lora_apply(y, c["x"], c["a"], c["b"], c["ranks"], c["scales"], c["meta"], SIZES, backend="torch",
                   strategy=strategy)
    _check(c, y, dtype)


@pytest.mark.parametrize("poison", POISONS, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_shrink_expand_isolated(dtype, poison):
    c = _case(dtype, poison)
    y = c["y"].clone()
    v = ops.lora_shrink(c["x"], c["a"], c["ranks"], c["meta"], backend="torch")
    assert torch.isfinite(v).all()
    ops.lora_expand(y, v, c["b"], c["ranks"], c["scales"], c["meta"], SIZES, backend="torch")
    _check(c, y, dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("poison", POISONS, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("path", ["sgmv", "bgmv", "fused"])
def test_triton_apply_isolated(path, poison):
    from pllm_kernels.triton.lora import lora_apply_triton

    c = _case(torch.float32, poison)
    m = c["meta"]
    y = c["y"].clone()
    lora_apply_triton(y, c["x"], c["a"], c["b"], c["ranks"], c["scales"], m.token_slots, m.token_weights,
                      m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, SIZES, chunk=m.chunk, path=path)
    _check(c, y, torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("poison", [float("nan")], ids=["nan"])
def test_triton_ops_isolated(poison):
    c = _case(torch.float16, poison)
    y = c["y"].clone()
    ops.lora_apply(y, c["x"], c["a"], c["b"], c["ranks"], c["scales"], c["meta"], SIZES, backend="triton")
    _check(c, y, torch.float16)
    y = c["y"].clone()
    v = ops.lora_shrink(c["x"], c["a"], c["ranks"], c["meta"], backend="triton")
    assert torch.isfinite(v).all()
    ops.lora_expand(y, v, c["b"], c["ranks"], c["scales"], c["meta"], SIZES, backend="triton")
    _check(c, y, torch.float16)
