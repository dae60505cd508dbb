"""steer_add / steer_rmsnorm against the reference (float64 spec) on every backend that runs on CPU: fresh random
inputs, odd hidden sizes, K = 1 / 2 entries per token, every mode, rows without steering bitwise unchanged
(planted -0.0), poisoned unused slots, bad input."""

from __future__ import annotations

import pytest
import torch
from utils import assert_bitwise_equal, assert_close

from pllm_kernels.ops import MODES, steer_add, steer_rmsnorm
from pllm_kernels.reference.steer import steer_add_ref, steer_rmsnorm_ref

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def make(T=9, H=111, L=5, K=2, dtype=torch.float32, seed=0, none_frac=0.3, noncontig=False, poison=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, 2 * H if noncontig else H, generator=g)
    h = h.to(dtype)[:, ::2] if noncontig else h.to(dtype)
    h[0, :2] = -0.0
    vectors = torch.randn(L, H, generator=g)
    slots = torch.randint(1, L, (T, K), generator=g)  # slot 0 is never used: it may hold poison
    slots = torch.where(torch.rand(T, K, generator=g) < none_frac, -1, slots).to(torch.int32)
    slots[0] = -1
    scales = (torch.rand(T, K, generator=g) * 4 - 2).float()
    modes = torch.tensor([0] + [i % 4 for i in range(L - 1)], dtype=torch.int32)
    if poison is not None:
        vectors[0] = poison
    return h, vectors, slots, scales, modes


def _ref(h, vectors, slots, scales, modes):
    return steer_add_ref(h.double().clone(), vectors.double(), slots, scales, modes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(T=9, H=111, K=2), dict(T=4, H=2049, K=1), dict(T=1, H=64, K=3)])
def test_steer_add_matches_reference(backend, dtype, shape):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 is checked on the GPU")
    h, vectors, slots, scales, modes = make(dtype=dtype, seed=shape["T"], **shape)
    h0 = h.clone()
    expected = _ref(h, vectors, slots, scales, modes)
    out = steer_add(h, vectors, slots, scales, modes, backend=backend)
    assert out is h
    assert_close(h, expected, dtype, scale=float(expected.abs().max()))
    untouched = (slots < 0).all(1)
    assert_bitwise_equal(h[untouched], h0[untouched])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_each_mode_and_noncontiguous(backend, mode):
    h, vectors, slots, scales, _ = make(T=7, H=96, K=1, noncontig=True, seed=3)
    modes = torch.full((vectors.shape[0],), MODES[mode], dtype=torch.int32)
    expected = _ref(h, vectors, slots, scales, modes)
    steer_add(h, vectors, slots, scales, modes, backend=backend)
    assert_close(h, expected, torch.float32, scale=float(expected.abs().max()))


def test_modes_match_their_definitions():
    """The spec's four modes written out by hand for one row (and steering-vectors' operators when installed)."""
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(1, 32, generator=g, dtype=torch.float64), torch.randn(1, 32, generator=g, dtype=torch.float64)
    u = v / v.norm()
    s = 1.75  # token_scales are float32: a representable value keeps the float64 check exact
    want = {
        "add": x + s * v,
        "ablate": x - (x @ u.T) * u,
        "ablate_add": x - (x @ u.T) * u + s * v,
        "norm_preserve": (x + s * v) * x.norm() / (x + s * v).norm(),
    }
    for mode, w in want.items():
        got = steer_add(x.clone(), v, torch.tensor([0]), torch.tensor([s]), torch.tensor([MODES[mode]]))
        torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12, msg=mode)
    ops = pytest.importorskip("steering_vectors.steering_operators")
    for mode, op in (("add", ops.addition_operator()), ("ablate", ops.ablation_operator()),
                     ("ablate_add", ops.ablation_then_addition_operator())):
        theirs = x + op(x, s * v)
        torch.testing.assert_close(want[mode], theirs, rtol=1e-12, atol=1e-12, msg=mode)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_poisoned_unused_slot_never_read(backend, poison):
    h, vectors, slots, scales, modes = make(seed=5, poison=poison)
    h0 = h.clone()
    clean = vectors.clone()
    clean[0] = 0.0
    expected = _ref(h, clean, slots, scales, modes)
    steer_add(h, vectors, slots, scales, modes, backend=backend)
    assert torch.isfinite(h).all()
    assert_close(h, expected, torch.float32, scale=float(expected.abs().max()))
    untouched = (slots < 0).all(1)
    assert_bitwise_equal(h[untouched], h0[untouched])


def _hf_rms(x, weight, eps, gemma):
    """HF's LlamaRMSNorm / GemmaRMSNorm forward, written out."""
    if gemma:
        xf = x.float()
        o = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (o * (1.0 + weight.float())).type_as(x)
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gemma", [False, True])
def test_fused_rmsnorm_equals_steer_then_norm(backend, dtype, gemma):
    h, vectors, slots, scales, modes = make(T=11, H=160, K=2, dtype=dtype, seed=7)
    weight = (torch.randn(160) * 0.1 + (0.0 if gemma else 1.0)).to(dtype)
    eps = 1e-6
    h_ref = h.clone()
    steer_add(h_ref, vectors, slots, scales, modes, backend="torch")
    want = _hf_rms(h_ref, weight, eps, gemma)
    spec = steer_rmsnorm_ref(h.double().clone(), weight.double(), eps, vectors.double(), slots, scales, modes,
                             weight_offset=1.0 if gemma else 0.0)
    out = steer_rmsnorm(h, weight, eps, vectors, slots, scales, modes, weight_offset=1.0 if gemma else 0.0,
                        backend=backend)
    assert_close(h, h_ref, dtype, scale=float(h_ref.abs().max()))
    assert_close(out, want, dtype, scale=float(want.abs().max()))
    assert_close(out, spec, dtype, scale=float(want.abs().max()))
    if backend == "torch" and dtype == torch.float32:
        assert torch.equal(out, want), "the torch backend's fused path must equal steer + HF norm exactly in fp32"


def test_opcheck_and_compile():
    h, vectors, slots, scales, modes = make(T=5, H=32, K=2)
    torch.library.opcheck(torch.ops.pllm.steer_add.default, (h.clone(), vectors, slots, scales, modes, "torch"))
    w = torch.randn(32)
    torch.library.opcheck(torch.ops.pllm.steer_rmsnorm.default,
                          (torch.empty_like(h), h.clone(), w, 1e-6, vectors, slots, scales, modes, 0.0, "torch"))

    def f(x):
        x = x * 1.0
        steer_add(x, vectors, slots, scales, modes)
        return steer_rmsnorm(x, w, 1e-6, vectors, slots, scales, modes) + 1.0

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(h.clone()), f(h.clone()))


def test_inference_mode():
    with torch.inference_mode():
        h, vectors, slots, scales, modes = make(seed=2)
        expected = _ref(h, vectors, slots, scales, modes)
        steer_add(h, vectors, slots, scales, modes)
        assert_close(h, expected, torch.float32, scale=float(expected.abs().max()))


@pytest.mark.parametrize("kw,match", [
    (dict(vectors=torch.randn(3, 10)), "^vectors: has 10 features"),
    (dict(token_slots=torch.zeros(4, 1, dtype=torch.int32)), "^token_slots: expected shape"),
    (dict(token_slots=torch.full((9, 1), 7, dtype=torch.int32)), "^token_slots: slot ids must be -1 or in"),
    (dict(token_slots=torch.full((9, 1), 2**32 + 1, dtype=torch.int64)), "^token_slots: slot ids must be -1 or in"),
    (dict(token_slots=torch.zeros(9, 1)), "^token_slots: dtype"),
    (dict(token_scales=torch.full((9, 1), float("nan"))), "^token_scales: must be finite"),
    (dict(slot_modes=torch.full((5,), 9, dtype=torch.int32)), "^slot_modes: modes are"),
    (dict(h=torch.randn(9, 111).to("meta")), "^vectors: is on cpu"),
    (dict(backend="gpu"), "^backend: must be one of"),
])
def test_errors_name_the_argument(kw, match):
    h, vectors, slots, scales, modes = make(K=1)
    args = dict(h=h, vectors=vectors, token_slots=slots, token_scales=scales, slot_modes=modes)
    backend = kw.pop("backend", None)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        steer_add(args["h"], args["vectors"], args["token_slots"], args["token_scales"], args["slot_modes"],
                  backend=backend)
