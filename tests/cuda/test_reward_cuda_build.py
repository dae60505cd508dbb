"""The CUDA ``reward_guided`` kernel (token-level reward guidance) on a machine without GPU (CI).

* the extension lists the launcher; the resource report holds its three kernels for sm_80 and sm_90 without spills;
* the device code on the extension's CPU emulator against the float64 spec (``reward_guided_ref``): exactly the spec's
  ``-inf`` pattern (the candidate set: the first ``top_k`` tokens in (logit desc, index asc) order) and finite values
  within 1e-5 (the Triton tests' tolerance): per-row beta (incl. 0 with top_k 0: the base log-softmax) and top_k in
  {0, 1, 5, 17, V-1, V}, fp32 / fp16 / bf16 logits, ties (the k-th logit tied: index bisection; a row of equal
  logits), ``-inf`` logits (top_k above the finite count), odd vocabularies (1001, 32003), V = 1;
* the multi-objective ``(B, M, V)`` and per-candidate ``(B, k)`` forms (reduced to token rewards in Python);
* bitwise: a row alone vs in a batch (and strided rows / outputs);
* errors, the op table's ``cuda`` entry and ``auto`` falling back without a device.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from utils import assert_bitwise_equal

from pllm_kernels import _ext
from pllm_kernels.reference.decoding import reward_guided_ref

DEFAULT_ARCHS = os.environ.get("PLLM_CUDA_ARCHS", "80;90").replace(" ", "") in ("80;90", "80,90")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NEG_INF = -math.inf


def _has_reward() -> bool:
    return _ext.HAS_CUDA_EXT and hasattr(_ext.ext(), "reward_guided")


needs_ext = pytest.mark.skipif(not _has_reward(), reason=f"CUDA extension with the reward-guidance kernel not built: "
                                                         f"{_ext.ext_error}")


def _rows(B: int, V: int):
    """Per-row beta (incl. 0) and top_k in {0, 1, 5, 17, V-1, V}, every pair over the rows."""
    beta = torch.tensor([0.0, 0.5, 1.0, 2.5, -1.5])[torch.arange(B) % 5]
    ks = [0, 1, 5, 17, V - 1, V]
    top_k = torch.tensor([min(max(k, 0), V) for k in ks], dtype=torch.int32)[(torch.arange(B) // 5 + torch.arange(B))
                                                                             % 6]
    return beta, top_k


def _guided(logits, reward, beta, top_k, weights=None, out=None):
    from pllm_kernels.cuda.decoding import reward_guided_cuda

    B, V = logits.shape
    out = torch.full((B, V), math.nan) if out is None else out
    reward_guided_cuda(out, logits, reward, beta, top_k, weights, _emulate=True)
    return out


def _check(out, logits, reward, beta, top_k, weights=None, msg=""):
    """Exactly the spec's ``-inf`` pattern; finite values within 1e-5 (absolute) of the float64 spec."""
    want = reward_guided_ref(logits, reward, beta, top_k, weights=weights)
    assert torch.equal(torch.isneginf(out), torch.isneginf(want)), f"{msg}: candidate set differs"
    fin = torch.isfinite(want)
    assert torch.isfinite(out[fin]).all(), msg
    err = (out.double()[fin] - want[fin]).abs().max().item() if fin.any() else 0.0
    assert err <= 1e-5, f"{msg}: off by {err}"
    return want


# ------------------------------------------------------------------------------------------------ build and report
@needs_ext
def test_extension_lists_reward_launcher_and_constants():
    from pllm_kernels.cuda.decoding import MAX_VOCAB

    C = _ext.ext()
    for name in ("reward_guided", "reward_guided_emu", "reward_kernels", "reward_constants"):
        assert callable(getattr(C, name)), name
    assert C.reward_constants()["max_vocab"] == MAX_VOCAB
    dts = ("float32", "float16", "bfloat16")
    assert sorted(C.reward_kernels()) == sorted([f"reward_guided<{d}>" for d in dts]
                                                + [f"reward_guided<float32,candidates={d}>" for d in dts])
    assert callable(C.reward_guided_cand) and callable(C.reward_guided_cand_emu)


@needs_ext
def test_resource_report_covers_every_reward_kernel_without_spills():
    if not DEFAULT_ARCHS:
        pytest.skip("non-default PLLM_CUDA_ARCHS")
    from test_lora_cuda_build import parse_ptxas_report

    path = Path(_ext.ext().__file__).with_name("_C.resources.txt")
    if not path.exists():
        pytest.fail(f"resource report {path} missing (rebuild: python setup.py build_ext --inplace)")
    entries = [e for e in parse_ptxas_report(path.read_text()) if "reward_guided_kernel" in e.name]
    archs = {}
    for e in entries:
        archs.setdefault(e.name, set()).add(e.arch)
        assert e.registers > 0 and e.spill_stores == 0 and e.spill_loads == 0 and e.stack == 0, e
        assert e.registers <= 128 and e.smem <= 1024, e  # 512-thread blocks: up to 128 registers without spilling
    assert len(archs) == 6, sorted(archs)  # 3 logits dtypes + 3 candidate dtypes (fused_sample's guidance step)
    for name, got in archs.items():
        assert {"sm_80", "sm_90"} <= got, f"{name}: compiled for {sorted(got)}"


# ------------------------------------------------------------------------------------------------ vs the spec
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_matches_spec_per_row_beta_and_top_k(dtype):
    gen = torch.Generator().manual_seed(1)
    B, V = 30, 1000
    logits = (torch.randn(B, V, generator=gen) * 3).to(dtype)
    reward = torch.randn(B, V, generator=gen)
    beta, top_k = _rows(B, V)
    out = _guided(logits, reward, beta, top_k)
    _check(out, logits, reward, beta, top_k, msg=f"{dtype}")
    k = top_k.long()
    assert torch.equal(torch.isfinite(out).sum(1), torch.where(k == 0, V, k))
    base = (beta == 0) & (top_k == 0)  # the base model: log_softmax(logits)
    assert base.any()
    want = torch.log_softmax(logits[base].double(), -1)
    assert (out[base].double() - want).abs().max().item() <= 1e-5


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_ties(dtype):
    """The k-th logit inside a group of equal logits (index bisection: the lowest indices win), a row of equal
    logits, consecutive tied indices."""
    gen = torch.Generator().manual_seed(2)
    B, V = 24, 600
    logits = torch.round(torch.randn(B, V, generator=gen) * 4) / 2  # few distinct values: many ties
    logits[0] = 0.5
    logits[1, 100:140] = 9.0  # consecutive ties at the top
    logits = logits.to(dtype)
    reward = torch.randn(B, V, generator=gen)
    beta, top_k = _rows(B, V)
    top_k[0], top_k[1] = 7, 23
    out = _guided(logits, reward, beta, top_k)
    _check(out, logits, reward, beta, top_k, msg=f"ties {dtype}")
    assert torch.isfinite(out[0, :7]).all() and torch.isneginf(out[0, 7:]).all()
    assert torch.isfinite(out[1, 100:123]).all() and torch.isneginf(out[1, 123:]).all()


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_neg_inf_logits(dtype):
    """``-inf`` logits: never candidates' finite values; top_k above the finite count; a single finite logit."""
    gen = torch.Generator().manual_seed(3)
    B, V = 12, 333
    logits = torch.randn(B, V, generator=gen) * 3
    logits[:, :5] = NEG_INF
    logits[2, 10:] = NEG_INF  # 5 finite logits, top_k 17 / V-1 / V above them
    logits[3, 6:] = NEG_INF  # one finite logit (index 5)
    logits = logits.to(dtype)
    reward = torch.randn(B, V, generator=gen)
    beta, top_k = _rows(B, V)
    top_k[2], top_k[3] = 17, 5
    out = _guided(logits, reward, beta, top_k)
    _check(out, logits, reward, beta, top_k, msg=f"-inf {dtype}")
    assert torch.isneginf(out[:, :5]).all()
    assert out[3, 5].item() == 0.0 and torch.isneginf(out[3, 6:]).all()


@needs_ext
@pytest.mark.parametrize("V,dtype", [(1001, torch.float16), (1001, torch.float32), (32003, torch.bfloat16),
                                     (32003, torch.float32)])
def test_emulated_odd_vocabularies(V, dtype):
    gen = torch.Generator().manual_seed(4)
    B = 6
    logits = (torch.randn(B, V, generator=gen) * 3).to(dtype)
    reward = torch.randn(B, V, generator=gen)
    beta, top_k = _rows(B, V)
    top_k = torch.tensor([0, 1, 5, 17, V - 1, V], dtype=torch.int32)
    _check(_guided(logits, reward, beta, top_k), logits, reward, beta, top_k, msg=f"V={V} {dtype}")


@needs_ext
def test_emulated_tiny_vocabularies():
    for V in (1, 2, 3):
        logits = torch.tensor([[0.3, -1.0, 0.3][:V]] * (V + 1))
        reward = torch.randn(V + 1, V, generator=torch.Generator().manual_seed(V))
        beta = torch.full((V + 1,), 1.25)
        top_k = torch.arange(V + 1, dtype=torch.int32)
        _check(_guided(logits, reward, beta, top_k), logits, reward, beta, top_k, msg=f"V={V}")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_multi_objective_and_per_candidate(dtype):
    gen = torch.Generator().manual_seed(5)
    B, M, V = 6, 3, 700
    logits = (torch.round(torch.randn(B, V, generator=gen) * 6) / 2).to(dtype)
    reward = torch.randn(B, M, V, generator=gen)
    weights = torch.rand(B, M, generator=gen)
    beta = torch.tensor([0.0, 0.5, 1.0, 2.5, 1.5, 0.8])
    top_k = torch.tensor([0, 1, 5, 17, 0, 5], dtype=torch.int32)
    out = _guided(logits, reward, beta, top_k, weights)
    _check(out, logits, reward, beta, top_k, weights=weights, msg="multi-objective")
    k = 9
    per_cand = torch.randn(B, k, generator=gen)
    top_k = torch.full((B,), k, dtype=torch.int32)
    out = _guided(logits, per_cand, beta, top_k)
    _check(out, logits, per_cand, beta, top_k, msg="per-candidate")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_emulated_row_alone_equals_row_in_batch(dtype):
    gen = torch.Generator().manual_seed(6)
    B, V = 12, 777
    big = (torch.randn(2 * B, V + 5, generator=gen) * 3).to(dtype)
    logits = big[::2, 2 : V + 2]  # strided rows, unit stride along V
    rbig = torch.randn(B, V + 3, generator=gen)
    reward = rbig[:, 1 : V + 1]
    beta, top_k = _rows(B, V)
    obig = torch.full((B, V + 4), math.nan)
    out = obig[:, 3 : V + 3]
    _guided(logits, reward, beta, top_k, out=out)
    assert torch.isnan(obig[:, :3]).all() and torch.isnan(obig[:, V + 3 :]).all()
    _check(out, logits, reward, beta, top_k, msg="strided")
    for b in (0, 5, B - 1):
        one = _guided(logits[b : b + 1].contiguous(), reward[b : b + 1].contiguous(), beta[b : b + 1].clone(),
                      top_k[b : b + 1].clone())
        assert_bitwise_equal(one, out[b : b + 1], msg=f"row {b}")
    t = out.t().contiguous().t()  # non-unit stride along V: computed into a copy
    _guided(logits, reward, beta, top_k, out=t)
    assert_bitwise_equal(t, out, msg="non-unit output stride")


@needs_ext
def test_emulated_matches_torch_backend_and_ops_wiring():
    from pllm_kernels.ops import decoding as ops_dec
    from pllm_kernels.torch_ops.decoding import reward_guided_torch

    gen = torch.Generator().manual_seed(7)
    B, V = 16, 3000
    logits = (torch.randn(B, V, generator=gen) * 3).to(torch.bfloat16)
    reward = torch.randn(B, V, generator=gen)
    beta, top_k = _rows(B, V)
    want = torch.empty(B, V)
    reward_guided_torch(want, logits, reward, beta, top_k)
    out = _guided(logits, reward, beta, top_k)
    assert torch.equal(torch.isneginf(out), torch.isneginf(want))
    fin = torch.isfinite(want)
    assert (out[fin] - want[fin]).abs().max() <= 1e-5
    assert ops_dec._REWARD.impls["cuda"] is not None


@needs_ext
def test_gpu_test_module_passes_on_the_emulator():
    """tests/cuda/test_reward_cuda_gpu.py runs for real only on a GPU; here its small cases run on the emulator."""
    env = {**os.environ, "PLLM_DECODING_GPU_TESTS_ON_EMULATOR": "1"}
    env.pop("PLLM_SANITIZER", None)
    path = Path(__file__).with_name("test_reward_cuda_gpu.py")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
                          capture_output=True, text=True, env=env, cwd=str(Path(__file__).parents[2]), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


# ------------------------------------------------------------------------------------------------ errors, supports
def _args(B=2, V=10):
    return (torch.empty(B, V), torch.randn(B, V), torch.randn(B, V), torch.ones(B), torch.zeros(B, dtype=torch.int32))


def test_cpu_tensors_raise_clear_error():
    from pllm_kernels.cuda.decoding import reward_guided_cuda

    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        reward_guided_cuda(*_args())


@needs_ext
def test_launcher_without_device_raises():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _ext.ext().reward_guided(*([4096] * 5), 2, 10, 10, 10, 10, 0, 0)


@needs_ext
def test_emulated_argument_errors():
    from pllm_kernels.cuda.decoding import reward_guided_cuda

    C = _ext.ext()
    out, logits, reward, beta, top_k = _args()
    ptrs = [t.data_ptr() for t in (out, logits, reward, beta, top_k)]
    with pytest.raises(RuntimeError, match="unsupported dtype code"):
        C.reward_guided_emu(*ptrs, 2, 10, 10, 10, 10, 5)
    with pytest.raises(RuntimeError, match="vocabularies of 1..16777216"):
        C.reward_guided_emu(*ptrs, 2, 0, 10, 10, 10, 0)
    with pytest.raises(RuntimeError, match="null pointer"):
        C.reward_guided_emu(0, *ptrs[1:], 2, 10, 10, 10, 10, 0)
    with pytest.raises(RuntimeError, match="float32 / float16 / bfloat16"):
        reward_guided_cuda(out, logits.double(), reward, beta, top_k, _emulate=True)
    with pytest.raises(RuntimeError, match="expected out"):
        reward_guided_cuda(out.double(), logits, reward, beta, top_k, _emulate=True)
    with pytest.raises(RuntimeError, match="beta and top_k"):
        reward_guided_cuda(out, logits, reward, beta[:1], top_k, _emulate=True)
    with pytest.raises(RuntimeError, match="need weights"):
        reward_guided_cuda(out, logits, reward[:, None], beta, top_k, _emulate=True)
    reward_guided_cuda(out[:0], logits[:0], reward[:0], beta[:0], top_k[:0], _emulate=True)  # B = 0: no launch


def test_supports_and_op_table():
    """The op table reports the CUDA kernel; ``auto`` on CPU tensors (or without a usable device) picks Triton /
    torch, ``backend='cuda'`` there raises a clear RuntimeError."""
    import pllm_kernels
    from pllm_kernels.ops import reward_guided_logprobs
    from pllm_kernels.ops._backend import pick_backend

    assert pllm_kernels.backend_table()["reward_guided"] == {"torch": True, "triton": True, "cuda": True}
    assert pick_backend("reward_guided", torch.device("cpu"), torch.bfloat16, "auto") == "torch"
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        reward_guided_logprobs(torch.randn(2, 10), torch.randn(2, 10), 1.0, backend="cuda")
    if not _ext.cuda_ext_usable():
        assert pick_backend("reward_guided", torch.device("cuda"), torch.bfloat16, "auto") in ("torch", "triton")
    else:
        assert pick_backend("reward_guided", torch.device("cuda"), torch.bfloat16, "auto") == "cuda"
    assert pick_backend("reward_guided", torch.device("cuda"), torch.float64, "auto") != "cuda"
    got = reward_guided_logprobs(torch.randn(2, 10), torch.randn(2, 10), 1.0, top_k=3)  # auto on CPU: torch
    assert torch.isfinite(got).sum().item() == 6
