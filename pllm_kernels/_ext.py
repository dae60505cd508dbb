"""Access to the optional, torch-free CUDA extension ``pllm_kernels._C``.

The extension is built by ``setup.py`` when ``nvcc`` is available (see ENGINEERING.md section 3). Importing this module
never raises: without the extension ``HAS_CUDA_EXT`` is False and ``ext_error`` says why.

Dtype codes used by every launcher: 0 = float32, 1 = float16, 2 = bfloat16 (``DTYPE_CODES``).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

__all__ = [
    "DTYPE_CODES",
    "HAS_CUDA_EXT",
    "arch_supported",
    "capabilities",
    "cuda_ext_usable",
    "dtype_code",
    "ext",
    "ext_error",
]

DTYPE_CODES: dict[str, int] = {"float32": 0, "float16": 1, "bfloat16": 2}

_C: ModuleType | None
ext_error: str | None
try:
    # import_module rather than `from pllm_kernels import _C`: clearer message ("No module named ...") when the
    # package __init__ is still initialising.
    _C = importlib.import_module("pllm_kernels._C")

    ext_error = None
except Exception as _e:  # ImportError, OSError (bad .so), anything else: never raise on import
    _C = None
    ext_error = f"{type(_e).__name__}: {_e}"

HAS_CUDA_EXT: bool = _C is not None


def ext() -> ModuleType | None:
    """The extension module ``pllm_kernels._C``, or None when it is not built / failed to import."""
    return _C


def dtype_code(dtype: Any) -> int:
    """Launcher dtype code of a torch dtype (or its name): float32 -> 0, float16 -> 1, bfloat16 -> 2."""
    name = str(dtype).removeprefix("torch.")
    try:
        return DTYPE_CODES[name]
    except KeyError:
        raise TypeError(f"unsupported dtype for CUDA launchers: {dtype} (supported: {list(DTYPE_CODES)})") from None


def _torch_cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _device_count() -> int:
    if _C is None:
        return 0
    try:
        return int(_C.device_count())
    except Exception:
        return 0


def arch_supported(capability: int) -> bool:
    """Whether the extension has code for a device of compute capability ``capability`` (major*10+minor, e.g. 90).

    A cubin for sm_XY runs on sm_XZ with Z >= Y (same major); embedded PTX for compute_XY is JIT-compiled on any
    capability >= XY. Arch-specific targets (90a) are reported by ``compiled_archs`` as their number only.
    """
    if _C is None:
        return False
    try:
        archs = list(_C.compiled_archs())
        ptx = int(_C.ptx_arch())
    except Exception:
        return False
    if any(a // 10 == capability // 10 and a <= capability for a in archs):
        return True
    return ptx > 0 and capability >= ptx


@functools.cache
def cuda_ext_usable() -> bool:
    """True when the extension imported, it sees a CUDA device, and torch has CUDA.

    Cached (backend selection calls it often); call ``cuda_ext_usable.cache_clear()`` to re-probe.
    """
    return HAS_CUDA_EXT and _device_count() > 0 and _torch_cuda_available()


def capabilities() -> dict[str, Any]:
    """Everything known about the CUDA extension, for logs, benchmarks results and bug reports. Never raises."""
    info: dict[str, Any] = {
        "has_cuda_ext": HAS_CUDA_EXT,
        "ext_error": ext_error,
        "torch_cuda_available": _torch_cuda_available(),
    }
    if _C is None:
        info["reason"] = (
            f"CUDA extension pllm_kernels._C not available ({ext_error}); build it with nvcc on PATH: "
            "`pip install -e .` or `python setup.py build_ext --inplace`"
        )
        info["usable"] = False
        return info

    def safe(fn, default=None):
        try:
            return fn()
        except Exception as e:  # pragma: no cover - defensive
            return f"error: {type(e).__name__}: {e}"

    count = _device_count()
    info.update(
        version=safe(lambda: _C.__version__),
        compiled_archs=safe(lambda: list(_C.compiled_archs())),
        ptx_arch=safe(lambda: int(_C.ptx_arch())),
        runtime_version=safe(lambda: _C.runtime_version()),
        driver_version=safe(lambda: _C.driver_version()),
        device_count=count,
    )
    devices = []
    for i in range(count):
        cap = safe(lambda i=i: int(_C.device_capability(i)))
        devices.append(
            {
                "index": i,
                "name": safe(lambda i=i: _C.device_name(i)),
                "capability": cap,
                "arch_supported": arch_supported(cap) if isinstance(cap, int) else False,
            }
        )
    info["devices"] = devices
    info["usable"] = bool(count > 0 and info["torch_cuda_available"])
    if count == 0:
        info["reason"] = "CUDA extension built, but no CUDA device/driver is visible"
    elif not info["torch_cuda_available"]:
        info["reason"] = "CUDA extension sees a device, but torch has no CUDA (CPU build of torch?)"
    return info
