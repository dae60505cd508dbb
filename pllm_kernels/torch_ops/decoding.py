"""Vectorised torch implementations of the decoding ops (spec: :mod:`pllm_kernels.reference.decoding`).

Sort-based (``torch.sort(stable=True)`` gives the spec's (value descending, index ascending) order); the sampler
works in float64 so its top-p decisions match the spec's, and draws with the same counter-based hash as every
backend.
"""

from __future__ import annotations

import math

import torch

__all__ = ["gumbel_torch", "mix_logprobs_torch", "reward_guided_torch", "sample_torch", "uniform_torch"]

_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values (products wrap; the low 32 bits are kept)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_torch(seed: torch.Tensor, step: torch.Tensor, V: int) -> torch.Tensor:
    """``(B, V)`` float64 uniforms of :func:`pllm_kernels.reference.decoding.uniform_ref` (seed / step ``(B,)``)."""
    seed = seed.to(torch.int64)
    lo = seed & _M32
    hi = (seed >> 32) & _M32  # arithmetic shift of a negative int64 seed: its two's-complement high half
    h = _hash32(lo ^ 0x9E3779B9)
    h = _hash32(h ^ hi ^ (step.to(torch.int64) & _M32))
    tok = torch.arange(V, dtype=torch.int64, device=seed.device)
    h = _hash32(h[:, None] ^ tok[None, :])
    return ((h >> 8).to(torch.float64) + 0.5) / float(1 << 24)


def gumbel_torch(seed: torch.Tensor, step: torch.Tensor, V: int) -> torch.Tensor:
    return -torch.log(-torch.log(uniform_torch(seed, step, V)))


def mix_logprobs_torch(out: torch.Tensor, sources: torch.Tensor, coefs: torch.Tensor) -> None:
    """``out (B, V) = log_softmax(sum_i coefs[:, i] * log_softmax(sources[i]))`` (-inf kept, 0 coefs skipped)."""
    acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    ruled_out = torch.zeros(out.shape, dtype=torch.bool, device=out.device)
    for i in range(sources.shape[0]):
        c = coefs[:, i].to(torch.float32)[:, None]
        lp = torch.log_softmax(sources[i].to(torch.float32), -1)
        neg = torch.isneginf(lp) & (c != 0)
        ruled_out |= neg
        acc += torch.where(neg | (c == 0), 0.0, c * lp)
    out.copy_(torch.log_softmax(torch.where(ruled_out, -math.inf, acc), -1))


def candidates_mask(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """``(B, V)`` bool: the first ``top_k[b]`` tokens in (logit descending, index ascending) order (all when 0)."""
    B, V = logits.shape
    order = torch.sort(logits.to(torch.float32), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(V, device=logits.device).expand(B, V))
    k = top_k.to(torch.int64)[:, None]
    return (k == 0) | (rank < k)


def reward_guided_torch(out, logits, reward, beta, top_k, weights=None) -> None:
    """``out (B, V)``: ``log_softmax(log_softmax(logits) + beta * reward)`` over the candidates, ``-inf`` elsewhere.
    ``reward`` ``(B, V)``, ``(B, M, V)`` (with ``weights (B, M)``) or ``(B, k)`` per-candidate (aligned with the
    candidate order)."""
    B, V = logits.shape
    lp = torch.log_softmax(logits.to(torch.float32), -1)
    cand = candidates_mask(logits, top_k)
    if reward.dim() == 3:
        r = (weights.to(torch.float32)[:, :, None] * reward.to(torch.float32)).sum(1)
    elif reward.shape[1] == V:
        r = reward.to(torch.float32)
    else:  # per-candidate rewards, in candidate order
        k = reward.shape[1]
        order = torch.sort(logits.to(torch.float32), dim=-1, descending=True, stable=True).indices[:, :k]
        r = torch.zeros(B, V, dtype=torch.float32, device=logits.device)
        r.scatter_(1, order, reward.to(torch.float32))
    s = lp + beta.to(torch.float32)[:, None] * torch.where(cand, r, 0.0)
    out.copy_(torch.log_softmax(torch.where(cand, s, -math.inf), -1))


def sample_torch(tokens, logprobs, scores, temperature, top_k, top_p, min_p, seed, step) -> None:
    """Per-row sampling into ``tokens (B,)`` int64 and ``logprobs (B,)`` (spec order: temperature, top-k, top-p,
    min-p, Gumbel-max with the counter-based hash)."""
    B, V = scores.shape
    z = scores.to(torch.float64)
    lz = torch.log_softmax(z, -1)
    greedy = temperature <= 0
    t = torch.where(greedy, 1.0, temperature.to(torch.float64))[:, None]
    lq = torch.log_softmax(z / t, -1)
    q = lq.exp()
    sq, order = torch.sort(q, dim=-1, descending=True, stable=True)
    rank = torch.arange(V, device=scores.device).expand(B, V)
    k = top_k.to(torch.int64)[:, None]
    keep_sorted = (k == 0) | (rank < k)
    kept_q = torch.where(keep_sorted, sq, 0.0)
    mass = kept_q.sum(-1, keepdim=True)
    before = torch.cumsum(kept_q, -1) - kept_q  # mass strictly before each position
    keep_sorted &= (before / mass) < top_p.to(torch.float64)[:, None]
    keep_sorted |= rank == 0  # at least one token
    top = sq[:, :1]
    keep_sorted &= sq >= min_p.to(torch.float64)[:, None] * top
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(1, order, keep_sorted)
    g = gumbel_torch(seed, step, V)
    drawn = torch.argmax(torch.where(keep, lq + g, -math.inf), -1)
    tok = torch.where(greedy, torch.argmax(z, -1), drawn)
    tokens.copy_(tok)
    logprobs.copy_(lz.gather(1, tok[:, None])[:, 0])
