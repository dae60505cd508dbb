"""Defects 3-9 of the issue "one personalization plan per forward": bad adapters, store semantics, slot ids, obscure
errors, unsupported model kinds, GPT-2 positions. Each test failed on the code before that issue."""

from __future__ import annotations

import pytest
import torch
from utils import assert_close

from pllm_kernels.batch import build_lora_meta
from pllm_kernels.ops import lora as ops

pytest.importorskip("transformers")
pytest.importorskip("peft")

from pllm_kernels.hf import AdapterError, PatchError, patch_model  # noqa: E402
from pllm_kernels.testing import left_padded_batch, peft_reference, tiny_model  # noqa: E402

SPECS = {
    "a": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "b": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def llama():
    base = tiny_model("llama", seed=1)
    _, sds = peft_reference(base, SPECS, seed=2)
    return base, sds


@pytest.fixture
def pm(llama):
    p = patch_model(llama[0], num_slots=3, max_rank=8)
    yield p
    p.unpatch()


def _state(pm):
    s = pm.store
    return dict(s.adapters), {u: (list(p.adapters), list(p.owned)) for u, p in s.users.items()}, dict(s._slot_of)


# -------------------------------------------------------------------------------------- defect 4: bad lora_alpha
@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 1e40])
def test_bad_lora_alpha_refused_at_registration(pm, llama, alpha):
    _, sds = llama
    pm.register_user("good", *sds["a"])
    sd, cfg = sds["b"]
    cfg = cfg.to_dict()
    cfg["lora_alpha"] = alpha
    before = _state(pm)
    with pytest.raises(AdapterError, match="lora_alpha"):
        pm.register_user("bad", sd, cfg)
    assert _state(pm) == before
    ids, mask = left_padded_batch([4, 3], 128, seed=1)
    with torch.no_grad():  # batches keep working, with and without the good user
        assert torch.isfinite(pm(ids, attention_mask=mask, users=["good", None]).logits).all()
        assert torch.isfinite(pm(ids, attention_mask=mask, users=[None, None]).logits).all()


# ----------------------------------------------------------------------- defect 3: finite in the slot buffers' dtype
def test_fp16_overflowing_adapter_refused_and_others_isolated():
    base = tiny_model("llama", seed=1)
    _, sds = peft_reference(base, SPECS, seed=2)
    pm = patch_model(base.half(), num_slots=3, max_rank=8)
    try:
        pm.register_user("good", *sds["a"])
        sd, cfg = sds["b"]
        sd = {k: (v * 0 + 1e5 if "lora_B" in k else v) for k, v in sd.items()}  # finite in fp32, inf in fp16
        with pytest.raises(AdapterError, match="non-finite.*float16"):
            pm.register_user("bad", sd, cfg)
        assert "bad" not in pm.store.users and "bad" not in pm.store.adapters
    finally:
        pm.unpatch()


def test_model_half_frees_slots_that_overflow_and_names_the_adapter():
    base = tiny_model("llama", seed=1)
    _, sds = peft_reference(base, SPECS, seed=2)
    pm = patch_model(base, num_slots=3, max_rank=8)
    try:
        pm.register_user("good", *sds["a"])
        sd, cfg = sds["b"]
        pm.register_user("big", {k: (v * 0 + 1e5 if "lora_B" in k else v) for k, v in sd.items()}, cfg)
        ids, mask = left_padded_batch([4, 3], 128, seed=1)
        with torch.no_grad():
            pm(ids, attention_mask=mask, users=["good", "big"])  # both resident in fp32
            base.half()
            with pytest.raises(AdapterError, match="'big'.*non-finite.*float16"):
                pm(ids, attention_mask=mask, users=["big", None])
            out = pm(ids, attention_mask=mask, users=["good", None]).logits
        assert torch.isfinite(out).all()
        pm.store.check_consistent()
    finally:
        pm.unpatch()


# ------------------------------------------------------------------------------ defect 5: replace / remove semantics
def test_register_user_never_replaces_a_shared_adapter(pm, llama):
    _, sds = llama
    pm.add_adapter("shared", *sds["a"])
    pm.add_user("carol", [("shared", 1.0)])
    before = _state(pm)
    with pytest.raises(AdapterError, match="used by users \\['carol'\\].*add_adapter\\('shared'"):
        pm.register_user("shared", *sds["b"], replace=True)
    assert _state(pm) == before
    assert pm.store.adapters["shared"].modules.keys() == before[0]["shared"].modules.keys()
    # asked for by name: replaced for everyone
    pm.add_adapter("shared", *sds["b"], replace=True)
    assert pm.store.adapters["shared"] is not before[0]["shared"]


def test_remove_user_removes_what_only_they_used(pm, llama):
    _, sds = llama
    pm.register_user("alice", *sds["a"])
    pm.add_adapter("shared", *sds["b"])
    pm.register_user("dave", *sds["b"], adapter_name="dave-own", adapters=[("shared", 0.5)])
    pm.add_user("erin", ["dave-own"])  # erin references dave's personal adapter
    ids, mask = left_padded_batch([4, 3], 128, seed=1)
    with torch.no_grad():
        pm(ids, attention_mask=mask, users=["alice", "dave"])
    pm.remove_user("alice")
    assert "alice" not in pm.store.adapters and "alice" not in pm.store._slot_of
    pm.register_user("alice", *sds["a"])  # registering the name again works
    pm.remove_user("dave")
    assert "dave-own" in pm.store.adapters, "erin still uses it"
    assert "shared" in pm.store.adapters, "registered by name with add_adapter: stays"
    pm.store.check_consistent()
    # replace=True replaces the user's own adapter
    pm.register_user("alice", *sds["b"], replace=True)
    assert pm.store.profile("alice").adapters == [("alice", 1.0)]
    assert set(pm.store.adapters["alice"].modules) == set(load(sds["b"]).modules)


def load(sd_cfg):
    from pllm_kernels.store import load_peft_adapter

    return load_peft_adapter(*sd_cfg)


# ----------------------------------------------------------------------------- defect 6: slot ids and aliasing
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_slot_id_beyond_int32_is_refused_not_wrapped(backend):
    from lora_cases import make_case

    c = make_case(T=4, h_in=16, slice_sizes=(8,), ranks=(4, 4, 4), max_rank=4, none_frac=0.0)
    slots = torch.tensor([[0], [2**32 + 1], [1], [-1]], dtype=torch.int64)
    meta = build_lora_meta(slots, 3)
    assert int(meta.token_slots[1, 0]) >= 3, "2**32 + 1 must not become slot 1"
    with pytest.raises(ValueError, match="token_slots: slot ids must be -1 or in \\[0, 3\\)"):
        ops.lora_apply(c.y, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, meta, c.slice_sizes, backend=backend)
    y0 = c.y.clone()
    ops.lora_apply(c.y, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, meta, c.slice_sizes, backend=backend,
                   validate=False)
    assert torch.equal(c.y[1], y0[1]), "an out-of-range id is routed nowhere"


def test_meta_never_aliases_the_callers_tensors():
    slots = torch.tensor([[0], [1], [-1]], dtype=torch.int32)
    weights = torch.ones(3, 1)
    meta = build_lora_meta(slots, 2, weights)
    slots[0, 0] = 1
    weights[0, 0] = 5.0
    assert int(meta.token_slots[0, 0]) == 0 and float(meta.token_weights[0, 0]) == 1.0
    assert meta.token_slots.data_ptr() != slots.data_ptr() and meta.token_weights.data_ptr() != weights.data_ptr()


# --------------------------------------------------------------------------------------- defect 7: clear errors
@pytest.mark.parametrize("kw,match", [
    (dict(chunk=0), "chunk must be an int >= 1"),
    (dict(chunk=-4), "chunk must be an int >= 1"),
    (dict(num_slots=0), "num_slots must be an int >= 1"),
])
def test_meta_errors_name_the_argument(kw, match):
    args = dict(token_slots=torch.zeros(4, 1, dtype=torch.int32), num_slots=2)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        build_lora_meta(**args)


def test_meta_shape_errors():
    with pytest.raises(ValueError, match="token_slots must have K >= 1"):
        build_lora_meta(torch.zeros(4, 0, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="token_slots must have shape \\(T,\\) or \\(T, K\\)"):
        build_lora_meta(torch.zeros(2, 2, 2, dtype=torch.int32), 2)


def test_users_string_is_refused_clearly(pm, llama):
    _, sds = llama
    pm.register_user("alice", *sds["a"])
    ids, mask = left_padded_batch([4, 3, 2], 128, seed=1)
    for call in (pm, pm.generate):
        with pytest.raises(TypeError, match="users must be a list.*not the string 'alice'.*users=\\['alice'\\]"):
            call(ids, attention_mask=mask, users="alice")
    with pytest.raises(ValueError, match="users: got 2 users for a batch of 3 rows"):
        pm(ids, attention_mask=mask, users=["alice", None])
    with pytest.raises(TypeError, match="entries are user ids"):
        pm(ids, attention_mask=mask, users=["alice", 3, None])


def test_backend_argument_errors():
    from lora_cases import make_case

    c = make_case(T=3, h_in=8, slice_sizes=(4,), ranks=(2,), max_rank=2)
    with pytest.raises(ValueError, match="^backend: must be one of"):
        ops.lora_apply(c.y, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, backend="cudaa")
    with pytest.raises(RuntimeError, match="backend='cuda' but the lora_apply inputs are on cpu"):
        ops.lora_apply(c.y, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, backend="cuda")
    with pytest.raises(ValueError, match="^strategy: must be one of"):
        ops.lora_apply(c.y, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, strategy="fast")


# ------------------------------------------------------------------------------ defect 8: unsupported model kinds
def test_encoder_decoder_refused_at_patch_time():
    import transformers as tf

    cfg = tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                      decoder_start_token_id=0)
    model = tf.T5ForConditionalGeneration(cfg)
    with pytest.raises(PatchError, match="encoder-decoder.*t5.*decoder-only"):
        patch_model(model)
    assert not any(type(m).__name__ == "MultiLoRALinear" for m in model.modules())


def test_bare_decoder_without_lm_head_refused():
    import transformers as tf

    from pllm_kernels.testing import tiny_config

    with pytest.raises(PatchError, match="no language-model head"):
        patch_model(tf.LlamaModel(tiny_config("llama")))


# -------------------------------------------------------------------------------- defect 9: GPT-2 left padding
@torch.no_grad()
def test_gpt2_left_padded_rows_equal_rows_alone():
    base = tiny_model("gpt2", seed=4)
    _, sds = peft_reference(base, {"g": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                             fan_in_fan_out=True)}, seed=5)
    pm = patch_model(base, num_slots=2, max_rank=8)
    try:
        pm.register_user("g", *sds["g"])
        ids, mask = left_padded_batch([6, 3], 128, seed=3)
        out = pm(ids, attention_mask=mask, users=["g", "g"]).logits
        alone = pm(ids[1:, 3:], users=["g"]).logits[0]
        assert_close(out[1, 3:], alone, torch.float32, scale=float(alone.abs().max()))
    finally:
        pm.unpatch()
