"""torch.ops.pllm.lora_* on the CPU path: numerics vs the float64 reference, opcheck, torch.compile, bad input."""

import pytest
import torch
from lora_cases import make_case
from utils import assert_bitwise_equal, assert_close

from pllm_kernels.batch import build_lora_meta
from pllm_kernels.ops import lora as ops
from pllm_kernels.reference.lora import lora_apply_ref, lora_expand_ref, lora_shrink_ref

CASES = [
    dict(T=1, h_in=16, slice_sizes=(8,), ranks=(4,), max_rank=4),
    dict(T=9, h_in=111, slice_sizes=(24, 8, 8), ranks=(8, 1, 16, 64), max_rank=64, K=2),
    dict(T=33, h_in=64, slice_sizes=(40, 40), ranks=tuple([1, 8, 16, 64] * 8 + [8]), max_rank=64),
    dict(T=20, h_in=32, slice_sizes=(16,), ranks=(8, 8), max_rank=8, none_frac=1.0),
    dict(T=17, h_in=2049, slice_sizes=(5,), ranks=(1, 8), max_rank=8, x_noncontig=True, y_noncontig=True),
    # 6 slices of different widths (> _MAX_SLICES = 4: the Triton launchers run them as two launch groups)
    dict(T=11, h_in=24, slice_sizes=(8, 4, 4, 12, 6, 3), ranks=(4, 2, 1), max_rank=4, K=2, none_frac=0.5),
]
MANY_SLICES = 5  # index of the > 4 slices case


def ref_apply(c):
    y = c.y.double().clone()
    return lora_apply_ref(y, c.x.double(), c.lora_a.double(), c.lora_b.double(), c.token_slots, c.token_weights,
                          c.slot_ranks, c.slot_scales, c.slice_sizes)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_apply_matches_reference(case, dtype):
    c = make_case(dtype=dtype, seed=case, neg_zeros=True, **CASES[case])
    y0, expected = c.y.clone(), ref_apply(c)
    y = ops.lora_apply(c.y, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes)
    assert y is c.y
    assert_close(y, expected, dtype, msg=f"case {case}")
    untouched = (c.token_slots < 0).all(dim=1)
    assert_bitwise_equal(y[untouched], y0[untouched], msg=f"case {case}: rows without adapter")


@pytest.mark.parametrize("case", range(len(CASES)))
def test_shrink_expand_match_reference(case):
    c = make_case(seed=10 + case, neg_zeros=True, **CASES[case])
    v = ops.lora_shrink(c.x, c.lora_a, c.slot_ranks, c.meta)
    v_ref = lora_shrink_ref(c.x.double(), c.lora_a.double(), c.token_slots, c.slot_ranks)
    assert_close(v, v_ref, torch.float32)
    y0 = c.y.clone()
    y = ops.lora_expand(c.y, v, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes)
    y_ref = lora_expand_ref(y0.double(), v_ref, c.lora_b.double(), c.token_slots, c.token_weights,
                            c.slot_ranks, c.slot_scales, c.slice_sizes)
    assert_close(y, y_ref, torch.float32)
    untouched = (c.token_slots < 0).all(dim=1)
    assert_bitwise_equal(y[untouched], y0[untouched], msg=f"case {case}: expand, rows without adapter")


def test_shrink_out_buffer_is_reused():
    c = make_case(T=5, K=2)
    out = torch.full(ops.shrink_out_shape(c.x, c.lora_a, c.meta), 123.0)
    v = ops.lora_shrink(c.x, c.lora_a, c.slot_ranks, c.meta, out=out)
    assert v is out
    assert_close(v, lora_shrink_ref(c.x.double(), c.lora_a.double(), c.token_slots, c.slot_ranks), torch.float32)


def _op_args(c):
    m = c.meta
    return m, (m.token_slots, m.token_weights, m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len)


def test_opcheck():
    c = make_case(T=6, h_in=8, slice_sizes=(4, 2), ranks=(2, 1, 3), max_rank=4, K=2)
    m, (ts, tw, sp, ss, st, sl) = _op_args(c)
    v = torch.zeros(2, 12, 4)
    torch.library.opcheck(torch.ops.pllm.lora_shrink.default,
                          (v, c.x, c.lora_a, c.slot_ranks, ts, sp, ss, st, sl, m.chunk, "torch"))
    torch.library.opcheck(torch.ops.pllm.lora_expand.default,
                          (c.y.clone(), v.normal_(), c.lora_b, c.slot_ranks, c.slot_scales, ts, tw, sp, ss, st, sl,
                           [4, 2], m.chunk, "torch"))
    for strategy in ("gather", "runs", "dense"):
        torch.library.opcheck(torch.ops.pllm.lora_apply.default,
                              (c.y.clone(), c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, ts, tw, sp, ss, st,
                               sl, [4, 2], m.chunk, "torch", strategy))


def test_torch_compile_fullgraph():
    c = make_case(T=8, h_in=16, slice_sizes=(8, 4), ranks=(2, 4), max_rank=4, K=2)

    def layer(x, y, meta):
        y = y + 0.0  # a real graph around the op
        ops.lora_apply(y, x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, meta, c.slice_sizes)
        return y * 2.0

    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    eager = layer(c.x, c.y, c.meta)
    got = compiled(c.x, c.y, c.meta)
    assert_close(got, eager, torch.float32)
    # new routing, same shapes: no stale result
    meta2 = build_lora_meta(torch.randint(-1, 2, (8, 2)), 2, chunk=c.meta.chunk)
    assert_close(compiled(c.x, c.y, meta2), layer(c.x, c.y, meta2), torch.float32)


# ------------------------------------------------------------------------------------------- bad input
def _apply(c, **over):
    kw = dict(y=c.y, x=c.x, lora_a=c.lora_a, lora_b=c.lora_b, slot_ranks=c.slot_ranks, slot_scales=c.slot_scales,
              meta=c.meta, slice_sizes=c.slice_sizes)
    kw.update(over)
    return ops.lora_apply(**kw)


@pytest.fixture
def case():
    return make_case(T=5, h_in=8, slice_sizes=(4,), ranks=(2, 4), max_rank=4)


@pytest.mark.parametrize(
    "override,arg",
    [
        (lambda c: dict(meta=build_lora_meta(torch.tensor([[0], [2], [1], [0], [0]]), 2)), "token_slots"),
        (lambda c: dict(meta=build_lora_meta(torch.tensor([[0], [-3], [1], [0], [0]]), 2)), "token_slots"),
        (lambda c: dict(slot_ranks=torch.tensor([2, 5], dtype=torch.int32)), "slot_ranks"),
        (lambda c: dict(slot_ranks=torch.tensor([2, -1], dtype=torch.int32)), "slot_ranks"),
        (lambda c: dict(slot_ranks=torch.tensor([2, 4])), "slot_ranks"),  # int64
        (lambda c: dict(slot_scales=torch.tensor([1.0, float("nan")])), "slot_scales"),
        (lambda c: dict(slot_scales=torch.tensor([1.0, float("inf")])), "slot_scales"),
        (lambda c: dict(x=c.x.half()), "lora_a"),
        (lambda c: dict(x=c.x[:, :7]), "lora_a"),
        (lambda c: dict(x=c.x[:4]), "y"),
        (lambda c: dict(y=c.y[:, :3]), "y"),
        (lambda c: dict(lora_b=c.lora_b[:, :, :3]), "lora_b"),
        (lambda c: dict(lora_b=c.lora_b[:1]), "lora_b"),
        (lambda c: dict(slice_sizes=[2, 1]), "slice_sizes"),
        (lambda c: dict(slice_sizes=[3, 1]), "slice_sizes"),
        (lambda c: dict(lora_a=c.lora_a[0]), "lora_a"),
        (lambda c: dict(x=c.x.int()), "x"),
        (lambda c: dict(meta=build_lora_meta(torch.zeros(5, 1, dtype=torch.int32), 3)), "meta"),
        (lambda c: dict(meta=build_lora_meta(torch.zeros(4, 1, dtype=torch.int32), 2)), "meta"),
        (lambda c: dict(meta=None), "meta"),
    ],
)
def test_bad_input_names_argument(case, override, arg):
    with pytest.raises(ValueError, match=rf"^{arg}"):
        _apply(case, **override(case))


def test_bad_shrink_and_expand_inputs(case):
    with pytest.raises(ValueError, match="^out"):
        ops.lora_shrink(case.x, case.lora_a, case.slot_ranks, case.meta, out=torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match="^out"):
        ops.lora_shrink(case.x, case.lora_a, case.slot_ranks, case.meta, out=torch.zeros(1, 5, 4, dtype=torch.half))
    v = ops.lora_shrink(case.x, case.lora_a, case.slot_ranks, case.meta)
    with pytest.raises(ValueError, match="^v"):
        ops.lora_expand(case.y, v[:, :3], case.lora_b, case.slot_ranks, case.slot_scales, case.meta)
    with pytest.raises(ValueError, match="^v"):
        ops.lora_expand(case.y, v.half(), case.lora_b, case.slot_ranks, case.slot_scales, case.meta)


def test_device_mismatch_names_argument(case):
    meta_dev = torch.device("meta")
    with pytest.raises(ValueError, match="^lora_a"):
        _apply(case, lora_a=case.lora_a.to(meta_dev))


# ------------------------------------------------------------------------------------------- triton via the op
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_apply_triton_backend_through_op(case, dtype, monkeypatch):
    """backend="triton" routes the registered op to the Triton launchers (run under TRITON_INTERPRET=1)."""
    from pllm_kernels.triton import lora as tl_lora

    calls = []
    real = tl_lora.lora_apply_triton
    monkeypatch.setattr(tl_lora, "lora_apply_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    c = make_case(dtype=dtype, seed=20 + case, neg_zeros=True, **CASES[case])
    y0, expected = c.y.clone(), ref_apply(c)
    ops.lora_apply(c.y, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes, backend="triton")
    assert calls, "the Triton launcher was not called"
    assert_close(c.y, expected, dtype, msg=f"case {case}")
    untouched = (c.token_slots < 0).all(dim=1)
    assert_bitwise_equal(c.y[untouched], y0[untouched], msg=f"case {case}: rows without adapter")


@pytest.mark.parametrize("strategy", ["gather", "runs", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [1, 2, 3, 4, MANY_SLICES])
def test_torch_apply_both_strategies(case, strategy, dtype):
    """The torch backend's per-run matmuls and its gathered-weights batched path agree with the reference; rows
    without adapter keep their bits (-0.0 planted in y)."""
    c = make_case(seed=30 + case, dtype=dtype, neg_zeros=True, **CASES[case])
    y0, expected = c.y.clone(), ref_apply(c)
    ops.lora_apply(c.y, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes, backend="torch",
                   strategy=strategy)
    assert_close(c.y, expected, dtype)
    untouched = (c.token_slots < 0).all(dim=1)
    assert_bitwise_equal(c.y[untouched], y0[untouched], msg=f"case {case}/{strategy}: rows without adapter")


def test_apply_without_validation_matches(case):
    expected = ref_apply(case)
    ops.lora_apply(case.y, case.x, case.lora_a, case.lora_b, case.slot_ranks, case.slot_scales, case.meta,
                   case.slice_sizes, validate=False)
    assert_close(case.y, expected, torch.float32)


# ------------------------------------------------------------------------------------------- per-slice outputs
def _sliced_outputs(c):
    """One separate (T, N_s) tensor per slice (its own allocation, -0.0 planted), holding c.y's values."""
    outs, off = [], 0
    for n in c.slice_sizes:
        t = c.y[:, off : off + n].clone().contiguous()
        t[:, ::3] = -0.0
        outs.append(t)
        off += n
    return outs


@pytest.mark.parametrize("strategy", ["auto", "gather", "runs", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [1, 2, 3, MANY_SLICES])
def test_apply_into_per_slice_outputs(case, strategy, dtype):
    """``y`` as a list of per-slice outputs (the q / k / v projections' own outputs): each slice's delta lands in
    its own tensor, equal to the reference; rows without an adapter keep their bits in every output."""
    c = make_case(seed=40 + case, dtype=dtype, **CASES[case])
    outs = _sliced_outputs(c)
    y = torch.cat(outs, dim=1)
    expected = lora_apply_ref(y.double(), c.x.double(), c.lora_a.double(), c.lora_b.double(), c.token_slots,
                              c.token_weights, c.slot_ranks, c.slot_scales, c.slice_sizes)
    before = [t.clone() for t in outs]
    got = ops.lora_apply(outs, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes,
                         backend="torch", strategy=strategy)
    assert got is outs
    assert_close(torch.cat(outs, dim=1), expected, dtype, msg=f"case {case}/{strategy}")
    untouched = (c.token_slots < 0).all(dim=1)
    for s, (t, t0) in enumerate(zip(outs, before)):
        assert_bitwise_equal(t[untouched], t0[untouched], msg=f"slice {s}: rows without adapter")


@pytest.mark.interpreter
@pytest.mark.parametrize("case", [1, MANY_SLICES])
def test_apply_into_per_slice_outputs_triton(case):
    c = make_case(seed=50 + case, **CASES[case])
    outs = _sliced_outputs(c)
    y = torch.cat(outs, dim=1)
    expected = lora_apply_ref(y.double(), c.x.double(), c.lora_a.double(), c.lora_b.double(), c.token_slots,
                              c.token_weights, c.slot_ranks, c.slot_scales, c.slice_sizes)
    before = [t.clone() for t in outs]
    ops.lora_apply(outs, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes,
                   backend="triton")
    assert_close(torch.cat(outs, dim=1), expected, torch.float32)
    untouched = (c.token_slots < 0).all(dim=1)
    for t, t0 in zip(outs, before):
        assert_bitwise_equal(t[untouched], t0[untouched])


@pytest.mark.parametrize("bad,arg", [
    (lambda outs: outs[:-1], "y"),
    (lambda outs: [outs[0], outs[1][:, :-1], *outs[2:]], "y[1]"),
    (lambda outs: [outs[0].double(), *outs[1:]], "y[0]"),
    (lambda outs: [outs[0][:-1], *outs[1:]], "y[0]"),
    (lambda outs: [outs[0].t().contiguous().t(), *outs[1:]], "y[0]"),
])
def test_per_slice_outputs_bad_input(bad, arg):
    c = make_case(T=6, h_in=8, slice_sizes=(4, 2, 3), ranks=(2, 1), max_rank=2)
    outs = bad(_sliced_outputs(c))
    with pytest.raises(ValueError, match=rf"^{arg.replace('[', '.').replace(']', '.')}"):
        ops.lora_apply(outs, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes)


def test_auto_takes_the_dense_strategy_for_decode(monkeypatch):
    """``auto`` on fp32: decode-sized calls take the dense matmuls (no per-call weight gather), prefill-sized calls
    with few adapters the per-run loop."""
    from pllm_kernels.torch_ops import lora as tl

    taken = []
    real = tl._DensePlan.run
    monkeypatch.setattr(tl._DensePlan, "run", lambda self, *a: taken.append(1) or real(self, *a))
    c = make_case(T=8, h_in=64, slice_sizes=(16, 8), ranks=(8, 4, 8, 2), max_rank=8, none_frac=0.0, seed=3)
    ops.lora_apply(c.y, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes)
    assert taken == [1]
    c = make_case(T=400, h_in=64, slice_sizes=(16,), ranks=(8, 4), max_rank=8, seed=4)
    ops.lora_apply(c.y, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes)
    assert taken == [1], "a 400-token call took the dense strategy"


def test_dense_sees_slot_reloads():
    """The dense strategy caches B transposed per buffer: a slot rewritten in place (the store loading another
    adapter) must be seen by the next call."""
    c = make_case(T=4, h_in=16, slice_sizes=(8,), ranks=(4, 4), max_rank=4, none_frac=0.0, seed=5)
    y0 = c.y.clone()
    ops.lora_apply(c.y, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes,
                   strategy="dense")
    c.lora_b[0].normal_()
    c.slot_ranks[1] = 2
    c.slot_scales[0] *= 3  # the cached B^T carries the scales
    c.y.copy_(y0)
    ops.lora_apply(c.y, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes,
                   strategy="dense")
    assert_close(c.y, ref_apply(make_case_like(c, y0)), torch.float32)


def make_case_like(c, y):
    from dataclasses import replace

    return replace(c, y=y.clone())


@pytest.mark.parametrize("form", ["padded", "mm"])
@pytest.mark.parametrize("K", [1, 2])
def test_dense_strategy_both_forms(form, K, monkeypatch):
    """The dense strategy's two forms (tokens spread over the slots: one bmm over the span's slots with their own
    tokens; few slots for many tokens: one mm over all of them) equal the reference, with poison in padding beyond
    the ranks and in an unused slot of the span, and rows without an adapter keep their bits."""
    from pllm_kernels.torch_ops import lora as tl

    taken = []
    real = tl._DensePlan.run
    monkeypatch.setattr(tl._DensePlan, "run", lambda self, *a: taken.append(self.kind) or real(self, *a))
    T = 12
    if form == "padded":  # one user per token (distinct slots 0..5, each twice), slot 6 unused inside the span
        slots = torch.tensor([[t % 6] + ([(t + 3) % 6] if K == 2 else []) for t in range(T)])
        slots[0] = -1
        slots[-1, 0] = 7
    else:  # two slots for twelve tokens
        slots = torch.tensor([[t % 2] + ([1 - t % 2] if K == 2 else []) for t in range(T)])
        slots[3] = -1
    c = make_case(T=T, h_in=40, slice_sizes=(16, 8, 8), ranks=(4, 8, 2, 8, 1, 8, 8, 3), max_rank=8,
                  slots=slots, seed=9, neg_zeros=True)
    with torch.no_grad():
        c.lora_a[6] = float("nan")  # unused slot (inside the span in the padded case)
        c.lora_b[6] = float("inf")
        c.lora_a[0, :, 4:] = float("nan")  # beyond slot 0's rank 4
        c.lora_b[0, :, 4:] = float("inf")
    y0 = c.y.clone()
    y = c.y.clone()
    ops.lora_apply(y, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes,
                   backend="torch", strategy="dense")
    clean_a, clean_b = c.lora_a.clone(), c.lora_b.clone()
    clean_a[6], clean_b[6] = 0, 0
    clean_a[0, :, 4:], clean_b[0, :, 4:] = 0, 0
    expected = lora_apply_ref(y0.double(), c.x.double(), clean_a.double(), clean_b.double(), c.token_slots,
                              c.token_weights, c.slot_ranks, c.slot_scales, c.slice_sizes)
    assert torch.isfinite(y).all(), "poison reached a row"
    assert_close(y, expected, torch.float32)
    untouched = (c.token_slots < 0).all(dim=1)
    assert_bitwise_equal(y[untouched], y0[untouched])
    assert taken == [form]


@pytest.mark.parametrize("unit", [True, False])
@pytest.mark.parametrize("sliced", [True, False])
@pytest.mark.parametrize("x_noncontig", [False, True])
def test_dense_one_user_per_row_in_slot_order(unit, sliced, x_noncontig, monkeypatch):
    """Decode with slot ``i`` serving exactly row ``i`` (the dense strategy's in-place ``baddbmm_`` form): equal to
    the reference with mixed ranks and poison beyond them, routing weights 1 (no multiply) or not, one output or
    one per slice."""
    from pllm_kernels.torch_ops import lora as tl

    taken = []
    real = tl._DensePlan.run
    monkeypatch.setattr(tl._DensePlan, "run", lambda self, *a: taken.append((self.kind, self.ident)) or real(self, *a))
    ranks = (4, 8, 2, 8, 1, 8, 3)
    T = len(ranks)
    c = make_case(T=T, h_in=40, slice_sizes=(16, 8, 8), ranks=ranks, max_rank=8, slots=torch.arange(T)[:, None],
                  seed=11, x_noncontig=x_noncontig)
    if unit:
        c.token_weights.fill_(1.0)
        c.meta.token_weights.fill_(1.0)
    with torch.no_grad():
        for s, r in enumerate(ranks):
            c.lora_a[s, :, r:] = float("nan")
            c.lora_b[s, :, r:] = float("inf")
    y0 = c.y.clone()
    clean_a, clean_b = c.lora_a.clone(), c.lora_b.clone()
    for s, r in enumerate(ranks):
        clean_a[s, :, r:], clean_b[s, :, r:] = 0, 0
    expected = lora_apply_ref(y0.double(), c.x.double(), clean_a.double(), clean_b.double(), c.token_slots,
                              c.token_weights, c.slot_ranks, c.slot_scales, c.slice_sizes)
    for _ in range(2):  # the second call runs the cached plan
        y = y0.clone()
        out = [y[:, 0:16].clone(), y[:, 16:24].clone(), y[:, 24:32].clone()] if sliced else y
        ops.lora_apply(out, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes,
                       backend="torch")
        got = torch.cat(out, 1) if sliced else y
        assert torch.isfinite(got).all(), "poison reached a row"
        assert_close(got, expected, torch.float32)
    assert taken == [("padded", True)] * 2


# ------------------------------------------------------------------------------------------- prepared calls
def _prepared_case(seed=13, T=6):
    ranks = (4, 8, 2, 8, 1, 8)[:T]
    c = make_case(T=T, h_in=40, slice_sizes=(16, 8, 8), ranks=ranks, max_rank=8, slots=torch.arange(T)[:, None],
                  seed=seed)
    return c


def _expected(c, y0):
    return lora_apply_ref(y0.double(), c.x.double(), c.lora_a.double(), c.lora_b.double(), c.token_slots,
                          c.token_weights, c.slot_ranks, c.slot_scales, c.slice_sizes)


def _slices(y):
    return [y[:, 0:16], y[:, 16:24], y[:, 24:32]]


def test_prepared_lora_equals_lora_apply_and_follows_writes():
    """prepare_lora_apply (decode-sized torch call on CPU): the prepared call gives lora_apply's bits; it stays
    valid for the same meta / buffers / x layout, and stops being valid after any in-place write to a buffer or a
    routing tensor, or for another meta, dtype or row count (the caller then makes the full call again)."""
    c = _prepared_case()
    prep = ops.prepare_lora_apply(c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes)
    assert isinstance(prep, ops.PreparedLoRA)
    args = (c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales)
    assert prep.valid(c.meta, c.x, *args)
    y0 = c.y.clone()
    y_prep, y_full = y0.clone(), y0.clone()
    prep(_slices(y_prep), c.x)
    ops.lora_apply(_slices(y_full), c.x, *args, c.meta, c.slice_sizes, backend="torch")
    assert_bitwise_equal(y_prep, y_full)
    assert_close(y_prep, _expected(c, y0), torch.float32)
    # the one-user-per-row form on (T, 1, N_s) / (T, 1, H) tensors: the same bits
    assert prep.run_rows is not None
    outs = [t.clone().unsqueeze(1) for t in _slices(y0)]
    prep.run_rows(outs, c.x.unsqueeze(1))
    assert_bitwise_equal(torch.cat([o.squeeze(1) for o in outs], 1), y_full)
    # not valid for anything else
    assert not prep.valid(c.meta._replace(), c.x, *args)  # an equal but other meta object
    assert not prep.valid(c.meta, c.x.double(), *args)
    assert not prep.valid(c.meta, c.x[:3], *args)
    assert not prep.valid(c.meta, c.x, c.lora_a.clone(), *args[1:])
    for write in (lambda: c.lora_b[2].normal_(), lambda: c.lora_a[1].mul_(2), lambda: c.slot_ranks.__setitem__(0, 2),
                  lambda: c.slot_scales.mul_(1.5), lambda: c.meta.token_weights.mul_(0.5),
                  lambda: c.meta.token_slots.__setitem__(1, 3)):
        p = ops.prepare_lora_apply(c.x, *args, c.meta, c.slice_sizes)
        assert p.valid(c.meta, c.x, *args)
        write()
        assert not p.valid(c.meta, c.x, *args), "a write in place left the prepared call valid"
    # after the writes a new prepared call is right again
    c.token_slots.copy_(c.meta.token_slots)
    c.token_weights.copy_(c.meta.token_weights)
    p = ops.prepare_lora_apply(c.x, *args, c.meta, c.slice_sizes)
    y = y0.clone()
    (p or (lambda ys, x: ops.lora_apply(ys, x, *args, c.meta, c.slice_sizes)))(_slices(y), c.x)
    assert_close(y, _expected(c, y0), torch.float32)


def test_prepare_lora_apply_declines_what_it_cannot_serve():
    """None (the caller keeps lora_apply) for: another backend, a strategy other than auto / dense, fp16, routing
    or buffers made under inference_mode (no version counter), prefill-sized calls the dense form does not take."""
    c = _prepared_case()
    args = (c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes)
    assert ops.prepare_lora_apply(*args, backend="triton") is None
    assert ops.prepare_lora_apply(*args, strategy="gather") is None
    h = [t.half() for t in (c.x, c.lora_a, c.lora_b)]
    assert ops.prepare_lora_apply(h[0], h[1], h[2], c.slot_ranks, c.slot_scales, c.meta, c.slice_sizes) is None
    with torch.inference_mode():
        meta = build_lora_meta(c.token_slots, c.lora_a.shape[0], c.token_weights)
    assert ops.prepare_lora_apply(c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, meta, c.slice_sizes) is None
    big = make_case(T=400, h_in=64, slice_sizes=(16,), ranks=(8, 4), max_rank=8, seed=4)
    assert ops.prepare_lora_apply(big.x, big.lora_a, big.lora_b, big.slot_ranks, big.slot_scales, big.meta,
                                  big.slice_sizes) is None
