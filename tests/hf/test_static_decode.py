"""Static decoding (``pm.generate(..., decode="static" | "graph" | "compile")``) and the eager path's decode-step
routing reuse.

CPU: the static loop (StaticCache, fixed input / routing buffers refilled in place) gives eager ``generate``'s
greedy tokens for a mixed batch (K=2 users, a row without a user, left padding), also across calls with other
users reusing the same buffers; ``torch.compile`` of the static step too; HF-style sampling draws the same tokens
as eager ``generate`` for the same seed; rows without a user are the base model; unsupported arguments are refused
by name. The eager path builds a call's decode routing once and its logits are bit-for-bit those of a rebuild every
step. GPU: the decode step captured as a CUDA graph and replayed while the users change.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from utils import assert_bitwise_equal  # noqa: E402

from pllm_kernels.batch import ForwardContext, LoRAMetaBuffers, PersonalBatch  # noqa: E402
from pllm_kernels.hf import patch_model  # noqa: E402
from pllm_kernels.testing import left_padded_batch, peft_reference, tiny_model  # noqa: E402

SPECS = {
    "a0": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "a1": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "a2": dict(r=2, lora_alpha=3, target_modules=["k_proj", "o_proj", "up_proj"], layers_to_transform=[1]),
    "a3": dict(r=4, lora_alpha=4, target_modules=["gate_proj", "down_proj"]),
}
LENGTHS = [5, 7, 3, 6]  # left padded to 7
USERS_A = ["u1", "u2", None, "u3"]
USERS_B = ["u3", None, "u1", "u2"]
GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


def _build(device="cpu", dtype=torch.float32):
    base = tiny_model("llama", seed=3, dtype=dtype)
    _, sds = peft_reference(base, SPECS, seed=7)
    base = base.to(device)
    pm = patch_model(base, num_slots=4, max_rank=8)
    for name, (sd, cfg) in sds.items():
        pm.add_adapter(name, sd, cfg)
    pm.add_user("u1", [("a0", 0.5), ("a1", 1.0)])  # K = 2: shared + personal
    pm.add_user("u2", [("a2", 1.0)])
    pm.add_user("u3", [("a1", 0.7), ("a3", 0.3)])
    ids, mask = left_padded_batch(LENGTHS, base.config.vocab_size, seed=11, device=device)
    return pm, ids, mask


@pytest.fixture(scope="module")
def served():
    pm, ids, mask = _build()
    yield pm, ids, mask
    pm.unpatch()


def _gen(pm, ids, mask, users, decode="eager", **kw):
    with torch.inference_mode():
        return pm.generate(ids, attention_mask=mask, users=users, decode=decode, **{**GREEDY, **kw})


# ------------------------------------------------------------------------------------------------ static
def test_static_greedy_matches_eager_across_calls_with_other_users(served):
    pm, ids, mask = served
    pm.clear_static_decode()
    for users in (USERS_A, USERS_B, USERS_A):
        ref = _gen(pm, ids, mask, users)
        got = _gen(pm, ids, mask, users, "static")
        assert torch.equal(got, ref), f"users {users}: static tokens differ\n{got}\n{ref}"
    # the adapters matter (else the comparison proves nothing), and the same buffers served every call
    assert not torch.equal(_gen(pm, ids, mask, USERS_A), _gen(pm, ids, mask, [None] * 4))
    assert pm.static_decode_stats()["runners"] == 1


def test_static_rows_without_user_are_the_base_model(served):
    pm, ids, mask = served
    base = _gen(pm, ids, mask, None)  # eager, every row the base model
    assert torch.equal(_gen(pm, ids, mask, None, "static"), base)
    assert torch.equal(_gen(pm, ids, mask, [None] * 4, "static"), base)
    got = _gen(pm, ids, mask, USERS_A, "static")
    assert torch.equal(got[2], base[2]), "the row without a user must decode as the base model"
    # logits: a row without a user gets the base model's bits in a personalized batch (prefill and decode steps)
    with torch.inference_mode():
        mixed = pm.generate(ids, attention_mask=mask, users=USERS_A, **GREEDY, output_logits=True,
                            return_dict_in_generate=True).logits
        alone = pm.generate(ids, attention_mask=mask, users=None, **GREEDY, output_logits=True,
                            return_dict_in_generate=True).logits
    for m, a in zip(mixed, alone):
        assert_bitwise_equal(m[2], a[2], msg="row without a user, eager")


def test_static_eos_stops_rows_like_generate(served):
    pm, ids, mask = served
    free = _gen(pm, ids, mask, USERS_A, max_new_tokens=8)
    eos = [int(free[0, -6]), int(free[3, -3])]  # tokens the rows do produce: rows stop at different steps
    ref = _gen(pm, ids, mask, USERS_A, max_new_tokens=8, eos_token_id=eos)
    got = _gen(pm, ids, mask, USERS_A, "static", max_new_tokens=8, eos_token_id=eos)
    assert torch.equal(got, ref), f"\n{got}\n{ref}"
    assert (ref == 0).any(), "some row must have stopped (padded with pad_token_id)"


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7, top_k=20, top_p=0.9), dict(top_k=0, min_p=0.05)])
def test_static_sampling_reproducible_and_like_generate(served, kw):
    pm, ids, mask = served
    kw = dict(do_sample=True, max_new_tokens=8, **kw)
    outs = []
    for decode in ("static", "static", "eager"):
        torch.manual_seed(1234)
        outs.append(_gen(pm, ids, mask, USERS_A, decode, **kw))
    assert torch.equal(outs[0], outs[1]), "same seed, different tokens"
    assert torch.equal(outs[0], outs[2]), f"HF's generate draws other tokens for the same seed\n{outs[0]}\n{outs[2]}"
    torch.manual_seed(99)
    assert not torch.equal(_gen(pm, ids, mask, USERS_A, "static", **kw), outs[0]), "the seed must matter"


def test_static_without_users_and_single_row(served):
    pm, ids, mask = served
    assert torch.equal(_gen(pm, ids[:1], mask[:1], ["u1"], "static"), _gen(pm, ids[:1], mask[:1], ["u1"]))
    assert torch.equal(_gen(pm, ids[1:2], mask[1:2], ["u3"], "static", max_new_tokens=58),
                       _gen(pm, ids[1:2], mask[1:2], ["u3"], max_new_tokens=58))  # 7 + 58: a cache of 128


def test_static_threads_get_their_own_buffers(served):
    """Concurrent static calls on one model: each call holds its own runner; every result equals eager."""
    pm, ids, mask = served
    refs = {i: _gen(pm, ids, mask, users) for i, users in enumerate((USERS_A, USERS_B))}
    errors, results = [], {}

    def work(i, users):
        try:
            for _ in range(3):
                results.setdefault(i, []).append(_gen(pm, ids, mask, users, "static"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, u)) for i, u in enumerate((USERS_A, USERS_B))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, outs in results.items():
        assert all(torch.equal(o, refs[i]) for o in outs)


def test_bad_arguments_refused_by_name(served):
    pm, ids, mask = served
    cases = [
        (dict(decode="fast"), r"decode must be one of 'eager', 'static', 'graph', 'compile', got 'fast'"),
        (dict(decode="graph"), r"decode='graph' captures CUDA graphs, but input_ids are on cpu"),
        (dict(decode="static", num_beams=2), r"does not support num_beams=2"),
        (dict(decode="static", repetition_penalty=1.3), r"does not support the generate argument\(s\) "
                                                         r"repetition_penalty: the static loop serves"),
        (dict(decode="static", output_scores=True, return_dict_in_generate=True),
         r"does not support the generate argument\(s\) output_scores, return_dict_in_generate"),
        (dict(decode="static", streamer=object(), logits_processor=[]),
         r"does not support the generate argument\(s\) logits_processor, streamer"),
        (dict(decode="static", use_cache=False), r"use_cache=False is not supported"),
        (dict(decode="compile", max_new_tokens=0), r"max_new_tokens must be an int >= 1"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            with torch.inference_mode():
                pm.generate(ids, attention_mask=mask, users=USERS_A, **{**GREEDY, **kw})
    gc = pm.model.generation_config  # behaviour set by the model's generation config is refused too
    gc.repetition_penalty = 1.3
    try:
        with pytest.raises(ValueError, match=r"does not support repetition_penalty=1.3 \(from the arguments or the "
                                             r"model's generation_config\)"):
            _gen(pm, ids, mask, USERS_A, "static")
    finally:
        gc.repetition_penalty = None
    right = torch.flip(mask, [1])  # right padding
    with pytest.raises(ValueError, match=r"decode='static' needs left padding"):
        _gen(pm, ids, right, USERS_A, "static")


def test_steering_and_soft_prompt_users_refused():
    pm, ids, mask = _build()
    hidden = pm.model.config.hidden_size
    pm.add_steering("s", 0, torch.randn(hidden))
    pm.add_soft_prompt("p", torch.randn(3, hidden) * 0.02)
    with pytest.raises(ValueError, match=r"decode='static' serves LoRA users only for now; users with steering "
                                         r"vectors \('s'\) need decode='eager'"):
        _gen(pm, ids, mask, ["s", None, "u1", None], "static")
    with pytest.raises(ValueError, match=r"soft prompts \('p'\)"):
        _gen(pm, ids, mask, ["p", None, "u1", None], "compile")
    # the refused calls released their slots: a LoRA-only call runs
    assert torch.equal(_gen(pm, ids, mask, USERS_A, "static"), _gen(pm, ids, mask, USERS_A))


def test_sliding_window_beyond_the_window_refused():
    base = tiny_model("gemma2", seed=3)  # sliding window 8
    pm = patch_model(base, num_slots=2, max_rank=4)
    ids, mask = left_padded_batch([3, 4], base.config.vocab_size, seed=1)
    within = _gen(pm, ids, mask, None, "static", max_new_tokens=4)  # 4 + 4 = 8 positions: within the window
    assert torch.equal(within, _gen(pm, ids, mask, None, max_new_tokens=4))
    with pytest.raises(ValueError, match=r"sliding-window layers \(window 8\) and this generation needs 9 positions"):
        _gen(pm, ids, mask, None, "static", max_new_tokens=5)


# ------------------------------------------------------------------------------------------------ compile
def test_compile_matches_eager_and_compiles_once(served):
    """decode="compile" on CPU (plain torch.compile of the static step, inductor): one compile for the bucket,
    eager's tokens for two calls with other users. 20-35 s on a busy 2-core CPU with a cold inductor cache."""
    from torch._dynamo.utils import counters

    pm, ids, mask = served
    before = pm.static_decode_stats()["compiles"]
    counters.clear()
    t0 = time.perf_counter()
    for users in (USERS_A, USERS_B):
        got = _gen(pm, ids, mask, users, "compile")
        assert torch.equal(got, _gen(pm, ids, mask, users)), f"users {users}: compiled tokens differ"
    assert pm.static_decode_stats()["compiles"] == before + 1, "one compiled step per bucket, reused across calls"
    # the whole decode step (every patched layer, the routing read from the pinned batch) is one graph
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    print(f"compile path, 2 calls incl. compilation: {time.perf_counter() - t0:.1f} s")


# ------------------------------------------------------------------------------------------------ eager reuse
def _force_rebuild(monkeypatch):
    orig = ForwardContext._decode_batch

    def rebuild(self, plan, rep):
        reuse = self._reuse.get()
        if reuse is not None:
            reuse.entries.clear()
        return orig(self, plan, rep)

    monkeypatch.setattr(ForwardContext, "_decode_batch", rebuild)


def test_eager_decode_routing_built_once_per_call_same_logits(served, monkeypatch):
    pm, ids, mask = served
    ctx = pm.context
    kw = dict(output_logits=True, return_dict_in_generate=True)

    def run(users):
        with torch.inference_mode():
            return pm.generate(ids, attention_mask=mask, users=users, **GREEDY, **kw)

    b0, r0 = ctx.builds, ctx.routing_builds
    reused = run(USERS_A)
    n_forwards = reused.sequences.shape[1] - ids.shape[1]
    assert ctx.builds - b0 == n_forwards, "one PersonalBatch per forward"
    assert ctx.routing_builds - r0 == 2, "routing built for the prefill and once for all decode steps"
    other = run(USERS_B)  # the next call builds its own (nothing kept across calls)
    assert ctx.routing_builds - r0 == 4
    with monkeypatch.context() as m:
        _force_rebuild(m)
        r1 = ctx.routing_builds
        rebuilt = run(USERS_A)
        assert ctx.routing_builds - r1 == n_forwards
    assert torch.equal(reused.sequences, rebuilt.sequences)
    for a, b in zip(reused.logits, rebuilt.logits):
        assert_bitwise_equal(a, b, msg="decode-step logits with the reused routing")
    assert not torch.equal(other.sequences, reused.sequences)


def test_pinned_batch_fresh_scratch_and_layout_check():
    ctx = ForwardContext(4)
    bufs = LoRAMetaBuffers(num_tokens=3, k=2, num_slots=4, device="cpu")
    pinned = PersonalBatch(lora=bufs.meta, lora_slots=None)
    with ctx.pinned(pinned, 3, 1):
        seen = []
        for _ in range(2):
            ctx.begin(3, 1)
            b = ctx.batch
            assert b is not pinned and b.lora is pinned.lora and b.lora_slots is None
            b.scratch["x"] = 1
            seen.append(b.scratch)
            ctx.end()
        assert seen[0] is not seen[1] and not pinned.scratch, "every forward must get a fresh scratch"
        with pytest.raises(RuntimeError, match=r"routes a \(3, 1\) token layout but the forward has \(3, 5\)"):
            ctx.begin(3, 5)
    assert ctx.pinned_batch is None and ctx.batch is None


# ------------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
def test_graph_capture_replayed_while_users_change():
    """decode="graph": the decode step is captured once for the bucket (4 rows) and replayed across steps and across
    calls whose users change (routing is data: the buffers are refilled, the graph replayed); tokens equal eager
    generate's, rows without a user the base model's."""
    pm, ids, mask = _build("cuda")
    pm.set_backend("auto")
    calls = [USERS_A, USERS_B, USERS_A, [None] * 4]
    refs = [_gen(pm, ids, mask, users) for users in calls]
    for users, ref in zip(calls, refs):
        got = _gen(pm, ids, mask, users, "graph")
        assert torch.equal(got, ref), f"users {users}: graph tokens differ\n{got}\n{ref}"
    stats = pm.static_decode_stats()
    assert stats["captures"] == 1, f"one capture for the bucket, replayed afterwards: {stats}"
    assert stats["replays"] >= len(calls) * (GREEDY["max_new_tokens"] - 1) - (GREEDY["max_new_tokens"] - 1)
    # 3 rows share the 4-row bucket (a padding row routed to no adapter); 5 rows take the 8-row bucket
    assert torch.equal(_gen(pm, ids[:3], mask[:3], USERS_B[:3], "graph"), _gen(pm, ids[:3], mask[:3], USERS_B[:3]))
    assert pm.static_decode_stats()["captures"] == 1
    five = torch.cat([ids, ids[:1]]), torch.cat([mask, mask[:1]])
    assert torch.equal(_gen(pm, *five, USERS_A + ["u2"], "graph"), _gen(pm, *five, USERS_A + ["u2"]))
    assert pm.static_decode_stats()["captures"] == 2
    pm.unpatch()


@pytest.mark.gpu
def test_compile_reduce_overhead_cuda():
    pm, ids, mask = _build("cuda")
    pm.set_backend("auto")
    for users in (USERS_A, USERS_B):
        assert torch.equal(_gen(pm, ids, mask, users, "compile"), _gen(pm, ids, mask, users))
    assert pm.static_decode_stats()["compiles"] == 1
    pm.unpatch()
