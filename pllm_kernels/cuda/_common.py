"""What every CUDA launcher module shares: the extension (with a clear error when it is missing or lacks a family of
kernels) and the device check of a launcher's tensors (CUDA tensors, or CPU tensors for the emulator)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pllm_kernels import _ext

__all__ = ["DTYPE_CODES", "device_of", "extension", "launch"]

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the kernels' dtype codes


def extension(attr: str | None = None, family: str = ""):
    """The built ``_C`` module; ``RuntimeError`` saying how to get it when it is missing, or when it has no ``attr``
    (an extension built before the ``family`` kernels existed)."""
    C = _ext.ext()
    if C is None or (attr is not None and not hasattr(C, attr)):
        why = _ext.ext_error if C is None else f"the built extension has no {family} kernels (rebuild it)"
        raise RuntimeError(f"the pllm_kernels CUDA extension is not available ({why}); build it with nvcc on PATH "
                           "(`pip install -e .` or `python setup.py build_ext --inplace`), or use backend='triton' / "
                           "'torch'")
    return C


def device_of(tensors: Sequence[torch.Tensor], name: str, emulate: bool, C=None) -> torch.device:
    """The one device of ``tensors`` (launcher ``name``): CUDA tensors on a visible device, or CPU tensors with
    ``emulate`` (the CPU emulator of the same kernels); ``RuntimeError`` otherwise."""
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise RuntimeError(f"{name}: all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")
    if emulate:
        if device.type != "cpu":
            raise RuntimeError(f"{name}(_emulate=True) runs on CPU tensors, got {device}")
        return device
    if device.type != "cuda":
        raise RuntimeError(f"{name} needs CUDA tensors, got tensors on {device} (use backend='torch' or 'triton' for "
                           "CPU tensors)")
    if (C if C is not None else extension()).device_count() == 0:
        raise RuntimeError(f"{name}: the CUDA extension sees no CUDA device/driver")
    return device


def launch(C, name: str, args: list, device: torch.device, emulate: bool, emu_args: tuple = ()) -> None:
    """Run launcher ``name`` of ``C``: on the CPU emulator (``<name>_emu(*args, *emu_args)``), or on ``device``'s
    current stream (made the current device for the call when it is not)."""
    if emulate:
        getattr(C, f"{name}_emu")(*args, *emu_args)
        return
    fn = getattr(C, name)
    if device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            fn(*args, torch.cuda.current_stream(device).cuda_stream)
    else:
        fn(*args, torch.cuda.current_stream(device).cuda_stream)
