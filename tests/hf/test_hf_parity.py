"""Parity with PEFT's mixed batch (``model(..., adapter_names=[...])``) on tiny random models of every supported
architecture: logits within the fp32 tolerance, identical greedy tokens; random non-zero B, mixed ranks, rsLoRA,
partial layers (layers_to_transform), target subsets, "all-linear", rows without adapters, left padding."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from utils import assert_bitwise_equal, assert_close  # noqa: E402

from pllm_kernels.hf import patch_model  # noqa: E402
from pllm_kernels.testing import ARCHS, left_padded_batch, peft_reference, tiny_model  # noqa: E402

LENGTHS = [5, 7, 3, 7, 6]  # left padded to 7
USERS = ["u0", None, "u1", "u2", "u0"]
NEW_TOKENS = 5


def adapter_specs(arch: str) -> dict:
    if arch == "gpt2":
        every = ["c_attn", "c_proj", "c_fc"]
        fifo = dict(fan_in_fan_out=True)
        return {
            "u0": dict(r=4, lora_alpha=8, target_modules=every, **fifo),
            "u1": dict(r=8, lora_alpha=16, target_modules=["c_attn"], use_rslora=True, **fifo),
            "u2": dict(r=2, lora_alpha=3, target_modules=["c_proj", "c_fc"], layers_to_transform=[1], **fifo),
        }
    if arch == "phi3":
        return {
            "u0": dict(r=4, lora_alpha=8, target_modules="all-linear"),
            "u1": dict(r=8, lora_alpha=16, target_modules=["qkv_proj"], use_rslora=True),
            "u2": dict(r=2, lora_alpha=3, target_modules=["gate_up_proj", "o_proj"], layers_to_transform=[1]),
        }
    return {
        "u0": dict(r=4, lora_alpha=8, target_modules="all-linear"),
        "u1": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
        "u2": dict(r=2, lora_alpha=3, target_modules=["k_proj", "o_proj", "up_proj"], layers_to_transform=[1]),
    }


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tmp_path_factory):
    arch = request.param
    base = tiny_model(arch, seed=3)
    specs = adapter_specs(arch)
    peft_model, sds = peft_reference(base, specs, seed=7)
    pm = patch_model(base, num_slots=4, max_rank=8)
    # u0 goes through the directory path (save_pretrained -> adapter_config.json + safetensors).
    tmp = tmp_path_factory.mktemp(f"adapters_{arch}")
    peft_model.save_pretrained(str(tmp), selected_adapters=["u0"])
    u0_dir = tmp / "u0" if (tmp / "u0").is_dir() else tmp
    assert (u0_dir / "adapter_model.safetensors").is_file()
    pm.register_user("u0", str(u0_dir))
    for name in ("u1", "u2"):
        sd, cfg = sds[name]
        pm.register_user(name, sd, cfg)
    ids, mask = left_padded_batch(LENGTHS, base.config.vocab_size, seed=11)
    yield arch, pm, peft_model, ids, mask
    pm.unpatch()


def _peft_names(users):
    return [u or "__base__" for u in users]


@pytest.fixture(params=["gather", "runs", "dense"])
def path(request, setup):
    """Both strategies of the op's torch backend: gathered per-token weights (batched matmuls) and per-(k, slot)
    runs of the sorted order."""
    pm = setup[1]
    pm.set_backend("torch", strategy=request.param)
    yield request.param
    pm.set_backend(None)


@torch.no_grad()
def test_logits_match_peft_mixed_batch(setup, path):
    arch, pm, peft_model, ids, mask = setup
    builds = pm.context.builds
    ours = pm(ids, attention_mask=mask, users=USERS).logits
    assert pm.context.builds == builds + 1, "the batch metadata must be built once per forward"
    # position ids as generate makes them (GPT-2's absolute positions need them with left padding; ours derives them)
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    ref = peft_model(input_ids=ids, attention_mask=mask, position_ids=pos, adapter_names=_peft_names(USERS)).logits
    base = pm(ids, attention_mask=mask).logits
    valid = mask.bool()
    # the adapters must matter, else the comparison proves nothing
    assert (ref - base)[valid].abs().max() > 1e-2
    scale = float(ref.abs().max())
    assert_close(ours[valid], ref[valid], torch.float32, scale=scale, msg=f"{arch}/{path}")
    # the row without a user is exactly the base model (bits, not ==: -0.0 must stay -0.0)
    assert_bitwise_equal(ours[1][valid[1]], base[1][valid[1]], msg=f"{arch}/{path}: row without a user")


@torch.no_grad()
def test_greedy_generate_matches_peft(setup, path):
    arch, pm, peft_model, ids, mask = setup
    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    builds = pm.context.builds
    ours = pm.generate(ids, attention_mask=mask, users=USERS, **kw)
    ref = peft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=_peft_names(USERS), **kw)
    assert torch.equal(ours, ref), f"{arch}: greedy tokens differ\n{ours}\n{ref}"
    assert pm.context.builds - builds == ours.shape[1] - ids.shape[1], "one metadata build per decode step"


@torch.no_grad()
def test_row_independent_of_batch(setup):
    arch, pm, _, ids, mask = setup
    full = pm(ids, attention_mask=mask, users=USERS).logits
    for b in (0, 2, 3):
        alone = pm(ids[b:b + 1], attention_mask=mask[b:b + 1], users=[USERS[b]]).logits
        valid = mask[b].bool()
        assert_close(alone[0][valid], full[b][valid], torch.float32, scale=float(full.abs().max()),
                     msg=f"{arch}: row {b} alone vs in a mixed batch")
    gen_all = pm.generate(ids, attention_mask=mask, users=USERS, max_new_tokens=3, do_sample=False, pad_token_id=0)
    alone = pm.generate(ids[3:4], attention_mask=mask[3:4], users=[USERS[3]], max_new_tokens=3, do_sample=False,
                        pad_token_id=0)
    assert torch.equal(gen_all[3], alone[0])


@torch.no_grad()
def test_weighted_shared_plus_personal_matches_peft_cat():
    """K = 2 weighted adapters per user (shared + personal, OPPU / PROPER style) == PEFT's "cat" combination."""
    base = tiny_model("llama", seed=5)
    specs = {
        "shared": dict(r=4, lora_alpha=8, target_modules="all-linear"),
        "own": dict(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], use_rslora=True),
    }
    peft_model, sds = peft_reference(base, specs, seed=1)
    peft_model.add_weighted_adapter(["shared", "own"], [0.5, 1.5], "mix", combination_type="cat")
    pm = patch_model(base, num_slots=4, max_rank=8)
    pm.add_adapter("shared", *sds["shared"])
    pm.register_user("alice", *sds["own"], adapter_name="alice-own", weight=1.5, adapters=[("shared", 0.5)])
    pm.add_user("bob", "shared")
    assert pm.profile("alice").adapters == [("alice-own", 1.5), ("shared", 0.5)]
    ids, mask = left_padded_batch([6, 4, 6], 128, seed=2)
    users = ["alice", None, "bob"]
    ours = pm(ids, attention_mask=mask, users=users).logits
    ref = peft_model(input_ids=ids, attention_mask=mask, adapter_names=["mix", "__base__", "shared"]).logits
    valid = mask.bool()
    assert_close(ours[valid], ref[valid], torch.float32, scale=float(ref.abs().max()))
    pm.unpatch()


@torch.no_grad()
def test_sampling_matches_peft_mixed_batch():
    """Sampling draws from torch's global RNG in the same order for ours and PEFT, and the logits agree to ~1e-6:
    with the same seed every row samples PEFT's tokens for its own adapter (a row routed to another user's adapter,
    or to none, samples other tokens: checked below so the comparison has power). ``num_return_sequences`` repeats
    each row's user: same tokens as PEFT on the explicitly repeated batch."""
    base = tiny_model("qwen2", seed=4)
    specs = {
        "ua": dict(r=4, lora_alpha=8, target_modules="all-linear"),
        "ub": dict(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    }
    peft_model, sds = peft_reference(base, specs, seed=5)
    pm = patch_model(base, num_slots=2, max_rank=4)
    try:
        for name in specs:
            pm.register_user(name, *sds[name])
        ids, mask = left_padded_batch([4, 6, 5], 128, seed=3)
        users = ["ua", None, "ub"]
        kw = dict(max_new_tokens=8, do_sample=True, top_k=50, temperature=1.0, pad_token_id=0)

        def sample(fn, seed):
            torch.manual_seed(seed)
            return fn(**kw)

        ours = sample(lambda **k: pm.generate(ids, attention_mask=mask, users=users, **k), 0)
        ref = sample(lambda **k: peft_model.generate(input_ids=ids, attention_mask=mask,
                                                     adapter_names=_peft_names(users), **k), 0)
        assert ours.shape == (3, ids.shape[1] + 8)
        assert torch.equal(ours, ref), f"sampled tokens differ from PEFT's\n{ours}\n{ref}"
        # power: the same seed with the two users swapped, or without users, samples other tokens
        swapped = sample(lambda **k: pm.generate(ids, attention_mask=mask, users=["ub", None, "ua"], **k), 0)
        plain = sample(lambda **k: pm.generate(ids, attention_mask=mask, **k), 0)
        for b in (0, 2):
            assert not torch.equal(swapped[b], ref[b]) and not torch.equal(plain[b], ref[b]), f"row {b}"
        assert torch.equal(plain[1], ref[1])
        # num_return_sequences=2: rows b, b of the expanded batch belong to users[b] (HF's repeat_interleave order)
        ours = sample(lambda **k: pm.generate(ids, attention_mask=mask, users=users, num_return_sequences=2, **k), 2)
        rep = [u for u in users for _ in range(2)]
        ref = sample(lambda **k: peft_model.generate(input_ids=ids.repeat_interleave(2, 0),
                                                     attention_mask=mask.repeat_interleave(2, 0),
                                                     adapter_names=_peft_names(rep), **k), 2)
        assert ours.shape[0] == 6 and torch.equal(ours, ref), f"num_return_sequences\n{ours}\n{ref}"
    finally:
        pm.unpatch()


@pytest.mark.interpreter
@torch.no_grad()
def test_triton_backend_parity_interpreter():
    """The Triton lora kernels (under TRITON_INTERPRET=1) inside a patched model agree with PEFT."""
    base = tiny_model("llama", seed=3)
    peft_model, sds = peft_reference(base, adapter_specs("llama"), seed=7)
    pm = patch_model(base, num_slots=4, max_rank=8, backend="triton")
    try:
        for name, (sd, cfg) in sds.items():
            pm.register_user(name, sd, cfg)
        ids, mask = left_padded_batch(LENGTHS, 128, seed=11)
        ours = pm(ids, attention_mask=mask, users=USERS).logits
        ref = peft_model(input_ids=ids, attention_mask=mask, adapter_names=_peft_names(USERS)).logits
        valid = mask.bool()
        assert_close(ours[valid], ref[valid], torch.float32, scale=float(ref.abs().max()))
        kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(pm.generate(ids, attention_mask=mask, users=USERS, **kw),
                           peft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=_peft_names(USERS),
                                               **kw))
    finally:
        pm.unpatch()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_cuda_parity(dtype, monkeypatch):
    """On a GPU (Triton / CUDA backends through the op): logits vs PEFT at the dtype's tolerance, greedy tokens
    identical in fp32, per-layer value checks off as in serving."""
    monkeypatch.setenv("PLLM_CHECK_VALUES", "0")
    base = tiny_model("llama", seed=3, dtype=dtype, device="cuda")
    peft_model, sds = peft_reference(base, adapter_specs("llama"), seed=7)
    pm = patch_model(base, num_slots=4, max_rank=8)
    try:
        for name, (sd, cfg) in sds.items():
            pm.register_user(name, sd, cfg)
        ids, mask = left_padded_batch(LENGTHS, 128, seed=11, device="cuda")
        ours = pm(ids, attention_mask=mask, users=USERS).logits
        ref = peft_model(input_ids=ids, attention_mask=mask, adapter_names=_peft_names(USERS)).logits
        valid = mask.bool()
        assert_close(ours[valid].float(), ref[valid].float(), dtype, scale=float(ref.float().abs().max()))
        if dtype == torch.float32:
            kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            assert torch.equal(pm.generate(ids, attention_mask=mask, users=USERS, **kw),
                               peft_model.generate(input_ids=ids, attention_mask=mask,
                                                   adapter_names=_peft_names(USERS), **kw))
    finally:
        pm.unpatch()


@torch.no_grad()
def test_fused_projections_match_unfused_with_fewer_calls(monkeypatch):
    """q/k/v and gate/up adapters run as the slices of one lora_apply: same logits, 4 calls per Llama layer, and
    the shared deltas are released after the forward."""
    import pllm_kernels.modules.multi_lora as ml
    from pllm_kernels.batch import ForwardContext

    specs = adapter_specs("llama")
    models = []
    for fuse in (True, False):
        base = tiny_model("llama", seed=3)
        _, sds = peft_reference(base, specs, seed=7)
        pm = patch_model(base, num_slots=4, max_rank=8, fuse_projections=fuse)
        for name, (sd, cfg) in sds.items():
            pm.register_user(name, sd, cfg)
        models.append(pm)
    fused, plain = models
    assert len(fused.store.groups) == 2 * fused.model.config.num_hidden_layers and not plain.store.groups
    calls, left = [], []
    real = ml.lora_apply
    monkeypatch.setattr(ml, "lora_apply", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_end = ForwardContext.end

    def end(ctx):
        b = ctx.batch
        left.append({k: v for k, v in b.scratch.items() if isinstance(k, tuple) and k[0] == "group"}
                    if b is not None else {})
        real_end(ctx)

    monkeypatch.setattr(ForwardContext, "end", end)
    ids, mask = left_padded_batch(LENGTHS, fused.model.config.vocab_size, seed=11)
    out_fused = fused(ids, attention_mask=mask, users=USERS).logits
    n_fused = len(calls)
    out_plain = plain(ids, attention_mask=mask, users=USERS).logits
    n_layers = fused.model.config.num_hidden_layers
    assert n_fused == 4 * n_layers and len(calls) - n_fused == 7 * n_layers
    assert_close(out_fused, out_plain, torch.float32)
    assert left and all(not sc for sc in left), f"shared deltas still held at the end of the forward: {left}"
