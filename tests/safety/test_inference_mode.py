"""``torch.inference_mode()`` (the mode serving code runs in) for the three ops and for patched forward / generate,
on every backend that runs on CPU (torch: both strategies; Triton under the interpreter)."""

from __future__ import annotations

import pytest
import torch
from lora_cases import make_case
from utils import assert_close

from pllm_kernels.ops import lora as ops
from pllm_kernels.reference.lora import lora_apply_ref

BACKENDS = [("torch", "gather"), ("torch", "runs"), ("torch", "dense"),
            pytest.param(("triton", "auto"), marks=pytest.mark.interpreter)]


def _ref(c):
    return lora_apply_ref(c.y.double().clone(), c.x.double(), c.lora_a.double(), c.lora_b.double(), c.token_slots,
                          c.token_weights, c.slot_ranks, c.slot_scales, c.slice_sizes)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: "-".join(b))
def test_ops_under_inference_mode(backend):
    name, strategy = backend
    with torch.inference_mode():
        c = make_case(T=9, h_in=32, slice_sizes=(24, 8), ranks=(8, 4, 1), max_rank=8, K=2, seed=3)
        expected = _ref(c)
        y = c.y.clone()
        ops.lora_apply(y, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes, backend=name,
                       strategy=strategy)
        assert_close(y, expected, torch.float32)
        # twice: the per-forward host memo must hit (and stay right) on inference tensors
        y2 = c.y.clone()
        ops.lora_apply(y2, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes, backend=name,
                       strategy=strategy)
        assert torch.equal(y, y2)
        v = ops.lora_shrink(c.x, c.lora_a, c.slot_ranks, c.meta, backend=name)
        y3 = c.y.clone()
        ops.lora_expand(y3, v, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes, backend=name)
        assert_close(y3, expected, torch.float32)


def test_memo_sees_in_place_change_of_inference_tensor():
    """Routing refilled in place under inference_mode (no version counter) must not reuse a stale plan."""
    with torch.inference_mode():
        c = make_case(T=6, h_in=16, slice_sizes=(8,), ranks=(4, 4), max_rank=4, none_frac=0.0, seed=4)
        y = c.y.clone()
        ops.lora_apply(y, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes,
                       backend="torch", strategy="runs")
        c.meta.token_slots.fill_(-1)  # every token now without adapter; the sorted order is stale but unused
        c.meta.seg_slot.fill_(-1)
        y2 = c.y.clone()
        ops.lora_apply(y2, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes,
                       backend="torch", strategy="runs")
        assert torch.equal(y2, c.y)


hf = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def patched():
    pytest.importorskip("peft")
    from pllm_kernels.hf import patch_model
    from pllm_kernels.testing import left_padded_batch, peft_reference, tiny_model

    base = tiny_model("llama", seed=3)
    specs = {"ua": dict(r=4, lora_alpha=8, target_modules="all-linear"),
             "ub": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])}
    _, sds = peft_reference(base, specs, seed=7)
    pm = patch_model(base, num_slots=4, max_rank=8)
    for name, (sd, cfg) in sds.items():
        pm.register_user(name, sd, cfg)
    ids, mask = left_padded_batch([5, 3, 4], 128, seed=2)
    yield pm, ids, mask
    pm.unpatch()


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: "-".join(b))
def test_forward_and_generate_under_inference_mode(patched, backend):
    pm, ids, mask = patched
    users = ["ua", None, "ub"]
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    pm.set_backend("torch", strategy="runs")
    with torch.no_grad():
        ref_logits = pm(ids, attention_mask=mask, users=users).logits
        ref_tokens = pm.generate(ids, attention_mask=mask, users=users, **kw)
    pm.set_backend(backend[0], strategy=backend[1])
    try:
        with torch.inference_mode():
            logits = pm(ids, attention_mask=mask, users=users).logits
            tokens = pm.generate(ids, attention_mask=mask, users=users, **kw)
    finally:
        pm.set_backend(None)
    assert_close(logits, ref_logits, torch.float32, scale=float(ref_logits.abs().max()))
    assert torch.equal(tokens, ref_tokens)
    assert pm.store.in_flight == 0
