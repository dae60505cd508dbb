"""GPU checks of the CUDA steering kernels (:mod:`pllm_kernels.cuda.steer`), marker ``gpu`` (skipped on CPU CI).

* steer_add and steer_rmsnorm (Llama / Gemma norms) against the float64 reference in bf16, fp16 and fp32: real hidden
  sizes (4096, 8192, 16384 = the limit) and odd ones (111, 2049), decode and prefill token counts, K = 1 / 2 with
  every mode mixed, ``-1`` entries, rows without steering bit for bit untouched (-0.0 planted), NaN / inf in an unused
  vector, strided and misaligned rows, vectors / weight in float32 or h's dtype;
* against the Triton launchers (:mod:`pllm_kernels.triton.steer`) in bf16 / fp16;
* the public ops with ``backend="cuda"`` and ``auto`` (which picks the CUDA kernels on a GPU), under
  ``torch.compile(fullgraph=True)`` too;
* determinism: a token alone vs in a batch, 16-byte vs scalar accesses, a side stream, and CUDA-graph capture +
  replay (routing refilled between replays) — bitwise;
* ``test_sanitizer_*``: tiny shapes launching every kernel variant, for compute-sanitizer memcheck / racecheck
  (``benchmarks/gpu_suite.py`` runs them with ``PLLM_SANITIZER=1``: big shapes and Triton are skipped then).

``PLLM_STEER_GPU_TESTS_ON_EMULATOR=1`` runs this file on the CPU emulator of the extension (small cases only, no
Triton, no streams / graphs / compile): a development aid that checks the tests themselves without a GPU
(``tests/cuda/test_steer_cuda_build.py`` does so on every CI run).
"""

from __future__ import annotations

import os

import pytest
import torch
from steer_cases import check_steered, make_steer_case, ref_rmsnorm, ref_steer
from utils import assert_bitwise_equal, assert_close

from pllm_kernels import _ext

ON_EMU = os.environ.get("PLLM_STEER_GPU_TESTS_ON_EMULATOR", "") == "1"
SANITIZER = os.environ.get("PLLM_SANITIZER", "") == "1"
DEVICE = "cpu" if ON_EMU else "cuda"
_HAS_STEER = _ext.HAS_CUDA_EXT and hasattr(_ext.ext(), "steer_add")
EPS = 1e-5

pytestmark = [
    *([] if ON_EMU else [pytest.mark.gpu]),
    pytest.mark.skipif(not _HAS_STEER, reason=f"CUDA extension with steering kernels not built: {_ext.ext_error}"),
]
big = pytest.mark.skipif(ON_EMU or SANITIZER, reason="large shapes: GPU only, not under compute-sanitizer")
gpu_only = pytest.mark.skipif(ON_EMU, reason="GPU only (streams, CUDA graphs)")
gpu_ops = pytest.mark.skipif(ON_EMU or SANITIZER, reason="GPU only (ops dispatch, torch.compile), not under the "
                             "sanitizer (Triton / inductor compiles)")
needs_triton = pytest.mark.skipif(ON_EMU or SANITIZER, reason="vs Triton: on a GPU, not under the sanitizer")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]

# name -> make_steer_case arguments; "big" ones are skipped on the emulator / under the sanitizer
CASES = {
    "decode_4096_k1": dict(T=8, H=4096, L=16, K=1, none_frac=0.25),
    "prefill_4096_k2": dict(T=512, H=4096, L=33, K=2),
    "decode_8192_k2": dict(T=16, H=8192, L=8, K=2),
    "max_16384": dict(T=6, H=16384, L=4, K=2, none_frac=0.2),
    "odd2049_k2": dict(T=37, H=2049, L=6, K=2),
    "odd111_k2": dict(T=9, H=111, L=5, K=2),
    "stride2_k2": dict(T=11, H=96, L=5, K=2, layout="stride2"),
    "offset_k2": dict(T=7, H=256, L=5, K=2, layout="offset"),
    "vec_bf16_vectors": dict(T=10, H=512, L=5, K=2, vec_dtype="act"),
}
BIG = {"decode_4096_k1", "prefill_4096_k2", "decode_8192_k2", "max_16384", "odd2049_k2"}


def _params(names):
    return [pytest.param(n, marks=big) if n in BIG else n for n in names]


def _case(name, dtype, seed=0, **over):
    kw = dict(CASES[name])
    kw.update(over)
    if kw.get("vec_dtype") == "act":
        kw["vec_dtype"] = dtype
    return make_steer_case(dtype=dtype, seed=seed, device=DEVICE, **kw)


def _sync():
    if not ON_EMU:
        torch.cuda.synchronize()


def cuda_add(c, h=None):
    from pllm_kernels.cuda.steer import steer_add_cuda

    h = c.h if h is None else h
    steer_add_cuda(h, c.vectors, c.slots, c.scales, c.modes, _emulate=ON_EMU)
    return h


def cuda_norm(c, gemma, h=None, out=None):
    from pllm_kernels.cuda.steer import steer_rmsnorm_cuda

    h = c.h if h is None else h
    out = torch.full(h.shape, float("nan"), dtype=h.dtype, device=h.device) if out is None else out
    steer_rmsnorm_cuda(out, h, c.weight, EPS, c.vectors, c.slots, c.scales, c.modes, 1.0 if gemma else 0.0,
                       _emulate=ON_EMU)
    return out


# ------------------------------------------------------------------------------------------------ vs reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", _params(list(CASES)))
def test_steer_add_matches_reference(name, dtype):
    c = _case(name, dtype)
    h0 = c.h.clone()
    expected = ref_steer(c, h0)
    cuda_add(c)
    _sync()
    check_steered(c, c.h, h0, expected, dtype, f"{name} {dtype}")


@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", _params(["decode_4096_k1", "max_16384", "odd2049_k2", "odd111_k2", "offset_k2",
                                          "vec_bf16_vectors"]))
def test_steer_rmsnorm_matches_reference(name, dtype, gemma):
    c = _case(name, dtype, seed=1, gemma=gemma)
    h0 = c.h.clone()
    expected = ref_rmsnorm(c, h0, EPS, 1.0 if gemma else 0.0)
    out = cuda_norm(c, gemma)
    _sync()
    check_steered(c, c.h, h0, ref_steer(c, h0), dtype, f"{name} {dtype} h")
    assert_close(out.cpu(), expected, dtype, scale=float(expected.abs().max()), msg=f"{name} {dtype} out")
    h_add = cuda_add(c, h0.clone())
    _sync()
    assert_bitwise_equal(c.h, h_add, msg="steer_rmsnorm's h vs steer_add's h")


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_poisoned_unused_vector_never_read(poison, dtype):
    c = _case("odd111_k2", dtype, seed=2, poison=poison)
    h0 = c.h.clone()
    out = cuda_norm(c, False)
    _sync()
    assert torch.isfinite(out).all()
    check_steered(c, c.h, h0, ref_steer(c, h0), dtype, f"poison {poison}")


# ------------------------------------------------------------------------------------------------ vs Triton
@needs_triton
@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "decode_4096_k1"), (torch.bfloat16, "max_16384"),
                                        (torch.float16, "odd2049_k2")])
def test_matches_triton(name, dtype):
    from pllm_kernels.triton.steer import steer_add_triton, steer_rmsnorm_triton

    c = _case(name, dtype, seed=3)
    h0 = c.h.clone()
    h_cu, h_tr = h0.clone(), h0.clone()
    cuda_add(c, h_cu)
    steer_add_triton(h_tr, c.vectors, c.slots, c.scales, c.modes)
    _sync()
    expected = ref_steer(c, h0)
    check_steered(c, h_tr, h0, expected, dtype, "triton")
    assert_close(h_cu.cpu(), h_tr.cpu(), dtype, scale=float(expected.abs().max()), msg="cuda vs triton steer_add")
    for gemma in (False, True):
        h_cu, h_tr = h0.clone(), h0.clone()
        o_cu = cuda_norm(c, gemma, h=h_cu)
        o_tr = torch.empty_like(h_tr)
        steer_rmsnorm_triton(o_tr, h_tr, c.weight, EPS, c.vectors, c.slots, c.scales, c.modes,
                             1.0 if gemma else 0.0)
        _sync()
        assert_close(o_cu.cpu(), o_tr.cpu(), dtype, scale=float(o_tr.float().abs().max()), msg=f"gemma={gemma}")
        assert_close(h_cu.cpu(), h_tr.cpu(), dtype, scale=float(expected.abs().max()), msg="h")


# ------------------------------------------------------------------------------------------------ public ops
@gpu_ops
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ops_auto_and_cuda_backend(dtype):
    """On a GPU ``auto`` picks the CUDA kernels; the public ops with backend auto / cuda give the launchers' bits,
    non-contiguous h included (steered on a copy by the op)."""
    from pllm_kernels.ops import steer_add, steer_rmsnorm
    from pllm_kernels.ops._backend import pick_backend

    for op in ("steer_add", "steer_rmsnorm"):
        assert pick_backend(op, torch.device("cuda"), dtype, "auto") == "cuda"
        assert pick_backend(op, torch.device("cuda"), torch.float64, "auto") == "torch"
    c = _case("stride2_k2", dtype, seed=4)
    h0 = c.h.clone()
    want = cuda_add(c, h0.clone())
    for backend in ("auto", "cuda"):
        h = c.h_buf.clone()[:, ::2]
        steer_add(h, c.vectors, c.slots, c.scales, c.modes, backend=backend)
        assert_bitwise_equal(h, want, msg=f"steer_add backend={backend}")
        h = h0.clone()
        out = steer_rmsnorm(h, c.weight, EPS, c.vectors, c.slots, c.scales, c.modes, weight_offset=1.0,
                            backend=backend)
        h2 = h0.clone()
        assert_bitwise_equal(out, cuda_norm(c, True, h=h2), msg=f"steer_rmsnorm backend={backend}")
        assert_bitwise_equal(h, h2)


@gpu_ops
def test_ops_under_torch_compile():
    from pllm_kernels.ops import steer_add, steer_rmsnorm

    c = _case("odd111_k2", torch.bfloat16, seed=5)

    def f(x):
        x = x * 1.0
        steer_add(x, c.vectors, c.slots, c.scales, c.modes, backend="cuda")
        return steer_rmsnorm(x, c.weight, EPS, c.vectors, c.slots, c.scales, c.modes, backend="cuda") + 1.0

    compiled = torch.compile(f, fullgraph=True)
    assert_bitwise_equal(compiled(c.h.clone()), f(c.h.clone()), msg="compiled vs eager")


# ------------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bitwise_across_batch_sizes(dtype):
    """A token's steered row and norm have the same bits alone, in a decode batch and in a prefill batch."""
    T, H = (40, 160) if ON_EMU or SANITIZER else (600, 4096)
    c = _case("odd111_k2", dtype, seed=6, T=T, H=H, L=8, none_frac=0.1)
    h_full = c.h.clone()
    out_full = cuda_norm(c, False, h=h_full)
    for lo, hi in ((3, 4), (0, 8), (T - 1, T), (T // 2, T // 2 + 32)):
        sub = _case("odd111_k2", dtype, seed=6, T=T, H=H, L=8, none_frac=0.1)
        sub.h, sub.slots, sub.scales = sub.h[lo:hi].clone(), sub.slots[lo:hi].clone(), sub.scales[lo:hi].clone()
        out = cuda_norm(sub, False)
        _sync()
        assert_bitwise_equal(sub.h, h_full[lo:hi], msg=f"tokens {lo}:{hi} h")
        assert_bitwise_equal(out, out_full[lo:hi], msg=f"tokens {lo}:{hi} out")


@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_and_scalar_accesses_bitwise(dtype):
    from pllm_kernels.cuda.steer import variant

    c = _case("offset_k2", dtype, seed=7, layout="contig")
    m = _case("offset_k2", dtype, seed=7)
    assert "vec16" in variant(c.h, c.vectors, out=c.h, weight=c.weight)
    assert "scalar" in variant(m.h, m.vectors, out=m.h, weight=m.weight)
    for gemma in (False, True):
        h_c, h_m = c.h.clone(), m.h.clone()
        o_c, o_m = cuda_norm(c, gemma, h=h_c), cuda_norm(m, gemma, h=h_m)
        _sync()
        assert_bitwise_equal(h_m, h_c, msg="h scalar vs vec16")
        assert_bitwise_equal(o_m, o_c, msg="out scalar vs vec16")


@gpu_only
def test_side_stream_same_bits():
    c = _case("odd2049_k2", torch.bfloat16, seed=8)
    h_default = c.h.clone()
    o_default = cuda_norm(c, False, h=h_default)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        h_side = c.h.clone()
        o_side = cuda_norm(c, False, h=h_side)
    s.synchronize()
    torch.cuda.synchronize()
    assert_bitwise_equal(h_side, h_default)
    assert_bitwise_equal(o_side, o_default)


@gpu_only
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_graph_capture_and_replay(fused):
    """Capture steering of static buffers (steer_add, or steer_rmsnorm) in one graph; replay after refilling the
    routing: the same bits as eager launches, rows without steering untouched."""
    T, H, L = 24, 4096, 6
    c = make_steer_case(T=T, H=H, L=L, K=2, dtype=torch.bfloat16, seed=9, device="cuda")
    h_base = c.h.clone()
    h, out = torch.empty_like(h_base), torch.empty_like(h_base)
    slots, scales = c.slots.clone(), c.scales.clone()

    def step():
        h.copy_(h_base)
        from pllm_kernels.cuda.steer import steer_add_cuda, steer_rmsnorm_cuda

        if fused:
            steer_rmsnorm_cuda(out, h, c.weight, EPS, c.vectors, slots, scales, c.modes, 0.0)
        else:
            steer_add_cuda(h, c.vectors, slots, scales, c.modes)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for seed in range(3):
        gen = torch.Generator().manual_seed(100 + seed)
        new_slots = torch.randint(-1, L, (T, 2), generator=gen, dtype=torch.int32)
        slots.copy_(new_slots)
        scales.copy_(torch.rand(T, 2, generator=gen) * 2 - 1)
        g.replay()
        torch.cuda.synchronize()
        ec = make_steer_case(T=T, H=H, L=L, K=2, dtype=torch.bfloat16, seed=9, device="cuda")
        ec.slots, ec.scales = slots.clone(), scales.clone()
        h_eager = h_base.clone()
        if fused:
            out_eager = cuda_norm(ec, False, h=h_eager)
            torch.cuda.synchronize()
            assert_bitwise_equal(out, out_eager, msg=f"replay {seed}: out")
        else:
            cuda_add(ec, h_eager)
            torch.cuda.synchronize()
        assert_bitwise_equal(h, h_eager, msg=f"replay {seed}: h")
        check_steered(ec, h, h_base, ref_steer(ec, h_base), torch.bfloat16, f"replay {seed}")


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contig", "offset"])
def test_device_bits_equal_the_emulator(dtype, layout):
    """The premise of the CPU tests: the GPU gives the CPU emulator's bits (explicit FMAs, IEEE division / sqrt, no
    contraction), for both ops, every mode, 16-byte and scalar variants."""
    from pllm_kernels.cuda.steer import steer_add_cuda, steer_rmsnorm_cuda

    for gemma in (False, True):
        c = make_steer_case(T=13, H=1000, L=6, K=2, dtype=dtype, seed=12, layout=layout, gemma=gemma, device="cuda")
        e = make_steer_case(T=13, H=1000, L=6, K=2, dtype=dtype, seed=12, layout=layout, gemma=gemma)
        wo = 1.0 if gemma else 0.0
        out_d, out_e = torch.empty_like(c.h), torch.empty_like(e.h)
        steer_rmsnorm_cuda(out_d, c.h, c.weight, EPS, c.vectors, c.slots, c.scales, c.modes, wo)
        steer_rmsnorm_cuda(out_e, e.h, e.weight, EPS, e.vectors, e.slots, e.scales, e.modes, wo, _emulate=True)
        h_d, h_e = c.h.clone(), e.h.clone()
        steer_add_cuda(h_d, c.vectors, c.slots, c.scales, c.modes)
        steer_add_cuda(h_e, e.vectors, e.slots, e.scales, e.modes, _emulate=True)
        torch.cuda.synchronize()
        assert_bitwise_equal(c.h.cpu(), e.h, msg=f"steer_rmsnorm h gemma={gemma}")
        assert_bitwise_equal(out_d.cpu(), out_e, msg=f"steer_rmsnorm out gemma={gemma}")
        assert_bitwise_equal(h_d.cpu(), h_e, msg="steer_add twice")


def test_supports_on_device():
    from pllm_kernels.cuda.steer import supports

    if ON_EMU:
        pytest.skip("needs a CUDA device")
    for dtype in DTYPES:
        assert supports(torch.device("cuda"), dtype) is None, supports(torch.device("cuda"), dtype)
    assert supports(torch.device("cuda"), torch.float64) is not None


# ------------------------------------------------------------------------------------------------ sanitizer subset
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned", [True, False])
def test_sanitizer_every_kernel_variant(dtype, aligned):
    """Tiny shapes that launch every kernel variant (activation x vector x weight dtype, 16-byte / scalar accesses,
    with and without the norm; 1 and several warps), each checked against the reference: the workload of the
    compute-sanitizer runs (memcheck; racecheck on the block reductions' shared memory)."""
    act = [dtype] if dtype == torch.float32 else [dtype, torch.float32]
    layout = "contig" if aligned else "offset"
    for i, (vd, wd) in enumerate((v, w) for v in act for w in act):
        for H in (64, 520):
            c = make_steer_case(T=5, H=H, L=5, K=2, dtype=dtype, vec_dtype=vd, w_dtype=wd, seed=30 + i,
                                layout=layout, device=DEVICE)
            h0 = c.h.clone()
            h_add = cuda_add(c, h0.clone())
            out = cuda_norm(c, i % 2 == 1)
            _sync()
            expected = ref_steer(c, h0)
            check_steered(c, h_add, h0, expected, dtype, f"add v={vd} H={H} aligned={aligned}")
            check_steered(c, c.h, h0, expected, dtype, f"norm h v={vd} w={wd} H={H} aligned={aligned}")
            ref_out = ref_rmsnorm(c, h0, EPS, 1.0 if i % 2 == 1 else 0.0)
            assert_close(out.cpu(), ref_out, dtype, scale=float(ref_out.abs().max()), msg=f"out v={vd} w={wd}")
