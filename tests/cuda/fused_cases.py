"""The float64 spec of ``fused_sample``'s guidance step and a runner of the CUDA ``fused_sample``, shared by the
emulator and GPU tests of the CUDA fused sampler."""

from __future__ import annotations

import math

import torch

from pllm_kernels.reference.decoding import mix_logprobs_ref, top_k_candidates_ref


def fused_spec_guided(src, coefs, reward, beta, rk):
    """``(z, cand)``: float64 ``log_softmax`` over the candidates of ``mix_logprobs(src, coefs) + beta * reward``,
    the candidates (``cand (B, V)`` bool) being the first ``rk[b]`` tokens of ``src[0, b]`` (every token when 0)."""
    src, coefs = src.cpu(), coefs.cpu()
    z = mix_logprobs_ref(src, coefs)
    B, V = z.shape
    cand = torch.zeros(B, V, dtype=torch.bool)
    for b in range(B):
        k = int(rk[b])
        cand[b, top_k_candidates_ref(src[0, b], k) if k else list(range(V))] = True
    guided = torch.where(cand, z + beta.cpu().double()[:, None] * reward.cpu().double(), -math.inf)
    return torch.log_softmax(guided, -1), cand


def run_fused_cuda(src, coefs, reward, beta, rk, temp, topk, topp, minp, seed, step, emulate):
    """``(tokens, logprobs)`` of :func:`pllm_kernels.cuda.decoding.fused_sample_cuda` on these per-row arguments."""
    from pllm_kernels.cuda.decoding import fused_sample_cuda

    B = src.shape[1]
    tok = torch.empty(B, dtype=torch.int64, device=src.device)
    lp = torch.empty(B, dtype=torch.float32, device=src.device)
    fused_sample_cuda(tok, lp, src, coefs, reward, beta, rk, temp, topk, topp, minp, seed, step, _emulate=emulate)
    return tok, lp
