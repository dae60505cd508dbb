"""CUDA launcher of ``mix_logprobs`` (kernel: ``csrc/include/pllm/decoding.cuh``).

Same arguments and semantics as :func:`pllm_kernels.triton.decoding.mix_logprobs_triton` (the spec is
:func:`pllm_kernels.reference.decoding.mix_logprobs_ref`): ``out (B, V)`` float32 ``= log_softmax(sum_i coefs[b, i] *
log_softmax(sources[i, b]))`` with ``sources (S, B, V)`` fp32 / fp16 / bf16 (unit stride along V) and ``coefs (B, S)``;
sources with coefficient 0 are not read, a ``-inf`` in a source that counts rules the token out.

One block per row, three passes over the row (the sources' maxima; an online log-sum-exp of the mixed row; the
output), 16-byte loads where rows are aligned. exp / log are built from IEEE-exact operations
(``csrc/include/pllm/fmath.cuh``) and every reduction has a fixed order, so the CPU emulator reproduces the GPU's bits
and a row's result does not depend on the batch. ``contrast_logits`` (Context Steering / CFG) runs through it.

This module only converts arguments (pointers, element strides, dtype code, the current CUDA stream: CUDA-graph
capturable); ``_emulate=True`` (tests) runs the same kernel on CPU tensors through the extension's CPU emulator.
"""

from __future__ import annotations

import torch

from pllm_kernels import _ext
from pllm_kernels.cuda.lora import supports as _device_supports

__all__ = ["MAX_SOURCES", "mix_logprobs_cuda", "supports"]

MAX_SOURCES = 64  # csrc/include/pllm/decoding.cuh dec::kMaxSources (checked against the extension by the tests)
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def supports(device, dtype) -> str | None:
    """``None`` when the CUDA kernel can run on sources of ``device`` / ``dtype``, else the reason why not."""
    return _device_supports(device, dtype)


def _C():
    C = _ext.ext()
    if C is None or not hasattr(C, "mix_logprobs"):
        why = _ext.ext_error if C is None else "the built extension has no decoding kernels (rebuild it)"
        raise RuntimeError(f"the pllm_kernels CUDA extension is not available ({why}); build it with nvcc on PATH "
                           "(`pip install -e .` or `python setup.py build_ext --inplace`), or use backend='triton' / "
                           "'torch'")
    return C


def mix_logprobs_cuda(out, sources, coefs, *, _emulate=False) -> None:
    """``out (B, V)`` float32 ``= log_softmax(sum_i coefs[b, i] * log_softmax(sources[i, b]))`` (see the module
    docstring and :func:`pllm_kernels.ops.mix_logprobs`)."""
    tensors = [out, sources, coefs]
    device = sources.device
    if any(t.device != device for t in tensors):
        raise RuntimeError(f"mix_logprobs_cuda: all tensors must be on one device, got "
                           f"{sorted({str(t.device) for t in tensors})}")
    if _emulate:
        if device.type != "cpu":
            raise RuntimeError(f"mix_logprobs_cuda(_emulate=True) runs on CPU tensors, got {device}")
    elif device.type != "cuda":
        raise RuntimeError(f"mix_logprobs_cuda needs CUDA tensors, got tensors on {device} (use backend='torch' or "
                           "'triton' for CPU tensors)")
    C = _C()
    if not _emulate and C.device_count() == 0:
        raise RuntimeError("mix_logprobs_cuda: the CUDA extension sees no CUDA device/driver")
    if sources.dtype not in _DTYPES:
        raise RuntimeError(f"mix_logprobs_cuda: the CUDA kernel takes float32 / float16 / bfloat16 sources, got "
                           f"{sources.dtype}")
    if sources.dim() != 3:
        raise RuntimeError(f"mix_logprobs_cuda: sources must be (S, B, V), got shape {tuple(sources.shape)}")
    S, B, V = sources.shape
    if not 1 <= S <= MAX_SOURCES:
        raise RuntimeError(f"mix_logprobs_cuda: the CUDA kernel takes 1..{MAX_SOURCES} sources, got {S}")
    if tuple(coefs.shape) != (B, S) or tuple(out.shape) != (B, V) or out.dtype != torch.float32:
        raise RuntimeError(f"mix_logprobs_cuda: expected coefs (B={B}, S={S}) and out (B, V={V}) float32, got "
                           f"{tuple(coefs.shape)} and {out.dtype} {tuple(out.shape)}")
    if B == 0:
        return
    if (V > 1 and sources.stride(2) != 1) or any(s < 0 for s in sources.stride()):
        sources = sources.contiguous()
    if coefs.dtype != torch.float32 or any(s < 0 for s in coefs.stride()):
        coefs = coefs.to(torch.float32).contiguous()
    target = out if (V <= 1 or out.stride(1) == 1) and out.stride(0) >= 0 else out.contiguous()
    args = [target.data_ptr(), sources.data_ptr(), coefs.data_ptr(), S, B, V, sources.stride(0), sources.stride(1),
            coefs.stride(0), coefs.stride(1), target.stride(0), _DTYPES[sources.dtype]]
    if _emulate:
        C.mix_logprobs_emu(*args)
    elif device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            C.mix_logprobs(*args, torch.cuda.current_stream(device).cuda_stream)
    else:
        C.mix_logprobs(*args, torch.cuda.current_stream(device).cuda_stream)
    if target is not out:
        out.copy_(target)
