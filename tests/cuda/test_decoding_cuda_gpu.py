"""GPU checks of the CUDA ``mix_logprobs`` kernel (:mod:`pllm_kernels.cuda.decoding`), marker ``gpu``.

* against the float64 reference in bf16 / fp16 / fp32 at real vocabularies (Llama-3 128256, 32000, GPT-2's odd
  50257: scalar loads), decode and larger batches, 2 / 3 sources with contrast / CoSteer coefficients, ``-inf`` masks;
* against the Triton launcher; the public ops (``mix_logprobs`` / ``contrast_logits``) with ``backend="cuda"`` and
  ``auto`` (which picks the CUDA kernel on a GPU);
* determinism: a row alone vs in a batch, 16-byte vs scalar loads, CUDA-graph capture + replay (bitwise);
* ``test_sanitizer_*``: tiny shapes covering every kernel variant (compute-sanitizer memcheck / racecheck).

``PLLM_DECODING_GPU_TESTS_ON_EMULATOR=1`` runs this file on the extension's CPU emulator (small cases only).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from utils import assert_bitwise_equal, assert_close

from pllm_kernels import _ext
from pllm_kernels.reference.decoding import mix_logprobs_ref

ON_EMU = os.environ.get("PLLM_DECODING_GPU_TESTS_ON_EMULATOR", "") == "1"
SANITIZER = os.environ.get("PLLM_SANITIZER", "") == "1"
DEVICE = "cpu" if ON_EMU else "cuda"
_HAS_MIX = _ext.HAS_CUDA_EXT and hasattr(_ext.ext(), "mix_logprobs")

pytestmark = [
    *([] if ON_EMU else [pytest.mark.gpu]),
    pytest.mark.skipif(not _HAS_MIX, reason=f"CUDA extension with decoding kernels not built: {_ext.ext_error}"),
]
big = pytest.mark.skipif(ON_EMU or SANITIZER, reason="large shapes: GPU only, not under compute-sanitizer")
gpu_ops = pytest.mark.skipif(ON_EMU or SANITIZER, reason="GPU only (Triton, ops dispatch), not under the sanitizer")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]

# name -> (S, B, V, coefficient rows); "big" ones are skipped on the emulator / under the sanitizer
CASES = {
    "llama3_cos_b8": (2, 8, 128256, "contrast"),
    "llama3_costeer_b64": (3, 64, 128256, "costeer"),
    "v32000_b1": (2, 1, 32000, "contrast"),
    "gpt2_odd_b4": (2, 4, 50257, "contrast"),
    "small_mixed": (3, 4, 1001, "mixed"),
}
BIG = {"llama3_cos_b8", "llama3_costeer_b64", "v32000_b1", "gpt2_odd_b4"}


def _params(names):
    return [pytest.param(n, marks=big) if n in BIG else n for n in names]


def _case(name, dtype, seed=0):
    S, B, V, kind = CASES[name]
    g = torch.Generator().manual_seed(seed)
    src = (torch.randn(S, B, V, generator=g) * 3).to(dtype)
    src[0, :, :5] = -math.inf  # tokens the base model rules out
    src[-1, 0, 7] = -math.inf  # and one ruled out by the last source (negative coefficient in the contrast cases)
    lam = torch.rand(B, generator=g) * 4 - 1
    if kind == "contrast":
        coefs = torch.stack([1.0 + lam, -lam], 1)
    elif kind == "costeer":
        coefs = torch.stack([torch.ones(B), lam, -lam], 1)
    else:
        coefs = torch.tensor([[1.0, 0.5, -0.5], [1.0, 2.0, 0.0], [2.0, -1.0, 0.0], [1.0, 0.0, 0.0]])
    return src.to(DEVICE), coefs.to(DEVICE)


def cuda_mix(src, coefs, out=None):
    from pllm_kernels.cuda.decoding import mix_logprobs_cuda

    S, B, V = src.shape
    out = torch.full((B, V), float("nan"), device=src.device) if out is None else out
    mix_logprobs_cuda(out, src, coefs, _emulate=ON_EMU)
    return out


def _sync():
    if not ON_EMU:
        torch.cuda.synchronize()


def _check(got, src, coefs, msg):
    want = mix_logprobs_ref(src.cpu(), coefs.cpu())
    got = got.cpu()
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin), f"{msg}: -inf pattern"
    assert_close(got[fin], want[fin], torch.float32, scale=float(want[fin].abs().max()), msg=msg)


def _offset_copy(t):
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


# ------------------------------------------------------------------------------------------------ vs reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", _params(list(CASES)))
def test_mix_matches_reference(name, dtype):
    src, coefs = _case(name, dtype)
    got = cuda_mix(src, coefs)
    _sync()
    _check(got, src, coefs, f"{name} {dtype}")


@gpu_ops
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["llama3_cos_b8", "gpt2_odd_b4"])
def test_matches_triton(name, dtype):
    from pllm_kernels.triton.decoding import mix_logprobs_triton

    src, coefs = _case(name, dtype, seed=1)
    got = cuda_mix(src, coefs)
    tri = torch.empty_like(got)
    mix_logprobs_triton(tri, src, coefs)
    _sync()
    fin = torch.isfinite(tri)
    assert torch.equal(torch.isfinite(got), fin)
    assert_close(got[fin].cpu(), tri[fin].cpu(), torch.float32, scale=float(tri[fin].abs().max()), msg="vs triton")


@gpu_ops
def test_ops_auto_and_cuda_backend():
    from pllm_kernels.ops import contrast_logits, mix_logprobs
    from pllm_kernels.ops._backend import pick_backend

    assert pick_backend("mix_logprobs", torch.device("cuda"), torch.bfloat16, "auto") == "cuda"
    src, coefs = _case("llama3_cos_b8", torch.bfloat16, seed=2)
    want = cuda_mix(src, coefs)
    for backend in ("auto", "cuda"):
        assert_bitwise_equal(mix_logprobs(src, coefs, backend=backend), want, msg=f"mix_logprobs {backend}")
    lam = -coefs[:, 1]
    assert_bitwise_equal(contrast_logits(src[0], src[1], lam, backend="cuda"), want, msg="contrast_logits")


# ------------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_alone_equals_row_in_batch(dtype):
    name = "small_mixed" if ON_EMU or SANITIZER else "llama3_costeer_b64"
    src, coefs = _case(name, dtype, seed=3)
    full = cuda_mix(src, coefs)
    for b in (0, src.shape[1] - 1):
        one = cuda_mix(src[:, b : b + 1].clone(), coefs[b : b + 1].clone())
        _sync()
        assert_bitwise_equal(one, full[b : b + 1], msg=f"row {b}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_and_scalar_loads_bitwise(dtype):
    src, coefs = _case("small_mixed", dtype, seed=4)
    src = src[..., :1000].contiguous()  # V multiple of 8: the 16-byte kernel
    vec = cuda_mix(src, coefs)
    sca = cuda_mix(_offset_copy(src), coefs)
    _sync()
    assert_bitwise_equal(sca, vec, msg="scalar vs 16-byte loads")


@pytest.mark.skipif(ON_EMU, reason="CUDA graphs: GPU only")
def test_cuda_graph_capture_and_replay():
    src, coefs = _case("small_mixed", torch.bfloat16, seed=5)
    src_buf, coef_buf = src.clone(), coefs.clone()
    out = torch.empty(src.shape[1:], device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cuda_mix(src_buf, coef_buf, out=out)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        cuda_mix(src_buf, coef_buf, out=out)
    for seed in range(3):
        new_src, new_coefs = _case("small_mixed", torch.bfloat16, seed=10 + seed)
        new_coefs = new_coefs * (1 + seed)
        src_buf.copy_(new_src)
        coef_buf.copy_(new_coefs)
        g.replay()
        torch.cuda.synchronize()
        assert_bitwise_equal(out, cuda_mix(new_src, new_coefs), msg=f"replay {seed}")
        _check(out, new_src, new_coefs, f"replay {seed}")


@pytest.mark.skipif(ON_EMU, reason="compares the GPU with the emulator")
@pytest.mark.parametrize("dtype", DTYPES)
def test_device_bits_equal_the_emulator(dtype):
    """The premise of the CPU tests: the GPU gives the CPU emulator's bits (fmath.cuh's exp / log, explicit FMAs,
    never-fused products), 16-byte and scalar variants."""
    from pllm_kernels.cuda.decoding import mix_logprobs_cuda

    src, coefs = _case("small_mixed", dtype, seed=6)
    for s in (src[..., :1000].contiguous(), src):  # 16-byte loads, scalar loads (V = 1001)
        dev = cuda_mix(s, coefs)
        emu = torch.empty(dev.shape)
        mix_logprobs_cuda(emu, s.cpu(), coefs.cpu(), _emulate=True)
        torch.cuda.synchronize()
        assert_bitwise_equal(dev.cpu(), emu, msg=f"V={s.shape[-1]}")


# ------------------------------------------------------------------------------------------------ sanitizer subset
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned", [True, False])
def test_sanitizer_every_kernel_variant(dtype, aligned):
    """Tiny shapes launching every variant (dtype x 16-byte / scalar loads; V below, at and above one pass of the
    block), checked against the reference: the compute-sanitizer workload (memcheck; racecheck on the reductions)."""
    for V in (8, 4096, 4104 + 8):
        g = torch.Generator().manual_seed(V)
        src = (torch.randn(2, 3, V, generator=g) * 3).to(dtype).to(DEVICE)
        coefs = torch.tensor([[1.5, -0.5], [1.0, 0.0], [0.0, 1.0]], device=DEVICE)
        if not aligned:
            src = _offset_copy(src)
        got = cuda_mix(src, coefs)
        _sync()
        _check(got, src, coefs, f"V={V} aligned={aligned}")
