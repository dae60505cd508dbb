"""Per-user soft prompts (prompt tuning / PPlug) in patched HF models: a mixed batch (users with different numbers
of virtual tokens, one with a LoRA adapter, one with steering too, rows without) equals PEFT prompt tuning run per
row — logits aligned with input_ids and greedy generation (returning only the new tokens) — with left and right
padding; bad prompts are refused and nothing registered changes."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from utils import assert_close  # noqa: E402

from pllm_kernels.hf import patch_model  # noqa: E402
from pllm_kernels.hf.targets import find_decoder_layers  # noqa: E402
from pllm_kernels.testing import peft_reference, tiny_model  # noqa: E402

LENGTHS = [5, 3, 6, 4]
USERS = ["p2", None, "p5_lora", "p3_steer"]
N_VIRTUAL = {"p2": 2, "p5_lora": 5, "p3_steer": 3}


def _prompt_tuned(base, n, seed):
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():  # the default init is random already; scale it like real embeddings
        model.prompt_encoder["default"].embedding.weight.mul_(0.5)
    return model, model.get_prompt_embedding_to_save("default").detach().clone()


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma2"])
def setup(request):
    arch = request.param
    base = tiny_model(arch, seed=6)
    lora_spec = (dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True) if arch == "gpt2" else
                 dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    lora_model, sds = peft_reference(base, {"p5_lora": lora_spec}, seed=12)
    tuned = {u: _prompt_tuned(base, n, seed=20 + n) for u, n in N_VIRTUAL.items()}
    steer = torch.randn(base.get_input_embeddings().embedding_dim, generator=torch.Generator().manual_seed(2))
    pm = patch_model(base, num_slots=4, max_rank=8)
    pm.register_user("p5_lora", *sds["p5_lora"])
    for u, (_, prompt) in tuned.items():
        pm.add_soft_prompt(u, prompt)
    pm.add_steering("p3_steer", 1, steer, scale=1.5)
    yield arch, base, pm, lora_model, tuned, steer
    pm.unpatch()


def _batch(vocab, side, seed=1):
    g = torch.Generator().manual_seed(seed)
    S = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), S, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows = []
    for b, n in enumerate(LENGTHS):
        row = torch.randint(3, vocab, (n,), generator=g)
        sl = slice(S - n, S) if side == "left" else slice(0, n)
        ids[b, sl], mask[b, sl] = row, 1
        rows.append(row)
    return ids, mask, rows


def _steer_hook(model, layer, v, s):
    _, layers = find_decoder_layers(model)

    def hook(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h + s * v.to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    return layers[layer].register_forward_hook(hook)


def _reference_logits(setup, user, ids_row):
    """PEFT run per row: prompt tuning (virtual tokens first, positions 0..n-1), or the PEFT LoRA model fed
    ``cat(prompt, embed(ids))`` for the row with both."""
    arch, base, pm, lora_model, tuned, steer = setup
    with pm.users(None), torch.no_grad():
        if user is None:
            return base(input_ids=ids_row[None]).logits[0]
        model, prompt = tuned[user]
        n = prompt.shape[0]
        if user == "p5_lora":
            emb = lora_model.get_input_embeddings()(ids_row[None])
            embeds = torch.cat([prompt[None].to(emb.dtype), emb], 1)
            return lora_model(inputs_embeds=embeds, adapter_names=["p5_lora"]).logits[0, n:]
        handle = _steer_hook(model, 1, steer, 1.5) if user == "p3_steer" else None
        try:
            return model(input_ids=ids_row[None]).logits[0, n:]
        finally:
            if handle is not None:
                handle.remove()


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_logits_match_peft_prompt_tuning_per_row(setup, side):
    arch, base, pm, *_ = setup
    ids, mask, rows = _batch(base.config.vocab_size, side)
    out = pm(ids, attention_mask=mask, users=USERS).logits
    assert out.shape[:2] == ids.shape, "logits stay aligned with input_ids"
    plain = pm(ids, attention_mask=mask).logits
    for b, (user, row) in enumerate(zip(USERS, rows)):
        S, n = ids.shape[1], len(row)
        cols = slice(S - n, S) if side == "left" else slice(0, n)
        want = _reference_logits(setup, user, row)
        if user is not None:
            assert (want - plain[b, cols]).abs().max() > 1e-3, f"{user}: the soft prompt must matter"
        assert_close(out[b, cols], want, torch.float32, scale=float(want.abs().max()), msg=f"{arch} {side} {user}")


@torch.no_grad()
def test_greedy_generate_matches_peft_loop(setup):
    """Greedy tokens equal a greedy loop over PEFT's forward per row (PEFT's own generate re-inserts the virtual
    tokens at cached steps, so the loop is the reference)."""
    arch, base, pm, *_ = setup
    ids, mask, rows = _batch(base.config.vocab_size, "left", seed=2)
    new = 4
    ours = pm.generate(ids, attention_mask=mask, users=USERS, max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert ours.shape == (len(USERS), new), "with soft prompts generate returns only the new tokens"
    for b, (user, row) in enumerate(zip(USERS, rows)):
        seq = row.clone()
        for _ in range(new):
            seq = torch.cat([seq, _reference_logits(setup, user, seq)[-1].argmax()[None]])
        assert torch.equal(ours[b], seq[len(row):]), f"{arch} {user}: {ours[b].tolist()} vs {seq[len(row):].tolist()}"


def test_bad_soft_prompts_refused_and_nothing_changes(setup):
    arch, base, pm, *_ = setup
    hidden = base.get_input_embeddings().embedding_dim
    before = {u: (p.soft_prompt, list(p.steering)) for u, p in pm.store.users.items()}
    for bad, match in [(torch.randn(3, hidden + 1), "expected shape"), (torch.randn(hidden), "expected shape"),
                       (torch.zeros(3, hidden, dtype=torch.long), "not a floating dtype"),
                       (torch.full((2, hidden), float("nan")), "non-finite"), ("nope", "not a file"),
                       (torch.randn(2, hidden, device="meta"), "meta")]:
        with pytest.raises((ValueError, Exception), match=match):
            pm.add_soft_prompt("p2", bad)
    after = {u: (p.soft_prompt, list(p.steering)) for u, p in pm.store.users.items()}
    assert before.keys() == after.keys()
    assert all(before[u][0] is after[u][0] and before[u][1] == after[u][1] for u in before)
