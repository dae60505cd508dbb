"""GPU checks of the CUDA ``reward_guided`` kernel (:func:`pllm_kernels.cuda.decoding.reward_guided_cuda`), marker
``gpu``.

* against the float64 spec (``reward_guided_ref``: exactly its ``-inf`` pattern, finite values within 1e-5) in bf16 /
  fp16 / fp32 at real vocabularies (Llama-3 128256, 32000, GPT-2's odd 50257), decode batches, per-row beta / top_k,
  ``-inf`` masks;
* against the Triton kernel (same candidate set, values within 1e-5); the public op ``reward_guided_logprobs`` with
  ``backend="cuda"`` and ``auto`` (which picks the CUDA kernel on a GPU), the three reward forms;
* determinism: a row alone vs in a batch, the device's bits equal the CPU emulator's, CUDA-graph capture + replay;
* ``test_sanitizer_*``: tiny shapes covering every kernel variant (compute-sanitizer memcheck / racecheck).

``PLLM_DECODING_GPU_TESTS_ON_EMULATOR=1`` runs this file on the extension's CPU emulator (small cases only).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from fused_cases import fused_spec_guided, run_fused_cuda
from utils import assert_bitwise_equal

from pllm_kernels import _ext
from pllm_kernels.reference.decoding import reward_guided_ref

ON_EMU = os.environ.get("PLLM_DECODING_GPU_TESTS_ON_EMULATOR", "") == "1"
SANITIZER = os.environ.get("PLLM_SANITIZER", "") == "1"
DEVICE = "cpu" if ON_EMU else "cuda"
_HAS_REWARD = _ext.HAS_CUDA_EXT and hasattr(_ext.ext(), "reward_guided")

pytestmark = [
    *([] if ON_EMU else [pytest.mark.gpu]),
    pytest.mark.skipif(not _HAS_REWARD, reason=f"CUDA extension with the reward-guidance kernel not built: "
                                               f"{_ext.ext_error}"),
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
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype)
    logits[:, :5] = -math.inf  # masked tokens
    reward = torch.randn(B, V, generator=g)
    beta = torch.tensor([0.0, 0.5, 1.0, 2.5, -1.5])[torch.arange(B) % 5]
    top_k = torch.tensor([0, 1, 5, 17, 50, V - 1, V], dtype=torch.int32)[(torch.arange(B) * 3) % 7]
    return logits.to(DEVICE), reward.to(DEVICE), beta.to(DEVICE), top_k.to(DEVICE)


def cuda_guided(logits, reward, beta, top_k, weights=None, out=None):
    from pllm_kernels.cuda.decoding import reward_guided_cuda

    B, V = logits.shape
    out = torch.full((B, V), math.nan, device=logits.device) if out is None else out
    reward_guided_cuda(out, logits, reward, beta, top_k, weights, _emulate=ON_EMU)
    return out


def _sync():
    if not ON_EMU:
        torch.cuda.synchronize()


def _check(out, logits, reward, beta, top_k, msg, weights=None):
    want = reward_guided_ref(logits.cpu(), reward.cpu(), beta.cpu(), top_k.cpu(),
                             weights=None if weights is None else weights.cpu())
    out = out.cpu()
    assert torch.equal(torch.isneginf(out), torch.isneginf(want)), f"{msg}: candidate set differs"
    fin = torch.isfinite(want)
    assert torch.isfinite(out[fin]).all(), msg
    err = (out.double()[fin] - want[fin]).abs().max().item()
    assert err <= 1e-5, f"{msg}: off by {err}"


# ------------------------------------------------------------------------------------------------ vs reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", _names(list(CASES)))
def test_reward_matches_reference(name, dtype):
    args = _case(name, dtype)
    out = cuda_guided(*args)
    _sync()
    _check(out, *args, f"{name} {dtype}")


@gpu_ops
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["llama3_b64", "gpt2_odd_b16"])
def test_matches_triton(name, dtype):
    from pllm_kernels.triton.decoding import reward_guided_triton

    args = _case(name, dtype, seed=1)
    out = cuda_guided(*args)
    tout = torch.empty_like(out)
    reward_guided_triton(tout, *args)
    _sync()
    assert torch.equal(torch.isneginf(out), torch.isneginf(tout))
    fin = torch.isfinite(tout)
    assert (out[fin] - tout[fin]).abs().max().item() <= 1e-5


@gpu_ops
def test_ops_auto_and_cuda_backend():
    from pllm_kernels.ops import reward_guided_logprobs
    from pllm_kernels.ops._backend import pick_backend

    assert pick_backend("reward_guided", torch.device("cuda"), torch.bfloat16, "auto") == "cuda"
    logits, reward, beta, top_k = _case("llama3_b8", torch.bfloat16, seed=2)
    want = cuda_guided(logits, reward, beta, top_k)
    for backend in ("auto", "cuda"):
        got = reward_guided_logprobs(logits, reward, beta, top_k, backend=backend)
        assert_bitwise_equal(got, want, msg=f"reward_guided_logprobs {backend}")
    B, V = logits.shape
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(B, 3, V, generator=g).cuda()
    weights = torch.rand(B, 3, generator=g).cuda()
    got = reward_guided_logprobs(logits, rewards, beta, top_k, weights=weights, backend="cuda")
    _check(got, logits, rewards, beta, top_k, "multi-objective", weights=weights)
    k = torch.full((B,), 9, dtype=torch.int32, device="cuda")
    per_cand = torch.randn(B, 9, generator=g).cuda()
    got = reward_guided_logprobs(logits, per_cand, beta, k, backend="cuda")
    _check(got, logits, per_cand, beta, k, "per-candidate")


# ------------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_alone_equals_row_in_batch(dtype):
    name = "small" if ON_EMU or SANITIZER else "llama3_b64"
    logits, reward, beta, top_k = _case(name, dtype, seed=3)
    out = cuda_guided(logits, reward, beta, top_k)
    for b in (0, logits.shape[0] - 1):
        one = cuda_guided(logits[b : b + 1].clone(), reward[b : b + 1].clone(), beta[b : b + 1].clone(),
                          top_k[b : b + 1].clone())
        _sync()
        assert_bitwise_equal(one, out[b : b + 1], msg=f"row {b}")


@pytest.mark.skipif(ON_EMU, reason="CUDA graphs: GPU only")
def test_cuda_graph_capture_and_replay():
    bufs = [t.clone() for t in _case("small", torch.bfloat16, seed=5)]
    out = torch.empty(bufs[0].shape, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cuda_guided(*bufs, out=out)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        cuda_guided(*bufs, out=out)
    for seed in range(3):
        new = _case("small", torch.bfloat16, seed=10 + seed)
        for buf, t in zip(bufs, new):
            buf.copy_(t)
        g.replay()
        torch.cuda.synchronize()
        want = cuda_guided(*new)
        torch.cuda.synchronize()
        assert_bitwise_equal(out, want, msg=f"replay {seed}")
        _check(out, *new, f"replay {seed}")


@pytest.mark.skipif(ON_EMU, reason="compares the GPU with the emulator")
@pytest.mark.parametrize("dtype", DTYPES)
def test_device_bits_equal_the_emulator(dtype):
    """The premise of the CPU tests: the GPU gives the CPU emulator's bits (fmath.cuh's exp / log, never-fused
    products and sums)."""
    from pllm_kernels.cuda.decoding import reward_guided_cuda

    args = _case("small", dtype, seed=6)
    out = cuda_guided(*args)
    eout = torch.empty(out.shape)
    reward_guided_cuda(eout, *(t.cpu() for t in args), _emulate=True)
    torch.cuda.synchronize()
    assert_bitwise_equal(out.cpu(), eout, msg=f"{dtype}")


# ------------------------------------------------------------------------------------------------ fused_sample
def _fused_case(name, dtype, seed=0):
    B, V = CASES[name]
    g = torch.Generator().manual_seed(seed)
    src = (torch.randn(2, B, V, generator=g) * 3).to(dtype)
    src[:, :, :5] = -math.inf
    coefs = torch.tensor([[1.5, -0.5]] * B)
    reward = torch.randn(B, V, generator=g)
    beta = torch.tensor([0.0, 0.5, 1.0, 2.5, -1.5])[torch.arange(B) % 5]
    rk = torch.tensor([0, 1, 5, 17, 50, V - 1, V], dtype=torch.int32)[(torch.arange(B) * 3) % 7]
    temp = torch.tensor([0.0, 1.0, 0.7, 1.3])[torch.arange(B) % 4]
    topk = torch.tensor([0, 40, 0, 5], dtype=torch.int32)[torch.arange(B) % 4]
    topp = torch.tensor([1.0, 0.9, 0.6, 1.0])[torch.arange(B) % 4]
    minp = torch.tensor([0.0, 0.0, 0.05, 0.0])[torch.arange(B) % 4]
    seed_t, step = torch.arange(B, dtype=torch.int64) + 11, torch.full((B,), 4, dtype=torch.int64)
    return [t.to(DEVICE) for t in (src, coefs, reward, beta, rk, temp, topk, topp, minp, seed_t, step)]


def _fused_spec(src, coefs, reward, beta, rk, temp, topk, topp, minp, seed_t, step):
    from pllm_kernels.reference.decoding import sample_ref

    z, _ = fused_spec_guided(src, coefs, reward, beta, rk)
    return sample_ref(z, temp.cpu(), topk.cpu(), topp.cpu(), minp.cpu(), seed_t.cpu(), step.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", _names(["llama3_b8", "gpt2_odd_b16", "small"]))
def test_fused_sample_matches_spec(name, dtype):
    """``fused_sample`` on the CUDA kernels (mix -> guidance with the candidates of sources[0] -> sampler): the spec's
    tokens and log-probs at real vocabularies, per-row beta / reward top_k / sampling parameters."""
    args = _fused_case(name, dtype)
    tok, lp = run_fused_cuda(*args, ON_EMU)
    _sync()
    want, want_lp = _fused_spec(*args)
    assert torch.equal(tok.cpu(), want), f"{name} {dtype}"
    assert (lp.cpu().double() - want_lp).abs().max().item() <= 1e-4


@gpu_ops
def test_fused_sample_op_cuda_equals_triton():
    from pllm_kernels.ops import fused_sample

    src, coefs, reward, beta, rk, temp, topk, topp, minp, seed_t, step = _fused_case("llama3_b8", torch.bfloat16, 3)
    kw = dict(reward=reward, beta=beta, reward_top_k=rk, temperature=temp, top_k=topk, top_p=topp, min_p=minp,
              seed=seed_t, step=step)
    t_cuda, lp_cuda = fused_sample(src, coefs, backend="cuda", **kw)
    t_tri, lp_tri = fused_sample(src, coefs, backend="triton", **kw)
    assert torch.equal(t_cuda, t_tri)
    assert (lp_cuda - lp_tri).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_sample_row_alone_equals_row_in_batch(dtype):
    args = _fused_case("small", dtype, 9)
    tok, lp = run_fused_cuda(*args, ON_EMU)
    for i in (0, 3, 7):
        one = [t[:, i : i + 1] if j == 0 else t[i : i + 1] for j, t in enumerate(args)]
        t1, l1 = run_fused_cuda(*one, ON_EMU)
        _sync()
        assert int(t1) == int(tok[i])
        assert_bitwise_equal(l1.cpu(), lp[i : i + 1].cpu(), msg=f"row {i} alone vs in the batch")


@pytest.mark.skipif(ON_EMU, reason="CUDA graphs: GPU only")
def test_fused_sample_cuda_graph_capture_and_replay():
    """The three launches of fused_sample captured in one CUDA graph, replayed on new logits / rewards / seeds: the
    eager launches' tokens and bits."""
    bufs = [t.clone() for t in _fused_case("small", torch.bfloat16, 21)]
    B = bufs[0].shape[1]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run_fused_cuda(*bufs, False)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        tok, lp = run_fused_cuda(*bufs, False)
    for seed in range(3):
        new = _fused_case("small", torch.bfloat16, 30 + seed)
        for buf, t in zip(bufs, new):
            buf.copy_(t)
        g.replay()
        torch.cuda.synchronize()
        want_tok, want_lp = run_fused_cuda(*new, False)
        torch.cuda.synchronize()
        assert torch.equal(tok, want_tok) and tok.shape == (B,), f"replay {seed}"
        assert_bitwise_equal(lp, want_lp, msg=f"replay {seed}")


@pytest.mark.skipif(ON_EMU, reason="compares the GPU with the emulator")
def test_fused_sample_device_bits_equal_the_emulator():
    args = _fused_case("small", torch.float16, 41)
    tok, lp = run_fused_cuda(*args, False)
    torch.cuda.synchronize()
    tok_e, lp_e = run_fused_cuda(*[t.cpu() for t in args], True)
    assert torch.equal(tok.cpu(), tok_e)
    assert_bitwise_equal(lp.cpu(), lp_e, msg="device vs emulator")


def test_sanitizer_fused_sample():
    """fused_sample's three launches on tiny rows (the guidance kernel's separate-candidate variants)."""
    for dtype in DTYPES:
        args = _fused_case("small", dtype, 5)
        tok, _ = run_fused_cuda(*args, ON_EMU)
        _sync()
        want, _ = _fused_spec(*args)
        assert torch.equal(tok.cpu(), want), dtype


# ------------------------------------------------------------------------------------------------ sanitizer subset
@pytest.mark.parametrize("dtype", DTYPES)
def test_sanitizer_every_kernel_variant(dtype):
    """Tiny rows (V = 77 < the block: idle threads; ties at the candidate threshold: the index bisection), checked
    against the spec: the compute-sanitizer workload (memcheck; racecheck on the block reductions)."""
    g = torch.Generator().manual_seed(7)
    B, V = 8, 77
    logits = torch.round(torch.randn(B, V, generator=g) * 4) / 2
    logits[3, 10:] = -math.inf
    logits = logits.to(dtype).to(DEVICE)
    reward = torch.randn(B, V, generator=g).to(DEVICE)
    beta = torch.tensor([0.0, 1.0, 0.8, 1.2, 1.0, 0.5, 2.0, -1.0]).to(DEVICE)
    top_k = torch.tensor([0, 0, 3, 20, 7, 76, 1, 77], dtype=torch.int32).to(DEVICE)
    out = cuda_guided(logits, reward, beta, top_k)
    _sync()
    _check(out, logits, reward, beta, top_k, f"sanitizer {dtype}")
