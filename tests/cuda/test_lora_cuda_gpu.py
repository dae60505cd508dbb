"""GPU checks of the CUDA multi-LoRA kernels (:mod:`pllm_kernels.cuda.lora`), marker ``gpu`` (skipped on CPU CI).

* every op (shrink, expand, apply) on every path (auto, sgmv, bgmv, fused) against the float64 reference in bf16,
  fp16 and fp32: odd sizes (h_in 111, 2049), rows without adapter (bit for bit untouched, -0.0 planted), mixed ranks
  (1..128 in one buffer), K = 2 / 3 weighted slots, multi-slice of different widths (3, 6, 10 slices), non-contiguous
  x / y, real model sizes (Llama-3-8B qkv, 64 distinct adapters);
* against the Triton launchers (:mod:`pllm_kernels.triton.lora`);
* determinism: bitwise identical results across paths, batch sizes (a token alone, in a batch of 64, in a batch of
  300), 16-byte vs scalar loads, streams, and CUDA-graph capture + replay (with the routing refilled in the graph);
* ``test_sanitizer_*``: tiny shapes covering every kernel variant, for compute-sanitizer memcheck / racecheck
  (``benchmarks/gpu_suite.py`` runs them with ``PLLM_SANITIZER=1``: big shapes and Triton are skipped then).

``PLLM_LORA_GPU_TESTS_ON_EMULATOR=1`` runs this file on the CPU emulator of the extension (small cases only, no Triton,
no CUDA graphs): a development aid that checks the tests themselves without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from lora_cases import make_case
from utils import assert_bitwise_equal, assert_close

from pllm_kernels import _ext
from pllm_kernels.batch import LoRAMetaBuffers, build_lora_meta
from pllm_kernels.reference.lora import lora_apply_ref, lora_expand_ref, lora_shrink_ref

ON_EMU = os.environ.get("PLLM_LORA_GPU_TESTS_ON_EMULATOR", "") == "1"
SANITIZER = os.environ.get("PLLM_SANITIZER", "") == "1"
DEVICE = "cpu" if ON_EMU else "cuda"
_HAS_LORA = _ext.HAS_CUDA_EXT and hasattr(_ext.ext(), "lora_apply")

pytestmark = [
    *([] if ON_EMU else [pytest.mark.gpu]),
    pytest.mark.skipif(not _HAS_LORA, reason=f"CUDA extension with lora kernels not built: {_ext.ext_error}"),
]
big = pytest.mark.skipif(ON_EMU or SANITIZER, reason="large shapes: GPU only, not under compute-sanitizer")
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_triton = pytest.mark.skipif(SANITIZER or (ON_EMU and not _INTERPRET),
                                  reason="vs Triton: on a GPU (or emulator + TRITON_INTERPRET=1), not under sanitizer")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]

# name -> make_case arguments (tests/lora_cases.py); "big" ones are skipped on the emulator / under the sanitizer
CASES = {
    "decode_qkv_r16": dict(T=1, h_in=4096, slice_sizes=(4096, 1024, 1024), ranks=(16,), max_rank=16),
    "distinct_64": dict(T=64, h_in=4096, slice_sizes=(4096,), ranks=tuple([16] * 64), max_rank=16,
                        slots=list(range(64))),
    "odd2049_mixed_k2": dict(T=37, h_in=2049, slice_sizes=(111, 64), ranks=(1, 8, 16, 64, 8), max_rank=64, K=2),
    "prefill_two_slices": dict(T=300, h_in=1024, slice_sizes=(2048, 2048), ranks=(8, 64, 16), max_rank=64,
                               none_frac=0.3),
    "prefill_noncontig": dict(T=2048, h_in=512, slice_sizes=(512,), ranks=(8, 16), max_rank=16, x_noncontig=True,
                              y_noncontig=True),
    "all_none": dict(T=50, h_in=256, slice_sizes=(128,), ranks=(8,), max_rank=8, none_frac=1.0),
    "six_slices_k2": dict(T=9, h_in=24, slice_sizes=(16, 8, 8, 24, 12, 4), ranks=(8, 4, 1), max_rank=8, K=2),
    "ten_slices_k3": dict(T=6, h_in=48, slice_sizes=(3, 5, 8, 1, 2, 7, 4, 4, 9, 2), ranks=(4, 2, 1), max_rank=4,
                          K=3),
    "small_fused_k2": dict(T=4, h_in=1024, slice_sizes=(64, 32), ranks=(16, 1, 8), max_rank=16, K=2),
    "odd111_r64": dict(T=5, h_in=111, slice_sizes=(33,), ranks=(64, 8, 1, 16), max_rank=64, y_noncontig=True),
    "rank128_chunk64": dict(T=120, h_in=256, slice_sizes=(200,), ranks=(128, 100, 33), max_rank=128, chunk=64),
}
BIG = {"decode_qkv_r16", "distinct_64", "odd2049_mixed_k2", "prefill_two_slices", "prefill_noncontig",
       "rank128_chunk64"}


def _case_params(names):
    return [pytest.param(n, marks=big) if n in BIG else n for n in names]


# ------------------------------------------------------------------------------------------------ helpers
def _case(name, dtype, seed=0, **over):
    kw = dict(CASES[name])
    kw.update(over)
    return make_case(dtype=dtype, seed=seed, device=DEVICE, neg_zeros=True, **kw)


def _sizes(c):
    return list(c.slice_sizes)


def _meta_args(m):
    return m.token_slots, m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len


def cuda_shrink(c, out, path="auto", x=None, lora_a=None):
    from pllm_kernels.cuda.lora import lora_shrink_cuda

    m = c.meta
    lora_shrink_cuda(c.x if x is None else x, c.lora_a if lora_a is None else lora_a, c.slot_ranks, *_meta_args(m),
                     out, chunk=m.chunk, path=path, _emulate=ON_EMU)
    return out


def cuda_expand(c, y, v, path="auto", lora_b=None):
    from pllm_kernels.cuda.lora import lora_expand_cuda

    m = c.meta
    lora_expand_cuda(y, v, c.lora_b if lora_b is None else lora_b, c.slot_ranks, c.slot_scales, m.token_slots,
                     m.token_weights, m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, _sizes(c), chunk=m.chunk,
                     path=path, _emulate=ON_EMU)
    return y


def cuda_apply(c, y, path="auto", meta=None, x=None, lora_a=None, lora_b=None):
    from pllm_kernels.cuda.lora import lora_apply_cuda

    m = c.meta if meta is None else meta
    lora_apply_cuda(y, c.x if x is None else x, c.lora_a if lora_a is None else lora_a,
                    c.lora_b if lora_b is None else lora_b, c.slot_ranks, c.slot_scales, m.token_slots,
                    m.token_weights, m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, _sizes(c), chunk=m.chunk,
                    path=path, _emulate=ON_EMU)
    return y


def _sync():
    if not ON_EMU:
        torch.cuda.synchronize()


def ref_apply(c, y0):
    return lora_apply_ref(y0.double().cpu().clone(), c.x.double().cpu(), c.lora_a.double().cpu(),
                          c.lora_b.double().cpu(), c.token_slots.cpu(), c.token_weights.cpu(), c.slot_ranks.cpu(),
                          c.slot_scales.cpu(), _sizes(c))


def _apply_paths(c):
    """Paths lora_apply can take for this case: fused only where its shared memory fits (as the launcher checks)."""
    C = _ext.ext()
    L, S, R, H = c.lora_a.shape
    K = c.token_slots.shape[1]
    paths = ["auto", "sgmv", "bgmv"]
    if S <= 8 and C.lora_smem_bytes(H, K, S, R, c.x.element_size(), 4)[2] <= 48 * 1024:
        paths.append("fused")
    return paths


def _check_apply(c, y, y0, expected, dtype, msg):
    """Rows with an adapter close to the reference (atol scaled by max|ref|), rows without bit for bit untouched."""
    has = (c.token_slots >= 0).any(dim=1).cpu()
    yc, y0c = y.cpu(), y0.cpu()
    if has.any():
        assert_close(yc[has], expected[has], dtype, scale=expected.abs().max().item(), msg=msg)
    assert_bitwise_equal(yc[~has], y0c[~has], msg=f"{msg}: rows without adapter")


def _fresh_y(c, y0):
    """A copy of y0 with c.y's layout (a column slice of a wider buffer when y_noncontig): updated in place."""
    if c.y.is_contiguous():
        return y0.clone()
    T, N = y0.shape
    buf = torch.zeros(T, N + 5, dtype=y0.dtype, device=y0.device)
    y = buf[:, 3 : 3 + N]
    y.copy_(y0)
    return y


def _offset_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` stored one element past an aligned address: every row misaligned for 16-byte loads (scalar variants)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


# ------------------------------------------------------------------------------------------------ vs reference
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", _case_params(["decode_qkv_r16", "prefill_two_slices", "six_slices_k2",
                                               "small_fused_k2", "ten_slices_k3"]))
def test_per_slice_outputs_equal_one_output(name, dtype):
    """lora_apply with one output tensor per slice (the grouped q / k / v outputs; row-strided views here): on every
    path the bits of the single-output call (more than 8 slices: refused with a clear error)."""
    from pllm_kernels.cuda.lora import MAX_SLICED_OUTPUTS

    c = _case(name, dtype, seed=4)
    sizes = _sizes(c)
    y0 = c.y.clone()
    for path in _apply_paths(c) + ["sgmv_tc"]:
        single = cuda_apply(c, y0.clone(), path)
        bufs = [torch.zeros(2 * y0.shape[0], n, dtype=dtype, device=DEVICE) for n in sizes]
        outs = [b[::2] for b in bufs]
        off = 0
        for o, n in zip(outs, sizes):
            o.copy_(y0[:, off : off + n])
            off += n
        if len(sizes) > MAX_SLICED_OUTPUTS:
            with pytest.raises(RuntimeError, match="per-slice outputs"):
                cuda_apply(c, outs, path)
            return
        cuda_apply(c, outs, path)
        _sync()
        assert_bitwise_equal(torch.cat(outs, 1).cpu(), single.cpu(), msg=f"{name} per-slice [{path}]")
        assert all(bool((b[1::2] == 0).all()) for b in bufs), "rows between the strided outputs written"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", _case_params(["odd2049_mixed_k2", "prefill_two_slices", "prefill_noncontig",
                                               "rank128_chunk64", "six_slices_k2", "ten_slices_k3", "odd111_r64",
                                               "all_none"]))
def test_tensor_core_path_matches_reference(name, dtype):
    """The opt-in tensor-core SGMV shrink (``path="sgmv_tc"``, mma.m16n8k16) on the device: shrink and apply against
    the float64 reference (odd h_in, mixed ranks up to 128, K = 2 / 3, 6 and 10 slices, non-contiguous x / y, rows
    without adapter bit for bit untouched), unrouted / beyond-rank shrink outputs exactly 0, close to the FMA SGMV."""
    c = _case(name, dtype, seed=7)
    S, R = c.lora_a.shape[1], c.lora_a.shape[2]
    K, T = c.token_slots.shape[1], c.token_slots.shape[0]
    ref_v = lora_shrink_ref(c.x.double().cpu(), c.lora_a.double().cpu(), c.token_slots.cpu(), c.slot_ranks.cpu())
    out = cuda_shrink(c, torch.full((S, K * T, R), float("nan"), device=DEVICE), "sgmv_tc")
    _sync()
    scale = max(ref_v.abs().max().item(), 1.0)
    assert_close(out.cpu(), ref_v, dtype, scale=scale, msg=f"{name} shrink[sgmv_tc]")
    zero = ref_v == 0
    assert_bitwise_equal(out.cpu()[zero], torch.zeros_like(ref_v[zero], dtype=torch.float32), msg="unrouted outputs")
    fma = cuda_shrink(c, torch.empty_like(out), "sgmv")
    assert_close(out.cpu(), fma.cpu(), dtype, scale=scale, msg=f"{name} sgmv_tc vs sgmv")
    y0 = c.y.clone()
    y = cuda_apply(c, _fresh_y(c, y0), "sgmv_tc")
    _sync()
    _check_apply(c, y, y0, ref_apply(c, y0), dtype, f"{name} {dtype} apply[sgmv_tc]")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tensor_core_path_batch_invariant(dtype):
    """Among tensor-core SGMV calls a token's shrink output does not depend on its batch (mma rows never mix, the warp
    partials are summed in warp order): a slice of the batch alone gives the same bits."""
    from dataclasses import replace

    c = make_case(T=70, h_in=40, slice_sizes=(24, 8), ranks=(16, 9, 1), max_rank=16, K=2, chunk=32, dtype=dtype,
                  seed=3, device=DEVICE)
    S, R = c.lora_a.shape[1], c.lora_a.shape[2]
    T, K = c.token_slots.shape
    full = cuda_shrink(c, torch.empty((S, K * T, R), device=DEVICE), "sgmv_tc")
    lo, hi = 11, 53
    sub = replace(c, x=c.x[lo:hi], meta=build_lora_meta(c.token_slots[lo:hi], c.lora_a.shape[0],
                                                         c.token_weights[lo:hi], chunk=c.meta.chunk))
    n = hi - lo
    part = cuda_shrink(sub, torch.empty((S, K * n, R), device=DEVICE), "sgmv_tc")
    _sync()
    for k in range(K):
        assert_bitwise_equal(part[:, k * n : (k + 1) * n].cpu(), full[:, k * T + lo : k * T + hi].cpu(),
                             msg=f"tokens {lo}:{hi} alone vs in the batch (slot {k})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", _case_params(list(CASES)))
def test_apply_every_path_matches_reference(name, dtype):
    c = _case(name, dtype)
    y0 = c.y.clone()
    expected = ref_apply(c, y0)
    results = {}
    for path in _apply_paths(c):
        y = cuda_apply(c, _fresh_y(c, y0), path)
        _sync()
        _check_apply(c, y, y0, expected, dtype, f"{name} {dtype} apply[{path}]")
        results[path] = y
    for path, y in results.items():
        assert_bitwise_equal(y, results["bgmv"], msg=f"{name} {dtype}: apply[{path}] vs apply[bgmv]")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", _case_params(["odd2049_mixed_k2", "prefill_two_slices", "six_slices_k2",
                                               "ten_slices_k3", "small_fused_k2", "odd111_r64", "all_none",
                                               "rank128_chunk64"]))
def test_shrink_and_expand_match_reference(name, dtype):
    c = _case(name, dtype)
    L, S, R, H = c.lora_a.shape
    T, K = c.token_slots.shape
    ref_v = lora_shrink_ref(c.x.double().cpu(), c.lora_a.double().cpu(), c.token_slots.cpu(), c.slot_ranks.cpu())
    g = torch.Generator().manual_seed(7)
    v_in = torch.randn(S, K * T, R, generator=g).to(DEVICE)  # rank padding = garbage the kernels must ignore
    y0 = c.y.clone()
    ref_y = lora_expand_ref(y0.double().cpu().clone(), v_in.double().cpu(), c.lora_b.double().cpu(),
                            c.token_slots.cpu(), c.token_weights.double().cpu(), c.slot_ranks.cpu(),
                            c.slot_scales.double().cpu(), _sizes(c))
    vs, ys = {}, {}
    for path in ("sgmv", "bgmv"):
        out = torch.full((S, K * T, R), float("nan"), device=DEVICE)  # must be fully overwritten
        cuda_shrink(c, out, path)
        y = cuda_expand(c, _fresh_y(c, y0), v_in, path)
        _sync()
        assert_close(out.cpu(), ref_v, dtype, scale=max(ref_v.abs().max().item(), 1.0), msg=f"{name} shrink[{path}]")
        _check_apply(c, y, y0, ref_y, dtype, f"{name} expand[{path}]")
        vs[path], ys[path] = out, y
    assert_bitwise_equal(vs["sgmv"], vs["bgmv"], msg="shrink sgmv vs bgmv")
    assert_bitwise_equal(ys["sgmv"], ys["bgmv"], msg="expand sgmv vs bgmv")


def test_out_of_range_slots_and_ranks():
    """Slot ids >= num_slots route nowhere; ranks above max_rank are clamped (every path)."""
    c = _case("six_slices_k2", torch.float16)
    slots = c.token_slots.clone()
    slots[0, 0], slots[2, 1], slots[3, 0] = 3, 100, 7
    c.slot_ranks[0] = 8 + 5
    c.meta = build_lora_meta(slots, 3, c.token_weights)
    y0 = c.y.clone()
    ref_c = make_case(dtype=torch.float16, seed=0, device="cpu", neg_zeros=True, **CASES["six_slices_k2"])
    ref_c.token_slots = torch.where(slots.cpu() >= 3, torch.full_like(slots.cpu(), -1), slots.cpu())
    ref_c.slot_ranks = c.slot_ranks.cpu().clamp(max=8)
    expected = ref_apply(ref_c, y0)
    ref_c.token_slots = ref_c.token_slots.to(DEVICE)
    for path in ("sgmv", "bgmv", "fused"):
        y = cuda_apply(c, y0.clone(), path)
        _sync()
        _check_apply(ref_c, y, y0, expected, torch.float16, f"out of range [{path}]")


# ------------------------------------------------------------------------------------------------ vs Triton
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", _case_params(["decode_qkv_r16", "distinct_64", "odd2049_mixed_k2",
                                               "prefill_two_slices", "six_slices_k2", "small_fused_k2"]))
def test_matches_triton(name, dtype):
    """CUDA and Triton launchers (auto paths) agree within the dtype's tolerance, for apply, shrink and expand."""
    from pllm_kernels.triton.lora import lora_apply_triton, lora_expand_triton, lora_shrink_triton

    if ON_EMU and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's tl.dot is wrong in bf16")

    c = _case(name, dtype)
    m = c.meta
    L, S, R, H = c.lora_a.shape
    T, K = c.token_slots.shape
    y0 = c.y.clone()
    expected = ref_apply(c, y0)
    scale = expected.abs().max().item()
    y_cuda = cuda_apply(c, y0.clone())
    y_tri = y0.clone()
    lora_apply_triton(y_tri, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, m.token_slots, m.token_weights,
                      m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, _sizes(c), chunk=m.chunk)
    _sync()
    _check_apply(c, y_cuda, y0, expected, dtype, "cuda apply")
    _check_apply(c, y_tri, y0, expected, dtype, "triton apply")
    assert_close(y_cuda.cpu(), y_tri.cpu(), dtype, scale=scale, msg="cuda vs triton apply")

    v_cuda = cuda_shrink(c, torch.empty(S, K * T, R, device=DEVICE))
    v_tri = torch.empty(S, K * T, R, device=DEVICE)
    lora_shrink_triton(c.x, c.lora_a, c.slot_ranks, *_meta_args(m), v_tri, chunk=m.chunk)
    _sync()
    assert_close(v_cuda.cpu(), v_tri.cpu(), dtype, scale=max(v_tri.abs().max().item(), 1.0), msg="shrink")

    ye_cuda = cuda_expand(c, y0.clone(), v_tri)
    ye_tri = y0.clone()
    lora_expand_triton(ye_tri, v_tri, c.lora_b, c.slot_ranks, c.slot_scales, m.token_slots, m.token_weights,
                       m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, _sizes(c), chunk=m.chunk)
    _sync()
    assert_close(ye_cuda.cpu(), ye_tri.cpu(), dtype, scale=scale, msg="expand")


# ------------------------------------------------------------------------------------------------ determinism
def _subset(c, lo, hi):
    """The tokens lo:hi of case c as a case of their own (same weights and routing, fresh metadata)."""
    sub = make_case(T=hi - lo, h_in=c.x.shape[1], slice_sizes=c.slice_sizes, ranks=tuple(c.slot_ranks.tolist()),
                    max_rank=c.lora_a.shape[2], K=c.token_slots.shape[1], dtype=c.x.dtype, device=DEVICE,
                    slots=c.token_slots[lo:hi].cpu())
    sub.x, sub.y = c.x[lo:hi].clone(), c.y[lo:hi].clone()
    sub.lora_a, sub.lora_b, sub.slot_scales = c.lora_a, c.lora_b, c.slot_scales
    sub.token_slots, sub.token_weights = c.token_slots[lo:hi].clone(), c.token_weights[lo:hi].clone()
    sub.meta = build_lora_meta(sub.token_slots, c.lora_a.shape[0], sub.token_weights)
    return sub


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [pytest.param("llama_qkv", marks=big), "small_a"])
def test_bitwise_across_batch_sizes(shape, dtype, K):
    """A token's delta has the same bits alone, in a batch of 64 pairs (BGMV) and in a batch of 300 tokens (SGMV);
    with a small A the single tokens run the fused kernel."""
    from pllm_kernels.cuda.lora import choose_path

    if shape == "llama_qkv":
        kw = dict(T=300, h_in=4096, slice_sizes=(4096, 1024, 1024), ranks=(16, 8, 16, 4, 16, 1, 16, 16), max_rank=16)
    else:
        T = 70 if ON_EMU else 300
        kw = dict(T=T, h_in=256 if ON_EMU else 1024, slice_sizes=(64, 32), ranks=(16, 8, 1, 16), max_rank=16)
    c = make_case(dtype=dtype, seed=11, device=DEVICE, K=K, none_frac=0.2, **kw)
    T, H = c.x.shape
    L, S, R, _ = c.lora_a.shape
    assert choose_path("auto", "apply", T, K, S, R, H, dtype) == "sgmv"
    full = cuda_apply(c, c.y.clone())
    checks = [(0, 64 // K, "bgmv"), (3, 4, None), (T - 1, T, None), (100 % T, 100 % T + 1, None)]
    for lo, hi, want in checks:
        sub = _subset(c, lo, hi)
        got_path = choose_path("auto", "apply", hi - lo, K, S, R, H, dtype)
        if want is not None:
            assert got_path == want
        y = cuda_apply(sub, sub.y.clone())
        _sync()
        assert_bitwise_equal(y, full[lo:hi], msg=f"tokens {lo}:{hi} ({got_path}) vs the batch of {T} (sgmv)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_and_scalar_loads_bitwise(dtype):
    """Misaligned rows take the scalar-load kernels: same FMA chains, same bits as the 16-byte-load kernels."""
    c = _case("small_fused_k2", dtype, seed=3, h_in=256)
    x_m, a_m, b_m = _offset_copy(c.x), _offset_copy(c.lora_a), _offset_copy(c.lora_b)
    for path in ("sgmv", "bgmv", "fused"):
        y_vec = cuda_apply(c, c.y.clone(), path)
        y_sca = cuda_apply(c, c.y.clone(), path, x=x_m, lora_a=a_m, lora_b=b_m)
        _sync()
        assert_bitwise_equal(y_sca, y_vec, msg=f"scalar vs vector loads [{path}]")


@pytest.mark.skipif(ON_EMU, reason="streams: GPU only")
def test_side_stream_same_bits():
    c = _case("small_fused_k2", torch.bfloat16, seed=5)
    y_default = cuda_apply(c, c.y.clone(), "bgmv")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y_side = cuda_apply(c, c.y.clone(), "bgmv")
    s.synchronize()
    torch.cuda.synchronize()
    assert_bitwise_equal(y_side, y_default, msg="side stream")


@pytest.mark.skipif(ON_EMU, reason="CUDA graphs: GPU only")
@pytest.mark.parametrize("path", ["auto", "bgmv", "sgmv", "fused", "sgmv_tc"])
def test_cuda_graph_capture_and_replay(path):
    """Capture the routing fill and lora_apply in one graph, replay with new slots: same bits as eager launches."""
    T, L = 48, 6
    c = make_case(T=T, h_in=512, slice_sizes=(256, 64, 64), ranks=(8, 16, 1, 16, 8, 4), max_rank=16,
                  dtype=torch.bfloat16, device="cuda", neg_zeros=True)
    bufs = LoRAMetaBuffers(T, 1, L, "cuda")
    slots_in = c.token_slots.clone()
    x, y = c.x.clone(), torch.empty_like(c.y)
    y_base = c.y.clone()

    def step():
        y.copy_(y_base)
        cuda_apply(c, y, path, meta=bufs.meta, x=x)

    bufs.fill(slots_in, c.token_weights)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        bufs.fill(slots_in, c.token_weights)
        step()
    for seed in range(3):
        slots = torch.randint(-1, L, (T, 1), generator=torch.Generator().manual_seed(seed)).cuda()
        slots_in.copy_(slots)  # the captured fill reads this tensor
        g.replay()
        torch.cuda.synchronize()
        eager = build_lora_meta(slots, L, c.token_weights)
        y_eager = cuda_apply(c, y_base.clone(), path, meta=eager)
        torch.cuda.synchronize()
        assert_bitwise_equal(y, y_eager, msg=f"graph replay {seed} vs eager [{path}]")
        c.token_slots = slots.int()
        _check_apply(c, y, y_base, ref_apply(c, y_base), torch.bfloat16, f"graph replay {seed} [{path}]")


def test_supports_on_device():
    from pllm_kernels.cuda.lora import supports

    if ON_EMU:
        pytest.skip("needs a CUDA device")
    for dtype in DTYPES:
        assert supports(torch.device("cuda"), dtype) is None, supports(torch.device("cuda"), dtype)
    assert supports(torch.device("cuda"), torch.float64) is not None


# ------------------------------------------------------------------------------------------------ sanitizer subset
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned", [True, False])
def test_sanitizer_every_kernel_variant(dtype, aligned):
    """Tiny shapes that launch every kernel variant (vector / scalar loads; BGMV shrink with 1 and 4 outputs per
    block; BGMV expand rank specialisations 16, 64 and generic; SGMV with 1 and 4 row blocks per chunk; fused), each
    checked against the reference: the workload of the compute-sanitizer runs (memcheck, racecheck)."""
    configs = [
        dict(T=5, h_in=64, slice_sizes=(24, 8), ranks=(16, 4, 9), max_rank=16, K=2),  # expand r16
        dict(T=6, h_in=72, slice_sizes=(40,), ranks=(64, 33, 1), max_rank=64, K=1),  # expand r64, 2 rank chunks
        dict(T=4, h_in=40, slice_sizes=(20, 12, 12), ranks=(128, 100), max_rank=128, K=2),  # generic rank, 4 chunks
        dict(T=70, h_in=32, slice_sizes=(16,), ranks=(16, 16), max_rank=16, K=1, chunk=64),  # 4 outputs/block, z=4
    ]
    for i, kw in enumerate(configs):
        c = make_case(dtype=dtype, seed=20 + i, device=DEVICE, neg_zeros=True, **kw)
        kwargs = {}
        if not aligned:
            kwargs = dict(x=_offset_copy(c.x), lora_a=_offset_copy(c.lora_a), lora_b=_offset_copy(c.lora_b))
        y0 = c.y.clone()
        expected = ref_apply(c, y0)
        paths = ("sgmv", "bgmv", "fused") + (("sgmv_tc",) if dtype != torch.float32 else ())
        for path in paths:
            y = cuda_apply(c, y0.clone(), path, **kwargs)
            _sync()
            _check_apply(c, y, y0, expected, dtype, f"config {i} [{path}] aligned={aligned}")
