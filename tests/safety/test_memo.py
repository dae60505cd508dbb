"""The host-side memo of values derived from routing / slot tensors (``pllm_kernels.torch_ops.memo``)."""

from __future__ import annotations

import torch

from pllm_kernels.torch_ops.memo import memo


def test_value_comes_from_the_snapshot_not_the_live_tensor():
    """Another thread may change the live tensor while the value is computed (the store loads a slot while a forward
    reads ``slot_ranks``): the cached value must belong to the contents it is keyed by, never be served stale."""
    ranks = torch.tensor([4, 0, 2], dtype=torch.int32)

    def racy(snap):
        ranks[1] = 8  # a concurrent load lands between the read and the caching
        return snap.tolist()

    first = memo(ranks, "t-racy", racy)
    assert first == [4, 0, 2]
    again = memo(ranks, "t-racy", lambda snap: snap.tolist())
    assert again == [4, 8, 2], "a value computed before the change was served for the changed contents"


def test_hit_miss_and_inference_tensors():
    calls = []
    with torch.inference_mode():
        t = torch.arange(5)
        f = lambda s: calls.append(1) or int(s.sum())  # noqa: E731
        assert memo(t, "t-sum", f) == 10 and memo(t, "t-sum", f) == 10 and len(calls) == 1
        t[0] = 7
        assert memo(t, "t-sum", f) == 17 and len(calls) == 2
        u = t.clone()  # same contents, another object: no hit on t's entry
        assert memo(u, "t-sum", f) == 17 and len(calls) == 3


def test_dependencies_are_part_of_the_key():
    a, b = torch.tensor([1, 2]), torch.tensor([3])
    assert memo(a, "t-dep", lambda x, y: int(x.sum() + y.sum()), b) == 6
    b[0] = 10
    assert memo(a, "t-dep", lambda x, y: int(x.sum() + y.sum()), b) == 13
