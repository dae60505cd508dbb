"""Concurrent calls on one patched model (issue "one personalization plan per forward", defect 1).

Contract (README, ``pllm_kernels.hf.patch``): each call's plan and per-forward batch are private to its thread,
slot acquisition is atomic, slots pinned by a call in flight are never evicted, and a call that cannot get slots
waits up to ``busy_timeout`` then raises ``SlotsBusyError``. Stress: 2 and 4 threads, random mixed batches of 8
users served from 4 slots (more users than slots), forward and greedy generate, under ``inference_mode``: every row
must equal that user's row computed alone (two users also carry steering vectors), and the store must be consistent
afterwards.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from utils import assert_close  # noqa: E402

from pllm_kernels.hf import patch_model  # noqa: E402
from pllm_kernels.store import SlotsBusyError  # noqa: E402
from pllm_kernels.testing import peft_reference, tiny_model  # noqa: E402

USERS = [f"u{i}" for i in range(8)]
PROMPT = torch.tensor([[5, 17, 42, 9, 77, 3]])
NEW = 3


@pytest.fixture(scope="module")
def served():
    base = tiny_model("llama", seed=11)
    specs = {u: dict(r=4, lora_alpha=8 + i, target_modules="all-linear") for i, u in enumerate(USERS)}
    _, sds = peft_reference(base, specs, seed=3)
    pm = patch_model(base, num_slots=4, max_rank=8)
    for u in USERS[:6]:
        pm.register_user(u, *sds[u])
    pm.add_adapter("shared", *sds["u6"])
    pm.register_user("u6", *sds["u7"], adapter_name="own6", adapters=[("shared", 0.5)])  # K = 2
    pm.add_user("u7", [("shared", 1.0)])
    g = torch.Generator().manual_seed(4)
    pm.add_steering("u3", 1, torch.randn(64, generator=g), scale=3.0)  # LoRA + steering
    pm.add_steering("u5", 0, torch.randn(64, generator=g), scale=-2.0, mode="norm_preserve")
    expected = {}
    with torch.inference_mode():
        for u in [*USERS, None]:
            expected[u] = (pm(PROMPT, users=[u]).logits[0],
                           pm.generate(PROMPT, users=[u], max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0])
    # the adapters must matter and differ, else the test proves nothing
    for u in USERS:
        assert (expected[u][0] - expected[None][0]).abs().max() > 1e-2
    yield pm, expected
    pm.unpatch()


def _worker(pm, expected, seed, iters, errors):
    rng = random.Random(seed)
    try:
        with torch.inference_mode():
            for _ in range(iters):
                users = [rng.choice([*USERS, None]) for _ in range(3)]
                ids = PROMPT.expand(len(users), -1)
                if rng.random() < 0.25:
                    out = pm.generate(ids, users=users, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
                    for b, u in enumerate(users):
                        if not torch.equal(out[b], expected[u][1]):
                            errors.append(f"generate row {b} ({u}): {out[b].tolist()} != {expected[u][1].tolist()}")
                    continue
                logits = pm(ids, users=users).logits
                for b, u in enumerate(users):
                    ref = expected[u][0]
                    if not torch.allclose(logits[b], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max())):
                        errors.append(f"forward row {b} ({u}) of {users}: max diff "
                                      f"{float((logits[b] - ref).abs().max()):.3g}")
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append(f"{type(e).__name__}: {e}")


@pytest.mark.parametrize("threads", [2, 4])
def test_threads_mixed_users_more_users_than_slots(served, threads):
    pm, expected = served
    errors: list[str] = []
    loads = pm.store.loads
    workers = [threading.Thread(target=_worker, args=(pm, expected, 100 * threads + i, 25, errors))
               for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert not any(w.is_alive() for w in workers), "a worker hung"
    assert not errors, f"{len(errors)} wrong results / errors, e.g. {errors[:3]}"
    assert pm.store.loads > loads, "9 adapters on 4 slots: the stress must evict"
    pm.store.check_consistent()
    assert pm.store.in_flight == 0
    # later single-threaded calls are right for every user
    with torch.inference_mode():
        for u in USERS:
            assert_close(pm(PROMPT, users=[u]).logits[0], expected[u][0], torch.float32,
                         scale=float(expected[u][0].abs().max()), msg=u)


def test_pinned_slots_are_not_evicted_and_busy_is_refused(served):
    pm, expected = served
    store = pm.store
    old = store.busy_timeout
    store.busy_timeout = 0.0
    try:
        with pm.users(["u0", "u1", "u2", "u3"]):  # pins all 4 slots, as a call in flight does
            slots = dict(store._slot_of)
            t0 = time.monotonic()
            with pytest.raises(SlotsBusyError, match="pinned by requests in flight"):
                pm(PROMPT, users=["u4"])
            assert time.monotonic() - t0 < 1.0, "refused at once with busy_timeout=0"
            assert {n: store._slot_of[n] for n in ("u0", "u1", "u2", "u3")} == {
                n: slots[n] for n in ("u0", "u1", "u2", "u3")}
            # the users already resident are served next to the pinned ones (shared pins)
            with torch.inference_mode():
                out = pm(PROMPT.expand(2, -1), users=["u1", "u3"]).logits
            assert_close(out[0], expected["u1"][0], torch.float32, scale=float(expected["u1"][0].abs().max()))
        assert store.in_flight == 0
        # with a timeout, a call waits for the slots to be released
        store.busy_timeout = 10.0
        pinned = threading.Event()

        def hold():
            with pm.users(["u0", "u1", "u2", "u3"]):
                pinned.set()
                time.sleep(0.3)

        holder = threading.Thread(target=hold)
        holder.start()
        assert pinned.wait(10)
        t0 = time.monotonic()
        with torch.inference_mode():
            out = pm(PROMPT, users=["u5"]).logits[0]
        assert time.monotonic() - t0 > 0.1, "the call should have waited for the pinned slots"
        holder.join()
        assert_close(out, expected["u5"][0], torch.float32, scale=float(expected["u5"][0].abs().max()))
    finally:
        store.busy_timeout = old
    store.check_consistent()
    assert store.in_flight == 0


def test_adapter_in_use_cannot_be_replaced(served):
    from pllm_kernels.store import AdapterInUseError

    pm, _ = served
    sd, cfg = None, None
    ad = pm.store.adapters["u0"]
    with pm.users(["u0"]):
        with pytest.raises(AdapterInUseError, match="in flight"):
            pm.store.add_adapter("u0", ad, replace=True)
        with pytest.raises(AdapterInUseError, match="in flight"):
            pm.store.remove_user("u0")
    assert "u0" in pm.store.users and sd is None and cfg is None
    pm.store.check_consistent()
