"""The patched layers' decode fast path (``pllm_kernels.ops.prepare_lora_apply``): from the second decode step of a
request on, a layer on the torch backend reuses its last call's prepared LoRA call (its dense plan) instead of the
full ``lora_apply`` path, as long as the routing and the slot buffers are the same tensors, unwritten.

Checked here: the path is taken under ``torch.inference_mode()`` (the serving mode: the routing is still made with
version counters), it gives the full path's bits, and slot buffers written in place between two steps of one
request (what the store does when it loads a slot) are seen by the very next step."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import pllm_kernels.modules.multi_lora as ml  # noqa: E402
from pllm_kernels.hf import patch_model  # noqa: E402
from pllm_kernels.testing import left_padded_batch, peft_reference, tiny_model  # noqa: E402

ROWS = 4


@pytest.fixture(scope="module")
def patched():
    base = tiny_model("llama", seed=7, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    specs = {f"u{i}": dict(r=4 if i % 2 else 8, lora_alpha=8, target_modules="all-linear") for i in range(ROWS)}
    _, sds = peft_reference(base, specs, seed=3)
    pm = patch_model(base, num_slots=ROWS, max_rank=8, backend="torch")
    for u, (sd, cfg) in sds.items():
        pm.register_user(u, sd, cfg)
    ids, mask = left_padded_batch([6 - i % 3 for i in range(ROWS)], base.config.vocab_size, seed=4)
    yield pm, ids, mask, list(specs)
    pm.unpatch()


def _decode(pm, ids, mask, users, steps, between=None):
    """Prefill, then ``steps`` greedy decode steps of one request under inference_mode; the logits of each step.
    ``between(i)`` runs before decode step ``i``."""
    out_logits = []
    with torch.inference_mode(), pm.users(users):
        out = pm.model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        m = mask
        for i in range(steps):
            if between is not None:
                between(i)
            m = torch.cat([m, torch.ones(ROWS, 1, dtype=m.dtype)], 1)
            out = pm.model(input_ids=nxt, attention_mask=m, past_key_values=cache, use_cache=True)
            out_logits.append(out.logits[:, -1].clone())
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return out_logits


def _full_path_calls(monkeypatch):
    calls = []
    real = ml.lora_apply
    monkeypatch.setattr(ml, "lora_apply", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_decode_steps_reuse_the_prepared_call_with_the_full_paths_bits(patched, monkeypatch):
    pm, ids, mask, users = patched
    fast_calls = _full_path_calls(monkeypatch)
    fast = _decode(pm, ids, mask, users, steps=4)
    per_step = len(fast_calls)
    monkeypatch.setattr(ml, "prepare_lora_apply", lambda *a, **k: None)  # every call takes the full path
    for layer in pm.patched.values():
        layer.__dict__.pop("_prepared", None)
        if layer.lora_group is not None:
            layer.lora_group[0]._prepared = None
    slow_calls = _full_path_calls(monkeypatch)
    slow = _decode(pm, ids, mask, users, steps=4)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)
    # 2 layers x (q/k/v group, o, gate/up group, down) = 8 LoRA calls per forward
    assert len(slow_calls) == 5 * 8
    assert per_step == 2 * 8, "decode steps after the first still took the full lora_apply path"


def _full_path_only(pm, monkeypatch):
    monkeypatch.setattr(ml, "prepare_lora_apply", lambda *a, **k: None)
    for layer in pm.patched.values():
        layer.__dict__.pop("_prepared", None)
        if layer.lora_group is not None:
            layer.lora_group[0]._prepared = None


def test_slot_writes_between_decode_steps_are_seen(patched, monkeypatch):
    """Every slot buffer of every target is written in place before decode step 2 of a request (as a slot reload
    by the store would): step 2 must give the bits of the same run on the full path, and differ from the run
    without the write."""
    pm, ids, mask, users = patched
    bufs = [*pm.store.buffers.values(), *pm.store.groups.values()]
    saved = [(b.lora_a.clone(), b.lora_b.clone(), b.slot_scales.clone()) for b in bufs]

    def rewrite(i):
        if i == 2:
            with torch.no_grad():
                for b in bufs:
                    b.lora_b.mul_(-1.5)
                    b.lora_a.add_(0.01)
                    b.slot_scales.mul_(2.0)

    def restore():
        with torch.no_grad():
            for b, (a, bb, s) in zip(bufs, saved):
                b.lora_a.copy_(a)
                b.lora_b.copy_(bb)
                b.slot_scales.copy_(s)

    calls = _full_path_calls(monkeypatch)
    try:
        unwritten = _decode(pm, ids, mask, users, steps=3)
        fast = _decode(pm, ids, mask, users, steps=3, between=rewrite)
        restore()
        fast_calls = len(calls)
        _full_path_only(pm, monkeypatch)
        full = _decode(pm, ids, mask, users, steps=3, between=rewrite)
    finally:
        restore()
    assert fast_calls < 2 * 3 * 8, "the fast path was not taken"
    for i in range(2):
        assert torch.equal(fast[i], unwritten[i])
    assert torch.equal(fast[2], full[2]), "step 2 did not see the buffers written before it"
    assert not torch.allclose(full[2], unwritten[2], atol=1e-3)
