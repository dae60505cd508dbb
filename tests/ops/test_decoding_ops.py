"""Decoding ops (mixing / contrast, reward guidance, sampler) against the float64 spec and against the methods'
own definitions: CoS per-row lambda, HF's classifier-free guidance, AMULET's and CoSteer's iterative updates,
reward guidance with exact zeros outside the candidates, chi-square tests of the sampler, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from utils import assert_close

from pllm_kernels.ops import contrast_logits, fused_sample, mix_logprobs, reward_guided_logprobs, sample_tokens
from pllm_kernels.reference.decoding import (
    amulet_coefficient,
    contrast_logits_ref,
    costeer_coefficient,
    mix_logprobs_ref,
    reward_guided_ref,
    sample_ref,
    top_k_candidates_ref,
)

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def _logits(B, V, seed=0, scale=3.0, dtype=torch.float32):
    return (torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


# ------------------------------------------------------------------------------------------------- mixing
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_contrast_per_row_lambda_equals_formula(backend, dtype):
    lams = torch.tensor([-1.0, 0.0, 0.5, 1.0, 3.0])
    lw, lwo = _logits(5, 1001, 1, dtype=dtype), _logits(5, 1001, 2, dtype=dtype)
    got = contrast_logits(lw, lwo, lams, backend=backend)
    a, b = torch.log_softmax(lw.double(), -1), torch.log_softmax(lwo.double(), -1)
    want = torch.log_softmax(a + lams.double()[:, None] * (a - b), -1)
    assert_close(got, want, torch.float32, scale=float(want.abs().max()))
    assert_close(got[1], a[1], torch.float32, scale=20)  # lam = 0: the context model
    assert_close(got[0], b[0], torch.float32, scale=20)  # lam = -1: the model without context
    assert_close(got, contrast_logits_ref(lw, lwo, lams), torch.float32, scale=float(want.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mix_three_sources_with_zero_negative_coefs_and_masked_tokens(backend):
    src = torch.stack([_logits(4, 500, s) for s in range(3)])
    src[0, :, :7] = -math.inf  # a source ruling tokens out
    src[2, 1, 9] = -math.inf  # ruled out by a source whose coefficient is 0 on row 1: no effect there
    coefs = torch.tensor([[1.0, 0.5, -0.5], [1.0, 2.0, 0.0], [2.0, -1.0, 0.0], [1.0, 0.0, 0.0]])
    got = mix_logprobs(src, coefs, backend=backend)
    want = mix_logprobs_ref(src, coefs)
    assert torch.isneginf(got[:, :7]).all() and torch.isneginf(want[:, :7]).all()
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin)
    assert_close(got[fin], want[fin], torch.float32, scale=30)
    assert torch.isfinite(got[1, 9])


def test_hf_classifier_free_guidance_reproduced():
    from transformers.generation.logits_process import ClassifierFreeGuidanceLogitsProcessor

    cond, uncond = _logits(3, 200, 3), _logits(3, 200, 4)
    for g in (1.5, 3.0):  # HF refuses g <= 1
        hf = ClassifierFreeGuidanceLogitsProcessor(g)(torch.zeros(3, 1, dtype=torch.long), torch.cat([cond, uncond]))
        ours = contrast_logits(cond, uncond, g - 1.0)
        assert_close(ours, torch.log_softmax(hf.double(), -1), torch.float32, scale=30)


def _amulet_iterative(l_pref, l_plain, T=60, alpha=2.0, lam=2.0, eta=10.0):
    """AMULET's update as published (zowiezhang/Amulet amulet_game): FTRL over T iterations."""
    pi0 = torch.log_softmax(l_pref.double(), -1)
    r = torch.log_softmax(l_plain.double(), -1)
    pi, Qsum = pi0, torch.zeros_like(pi0)
    for t in range(1, T + 1):
        Qsum = Qsum + alpha * (pi - r)
        pi = (lam * pi0 + Qsum / t + pi / (eta * t)) / (lam + 1.0 / (eta * t))
        if t < T:
            pi = torch.log_softmax(pi, -1)
    return torch.log_softmax(pi, -1)


def _costeer_iterative(l_llm, l_ctx, l_noctx, T=20, alpha=2.0, beta=1.0, lam=2.0, eta=10.0):
    """CoSteer's update as published (USTC-StarTeam/CoSteer optimizer.py)."""
    b = torch.log_softmax(l_llm.double(), -1)
    delta = torch.log_softmax(l_ctx.double(), -1) - torch.log_softmax(l_noctx.double(), -1)
    pi, U = b, torch.zeros_like(b)
    for t in range(1, T + 1):
        U = U + alpha * (pi - b) + beta * delta
        pi = torch.log_softmax((t * lam * b + U + pi / eta) / (t * lam + 1.0 / eta), -1)
    return pi


def test_amulet_and_costeer_closed_forms_equal_their_iterations():
    assert amulet_coefficient() == pytest.approx(4.649, abs=1e-3)
    assert costeer_coefficient() == pytest.approx(1.783, abs=1e-3)
    l_pref, l_plain, l_ctx = _logits(4, 300, 5), _logits(4, 300, 6), _logits(4, 300, 7)
    # the closed forms (float64 spec) equal the iterations within 1e-5; our float32 op within its tolerance
    c = amulet_coefficient()
    coefs = torch.tensor([[1.0 + c, -c]] * 4)
    it = _amulet_iterative(l_pref, l_plain)
    assert (mix_logprobs_ref(torch.stack([l_pref, l_plain]), coefs) - it).abs().max() < 1e-5
    assert_close(mix_logprobs(torch.stack([l_pref, l_plain]), coefs), it, torch.float32, scale=float(it.abs().max()))
    c = costeer_coefficient()
    coefs = torch.tensor([[1.0, c, -c]] * 4)
    it = _costeer_iterative(l_pref, l_ctx, l_plain)
    assert (mix_logprobs_ref(torch.stack([l_pref, l_ctx, l_plain]), coefs) - it).abs().max() < 1e-5
    assert_close(mix_logprobs(torch.stack([l_pref, l_ctx, l_plain]), coefs), it, torch.float32,
                 scale=float(it.abs().max()))


# -------------------------------------------------------------------------------------------- reward guidance
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [0, 5])
def test_reward_guidance_equals_formula_with_exact_zeros(top_k, backend):
    B, V = 4, 300
    logits, reward = _logits(B, V, 8), _logits(B, V, 9, scale=1.0)
    beta = torch.tensor([0.0, 0.5, 1.0, 2.5])
    got = reward_guided_logprobs(logits, reward, beta, top_k=top_k, backend=backend)
    want = reward_guided_ref(logits, reward, beta, top_k)
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin)
    assert_close(got[fin], want[fin], torch.float32, scale=20)
    if top_k:
        assert int(fin.sum(1).max()) == top_k and (got[~fin].exp() == 0).all()
        cand = torch.topk(logits, top_k).indices
        assert torch.equal(fin.nonzero()[:, 1].view(B, top_k).sort(1).values, cand.sort(1).values)
    else:  # beta = 0, no restriction: the base model exactly
        assert_close(got[0], torch.log_softmax(logits[0].double(), -1), torch.float32, scale=20)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_candidate_and_multi_objective_rewards(backend):
    B, V, k = 3, 200, 4
    logits = _logits(B, V, 10)
    per_cand = _logits(B, k, 11, scale=1.0)
    got = reward_guided_logprobs(logits, per_cand, 1.5, top_k=k, backend=backend)
    assert_close(got[torch.isfinite(got)], reward_guided_ref(logits, per_cand, 1.5, k)[torch.isfinite(got)],
                 torch.float32, scale=20)
    rewards = torch.stack([_logits(B, V, 12, scale=1.0), _logits(B, V, 13, scale=1.0)], 1)  # (B, M, V)
    w = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.0, 1.0]])
    got = reward_guided_logprobs(logits, rewards, 2.0, weights=w, backend=backend)
    want = reward_guided_ref(logits, rewards, 2.0, 0, weights=w)
    assert_close(got, want, torch.float32, scale=30)
    single = reward_guided_logprobs(logits, rewards[:, 1], 2.0, backend=backend)
    assert_close(got[2], single[2], torch.float32, scale=30)  # weights (0, 1): the second objective alone


# ------------------------------------------------------------------------------------------------ sampler
def _exact_probs(z, t, k, p, mp):
    """The spec's final distribution for one row, in float64 (independent code)."""
    q = torch.softmax(z.double() / t, -1)
    V = q.shape[0]
    order = sorted(range(V), key=lambda v: (-float(q[v]), v))
    keep = order[:k] if k else order
    if p < 1:
        mass, acc, cut = float(q[keep].sum()), 0.0, len(keep)
        for i, v in enumerate(keep):
            acc += float(q[v]) / mass
            if acc >= p:
                cut = i + 1
                break
        keep = keep[:cut]
    if mp > 0:
        top = max(float(q[v]) for v in keep)
        keep = [v for v in keep if float(q[v]) >= mp * top]
    out = torch.zeros(V, dtype=torch.float64)
    out[keep] = q[keep] / q[keep].sum()
    return out


def _chi2_critical(df: int, alpha_z: float = 3.719) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df) at z (3.719 ~ alpha 1e-4)."""
    return df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("params", [
    dict(t=1.0, k=0, p=1.0, mp=0.0), dict(t=0.7, k=0, p=1.0, mp=0.0), dict(t=1.3, k=4, p=1.0, mp=0.0),
    dict(t=1.0, k=0, p=0.8, mp=0.0), dict(t=1.0, k=0, p=1.0, mp=0.2), dict(t=0.9, k=6, p=0.9, mp=0.05),
])
def test_sampler_chi_square(params, backend="torch"):
    """On the torch backend; the Triton kernels draw exactly the same tokens (test below), so they inherit it."""
    V, N = 10, 20000
    z = torch.tensor([2.0, 1.5, 1.2, 0.9, 0.5, 0.0, -0.3, -1.0, -2.0, 0.7])
    probs = _exact_probs(z, params["t"], params["k"], params["p"], params["mp"])
    tokens, _ = sample_tokens(z.expand(N, V).contiguous(), params["t"], params["k"], params["p"], params["mp"],
                              seed=1234, step=torch.arange(N), backend=backend)
    counts = torch.bincount(tokens, minlength=V).double()
    assert counts[probs == 0].sum() == 0, f"drew tokens outside the allowed set: {counts.tolist()}"
    support = probs > 0
    expected = probs[support] * N
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    if df >= 1:
        assert chi2 < _chi2_critical(df), f"chi2={chi2:.1f} df={df} counts={counts.tolist()} p={probs.tolist()}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampler_matches_spec_and_row_independence(backend):
    B, V = 24, 700
    z = _logits(B, V, 14)
    z[3, 100:] = -math.inf
    T = torch.tensor([0.0, 0.7, 1.0, 1.5] * 6)
    K = torch.tensor([0, 1, 5, 50, 0, 3] * 4, dtype=torch.int32)
    P = torch.tensor([1.0, 0.9, 0.5, 1.0, 0.9, 0.3] * 4)
    MP = torch.tensor([0.0, 0.05, 0.0] * 8)
    seeds, steps = torch.arange(B) * 7919 + 5, torch.arange(B) % 4
    tok, lp = sample_tokens(z, T, K, P, MP, seeds, steps, backend=backend)
    want_tok, want_lp = sample_ref(z, T, K, P, MP, seeds, steps)
    assert torch.equal(tok, want_tok)
    assert_close(lp, want_lp, torch.float32, scale=20)
    greedy = T == 0
    assert torch.equal(tok[greedy], z[greedy].argmax(-1))
    assert int(tok[3]) < 100
    # the same (seed, step) gives the same token; permuting rows permutes tokens; other rows change nothing
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(3))
    tok_p, _ = sample_tokens(z[perm], T[perm], K[perm], P[perm], MP[perm], seeds[perm], steps[perm], backend=backend)
    assert torch.equal(tok_p, tok[perm])
    z2 = z.clone()
    z2[1:] = _logits(B - 1, V, 99)
    tok2, _ = sample_tokens(z2, T, K, P, MP, seeds, steps, backend=backend)
    assert tok2[0] == tok[0]
    tok3, _ = sample_tokens(z, T, K, P, MP, seeds, steps + 1, backend=backend)
    assert not torch.equal(tok3[~greedy], tok[~greedy]), "a new step must draw anew"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_equals_composition(backend):
    B, V = 6, 400
    src = torch.stack([_logits(B, V, 20), _logits(B, V, 21)])
    coefs = torch.tensor([[1.5, -0.5]] * B)
    reward = _logits(B, V, 22, scale=1.0)
    kw = dict(temperature=torch.tensor([0.0, 1.0, 0.8, 1.0, 1.2, 0.0]), top_k=5, top_p=0.9, seed=torch.arange(B),
              step=7)
    for r, rk in ((None, 0), (reward, 0), (reward, 5)):
        tok, lp = fused_sample(src, coefs, reward=r, beta=0.8, reward_top_k=rk, backend=backend, **kw)
        z = mix_logprobs_ref(src, coefs)
        if r is not None:  # candidates from sources[0] (the base logits); guidance on the mixed log-probs
            cand = torch.zeros(B, V, dtype=torch.bool)
            for b in range(B):
                cand[b, top_k_candidates_ref(src[0, b], rk) if rk else list(range(V))] = True
            z = torch.log_softmax(torch.where(cand, z + 0.8 * r.double(), -math.inf), -1)
        want, want_lp = sample_ref(z, kw["temperature"], 5, 0.9, 0.0, kw["seed"], 7)
        assert torch.equal(tok, want)
        assert_close(lp, want_lp, torch.float32, scale=20)


def test_beta_zero_is_the_base_model_greedy():
    logits = _logits(8, 300, 30)
    guided = reward_guided_logprobs(logits, _logits(8, 300, 31), 0.0, top_k=10)
    tok, _ = sample_tokens(guided, 0.0)
    assert torch.equal(tok, logits.argmax(-1))


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,match", [
    (dict(top_k=-1), "^top_k: must be in \\[0, V=50\\]"), (dict(top_k=51), "^top_k: must be in"),
    (dict(temperature=-0.5), "^temperature: must be finite and >= 0"),
    (dict(top_p=0.0), "^top_p: must be in \\(0, 1\\]"), (dict(top_p=1.5), "^top_p"),
    (dict(min_p=-0.1), "^min_p"), (dict(step=-1), "^step: must be >= 0"),
    (dict(temperature=[1.0, 2.0]), "^temperature: expected a scalar or one value per row \\(3\\)"),
])
def test_sampler_bad_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        sample_tokens(_logits(3, 50), **kw)


def test_nan_rows_and_mismatched_vocabularies_are_refused():
    z = _logits(4, 50)
    z[2, 5] = float("nan")
    z[3] = -math.inf
    with pytest.raises(ValueError, match="^scores: rows \\[2, 3\\] have a NaN or no finite score"):
        sample_tokens(z)
    with pytest.raises(ValueError, match="logits_without: has shape .* \\(the two branches need one vocabulary\\)"):
        contrast_logits(_logits(2, 50), _logits(2, 51), 1.0)
    with pytest.raises(ValueError, match="^reward: expected .* another vocabulary"):
        reward_guided_logprobs(_logits(2, 50), _logits(2, 3, 1)[:, :2].expand(2, 2).contiguous()[None], 1.0)
    with pytest.raises(ValueError, match="^sources: all sources must have one shape"):
        mix_logprobs([_logits(2, 50), _logits(2, 49)], torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="^reward: per-candidate rewards"):
        reward_guided_logprobs(_logits(2, 50), _logits(2, 4), 1.0, top_k=3)


def test_opcheck_and_inference_mode():
    z = _logits(3, 40)
    t = torch.ones(3)
    torch.library.opcheck(torch.ops.pllm.sample_tokens.default,
                          (torch.empty(3, dtype=torch.int64), torch.empty(3), z, t, torch.zeros(3, dtype=torch.int32),
                           t, torch.zeros(3), torch.arange(3), torch.zeros(3, dtype=torch.int64), "torch"))
    torch.library.opcheck(torch.ops.pllm.mix_logprobs.default,
                          (torch.empty(3, 40), torch.stack([z, z * 0.5]), torch.ones(3, 2), "torch"))
    with torch.inference_mode():
        tok, lp = sample_tokens(z, 0.8, seed=3)
        assert tok.shape == (3,) and torch.isfinite(lp).all()
