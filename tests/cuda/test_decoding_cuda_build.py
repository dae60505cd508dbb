"""The CUDA ``mix_logprobs`` kernel on a machine without GPU (CI).

* the extension lists the launcher; the resource report holds its six kernels for sm_80 and sm_90 without spills;
* the kernel's exp / log (``csrc/include/pllm/fmath.cuh``, IEEE-exact operations only, so the emulator has the GPU's
  bits) within 1 ulp of float64, special values;
* the device code on the extension's CPU emulator against the float64 reference in fp32 / fp16 / bf16: 1..4 sources,
  negative / zero / large coefficients, tokens ruled out by ``-inf``, odd vocabularies (scalar loads), strided and
  misaligned rows; a NaN in a source whose coefficient is 0 never read; bitwise: 16-byte vs scalar loads, a row alone vs
  in a batch;
* errors, ``supports()``, the op table's ``cuda`` entry and ``auto`` falling back without a device.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from utils import assert_bitwise_equal, assert_close

from pllm_kernels import _ext
from pllm_kernels.reference.decoding import contrast_logits_ref, mix_logprobs_ref

REQUIRE = os.environ.get("PLLM_REQUIRE_CUDA_EXT", "").strip().lower() not in ("", "0", "false", "no", "off")
DEFAULT_ARCHS = os.environ.get("PLLM_CUDA_ARCHS", "80;90").replace(" ", "") in ("80;90", "80,90")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _has_mix() -> bool:
    return _ext.HAS_CUDA_EXT and hasattr(_ext.ext(), "mix_logprobs")


needs_ext = pytest.mark.skipif(not _has_mix(), reason=f"CUDA extension with decoding kernels not built: "
                                                      f"{_ext.ext_error}")


def _mix(sources, coefs, out=None):
    from pllm_kernels.cuda.decoding import mix_logprobs_cuda

    S, B, V = sources.shape
    out = torch.full((B, V), float("nan")) if out is None else out
    mix_logprobs_cuda(out, sources, coefs, _emulate=True)
    return out


def _offset_copy(t: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


def _sources(S, B, V, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(S, B, V, generator=g) * scale).to(dtype)


def _check(got, sources, coefs, msg):
    want = mix_logprobs_ref(sources, coefs)
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin), f"{msg}: -inf pattern"
    assert torch.isneginf(got[~fin]).all(), msg
    # float32 arithmetic on log-probs of magnitude up to max|want|: the table's fp32 tolerance scaled by it
    assert_close(got[fin], want[fin], torch.float32, scale=float(want[fin].abs().max()), msg=msg)


# ------------------------------------------------------------------------------------------------ build and report
def test_required_extension_has_mix():
    if not REQUIRE:
        pytest.skip("PLLM_REQUIRE_CUDA_EXT not set")
    assert _has_mix(), f"PLLM_REQUIRE_CUDA_EXT=1 but pllm_kernels._C has no mix_logprobs ({_ext.ext_error})"


@needs_ext
def test_extension_lists_mix_launcher_and_constants():
    from pllm_kernels.cuda.decoding import MAX_SOURCES

    C = _ext.ext()
    for name in ("mix_logprobs", "mix_logprobs_emu", "decoding_kernels", "decoding_constants", "fmath_eval"):
        assert callable(getattr(C, name)), name
    assert C.decoding_constants()["max_sources"] == MAX_SOURCES
    assert sorted(C.decoding_kernels()) == sorted(f"mix_logprobs<{d},{ld}>" for d in ("float32", "float16", "bfloat16")
                                                  for ld in ("vec16", "scalar"))


@needs_ext
def test_resource_report_covers_every_mix_kernel_without_spills():
    if not DEFAULT_ARCHS:
        pytest.skip("non-default PLLM_CUDA_ARCHS")
    from test_lora_cuda_build import parse_ptxas_report

    path = Path(_ext.ext().__file__).with_name("_C.resources.txt")
    if not path.exists():
        pytest.fail(f"resource report {path} missing (rebuild: python setup.py build_ext --inplace)")
    mix = [e for e in parse_ptxas_report(path.read_text()) if "mix_logprobs_kernel" in e.name]
    archs = {}
    for e in mix:
        archs.setdefault(e.name, set()).add(e.arch)
        assert e.registers > 0 and e.spill_stores == 0 and e.spill_loads == 0 and e.stack == 0, e
        assert e.registers <= 128 and e.smem <= 2048, e  # 512-thread blocks: up to 128 registers without spilling
    assert len(archs) == 6, sorted(archs)
    for name, got in archs.items():
        assert {"sm_80", "sm_90"} <= got, f"{name}: compiled for {sorted(got)}"


# ------------------------------------------------------------------------------------------------ exp / log
def _ulps(got, want64):
    got = np.asarray(got, np.float64)
    spacing = np.abs(np.spacing(want64.astype(np.float32)).astype(np.float64))
    return np.abs(got - want64) / spacing


@needs_ext
def test_fmath_exp_log_within_one_ulp():
    C = _ext.ext()
    rng = np.random.default_rng(0)
    xs = np.concatenate([rng.uniform(-87.3, 0, 40000), rng.uniform(-1, 1, 20000), rng.uniform(0, 88.7, 20000),
                         -np.logspace(-30, 1.9, 2000)]).astype(np.float32)
    assert _ulps(C.fmath_eval("exp", xs.tolist()), np.exp(xs.astype(np.float64))).max() <= 1.0
    ys = np.concatenate([rng.uniform(1, 2e5, 40000), rng.uniform(0.5, 2, 20000),
                         np.logspace(-44, 38, 4000)]).astype(np.float32)
    ys = ys[ys > 0]
    assert _ulps(C.fmath_eval("log", ys.tolist()), np.log(ys.astype(np.float64))).max() <= 1.0
    e = C.fmath_eval("exp", [float("-inf"), 0.0, -88.0, 89.0, float("inf")])
    assert e == [0.0, 1.0, 0.0, math.inf, math.inf]
    assert math.isnan(C.fmath_eval("exp", [float("nan")])[0])
    lg = C.fmath_eval("log", [0.0, 1.0, float("inf")])
    assert lg == [-math.inf, 0.0, math.inf]
    assert all(math.isnan(v) for v in C.fmath_eval("log", [-1.0, float("nan")]))


# ------------------------------------------------------------------------------------------------ emulated kernel
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [500, 1001, 4096])
def test_emulated_mix_matches_reference(dtype, V):
    """Three sources, per-row coefficients (negative, zero, > 1), tokens ruled out by a source that counts (with a
    positive or a negative coefficient) and by one whose coefficient is 0 on that row (no effect there)."""
    src = _sources(3, 4, V, dtype, seed=V)
    src[0, :, :7] = -math.inf
    src[2, 1, 9] = -math.inf
    src[2, 0, 20] = -math.inf  # coefficient -0.5: still ruled out (c * -inf would be +inf)
    coefs = torch.tensor([[1.0, 0.5, -0.5], [1.0, 2.0, 0.0], [2.0, -1.0, 0.0], [1.0, 0.0, 0.0]])
    got = _mix(src, coefs)
    _check(got, src, coefs, f"{dtype} V={V}")
    assert torch.isfinite(got[1, 9]) and torch.isneginf(got[0, 20])


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_contrast_and_single_source(dtype):
    """CoS / CFG contrast with lam in [-1, 10] (large coefficients), and one source (plain log_softmax)."""
    lw, lwo = _sources(1, 6, 777, dtype, 1)[0], _sources(1, 6, 777, dtype, 2)[0]
    lam = torch.tensor([-1.0, 0.0, 0.5, 1.0, 3.0, 10.0])
    got = _mix(torch.stack([lw, lwo]), torch.stack([1.0 + lam, -lam], 1))
    want = contrast_logits_ref(lw, lwo, lam)
    assert_close(got, want, torch.float32, scale=float(want.abs().max()), msg="contrast")
    one = _mix(lw[None], torch.ones(6, 1))
    assert_close(one, torch.log_softmax(lw.double(), -1), torch.float32, scale=30, msg="one source")


@needs_ext
def test_emulated_zero_coefficient_source_never_read():
    """A source whose coefficient is 0 on a row is not read there: NaN / inf in it cannot reach that row."""
    src = _sources(3, 3, 300, torch.float32, 3)
    src[1, 0] = float("nan")
    src[2, 2, :50] = float("inf")
    coefs = torch.tensor([[1.0, 0.0, -0.5], [1.0, 0.5, 0.5], [1.0, 1.0, 0.0]])
    got = _mix(src, coefs)
    assert torch.isfinite(got).all()
    clean = src.clone()
    clean[1, 0] = 0.0
    clean[2, 2, :50] = 0.0
    _check(got, clean, coefs, "zero coefficients")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_strided_and_misaligned_sources(dtype):
    """Sources as a window of wider rows (row stride != V), out with a row stride, coefs (S,) broadcast (stride 0);
    misaligned rows take the scalar loads and give the same bits as the 16-byte ones."""
    wide = _sources(2, 5, 1040, dtype, 4)
    src = wide[:, :, 8 : 8 + 1024]
    coefs = torch.tensor([1.5, -0.5]).expand(5, 2)
    out_buf = torch.full((5, 1030), 7.0)
    out = out_buf[:, :1024]
    _mix(src, coefs, out=out)
    _check(out, src, coefs, "strided")
    assert (out_buf[:, 1024:] == 7.0).all()
    vec = _mix(src.contiguous(), coefs.contiguous())
    sca = _mix(_offset_copy(src.contiguous()), coefs.contiguous())
    assert_bitwise_equal(sca, vec, msg="scalar vs 16-byte loads")
    assert_bitwise_equal(out.contiguous(), vec, msg="strided vs contiguous")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_row_alone_equals_row_in_batch(dtype):
    src = _sources(3, 9, 2048, dtype, 5)
    coefs = torch.randn(9, 3, generator=torch.Generator().manual_seed(6))
    full = _mix(src, coefs)
    for b in (0, 4, 8):
        assert_bitwise_equal(_mix(src[:, b : b + 1].clone(), coefs[b : b + 1].clone()), full[b : b + 1],
                             msg=f"row {b}")


@needs_ext
def test_emulated_matches_torch_backend_and_ops_wiring():
    from pllm_kernels.ops import decoding as ops_dec
    from pllm_kernels.torch_ops.decoding import mix_logprobs_torch

    src = _sources(2, 7, 3000, torch.bfloat16, 8)
    coefs = torch.tensor([2.0, -1.0]).expand(7, 2).contiguous()
    want = torch.empty(7, 3000)
    mix_logprobs_torch(want, src, coefs)
    assert_close(_mix(src, coefs), want, torch.float32, scale=float(want.abs().max()))
    assert ops_dec._MIX.impls["cuda"] is not None


@needs_ext
def test_gpu_test_module_passes_on_the_emulator():
    """tests/cuda/test_decoding_cuda_gpu.py runs for real only on a GPU; here its small cases run on the emulator."""
    env = {**os.environ, "PLLM_DECODING_GPU_TESTS_ON_EMULATOR": "1"}
    env.pop("PLLM_SANITIZER", None)
    path = Path(__file__).with_name("test_decoding_cuda_gpu.py")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
                          capture_output=True, text=True, env=env, cwd=str(Path(__file__).parents[2]), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


# ------------------------------------------------------------------------------------------------ errors, supports
def test_cpu_tensors_raise_clear_error():
    from pllm_kernels.cuda.decoding import mix_logprobs_cuda

    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        mix_logprobs_cuda(torch.empty(2, 10), _sources(2, 2, 10, torch.float32, 0), torch.ones(2, 2))


@needs_ext
def test_launcher_without_device_raises():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _ext.ext().mix_logprobs(4096, 4096, 4096, 2, 2, 10, 20, 10, 2, 1, 10, 0, 0)


@needs_ext
def test_emulated_argument_errors():
    from pllm_kernels.cuda.decoding import mix_logprobs_cuda

    C = _ext.ext()
    src, coefs, out = _sources(2, 2, 10, torch.float32, 0), torch.ones(2, 2), torch.empty(2, 10)
    args = [out.data_ptr(), src.data_ptr(), coefs.data_ptr(), 2, 2, 10, 20, 10, 2, 1, 10]
    with pytest.raises(RuntimeError, match="unsupported dtype code"):
        C.mix_logprobs_emu(*args, 5)
    with pytest.raises(RuntimeError, match="1..64 sources"):
        C.mix_logprobs_emu(*args[:3], 65, *args[4:], 0)
    with pytest.raises(RuntimeError, match="null pointer"):
        C.mix_logprobs_emu(0, *args[1:], 0)
    with pytest.raises(RuntimeError, match="1..64 sources"):
        mix_logprobs_cuda(torch.empty(1, 4), torch.zeros(65, 1, 4), torch.ones(1, 65), _emulate=True)
    with pytest.raises(RuntimeError, match="float32 / float16 / bfloat16"):
        mix_logprobs_cuda(out, src.double(), coefs, _emulate=True)
    with pytest.raises(RuntimeError, match="expected coefs"):
        mix_logprobs_cuda(out, src, torch.ones(3, 2), _emulate=True)


def test_supports_and_op_table():
    """The op table reports the CUDA kernel; ``auto`` on CPU tensors (or without a usable device) picks Triton /
    torch, ``backend='cuda'`` there raises a clear RuntimeError; more than 64 sources fall back under ``auto``."""
    import pllm_kernels
    from pllm_kernels.cuda.decoding import supports
    from pllm_kernels.ops import mix_logprobs
    from pllm_kernels.ops._backend import pick_backend

    assert "float64" in supports(torch.device("cuda"), torch.float64)
    assert "CUDA tensors" in supports(torch.device("cpu"), torch.float16)
    assert pllm_kernels.backend_table()["mix_logprobs"] == {"torch": True, "triton": True, "cuda": True}
    assert pick_backend("mix_logprobs", torch.device("cpu"), torch.bfloat16, "auto") == "torch"
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        mix_logprobs(_sources(2, 2, 10, torch.float32, 0), torch.ones(2, 2), backend="cuda")
    if not _ext.cuda_ext_usable():
        assert pick_backend("mix_logprobs", torch.device("cuda"), torch.bfloat16, "auto") in ("torch", "triton")
    else:
        assert pick_backend("mix_logprobs", torch.device("cuda"), torch.bfloat16, "auto") == "cuda"
