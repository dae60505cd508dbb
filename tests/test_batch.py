"""PersonalBatch / LoRAMeta construction: sorting, counting, chunking, layouts, preallocated buffers."""

import pytest
import torch
from lora_cases import make_case
from utils import assert_bitwise_equal, assert_close, plant_negative_zeros

from pllm_kernels.batch import LoRAMetaBuffers, PersonalBatch, build_lora_meta, resolve_plan, tokens_from_rows
from pllm_kernels.ops import lora as ops
from pllm_kernels.reference.lora import lora_apply_ref
from pllm_kernels.store import AdapterStore
from pllm_kernels.store.adapter_store import TargetSpec


def check_meta(meta, token_slots):
    """Every valid pair appears in exactly one chunk of its k column, chunks are single-slot and <= chunk long."""
    T, K = token_slots.shape
    L, C = meta.num_slots, meta.chunk
    flat = token_slots.t().reshape(-1).tolist()
    seen = []
    for k in range(K):
        for g in range(meta.seg_slot.shape[1]):
            slot, start, n = (int(meta.seg_slot[k, g]), int(meta.seg_start[k, g]), int(meta.seg_len[k, g]))
            if slot < 0:
                assert n == 0
                continue
            assert 1 <= n <= C
            rows = meta.sorted_pairs[start : start + n].tolist()
            for p in rows:
                assert p // T == k and flat[p] == slot
            seen += rows
    expected = [p for p, s in enumerate(flat) if 0 <= s < L]
    assert sorted(seen) == expected
    # sorted_pairs is a permutation, stable within each (k, slot)
    assert sorted(meta.sorted_pairs.tolist()) == list(range(K * T))


@pytest.mark.parametrize("T,K,L,chunk", [(1, 1, 1, 16), (37, 1, 5, 4), (64, 2, 33, 16), (300, 2, 3, 64), (5, 3, 2, 2)])
def test_meta_random(T, K, L, chunk):
    g = torch.Generator().manual_seed(T * 7 + K)
    slots = torch.randint(-1, L, (T, K), generator=g)
    meta = build_lora_meta(slots, L, chunk=chunk)
    check_meta(meta, slots)
    # stability: pairs of one slot keep token order
    order = meta.sorted_pairs.tolist()
    flat = slots.t().reshape(-1).tolist()
    for s in range(L):
        ps = [p for p in order if flat[p] == s and p < T]
        assert ps == sorted(ps)


def test_all_none_and_out_of_range_routed_nowhere():
    slots = torch.tensor([[-1], [-1], [7], [-1]])
    meta = build_lora_meta(slots, 3, chunk=2)
    assert (meta.seg_len == 0).all() and (meta.seg_slot == -1).all()


def test_no_host_sync_ops_only():
    """Building must not call .item()/.tolist(): run it under a mode that fails on data-dependent host reads."""
    slots = torch.randint(-1, 4, (50, 2))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fslots = mode.from_tensor(slots)
        meta = build_lora_meta(fslots, 4, chunk=8)  # fake tensors have no data: any host read would raise
    assert meta.seg_slot.shape == (2, -(-50 // 8) + 4)


def test_preallocated_buffers_keep_addresses():
    buf = LoRAMetaBuffers(num_tokens=20, k=1, num_slots=4, device="cpu", chunk=8)
    ptrs = [t.data_ptr() for t in buf.meta[:6]]
    for seed in range(3):
        slots = torch.randint(-1, 4, (20, 1), generator=torch.Generator().manual_seed(seed))
        meta = buf.fill(slots)
        assert [t.data_ptr() for t in meta[:6]] == ptrs
        check_meta(meta, slots)
        fresh = build_lora_meta(slots, 4, chunk=8)
        for a, b in zip(meta[:6], fresh[:6]):
            assert torch.equal(a, b)


def test_tokens_from_rows_layouts():
    rows = torch.tensor([[0, 2], [1, -1], [-1, -1]])
    w = torch.tensor([[1.0, 0.5], [2.0, 0.0], [1.0, 1.0]])
    slots, weights = tokens_from_rows(rows, w, lengths=torch.tensor([2, 1, 3]), num_tokens=6)
    assert slots.tolist() == [[0, 2], [0, 2], [1, -1], [-1, -1], [-1, -1], [-1, -1]]
    assert weights[2].tolist() == [2.0, 0.0]
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]])
    slots, _ = tokens_from_rows(rows, attention_mask=mask)
    assert slots.shape == (9, 2) and slots[0].tolist() == [-1, -1] and slots[1].tolist() == [0, 2]
    pb = PersonalBatch.from_rows(torch.tensor([1, 0]), 2, seq_len=3)
    assert pb.lora.token_slots[:, 0].tolist() == [1, 1, 1, 0, 0, 0]


def test_errors_name_argument():
    with pytest.raises(ValueError, match="token_slots"):
        build_lora_meta(torch.zeros(3, 1), 2)
    with pytest.raises(ValueError, match="token_weights"):
        build_lora_meta(torch.zeros(3, 1, dtype=torch.int32), 2, torch.ones(3, 2))
    with pytest.raises(ValueError, match="num_tokens"):
        tokens_from_rows(torch.tensor([0]), lengths=torch.tensor([2]))


def test_meta_tensors_contiguous_for_strided_inputs():
    rows = torch.tensor([[0, 1], [1, -1], [2, 0]], dtype=torch.int32).t().contiguous().t()  # strided (3, 2)
    w = torch.rand(2, 3).t()
    meta = PersonalBatch.from_rows(rows, 3, w, seq_len=1).lora
    assert all(t.is_contiguous() for t in meta[:6])
    assert meta.token_weights.tolist() == w.tolist()


# ------------------------------------------------------------------------------ padded layout with seq_len > 1
@pytest.mark.parametrize("layout", ["seq_len", "mask", "packed"])
def test_row_weights_follow_their_rows_tokens(layout):
    """Every token of row b gets row b's K slots and weights (seq_len > 1, where per-row expansion and tiling the
    rows differ), masked positions get -1; and the op applies each row's weighted adapters to its tokens."""
    B, S, K, L = 4, 3, 2, 3
    rows = torch.tensor([[0, 2], [1, -1], [-1, -1], [2, 1]], dtype=torch.int32)
    w = torch.tensor([[0.25, 1.5], [2.0, 0.75], [3.0, 4.0], [0.5, 1.25]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1], [0, 1, 1]])
    lengths = torch.tensor([2, 3, 1, 2])
    if layout == "seq_len":
        kw, owner, live = dict(seq_len=S), [b for b in range(B) for _ in range(S)], [True] * (B * S)
    elif layout == "mask":
        kw = dict(attention_mask=mask)
        owner, live = [b for b in range(B) for _ in range(S)], mask.reshape(-1).bool().tolist()
    else:
        kw = dict(lengths=lengths, num_tokens=int(lengths.sum()))
        owner = [b for b in range(B) for _ in range(int(lengths[b]))]
        live = [True] * len(owner)
    T = len(owner)
    exp_slots = torch.stack([rows[b] if ok else torch.full((K,), -1, dtype=torch.int32)
                             for b, ok in zip(owner, live)])
    exp_w = w[owner]
    slots, weights = tokens_from_rows(rows, w, **kw)
    assert slots.tolist() == exp_slots.tolist()
    routed = exp_slots >= 0
    assert torch.equal(weights[routed], exp_w[routed])
    meta = PersonalBatch.from_rows(rows, L, w, **kw).lora
    assert meta.token_slots.tolist() == exp_slots.tolist()
    assert torch.equal(meta.token_weights[routed], exp_w[routed])
    check_meta(meta, exp_slots)
    # end to end: the op with this routing == the float64 reference with the per-token weights written out
    c = make_case(T=T, h_in=16, slice_sizes=(8, 4), ranks=(4, 2, 3), max_rank=4, slots=exp_slots, seed=5,
                  neg_zeros=True)
    y0 = c.y.clone()
    expected = lora_apply_ref(c.y.double().clone(), c.x.double(), c.lora_a.double(), c.lora_b.double(), exp_slots,
                              exp_w.double(), c.slot_ranks, c.slot_scales, c.slice_sizes)
    for strategy in ("gather", "runs", "dense"):
        y = y0.clone()
        ops.lora_apply(y, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, meta, c.slice_sizes,
                       backend="torch", strategy=strategy)
        assert_close(y, expected, torch.float32, msg=f"{layout}/{strategy}")
        untouched = ~routed.any(1)
        assert_bitwise_equal(y[untouched], y0[untouched], msg=f"{layout}/{strategy}: tokens without adapter")


# ------------------------------------------------------------------------------ store rows -> slots (resolve_plan)
def _tiny_store():
    store = AdapterStore([TargetSpec("proj", 8, 6)], num_slots=4, max_rank=4)
    g = torch.Generator().manual_seed(0)

    def adapter(r):
        sd = {"base_model.model.proj.lora_A.weight": torch.randn(r, 8, generator=g),
              "base_model.model.proj.lora_B.weight": torch.randn(6, r, generator=g)}
        return sd, {"r": r, "lora_alpha": 2 * r, "target_modules": ["proj"]}

    store.add_adapter("shared", *adapter(2))
    store.register_user("alice", *adapter(4), weight=1.5, adapters=[("shared", 0.5)])  # K = 2
    store.register_user("carol", *adapter(3), weight=0.75)  # K = 1
    store.add_user("dave", "shared")
    return store


def test_resolve_plan_rows_to_slots():
    """Each row gets the slots its user's adapters were leased to, with the profile's weights; rows without a user
    and unused K entries get slot -1 and weight 0 (not slot 0 with weight 0: that would touch those rows)."""
    store = _tiny_store()
    users = ["alice", None, "carol", "dave", None, "alice"]
    plan = resolve_plan(store, users)
    try:
        (a, s), (c,) = plan.rows[0].lora_slots, plan.rows[2].lora_slots
        assert len({a, s, c}) == 3 and all(0 <= x < store.num_slots for x in (a, s, c))
        ranks = store.buffers["proj"].slot_ranks
        assert [int(ranks[x]) for x in (a, s, c)] == [4, 2, 3]  # the slots hold alice's, shared and carol's adapters
        assert plan.lora_slots.dtype == torch.int32 and plan.lora_weights.dtype == torch.float32
        assert plan.lora_slots.tolist() == [[a, s], [-1, -1], [c, -1], [s, -1], [-1, -1], [a, s]]
        assert plan.lora_weights.tolist() == [[1.5, 0.5], [0.0, 0.0], [0.75, 0.0], [1.0, 0.0], [0.0, 0.0],
                                              [1.5, 0.5]]
        assert plan.active_slots == tuple(sorted({a, s, c}))
        assert [r.user for r in plan.rows] == users
        assert plan.rows[0].adapters == (("alice", 1.5), ("shared", 0.5))
        assert plan.rows[1].lora_slots == () and plan.rows[1].adapters == ()
        assert store.in_flight == 3
    finally:
        plan.release()
    assert store.in_flight == 0
    plan = resolve_plan(store, [None, None])
    assert plan.lora_slots.tolist() == [[-1], [-1]] and plan.lora_weights.tolist() == [[0.0], [0.0]]
    assert plan.active_slots == ()
    plan.release()


def test_rows_without_user_untouched_through_plan():
    """Plan -> PersonalBatch -> lora_apply on the store's buffers: rows of users get their adapters, rows without a
    user (and padding) keep their bits, -0.0 included (torch strategies)."""
    store = _tiny_store()
    users = [None, "carol", None, "alice"]
    S = 3
    mask = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 1, 1], [1, 1, 1]])
    plan = resolve_plan(store, users)
    try:
        meta = PersonalBatch.from_rows(plan.lora_slots, store.num_slots, plan.lora_weights, attention_mask=mask).lora
        buf = store.buffers["proj"]
        g = torch.Generator().manual_seed(1)
        x = torch.randn(len(users) * S, 8, generator=g)
        y0 = plant_negative_zeros(torch.randn(len(users) * S, 6, generator=g))
        untouched = torch.tensor([u is None for u in users]).repeat_interleave(S) | (mask.reshape(-1) == 0)
        for strategy in ("gather", "runs", "dense"):
            y = y0.clone()
            ops.lora_apply(y, x, buf.lora_a, buf.lora_b, buf.slot_ranks, buf.slot_scales, meta, buf.slice_sizes,
                           backend="torch", strategy=strategy)
            assert_bitwise_equal(y[untouched], y0[untouched], msg=f"{strategy}: rows without a user / padding")
            assert (y[~untouched] != y0[~untouched]).any(1).all(), "every user token must be changed"
    finally:
        plan.release()
