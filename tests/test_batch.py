"""PersonalBatch / LoRAMeta construction: sorting, counting, chunking, layouts, preallocated buffers."""

import pytest
import torch

from pllm_kernels.batch import LoRAMetaBuffers, PersonalBatch, build_lora_meta, tokens_from_rows


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
