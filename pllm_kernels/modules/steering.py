"""Steering points: where a patched model adds each row's steering vectors to the residual stream.

The spec (:mod:`pllm_kernels.reference.steer`, HF layer semantics in :mod:`pllm_kernels.hf.patch`): a layer-``l``
entry is applied to the output of decoder block ``l`` at every non-padding position of its row. Two mechanisms:

* :class:`SteeringHook`: a forward hook on block ``l`` that runs :func:`pllm_kernels.ops.steer_add` on the block's
  output ``(B, S, H)`` (in place without autograd; on a copy when grad is enabled).
* :class:`SteerRMSNorm`: replaces the RMSNorm that reads block ``l``'s output next (block ``l+1``'s input norm, or
  the final norm) and runs :func:`pllm_kernels.ops.steer_rmsnorm`: the residual is steered in place and normalised
  in the same pass, so steering costs no extra pass over the activations. It serves a forward only when the batch
  says ``fused`` (no autograd); otherwise the hook steers and the wrapper is the plain norm.

Rows without steering are not written (bit-for-bit unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

from pllm_kernels.batch import ForwardContext
from pllm_kernels.modules._wrap import call_inner, make_transparent
from pllm_kernels.ops.steer import steer_add, steer_rmsnorm

__all__ = ["SteerRMSNorm", "SteeringHook", "norm_kind"]

# RMSNorm classes whose math ``steer_rmsnorm`` reproduces: class name -> (weight offset, eps attribute)
_NORMS = {
    "LlamaRMSNorm": (0.0, "variance_epsilon"), "MistralRMSNorm": (0.0, "variance_epsilon"),
    "Qwen2RMSNorm": (0.0, "variance_epsilon"), "Qwen3RMSNorm": (0.0, "variance_epsilon"),
    "Phi3RMSNorm": (0.0, "variance_epsilon"), "MixtralRMSNorm": (0.0, "variance_epsilon"),
    "GraniteRMSNorm": (0.0, "variance_epsilon"),
    "GemmaRMSNorm": (1.0, "eps"), "Gemma2RMSNorm": (1.0, "eps"), "Gemma3RMSNorm": (1.0, "eps"),
}


def norm_kind(module: nn.Module) -> tuple[float, float] | None:
    """``(weight_offset, eps)`` when ``module`` is an RMSNorm the fused op reproduces, else ``None``."""
    spec = _NORMS.get(type(module).__name__)
    if spec is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
        return None
    eps = getattr(module, spec[1], None)
    return None if eps is None else (spec[0], float(eps))


def _hidden_of(output):
    return output[0] if isinstance(output, tuple) else output


class SteeringHook:
    """Forward hook of decoder block ``layer``: steer its output by the current batch's layer-``layer`` entries.

    ``fused_after``: a :class:`SteerRMSNorm` reading this output will steer fused forwards instead."""

    def __init__(self, context: ForwardContext, layer: int, fused_after: bool, backend=None):
        self.context = context
        self.layer = int(layer)
        self.fused_after = fused_after
        self.backend = backend
        self._validated = None

    def __call__(self, module, args, output):
        batch = self.context.batch
        if batch is None or batch.steering is None:
            return None
        st = batch.steering
        if self.fused_after and st.fused:
            return None
        entry = st.at(self.layer)
        if entry is None:
            return None
        h = _hidden_of(output)
        if torch.is_grad_enabled() and h.requires_grad:
            h = h.clone()
            output = (h, *output[1:]) if isinstance(output, tuple) else h
        slots, scales, vectors, modes = entry
        flat = h.view(-1, h.shape[-1]) if h.is_contiguous() else h.reshape(-1, h.shape[-1])
        key = (flat.shape, flat.dtype, flat.device, vectors.data_ptr())
        steer_add(flat, vectors, slots, scales, modes, backend=self.backend, validate=self._validated != key)
        self._validated = key
        if flat.data_ptr() != h.data_ptr():  # reshape copied (non-contiguous output): write back
            h.copy_(flat.view_as(h))
        return output


class SteerRMSNorm(nn.Module):
    """An RMSNorm that first steers its input in place (fused forwards), for the entries of block ``layer``.

    Wraps ``base`` (kept as ``self.base``, called unchanged when there is nothing to steer); transparent to
    ``state_dict`` / ``load_state_dict`` (the unwrapped keys)."""

    def __init__(self, base: nn.Module, context: ForwardContext, layer: int, backend=None):
        super().__init__()
        self.base = base
        offset, eps = norm_kind(base)
        self.__dict__["steer_context"] = context
        self.__dict__["steer_layer"] = int(layer)
        self.__dict__["weight_offset"] = offset
        self.__dict__["eps"] = eps
        self.__dict__["backend"] = backend
        self.__dict__["_validated"] = None
        make_transparent(self, "base")

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.steer_context.batch
        st = None if batch is None else batch.steering
        entry = None if st is None or not st.fused else st.at(self.steer_layer)
        if entry is None or not x.is_contiguous() or x.dtype != self.base.weight.dtype:
            if entry is not None:  # not a layout the fused op takes: steer in place, then the plain norm
                slots, scales, vectors, modes = entry
                flat = x.reshape(-1, x.shape[-1])
                steer_add(flat, vectors, slots, scales, modes, backend=self.backend)
                if flat.data_ptr() != x.data_ptr():
                    x.copy_(flat.view_as(x))
            return call_inner(self.base, x)
        slots, scales, vectors, modes = entry
        flat = x.view(-1, x.shape[-1])
        key = (flat.shape, flat.dtype, flat.device, vectors.data_ptr())
        out = steer_rmsnorm(flat, self.base.weight, self.eps, vectors, slots, scales, modes,
                            weight_offset=self.weight_offset, backend=self.backend,
                            validate=self.__dict__["_validated"] != key)
        self.__dict__["_validated"] = key
        return out.view_as(x)
