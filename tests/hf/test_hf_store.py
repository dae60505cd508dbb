"""Store, patching and bad input: unknown users, adapters for another base model (all-or-nothing), corrupt files,
refused features (DoRA, biases, embedding / lm_head LoRA, pickles), slot capacity and eviction, unpatch."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from utils import assert_bitwise_equal, assert_close  # noqa: E402

from pllm_kernels.hf import AdapterError, PatchError, UnknownUserError, patch_model, unpatch_model  # noqa: E402
from pllm_kernels.hf import targets as hf_targets  # noqa: E402
from pllm_kernels.modules import MultiLoRALinear  # noqa: E402
from pllm_kernels.store import load_peft_adapter  # noqa: E402
from pllm_kernels.testing import left_padded_batch, peft_reference, tiny_model  # noqa: E402

SPECS = {
    "a0": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "a1": dict(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]),
    "a2": dict(r=8, lora_alpha=4, target_modules=["o_proj", "down_proj"], use_rslora=True),
}


@pytest.fixture(scope="module")
def llama():
    base = tiny_model("llama", seed=1)
    peft_model, sds = peft_reference(base, SPECS, seed=2)
    return base, peft_model, sds


@pytest.fixture
def pm(llama):
    base, _, _ = llama
    p = patch_model(base, num_slots=4, max_rank=8)
    yield p
    if p.patched:
        p.unpatch()


def _save_dir(tmp_path, sd, cfg, name="ad"):
    from safetensors.torch import save_file

    d = tmp_path / name
    d.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "adapter_model.safetensors"))
    with open(d / "adapter_config.json", "w") as f:
        json.dump(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg, f, default=list)
    return d


def test_unknown_user_is_named(pm, llama):
    _, _, sds = llama
    pm.register_user("known", *sds["a0"])
    ids, mask = left_padded_batch([3, 3], 128)
    with pytest.raises(UnknownUserError, match="'mallory'"):
        pm(ids, attention_mask=mask, users=["known", "mallory"])
    with pytest.raises(UnknownUserError, match="'mallory'"):
        pm.generate(ids, attention_mask=mask, users=["mallory", None], max_new_tokens=2)
    with pytest.raises(ValueError, match="2 rows"):
        pm(ids, attention_mask=mask, users=["known"])


def test_shape_mismatch_is_all_or_nothing(pm, llama, tmp_path):
    _, _, sds = llama
    other = tiny_model("llama", seed=0, hidden_size=32, intermediate_size=64)
    _, other_sds = peft_reference(other, {"x": dict(r=4, lora_alpha=8, target_modules="all-linear")})
    sd, cfg = other_sds["x"]
    before = (dict(pm.store.adapters), dict(pm.store.users))
    with pytest.raises(AdapterError, match="shape mismatch.*another base model"):
        pm.register_user("eve", sd, cfg)
    # a user combining a good shared adapter with a bad personal one: nothing registered either
    pm.add_adapter("shared", *sds["a0"])
    before = (dict(pm.store.adapters), dict(pm.store.users))
    with pytest.raises(AdapterError):
        pm.register_user("eve", _save_dir(tmp_path, sd, cfg), adapters=[("shared", 0.5)])
    assert (dict(pm.store.adapters), dict(pm.store.users)) == before
    with pytest.raises(UnknownUserError):
        pm.profile("eve")
    # a user naming an unknown extra adapter: the personal adapter is not stored
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"):
        pm.register_user("eve", *sds["a1"], adapters=["nope"])
    assert "eve" not in pm.store.adapters and "eve" not in pm.store.users


def test_corrupt_safetensors(pm, llama, tmp_path):
    _, _, sds = llama
    d = _save_dir(tmp_path, *sds["a0"])
    path = d / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="not a valid safetensors file"):
        pm.register_user("bob", str(d))
    path.write_bytes(b"\x00garbage")
    with pytest.raises(AdapterError, match="not a valid safetensors file"):
        pm.register_user("bob", str(d))
    assert "bob" not in pm.store.users
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        pm.register_user("bob", str(tmp_path))


def test_bin_weights_only(pm, llama, tmp_path):
    _, _, sds = llama
    sd, cfg = sds["a1"]
    d = tmp_path / "binad"
    d.mkdir()
    torch.save(sd, d / "adapter_model.bin")
    with open(d / "adapter_config.json", "w") as f:
        json.dump(cfg.to_dict(), f, default=list)
    pm.register_user("binuser", str(d))  # plain tensors load with weights_only=True

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    torch.save({"x": Evil()}, d / "adapter_model.bin")
    with pytest.raises(AdapterError, match="weights_only"):
        pm.register_user("evil", str(d))


@pytest.mark.parametrize("feature", ["dora", "bias", "lm_head", "embedding", "modules_to_save"])
def test_unsupported_features_refused(pm, llama, feature):
    _, _, sds = llama
    sd, cfg = sds["a0"]
    cfg = cfg.to_dict()
    sd = dict(sd)
    if feature == "dora":
        cfg["use_dora"] = True
        match = "DoRA"
    elif feature == "bias":
        cfg["bias"] = "lora_only"
        match = "biases"
    elif feature == "lm_head":
        sd["base_model.model.lm_head.lora_A.weight"] = torch.randn(4, 64)
        sd["base_model.model.lm_head.lora_B.weight"] = torch.randn(128, 4)
        cfg["target_modules"] = sorted(cfg["target_modules"]) + ["lm_head"]
        match = "lm_head"
    elif feature == "embedding":
        sd["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(4, 128)
        match = "embedding"
    else:
        cfg["modules_to_save"] = ["lm_head"]
        match = "modules_to_save"
    with pytest.raises(AdapterError, match=match):
        pm.register_user("u", sd, cfg)
    assert "u" not in pm.store.users and "u" not in pm.store.adapters


def test_dora_peft_adapter_refused(llama, tmp_path):
    base, _, _ = llama
    _, sds = peft_reference(base, {"d": dict(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)})
    with pytest.raises(AdapterError, match="DoRA"):
        load_peft_adapter(*sds["d"])


def test_config_honoured(llama):
    _, _, sds = llama
    sd, cfg = sds["a0"]
    ad = load_peft_adapter(sd, cfg)
    assert all(w.scale == 2.0 for w in ad.modules.values())
    d = cfg.to_dict()
    d.update(target_modules=["q_proj"], layers_to_transform=[1], use_rslora=True)
    ad = load_peft_adapter(sd, d)  # weights outside target_modules / layers are ignored, as PEFT would
    assert sorted(ad.modules) == ["model.layers.1.self_attn.q_proj"]
    assert ad.modules["model.layers.1.self_attn.q_proj"].scale == pytest.approx(8 / 2)
    d.update(target_modules=["q_proj"], layers_to_transform=None, rank_pattern={"q_proj": 3})
    with pytest.raises(AdapterError, match="rank 4 but the config says r=3"):
        load_peft_adapter(sd, d)


@torch.no_grad()
def test_slots_capacity_and_eviction(llama):
    base, peft_model, sds = llama
    pm = patch_model(base, num_slots=2, max_rank=8)
    try:
        for n in SPECS:
            pm.register_user(n, *sds[n])
        ids, mask = left_padded_batch([4, 5, 3], 128, seed=5)
        with pytest.raises(RuntimeError, match="3 distinct adapters but the store has 2 slots"):
            pm(ids, attention_mask=mask, users=["a0", "a1", "a2"])
        # cycling through 3 adapters with 2 slots evicts and reloads; results stay exact
        for users in (["a0", "a1", None], ["a2", None, "a0"], ["a1", "a2", "a1"]):
            ours = pm(ids, attention_mask=mask, users=users).logits
            ref = peft_model(input_ids=ids, attention_mask=mask, adapter_names=[u or "__base__" for u in users]).logits
            valid = mask.bool()
            assert_close(ours[valid], ref[valid], torch.float32, scale=float(ref.abs().max()), msg=str(users))
        assert pm.store.loads >= 4
    finally:
        pm.unpatch()


@torch.no_grad()
def test_unpatch_restores_model(llama):
    base, _, sds = llama
    ids, mask = left_padded_batch([4, 6], 128, seed=6)
    before = base(input_ids=ids, attention_mask=mask).logits
    originals = {n: m for n, m in base.named_modules()}
    pm = patch_model(base, num_slots=2, max_rank=8)
    assert sum(isinstance(m, MultiLoRALinear) for m in base.modules()) == 2 * 7
    with pytest.raises(PatchError, match="already patched"):
        patch_model(base)
    pm.register_user("a0", *sds["a0"])
    assert not torch.equal(pm(ids, attention_mask=mask, users=["a0", "a0"]).logits, before)
    assert_bitwise_equal(pm(ids, attention_mask=mask, users=[None, None]).logits, before, msg="users=[None, None]")
    assert_bitwise_equal(pm(ids, attention_mask=mask).logits, before, msg="users=None")
    unpatch_model(base)
    assert not any(isinstance(m, MultiLoRALinear) for m in base.modules())
    assert all(originals[n] is m for n, m in base.named_modules())
    assert_bitwise_equal(base(input_ids=ids, attention_mask=mask).logits, before, msg="after unpatch")
    with pytest.raises(PatchError, match="not patched"):
        unpatch_model(base)


@torch.no_grad()
def test_generic_walker_for_unmapped_arch(llama, monkeypatch):
    base, peft_model, sds = llama
    monkeypatch.delitem(hf_targets.ARCH_TARGETS, "llama")
    pm = patch_model(base, num_slots=2, max_rank=8)
    try:
        assert "generic walker" in pm.how and len(pm.patched) == 14
        pm.register_user("a0", *sds["a0"])
        ids, mask = left_padded_batch([4, 6], 128, seed=6)
        ours = pm(ids, attention_mask=mask, users=["a0", None]).logits
        ref = peft_model(input_ids=ids, attention_mask=mask, adapter_names=["a0", "__base__"]).logits
        valid = mask.bool()
        assert_close(ours[valid], ref[valid], torch.float32, scale=float(ref.abs().max()))
    finally:
        pm.unpatch()


def test_unknown_layout_refused():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)

    with pytest.raises(PatchError, match="found no decoder layers"):
        patch_model(Odd())


def test_target_subset_and_unpatched_module(llama):
    base, _, sds = llama
    pm = patch_model(base, num_slots=2, max_rank=8, target_modules=["q_proj", "v_proj"])
    try:
        assert len(pm.patched) == 4
        pm.register_user("a1", *sds["a1"])
        with pytest.raises(AdapterError, match="not a patched target.*'o_proj'"):
            pm.register_user("a2", *sds["a2"])
    finally:
        pm.unpatch()


def test_rank_above_capacity(llama):
    base, _, sds = llama
    pm = patch_model(base, num_slots=2, max_rank=4)
    try:
        with pytest.raises(AdapterError, match="rank 8 .* max_rank=4"):
            pm.register_user("a2", *sds["a2"])
    finally:
        pm.unpatch()


@torch.no_grad()
def test_alpha_and_rank_pattern_match_peft(llama):
    """``alpha_pattern`` / ``rank_pattern`` (short and full-path keys) give each module PEFT's scale: the parsed
    scales and the logits of a mixed batch against PEFT's."""
    base, _, _ = llama
    spec = dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"v_proj": 2},
                alpha_pattern={"q_proj": 32, "model.layers.1.mlp.down_proj": 1, "v_proj": 6})
    peft_model, sds = peft_reference(base, {"pat": spec}, seed=4)
    sd, cfg = sds["pat"]
    mods = load_peft_adapter(sd, cfg).modules
    assert mods["model.layers.0.self_attn.q_proj"].scale == pytest.approx(32 / 4)
    assert mods["model.layers.1.mlp.down_proj"].scale == pytest.approx(1 / 4)
    assert mods["model.layers.0.mlp.down_proj"].scale == pytest.approx(8 / 4)
    assert mods["model.layers.1.self_attn.v_proj"].scale == pytest.approx(6 / 2)
    assert mods["model.layers.1.self_attn.o_proj"].scale == pytest.approx(8 / 4)
    pm = patch_model(base, num_slots=2, max_rank=8)
    try:
        pm.register_user("pat", sd, cfg)
        ids, mask = left_padded_batch([5, 3, 5], 128, seed=8)
        ours = pm(ids, attention_mask=mask, users=["pat", None, "pat"]).logits
        ref = peft_model(input_ids=ids, attention_mask=mask, adapter_names=["pat", "__base__", "pat"]).logits
        valid = mask.bool()
        assert_close(ours[valid], ref[valid], torch.float32, scale=float(ref.abs().max()))
    finally:
        pm.unpatch()


NEG_ZERO_CASES = [
    pytest.param("torch", "gather", False, None, id="torch-gather"),
    pytest.param("torch", "runs", False, None, id="torch-runs"),
    pytest.param("torch", "gather", True, None, id="torch-gather-fused_projections"),
    pytest.param("torch", "runs", True, None, id="torch-runs-fused_projections"),
    pytest.param("torch", "runs", False, torch.float64, id="torch-runs-float64_slots"),
    pytest.param("triton", "auto", False, None, id="triton", marks=pytest.mark.interpreter),
]


@pytest.mark.parametrize("backend,strategy,fuse,slot_dtype", NEG_ZERO_CASES)
@torch.no_grad()
def test_rows_without_user_keep_base_layer_output_bitwise(llama, backend, strategy, fuse, slot_dtype):
    """Every patched layer's output for rows without a user (and for padding positions of every row) is its base
    layer's output bit for bit, with -0.0 planted in that output (a "+ 0" would turn it into +0.0, which
    ``torch.equal`` and the logits cannot see). K = 2 (shared + own) and K = 1 users in the batch."""
    base, _, sds = llama
    pm = patch_model(base, num_slots=4, max_rank=8, fuse_projections=fuse, dtype=slot_dtype)
    pm.set_backend(backend, strategy=strategy)
    handles = []
    try:
        pm.add_adapter("shared", *sds["a0"])
        pm.register_user("alice", *sds["a2"], adapters=[("shared", 0.5)])
        pm.register_user("bob", *sds["a1"])
        seen = {}

        def plant(name):
            def hook(mod, args, out):
                out = out.clone()
                out[..., ::3] = -0.0
                seen[name] = [out.clone()]
                return out
            return hook

        def record(name):
            return lambda mod, args, out: seen[name].append(out.clone())

        for name, m in base.named_modules():
            if isinstance(m, MultiLoRALinear):
                handles.append(m.base_layer.register_forward_hook(plant(name)))
                handles.append(m.register_forward_hook(record(name)))
        users = ["alice", None, "bob", None]
        ids, mask = left_padded_batch([3, 4, 2, 1], 128, seed=9)
        pm(ids, attention_mask=mask, users=users)
        assert len(seen) == 14
        untouched = torch.tensor([u is None for u in users])[:, None] | (mask == 0)  # (B, S)
        changed = 0
        for name, (base_out, out) in seen.items():
            assert_bitwise_equal(out[untouched], base_out[untouched], msg=f"{name}: rows without a user / padding")
            changed += int((out[~untouched] != base_out[~untouched]).any())
        assert changed == 14, "every layer has an adapter of a user in the batch"
    finally:
        for h in handles:
            h.remove()
        pm.unpatch()


def test_hooks_on_wrapped_layers_still_fire(pm, llama):
    """The wrappers call the wrapped layer's forward directly only while it has no hooks: a forward hook on a base
    projection (and on a norm wrapped for fused steering) fires, and may change the output, as without patching;
    with the hook on k_proj (a grouped member) the group still serves every member correctly."""
    base, _, sds = llama
    pm.register_user("a0", *sds["a0"])
    ids, mask = left_padded_batch([4, 3], base.config.vocab_size, seed=3)
    with torch.no_grad():
        ref = pm(ids, attention_mask=mask, users=["a0", None]).logits
    layer = base.model.layers[0]
    fired = []

    def scale_k(mod, args, out):
        fired.append(type(mod).__name__)
        return out * 1.5

    k_base = layer.self_attn.k_proj.base_layer
    h = k_base.register_forward_hook(scale_k)
    norm = layer.post_attention_layernorm
    inner_norm = getattr(norm, "base", norm)
    h2 = inner_norm.register_forward_hook(lambda mod, args, out: fired.append("norm"))
    try:
        with torch.no_grad():
            hooked = pm(ids, attention_mask=mask, users=["a0", None]).logits
    finally:
        h.remove()
        h2.remove()
    assert "Linear" in fired and "norm" in fired
    assert not torch.allclose(hooked, ref), "the base layer's hook did not change the output"
    with torch.no_grad():
        again = pm(ids, attention_mask=mask, users=["a0", None]).logits
    assert_bitwise_equal(again, ref)
