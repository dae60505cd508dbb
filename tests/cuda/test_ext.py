"""The torch-free CUDA extension pllm_kernels._C: it imports, reports its build, and degrades cleanly without a GPU."""

from __future__ import annotations

import os

import pytest

import pllm_kernels
from pllm_kernels import _ext

REQUIRE = os.environ.get("PLLM_REQUIRE_CUDA_EXT", "").strip().lower() not in ("", "0", "false", "no", "off")
DEFAULT_ARCHS = os.environ.get("PLLM_CUDA_ARCHS", "80;90").replace(" ", "") in ("80;90", "80,90")

needs_ext = pytest.mark.skipif(not _ext.HAS_CUDA_EXT, reason=f"CUDA extension not built: {_ext.ext_error}")


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_ext_module_never_raises_and_is_consistent():
    assert isinstance(_ext.HAS_CUDA_EXT, bool)
    assert (_ext.ext() is not None) == _ext.HAS_CUDA_EXT
    assert (_ext.ext_error is None) == _ext.HAS_CUDA_EXT
    caps = _ext.capabilities()
    assert caps["has_cuda_ext"] == _ext.HAS_CUDA_EXT
    assert isinstance(_ext.cuda_ext_usable(), bool)
    if not _ext.HAS_CUDA_EXT:
        assert "reason" in caps and not caps["usable"]
        assert not _ext.cuda_ext_usable()


def test_required_extension_imported():
    if not REQUIRE:
        pytest.skip("PLLM_REQUIRE_CUDA_EXT not set")
    assert _ext.HAS_CUDA_EXT, f"PLLM_REQUIRE_CUDA_EXT=1 but pllm_kernels._C did not import: {_ext.ext_error}"


def test_dtype_codes():
    import torch

    assert _ext.dtype_code(torch.float32) == 0
    assert _ext.dtype_code(torch.float16) == 1
    assert _ext.dtype_code(torch.bfloat16) == 2
    with pytest.raises(TypeError):
        _ext.dtype_code(torch.int8)


@needs_ext
def test_version_and_dtype_constants():
    C = _ext.ext()
    assert C.__version__ == pllm_kernels.__version__
    assert (C.DTYPE_FLOAT32, C.DTYPE_FLOAT16, C.DTYPE_BFLOAT16) == (0, 1, 2)


@needs_ext
def test_compiled_archs():
    archs = _ext.ext().compiled_archs()
    assert archs == sorted(set(archs)) and all(a >= 50 for a in archs)
    if DEFAULT_ARCHS:
        assert 80 in archs and 90 in archs
        assert _ext.ext().ptx_arch() == 90
    caps = _ext.capabilities()
    assert caps["compiled_archs"] == archs
    assert caps["version"] == pllm_kernels.__version__


@needs_ext
def test_arch_supported_rules():
    if not DEFAULT_ARCHS:
        pytest.skip("non-default PLLM_CUDA_ARCHS")
    assert _ext.arch_supported(80) and _ext.arch_supported(86) and _ext.arch_supported(89)
    assert _ext.arch_supported(90) and _ext.arch_supported(100) and _ext.arch_supported(120)  # PTX JIT
    assert not _ext.arch_supported(75)


@needs_ext
def test_runtime_version():
    v = _ext.ext().runtime_version()
    major, minor = v.split(".")
    assert int(major) >= 11 and int(minor) >= 0


@needs_ext
def test_no_device_reported_cleanly():
    if _torch_cuda():
        pytest.skip("a CUDA device is present")
    C = _ext.ext()
    assert C.device_count() == 0  # must not raise without driver/device
    assert C.device_count() == 0  # and the error state was cleared
    assert C.driver_version() in ("none",) or C.driver_version()[0].isdigit()
    with pytest.raises(RuntimeError, match="out of range"):
        C.device_name(0)
    caps = _ext.capabilities()
    assert caps["device_count"] == 0 and caps["devices"] == [] and caps["usable"] is False
    assert _ext.cuda_ext_usable() is False


@needs_ext
def test_fill_f32_argument_checks():
    C = _ext.ext()
    C.fill_f32(0, 0, 1.0, 0)  # n == 0 is a no-op, even with a null pointer
    with pytest.raises(RuntimeError, match="n must be >= 0"):
        C.fill_f32(0, -1, 1.0, 0)
    with pytest.raises(RuntimeError, match="null pointer"):
        C.fill_f32(0, 4, 1.0, 0)


@pytest.mark.gpu
@needs_ext
def test_fill_f32_on_gpu():
    import torch

    C = _ext.ext()
    assert C.device_count() == torch.cuda.device_count() > 0
    assert _ext.cuda_ext_usable()
    cap = torch.cuda.get_device_capability()
    assert _ext.arch_supported(cap[0] * 10 + cap[1]), f"extension not built for sm_{cap[0]}{cap[1]}"
    assert C.device_name(torch.cuda.current_device()) == torch.cuda.get_device_name()

    for n in (1, 1000, 256 * 65535 * 8 + 1000):  # last one exceeds the grid cap: exercises the grid-stride loop
        x = torch.zeros(n + 2, device="cuda", dtype=torch.float32)
        y = x[1:-1]  # offset pointer, guards must stay untouched
        C.fill_f32(y.data_ptr(), y.numel(), 3.5, torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        assert torch.all(y == 3.5)
        assert x[0].item() == 0.0 and x[-1].item() == 0.0

    # on a side stream, ordered with the current one
    s = torch.cuda.Stream()
    z = torch.empty(4096, device="cuda")
    with torch.cuda.stream(s):
        C.fill_f32(z.data_ptr(), z.numel(), -1.25, torch.cuda.current_stream().cuda_stream)
    s.synchronize()
    assert torch.all(z == -1.25)
