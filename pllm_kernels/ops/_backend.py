"""Backend selection shared by every op: ``PLLM_BACKEND=auto|cuda|triton|torch``.

auto: the CUDA extension when it is built, a device is present and it implements the op for this input;
else Triton on CUDA tensors; else the torch implementation. Triton also runs on CPU tensors when
``TRITON_INTERPRET=1`` and ``PLLM_BACKEND=triton`` (how CI checks the kernels' numerics).
"""

from __future__ import annotations

import os

import torch

from pllm_kernels import _ext

BACKENDS = ("auto", "cuda", "triton", "torch")


def requested_backend() -> str:
    name = os.environ.get("PLLM_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"PLLM_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a dependency, but keep the torch path alive without it
        return False
    return True


def pick_backend(op: str, device: torch.device, dtype: torch.dtype, cuda_supported: bool = False) -> str:
    """Return ``"cuda"``, ``"triton"`` or ``"torch"`` for one call of ``op`` on tensors of ``device``/``dtype``.

    ``cuda_supported``: whether the CUDA extension implements ``op`` for this input.
    """
    want = requested_backend()
    float64 = dtype == torch.float64
    if want == "torch":
        return "torch"
    if want == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"PLLM_BACKEND=cuda but the {op} inputs are on {device}")
        if not _ext.cuda_ext_usable():
            raise RuntimeError(f"PLLM_BACKEND=cuda but the CUDA extension is unusable: {_ext.capabilities()}")
        if not cuda_supported:
            raise RuntimeError(f"PLLM_BACKEND=cuda but the CUDA extension has no kernel for {op} with {dtype}")
        return "cuda"
    if want == "triton":
        if float64:
            return "torch"  # the kernels are fp32/fp16/bf16; float64 is the reference's own precision
        if device.type == "cuda" or triton_interpreting():
            if not triton_available():
                raise RuntimeError("PLLM_BACKEND=triton but triton cannot be imported")
            return "triton"
        raise RuntimeError(f"PLLM_BACKEND=triton needs CUDA tensors or TRITON_INTERPRET=1 ({op} on {device})")
    # auto
    if device.type == "cuda" and not float64:
        if cuda_supported and _ext.cuda_ext_usable():
            return "cuda"
        if triton_available():
            return "triton"
    return "torch"
