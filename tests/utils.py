"""Shared test helpers: the one tolerance table and a verbose comparison."""

from __future__ import annotations

import torch

# One table for the whole suite (ENGINEERING §5). Widen only with a written reason at the call site.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


def tol(dtype: torch.dtype, scale: float = 1.0) -> dict:
    """Tolerance for ``dtype``; ``scale`` multiplies atol for outputs whose magnitude is ``scale`` (sums of many
    products), so the relative meaning of the table is kept."""
    t = dict(TOL[dtype])
    t["atol"] = t["atol"] * max(scale, 1.0)
    return t


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0,
                 msg: str = ""):
    """``torch.testing.assert_close`` in float64 with the table's tolerance for ``dtype`` (default actual's)."""
    dtype = dtype or actual.dtype
    a, e = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(a).all() or not torch.isfinite(e).all(), f"{msg}: non-finite values in actual"
    torch.testing.assert_close(a, e, **tol(dtype, scale), msg=lambda m: f"{msg}\n{m}")


def randn(*shape, dtype=torch.float32, gen=None, device="cpu", scale=1.0):
    """Fresh random values (never zeros)."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(dtype=dtype, device=device)
