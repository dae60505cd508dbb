"""Reference (specification) of per-token activation steering. Plain torch, loops allowed, float64-checkable.

Follows activation addition / contrastive activation steering (ActAdd, Turner et al. 2023; CAA, Rimsky et al.
2024; StyleVector, Zhang et al. ACL 2025) with the operators of the ``steering-vectors`` library and repeng's
norm-preserving addition, extended to **one vector slot per token** (EasySteer-style slot tables) so every row of
a batch can be steered by its own user's vectors.

Conventions shared by every backend (this file is the spec):

* ``h``            ``(num_tokens, hidden)``: residual-stream activations, updated in place.
* ``vectors``      ``(num_slots, hidden)``: the steering-vector table.
* ``slot_modes``   ``(num_slots,)`` int: how slot ``i``'s vector is applied (see below).
* ``token_slots``  ``(num_tokens, K)`` int: K vector slots per token, ``-1`` = none; applied in order k = 0..K-1,
  each on the result of the previous one.
* ``token_scales`` ``(num_tokens, K)`` float32: the strength of each entry.

Modes, for one entry with vector ``v``, unit vector ``u = v / |v|`` and scale ``s``::

    ADD (0)            h <- h + s v
    ABLATE (1)         h <- h - (h . u) u                    (projects the direction out; s is ignored)
    ABLATE_ADD (2)     h <- h - (h . u) u + s v
    NORM_PRESERVE (3)  h <- (h + s v) * |h| / |h + s v|      (repeng's normalize=True)

ADD / ABLATE / ABLATE_ADD are ``steering-vectors``' ``addition_operator``, ``ablation_operator`` and
``ablation_then_addition_operator`` with ``multiplier = s``. Arithmetic is float32 (float64 for float64 ``h``);
the result is rounded to ``h``'s dtype once per token. Tokens whose entries are all ``-1`` are left bit-for-bit
untouched. A zero vector in an ABLATE / ABLATE_ADD slot ablates nothing (``u = 0``).

``steer_rmsnorm_ref`` fuses the steering with the RMSNorm that reads the steered state next (the following
block's input norm, or the final norm), as HF's Llama / Gemma norms compute it::

    n = h_steered * rsqrt(mean(h_steered^2) + eps)                (float32)
    LLAMA  (weight_offset 0):  out = weight * n.to(h.dtype)
    GEMMA  (weight_offset 1):  out = (n * (1 + weight.float())).to(h.dtype)
"""

from __future__ import annotations

import torch

__all__ = ["ADD", "ABLATE", "ABLATE_ADD", "NORM_PRESERVE", "MODES", "steer_add_ref", "steer_rmsnorm_ref"]

ADD, ABLATE, ABLATE_ADD, NORM_PRESERVE = 0, 1, 2, 3
MODES = {"add": ADD, "ablate": ABLATE, "ablate_add": ABLATE_ADD, "norm_preserve": NORM_PRESERVE}


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _steer_row(x: torch.Tensor, v: torch.Tensor, mode: int, s: float) -> torch.Tensor:
    if mode == ADD:
        return x + s * v
    if mode in (ABLATE, ABLATE_ADD):
        n = torch.linalg.vector_norm(v)
        u = v / n if float(n) > 0 else torch.zeros_like(v)
        x = x - torch.dot(x, u) * u
        return x + s * v if mode == ABLATE_ADD else x
    if mode == NORM_PRESERVE:
        y = x + s * v
        ny = torch.linalg.vector_norm(y)
        return y * (torch.linalg.vector_norm(x) / ny) if float(ny) > 0 else y
    raise ValueError(f"unknown steering mode {mode}")


def _steer(h, vectors, token_slots, token_scales, slot_modes):
    if token_slots.dim() == 1:
        token_slots = token_slots[:, None]
        token_scales = token_scales[:, None]
    acc = _acc(h.dtype)
    slots = token_slots.tolist()
    scales = token_scales.tolist()
    modes = slot_modes.tolist()
    touched = []
    for t, row in enumerate(slots):
        x = None
        for k, slot in enumerate(row):
            if slot < 0:
                continue
            if x is None:
                x = h[t].to(acc)
            x = _steer_row(x, vectors[slot].to(acc), int(modes[slot]), float(scales[t][k]))
        if x is not None:
            h[t] = x.to(h.dtype)
            touched.append(t)
    return touched


def steer_add_ref(h: torch.Tensor, vectors: torch.Tensor, token_slots: torch.Tensor, token_scales: torch.Tensor,
                  slot_modes: torch.Tensor) -> torch.Tensor:
    """Steer ``h (T, H)`` in place (see the module docstring); returns ``h``."""
    _steer(h, vectors, token_slots, token_scales, slot_modes)
    return h


def steer_rmsnorm_ref(h: torch.Tensor, weight: torch.Tensor, eps: float, vectors: torch.Tensor,
                      token_slots: torch.Tensor, token_scales: torch.Tensor, slot_modes: torch.Tensor,
                      weight_offset: float = 0.0) -> torch.Tensor:
    """Steer ``h (T, H)`` in place, then return ``RMSNorm(h) (T, H)`` in ``h``'s dtype (see the module docstring).

    ``weight_offset`` 0: Llama / Mistral / Qwen / Phi-3 norm; 1: Gemma's ``(1 + weight)`` norm."""
    _steer(h, vectors, token_slots, token_scales, slot_modes)
    acc = _acc(h.dtype)
    x = h.to(acc)
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if weight_offset == 0.0:
        return (weight * n.to(h.dtype)).to(h.dtype)
    return (n * (weight_offset + weight.to(acc))).to(h.dtype)
