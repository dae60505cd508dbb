"""Triton kernels for personalized decoding: mixing log-prob sources, token-level reward guidance and a sorting-free
per-row sampler (semantics: :mod:`pllm_kernels.reference.decoding`).

One program per row; the vocabulary is streamed in ``BLOCK_V`` chunks (fp32 accumulation), nothing is sorted.

**Mixing** (Context Steering / CFG / CoSteer / AMULET / GenARM). ``log_softmax(sum_i c_i log_softmax(x_i))`` equals
``log_softmax(sum_i c_i (x_i - m_i))`` for any per-source constants ``m_i``; we use each source's running maximum, so
the terms of the likely tokens stay small (precise) even for large contrast coefficients. Pass 1 keeps the running
maxima and an online log-sum-exp of the mixed row; when a maximum grows by ``d_i`` every mixed value seen so far moves
by ``-sum_i c_i d_i``, which is applied to the running maximum (the online sum is relative to it, so it is unchanged).
Pass 2 writes ``w - lse``. A ``-inf`` in a source with a non-zero coefficient rules the token out (``-inf``); sources
with a zero coefficient are not read.

**Reward guidance** (ARGS / PAD / GenARM token rewards): ``z = log_softmax_C(mix + beta * reward)``, ``-inf`` outside
the candidates ``C``; ``C`` = the first ``reward_top_k`` tokens of ``sources[0]`` (the base logits) in (logit
descending, index ascending) order, found like the sampler's top-k below (on the raw base logits), 0 = every token.

**Sampling**. Every kept set of the spec (top-k, then top-p on the renormalised top-k set, then min-p) is a prefix of
the (score descending, index ascending) order, so it is described by a threshold ``(t, cut)``: the tokens whose key is
``> t``, plus those whose key equals ``t`` and whose index is ``<= cut``. The key is the float32 score's bit pattern
made order-preserving as an int32 (``bits ^ ((bits >> 31) & 0x7FFFFFFF)``, -0.0 as +0.0), so a threshold is found by
bisection on int32 keys with counting (top-k) or mass (top-p) passes over the row (at most 32 passes, typically far
fewer: a pass stops the search as soon as the set ``key >= mid`` is exactly the wanted prefix), then, only when the
boundary falls inside a group of equal scores, a bisection on the token index (at most ``ceil(log2 V)`` shorter
passes). Masses are ``e_v = exp((w_v - max w) / T)`` (``q`` up to a common factor). min-p is a value threshold
(``e_v >= min_p``). The draw is Gumbel-max (FlashInfer's ``sampling_from_logits``, vLLM's exponential-race sampler):
``argmax_{v in K} (w_v - max w) / T + g_v``, ties to the lowest index, ``g_v = -log(-log u_v)`` with the spec's
counter-based uniform (lowbias32 on uint32, 24 bits; ``-log u`` computed without cancellation for ``u`` near 1).

Because ``K`` is a subset of the row, the Gumbel winner over *all* tokens, computed for free in the first pass, is the
answer whenever it belongs to ``K``. So per row, passes over ``V``:

* greedy (``T == 0``): 1 (max / log-sum-exp / argmax);
* plain (no filter): 1 (the online Gumbel winner);
* min-p only: 1, +1 (Gumbel pass over ``K``) when the winner falls below the threshold;
* top-k or top-p alone: 2 (pass 1 + one pass counting the tokens ranked before the winner, and their mass); if the
  winner is outside ``K``: + the threshold search (<= 32, early exit) [+ index bisection on ties] + 1 Gumbel pass;
* top-k and top-p: 2 + the top-k search (+ the top-p search + 1 Gumbel pass when the winner is outside ``K``);
* fused with ``reward_top_k > 0``: + the candidate search on ``sources[0]`` (one row per pass) before pass 1.

The Gumbel winner lies in ``K`` with probability ``q(K)`` (~0.9 for top-p 0.9), so most filtered rows take 2 passes.
A search costs (simulated on ``randn * 3`` rows, V = 128256): ~18 passes for top-k 50, ~24 for top-p 0.9 on float32
scores; fp16 / bf16 scores have many equal values, so a boundary often falls inside a tie group: the full 32 plus the
index bisection (~17 passes over half the row on average). A radix select (histogram passes) would cut this further.

Returned log-prob: ``w_tok - lse(w)`` (the row's own log-softmax before temperature and filters). Every pass of the
fused kernel recomputes the mixed / guided row from the sources (they stay in L2 for moderate batches): the row is
never written to global memory, and rows without filters read each logit row once.

Precision: scores are compared in float32 (the spec computes in float64), so only near-ties at the float32 rounding
level (and top-p / min-p boundaries within ~1e-7 relative) can differ from the spec's choice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["DECODING_CONFIGS", "aot_variants", "fused_sample_triton", "mix_logprobs_triton", "reward_guided_triton",
           "sample_triton"]

# Production launch configuration (read by the launchers and by aot_variants): BLOCK_V vocabulary entries per step
# (SP x BLOCK_V source tile for the mixing kernels, SP = next power of two of the number of sources).
# maxnreg: without a register budget ptxas settles on 64 registers for some variants and spills a few bytes of row
# state (seen with the ptxas of Triton 3.9); with 128 (two 8-warp programs per SM) no variant spills
# (tests/triton/test_decoding_aot.py: sm_80 / sm_90, fp16 / bf16).
DECODING_CONFIGS = {
    "sample": {"BLOCK_V": 4096, "num_warps": 8, "maxnreg": 128},  # 16 scores per thread per step
    "mix": {"BLOCK_V": 2048, "num_warps": 8, "maxnreg": 128},  # S <= 2 sources
    "mix_wide": {"BLOCK_V": 1024, "num_warps": 8, "maxnreg": 128},  # S >= 3 (SP = 4)
    "reward": {"BLOCK_V": 4096, "num_warps": 8, "maxnreg": 128},  # reward_guided_triton
}
AOT_SOURCES = (1, 2, 3)  # S compiled ahead of time (CFG / CoS = 2, CoSteer = 3); others compile on first use

_KEY_NEG_INF = tl.constexpr(-2139095041)  # key(-inf): below every other float's key
_KEY_POS_INF = tl.constexpr(2139095040)  # key(+inf)
_INV_2_24 = tl.constexpr(1.0 / 16777216.0)


# ---------------------------------------------------------------------------------------------------------- helpers
@triton.jit
def _lowbias32(x):
    """lowbias32 (C. Wellons) on uint32: products wrap mod 2**32, shifts are logical."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _row_hash(seed, step):
    """The per-row part of ``uniform_ref``: ``hash(hash(seed_lo ^ C) ^ seed_hi ^ step_lo)`` (seed, step int64)."""
    h = _lowbias32(seed.to(tl.uint32) ^ 0x9E3779B9)
    return _lowbias32(h ^ (seed >> 32).to(tl.uint32) ^ step.to(tl.uint32))


@triton.jit
def _gumbel(h_row, offs):
    """``g = -log(-log u)`` with ``u = ((hash(h_row ^ v) >> 8) + 0.5) / 2**24`` (the spec's uniform). ``-log u`` from
    ``u`` itself for ``u < 1/2`` (exact in float32), else ``-log1p(-(1 - u))`` with ``1 - u`` exact (Goldberg's
    log1p), so the large Gumbel values (u near 1) keep full precision."""
    top = (_lowbias32(h_row ^ offs.to(tl.uint32)) >> 8).to(tl.int32)
    u = (top.to(tl.float32) + 0.5) * _INV_2_24
    x = ((16777216 - top).to(tl.float32) - 0.5) * _INV_2_24
    y = 1.0 - x
    big = top >= 8388608
    arg = tl.where(big, y, u)
    la = tl.log(arg)
    den = tl.where(y == 1.0, 1.0, y - 1.0)
    nlu = tl.where(big, tl.where(y == 1.0, x, la * x / den), -la)
    return -tl.log(nlu)


@triton.jit
def _key(w):
    """Order-preserving int32 key of float32 ``w`` (-0.0 keyed as +0.0)."""
    bits = w.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return tl.where(w == 0.0, 0, key)


@triton.jit
def _unkey(key):
    """Inverse of :func:`_key` (int32)."""
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _load_x(src_row, s_src_s, sidx, cnz, offs, inb):
    """``(SP, BLOCK_V)`` fp32 tile of the sources with a non-zero coefficient (0 elsewhere)."""
    ptrs = src_row + sidx.to(tl.int64)[:, None] * s_src_s + offs[None, :]
    return tl.load(ptrs, mask=cnz[:, None] & inb[None, :], other=0.0).to(tl.float32)


@triton.jit
def _combine(x, c, cnz, sh):
    """``sum_i c_i (x_i - sh_i)`` over the sources with ``c_i != 0``; ``-inf`` where such a source is ``-inf``."""
    ruled = cnz[:, None] & (x == float("-inf"))
    term = tl.where(cnz[:, None], c[:, None] * (x - sh[:, None]), 0.0)
    w = tl.sum(term, axis=0)
    return tl.where(tl.max(ruled.to(tl.int32), axis=0) > 0, float("-inf"), w)


@triton.jit
def _guide(w, src_row, rew_row, offs, inb, beta, use_cand, ct, ccut):
    """Reward guidance: ``w + beta r`` on the candidates (key of ``sources[0]`` above ``(ct, ccut)``), else -inf."""
    r = tl.load(rew_row + offs, mask=inb, other=0.0)
    x0 = tl.load(src_row + offs, mask=tl.where(use_cand != 0, inb, False), other=0.0).to(tl.float32)
    k0 = _key(x0)
    cand = tl.where(use_cand != 0, (k0 > ct) | ((k0 == ct) & (offs <= ccut)), True)
    return tl.where(cand, w + beta * r, float("-inf"))


@triton.jit
def _tile(start, src_row, s_src_s, rew_row, sidx, c, cnz, sh, beta, use_cand, ct, ccut, V,
          MIX: tl.constexpr, REWARD: tl.constexpr, ON_SRC0: tl.constexpr, BLOCK_V: tl.constexpr):
    """The row's scores ``w`` on ``[start, start + BLOCK_V)`` in final coordinates (-inf past ``V``), its keys and
    in-bounds mask. ``ON_SRC0``: the raw base logits ``sources[0]`` instead (the candidate search)."""
    offs = start + tl.arange(0, BLOCK_V)
    inb = offs < V
    if ON_SRC0:
        w = tl.load(src_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
    else:
        if MIX:
            w = _combine(_load_x(src_row, s_src_s, sidx, cnz, offs, inb), c, cnz, sh)
        else:
            w = tl.load(src_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
        if REWARD:
            w = _guide(w, src_row, rew_row, offs, inb, beta, use_cand, ct, ccut)
        w = tl.where(inb, w, float("-inf"))
    return offs, inb, w, _key(w)


@triton.jit
def _w_at(tok, src_row, s_src_s, rew_row, sidx, c, cnz, sh, beta, use_cand, ct, ccut, V,
          MIX: tl.constexpr, REWARD: tl.constexpr, BLOCK_V: tl.constexpr):
    """``w[tok]`` computed exactly as the passes compute it (same tile shape, same reduction order)."""
    start = (tok // BLOCK_V) * BLOCK_V
    offs, inb, w, key = _tile(start, src_row, s_src_s, rew_row, sidx, c, cnz, sh, beta, use_cand, ct, ccut, V,
                              MIX, REWARD, False, BLOCK_V)
    return tl.sum(tl.where(offs == tok, w, 0.0), axis=0)


@triton.jit
def _index_cut(t32, need, src_row, s_src_s, rew_row, sidx, c, cnz, sh, beta, use_cand, ct, ccut, V,
               MIX: tl.constexpr, REWARD: tl.constexpr, ON_SRC0: tl.constexpr, BLOCK_V: tl.constexpr):
    """Smallest index ``i`` with ``#{v <= i : key_v == t32} >= need`` (bisection on the index)."""
    lo = tl.zeros([], tl.int32)
    hi = (V - 1).to(tl.int32)
    while lo < hi:
        mid = (lo + hi) // 2
        cnt = tl.zeros([], tl.int32)
        for start in range(0, mid + 1, BLOCK_V):
            offs, inb, w, key = _tile(start, src_row, s_src_s, rew_row, sidx, c, cnz, sh, beta, use_cand, ct, ccut,
                                      V, MIX, REWARD, ON_SRC0, BLOCK_V)
            cnt += tl.sum(((offs <= mid) & (key == t32)).to(tl.int32), axis=0)
        if cnt >= need:
            hi = mid
        else:
            lo = mid + 1
    return lo


@triton.jit
def _search(target, lo0, cut0, cnt_lo0, mass_lo0, W, inv_t, src_row, s_src_s, rew_row, sidx, c, cnz, sh, beta,
            use_cand, ct, ccut, V,
            MASS: tl.constexpr, MIX: tl.constexpr, REWARD: tl.constexpr, ON_SRC0: tl.constexpr,
            BLOCK_V: tl.constexpr):
    """The prefix of the (score desc, index asc) order holding ``target`` tokens (count mode) or the smallest one
    with mass ``>= target`` (``MASS``), inside the prefix ``(lo0, cut0)`` (``cnt_lo0`` tokens, mass ``mass_lo0``).
    Returns ``(t, cut, count, mass)``: the prefix is ``key > t`` plus ``key == t and index <= cut``."""
    lo = lo0.to(tl.int64)
    hi = tl.full([], _KEY_POS_INF, tl.int64)
    cnt_lo = cnt_lo0
    mass_lo = mass_lo0
    cnt_hi = tl.zeros([], tl.int32)  # the set key >= hi + 1 (initially empty)
    mass_hi = tl.zeros([], tl.float32)
    exact = tl.zeros([], tl.int32)
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        mid32 = mid.to(tl.int32)
        cnt = tl.zeros([], tl.int32)
        mass = tl.zeros([], tl.float32)
        wmin = tl.full([], float("inf"), tl.float32)
        for start in range(0, V, BLOCK_V):
            offs, inb, w, key = _tile(start, src_row, s_src_s, rew_row, sidx, c, cnz, sh, beta, use_cand, ct, ccut,
                                      V, MIX, REWARD, ON_SRC0, BLOCK_V)
            sel = inb & (key >= mid32)
            cnt += tl.sum(sel.to(tl.int32), axis=0)
            if not ON_SRC0:
                mass += tl.sum(tl.where(sel, tl.exp((w - W) * inv_t), 0.0), axis=0)
            if MASS:
                wmin = tl.minimum(wmin, tl.min(tl.where(sel, w, float("inf")), axis=0))
        if MASS:
            ok = mass >= target
            # exact: dropping the last member (a token of the smallest score) falls below the target
            ex = ok & (mass - tl.exp((wmin - W) * inv_t) < target)
        else:
            ok = cnt >= target
            ex = cnt == target
        if ex:
            lo = mid
            hi = mid
            exact = exact + 1
            cnt_lo = cnt
            mass_lo = mass
        elif ok:
            lo = mid
            cnt_lo = cnt
            mass_lo = mass
        else:
            hi = mid - 1
            cnt_hi = cnt
            mass_hi = mass
    t32 = lo.to(tl.int32)
    cut = tl.where(lo == lo0, cut0, V)  # the group at lo0 is the one the enclosing prefix may cut
    count = cnt_lo
    tot = mass_lo
    if exact == 0:
        # key >= t holds enough, key > t not: the boundary is inside the group of tokens with key t
        n_eq = cnt_lo - cnt_hi
        if ON_SRC0:
            e_t = tl.zeros([], tl.float32)
        else:
            e_t = tl.exp((_unkey(t32) - W) * inv_t)
        if MASS:
            need_f = tl.ceil((target - mass_hi) / e_t)
            need = tl.minimum(tl.maximum(need_f, 1.0), n_eq.to(tl.float32)).to(tl.int32)
        else:
            need = target - cnt_hi
        if (need < n_eq) & (t32 != _KEY_NEG_INF):
            cut = _index_cut(t32, need, src_row, s_src_s, rew_row, sidx, c, cnz, sh, beta, use_cand, ct, ccut, V,
                             MIX, REWARD, ON_SRC0, BLOCK_V)
        count = cnt_hi + need
        tot = mass_hi + need.to(tl.float32) * e_t
    return t32, cut, count, tot


# ---------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _mix_kernel(
    out_ptr, src_ptr, coef_ptr,
    V, s_src_s, s_src_b, s_coef_b, s_coef_s, s_out_b,
    S: tl.constexpr, SP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Grid ``(B,)``: ``out[b] = log_softmax(sum_i coefs[b, i] log_softmax(sources[i, b]))`` in two passes."""
    b = tl.program_id(0).to(tl.int64)
    src_row = src_ptr + b * s_src_b
    sidx = tl.arange(0, SP)
    c = tl.load(coef_ptr + b * s_coef_b + sidx * s_coef_s, mask=sidx < S, other=0.0)
    cnz = c != 0.0
    m = tl.full([SP], float("-inf"), tl.float32)
    sh = tl.zeros([SP], tl.float32)
    W = tl.full([], float("-inf"), tl.float32)
    s1 = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < V
        x = _load_x(src_row, s_src_s, sidx, cnz, offs, inb)
        m = tl.maximum(m, tl.max(tl.where(cnz[:, None] & inb[None, :], x, float("-inf")), axis=1))
        sh_new = tl.where(m > float("-inf"), m, 0.0)
        W = W - tl.sum(tl.where(cnz, c * (sh_new - sh), 0.0), axis=0)
        sh = sh_new
        w = tl.where(inb, _combine(x, c, cnz, sh), float("-inf"))
        W_new = tl.maximum(W, tl.max(w, axis=0))
        W_ref = tl.where(W_new == float("-inf"), 0.0, W_new)
        s1 = s1 * tl.exp(W - W_ref) + tl.sum(tl.exp(w - W_ref), axis=0)
        W = W_new
    lse = W + tl.log(s1)
    out_row = out_ptr + b * s_out_b
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < V
        w = _combine(_load_x(src_row, s_src_s, sidx, cnz, offs, inb), c, cnz, sh)
        tl.store(out_row + offs, w - lse, mask=inb)


@triton.jit
def _sample_kernel(
    tok_ptr, lp_ptr, src_ptr, coef_ptr, rew_ptr, beta_ptr, rk_ptr,
    temp_ptr, topk_ptr, topp_ptr, minp_ptr, seed_ptr, step_ptr,
    V, s_src_s, s_src_b, s_coef_b, s_coef_s, s_rew_b,
    S: tl.constexpr, SP: tl.constexpr, MIX: tl.constexpr, REWARD: tl.constexpr, SHORTCUT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Grid ``(B,)``: one token and its log-prob per row. ``MIX``: the row is ``mix(sources, coefs)`` (else
    ``sources`` is the ``(B, V)`` score matrix, read as is); ``REWARD``: + reward guidance; ``SHORTCUT``: accept the
    pass-1 Gumbel winner when it is in the kept set (the result is the same either way; off only in tests)."""
    b = tl.program_id(0).to(tl.int64)
    src_row = src_ptr + b * s_src_b
    sidx = tl.arange(0, SP)
    if MIX:
        c = tl.load(coef_ptr + b * s_coef_b + sidx * s_coef_s, mask=sidx < S, other=0.0)
    else:
        c = tl.full([SP], 1.0, tl.float32)
    cnz = c != 0.0
    sh = tl.zeros([SP], tl.float32)
    # ---- reward candidates: the first rk tokens of sources[0] (count search on its raw keys)
    rew_row = rew_ptr
    beta = tl.zeros([], tl.float32)
    use_cand = tl.zeros([], tl.int32)
    ct = tl.full([], _KEY_NEG_INF, tl.int32)
    ccut = tl.zeros([], tl.int32) + V
    zero = tl.zeros([], tl.float32)
    n_all = tl.zeros([], tl.int32) + V
    if REWARD:
        rew_row = rew_ptr + b * s_rew_b
        beta = tl.load(beta_ptr + b)
        rk = tl.load(rk_ptr + b)
        if (rk > 0) & (rk < V):
            use_cand = use_cand + 1
            ct, ccut, n_c, m_c = _search(rk, ct, ccut, n_all, zero, zero, zero, src_row, s_src_s, rew_row, sidx, c,
                                         cnz, sh, beta, 0, ct, ccut, V, False, MIX, REWARD, True, BLOCK_V)
    # ---- pass 1: per-source shifts, max / log-sum-exp (at 1 and at 1/T), argmax, Gumbel winner over all tokens
    T = tl.load(temp_ptr + b)
    greedy = T <= 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, T)
    h_row = _row_hash(tl.load(seed_ptr + b), tl.load(step_ptr + b))
    m = tl.full([SP], float("-inf"), tl.float32)
    W = tl.full([], float("-inf"), tl.float32)
    s1 = tl.zeros([], tl.float32)
    sT = tl.zeros([], tl.float32)
    arg = tl.zeros([], tl.int32)
    G = tl.full([], float("-inf"), tl.float32)
    gi = tl.zeros([], tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < V
        if MIX:
            x = _load_x(src_row, s_src_s, sidx, cnz, offs, inb)
            m = tl.maximum(m, tl.max(tl.where(cnz[:, None] & inb[None, :], x, float("-inf")), axis=1))
            sh_new = tl.where(m > float("-inf"), m, 0.0)
            delta = tl.sum(tl.where(cnz, c * (sh_new - sh), 0.0), axis=0)
            W = W - delta  # the Gumbel record G is relative to W: a shift moves both
            sh = sh_new
            w = _combine(x, c, cnz, sh)
        else:
            w = tl.load(src_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
        if REWARD:
            w = _guide(w, src_row, rew_row, offs, inb, beta, use_cand, ct, ccut)
        w = tl.where(inb, w, float("-inf"))
        bw = tl.max(w, axis=0)
        arg = tl.where(bw > W, tl.min(tl.where(w == bw, offs, V), axis=0), arg)
        W_new = tl.maximum(W, bw)
        W_ref = tl.where(W_new == float("-inf"), 0.0, W_new)
        s1 = s1 * tl.exp(W - W_ref) + tl.sum(tl.exp(w - W_ref), axis=0)
        sT = sT * tl.exp((W - W_ref) * inv_t) + tl.sum(tl.exp((w - W_ref) * inv_t), axis=0)
        if T > 0.0:
            # scores relative to the running maximum (precise for small T): re-base the record when it grows
            G = G - (W_ref - tl.where(W > float("-inf"), W, W_ref)) * inv_t
            score = tl.where(w > float("-inf"), (w - W_ref) * inv_t + _gumbel(h_row, offs), float("-inf"))
            bg = tl.max(score, axis=0)
            gi = tl.where(bg > G, tl.min(tl.where(score == bg, offs, V), axis=0), gi)
            G = tl.maximum(G, bg)
        W = W_new
    lse = W + tl.log(s1)
    tok = arg
    if T > 0.0:
        tok = gi
        k = tl.load(topk_ptr + b)
        p = tl.load(topp_ptr + b)
        mp = tl.load(minp_ptr + b)
        need_k = (k > 0) & (k < V)
        need_p = p < 1.0
        need_m = mp > 0.0
        if need_k | need_p | need_m:
            # kept set so far: everything (key >= key(-inf)); its size and mass
            t = tl.full([], _KEY_NEG_INF, tl.int32)
            cut = tl.zeros([], tl.int32) + V
            n_keep = tl.zeros([], tl.int32) + V
            mass_k = sT
            k_done = tl.zeros([], tl.int32)
            accept = tl.zeros([], tl.int32)
            if SHORTCUT:
                ww = _w_at(gi, src_row, s_src_s, rew_row, sidx, c, cnz, sh, beta, use_cand, ct, ccut, V,
                           MIX, REWARD, BLOCK_V)
                in_m = (need_m == 0) | (tl.exp((ww - W) * inv_t) >= mp)
                cb = tl.zeros([], tl.int32)
                mb = tl.zeros([], tl.float32)
                if (need_k | need_p) & in_m:
                    kw = _key(ww)
                    for start in range(0, V, BLOCK_V):
                        offs, inb, w, key = _tile(start, src_row, s_src_s, rew_row, sidx, c, cnz, sh, beta, use_cand,
                                                  ct, ccut, V, MIX, REWARD, False, BLOCK_V)
                        before = inb & ((key > kw) | ((key == kw) & (offs < gi)))
                        cb += tl.sum(before.to(tl.int32), axis=0)
                        mb += tl.sum(tl.where(before, tl.exp((w - W) * inv_t), 0.0), axis=0)
                in_k = (need_k == 0) | (cb < k)
                if need_k & need_p & in_k & in_m:
                    t, cut, n_keep, mass_k = _search(
                        k, t, cut, n_keep, sT, W, inv_t, src_row, s_src_s, rew_row, sidx, c, cnz, sh, beta, use_cand,
                        ct, ccut, V, False, MIX, REWARD, False, BLOCK_V)
                    k_done = k_done + 1
                in_p = (need_p == 0) | (mb < p * mass_k)
                accept = (in_k & in_p & in_m).to(tl.int32)
            if accept == 0:
                if need_k & (k_done == 0):
                    t, cut, n_keep, mass_k = _search(
                        k, t, cut, n_keep, sT, W, inv_t, src_row, s_src_s, rew_row, sidx, c, cnz, sh, beta, use_cand,
                        ct, ccut, V, False, MIX, REWARD, False, BLOCK_V)
                if need_p & (n_keep > 1):
                    t, cut, n_keep, mass_k = _search(
                        p * mass_k, t, cut, n_keep, mass_k, W, inv_t, src_row, s_src_s, rew_row, sidx, c, cnz, sh,
                        beta, use_cand, ct, ccut, V, True, MIX, REWARD, False, BLOCK_V)
                # Gumbel-max over the kept set
                G = tl.full([], float("-inf"), tl.float32)
                gi = tl.zeros([], tl.int32)
                for start in range(0, V, BLOCK_V):
                    offs, inb, w, key = _tile(start, src_row, s_src_s, rew_row, sidx, c, cnz, sh, beta, use_cand, ct,
                                              ccut, V, MIX, REWARD, False, BLOCK_V)
                    kept = inb & (w > float("-inf")) & ((key > t) | ((key == t) & (offs <= cut)))
                    kept = kept & (tl.exp((w - W) * inv_t) >= mp)
                    score = tl.where(kept, (w - W) * inv_t + _gumbel(h_row, offs), float("-inf"))
                    bg = tl.max(score, axis=0)
                    gi = tl.where(bg > G, tl.min(tl.where(score == bg, offs, V), axis=0), gi)
                    G = tl.maximum(G, bg)
                tok = gi
    w_tok = _w_at(tok, src_row, s_src_s, rew_row, sidx, c, cnz, sh, beta, use_cand, ct, ccut, V, MIX, REWARD, BLOCK_V)
    tl.store(tok_ptr + b, tok.to(tl.int64))
    tl.store(lp_ptr + b, w_tok - lse)


# ---------------------------------------------------------------------------------------------------------- launchers
def _config(kind: str, S: int = 1) -> dict:
    if kind == "mix" and S >= 3:
        kind = "mix_wide"
    return DECODING_CONFIGS[kind]


def _launch_mix(out, sources, coefs, block_v=None, num_warps=None):
    S, B, V = sources.shape
    if B == 0:
        return
    cfg = _config("mix", S)
    _mix_kernel[(B,)](
        out, sources, coefs,
        V, sources.stride(0), sources.stride(1), coefs.stride(0), coefs.stride(1), out.stride(0),
        S=S, SP=triton.next_power_of_2(S), BLOCK_V=block_v or cfg["BLOCK_V"], num_warps=num_warps or cfg["num_warps"],
        maxnreg=cfg["maxnreg"],
    )


def _launch_sample(tokens, logprobs, sources, coefs, reward, beta, reward_top_k, temperature, top_k, top_p, min_p,
                   seed, step, mix, block_v=None, shortcut=True, num_warps=None):
    if mix:
        S, B, V = sources.shape
        s_src_s, s_src_b = sources.stride(0), sources.stride(1)
        cfg = _config("mix", S)
    else:
        S = 1
        B, V = sources.shape
        s_src_s, s_src_b = 0, sources.stride(0)
        coefs = temperature  # unused pointer
        cfg = _config("sample")
    if B == 0:
        return
    has_reward = reward is not None
    if not has_reward:
        reward, beta, reward_top_k = temperature, temperature, top_k  # unused pointers
    _sample_kernel[(B,)](
        tokens, logprobs, sources, coefs, reward, beta, reward_top_k,
        temperature, top_k, top_p, min_p, seed, step,
        V, s_src_s, s_src_b, coefs.stride(0) if mix else 0, coefs.stride(1) if mix else 0,
        reward.stride(0) if has_reward else 0,
        S=S, SP=triton.next_power_of_2(S), MIX=mix, REWARD=has_reward, SHORTCUT=shortcut,
        BLOCK_V=block_v or cfg["BLOCK_V"], num_warps=num_warps or cfg["num_warps"], maxnreg=cfg["maxnreg"],
    )


def mix_logprobs_triton(out: torch.Tensor, sources: torch.Tensor, coefs: torch.Tensor) -> None:
    """``out (B, V)`` float32 ``= log_softmax(sum_i coefs[b, i] * log_softmax(sources[i, b]))``; ``sources (S, B, V)``
    fp32 / fp16 / bf16 with unit stride along V, ``coefs (B, S)`` float32. Two passes over each source row."""
    _launch_mix(out, sources, coefs)


def sample_triton(tokens, logprobs, scores, temperature, top_k, top_p, min_p, seed, step) -> None:
    """Per-row sorting-free sampling of ``scores (B, V)`` into ``tokens (B,)`` int64 and ``logprobs (B,)`` float32
    (see the module docstring for the algorithm and the passes per row). Per-row parameters: ``temperature``,
    ``top_p``, ``min_p`` float32, ``top_k`` int32, ``seed``, ``step`` int64, all ``(B,)``."""
    _launch_sample(tokens, logprobs, scores, None, None, None, None, temperature, top_k, top_p, min_p, seed, step,
                   mix=False)


def fused_sample_triton(tokens, logprobs, sources, coefs, reward, beta, reward_top_k, temperature, top_k, top_p, min_p,
                        seed, step) -> None:
    """Mixing (as :func:`mix_logprobs_triton`) + optional reward guidance (``reward (B, V)`` float32 or ``None``,
    ``beta (B,)`` float32, ``reward_top_k (B,)`` int32: candidates from ``sources[0]``) + sampling (as
    :func:`sample_triton`), without writing the mixed row: each pass recomputes it from the sources."""
    _launch_sample(tokens, logprobs, sources, coefs, reward, beta, reward_top_k, temperature, top_k, top_p, min_p,
                   seed, step, mix=True)


# ---------------------------------------------------------------------------------------------------------- AOT
_PTR_TYPES = {
    "tok_ptr": "i64", "lp_ptr": "fp32", "out_ptr": "fp32", "coef_ptr": "fp32", "rew_ptr": "fp32", "beta_ptr": "fp32",
    "rk_ptr": "i32", "temp_ptr": "fp32", "topk_ptr": "i32", "topp_ptr": "fp32", "minp_ptr": "fp32",
    "seed_ptr": "i64", "step_ptr": "i64",
}


def aot_variants(act_dtype: str = "bf16"):
    """``(name, kernel, signature, constexprs, attrs, options)`` of every production variant (AOT compile test).
    ``act_dtype``: the Triton type of the scores / sources."""

    def build(name, kernel, cx, cfg):
        sig, attrs = {}, {}
        for i, arg in enumerate(kernel.arg_names):
            if arg in cx:
                sig[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                sig[arg] = "*" + (act_dtype if arg == "src_ptr" else _PTR_TYPES[arg])
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[arg] = "i32"
                if arg in ("V", "s_src_s", "s_src_b", "s_out_b", "s_rew_b"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        opts = {"num_warps": cfg["num_warps"], "maxnreg": cfg["maxnreg"]}
        return name, kernel, sig, {**cx, "BLOCK_V": cfg["BLOCK_V"]}, attrs, opts

    yield build("sample", _sample_kernel, {"S": 1, "SP": 1, "MIX": False, "REWARD": False, "SHORTCUT": True},
                _config("sample"))
    for s in AOT_SOURCES:
        sp = triton.next_power_of_2(s)
        yield build(f"mix_s{s}", _mix_kernel, {"S": s, "SP": sp}, _config("mix", s))
        for reward in (False, True):
            yield build(f"fused_s{s}" + ("_reward" if reward else ""), _sample_kernel,
                        {"S": s, "SP": sp, "MIX": True, "REWARD": reward, "SHORTCUT": True}, _config("mix", s))
    yield build("reward", _reward_kernel, {}, _config("reward"))


# ---------------------------------------------------------------------------------------------------------- reward
@triton.jit
def _reward_kernel(
    out_ptr, src_ptr, rew_ptr, beta_ptr, rk_ptr,
    V, s_src_b, s_rew_b, s_out_b,
    BLOCK_V: tl.constexpr,
):
    """Grid ``(B,)``: ``out[b] = log_softmax_C(log_softmax(x) + beta r)`` (``x = logits[b]``, ``r = reward[b]`` token
    rewards), ``-inf`` outside the candidates ``C`` (the first ``rk[b]`` tokens of ``x`` in (logit descending, index
    ascending) order; every token when ``rk[b]`` is 0 or ``>= V``).

    ``log_softmax`` is shift-invariant, so ``log_softmax(x)`` may be replaced by ``x - M`` with ``M`` the row maximum:
    the logits' log-sum-exp cancels and the row's values stay small (``x - M`` is as precise as ``x - lse``). Passes
    over the row: the candidate search (count bisection on the int32 keys of ``x``, early exit; + an index bisection
    only when the k-th logit is tied; none when ``rk`` is 0) + 2. Pass 1 keeps the running maximum ``M`` of ``x``
    and an online log-sum-exp of ``g = (x - M) + beta r`` over ``C`` (when ``M`` grows by ``d`` every ``g`` seen so
    far moves by ``-d``: applied to the running reference, as in :func:`_mix_kernel`); pass 2 writes ``g - lse``."""
    b = tl.program_id(0).to(tl.int64)
    src_row = src_ptr + b * s_src_b
    rew_row = rew_ptr + b * s_rew_b
    out_row = out_ptr + b * s_out_b
    beta = tl.load(beta_ptr + b)
    rk = tl.load(rk_ptr + b)
    # ---- candidates: the prefix (key > ct) | (key == ct & index <= ccut) of the raw logits' order
    sidx = tl.arange(0, 1)  # unused source-tile state (ON_SRC0 search)
    c1 = tl.full([1], 1.0, tl.float32)
    cnz = c1 != 0.0
    sh0 = tl.zeros([1], tl.float32)
    zero = tl.zeros([], tl.float32)
    ct = tl.full([], _KEY_NEG_INF, tl.int32)
    ccut = tl.zeros([], tl.int32) + V
    n_all = tl.zeros([], tl.int32) + V
    use_cand = tl.zeros([], tl.int32)
    if (rk > 0) & (rk < V):
        use_cand = use_cand + 1
        ct, ccut, n_c, m_c = _search(rk, ct, ccut, n_all, zero, zero, zero, src_row, 0, rew_row, sidx, c1, cnz, sh0,
                                     beta, 0, ct, ccut, V, False, False, False, True, BLOCK_V)
    # ---- pass 1: running max of x, online log-sum-exp of g over the candidates
    sh = tl.zeros([], tl.float32)  # the shift in use (running max of x; 0 while every x seen is -inf)
    m = tl.full([], float("-inf"), tl.float32)
    W = tl.full([], float("-inf"), tl.float32)
    s1 = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < V
        x = tl.load(src_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
        r = tl.load(rew_row + offs, mask=inb, other=0.0)
        m = tl.maximum(m, tl.max(x, axis=0))
        sh_new = tl.where(m > float("-inf"), m, 0.0)
        W = W - (sh_new - sh)
        sh = sh_new
        k = _key(x)
        cand = inb & ((use_cand == 0) | (k > ct) | ((k == ct) & (offs <= ccut)))
        g = tl.where(cand, (x - sh) + beta * r, float("-inf"))
        W_new = tl.maximum(W, tl.max(g, axis=0))
        W_ref = tl.where(W_new == float("-inf"), 0.0, W_new)
        s1 = s1 * tl.exp(W - W_ref) + tl.sum(tl.exp(g - W_ref), axis=0)
        W = W_new
    lse = W + tl.log(s1)
    # ---- pass 2: write
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < V
        x = tl.load(src_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
        r = tl.load(rew_row + offs, mask=inb, other=0.0)
        k = _key(x)
        cand = (use_cand == 0) | (k > ct) | ((k == ct) & (offs <= ccut))
        g = tl.where(cand, ((x - sh) + beta * r) - lse, float("-inf"))
        tl.store(out_row + offs, g, mask=inb)


def _launch_reward(out, logits, reward, beta, top_k, block_v=None, num_warps=None):
    B, V = logits.shape
    if B == 0 or V == 0:
        return
    cfg = _config("reward")
    _reward_kernel[(B,)](
        out, logits, reward, beta, top_k,
        V, logits.stride(0), reward.stride(0), out.stride(0),
        BLOCK_V=block_v or cfg["BLOCK_V"], num_warps=num_warps or cfg["num_warps"], maxnreg=cfg["maxnreg"],
    )


def reward_guided_triton(out, logits, reward, beta, top_k, weights=None, block_v=None) -> None:
    """``out (B, V)`` float32 ``= log_softmax(log_softmax(logits) + beta * reward)`` over the candidates (the first
    ``top_k[b]`` tokens of ``logits[b]`` in (logit descending, index ascending) order, every token when 0), exactly
    ``-inf`` elsewhere. ``logits (B, V)`` fp32 / fp16 / bf16, ``beta (B,)`` float32, ``top_k (B,)`` int32.

    ``reward``: ``(B, V)`` token rewards (read by the kernel); ``(B, M, V)`` with ``weights (B, M)``: combined here
    into ``(B, V)`` token rewards (``sum_m weights[:, m] * reward[:, m]``, one torch op) first; ``(B, k)``
    per-candidate rewards in candidate order: scattered here into a zero ``(B, V)`` row at the candidates' indices,
    found with a host-side stable ``torch.sort`` of the logits (acceptable for this rare form; the kernel itself
    never sorts: it finds the candidates by bisection on the logits' keys, see :func:`_reward_kernel`)."""
    B, V = logits.shape
    if B == 0:
        return
    dev = logits.device
    if reward.dim() == 3:
        r = (weights.to(torch.float32)[:, :, None] * reward.to(torch.float32)).sum(1)
    elif reward.shape[1] == V:
        r = reward.to(torch.float32)
    else:  # per-candidate rewards, aligned with the candidate order
        k = reward.shape[1]
        order = torch.sort(logits.to(torch.float32), dim=-1, descending=True, stable=True).indices[:, :k]
        r = torch.zeros(B, V, dtype=torch.float32, device=dev)
        r.scatter_(1, order, reward.to(torch.float32))
    if r.stride(-1) != 1:
        r = r.contiguous()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    beta = beta.to(device=dev, dtype=torch.float32).contiguous()
    top_k = top_k.to(device=dev, dtype=torch.int32).contiguous()
    if out.dtype == torch.float32 and out.stride(-1) == 1:
        _launch_reward(out, logits, r, beta, top_k, block_v=block_v)
    else:
        tmp = torch.empty(B, V, dtype=torch.float32, device=dev)
        _launch_reward(tmp, logits, r, beta, top_k, block_v=block_v)
        out.copy_(tmp)
