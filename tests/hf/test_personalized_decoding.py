"""The personalized generation loop: plain / contrasted / reward-guided rows in one batch, each with its own
sampling parameters and seed, composing with LoRA; checked against independent per-row loops (full recompute, no
KV cache), HF's greedy generate, and the LogitsProcessor forms."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from pllm_kernels.hf import (  # noqa: E402
    ContrastLogitsProcessor,
    DecodingPolicy,
    RewardGuidanceLogitsProcessor,
    patch_model,
)
from pllm_kernels.reference.decoding import contrast_logits_ref, reward_guided_ref, sample_ref  # noqa: E402
from pllm_kernels.testing import left_padded_batch, peft_reference, tiny_model  # noqa: E402

NEW = 5


@pytest.fixture(scope="module")
def served():
    base = tiny_model("llama", seed=8)
    _, sds = peft_reference(base, {"lora": dict(r=4, lora_alpha=16, target_modules="all-linear")}, seed=3)
    rm = tiny_model("llama", seed=21)  # a tiny "reward model" sharing the vocabulary
    pm = patch_model(base, num_slots=4, max_rank=8)
    pm.register_user("lora", *sds["lora"])
    ctx = torch.tensor([7, 19, 33, 4])
    pm.set_decoding("cos", contrast=1.5, context=ctx)
    pm.set_decoding("lora", contrast=-0.5, context=torch.tensor([11, 2]))  # LoRA + contrast in one row
    pm.set_decoding("hot", temperature=0.9, top_k=20, top_p=0.9, seed=123)
    pm.set_decoding("guided", reward_weights=[1.0], beta=2.0, reward_top_k=8)
    pm.set_decoding("guided0", reward_weights=[1.0], beta=0.0)
    yield pm, rm
    pm.unpatch()


def _logits_alone(pm, user, seq):
    with torch.no_grad(), pm.users([user]):
        return pm.model(input_ids=seq[None]).logits[0, -1]


def _reference_row(pm, rm, user, prompt, policy, seed=0):
    """One row decoded alone with full recomputation at each step (the spec's composition, float64 ops)."""
    seq, ctx_seq, out = prompt.clone(), None, []
    if policy.context is not None:
        ctx_seq = torch.cat([policy.context, prompt])
    for t in range(NEW):
        lw = _logits_alone(pm, user, ctx_seq if ctx_seq is not None else seq)
        if policy.contrast != 0:
            z = contrast_logits_ref(lw[None], _logits_alone(pm, user, seq)[None], policy.contrast)
        else:
            z = torch.log_softmax(lw.double(), -1)[None]
        if policy.reward_weights is not None:
            with torch.no_grad():
                r = torch.log_softmax(rm(input_ids=seq[None]).logits[0, -1].double(), -1)
            z = reward_guided_ref(z, policy.reward_weights[0] * r[None], policy.beta, policy.reward_top_k)
        tok, _ = sample_ref(z, policy.temperature, policy.top_k, policy.top_p, policy.min_p,
                            policy.seed if policy.seed is not None else seed, t)
        out.append(int(tok[0]))
        seq = torch.cat([seq, tok])
        if ctx_seq is not None:
            ctx_seq = torch.cat([ctx_seq, tok])
    return out


@torch.no_grad()
def test_mixed_policies_equal_rows_decoded_alone(served):
    pm, rm = served
    users = ["cos", None, "hot", "guided", "lora", "guided0"]
    ids, mask = left_padded_batch([5, 3, 6, 4, 5, 6], 128, seed=4)
    out = pm.personalized_generate(ids, attention_mask=mask, users=users, max_new_tokens=NEW, rewards=[rm])
    assert out.tokens.shape == (len(users), NEW) and torch.isfinite(out.logprobs).all()
    for b, u in enumerate(users):
        prompt = ids[b][mask[b].bool()]
        policy = pm.store.profile(u).decoding if u is not None else DecodingPolicy()
        want = _reference_row(pm, rm, u, prompt, policy)
        assert out.tokens[b].tolist() == want, f"row {b} ({u}): {out.tokens[b].tolist()} vs {want}"
    # beta = 0 reproduces the base model's greedy output exactly; the guided row differs from it
    plain = pm.personalized_generate(ids[5:6], attention_mask=mask[5:6], users=[None], max_new_tokens=NEW)
    assert torch.equal(out.tokens[5], plain.tokens[0])


@torch.no_grad()
def test_rows_do_not_depend_on_position_or_neighbours(served):
    pm, rm = served
    ids, mask = left_padded_batch([5, 4, 6], 128, seed=6)
    users = ["hot", "cos", "hot"]
    out = pm.personalized_generate(ids, attention_mask=mask, users=users, max_new_tokens=NEW, rewards=[rm])
    flipped = pm.personalized_generate(ids.flip(0), attention_mask=mask.flip(0), users=users[::-1],
                                       max_new_tokens=NEW, rewards=[rm])
    assert torch.equal(flipped.tokens.flip(0), out.tokens)
    alone = pm.personalized_generate(ids[2:], attention_mask=mask[2:], users=["hot"], max_new_tokens=NEW)
    assert torch.equal(alone.tokens[0], out.tokens[2])


@torch.no_grad()
def test_batched_two_branch_greedy_equals_branches_run_separately(served):
    pm, _ = served
    ids, mask = left_padded_batch([6, 3], 128, seed=9)
    out = pm.personalized_generate(ids, attention_mask=mask, users=["cos", "lora"], max_new_tokens=NEW)
    for b, u in enumerate(["cos", "lora"]):
        prompt = ids[b][mask[b].bool()]
        assert out.tokens[b].tolist() == _reference_row(pm, None, u, prompt, pm.store.profile(u).decoding)


@torch.no_grad()
def test_contrast_processor_in_stock_generate(served):
    pm, _ = served
    policy = pm.store.profile("cos").decoding
    prompt = torch.tensor([5, 17, 42, 9])
    with_ctx = torch.cat([policy.context, prompt])[None]
    proc = ContrastLogitsProcessor(pm.model, prompt[None], policy.contrast)
    with pm.users(None):
        got = pm.model.generate(with_ctx, attention_mask=torch.ones_like(with_ctx), logits_processor=[proc],
                                max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, with_ctx.shape[1]:]
    want = pm.personalized_generate(prompt[None], users=["cos"], max_new_tokens=NEW).tokens[0]
    assert torch.equal(got, want)


@torch.no_grad()
def test_reward_processor_in_stock_generate(served):
    pm, rm = served
    prompt = torch.tensor([[5, 17, 42, 9]])
    proc = RewardGuidanceLogitsProcessor(rm, beta=2.0, top_k=8)
    with pm.users(None):
        got = pm.model.generate(prompt, attention_mask=torch.ones_like(prompt), logits_processor=[proc],
                                max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, prompt.shape[1]:]
    want = pm.personalized_generate(prompt, users=["guided"], max_new_tokens=NEW, rewards=[rm]).tokens[0]
    assert torch.equal(got, want)
    calls = []
    proc = RewardGuidanceLogitsProcessor(lambda ids, scores: calls.append(1) or torch.zeros_like(scores), beta=1.0)
    with pm.users(None):
        pm.model.generate(prompt, logits_processor=[proc], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert len(calls) == 2


@torch.no_grad()
def test_callable_rewards_per_token_and_per_candidate(served):
    pm, rm = served
    ids = torch.tensor([[5, 17, 42, 9]])
    favourite = 77

    def boost(seqs, cand):  # per-candidate (B, k): reward the favourite token if it is a candidate
        return (cand == favourite).float() * 50.0

    pm.set_decoding("fan", reward_weights=[1.0], beta=1.0, reward_top_k=128)
    out = pm.personalized_generate(ids, users=["fan"], max_new_tokens=3, rewards=[boost])
    assert out.tokens[0].tolist() == [favourite] * 3
    pm.set_decoding("fan2", reward_weights=[0.5, 0.5], beta=1.0)
    tok_reward = lambda seqs, cand: torch.nn.functional.one_hot(torch.tensor([3]), 128).float() * 100  # noqa: E731
    out = pm.personalized_generate(ids, users=["fan2"], max_new_tokens=2, rewards=[tok_reward, rm])
    assert out.tokens[0].tolist() == [3, 3]


def test_bad_decoding_input(served):
    pm, rm = served
    ids = torch.tensor([[5, 17, 42, 9]])
    with pytest.raises(ValueError, match="contrast=2.0 needs the user's context"):
        pm.personalized_generate(ids, users=[None], policies=[DecodingPolicy(contrast=2.0)], max_new_tokens=2)
    with pytest.raises(ValueError, match="must share a vocabulary"):
        pm.personalized_generate(ids, users=["guided"], rewards=[tiny_model("llama", vocab_size=96)],
                                 max_new_tokens=2)
    with pytest.raises(ValueError, match="1 reward weights but 2 reward sources"):
        pm.personalized_generate(ids, users=["guided"], rewards=[rm, rm], max_new_tokens=2)
    for kw, match in [(dict(temperature=-1.0), "temperature must be finite and in"), (dict(top_p=0.0), "top_p"),
                      (dict(top_k=-2), "top_k must be an int >= 0"), (dict(contrast=float("nan")), "contrast"),
                      (dict(context=torch.tensor([[1.5]])), "context must be"), (dict(seed="x"), "seed")]:
        with pytest.raises(ValueError, match=match):
            pm.set_decoding("bad", **kw)
    assert "bad" not in pm.store.users or pm.store.profile("bad").decoding is None
    with pytest.raises(ValueError, match="max_new_tokens"):
        pm.personalized_generate(ids, users=[None], max_new_tokens=0)
