"""The CUDA steering kernels on a machine without GPU (CI).

* the extension lists the steering launchers, its constants agree with the Python side and the Triton kernels;
* the ptxas resource report (``pllm_kernels/_C.resources.txt``) holds every steering kernel for sm_80 and sm_90,
  without spills or stack frame, within the 64 registers a 1024-thread block allows;
* the device code itself on the extension's CPU emulator (``_emulate=True``: the same kernel source compiled for the
  host, threads as cooperative contexts with real barriers and shuffles): steer_add and steer_rmsnorm (Llama and
  Gemma norms) against the float64 reference in fp32 / fp16 / bf16 — mixed modes, K = 1..3, ``-1`` entries, odd hidden
  sizes (111, 2049), strided / misaligned rows, vectors and weight in float32, in h's dtype or converted — rows without
  steering bit for bit untouched, NaN / inf in an unused vector never reaching any row, out-of-range slot ids routing
  nowhere; and the bitwise promises: 16-byte vs scalar accesses, a token alone vs in a batch, steer_rmsnorm's h equal
  to steer_add's;
* clear errors (CPU tensors, no device, bad arguments), ``supports()``, and the op tables' ``cuda`` entries with
  ``auto`` falling back without a device.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from steer_cases import check_steered, make_steer_case, ref_rmsnorm, ref_steer
from utils import assert_bitwise_equal, assert_close

from pllm_kernels import _ext

REQUIRE = os.environ.get("PLLM_REQUIRE_CUDA_EXT", "").strip().lower() not in ("", "0", "false", "no", "off")
DEFAULT_ARCHS = os.environ.get("PLLM_CUDA_ARCHS", "80;90").replace(" ", "") in ("80;90", "80,90")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-6


def _has_steer() -> bool:
    return _ext.HAS_CUDA_EXT and hasattr(_ext.ext(), "steer_add")


needs_ext = pytest.mark.skipif(not _has_steer(), reason=f"CUDA extension with steering kernels not built: "
                                                        f"{_ext.ext_error}")


def _add(c, h=None):
    from pllm_kernels.cuda.steer import steer_add_cuda

    h = c.h if h is None else h
    steer_add_cuda(h, c.vectors, c.slots, c.scales, c.modes, _emulate=True)
    return h


def _norm(c, gemma, h=None, out=None):
    from pllm_kernels.cuda.steer import steer_rmsnorm_cuda

    h = c.h if h is None else h
    out = torch.full(h.shape, float("nan"), dtype=h.dtype) if out is None else out
    steer_rmsnorm_cuda(out, h, c.weight, EPS, c.vectors, c.slots, c.scales, c.modes, 1.0 if gemma else 0.0,
                       _emulate=True)
    return out


@pytest.fixture(params=["forward", "reverse"])
def emu_order(request):
    """Threads of a block run in index order or in reverse order between barriers (other interleavings)."""
    C = _ext.ext()
    C.emu_config(False, request.param == "reverse")
    yield request.param
    C.emu_config(False, False)


# ------------------------------------------------------------------------------------------------ build and report
def test_required_extension_has_steer():
    if not REQUIRE:
        pytest.skip("PLLM_REQUIRE_CUDA_EXT not set")
    assert _has_steer(), f"PLLM_REQUIRE_CUDA_EXT=1 but pllm_kernels._C has no steering launchers ({_ext.ext_error})"


@needs_ext
def test_extension_lists_steer_launchers_and_constants():
    from pllm_kernels.cuda.steer import MAX_HIDDEN
    from pllm_kernels.triton.steer import MAX_HIDDEN as TRITON_MAX_HIDDEN

    C = _ext.ext()
    for name in ("steer_add", "steer_rmsnorm", "steer_add_emu", "steer_rmsnorm_emu", "steer_kernels",
                 "steer_variant", "steer_constants", "steer_block_threads"):
        assert callable(getattr(C, name)), name
    k = C.steer_constants()
    assert k["max_hidden"] == MAX_HIDDEN == TRITON_MAX_HIDDEN == k["vals_per_thread"] * k["max_threads"]
    for H in (0, 1, 16, 17, 111, 512, 513, 2049, 4096, 16383, 16384):
        need = -(-H // 16)  # threads holding 16 values each
        want = max(32, -(-need // 32) * 32)
        assert C.steer_block_threads(H) == want <= 1024, H
    with pytest.raises(RuntimeError, match="hidden out of range"):
        C.steer_block_threads(16385)
    names = C.steer_kernels()
    assert len(names) == len(set(names)) == 28  # fp32: 2 add + 2 norm; fp16 / bf16: 4 add + 8 norm
    assert "steer_rmsnorm<bfloat16,v=float32,w=bfloat16,vec16>" in names


def _report():
    from test_lora_cuda_build import parse_ptxas_report

    path = Path(_ext.ext().__file__).with_name("_C.resources.txt")
    if not path.exists():
        pytest.fail(f"resource report {path} missing (rebuild: python setup.py build_ext --inplace)")
    return path, parse_ptxas_report(path.read_text())


@needs_ext
def test_resource_report_covers_every_steer_kernel_without_spills():
    """Every steering kernel for sm_80 and sm_90: no spills, no stack frame, <= 64 registers (1024-thread blocks:
    __launch_bounds__(1024) caps them there, so more would mean spills), 512 bytes of static shared memory."""
    if not DEFAULT_ARCHS:
        pytest.skip("non-default PLLM_CUDA_ARCHS")
    path, entries = _report()
    steer = [e for e in entries if "steer_kernel" in e.name]
    archs = {}
    for e in steer:
        archs.setdefault(e.name, set()).add(e.arch)
        assert e.registers > 0 and e.spill_stores == 0 and e.spill_loads == 0 and e.stack == 0, e
        assert e.registers <= 64 and e.smem <= 1024, e
    assert len(archs) == len(_ext.ext().steer_kernels()) == 28, f"{path}: {sorted(archs)}"
    for name, got in archs.items():
        assert {"sm_80", "sm_90"} <= got, f"{name}: compiled for {sorted(got)}"


# ------------------------------------------------------------------------------------------------ emulated kernels
CASES = {
    # odd hidden (scalar accesses), K = 2, every mode, a third of the entries -1
    "odd111_k2": dict(T=9, H=111, L=5, K=2),
    # odd hidden just above a power of two: 160 threads (5 warps), the last chunk partial
    "odd2049_k1": dict(T=4, H=2049, L=4, K=1, none_frac=0.2),
    # 16-byte accesses, K = 3
    "vec64_k3": dict(T=6, H=64, L=6, K=3),
    # 16-byte accesses over 8 warps
    "vec1024_k2": dict(T=5, H=1024, L=5, K=2),
    # h every other column of a wider buffer: copied, steered, written back
    "stride2": dict(T=7, H=96, L=5, K=2, layout="stride2"),
    # h a misaligned column window: scalar accesses in place, neighbours untouched
    "colslice": dict(T=7, H=96, L=5, K=2, layout="colslice"),
    # everything one element off alignment: scalar accesses
    "offset": dict(T=6, H=128, L=5, K=2, layout="offset"),
}


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_emulated_steer_add_matches_reference(name, dtype, emu_order):
    c = make_steer_case(dtype=dtype, seed=zlib.crc32(name.encode()) % 1000, **CASES[name])
    h0, buf0 = c.h.clone(), c.h_buf.clone()
    expected = ref_steer(c, h0)
    _add(c)
    check_steered(c, c.h, h0, expected, dtype, f"{name} {dtype}")
    if CASES[name].get("layout") in ("stride2", "colslice"):
        mask = torch.ones_like(buf0, dtype=torch.bool)
        if CASES[name]["layout"] == "stride2":
            mask[:, ::2] = False
        else:
            mask[:, 3 : 3 + c.h.shape[1]] = False
        assert_bitwise_equal(c.h_buf[mask], buf0[mask], msg="bytes around h")


@needs_ext
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["odd111_k2", "odd2049_k1", "vec64_k3", "colslice", "offset"])
def test_emulated_steer_rmsnorm_matches_reference(name, dtype, gemma):
    """h steered as steer_add does it (same bits), out close to the spec's RMSNorm of the steered rows, and equal
    within rounding to the unfused HF-style norm of the steered h."""
    c = make_steer_case(dtype=dtype, seed=7 + zlib.crc32(name.encode()) % 1000, gemma=gemma, **CASES[name])
    h0 = c.h.clone()
    expected = ref_rmsnorm(c, h0, EPS, 1.0 if gemma else 0.0)
    out = _norm(c, gemma)
    check_steered(c, c.h, h0, ref_steer(c, h0), dtype, f"{name} {dtype} h")
    assert_close(out, expected, dtype, scale=float(expected.abs().max()), msg=f"{name} {dtype} out")
    h_add = _add(c, h0.clone())
    assert_bitwise_equal(c.h, h_add, msg="steer_rmsnorm's h vs steer_add's h")
    x = c.h.float()  # the unfused norm of the stored steered state
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    hf = (n * (1.0 + c.weight.float())).to(dtype) if gemma else (c.weight * n.to(dtype)).to(dtype)
    assert_close(out, hf, dtype, scale=float(hf.abs().max()), msg="vs steer_add + HF norm")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vec_dtype", ["act", torch.float32, torch.float64, "other16"])
@pytest.mark.parametrize("w_dtype", ["act", torch.float32])
def test_emulated_vector_and_weight_dtypes(dtype, vec_dtype, w_dtype):
    """Vectors in float32 or h's dtype run as they are; float64 / the other 16-bit dtype are converted to float32 (the
    spec's arithmetic): all agree with the reference; the norm weight in float32 or h's dtype."""
    other = torch.bfloat16 if dtype == torch.float16 else torch.float16
    vd = {"act": dtype, "other16": other}.get(vec_dtype, vec_dtype)
    wd = dtype if w_dtype == "act" else w_dtype
    c = make_steer_case(T=6, H=64, L=5, K=2, dtype=dtype, vec_dtype=vd, w_dtype=wd, seed=3)
    from pllm_kernels.cuda.steer import variant

    kernel_v = "float32" if vd not in (dtype,) else str(dtype).removeprefix("torch.")
    assert variant(c.h, c.vectors, out=c.h, weight=c.weight).startswith(
        f"steer_rmsnorm<{str(dtype).removeprefix('torch.')},v={kernel_v},w={str(wd).removeprefix('torch.')},vec16")
    h0 = c.h.clone()
    expected = ref_rmsnorm(c, h0, EPS, 0.0)
    out = _norm(c, False)
    check_steered(c, c.h, h0, ref_steer(c, h0), dtype, "h")
    assert_close(out, expected, dtype, scale=float(expected.abs().max()), msg="out")


@needs_ext
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_each_mode(mode, dtype):
    c = make_steer_case(T=8, H=200, L=4, K=2, dtype=dtype, modes=[mode] * 4, seed=11 + mode, none_frac=0.2)
    h0 = c.h.clone()
    expected = ref_steer(c, h0)
    _add(c)
    check_steered(c, c.h, h0, expected, dtype, f"mode {mode}")
    if mode == 1 and dtype == torch.float32:  # ablation leaves no component along a K = 1 row's direction
        from pllm_kernels.cuda.steer import steer_add_cuda

        x = torch.randn(3, 200, generator=torch.Generator().manual_seed(1))
        v = torch.randn(2, 200, generator=torch.Generator().manual_seed(2))
        ablate = torch.ones(2, dtype=torch.int32)
        steer_add_cuda(x, v, torch.tensor([0, 1, -1], dtype=torch.int32), torch.ones(3), ablate, _emulate=True)
        assert float((x[0] @ v[0]).abs()) < 1e-4 * float(v[0].norm() * x[0].norm())


@needs_ext
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_poisoned_unused_vector_never_read(poison, dtype):
    """NaN / inf in a slot no token uses never reaches any row (never loaded), in either op."""
    for norm in (False, True):
        c = make_steer_case(T=9, H=111, L=5, K=2, dtype=dtype, poison=poison, seed=5)
        h0 = c.h.clone()
        if norm:
            out = _norm(c, False)
            assert torch.isfinite(out).all()
            expected = ref_rmsnorm(c, h0, EPS, 0.0)
            assert_close(out, expected, dtype, scale=float(expected.abs().max()), msg="out")
        else:
            _add(c)
        check_steered(c, c.h, h0, ref_steer(c, h0), dtype, f"poison {poison} norm={norm}")


@needs_ext
def test_emulated_out_of_range_ids_and_all_none():
    """Slot ids >= num_slots route nowhere (like -1); with no entry at all h keeps every bit, and steer_rmsnorm
    still writes the plain RMSNorm of every row."""
    c = make_steer_case(T=5, H=72, L=3, K=2, dtype=torch.float16, seed=9)
    c.slots = torch.tensor([[0, 3], [103, -1], [2, 1], [-1, -1], [-5, 2]], dtype=torch.int32)
    h0 = c.h.clone()
    _add(c)
    check_steered(c, c.h, h0, ref_steer(c, h0), torch.float16, "out of range")
    c.slots = torch.full((5, 2), -1, dtype=torch.int32)
    h1 = c.h.clone()
    out = _norm(c, False)
    assert_bitwise_equal(c.h, h1, msg="no entry: h untouched")
    expected = ref_rmsnorm(c, h1, EPS, 0.0)
    assert_close(out, expected, torch.float16, scale=float(expected.abs().max()), msg="plain norm")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_vector_and_scalar_accesses_same_bits(dtype, emu_order):
    """16-byte and scalar kernels hold the same elements in the same threads: same bits, both ops, every mode."""
    from pllm_kernels.cuda.steer import variant

    c = make_steer_case(T=7, H=256, L=5, K=2, dtype=dtype, seed=13)
    m = make_steer_case(T=7, H=256, L=5, K=2, dtype=dtype, seed=13, layout="offset")
    assert "vec16" in variant(c.h, c.vectors, out=c.h, weight=c.weight)
    assert "scalar" in variant(m.h, m.vectors, out=m.h, weight=m.weight)
    assert_bitwise_equal(m.h, c.h)
    h_c, h_m = c.h.clone(), m.h.clone()
    _add(c, h_c)
    _add(m, h_m)
    assert_bitwise_equal(h_m, h_c, msg="steer_add scalar vs vec16")
    for gemma in (False, True):
        h_c, h_m = c.h.clone(), m.h.clone()
        assert_bitwise_equal(_norm(m, gemma, h=h_m), _norm(c, gemma, h=h_c), msg=f"rmsnorm gemma={gemma}")
        assert_bitwise_equal(h_m, h_c)


@needs_ext
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_fused_norm_reads_the_stored_state(dtype, gemma):
    """steer_rmsnorm == steer_add, then steer_rmsnorm with no entry (the plain norm of the stored h), bit for bit:
    the fused norm reads the steered row as rounded to h's dtype, not its fp32 value."""
    c = make_steer_case(T=10, H=300, L=5, K=2, dtype=dtype, seed=19, none_frac=0.0)
    h0 = c.h.clone()
    out_fused = _norm(c, gemma)
    h_two = _add(c, h0.clone())
    none = make_steer_case(T=10, H=300, L=5, K=2, dtype=dtype, seed=19, none_frac=0.0)
    none.slots = torch.full_like(none.slots, -1)
    out_two = _norm(none, gemma, h=h_two)
    assert_bitwise_equal(c.h, h_two, msg="h")
    assert_bitwise_equal(out_fused, out_two, msg="fused norm vs norm of the stored steered h")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_batch_invariance(dtype):
    """A token's steered row and norm have the same bits alone and in a batch of 40 (one row per block, reduction
    order fixed by the hidden size)."""
    c = make_steer_case(T=40, H=160, L=6, K=2, dtype=dtype, seed=17, none_frac=0.1)
    h_full = c.h.clone()
    out_full = _norm(c, True, h=h_full)
    for t in (1, 17, 39):
        sub = make_steer_case(T=40, H=160, L=6, K=2, dtype=dtype, seed=17, none_frac=0.1)
        sub.h, sub.slots, sub.scales = sub.h[t : t + 1].clone(), sub.slots[t : t + 1], sub.scales[t : t + 1]
        out = _norm(sub, True)
        assert_bitwise_equal(sub.h, h_full[t : t + 1], msg=f"token {t} h")
        assert_bitwise_equal(out, out_full[t : t + 1], msg=f"token {t} out")


@needs_ext
def test_emulated_matches_torch_backend_and_ops_wiring():
    """The emulated kernels agree with the torch backend; the op table's cuda entry is the launcher of this module."""
    from pllm_kernels.ops import steer as ops_steer
    from pllm_kernels.torch_ops.steer import steer_rmsnorm_torch

    c = make_steer_case(T=12, H=320, L=5, K=2, dtype=torch.bfloat16, seed=21)
    h_t, out_t = c.h.clone(), torch.empty_like(c.h)
    steer_rmsnorm_torch(out_t, h_t, c.weight, EPS, c.vectors, c.slots, c.scales, c.modes, 0.0)
    h_c = c.h.clone()
    out_c = _norm(c, False, h=h_c)
    assert_close(h_c, h_t, torch.bfloat16, scale=float(h_t.float().abs().max()))
    assert_close(out_c, out_t, torch.bfloat16, scale=float(out_t.float().abs().max()))
    assert ops_steer._STEER.impls["cuda"] is not None and ops_steer._STEER_NORM.impls["cuda"] is not None


@needs_ext
def test_gpu_test_module_passes_on_the_emulator():
    """tests/cuda/test_steer_cuda_gpu.py runs for real only on a GPU; here its small cases run on the CPU emulator
    (PLLM_STEER_GPU_TESTS_ON_EMULATOR=1), so the GPU tests' own logic is checked on every CI run."""
    env = {**os.environ, "PLLM_STEER_GPU_TESTS_ON_EMULATOR": "1"}
    env.pop("PLLM_SANITIZER", None)
    path = Path(__file__).with_name("test_steer_cuda_gpu.py")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
                          capture_output=True, text=True, env=env, cwd=str(Path(__file__).parents[2]), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


# ------------------------------------------------------------------------------------------------ errors, supports
def test_cpu_tensors_raise_clear_error():
    from pllm_kernels.cuda.steer import steer_add_cuda, steer_rmsnorm_cuda

    c = make_steer_case(T=3, H=16, L=3, K=1)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        steer_add_cuda(c.h, c.vectors, c.slots, c.scales, c.modes)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        steer_rmsnorm_cuda(torch.empty_like(c.h), c.h, c.weight, EPS, c.vectors, c.slots, c.scales, c.modes, 0.0)


def test_ops_backend_cuda_on_cpu_is_a_clear_error():
    from pllm_kernels.ops import steer_add, steer_rmsnorm

    c = make_steer_case(T=3, H=16, L=3, K=1)
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        steer_add(c.h, c.vectors, c.slots, c.scales, c.modes, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        steer_rmsnorm(c.h, c.weight, EPS, c.vectors, c.slots, c.scales, c.modes, backend="cuda")


@needs_ext
def test_launchers_without_device_raise():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    C = _ext.ext()
    with pytest.raises(RuntimeError, match="no CUDA device"):
        C.steer_add(4096, 4096, 4096, 4096, 4096, 2, 64, 3, 1, 64, 64, 1, 0, 0)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        C.steer_rmsnorm(4096, 4096, 4096, 4096, 4096, 4096, 4096, 2, 64, 3, 1, 64, 64, 64, 1e-6, 0.0, 1, 0, 1, 0)


@needs_ext
def test_emulated_argument_errors():
    from pllm_kernels.cuda.steer import steer_add_cuda, steer_rmsnorm_cuda

    C = _ext.ext()
    c = make_steer_case(T=3, H=16, L=3, K=1)
    args = [c.h.data_ptr(), c.vectors.data_ptr(), c.modes.data_ptr(), c.slots.data_ptr(), c.scales.data_ptr(),
            3, 16, 3, 1, 16, 16]
    with pytest.raises(RuntimeError, match="unsupported dtype code"):
        C.steer_add_emu(*args, 7, 0)
    with pytest.raises(RuntimeError, match="vectors must be float32 or h's dtype"):
        C.steer_add_emu(*args, 0, 2)
    with pytest.raises(RuntimeError, match="exceeds the CUDA steering kernels"):
        C.steer_add_emu(*args[:6], 16385, *args[7:], 0, 0)
    with pytest.raises(RuntimeError, match="null pointer"):
        C.steer_add_emu(0, *args[1:], 0, 0)
    with pytest.raises(RuntimeError, match="weight_offset must be 0"):
        C.steer_rmsnorm_emu(c.h.data_ptr(), *args[:5], c.weight.data_ptr(), 3, 16, 3, 1, 16, 16, 16, 1e-6, 0.5, 0, 0,
                            0)
    with pytest.raises(RuntimeError, match="exceeds the CUDA steering kernels"):
        steer_add_cuda(torch.zeros(1, 16385), torch.zeros(1, 16385), c.slots[:1], c.scales[:1], c.modes[:1],
                       _emulate=True)
    with pytest.raises(RuntimeError, match="out must be"):
        steer_rmsnorm_cuda(torch.empty(3, 16, dtype=torch.float16), c.h, c.weight, EPS, c.vectors, c.slots, c.scales,
                           c.modes, 0.0, _emulate=True)
    with pytest.raises(RuntimeError, match="float32 / float16 / bfloat16"):
        steer_add_cuda(c.h.double(), c.vectors, c.slots, c.scales, c.modes, _emulate=True)


def test_supports_reasons():
    from pllm_kernels.cuda.steer import supports

    assert "float64" in supports(torch.device("cuda"), torch.float64)
    assert "CUDA tensors" in supports(torch.device("cpu"), torch.float16)
    if not torch.cuda.is_available() or not _ext.cuda_ext_usable():
        why = supports(torch.device("cuda"), torch.bfloat16)
        assert isinstance(why, str) and why
    else:
        assert supports(torch.device("cuda"), torch.bfloat16) is None


def test_op_tables_have_cuda_entries_and_auto_falls_back():
    """backend_table() reports the CUDA steering kernels; ``auto`` on CPU tensors (or without a usable device) picks
    Triton / torch, ``backend='cuda'`` there raises a clear RuntimeError."""
    import pllm_kernels
    from pllm_kernels.ops._backend import pick_backend

    table = pllm_kernels.backend_table()
    for op in ("steer_add", "steer_rmsnorm"):
        assert table[op] == {"torch": True, "triton": True, "cuda": True}, op
        assert pick_backend(op, torch.device("cpu"), torch.bfloat16, "auto") == "torch"
        with pytest.raises(RuntimeError, match="cuda"):
            pick_backend(op, torch.device("cpu"), torch.bfloat16, "cuda")
        if not _ext.cuda_ext_usable():
            assert pick_backend(op, torch.device("cuda"), torch.bfloat16, "auto") in ("torch", "triton")
            with pytest.raises(RuntimeError, match="unusable|does not support"):
                pick_backend(op, torch.device("cuda"), torch.bfloat16, "cuda")
        else:
            assert pick_backend(op, torch.device("cuda"), torch.bfloat16, "auto") == "cuda"
