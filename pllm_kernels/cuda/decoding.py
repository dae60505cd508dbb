"""CUDA launchers of ``mix_logprobs`` (kernel: ``csrc/include/pllm/decoding.cuh``), ``sample_tokens`` (kernel:
``csrc/include/pllm/sample.cuh``) and ``reward_guided`` (kernel: ``csrc/include/pllm/reward.cuh``).

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

``reward_guided_cuda``: the Triton kernel's algorithm (:func:`pllm_kernels.triton.decoding.reward_guided_triton`; spec
:func:`pllm_kernels.reference.decoding.reward_guided_ref`) as one block per row on token rewards ``(B, V)``: the
candidates (the first ``top_k[b]`` tokens in (logit descending, index ascending) order) by count bisection on the
logits' order-preserving float32 keys (index bisection when the k-th logit is tied), then the row maximum, the guided
maximum and sum over the candidates, and ``out = (x - max x) + beta r - lse`` there, exactly ``-inf`` elsewhere. The
multi-objective ``(B, M, V)`` and per-candidate ``(B, k)`` forms are reduced to token rewards first, as the Triton
wrapper does.

``fused_sample_cuda``: :func:`pllm_kernels.ops.fused_sample` as three launches of these kernels (mixing into a float32
scratch, guidance with the candidates from ``sources[0]`` through a variant of the reward kernel that reads the
candidates' row separately, the sampler); one fused pass is not written yet.

This module only converts arguments (pointers, element strides, dtype code, the current CUDA stream: CUDA-graph
capturable); ``_emulate=True`` (tests) runs the same kernel on CPU tensors through the extension's CPU emulator.
"""

from __future__ import annotations

import torch

from pllm_kernels.cuda._common import DTYPE_CODES, device_of, extension, launch
from pllm_kernels.cuda.lora import supports as _device_supports

__all__ = ["MAX_SOURCES", "MAX_VOCAB", "fused_sample_cuda", "mix_logprobs_cuda", "reward_guided_cuda",
           "sample_tokens_cuda", "supports"]

MAX_SOURCES = 64  # csrc/include/pllm/decoding.cuh dec::kMaxSources (checked against the extension by the tests)
MAX_VOCAB = 1 << 24  # csrc/include/pllm/sample.cuh smp::kMaxVocab = reward.cuh rwd::kMaxVocab (exact in float32)
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
    launch(C, "mix_logprobs", args, device, _emulate)
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
    launch(C, "sample_tokens", args, device, _emulate)
    if tok is not tokens:
        tokens.copy_(tok)
    if lp is not logprobs:
        logprobs.copy_(lp)


def _token_rewards(logits, reward, weights):
    """``(B, V)`` float32 token rewards from the op's three forms (the reduction of
    :func:`pllm_kernels.triton.decoding.reward_guided_triton`, which has no helper of its own to call): ``(B, V)`` as
    is; ``(B, M, V)`` with ``weights (B, M)``: ``sum_m weights[:, m] * reward[:, m]``; ``(B, k)`` per-candidate
    rewards: scattered into a zero row at the candidates' indices (stable host-side sort of the logits)."""
    B, V = logits.shape
    if reward.dim() == 3:
        return (weights.to(torch.float32)[:, :, None] * reward.to(torch.float32)).sum(1)
    if reward.shape[1] == V:
        return reward.to(torch.float32)
    k = reward.shape[1]
    order = torch.sort(logits.to(torch.float32), dim=-1, descending=True, stable=True).indices[:, :k]
    r = torch.zeros(B, V, dtype=torch.float32, device=logits.device)
    r.scatter_(1, order, reward.to(torch.float32))
    return r


def reward_guided_cuda(out, logits, reward, beta, top_k, weights=None, *, _emulate=False) -> None:
    """``out (B, V)`` float32 ``= log_softmax(log_softmax(logits) + beta * reward)`` over the candidates (the first
    ``top_k[b]`` tokens of ``logits[b]`` in (logit descending, index ascending) order, every token when 0), exactly
    ``-inf`` elsewhere; ``logits (B, V)`` fp32 / fp16 / bf16, per-row ``beta`` / ``top_k`` ``(B,)``; ``reward`` in
    any form of :func:`pllm_kernels.ops.reward_guided_logprobs` (see the module docstring)."""
    tensors = [out, logits, reward, beta, top_k] + ([weights] if weights is not None else [])
    C = _C("reward_guided")
    device = device_of(tensors, "reward_guided_cuda", _emulate, C)
    if logits.dtype not in _DTYPES:
        raise RuntimeError(f"reward_guided_cuda: the CUDA kernel takes float32 / float16 / bfloat16 logits, got "
                           f"{logits.dtype}")
    if logits.dim() != 2:
        raise RuntimeError(f"reward_guided_cuda: logits must be (B, V), got shape {tuple(logits.shape)}")
    B, V = logits.shape
    if not 1 <= V <= MAX_VOCAB:
        raise RuntimeError(f"reward_guided_cuda: the CUDA kernel takes vocabularies of 1..{MAX_VOCAB} tokens, got {V}")
    if tuple(out.shape) != (B, V) or out.dtype != torch.float32:
        raise RuntimeError(f"reward_guided_cuda: expected out (B={B}, V={V}) float32, got {out.dtype} "
                           f"{tuple(out.shape)}")
    if tuple(beta.shape) != (B,) or tuple(top_k.shape) != (B,):
        raise RuntimeError(f"reward_guided_cuda: beta and top_k must be (B={B},), got {tuple(beta.shape)} and "
                           f"{tuple(top_k.shape)}")
    if reward.dim() == 3 and weights is None:
        raise RuntimeError("reward_guided_cuda: (B, M, V) rewards need weights (B, M)")
    if reward.dim() not in (2, 3) or reward.shape[0] != B or (reward.dim() == 3 and reward.shape[2] != V):
        raise RuntimeError(f"reward_guided_cuda: expected reward (B={B}, V={V}), (B, M, V) or (B, k), got "
                           f"{tuple(reward.shape)}")
    if B == 0:
        return
    r = _token_rewards(logits, reward, weights)
    if (V > 1 and r.stride(1) != 1) or r.stride(0) < 0:
        r = r.contiguous()
    if (V > 1 and logits.stride(1) != 1) or logits.stride(0) < 0:
        logits = logits.contiguous()
    beta = beta.to(torch.float32).contiguous()
    top_k = top_k.to(torch.int32).contiguous()
    target = out if (V <= 1 or out.stride(1) == 1) and out.stride(0) >= 0 else out.contiguous()
    args = [target.data_ptr(), logits.data_ptr(), r.data_ptr(), beta.data_ptr(), top_k.data_ptr(), B, V,
            logits.stride(0), r.stride(0), target.stride(0), _DTYPES[logits.dtype]]
    launch(C, "reward_guided", args, device, _emulate)
    if target is not out:
        out.copy_(target)


def fused_sample_cuda(tokens, logprobs, sources, coefs, reward, beta, reward_top_k, temperature, top_k, top_p, min_p,
                      seed, step, *, _emulate=False) -> None:
    """:func:`pllm_kernels.ops.fused_sample` on the CUDA kernels, in three launches (not one fused pass): the mixing
    kernel into a float32 ``(B, V)`` scratch, then with ``reward (B, V)`` the guidance kernel on it with the
    candidates taken from ``sources[0]`` (the base logits; ``reward_top_k`` 0 = every token), then the sampler.
    Per-row ``beta`` / ``reward_top_k`` and sampling parameters ``(B,)``; ``tokens (B,)`` int64 and ``logprobs (B,)``
    float32 are written."""
    tensors = [tokens, logprobs, sources, coefs, beta, reward_top_k, temperature, top_k, top_p, min_p, seed, step]
    if reward is not None:
        tensors.append(reward)
    C = _C("reward_guided_cand")
    device = device_of(tensors, "fused_sample_cuda", _emulate, C)
    if sources.dim() != 3:
        raise RuntimeError(f"fused_sample_cuda: sources must be (S, B, V), got shape {tuple(sources.shape)}")
    S, B, V = sources.shape
    if not 1 <= V <= MAX_VOCAB:
        raise RuntimeError(f"fused_sample_cuda: the CUDA kernels take vocabularies of 1..{MAX_VOCAB} tokens, got {V}")
    if reward is not None and (tuple(reward.shape) != (B, V) or tuple(beta.shape) != (B,)
                               or tuple(reward_top_k.shape) != (B,)):
        raise RuntimeError(f"fused_sample_cuda: expected reward (B={B}, V={V}), beta and reward_top_k (B,), got "
                           f"{tuple(reward.shape)}, {tuple(beta.shape)} and {tuple(reward_top_k.shape)}")
    z = torch.empty(B, V, dtype=torch.float32, device=sources.device)
    mix_logprobs_cuda(z, sources, coefs, _emulate=_emulate)
    if reward is not None and B > 0:
        base = sources[0]
        if (V > 1 and base.stride(1) != 1) or base.stride(0) < 0:
            base = base.contiguous()
        r = reward.to(torch.float32)
        if (V > 1 and r.stride(1) != 1) or r.stride(0) < 0:
            r = r.contiguous()
        b32, k32 = beta.to(torch.float32).contiguous(), reward_top_k.to(torch.int32).contiguous()
        guided = torch.empty_like(z)
        args = [guided.data_ptr(), z.data_ptr(), base.data_ptr(), r.data_ptr(), b32.data_ptr(), k32.data_ptr(),
                B, V, z.stride(0), base.stride(0), r.stride(0), guided.stride(0), _DTYPES[base.dtype]]
        launch(C, "reward_guided_cand", args, device, _emulate)
        z = guided
    sample_tokens_cuda(tokens, logprobs, z, temperature, top_k, top_p, min_p, seed, step, _emulate=_emulate)
