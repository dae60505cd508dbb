"""Backend tables and the choice among them, shared by every op.

Each op has one :class:`OpTable` of implementations ``{"torch", "triton", "cuda"}``; an entry is ``None`` where
that backend has no kernel for the op yet, and may declare which inputs it supports. Callers choose per call with
``backend=`` (``"auto"``, ``"cuda"``, ``"triton"``, ``"torch"``); ``None`` means the process default, which is
``PLLM_BACKEND`` read once, here and nowhere else (:func:`default_backend`), or what
:func:`set_default_backend` set.

``auto``: the CUDA kernel when the extension is built, a device is present and the op supports the input; else
Triton on CUDA tensors; else torch. ``triton`` also runs on CPU tensors under ``TRITON_INTERPRET=1`` (how CI
checks the kernels' numerics). float64 inputs always run in torch: the kernels are fp32 / fp16 / bf16 and float64
is the reference's own precision.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pllm_kernels import _ext

__all__ = [
    "BACKENDS",
    "OpTable",
    "TABLES",
    "backend_table",
    "default_backend",
    "pick_backend",
    "set_default_backend",
    "triton_available",
    "triton_interpreting",
]

BACKENDS = ("auto", "cuda", "triton", "torch")
_default: str | None = None
_lock = threading.Lock()


def _check_name(name, where: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS}, got {name!r}")
    return name.strip().lower()


def default_backend() -> str:
    """The process default: ``PLLM_BACKEND`` (read on first use) unless :func:`set_default_backend` changed it."""
    global _default
    if _default is None:
        with _lock:
            if _default is None:
                _default = _check_name(os.environ.get("PLLM_BACKEND", "auto") or "auto", "PLLM_BACKEND")
    return _default


def set_default_backend(name: str) -> str:
    """Set the process default backend (``auto``/``cuda``/``triton``/``torch``); returns the previous one."""
    global _default
    name = _check_name(name, "backend")
    prev = default_backend()
    _default = name
    return prev


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a dependency, but keep the torch path alive without it
        return False
    return True


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of an op. ``supports(device, dtype) -> None | reason`` (None = supported)."""

    fn: Callable
    supports: Callable[[torch.device, torch.dtype], str | None] | None = None

    def reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return None if self.supports is None else self.supports(device, dtype)


class OpTable:
    """The implementations of one op, one per backend (``None`` = no kernel for it yet)."""

    def __init__(self, op: str, *, torch: Impl, triton: Impl | None = None, cuda: Impl | None = None):
        self.op = op
        self.impls: dict[str, Impl | None] = {"torch": torch, "triton": triton, "cuda": cuda}
        TABLES[op] = self

    def available(self) -> dict[str, bool]:
        """Which backends have an implementation of this op (whether they can run here is another matter)."""
        return {name: impl is not None for name, impl in self.impls.items()}

    def pick(self, backend: str | None, device: torch.device, dtype: torch.dtype) -> tuple[str, Impl]:
        """``(name, impl)`` for one call on tensors of ``device`` / ``dtype``; clear errors for impossible asks."""
        want = default_backend() if backend is None else _check_name(backend, "backend")
        if want == "torch" or dtype == torch.float64:
            return "torch", self.impls["torch"]
        cuda, triton = self.impls["cuda"], self.impls["triton"]
        if want == "cuda":
            if cuda is None:
                raise RuntimeError(f"backend='cuda': the CUDA extension has no kernel for {self.op} yet "
                                   f"(backends with one: {[n for n, ok in self.available().items() if ok]})")
            if device.type != "cuda":
                raise RuntimeError(f"backend='cuda' but the {self.op} inputs are on {device} (the CUDA kernels need "
                                   "CUDA tensors; backend='auto' falls back to Triton / torch)")
            if not _ext.cuda_ext_usable():
                raise RuntimeError(f"backend='cuda' but the CUDA extension is unusable: "
                                   f"{_ext.capabilities().get('reason')}")
            why = cuda.reason(device, dtype)
            if why is not None:
                raise RuntimeError(f"backend='cuda': {self.op} does not support this input ({why})")
            return "cuda", cuda
        if want == "triton":
            if triton is None:
                raise RuntimeError(f"backend='triton': no Triton kernel for {self.op}")
            if device.type != "cuda" and not triton_interpreting():
                raise RuntimeError(f"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 ({self.op} on {device})")
            if not triton_available():
                raise RuntimeError("backend='triton' but triton cannot be imported")
            why = triton.reason(device, dtype)
            if why is not None:
                raise RuntimeError(f"backend='triton': {self.op} does not support this input ({why})")
            return "triton", triton
        # auto
        if device.type == "cuda":
            if cuda is not None and _ext.cuda_ext_usable() and cuda.reason(device, dtype) is None:
                return "cuda", cuda
            if triton is not None and triton_available() and triton.reason(device, dtype) is None:
                return "triton", triton
        return "torch", self.impls["torch"]


TABLES: dict[str, OpTable] = {}


def backend_table() -> dict[str, dict[str, bool]]:
    """``{op: {backend: has an implementation}}`` for every registered op."""
    return {op: t.available() for op, t in TABLES.items()}


def pick_backend(op: str, device: torch.device, dtype: torch.dtype, backend: str | None = None) -> str:
    """The backend one call of ``op`` would run on (see :meth:`OpTable.pick`)."""
    return TABLES[op].pick(backend, device, dtype)[0]
