"""Triton multi-LoRA kernels vs the float64 reference, under ``TRITON_INTERPRET=1`` (fp32 and fp16).

Run: ``TRITON_INTERPRET=1 pytest -m interpreter tests/triton/test_lora_triton.py``. Every path (sgmv, bgmv,
fused) of shrink / expand / apply is forced explicitly; inputs are fresh random non-zero tensors, including the
rank padding of A, B and v (garbage that must be ignored), mixed ranks 1/8/16/64 in one R = 64 buffer, rows
without adapter, K = 2 weighted slots, S = 1, S = 3 and S = 6 slices of different widths (6 > ``_MAX_SLICES``:
the expand launches run in two slice groups), non-contiguous x and y. Rows without adapter are compared bit for bit
with -0.0 planted in y.
bf16 is checked only by ``test_apply_gpu`` (marker ``gpu``): ``tl.dot`` on bf16 is wrong under the interpreter.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch
from utils import assert_bitwise_equal, assert_close

from pllm_kernels.batch import build_lora_meta
from pllm_kernels.ops import lora as ops
from pllm_kernels.reference.lora import lora_apply_ref, lora_expand_ref, lora_shrink_ref
from pllm_kernels.triton import lora as tl_lora
from pllm_kernels.triton.lora import choose_path, lora_apply_triton, lora_expand_triton, lora_shrink_triton

interpreter = pytest.mark.interpreter


@dataclass
class Case:
    T: int
    H: int
    L: int
    S: int
    R: int
    sizes: tuple
    K: int = 1
    ranks: tuple | None = None  # per slot (cycled); default R
    p_none: float = 0.25  # fraction of (t, k) without adapter
    x_layout: str = "contig"  # contig | stride2 | transposed
    y_layout: str = "contig"  # contig | colslice
    chunk: int | None = None


CASES = {
    # odd hidden, mixed ranks 1/8/16/64 (R = 64), transposed x, y a column slice of a wider tensor
    "odd111_mixed": Case(T=37, H=111, L=5, S=1, R=64, sizes=(48,), ranks=(1, 8, 16, 64, 0), x_layout="transposed",
                         y_layout="colslice", chunk=32),
    # qkv-like: 3 slices of different widths, K = 2 weighted slots, strided x
    "qkv_k2": Case(T=13, H=64, L=4, S=3, R=16, sizes=(40, 16, 16), K=2, ranks=(16, 8, 1, 16), x_layout="stride2"),
    # hidden 2049 with few tokens and slots: split-K and masking of the K tail
    "h2049": Case(T=3, H=2049, L=2, S=1, R=8, sizes=(24,), ranks=(8, 1), p_none=0.0),
    # many slots (33) and a few hundred tokens: many chunks, most chunks of one slot partial
    "many_slots": Case(T=200, H=32, L=33, S=1, R=16, sizes=(32,), ranks=(16, 8, 1), p_none=0.1, chunk=64),
    # decode-sized, for the fused kernel
    "qkv_small": Case(T=4, H=40, L=3, S=3, R=16, sizes=(32, 16, 16), K=2, ranks=(16, 1, 8), x_layout="stride2",
                      y_layout="colslice"),
    "mixed_small": Case(T=5, H=111, L=4, S=1, R=64, sizes=(33,), ranks=(64, 8, 1, 16), x_layout="transposed"),
    # 6 slices (> _MAX_SLICES = 4) of different widths: two expand launch groups, the second at slice base 4
    "six_slices": Case(T=9, H=24, L=3, S=6, R=8, sizes=(16, 8, 8, 24, 12, 4), K=2, ranks=(8, 4, 1),
                       x_layout="stride2", y_layout="colslice"),
    # buffer rank 12 (not a multiple of 8): VEC_R = 1, element-wise rank loads
    "r12": Case(T=6, H=40, L=3, S=2, R=12, sizes=(24, 8), K=2, ranks=(12, 5, 1), x_layout="stride2",
                y_layout="colslice"),
    # one decode token: the table's T*K <= 2 entries (BGMV shrink BLOCK_K 64) and split-K 4 partials
    "decode1": Case(T=1, H=300, L=2, S=3, R=16, sizes=(32, 16, 16), ranks=(16, 8), p_none=0.0),
}
SGMV_CASES = ("odd111_mixed", "qkv_k2", "h2049", "many_slots", "six_slices", "r12")
DECODE_CASES = ("odd111_mixed", "qkv_k2", "h2049", "six_slices", "r12")  # bgmv/fused: per-token kernels, T small


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _build(case: Case, dtype: torch.dtype, g: torch.Generator, *, all_none: bool = False):
    T, H, L, S, R, K = case.T, case.H, case.L, case.S, case.R, case.K
    N = sum(case.sizes)
    if case.x_layout == "stride2":
        x = torch.randn(T, 2 * H, generator=g).to(dtype)[:, ::2]
    elif case.x_layout == "transposed":
        x = torch.randn(H, T, generator=g).to(dtype).t()
    else:
        x = torch.randn(T, H, generator=g).to(dtype)
    lora_a = (torch.randn(L, S, R, H, generator=g) / H**0.5).to(dtype)  # whole buffer random: padding = garbage
    lora_b = (torch.randn(L, N, R, generator=g) / R**0.5).to(dtype)
    ranks = torch.tensor([(case.ranks or (R,))[i % len(case.ranks or (R,))] for i in range(L)], dtype=torch.int32)
    scales = 0.5 + torch.rand(L, generator=g)
    slots = torch.randint(0, L, (T, K), generator=g, dtype=torch.int32)
    none = torch.rand(T, K, generator=g) < case.p_none
    slots[none] = -1
    if all_none:
        slots.fill_(-1)
    weights = 0.5 + torch.rand(T, K, generator=g)
    if case.y_layout == "colslice":
        y_full = torch.randn(T, N + 7, generator=g).to(dtype)
        y = y_full[:, 3 : 3 + N]
    else:
        y_full = torch.randn(T, N, generator=g).to(dtype)
        y = y_full
    y_full[:, ::3] = -0.0  # a "+ 0" read-modify-write of a no-adapter row would turn these into +0.0 (bits differ)
    meta = build_lora_meta(slots, L, weights, chunk=case.chunk)
    return dict(x=x, lora_a=lora_a, lora_b=lora_b, ranks=ranks, scales=scales, slots=slots, weights=weights,
                y=y, y_full=y_full, meta=meta)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype):
    """tests/utils.py tolerance of the input dtype; atol scaled by max|ref| (sums of up to 2049 products)."""
    assert_close(out, ref, dtype, scale=ref.abs().max().item())


def _meta_args(m):
    return m.token_slots, m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len


def _shrink_ref(d):
    return lora_shrink_ref(d["x"].double(), d["lora_a"].double(), d["slots"], d["ranks"])


def _expand_ref(d, y0, v, sizes):
    return lora_expand_ref(y0.double(), v.double(), d["lora_b"].double(), d["slots"], d["weights"].double(),
                           d["ranks"], d["scales"].double(), sizes)


def _check_y(d, y_full0, ref, dtype, case):
    """Compare the adapted rows; rows without adapter and columns outside y must be bit-for-bit untouched."""
    y, y_full = d["y"], d["y_full"]
    has = (d["slots"] >= 0).any(1)
    _assert_close(y[has], ref[has], dtype)
    n = y.shape[1]
    if case.y_layout == "colslice":
        assert_bitwise_equal(y_full[:, :3], y_full0[:, :3], msg="columns left of y")
        assert_bitwise_equal(y_full[:, 3 + n :], y_full0[:, 3 + n :], msg="columns right of y")
        y_full0 = y_full0[:, 3 : 3 + n]
    assert_bitwise_equal(y[~has], y_full0[~has], msg="rows without adapter")


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path,name", [("sgmv", n) for n in SGMV_CASES] + [("bgmv", n) for n in DECODE_CASES])
def test_shrink(path, name, dtype):
    case = CASES[name]
    d = _build(case, dtype, _gen("shrink", path, name, dtype))
    m = d["meta"]
    out = torch.randn(case.S, case.K * case.T, case.R, generator=_gen("garbage", name))  # must be overwritten
    lora_shrink_triton(d["x"], d["lora_a"], d["ranks"], *_meta_args(m), out, chunk=m.chunk, path=path)
    _assert_close(out, _shrink_ref(d), dtype)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path,name", [("sgmv", n) for n in SGMV_CASES] + [("bgmv", n) for n in DECODE_CASES])
def test_expand(path, name, dtype):
    case = CASES[name]
    g = _gen("expand", path, name, dtype)
    d = _build(case, dtype, g)
    m = d["meta"]
    v = torch.randn(case.S, case.K * case.T, case.R, generator=g)  # padding beyond rank = garbage
    y_full0 = d["y_full"].clone()
    ref = _expand_ref(d, d["y"].clone(), v, case.sizes)
    lora_expand_triton(d["y"], v, d["lora_b"], d["ranks"], d["scales"], m.token_slots, m.token_weights,
                       m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, case.sizes, chunk=m.chunk, path=path)
    _check_y(d, y_full0, ref, dtype, case)


APPLY = [("sgmv", n) for n in SGMV_CASES] + [("bgmv", "qkv_k2"), ("bgmv", "odd111_mixed")]
APPLY += [("bgmv", "six_slices"), ("bgmv", "r12")]
APPLY += [("bgmv", "h2049"), ("bgmv", "decode1")]  # split-K partials (16 and 4) summed by the BGMV expand
APPLY += [("fused", "qkv_small"), ("fused", "mixed_small"), ("fused", "h2049"), ("fused", "r12")]


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path,name", APPLY)
def test_apply(path, name, dtype):
    case = CASES[name]
    d = _build(case, dtype, _gen("apply", path, name, dtype))
    m = d["meta"]
    y_full0 = d["y_full"].clone()
    ref = lora_apply_ref(d["y"].double(), d["x"].double(), d["lora_a"].double(), d["lora_b"].double(), d["slots"],
                         d["weights"].double(), d["ranks"], d["scales"].double(), case.sizes)
    lora_apply_triton(d["y"], d["x"], d["lora_a"], d["lora_b"], d["ranks"], d["scales"], m.token_slots,
                      m.token_weights, m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, case.sizes, chunk=m.chunk,
                      path=path)
    _check_y(d, y_full0, ref, dtype, case)


@interpreter
@pytest.mark.parametrize("path", ["sgmv", "bgmv", "fused"])
def test_all_rows_without_adapter_untouched(path):
    case = CASES["qkv_small"]
    d = _build(case, torch.float16, _gen("none", path), all_none=True)
    m = d["meta"]
    y_full0 = d["y_full"].clone()
    lora_apply_triton(d["y"], d["x"], d["lora_a"], d["lora_b"], d["ranks"], d["scales"], m.token_slots,
                      m.token_weights, m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, case.sizes, chunk=m.chunk,
                      path=path)
    assert_bitwise_equal(d["y_full"], y_full0)
    if path != "fused":
        out = torch.randn(case.S, case.K * case.T, case.R, generator=_gen("garbage"))
        lora_shrink_triton(d["x"], d["lora_a"], d["ranks"], *_meta_args(m), out, chunk=m.chunk, path=path)
        assert not out.any()
        v = torch.randn(case.S, case.K * case.T, case.R, generator=_gen("v"))
        lora_expand_triton(d["y"], v, d["lora_b"], d["ranks"], d["scales"], m.token_slots, m.token_weights,
                           m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, case.sizes, chunk=m.chunk, path=path)
        assert_bitwise_equal(d["y_full"], y_full0)


@interpreter
@pytest.mark.parametrize("path", ["sgmv", "bgmv", "fused"])
def test_out_of_range_slots_and_ranks_are_safe(path):
    """Slot ids >= num_slots route nowhere (like -1); ranks above max_rank are clamped to it."""
    case = CASES["qkv_small"]
    d = _build(case, torch.float32, _gen("oob", path))
    bad = d["slots"].clone()
    bad[0, 0], bad[2, 1] = case.L, case.L + 100
    d["ranks"][0] = case.R + 7
    m = build_lora_meta(bad, case.L, d["weights"])
    d["slots"] = torch.where(bad >= case.L, torch.full_like(bad, -1), bad)  # what the reference should see
    y_full0 = d["y_full"].clone()
    ranks_ref = d["ranks"].clamp(max=case.R)
    ref = lora_apply_ref(d["y"].double(), d["x"].double(), d["lora_a"].double(), d["lora_b"].double(), d["slots"],
                         d["weights"].double(), ranks_ref, d["scales"].double(), case.sizes)
    lora_apply_triton(d["y"], d["x"], d["lora_a"], d["lora_b"], d["ranks"], d["scales"], m.token_slots,
                      m.token_weights, m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, case.sizes, chunk=m.chunk,
                      path=path)
    _check_y(d, y_full0, ref, torch.float32, case)


KERNELS = {
    "_lora_shrink_sgmv_kernel": "shrink_sgmv", "_lora_shrink_bgmv_kernel": "shrink_bgmv",
    "_lora_expand_sgmv_kernel": "expand_sgmv", "_lora_expand_bgmv_kernel": "expand_bgmv",
    "_lora_fused_kernel": "fused",
}


class _LaunchSpy:
    """Stands in for a ``@triton.jit`` kernel in the launcher module: records each ``kernel[grid](...)`` launch."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch):
    """The kernels the Triton launchers really launch (names of ``KERNELS``, in launch order)."""
    log = []
    for attr, name in KERNELS.items():
        monkeypatch.setattr(tl_lora, attr, _LaunchSpy(getattr(tl_lora, attr), name, log))
    return log


AUTO = {
    # decode: T*K <= FUSED_MAX_PAIRS, small A, S <= 4 -> one fused launch
    "decode": (Case(T=2, H=24, L=3, S=2, R=16, sizes=(16, 8), ranks=(16, 8, 1)), ["fused"]),
    "decode_k2": (Case(T=4, H=24, L=3, S=3, R=8, sizes=(8, 8, 16), K=2, ranks=(8, 1, 4)), ["fused"]),
    # decode with 6 slices: no fused kernel (S > 4) -> BGMV shrink + two expand launches (slice groups 0-3, 4-5)
    "decode_6_slices": (Case(T=2, H=24, L=3, S=6, R=8, sizes=(16, 8, 8, 24, 12, 4), ranks=(8, 4, 1)),
                        ["shrink_bgmv", "expand_bgmv", "expand_bgmv"]),
    # decode with one slot's A over FUSED_MAX_A_BYTES (16 * 2 * 2049 * 4 B) -> BGMV
    "decode_big_a": (Case(T=2, H=2049, L=2, S=2, R=16, sizes=(8, 8), ranks=(16, 4)), ["shrink_bgmv", "expand_bgmv"]),
    # FUSED_MAX_PAIRS < T*K <= BGMV_MAX_PAIRS -> BGMV
    "small_batch": (Case(T=20, H=24, L=3, S=2, R=16, sizes=(16, 8), ranks=(16, 8, 1)), ["shrink_bgmv", "expand_bgmv"]),
    # prefill: T*K > BGMV_MAX_PAIRS -> SGMV (one expand launch per k column and slice group)
    "prefill": (Case(T=70, H=24, L=3, S=2, R=16, sizes=(16, 8), ranks=(16, 8, 1)), ["shrink_sgmv", "expand_sgmv"]),
    "prefill_6_slices": (Case(T=70, H=24, L=3, S=6, R=8, sizes=(16, 8, 8, 24, 12, 4), ranks=(8, 4, 1)),
                         ["shrink_sgmv", "expand_sgmv", "expand_sgmv"]),
}


@interpreter
@pytest.mark.parametrize("name", list(AUTO))
def test_auto_path(name, launches):
    """What ``backend="triton"`` really launches for real inputs (decode / prefill sized, few / many slices,
    small / large A): the kernels seen by a spy on the launcher module, and results equal to the reference."""
    case, expected = AUTO[name]
    d = _build(case, torch.float32, _gen("auto", name))
    y_full0 = d["y_full"].clone()
    ref = lora_apply_ref(d["y"].double(), d["x"].double(), d["lora_a"].double(), d["lora_b"].double(), d["slots"],
                         d["weights"].double(), d["ranks"], d["scales"].double(), case.sizes)
    ops.lora_apply(d["y"], d["x"], d["lora_a"], d["lora_b"], d["ranks"], d["scales"], d["meta"], list(case.sizes),
                   backend="triton")
    assert launches == expected, f"{name}: launched {launches}, expected {expected}"
    _check_y(d, y_full0, ref, torch.float32, case)


@interpreter
def test_fused_refuses_more_than_four_slices(launches):
    """An explicit fused call with 5 slices is refused with a clear message before anything is launched (auto
    never picks it then: see ``test_auto_path[decode_6_slices]``)."""
    case = Case(T=2, H=16, L=2, S=5, R=4, sizes=(8, 4, 4, 8, 4), ranks=(4, 2))
    d = _build(case, torch.float32, _gen("fused5"))
    m = d["meta"]
    y_full0 = d["y_full"].clone()
    with pytest.raises(ValueError, match="at most 4 slices, got 5"):
        lora_apply_triton(d["y"], d["x"], d["lora_a"], d["lora_b"], d["ranks"], d["scales"], m.token_slots,
                          m.token_weights, m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, case.sizes,
                          chunk=m.chunk, path="fused")
    assert launches == []
    assert_bitwise_equal(d["y_full"], y_full0)
    assert choose_path("auto", 2, "apply", sr=32, num_slices=5, a_bytes=4 * 5 * 16 * 4) == "bgmv"


@interpreter
def test_bad_path():
    d = _build(CASES["qkv_small"], torch.float32, _gen("bad"))
    m = d["meta"]
    out = torch.empty(3, 8, 16)
    with pytest.raises(ValueError):
        lora_shrink_triton(d["x"], d["lora_a"], d["ranks"], *_meta_args(m), out, chunk=m.chunk, path="fused")
    with pytest.raises(ValueError):
        lora_shrink_triton(d["x"], d["lora_a"], d["ranks"], *_meta_args(m), out, chunk=m.chunk, path="nope")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path,name", APPLY)
def test_apply_gpu(path, name, dtype):
    """The interpreter cannot check bf16 tl.dot: run every apply path on the GPU (bf16 tolerance 5e-2)."""
    case = CASES[name]
    d = _build(case, dtype, _gen("gpu", path, name, dtype))
    # same strides on the GPU (.cuda() of the stride-2 view of x would make it contiguous); y is re-cut from y_full
    d = {k: (torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="cuda").copy_(v)
             if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    d["y"] = d["y_full"][:, 3 : 3 + sum(case.sizes)] if case.y_layout == "colslice" else d["y_full"]
    m = build_lora_meta(d["slots"], case.L, d["weights"], chunk=case.chunk)
    y_full0 = d["y_full"].clone()
    ref = lora_apply_ref(d["y"].double(), d["x"].double(), d["lora_a"].double(), d["lora_b"].double(), d["slots"],
                         d["weights"].double(), d["ranks"], d["scales"].double(), case.sizes)
    lora_apply_triton(d["y"], d["x"], d["lora_a"], d["lora_b"], d["ranks"], d["scales"], m.token_slots,
                      m.token_weights, m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, case.sizes, chunk=m.chunk,
                      path=path)
    _check_y(d, y_full0, ref, dtype, case)


def test_choose_path_heuristic():
    assert choose_path("auto", 1, "shrink") == "bgmv" and choose_path("auto", 4096, "expand") == "sgmv"
    qkv_r16 = 16 * 3 * 4096 * 2  # one slot's A for Llama-3-8B qkv, bf16: too big for the fused kernel
    assert choose_path("auto", 1, "apply", sr=64, num_slices=3, a_bytes=qkv_r16) == "bgmv"
    assert choose_path("auto", 1, "apply", sr=16, num_slices=1, a_bytes=8 * 4096 * 2) == "fused"
    assert choose_path("sgmv", 1, "apply") == "sgmv"


def test_split_k_fills_the_sms():
    """Split-K is sized from the grid and the SM count: programs * split reaches the SMs, each split keeps at least
    one BLOCK_K of h_in, powers of two up to the cap (decode grids of 2 programs no longer stop at 16 splits)."""
    split_k_for = tl_lora.split_k_for
    assert split_k_for(2, 4096, 64, 132) == 64  # T = 1, qkv r16: 2 tiles x 64 splits = 128 programs
    assert split_k_for(2, 4096, 128, 132) == 32  # capped by one BLOCK_K per split (4096 / 128)
    assert split_k_for(1, 14336, 128, 132) == 64  # capped by MAX_SPLIT_K
    assert split_k_for(64, 4096, 128, 132) == 4
    assert split_k_for(200, 4096, 128, 132) == 1
    assert split_k_for(2, 100, 128, 132) == 1  # h_in below one BLOCK_K: no split
    assert split_k_for(2, 4096, 64, 132, max_split=16) == 16
    assert split_k_for(2, 4096, 64, 16) == 8  # fewer SMs, fewer splits


def _split_outputs(d, sizes, g):
    """One output tensor per slice, each a column window of its own wider tensor (own row stride), with -0.0
    planted; returns (outputs, their parents, clones of the parents)."""
    parents, outs = [], []
    for i, n in enumerate(sizes):
        p = torch.randn(d["y"].shape[0], n + 3 + 2 * i, generator=g).to(d["y"].dtype)
        p[:, ::3] = -0.0
        p[:, 1 : 1 + n] = d["y"][:, sum(sizes[:i]) : sum(sizes[:i]) + n]
        parents.append(p)
        outs.append(p[:, 1 : 1 + n])
    return outs, parents, [p.clone() for p in parents]


def _check_split(d, outs, parents, parents0, ref, dtype, sizes):
    has = (d["slots"] >= 0).any(1)
    y = torch.cat(outs, dim=1)
    _assert_close(y[has], ref[has], dtype)
    for i, (p, p0) in enumerate(zip(parents, parents0)):
        n = sizes[i]
        assert_bitwise_equal(p[:, :1], p0[:, :1], msg=f"left of output {i}")
        assert_bitwise_equal(p[:, 1 + n :], p0[:, 1 + n :], msg=f"right of output {i}")
        assert_bitwise_equal(p[~has], p0[~has], msg=f"rows without adapter, output {i}")


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path,name", [("sgmv", "qkv_k2"), ("sgmv", "six_slices"), ("bgmv", "qkv_k2"),
                                       ("bgmv", "six_slices"), ("bgmv", "decode1"), ("fused", "qkv_small"),
                                       ("fused", "r12")])
def test_apply_one_output_per_slice(path, name, dtype):
    """``y`` as one tensor per slice (each with its own row stride): each slice's delta lands in its own tensor, in
    the same launch (one per group of 4 slices), equal to the reference on the concatenated outputs; columns
    around each output and rows without adapter bit-for-bit untouched."""
    case = CASES[name]
    g = _gen("split", path, name, dtype)
    d = _build(case, dtype, g)
    m = d["meta"]
    outs, parents, parents0 = _split_outputs(d, case.sizes, g)
    y_cat = torch.cat(outs, dim=1)
    ref = lora_apply_ref(y_cat.double(), d["x"].double(), d["lora_a"].double(), d["lora_b"].double(), d["slots"],
                         d["weights"].double(), d["ranks"], d["scales"].double(), case.sizes)
    assert lora_apply_triton.sliced_outputs
    lora_apply_triton(tuple(outs), d["x"], d["lora_a"], d["lora_b"], d["ranks"], d["scales"], m.token_slots,
                      m.token_weights, m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, case.sizes,
                      chunk=m.chunk, path=path)
    _check_split(d, outs, parents, parents0, ref, dtype, case.sizes)


@interpreter
@pytest.mark.parametrize("path,name", [("sgmv", "six_slices"), ("bgmv", "qkv_k2"), ("bgmv", "r12")])
def test_expand_one_output_per_slice(path, name):
    case = CASES[name]
    dtype = torch.float16
    g = _gen("split_expand", path, name)
    d = _build(case, dtype, g)
    m = d["meta"]
    v = torch.randn(case.S, case.K * case.T, case.R, generator=g)
    outs, parents, parents0 = _split_outputs(d, case.sizes, g)
    ref = _expand_ref(d, torch.cat(outs, dim=1), v, case.sizes)
    lora_expand_triton(list(outs), v, d["lora_b"], d["ranks"], d["scales"], m.token_slots, m.token_weights,
                       m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, case.sizes, chunk=m.chunk, path=path)
    _check_split(d, outs, parents, parents0, ref, dtype, case.sizes)


def test_bad_per_slice_outputs():
    d = _build(CASES["qkv_small"], torch.float32, _gen("bad_split"))
    m = d["meta"]
    args = (d["x"], d["lora_a"], d["lora_b"], d["ranks"], d["scales"], m.token_slots, m.token_weights,
            m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, (32, 16, 16))
    T = d["x"].shape[0]
    with pytest.raises(ValueError, match="3 slices"):
        lora_apply_triton((torch.zeros(T, 32), torch.zeros(T, 16)), *args, chunk=m.chunk, path="bgmv")
    with pytest.raises(ValueError, match="expected shape"):
        lora_apply_triton((torch.zeros(T, 32), torch.zeros(T, 16), torch.zeros(T, 8)), *args, chunk=m.chunk,
                          path="bgmv")
    with pytest.raises(ValueError, match="stride 1"):
        lora_apply_triton((torch.zeros(T, 32), torch.zeros(T, 16), torch.zeros(16, T).t()), *args, chunk=m.chunk,
                          path="bgmv")
