"""Triton decoding kernels (mixing, sorting-free sampler, fused mix + reward guidance + sampling) vs the float64 spec,
under ``TRITON_INTERPRET=1``.

Run: ``TRITON_INTERPRET=1 pytest -m interpreter tests/triton/test_decoding_triton.py``. Tokens must equal the spec's
exactly (same counter-based hash, same tie rules); log-probs within the fp32 tolerance. Inputs are moderate-scale
random scores (``randn * 3``: no borderline float32 near-ties), plus rows built to have many exact ties (scores on a
0.25 grid, fp16), ``-inf`` entries, odd vocabularies, several vocabulary blocks (small ``BLOCK_V``), non-contiguous
rows, and every sampler path (greedy; plain; min-p; top-k / top-p alone and together; the pass-1 Gumbel winner
accepted or rejected: the shortcut is also switched off and must give the same tokens).
"""

from __future__ import annotations

import math

import pytest
import torch
from utils import assert_close

from pllm_kernels.reference.decoding import (
    mix_logprobs_ref,
    reward_guided_ref,
    sample_ref,
    top_k_candidates_ref,
)
from pllm_kernels.triton import decoding as tl_dec
from pllm_kernels.triton.decoding import fused_sample_triton, mix_logprobs_triton, sample_triton

interpreter = pytest.mark.interpreter
NEG_INF = -math.inf


def _params(B: int, gen: torch.Generator) -> dict:
    """Mixed per-row sampling parameters: every (T, top_k, top_p, min_p) combination class appears."""
    T = torch.tensor([0.0, 0.7, 1.0, 1.5])[torch.arange(B) % 4]
    K = torch.tensor([0, 1, 5, 50], dtype=torch.int32)[(torch.arange(B) // 4) % 4]
    P = torch.tensor([1.0, 0.9, 0.5])[(torch.arange(B) // 2) % 3]
    MP = torch.tensor([0.0, 0.05])[(torch.arange(B) // 3) % 2]
    seed = torch.randint(-(2**62), 2**62, (B,), generator=gen)
    seed[:3] = torch.tensor([0, 12345, -1])  # small, and 2**64 - 1 (negative int64)
    step = torch.randint(0, 2**40, (B,), generator=gen)
    return dict(temperature=T, top_k=K, top_p=P, min_p=MP, seed=seed, step=step)


def _run_sample(scores, prm, block_v=None, shortcut=True):
    B = scores.shape[0]
    tok = torch.full((B,), -7, dtype=torch.int64)
    lp = torch.full((B,), math.nan)
    tl_dec._launch_sample(tok, lp, scores, None, None, None, None, prm["temperature"], prm["top_k"], prm["top_p"],
                          prm["min_p"], prm["seed"], prm["step"], mix=False, block_v=block_v, shortcut=shortcut)
    return tok, lp


def _check_sample(scores, prm, tok, lp, msg=""):
    rt, rl = sample_ref(scores, prm["temperature"], prm["top_k"], prm["top_p"], prm["min_p"], prm["seed"],
                        prm["step"])
    bad = (tok != rt).nonzero().flatten().tolist()
    assert not bad, f"{msg}: rows {bad} drew {tok[bad].tolist()}, the spec {rt[bad].tolist()}"
    _check_logprobs(lp, rl, msg)


def _check_logprobs(lp, rl, msg=""):
    """Within 1e-5 (absolute) of the spec's float64 log-probs: scores are read once in float32, no cancellation."""
    assert torch.isfinite(lp).all(), msg
    err = (lp.double() - rl).abs().max().item()
    assert err <= 1e-5, f"{msg}: logprobs off by {err}"


# ------------------------------------------------------------------------------------------------------------- mix
@interpreter
@pytest.mark.parametrize("S,V,dtype", [(1, 1000, torch.float32), (2, 4099, torch.float32), (3, 1000, torch.float32),
                                       (2, 1000, torch.float16), (3, 4099, torch.float16)], ids=str)
def test_mix_matches_ref(S, V, dtype):
    gen = torch.Generator().manual_seed(S * 1000 + V)
    B = 5
    # non-contiguous: every other row of a wider buffer (unit stride along V only)
    big = (torch.randn(S, 2 * B, V + 3, generator=gen) * 3).to(dtype)
    sources = big[:, ::2, 1:V + 1]
    coefs = torch.randn(B, S, generator=gen) * 1.5
    coefs[0] = 0.0  # all zero: uniform
    coefs[1, 0] = 1.0
    if S > 1:
        coefs[1, 1:] = 0.0  # a zero coefficient: the source is skipped (identity on source 0)
        coefs[2, :2] = torch.tensor([2.5, -1.5])  # CoS / CFG-like contrast (negative coefficient)
    out = torch.full((B, V), math.nan)
    mix_logprobs_triton(out, sources, coefs)
    assert_close(out, mix_logprobs_ref(sources, coefs), torch.float32, scale=10.0,
                 msg=f"mix S={S} V={V} {dtype}")  # |log-prob| up to ~10s: atol scaled by the magnitude


@interpreter
def test_mix_blocks_contrast_and_ruled_out_tokens():
    """Small blocks (the running per-source shifts move many times), a strong contrast (coefficients 11 / -10 on
    logits of size ~30), a first block that is all -inf in one source, and -inf tokens: a -inf in a source with a
    non-zero coefficient rules the token out, a -inf in a source with coefficient 0 does not."""
    gen = torch.Generator().manual_seed(7)
    S, B, V = 2, 3, 1000
    sources = torch.randn(S, B, V, generator=gen) * 3 + 30
    sources[1, 0, :300] = NEG_INF  # whole first blocks of source 1 (row 0): its shift starts later
    sources[0, 1, [5, 77, 999]] = NEG_INF
    sources[1, 2, [3, 4]] = NEG_INF
    coefs = torch.tensor([[1.0, 0.5], [11.0, -10.0], [1.0, 0.0]])
    out = torch.full((B, V), math.nan)
    tl_dec._launch_mix(out, sources, coefs, block_v=128)
    ref = mix_logprobs_ref(sources, coefs)
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref))
    assert torch.isneginf(out[0, :300]).all() and torch.isneginf(out[1, [5, 77, 999]]).all()
    assert torch.isfinite(out[2]).all()
    fin = torch.isfinite(ref)
    assert_close(out[fin], ref[fin], torch.float32, scale=30.0, msg="mix contrast")


# ---------------------------------------------------------------------------------------------------------- sample
@interpreter
@pytest.mark.parametrize("shortcut", [True, False])
def test_sample_matches_ref_mixed_rows(shortcut):
    gen = torch.Generator().manual_seed(1)
    B, V = 48, 1000
    scores = torch.randn(B, V, generator=gen) * 3
    prm = _params(B, gen)
    tok, lp = _run_sample(scores, prm, shortcut=shortcut)
    _check_sample(scores, prm, tok, lp, f"shortcut={shortcut}")
    greedy = prm["temperature"] == 0
    assert torch.equal(tok[greedy], scores[greedy].argmax(-1))


@interpreter
def test_sample_fp16_and_ties():
    """fp16 scores, and fp32 scores on a 0.25 grid: many exactly equal scores, so top-k / top-p boundaries fall
    inside groups of ties (broken by index: the index bisection) and greedy ties go to the lowest index."""
    gen = torch.Generator().manual_seed(2)
    B, V = 24, 1000
    prm = _params(B, gen)
    prm["top_k"] = torch.tensor([0, 3, 7, 40], dtype=torch.int32)[torch.arange(B) % 4].roll(1)
    half = (torch.randn(B, V, generator=gen) * 3).half()
    grid = torch.round(torch.randn(B, V, generator=gen) * 3 * 4) / 4
    grid[0, [10, 20]] = grid[0].max() + 1  # a greedy tie at the top
    for name, scores, shortcut in (("fp16", half, True), ("grid", grid, True), ("grid", grid, False)):
        tok, lp = _run_sample(scores, prm, shortcut=shortcut)
        _check_sample(scores, prm, tok, lp, f"{name} shortcut={shortcut}")
    assert _run_sample(grid, prm)[0][0] == 10


@interpreter
def test_sample_neg_inf_entries():
    """-inf scores (masked tokens): never drawn, top-k larger than the finite count, rows with a single finite
    token; several blocks (BLOCK_V = 256, V = 1000)."""
    gen = torch.Generator().manual_seed(3)
    B, V = 24, 1000
    scores = torch.randn(B, V, generator=gen) * 3
    scores[torch.rand(B, V, generator=gen) < 0.6] = NEG_INF
    scores[1, :] = NEG_INF
    scores[1, 637] = 0.5  # one finite token
    prm = _params(B, gen)
    scores[2, 30:] = NEG_INF  # 30 finite tokens, top_k = 50 below
    prm["temperature"][5:8] = 0.05  # small temperatures: scores relative to the row maximum stay precise
    for block_v in (None, 256):
        tok, lp = _run_sample(scores, prm, block_v=block_v)
        _check_sample(scores, prm, tok, lp, f"-inf block_v={block_v}")
        assert torch.isfinite(scores.gather(1, tok[:, None])).all()
        assert tok[1] == 637 and lp[1] == 0.0


@interpreter
def test_sample_kept_set_many_seeds():
    """One score row, 32 seeds: every draw lies in the kept set of the spec (top-k 5 / top-p 0.5 / min-p 0.3)."""
    gen = torch.Generator().manual_seed(4)
    V, n = 1000, 32
    row = torch.randn(V, generator=gen) * 2
    scores = row.expand(n, V).contiguous()
    order = torch.sort(row, descending=True, stable=True).indices
    q = torch.softmax(row.double(), -1)[order]
    cases = {"top_k": (dict(top_k=5), set(order[:5].tolist())),
             "top_p": (dict(top_p=0.5), set(order[:int((torch.cumsum(q, 0) < 0.5).sum()) + 1].tolist())),
             "min_p": (dict(min_p=0.3), set(order[q >= 0.3 * q[0]].tolist()))}
    for name, (kw, allowed) in cases.items():
        prm = dict(temperature=torch.ones(n), top_k=torch.zeros(n, dtype=torch.int32), top_p=torch.ones(n),
                   min_p=torch.zeros(n), seed=torch.arange(n, dtype=torch.int64) * 7919,
                   step=torch.arange(n, dtype=torch.int64))
        for key, v in kw.items():
            prm[key] = torch.full_like(prm[key], v)
        tok, lp = _run_sample(scores, prm)
        assert set(tok.tolist()) <= allowed, name
        assert len(set(tok.tolist())) > 1, name  # different seeds / steps draw different tokens
        _check_sample(scores, prm, tok, lp, name)


@interpreter
def test_sample_odd_vocab_several_blocks():
    gen = torch.Generator().manual_seed(5)
    B, V = 16, 4099
    scores = torch.randn(B, V, generator=gen) * 3
    prm = _params(B, gen)
    tok = torch.empty(B, dtype=torch.int64)
    lp = torch.empty(B)
    sample_triton(tok, lp, scores, prm["temperature"], prm["top_k"], prm["top_p"], prm["min_p"], prm["seed"],
                  prm["step"])
    _check_sample(scores, prm, tok, lp, "V=4099")


# ----------------------------------------------------------------------------------------------------------- fused
def _fused_ref(sources, coefs, reward, beta, rk, prm):
    """The spec's composition: mix, then reward guidance with candidates from ``sources[0]`` (the base logits),
    then the sampler."""
    z = mix_logprobs_ref(sources, coefs)
    if reward is not None:
        g = torch.full_like(z, NEG_INF)
        for b in range(z.shape[0]):
            k = int(rk[b])
            cand = list(range(z.shape[1])) if k == 0 else top_k_candidates_ref(sources[0, b], k)
            g[b, cand] = torch.log_softmax(z[b, cand] + float(beta[b]) * reward[b, cand].double(), -1)
        z = g
    return z, sample_ref(z, prm["temperature"], prm["top_k"], prm["top_p"], prm["min_p"], prm["seed"], prm["step"])


@interpreter
@pytest.mark.parametrize("S,reward,dtype", [(1, True, torch.float32), (2, False, torch.float32),
                                            (2, True, torch.float16), (3, True, torch.float32)], ids=str)
def test_fused_matches_composition(S, reward, dtype):
    gen = torch.Generator().manual_seed(10 + S)
    B, V = 24, 1000
    sources = (torch.randn(S, B, V, generator=gen) * 3).to(dtype)
    coefs = torch.rand(B, S, generator=gen) * 0.5
    coefs[:, 0] += 1.0
    if S > 1:
        coefs[:, 1] *= -1  # contrast
        coefs[::5, 1:] = 0.0  # rows without contrast
    prm = _params(B, gen)
    rw = beta = rk = None
    if reward:
        rw = torch.randn(B, V, generator=gen)
        beta = torch.rand(B, generator=gen) * 2
        beta[::7] = 0.0
        rk = torch.tensor([0, 5], dtype=torch.int32)[torch.arange(B) % 2]
    tok = torch.full((B,), -7, dtype=torch.int64)
    lp = torch.full((B,), math.nan)
    fused_sample_triton(tok, lp, sources, coefs, rw, beta, rk, prm["temperature"], prm["top_k"], prm["top_p"],
                        prm["min_p"], prm["seed"], prm["step"])
    z, (rt, rl) = _fused_ref(sources, coefs, rw, beta, rk, prm)
    if reward and S == 1:  # one source with coefficient != 1 keeps the order: the spec's reward_guided_ref itself
        assert torch.equal(z.isinf(), reward_guided_ref(mix_logprobs_ref(sources, coefs), rw, beta, rk).isinf())
    bad = (tok != rt).nonzero().flatten().tolist()
    assert not bad, f"rows {bad}: {tok[bad].tolist()} vs spec {rt[bad].tolist()}"
    assert torch.isfinite(z.gather(1, tok[:, None])).all()  # never outside the candidates
    _check_logprobs(lp, rl, "fused")


@interpreter
def test_fused_blocks_and_shortcut_off():
    """Several blocks (BLOCK_V = 256), the pass-1 shortcut off, reward candidates with ties in the base logits."""
    gen = torch.Generator().manual_seed(20)
    S, B, V = 2, 8, 700
    sources = torch.randn(S, B, V, generator=gen) * 3
    sources[0] = torch.round(sources[0] * 2) / 2  # ties in the base logits: candidates broken by index
    coefs = torch.tensor([1.5, -0.5]).expand(B, S).contiguous()
    prm = _params(B, gen)
    rw = torch.randn(B, V, generator=gen)
    beta = torch.full((B,), 0.8)
    rk = torch.tensor([0, 5, 3, 17], dtype=torch.int32)[torch.arange(B) % 4]
    z, (rt, rl) = _fused_ref(sources, coefs, rw, beta, rk, prm)
    for shortcut in (True, False):
        tok = torch.empty(B, dtype=torch.int64)
        lp = torch.empty(B)
        tl_dec._launch_sample(tok, lp, sources, coefs, rw, beta, rk, prm["temperature"], prm["top_k"], prm["top_p"],
                              prm["min_p"], prm["seed"], prm["step"], mix=True, block_v=256, shortcut=shortcut)
        assert torch.equal(tok, rt), (shortcut, tok.tolist(), rt.tolist())
        _check_logprobs(lp, rl, f"fused shortcut={shortcut}")


# ---------------------------------------------------------------------------------------------------------- reward
def _check_reward(out, want, msg=""):
    """Exactly the spec's ``-inf`` pattern; finite values within 1e-5 (absolute) of the float64 spec."""
    assert torch.equal(torch.isneginf(out), torch.isneginf(want)), msg
    fin = torch.isfinite(want)
    assert torch.isfinite(out[fin]).all(), msg
    err = (out.double()[fin] - want[fin]).abs().max().item()
    assert err <= 1e-5, f"{msg}: off by {err}"


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("block_v", [None, 256])
def test_reward_guided_token_rewards(dtype, block_v):
    """``(B, V)`` token rewards, per-row beta (incl. 0) and top_k in {0, 1, 5, 17}; ties in the base logits (0.5 grid
    rows; fp16 has many more), a ``-inf`` logit, non-contiguous logit rows, several blocks."""
    gen = torch.Generator().manual_seed(30)
    B, V = 12, 700
    big = (torch.randn(2 * B, V + 2, generator=gen) * 3)
    big[::4] = torch.round(big[::4] * 2) / 2  # ties at the candidate threshold: broken by index
    logits = big.to(dtype)[::2, 1:V + 1]
    logits[5, 3] = NEG_INF
    reward = torch.randn(B, V, generator=gen)
    beta = torch.tensor([0.0, 0.5, 1.0, 2.5])[torch.arange(B) % 4]
    top_k = torch.tensor([0, 1, 5, 17], dtype=torch.int32)[(torch.arange(B) // 4 + torch.arange(B)) % 4]
    out = torch.full((B, V), math.nan)
    tl_dec.reward_guided_triton(out, logits, reward, beta, top_k, block_v=block_v)
    want = reward_guided_ref(logits, reward, beta, top_k)
    _check_reward(out, want, "token rewards")
    k = top_k.long()
    assert torch.equal(torch.isfinite(out).sum(1), torch.where(k == 0, V - (torch.arange(B) == 5).long(), k))
    base = (beta == 0) & (top_k == 0)  # the base model exactly
    assert_close(out[base], torch.log_softmax(logits[base].double(), -1), torch.float32, scale=30)


@interpreter
def test_reward_guided_top_k_all_and_ties():
    """top_k == V (every token) and a row of equal logits (the candidates are the first k indices)."""
    B, V = 3, 300
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(31)) * 3
    logits[1] = 0.5
    reward = torch.randn(B, V, generator=torch.Generator().manual_seed(32))
    beta = torch.tensor([1.0, 2.0, 0.3])
    top_k = torch.tensor([V, 7, V - 1], dtype=torch.int32)
    out = torch.empty(B, V)
    tl_dec.reward_guided_triton(out, logits, reward, beta, top_k, block_v=128)
    _check_reward(out, reward_guided_ref(logits, reward, beta, top_k), "top_k all / ties")
    assert torch.isfinite(out[1, :7]).all() and torch.isneginf(out[1, 7:]).all()


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_reward_guided_multi_objective(dtype):
    gen = torch.Generator().manual_seed(33)
    B, M, V = 6, 3, 700
    logits = (torch.randn(B, V, generator=gen) * 3).to(dtype)
    reward = torch.randn(B, M, V, generator=gen)
    weights = torch.rand(B, M, generator=gen)
    weights[0] = torch.tensor([1.0, 0.0, 0.0])
    beta = torch.tensor([0.0, 0.5, 1.0, 2.5, 1.5, 0.8])
    top_k = torch.tensor([0, 1, 5, 17, 0, 5], dtype=torch.int32)
    out = torch.empty(B, V)
    tl_dec.reward_guided_triton(out, logits, reward, beta, top_k, weights)
    _check_reward(out, reward_guided_ref(logits, reward, beta, top_k, weights=weights), "multi-objective")


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_reward_guided_per_candidate(dtype):
    """``(B, k)`` rewards aligned with the candidate order (ties in the logits: index order)."""
    gen = torch.Generator().manual_seed(34)
    B, V, k = 5, 700, 17
    logits = torch.randn(B, V, generator=gen) * 3
    logits[2] = torch.round(logits[2])  # many ties among the candidates
    logits = logits.to(dtype)
    reward = torch.randn(B, k, generator=gen)
    beta = torch.tensor([0.0, 0.5, 1.0, 2.5, 4.0])
    top_k = torch.full((B,), k, dtype=torch.int32)
    out = torch.empty(B, V)
    tl_dec.reward_guided_triton(out, logits, reward, beta, top_k)
    _check_reward(out, reward_guided_ref(logits, reward, beta, top_k), "per-candidate")
