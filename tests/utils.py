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


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` as an integer tensor of the same element size (float64 -> int64, fp32 -> int32,
    fp16 / bf16 -> int16), on the CPU. Unlike ``torch.equal`` on floats, -0.0 and +0.0 differ here (and a NaN
    equals the same NaN)."""
    t = t.detach().cpu().contiguous()
    if not t.is_floating_point():
        return t
    return t.view(_INT_OF_SIZE[t.element_size()])


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, msg: str = ""):
    """``actual`` and ``expected`` hold the very same bits (same shape and dtype): for "bit for bit" promises, where
    ``torch.equal`` would let -0.0 == +0.0 through."""
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    a, e = bits(actual), bits(expected)
    diff = a != e
    if diff.any():
        idx = diff.nonzero()[0].tolist()
        raise AssertionError(
            f"{msg}: {int(diff.sum())} of {diff.numel()} elements differ in their bits, first at {idx}: "
            f"{actual.detach().cpu()[tuple(idx)].item()!r} vs {expected.detach().cpu()[tuple(idx)].item()!r}"
        )


def plant_negative_zeros(t: torch.Tensor, every: int = 3) -> torch.Tensor:
    """Write -0.0 into every ``every``-th column of ``t`` (in place; returns ``t``): a "+ 0" read-modify-write of an
    untouched row turns these into +0.0, which :func:`assert_bitwise_equal` sees and ``torch.equal`` does not."""
    with torch.no_grad():
        t[..., ::every] = -0.0
    return t


def randn(*shape, dtype=torch.float32, gen=None, device="cpu", scale=1.0):
    """Fresh random values (never zeros)."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(dtype=dtype, device=device)
