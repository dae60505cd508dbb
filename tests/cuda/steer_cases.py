"""Random steering problems shared by the CUDA steering tests (emulator and GPU): fresh random inputs (never zeros),
every mode mixed in one batch, ``-1`` entries anywhere, rows without steering holding planted ``-0.0`` (a "+ 0" write
would turn them into +0.0), an unused slot that may hold NaN / inf, and layouts that force the scalar kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from utils import assert_bitwise_equal, assert_close

from pllm_kernels.reference.steer import steer_add_ref, steer_rmsnorm_ref


@dataclass
class SteerCase:
    h: torch.Tensor          # (T, H), possibly a strided / misaligned view
    h_buf: torch.Tensor      # the storage h lives in (to check bytes around a view)
    vectors: torch.Tensor    # (L, H)
    slots: torch.Tensor      # (T, K) int32
    scales: torch.Tensor     # (T, K) float32
    modes: torch.Tensor      # (L,) int32
    weight: torch.Tensor     # (H,)

    @property
    def touched(self) -> torch.Tensor:
        L = self.vectors.shape[0]
        return ((self.slots >= 0) & (self.slots < L)).any(1).cpu()


def _offset_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` stored one element past an aligned address: every row misaligned for 16-byte accesses (scalar kernels)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


def _place_h(h: torch.Tensor, layout: str, g: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, storage) of ``h``'s values in ``layout`` on ``device``; storage bytes around the view are random."""
    T, H = h.shape
    if layout == "stride2":
        buf = torch.randn(T, 2 * H, generator=g).to(h.dtype).to(device)
        view = buf[:, ::2]
    elif layout == "colslice":
        buf = torch.randn(T, H + 7, generator=g).to(h.dtype).to(device)
        view = buf[:, 3 : 3 + H]
    elif layout == "offset":
        view = _offset_copy(h.to(device))
        return view, view
    else:
        buf = h.to(device).clone()
        return buf, buf
    view.copy_(h.to(device))
    return view, buf


def make_steer_case(T=9, H=111, L=5, K=2, dtype=torch.float32, seed=0, none_frac=0.3, layout="contig",
                    vec_dtype=torch.float32, w_dtype=None, modes=None, poison=None, gemma=False,
                    device="cpu") -> SteerCase:
    """Slot 0 is never used by any token (it holds ``poison`` when given); row 0 has no entry; modes cycle
    add / ablate / ablate_add / norm_preserve over slots 1.. unless ``modes`` (a list per slot) is given.

    layout: ``contig`` | ``stride2`` (h every other column of a wider buffer) | ``colslice`` (h a column window of a
    wider buffer, rows misaligned) | ``offset`` (h, vectors and weight one element off 16-byte alignment)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g).to(dtype)
    vectors = (torch.randn(L, H, generator=g) * 0.7).to(vec_dtype)
    slots = torch.randint(1, L, (T, K), generator=g) if L > 1 else torch.zeros(T, K, dtype=torch.long)
    slots = torch.where(torch.rand(T, K, generator=g) < none_frac, -1, slots).to(torch.int32)
    if T > 0:
        slots[0] = -1
    scales = (torch.rand(T, K, generator=g) * 4 - 2).float()
    if modes is None:
        modes = [0] + [(i % 4) for i in range(L - 1)]
    modes = torch.tensor(list(modes), dtype=torch.int32)
    weight = (torch.randn(H, generator=g) * 0.1 + (0.0 if gemma else 1.0)).to(w_dtype or dtype)
    if poison is not None:
        vectors[0] = poison
    untouched = ~((slots >= 0) & (slots < L)).any(1)
    rows = h[untouched]
    rows[:, ::3] = -0.0
    h[untouched] = rows
    hv, buf = _place_h(h, layout, g, device)
    side = _offset_copy if layout == "offset" else (lambda t: t)
    return SteerCase(h=hv, h_buf=buf, vectors=side(vectors.to(device)), slots=slots.to(device),
                     scales=scales.to(device), modes=modes.to(device), weight=side(weight.to(device)))


def clean_vectors(c: SteerCase) -> torch.Tensor:
    """float64 vectors with poisoned (non-finite) rows zeroed: no token uses them, the kernels must never read them,
    and the reference then computes what a kernel that does not read them gives."""
    v = c.vectors.detach().double().cpu().clone()
    v[~torch.isfinite(v).all(1)] = 0.0
    return v


def ref_steer(c: SteerCase, h0: torch.Tensor) -> torch.Tensor:
    """float64 spec of steer_add on a copy of ``h0``."""
    L = c.vectors.shape[0]
    slots = c.slots.cpu()
    slots = torch.where((slots >= 0) & (slots < L), slots, -1)
    return steer_add_ref(h0.double().cpu().clone(), clean_vectors(c), slots, c.scales.cpu(), c.modes.cpu())


def ref_rmsnorm(c: SteerCase, h0: torch.Tensor, eps: float, weight_offset: float) -> torch.Tensor:
    """float64 spec of steer_rmsnorm's output (the steered h is :func:`ref_steer`)."""
    L = c.vectors.shape[0]
    slots = c.slots.cpu()
    slots = torch.where((slots >= 0) & (slots < L), slots, -1)
    return steer_rmsnorm_ref(h0.double().cpu().clone(), c.weight.double().cpu(), eps, clean_vectors(c), slots,
                             c.scales.cpu(), c.modes.cpu(), weight_offset=weight_offset)


def check_steered(c: SteerCase, h: torch.Tensor, h0: torch.Tensor, expected: torch.Tensor, dtype, msg: str):
    """Steered rows close to the reference (atol scaled by max |ref|), rows without an entry bit for bit untouched."""
    has = c.touched
    hc, h0c = h.detach().cpu(), h0.detach().cpu()
    assert torch.isfinite(hc).all(), f"{msg}: non-finite values"
    if has.any():
        assert_close(hc[has], expected[has], dtype, scale=float(expected.abs().max()), msg=msg)
    assert_bitwise_equal(hc[~has], h0c[~has], msg=f"{msg}: rows without steering")
