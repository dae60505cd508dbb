"""Argument checks and dispatch shared by every op module (errors are ``ValueError`` naming the argument)."""

from __future__ import annotations

import os

import torch

from pllm_kernels.ops._backend import BACKENDS, default_backend

__all__ = ["_backend_arg", "_check_tensor", "_check_values_enabled", "_dispatch", "_fail", "FLOATS"]

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _dispatch(op, impl, *args):
    """Under torch.compile call the registered op (an opaque graph node); in eager mode call its body directly,
    which skips the dispatcher's Python overhead (tens of microseconds per call, per layer)."""
    if torch.compiler.is_compiling():
        return op(*args)
    return impl(*args)

def _check_values_enabled() -> bool:
    """Value checks (slot ids, ranks, scales) read device memory: skip them where a host sync is not allowed."""
    if os.environ.get("PLLM_CHECK_VALUES", "1") == "0":
        return False
    if torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True

def _fail(arg: str, msg: str):
    raise ValueError(f"{arg}: {msg}")

def _backend_arg(backend) -> str:
    if backend is None:
        return default_backend()
    if not isinstance(backend, str) or backend not in BACKENDS:
        _fail("backend", f"must be one of 'auto', 'cuda', 'triton', 'torch' or None, got {backend!r}")
    return backend

def _check_tensor(name, t, *, dim=None, dtypes=None, device=None):
    if not isinstance(t, torch.Tensor):
        _fail(name, f"expected a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        _fail(name, f"expected {dim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        _fail(name, f"dtype {t.dtype} not supported (expected one of {[str(d) for d in dtypes]})")
    if device is not None and t.device != device:
        _fail(name, f"is on {t.device} but the inputs are on {device}")

