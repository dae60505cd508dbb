"""GPU checks of the CUDA ``sample_tokens`` kernel (:func:`pllm_kernels.cuda.decoding.sample_tokens_cuda`), marker
``gpu``.

* against the float64 spec (``sample_ref``: tokens exactly equal, log-probs within 1e-5) in bf16 / fp16 / fp32 at real
  vocabularies (Llama-3 128256, 32000, GPT-2's odd 50257), decode batches, mixed per-row parameters, ``-inf`` masks;
* against the Triton sampler (the same tokens); the public op ``sample_tokens`` with ``backend="cuda"`` and ``auto``
  (which picks the CUDA kernel on a GPU);
* determinism: a row alone vs in a batch, the device's bits equal the CPU emulator's, CUDA-graph capture + replay;
* ``test_sanitizer_*``: tiny shapes covering every kernel variant (compute-sanitizer memcheck / racecheck).

``PLLM_DECODING_GPU_TESTS_ON_EMULATOR=1`` runs this file on the extension's CPU emulator (small cases only).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from utils import assert_bitwise_equal

from pllm_kernels import _ext
from pllm_kernels.reference.decoding import sample_ref

ON_EMU = os.environ.get("PLLM_DECODING_GPU_TESTS_ON_EMULATOR", "") == "1"
SANITIZER = os.environ.get("PLLM_SANITIZER", "") == "1"
DEVICE = "cpu" if ON_EMU else "cuda"
_HAS_SAMPLE = _ext.HAS_CUDA_EXT and hasattr(_ext.ext(), "sample_tokens")

pytestmark = [
    *([] if ON_EMU else [pytest.mark.gpu]),
    pytest.mark.skipif(not _HAS_SAMPLE, reason=f"CUDA extension with the sampler kernel not built: {_ext.ext_error}"),
]
big = pytest.mark.skipif(ON_EMU or SANITIZER, reason="large shapes: GPU only, not under compute-sanitizer")
gpu_ops = pytest.mark.skipif(ON_EMU or SANITIZER, reason="GPU only (Triton, ops dispatch), not under the sanitizer")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]

# name -> (B, V); "big" ones are skipped on the emulator / under the sanitizer
CASES = {
    "llama3_b8": (8, 128256),
    "llama3_b64": (64, 128256),
    "v32000_b1": (1, 32000),
    "gpt2_odd_b16": (16, 50257),
    "small": (8, 1001),
}
BIG = {"llama3_b8", "llama3_b64", "v32000_b1", "gpt2_odd_b16"}


def _names(names):
    return [pytest.param(n, marks=big) if n in BIG else n for n in names]


def _case(name, dtype, seed=0):
    B, V = CASES[name]
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(B, V, generator=g) * 3).to(dtype)
    scores[:, :5] = -math.inf  # masked tokens
    T = torch.tensor([0.0, 0.7, 1.0, 1.5])[torch.arange(B) % 4]
    K = torch.tensor([0, 1, 5, 50], dtype=torch.int32)[(torch.arange(B) // 4) % 4]
    P = torch.tensor([1.0, 0.9, 0.5])[(torch.arange(B) // 2) % 3]
    MP = torch.tensor([0.0, 0.05])[(torch.arange(B) // 3) % 2]
    seed_ = torch.randint(-(2**62), 2**62, (B,), generator=g)
    step = torch.randint(0, 2**40, (B,), generator=g)
    prm = dict(temperature=T, top_k=K, top_p=P, min_p=MP, seed=seed_, step=step)
    return scores.to(DEVICE), {k: v.to(DEVICE) for k, v in prm.items()}


def cuda_sample(scores, prm, tok=None, lp=None):
    from pllm_kernels.cuda.decoding import sample_tokens_cuda

    B = scores.shape[0]
    tok = torch.full((B,), -7, dtype=torch.int64, device=scores.device) if tok is None else tok
    lp = torch.full((B,), math.nan, device=scores.device) if lp is None else lp
    sample_tokens_cuda(tok, lp, scores, prm["temperature"], prm["top_k"], prm["top_p"], prm["min_p"], prm["seed"],
                       prm["step"], _emulate=ON_EMU)
    return tok, lp


def _sync():
    if not ON_EMU:
        torch.cuda.synchronize()


def _check(scores, prm, tok, lp, msg):
    c = {k: v.cpu() for k, v in prm.items()}
    rt, rl = sample_ref(scores.cpu(), c["temperature"], c["top_k"], c["top_p"], c["min_p"], c["seed"], c["step"])
    tok, lp = tok.cpu(), lp.cpu()
    bad = (tok != rt).nonzero().flatten().tolist()
    assert not bad, f"{msg}: rows {bad} drew {tok[bad].tolist()}, the spec {rt[bad].tolist()}"
    assert torch.isfinite(lp).all(), msg
    err = (lp.double() - rl).abs().max().item()
    assert err <= 1e-5, f"{msg}: logprobs off by {err}"


# ------------------------------------------------------------------------------------------------ vs reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", _names(list(CASES)))
def test_sample_matches_reference(name, dtype):
    scores, prm = _case(name, dtype)
    tok, lp = cuda_sample(scores, prm)
    _sync()
    _check(scores, prm, tok, lp, f"{name} {dtype}")


@gpu_ops
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["llama3_b64", "gpt2_odd_b16"])
def test_matches_triton(name, dtype):
    from pllm_kernels.triton.decoding import sample_triton

    scores, prm = _case(name, dtype, seed=1)
    tok, lp = cuda_sample(scores, prm)
    ttok = torch.empty_like(tok)
    tlp = torch.empty_like(lp)
    sample_triton(ttok, tlp, scores, *prm.values())
    _sync()
    assert torch.equal(tok, ttok), (tok != ttok).nonzero().flatten().tolist()
    assert (lp - tlp).abs().max().item() <= 1e-5


@gpu_ops
def test_ops_auto_and_cuda_backend():
    from pllm_kernels.ops import sample_tokens
    from pllm_kernels.ops._backend import pick_backend

    assert pick_backend("sample_tokens", torch.device("cuda"), torch.bfloat16, "auto") == "cuda"
    scores, prm = _case("llama3_b8", torch.bfloat16, seed=2)
    want_tok, want_lp = cuda_sample(scores, prm)
    for backend in ("auto", "cuda"):
        tok, lp = sample_tokens(scores, *prm.values(), backend=backend)
        assert torch.equal(tok, want_tok), backend
        assert_bitwise_equal(lp, want_lp, msg=f"sample_tokens {backend}")


# ------------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_alone_equals_row_in_batch(dtype):
    name = "small" if ON_EMU or SANITIZER else "llama3_b64"
    scores, prm = _case(name, dtype, seed=3)
    tok, lp = cuda_sample(scores, prm)
    for b in (0, scores.shape[0] - 1):
        t1, l1 = cuda_sample(scores[b : b + 1].clone(), {k: v[b : b + 1].clone() for k, v in prm.items()})
        _sync()
        assert t1[0] == tok[b]
        assert_bitwise_equal(l1, lp[b : b + 1], msg=f"row {b}")


@pytest.mark.skipif(ON_EMU, reason="CUDA graphs: GPU only")
def test_cuda_graph_capture_and_replay():
    scores, prm = _case("small", torch.bfloat16, seed=5)
    s_buf = scores.clone()
    p_buf = {k: v.clone() for k, v in prm.items()}
    tok = torch.empty(scores.shape[0], dtype=torch.int64, device="cuda")
    lp = torch.empty(scores.shape[0], device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cuda_sample(s_buf, p_buf, tok, lp)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        cuda_sample(s_buf, p_buf, tok, lp)
    for seed in range(3):
        new_scores, new_prm = _case("small", torch.bfloat16, seed=10 + seed)
        new_prm["step"] = new_prm["step"] + seed
        s_buf.copy_(new_scores)
        for k in p_buf:
            p_buf[k].copy_(new_prm[k])
        g.replay()
        torch.cuda.synchronize()
        want_tok, want_lp = cuda_sample(new_scores, new_prm)
        torch.cuda.synchronize()
        assert torch.equal(tok, want_tok), f"replay {seed}"
        assert_bitwise_equal(lp, want_lp, msg=f"replay {seed}")
        _check(new_scores, new_prm, tok, lp, f"replay {seed}")


@pytest.mark.skipif(ON_EMU, reason="compares the GPU with the emulator")
@pytest.mark.parametrize("dtype", DTYPES)
def test_device_bits_equal_the_emulator(dtype):
    """The premise of the CPU tests: the GPU gives the CPU emulator's tokens and bits (fmath.cuh's exp / log, rounded
    divisions, explicit FMAs, never-fused products)."""
    from pllm_kernels.cuda.decoding import sample_tokens_cuda

    scores, prm = _case("small", dtype, seed=6)
    tok, lp = cuda_sample(scores, prm)
    etok = torch.empty(tok.shape, dtype=torch.int64)
    elp = torch.empty(lp.shape)
    sample_tokens_cuda(etok, elp, scores.cpu(), *(v.cpu() for v in prm.values()), _emulate=True)
    torch.cuda.synchronize()
    assert torch.equal(tok.cpu(), etok)
    assert_bitwise_equal(lp.cpu(), elp, msg=f"{dtype}")


# ------------------------------------------------------------------------------------------------ sanitizer subset
@pytest.mark.parametrize("dtype", DTYPES)
def test_sanitizer_every_kernel_variant(dtype):
    """Tiny rows (V = 77 < the block: idle threads; ties; top-k / top-p searches, index bisection), checked against
    the spec: the compute-sanitizer workload (memcheck; racecheck on the block reductions)."""
    g = torch.Generator().manual_seed(7)
    B, V = 8, 77
    scores = torch.round(torch.randn(B, V, generator=g) * 4) / 2
    scores[3, 10:] = -math.inf
    scores = scores.to(dtype).to(DEVICE)
    prm = dict(temperature=torch.tensor([0.0, 1.0, 0.8, 1.2, 1.0, 0.5, 2.0, 1.0]),
               top_k=torch.tensor([0, 0, 3, 20, 7, 0, 1, 77], dtype=torch.int32),
               top_p=torch.tensor([1.0, 0.9, 1.0, 0.7, 0.5, 0.95, 1.0, 0.3]),
               min_p=torch.tensor([0.0, 0.0, 0.1, 0.0, 0.0, 0.2, 0.0, 0.0]),
               seed=torch.arange(B, dtype=torch.int64) * 977 - 3, step=torch.arange(B, dtype=torch.int64))
    prm = {k: v.to(DEVICE) for k, v in prm.items()}
    tok, lp = cuda_sample(scores, prm)
    _sync()
    _check(scores, prm, tok, lp, f"sanitizer {dtype}")
