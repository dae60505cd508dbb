"""The adapter slot buffers follow the patched model: ``model.to(dtype)`` / ``.half()`` / ``.bfloat16()`` /
``.to("meta")`` / ``.to_empty()`` / ``.cuda()`` move and cast them (ranks int32 and scales float32 kept, grouped
targets still views of their group), slot loading after the move writes into the moved buffers, ``state_dict``
keys are the unpatched model's, and a forward on another device than the buffers fails with a clear error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("peft")

from utils import assert_close  # noqa: E402

from pllm_kernels.batch import ForwardContext, resolve_plan  # noqa: E402
from pllm_kernels.hf import patch_model  # noqa: E402
from pllm_kernels.modules import MultiLoRALinear  # noqa: E402
from pllm_kernels.store import AdapterStore, LoRAAdapter, LoRAModuleWeights, TargetSpec  # noqa: E402
from pllm_kernels.testing import left_padded_batch, peft_reference, tiny_model  # noqa: E402

# Scales (2, 1.5, 6/sqrt(4) = 3) exact in float32: slot_scales are float32 by the ops' spec, so float64 is checked
# at its own tolerance only with such scales (PEFT multiplies by the Python float).
SPECS = {
    "u0": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "u1": dict(r=8, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"]),
    "u2": dict(r=4, lora_alpha=6, target_modules=["k_proj", "o_proj", "up_proj"], layers_to_transform=[1],
               use_rslora=True),
}
# Equal lengths: transformers' eager attention gives NaN for left-padded rows in float64 (the base model alone).
LENGTHS = [6, 6, 6]


def _setup(num_slots=2, **patch_kw):
    base = tiny_model("llama", seed=3)
    peft_model, sds = peft_reference(base, SPECS, seed=7)
    pm = patch_model(base, num_slots=num_slots, max_rank=8, **patch_kw)
    return base, peft_model, sds, pm


def _compare(pm, peft_model, users, dtype, msg=""):
    ids, mask = left_padded_batch(LENGTHS, 128, seed=11, device=pm.store.device)
    ours = pm(ids, attention_mask=mask, users=users).logits
    ref = peft_model(input_ids=ids, attention_mask=mask, adapter_names=[u or "__base__" for u in users]).logits
    base = pm(ids, attention_mask=mask).logits
    assert (ref - base).abs().max() > 1e-2, "the adapters must matter, else the comparison proves nothing"
    assert ours.dtype == dtype
    assert_close(ours.float(), ref.float(), dtype, scale=float(ref.float().abs().max()), msg=msg)


def _snapshot(store):
    return {n: (b.lora_a.clone(), b.lora_b.clone(), b.slot_ranks.clone(), b.slot_scales.clone())
            for n, b in store.buffers.items()}


def _check_placement(store, device, dtype):
    """Every slot tensor on ``device``; weights in ``dtype``, ranks int32, scales float32; group members are views
    of their group's tensors (same memory: a write through the group shows in the member)."""
    device = torch.device(device)
    assert store.device == device and store.dtype == dtype
    tensors = [*store.buffers.values(), *store.groups.values()]
    for b in tensors:
        assert b.lora_a.device == device and b.lora_b.device == device
        assert b.slot_ranks.device == device and b.slot_scales.device == device
        assert b.lora_a.dtype == dtype and b.lora_b.dtype == dtype
        assert b.slot_ranks.dtype == torch.int32 and b.slot_scales.dtype == torch.float32
    assert store.groups, "the Llama patch groups q/k/v and gate/up"
    for name, (g, i) in store.group_of.items():
        buf = store.buffers[name]
        va, vb = g.member_views(i)
        assert buf.lora_a._base is g.lora_a and buf.lora_b._base is g.lora_b, f"{name}: not a view of its group"
        if device.type != "meta":
            assert buf.lora_a.data_ptr() == va.data_ptr() and buf.lora_b.data_ptr() == vb.data_ptr(), name
            assert buf.lora_a.untyped_storage().data_ptr() == g.lora_a.untyped_storage().data_ptr(), name


# ------------------------------------------------------------------------------------------------ state_dict
@torch.no_grad()
def test_state_dict_keys_unchanged_by_patching():
    base = tiny_model("llama", seed=3)
    sd0 = base.state_dict()
    meta0 = dict(sd0._metadata)
    pm = patch_model(base, num_slots=2, max_rank=8)
    try:
        sd1 = base.state_dict()
        assert list(sd1) == list(sd0), "patching changed the state_dict keys (or their order)"
        assert all(torch.equal(sd1[k], sd0[k]) for k in sd0)
        assert not [k for k in sd1 if "lora" in k or "slot" in k], "adapter slot tensors leaked into state_dict"
        assert sorted(sd1._metadata) == sorted(meta0)
        # the unpatched model's checkpoint loads strictly into the patched model, and the other way round
        changed = {k: v + 1 for k, v in sd0.items()}
        base.load_state_dict(changed, strict=True)
        assert torch.equal(base.model.layers[0].self_attn.q_proj.base_layer.weight,
                           changed["model.layers.0.self_attn.q_proj.weight"])
        plain = tiny_model("llama", seed=4)
        plain.load_state_dict(base.state_dict(), strict=True)
        assert torch.equal(plain.model.layers[1].mlp.up_proj.weight, changed["model.layers.1.mlp.up_proj.weight"])
        # keys written by a patched model before this hook existed (".base_layer.") still load
        old = {k.replace("q_proj.", "q_proj.base_layer."): v for k, v in sd0.items()}
        base.load_state_dict(old, strict=True)
        assert torch.equal(base.model.layers[0].self_attn.q_proj.base_layer.weight,
                           sd0["model.layers.0.self_attn.q_proj.weight"])
    finally:
        pm.unpatch()
    assert list(base.state_dict()) == list(sd0)
    assert not any(isinstance(m, MultiLoRALinear) for m in base.modules())


# ---------------------------------------------------------------------------------------------- dtype moves
@pytest.mark.parametrize("convert,dtype", [
    (lambda m: m.to(torch.float64), torch.float64),
    (lambda m: m.to(dtype=torch.bfloat16), torch.bfloat16),
    (lambda m: m.bfloat16(), torch.bfloat16),
    (lambda m: m.half(), torch.float16),
    (lambda m: m.double(), torch.float64),
], ids=["to-float64", "to-dtype-bfloat16", "bfloat16()", "half()", "double()"])
@torch.no_grad()
def test_model_dtype_move_follows(convert, dtype):
    base, peft_model, sds, pm = _setup(num_slots=2)
    for n in ("u0", "u1"):
        pm.register_user(n, *sds[n])
    ids, mask = left_padded_batch(LENGTHS, 128, seed=11)
    pm(ids, attention_mask=mask, users=["u0", "u1", None])  # u0, u1 resident before the move
    scales = {n: b.slot_scales.clone() for n, b in pm.store.buffers.items()}
    loads = pm.store.loads
    convert(base)
    convert(peft_model)
    _check_placement(pm.store, "cpu", dtype)
    assert pm.store.loads == loads, "moving is not a cache miss"
    for n, b in pm.store.buffers.items():
        assert torch.equal(b.slot_scales, scales[n]), f"{n}: scales changed by the move"
    # the resident adapters, moved
    _compare(pm, peft_model, ["u0", None, "u1"], dtype, msg=f"resident after move to {dtype}")
    assert pm.store.loads == loads
    # a user registered after the move: loaded (evicting u1) into the moved buffers
    pm.register_user("u2", *sds["u2"])
    _compare(pm, peft_model, ["u2", "u0", None], dtype, msg=f"loaded after move to {dtype}")
    assert pm.store.loads == loads + 1
    _check_placement(pm.store, "cpu", dtype)
    pm.unpatch()


@torch.no_grad()
def test_half_then_float_keeps_adapter_values():
    """A dtype change reloads the resident adapters from their host copies: fp32 -> fp16 -> fp32 is exact."""
    base, _, sds, pm = _setup(num_slots=2)
    pm.register_user("u1", *sds["u1"])
    pm.store.acquire(["u1"])
    before = _snapshot(pm.store)
    base.half()
    assert pm.store.dtype == torch.float16
    base.float()
    _check_placement(pm.store, "cpu", torch.float32)
    after = _snapshot(pm.store)
    for n in before:
        assert all(torch.equal(x, y) for x, y in zip(before[n], after[n])), f"{n}: values changed"
    pm.unpatch()


@torch.no_grad()
def test_slot_dtype_other_than_model():
    """patch_model(dtype=...) different from the model's weights: the LoRA part runs in the slot dtype."""
    base, peft_model, sds, pm = _setup(num_slots=2, dtype=torch.float64)
    assert pm.store.dtype == torch.float64
    pm.register_user("u0", *sds["u0"])
    pm.register_user("u1", *sds["u1"])
    _compare(pm, peft_model, ["u0", None, "u1"], torch.float32)
    base.to("cpu")  # a device-only move keeps the slot dtype
    assert pm.store.dtype == torch.float64
    base.to(torch.float32)  # a dtype move casts every floating tensor, as nn.Module does, the slot buffers too
    _check_placement(pm.store, "cpu", torch.float32)
    _compare(pm, peft_model, ["u1", "u0", None], torch.float32)
    pm.unpatch()


# ------------------------------------------------------------------------------------------- device moves
@torch.no_grad()
def test_meta_and_to_empty_round_trip():
    """cpu -> meta -> to_empty(cpu) + load_state_dict: the buffers follow, then the resident adapters come back."""
    base, peft_model, sds, pm = _setup(num_slots=2)
    pm.register_user("u0", *sds["u0"])
    pm.register_user("u1", *sds["u1"])
    pm.store.acquire(["u0", "u1"])
    sd = base.state_dict()
    non_persistent = {n: b.clone() for n, b in base.named_buffers() if n not in sd}  # rotary inv_freq
    base.to("meta")
    _check_placement(pm.store, "meta", torch.float32)
    ids, mask = left_padded_batch(LENGTHS, 128, seed=11)
    with pytest.raises(RuntimeError, match=r"input_ids is on cpu but the adapter slot buffers are on meta"):
        pm(ids, attention_mask=mask, users=["u0", None, "u1"])
    base.to_empty(device="cpu")
    _check_placement(pm.store, "cpu", torch.float32)
    base.load_state_dict(sd, strict=True)
    for n, b in base.named_buffers():
        if n in non_persistent:
            b.copy_(non_persistent[n])
    loads = pm.store.loads
    _compare(pm, peft_model, ["u0", None, "u1"], torch.float32, msg="after meta -> to_empty")
    assert pm.store.loads == loads, "resident adapters were reloaded by the move, not by the forward"
    pm.unpatch()


def _tiny_store_and_layer(dtype=torch.float32):
    torch.manual_seed(0)
    specs = [TargetSpec("q", 8, 6), TargetSpec("k", 8, 4), TargetSpec("o", 6, 8)]
    store = AdapterStore(specs, num_slots=2, max_rank=4, dtype=dtype, groups=[["q", "k"]])
    mods = {s.name: LoRAModuleWeights(torch.randn(3, s.in_features), torch.randn(s.out_features, 3), 0.75)
            for s in specs}
    store.add_adapter("ad", LoRAAdapter("ad", mods))
    store.add_user("alice", "ad")
    ctx = ForwardContext(2)
    lin = nn.Linear(6, 8, dtype=dtype)
    layer = MultiLoRALinear(lin, store.buffers["o"], ctx, 6, 8, name="layers.0.o", on_apply=store.follow)
    return store, ctx, lin, layer, mods["o"]


@torch.no_grad()
def test_store_to_public_api():
    store, ctx, lin, layer, w = _tiny_store_and_layer()
    store.acquire(["ad"])
    before = _snapshot(store)
    g = store.groups["q+k"]
    a0 = store.buffers["o"].lora_a
    assert store.to() is store and store.to("cpu", torch.float32) is store
    assert store.buffers["o"].lora_a is a0, "a move to where the store is must not copy"
    assert store.to(dtype=torch.float64) is store
    assert store.dtype == torch.float64 and store.device == torch.device("cpu")
    assert g.lora_a.dtype == torch.float64 and store.buffers["q"].lora_a._base is g.lora_a
    assert store.buffers["q"].lora_a.data_ptr() == g.member_views(0)[0].data_ptr()
    assert store.buffers["k"].lora_b.data_ptr() == g.member_views(1)[1].data_ptr()
    for n, b in store.buffers.items():
        assert b.slot_ranks.dtype == torch.int32 and b.slot_scales.dtype == torch.float32
        assert torch.equal(b.slot_ranks, before[n][2]) and torch.equal(b.slot_scales, before[n][3])
        assert torch.allclose(b.lora_a.float(), before[n][0]) and torch.allclose(b.lora_b.float(), before[n][1])
    # the wrapped layer follows the model; the store is then in the model's dtype
    layer.to(torch.float32)
    assert store.dtype == torch.float32 and lin.weight.dtype == torch.float32
    with pytest.raises(TypeError, match="floating dtype"):
        store.to(dtype=torch.int32)
    # routing built after a move is on the store's device
    plan = resolve_plan(store, ["alice", None])
    assert plan.lora_slots.device == store.device and plan.lora_weights.device == store.device
    plan.release()


@torch.no_grad()
def test_layer_device_mismatch_error_names_x_and_devices():
    store, ctx, lin, layer, w = _tiny_store_and_layer()
    x = torch.randn(2, 3, 6)
    plan = resolve_plan(store, ["alice", None])
    with ctx.request(plan):
        ctx.begin(2, 3)
        y = layer(x)
        ref = lin(x)
        ref[0] += 0.75 * (x[0] @ w.a.T) @ w.b.T
        assert_close(y, ref, torch.float32, scale=float(ref.abs().max()))
        store.to("meta")
        with pytest.raises(RuntimeError, match=r"layers\.0\.o: the input x is on cpu but the adapter slot buffers "
                                               r"\(lora_a.*\) are on meta.*store\.to\('cpu'\)"):
            layer(x)
        ctx.end()


# ------------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@torch.no_grad()
def test_cuda_move_follows_model():
    """Patched on CPU, then model.cuda(): buffers on the GPU (views kept), parity with PEFT there, loading after the
    move, a clear error when the store alone is elsewhere, back to the CPU, and bf16 on the GPU."""
    base, peft_model, sds, pm = _setup(num_slots=2)
    try:
        pm.register_user("u0", *sds["u0"])
        pm.register_user("u1", *sds["u1"])
        pm.store.acquire(["u0", "u1"])
        base.cuda()
        peft_model.cuda()
        dev = torch.device("cuda", torch.cuda.current_device())
        _check_placement(pm.store, dev, torch.float32)
        _compare(pm, peft_model, ["u0", None, "u1"], torch.float32, msg="cuda fp32, resident")
        pm.register_user("u2", *sds["u2"])
        _compare(pm, peft_model, ["u2", "u0", None], torch.float32, msg="cuda fp32, loaded after the move")
        # the store alone moved away: a clear error naming the input and both devices; model.cuda() brings it back
        pm.store.to("cpu")
        ids, mask = left_padded_batch(LENGTHS, 128, seed=11, device="cuda")
        with pytest.raises(RuntimeError, match=r"input_ids is on cuda:\d+ but the adapter slot buffers are on cpu"):
            pm(ids, attention_mask=mask, users=["u0", None, "u1"])
        base.cuda()
        _check_placement(pm.store, dev, torch.float32)
        base.cpu()
        peft_model.cpu()
        _check_placement(pm.store, "cpu", torch.float32)
        _compare(pm, peft_model, ["u0", None, "u2"], torch.float32, msg="back on the cpu")
        base.to("cuda", torch.bfloat16)
        peft_model.to("cuda", torch.bfloat16)
        _check_placement(pm.store, dev, torch.bfloat16)
        _compare(pm, peft_model, ["u1", None, "u0"], torch.bfloat16, msg="cuda bf16")
    finally:
        pm.unpatch()
