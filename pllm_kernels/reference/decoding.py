"""Reference (specification) of the personalized decoding ops. Plain torch, loops allowed, float64-checkable.

Every row ``b`` of a batch has its own policy. Shapes: ``B`` rows, vocabulary ``V``.

**Mixing log-prob sources** (Context Steering / CFG / CoSteer / GenARM / AMULET, MOD's reverse-KL case)::

    mix(sources (S, B, V), coefs (B, S)) = log_softmax( sum_i coefs[b, i] * log_softmax(sources[i, b]) )

Sources with coefficient 0 are not read. A token that any source with a non-zero coefficient rules out
(``-inf`` logit) stays ruled out (``-inf``), whatever the sign of the coefficient.

* CoS (He et al., ICLR 2025): ``contrast(with, without, lam) = mix([with, without], [1 + lam, -lam])``
  ``= log_softmax(lw + lam (lw - lwo))``; lam = 0 gives ``lw``. HF's classifier-free guidance is
  ``guidance_scale = 1 + lam`` (HF returns the unnormalised ``g (lw - lwo) + lwo``: same softmax).
* CoSteer: ``[l_LLM, l_SLM_ctx, l_SLM_noctx]`` with ``[1, c, -c]`` (``c = c_T`` of :func:`costeer_coefficient`);
  AMULET: ``[l_pref, l_plain]`` with ``[1 + c, -c]`` (:func:`amulet_coefficient`); GenARM: ``[l_base, l_ARM]`` with
  ``[1, alpha]`` and sampling temperature ``T / (1 + alpha)``.

**Reward guidance** (ARGS / PAD / GenARM token rewards; multi-objective MOD / rewarded-soups weights)::

    guided(logits, reward, beta, top_k) = log_softmax( log_softmax(logits) + beta[b] * reward[b] )   over C_b

``reward`` is ``(B, V)`` token rewards, ``(B, M, V)`` with per-row objective weights ``(B, M)`` (summed), or
``(B, k)`` per-candidate rewards aligned with the candidate order. ``C_b`` is every token when ``top_k[b] == 0``,
else the ``top_k[b]`` candidates: the first ``k`` tokens of the **base** logits in (logit descending, index
ascending) order. Tokens outside ``C_b`` get probability exactly 0 (log-prob ``-inf``). ``beta = 0`` and
``top_k = 0`` give ``log_softmax(logits)``: the base model exactly.

**Sampling** (per row: ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``seed``, ``step``) from scores ``z``:

1. ``temperature == 0``: greedy, ``token = argmax z`` (lowest index among ties); the filters below change nothing.
2. else ``q = softmax(z / temperature)``;
3. ``top_k > 0``: keep the first ``top_k`` tokens in (q descending, index ascending) order;
4. ``top_p < 1``: renormalise, then keep the smallest prefix of that order whose mass is ``>= top_p`` (>= 1 token);
5. ``min_p > 0``: keep the tokens with ``q >= min_p * max q`` (of those kept);
6. renormalise over the kept set ``K`` and draw by Gumbel-max: ``token = argmax_{v in K} log q_v + g(seed, step,
   v)``, ``g = -log(-log(u))`` with ``u = uniform(seed, step, v)``: a counter-based hash of the row's own seed, step
   and token id (:func:`uniform_ref`), so the draw never depends on the row's position in the batch or on other
   rows, and every backend draws the same token. ``u`` has 24 bits: the Gumbel tail is cut at ~17.3 (a token
   whose probability is below ~3e-8 relative to the best is never drawn).

Returned per row: the token and its log-prob under the scores' own distribution, ``log_softmax(z)[token]``
(before temperature and filters: the personalized model's log-prob, the same for greedy and sampled rows).
A row of ``z`` with a NaN, or with no finite entry, is an error (the ops name the rows).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "amulet_coefficient",
    "contrast_logits_ref",
    "costeer_coefficient",
    "mix_logprobs_ref",
    "reward_guided_ref",
    "sample_ref",
    "top_k_candidates_ref",
    "uniform_ref",
]

_M32 = 0xFFFFFFFF


def _hash32(x: int) -> int:
    """lowbias32 (C. Wellons): a 32-bit integer mix with full avalanche."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


def uniform_ref(seed: int, step: int, token: int) -> float:
    """``u in (0, 1)`` with 24 bits: ``h = hash(hash(hash(seed_lo ^ C) ^ seed_hi ^ step) ^ token)``,
    ``u = ((h >> 8) + 0.5) / 2**24``. ``seed`` is taken modulo 2**64, ``step`` and ``token`` modulo 2**32."""
    seed &= (1 << 64) - 1
    h = _hash32((seed & _M32) ^ 0x9E3779B9)
    h = _hash32(h ^ (seed >> 32) ^ (step & _M32))
    h = _hash32(h ^ (token & _M32))
    return ((h >> 8) + 0.5) / float(1 << 24)


def mix_logprobs_ref(sources: torch.Tensor, coefs: torch.Tensor) -> torch.Tensor:
    """``log_softmax(sum_i coefs[b, i] * log_softmax(sources[i, b]))``: sources ``(S, B, V)``, coefs ``(B, S)``."""
    S, B, V = sources.shape
    out = torch.empty(B, V, dtype=torch.float64)
    for b in range(B):
        acc = torch.zeros(V, dtype=torch.float64)
        ruled_out = torch.zeros(V, dtype=torch.bool)
        for i in range(S):
            c = float(coefs[b, i])
            if c != 0.0:
                lp = torch.log_softmax(sources[i, b].double(), -1)
                ruled_out |= torch.isneginf(lp)
                acc = acc + c * torch.where(torch.isneginf(lp), 0.0, lp)
        out[b] = torch.log_softmax(torch.where(ruled_out, -math.inf, acc), -1)
    return out


def contrast_logits_ref(logits_with: torch.Tensor, logits_without: torch.Tensor, lam) -> torch.Tensor:
    """Context Steering: ``log_softmax(lw + lam (lw - lwo))`` per row (``lam`` a scalar or ``(B,)``)."""
    B = logits_with.shape[0]
    lam = torch.as_tensor(lam, dtype=torch.float64).expand(B)
    coefs = torch.stack([1.0 + lam, -lam], 1)
    return mix_logprobs_ref(torch.stack([logits_with, logits_without]), coefs)


def top_k_candidates_ref(logits: torch.Tensor, k: int) -> list[int]:
    """The first ``k`` token ids of one row in (logit descending, index ascending) order."""
    vals = logits.double().tolist()
    order = sorted(range(len(vals)), key=lambda v: (-vals[v] if vals[v] == vals[v] else math.inf, v))
    return order[:k]


def reward_guided_ref(logits: torch.Tensor, reward: torch.Tensor, beta, top_k=0,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """Reward-guided log-probs ``(B, V)`` (see the module docstring); ``-inf`` outside the candidates."""
    B, V = logits.shape
    beta = torch.as_tensor(beta, dtype=torch.float64).expand(B)
    top_k = torch.as_tensor(top_k).expand(B)
    out = torch.full((B, V), -math.inf, dtype=torch.float64)
    for b in range(B):
        lp = torch.log_softmax(logits[b].double(), -1)
        k = int(top_k[b])
        cand = list(range(V)) if k == 0 else top_k_candidates_ref(logits[b], k)
        if reward.dim() == 3:
            r = (weights[b].double()[:, None] * reward[b].double()).sum(0)
        else:
            r = reward[b].double()
        if r.shape[0] == V:
            r_c = r[cand]
        else:
            if k != r.shape[0]:
                raise ValueError(f"per-candidate rewards need top_k == {r.shape[0]} (row {b} has top_k={k})")
            r_c = r
        s = lp[cand] + float(beta[b]) * r_c
        out[b, cand] = torch.log_softmax(s, -1)
    return out


def sample_ref(scores: torch.Tensor, temperature, top_k=0, top_p=1.0, min_p=0.0, seed=0, step=0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sampling (see the module docstring). Returns ``(tokens (B,) int64, logprobs (B,) float64)``."""
    B, V = scores.shape
    per_row = [torch.as_tensor(x).expand(B).tolist() for x in (temperature, top_k, top_p, min_p, seed, step)]
    tokens = torch.empty(B, dtype=torch.int64)
    logprobs = torch.empty(B, dtype=torch.float64)
    for b in range(B):
        t, k, p, mp, sd, st = (per_row[i][b] for i in range(6))
        z = scores[b].double()
        if torch.isnan(z).any() or not torch.isfinite(z).any():
            raise ValueError(f"row {b}: scores have a NaN or no finite entry")
        lz = torch.log_softmax(z, -1)
        if t == 0:
            tok = int(torch.argmax(z))
        else:
            lq = torch.log_softmax(z / t, -1)
            q = lq.exp()
            vals = q.tolist()
            order = sorted(range(V), key=lambda v: (-vals[v], v))
            keep = order if k == 0 else order[:k]
            if p < 1.0:
                mass = sum(vals[v] for v in keep)
                acc, cut = 0.0, len(keep)
                for i, v in enumerate(keep):
                    acc += vals[v] / mass
                    if acc >= p:
                        cut = i + 1
                        break
                keep = keep[:cut]
            if mp > 0.0:
                top = max(vals[v] for v in keep)
                keep = [v for v in keep if vals[v] >= mp * top]
            best, tok = -math.inf, -1
            for v in sorted(keep):
                u = uniform_ref(int(sd), int(st), v)
                g = float(lq[v]) - math.log(-math.log(u))
                if g > best:
                    best, tok = g, v
        tokens[b] = tok
        logprobs[b] = lz[tok]
    return tokens, logprobs


def costeer_coefficient(T: int = 20, alpha: float = 2.0, beta: float = 1.0, lam: float = 2.0, eta: float = 10.0
                        ) -> float:
    """CoSteer's closed form: after ``T`` FTRL steps ``pi_T = log_softmax(b + c_T * delta)`` with ``c_0 = 0``,
    ``S_t = S_{t-1} + alpha c_{t-1} + beta``, ``c_t = (S_t + c_{t-1} / eta) / (t lam + 1 / eta)``
    (defaults: the paper's, ``c_20 = 1.783``)."""
    c, S = 0.0, 0.0
    for t in range(1, T + 1):
        S = S + alpha * c + beta
        c = (S + c / eta) / (t * lam + 1.0 / eta)
    return c


def amulet_coefficient(T: int = 60, alpha: float = 2.0, lam: float = 2.0, eta: float = 10.0) -> float:
    """AMULET's closed form: ``pi_T = log_softmax(pi_0 + c_T (pi_0 - r))`` with ``c_0 = 0``,
    ``S_t = S_{t-1} + alpha (1 + c_{t-1})``, ``c_t = (S_t + c_{t-1} / eta) / (t lam + 1 / eta)`` (defaults: the
    paper's, ``c_60 = 4.649``)."""
    c, S = 0.0, 0.0
    for t in range(1, T + 1):
        S = S + alpha * (1.0 + c)
        c = (S + c / eta) / (t * lam + 1.0 / eta)
    return c
