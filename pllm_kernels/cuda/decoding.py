"""CUDA launchers of ``mix_logprobs`` (kernel: ``csrc/include/pllm/decoding.cuh``) and ``sample_tokens`` (kernel:
``csrc/include/pllm/sample.cuh``).

Same arguments and semantics as :func:`pllm_kernels.triton.decoding.mix_logprobs_triton` (the spec is
:func:`pllm_kernels.reference.decoding.mix_logprobs_ref`): ``out (B, V)`` float32 ``= log_softmax(sum_i coefs[b, i] *
log_softmax(sources[i, b]))`` with ``sources (S, B, V)`` fp32 / fp16 / bf16 (unit stride along V) and ``coefs (B, S)``;
sources with coefficient 0 are not read, a ``-inf`` in a source that counts rules the token out.

One block per row, three passes over the row (the sources' maxima; an online log-sum-exp of the mixed row; the
output), 16-byte loads where rows are aligned. exp / log are built from IEEE-exact operations
(``csrc/include/pllm/fmath.cuh``) and every reduction has a fixed order, so the CPU emulator reproduces the GPU's bits
and a row's result does not depend on the batch. ``contrast_logits`` (Context Steering / CFG) runs through it.

``sample_tokens_cuda``: the Triton sampler's algorithm (:func:`pllm_kernels.triton.decoding.sample_triton`; spec
:func:`pllm_kernels.reference.decoding.sample_ref`) as one block per row: no sorting, top-k / top-p thresholds by
bisection on order-preserving float32 keys (index bisection inside groups of equal scores), a Gumbel-max draw with the
spec's counter-based uniform; float32 arithmetic on the exact float32 scores, like the Triton kernel, so tokens equal
the spec's except for near-ties at the float32 rounding level.

This module only converts arguments (pointers, element strides, dtype code, the current CUDA stream: CUDA-graph
capturable); ``_emulate=True`` (tests) runs the same kernel on CPU tensors through the extension's CPU emulator.
"""

from __future__ import annotations

import torch

from pllm_kernels.cuda._common import DTYPE_CODES, device_of, extension
from pllm_kernels.cuda.lora import supports as _device_supports

__all__ = ["MAX_SOURCES", "MAX_VOCAB", "mix_logprobs_cuda", "sample_tokens_cuda", "supports"]

MAX_SOURCES = 64  # csrc/include/pllm/decoding.cuh dec::kMaxSources (checked against the extension by the tests)
MAX_VOCAB = 1 << 24  # csrc/include/pllm/sample.cuh smp::kMaxVocab (counts and indices exact in float32)
_DTYPES = DTYPE_CODES


def supports(device, dtype) -> str | None:
    """``None`` when the CUDA kernel can run on sources of ``device`` / ``dtype``, else the reason why not."""
    return _device_supports(device, dtype)


def _C(name="mix_logprobs"):
    return extension(name, "decoding")


def mix_logprobs_cuda(out, sources, coefs, *, _emulate=False) -> None:
    """``out (B, V)`` float32 ``= log_softmax(sum_i coefs[b, i] * log_softmax(sources[i, b]))`` (see the module
    docstring and :func:`pllm_kernels.ops.mix_logprobs`)."""
    tensors = [out, sources, coefs]
    C = _C()
    device = device_of(tensors, "mix_logprobs_cuda", _emulate, C)
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


def sample_tokens_cuda(tokens, logprobs, scores, temperature, top_k, top_p, min_p, seed, step, *,
                       _emulate=False) -> None:
    """Per-row sampling of ``scores (B, V)`` (fp32 / fp16 / bf16, unit stride along V) into ``tokens (B,)`` int64 and
    ``logprobs (B,)`` float32 (``log_softmax(scores)[token]``); per-row ``temperature`` (0 = greedy), ``top_k``
    (0 = off), ``top_p`` (1 = off), ``min_p`` (0 = off), ``seed``, ``step`` ``(B,)`` (see the module docstring and
    :func:`pllm_kernels.ops.sample_tokens`)."""
    params = [temperature, top_k, top_p, min_p, seed, step]
    tensors = [tokens, logprobs, scores, *params]
    C = _C("sample_tokens")
    device = device_of(tensors, "sample_tokens_cuda", _emulate, C)
    if scores.dtype not in _DTYPES:
        raise RuntimeError(f"sample_tokens_cuda: the CUDA kernel takes float32 / float16 / bfloat16 scores, got "
                           f"{scores.dtype}")
    if scores.dim() != 2:
        raise RuntimeError(f"sample_tokens_cuda: scores must be (B, V), got shape {tuple(scores.shape)}")
    B, V = scores.shape
    if not 1 <= V <= MAX_VOCAB:
        raise RuntimeError(f"sample_tokens_cuda: the CUDA kernel takes vocabularies of 1..{MAX_VOCAB} tokens, got {V}")
    if tuple(tokens.shape) != (B,) or tokens.dtype != torch.int64 or tuple(logprobs.shape) != (B,) or \
            logprobs.dtype != torch.float32:
        raise RuntimeError(f"sample_tokens_cuda: expected tokens (B={B},) int64 and logprobs (B,) float32, got "
                           f"{tokens.dtype} {tuple(tokens.shape)} and {logprobs.dtype} {tuple(logprobs.shape)}")
    if any(tuple(t.shape) != (B,) for t in params):
        raise RuntimeError(f"sample_tokens_cuda: per-row parameters must be (B={B},), got "
                           f"{[tuple(t.shape) for t in params]}")
    if B == 0:
        return
    if (V > 1 and scores.stride(1) != 1) or scores.stride(0) < 0:
        scores = scores.contiguous()
    dtypes = (torch.float32, torch.int32, torch.float32, torch.float32, torch.int64, torch.int64)
    params = [t.to(dt).contiguous() for t, dt in zip(params, dtypes)]
    tok = tokens if tokens.is_contiguous() else torch.empty_like(tokens, memory_format=torch.contiguous_format)
    lp = logprobs if logprobs.is_contiguous() else torch.empty_like(logprobs, memory_format=torch.contiguous_format)
    args = [tok.data_ptr(), lp.data_ptr(), scores.data_ptr(), *(t.data_ptr() for t in params), B, V,
            scores.stride(0), _DTYPES[scores.dtype]]
    if _emulate:
        C.sample_tokens_emu(*args)
    elif device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            C.sample_tokens(*args, torch.cuda.current_stream(device).cuda_stream)
    else:
        C.sample_tokens(*args, torch.cuda.current_stream(device).cuda_stream)
    if tok is not tokens:
        tokens.copy_(tok)
    if lp is not logprobs:
        logprobs.copy_(lp)
