"""Steering vectors and soft prompts as user assets: loading from the files steering-vectors / repeng / PEFT users
have, removal, slot tables with eviction, and bad input (clear errors, nothing registered changes)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from utils import assert_close  # noqa: E402

from pllm_kernels.hf import patch_model  # noqa: E402
from pllm_kernels.testing import tiny_model  # noqa: E402

H = 64  # tiny_model's hidden size


@pytest.fixture
def pm():
    p = patch_model(tiny_model("llama", seed=2), num_slots=2, max_rank=8, steer_slots=2)
    yield p
    p.unpatch()


def _snapshot(pm):
    return {u: ([(e.layer, e.scale, e.mode) for e in p.steering], p.soft_prompt) for u, p in pm.store.users.items()}


def test_vectors_from_files(pm, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    acts = {0: torch.randn(H, generator=g), 1: torch.randn(H, generator=g)}  # SteeringVector.layer_activations
    torch.save(acts, tmp_path / "sv.pt")
    save_file({"model.layers.1": acts[1].clone()}, str(tmp_path / "one.safetensors"))
    added = pm.add_steering("a", None, str(tmp_path / "sv.pt"), scale=0.5)
    assert [(e.layer, e.scale) for e in added] == [(0, 0.5), (1, 0.5)]
    assert torch.equal(added[1].vector, acts[1])
    (e,) = pm.add_steering("b", 1, str(tmp_path / "one.safetensors"))
    assert e.layer == 1 and torch.equal(e.vector, acts[1])
    (e,) = pm.add_steering("c", 0, acts)  # a dict in memory, one layer picked
    assert e.layer == 0
    with pytest.raises(ValueError, match="for layers \\[1\\], not 0"):
        pm.add_steering("b", 0, str(tmp_path / "one.safetensors"))

    torch.save({"x": _Pickled()}, tmp_path / "pickle.pt")
    with pytest.raises(Exception, match="weights_only"):
        pm.add_steering("d", 0, str(tmp_path / "pickle.pt"))
    assert "d" not in pm.store.users


class _Pickled:
    """An arbitrary pickled object: weights_only loading must refuse it."""


def test_soft_prompt_from_peft_prompt_tuning_dir(pm, tmp_path):
    base = tiny_model("llama", seed=2)
    tuned = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=3))
    tuned.save_pretrained(str(tmp_path))
    e = pm.add_soft_prompt("u", str(tmp_path))
    assert e.shape == (3, H)
    assert torch.allclose(e, tuned.get_prompt_embedding_to_save("default").float())


@pytest.mark.parametrize("args,match", [
    (dict(layer=2, vector=torch.randn(H)), "layer 2 is out of range: the model has 2 decoder layers"),
    (dict(layer=-1, vector=torch.randn(H)), "out of range"),
    (dict(layer=0, vector=torch.randn(H + 1)), "expected shape \\(64,\\)"),
    (dict(layer=0, vector=torch.randint(0, 3, (H,))), "not a floating dtype"),
    (dict(layer=0, vector=torch.randn(H, device="meta")), "meta"),
    (dict(layer=0, vector=torch.full((H,), float("inf"))), "non-finite"),
    (dict(layer=0, vector=torch.randn(H), scale=float("nan")), "scale must be finite"),
    (dict(layer=0, vector=torch.randn(H), mode="subtract"), "mode must be one of"),
    (dict(layer="0", vector=torch.randn(H)), "layer must be an int"),
])
def test_bad_vectors_refused_and_nothing_changes(pm, args, match):
    pm.add_steering("keep", 0, torch.randn(H), scale=2.0)
    before = _snapshot(pm)
    with pytest.raises(ValueError, match=match):
        pm.add_steering("keep", **args)
    with pytest.raises(ValueError, match=match):
        pm.add_steering("newcomer", **args)
    assert _snapshot(pm) == before


@torch.no_grad()
def test_remove_and_more_vectors_than_slots(pm):
    """steer_slots=2 per layer: 3 users with a layer-0 vector each are served (LRU reuse), batches of 2 at a time;
    removal restores the base output; a batch needing 3 slots at one layer is refused clearly."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (1, 5), generator=g)
    base_logits = pm(ids).logits[0]
    for u in ("x", "y", "z"):
        pm.add_steering(u, 0, torch.randn(H, generator=g), scale=3.0)
    single = {u: pm(ids, users=[u]).logits[0] for u in ("x", "y", "z")}
    for users in (["x", "z"], ["y", "x"], ["z", "y"]):
        out = pm(ids.expand(2, -1), users=users).logits
        for b, u in enumerate(users):
            assert_close(out[b], single[u], torch.float32, scale=float(single[u].abs().max()))
    with pytest.raises(RuntimeError, match="3 distinct steering vectors at layer 0 but the store has 2 slots"):
        pm(ids.expand(3, -1), users=["x", "y", "z"])
    pm.store.check_consistent()
    assert pm.remove_steering("x") == 1
    assert torch.equal(pm(ids, users=["x"]).logits[0], base_logits)
    pm.remove_user("y")
    pm.store.check_consistent()
    assert not [k for k in pm.store.inputs.entries if k[0] in ("x", "y")]
