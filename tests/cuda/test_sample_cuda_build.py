"""The CUDA ``sample_tokens`` kernel on a machine without GPU (CI).

* the extension lists the launcher; the resource report holds its three kernels for sm_80 and sm_90 without spills;
* the device code on the extension's CPU emulator against the float64 spec (``sample_ref``), tokens exactly equal and
  log-probs within 1e-5: mixed per-row parameters (greedy / plain / top-k / top-p / min-p and their combinations,
  seeds with high bits), fp32 / fp16 / bf16 scores, ties (greedy ties, top-k / top-p boundaries inside groups of equal
  scores: the index bisection), ``-inf`` entries (top-k above the finite count, a single finite token), odd
  vocabularies (1000, 32003), small temperatures, every draw inside the spec's kept set over many seeds;
* bitwise: a row alone vs in a batch (and a strided batch);
* errors, ``supports()``, the op table's ``cuda`` entry and ``auto`` falling back without a device.
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
from pllm_kernels.reference.decoding import sample_ref

DEFAULT_ARCHS = os.environ.get("PLLM_CUDA_ARCHS", "80;90").replace(" ", "") in ("80;90", "80,90")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NEG_INF = -math.inf


def _has_sample() -> bool:
    return _ext.HAS_CUDA_EXT and hasattr(_ext.ext(), "sample_tokens")


needs_ext = pytest.mark.skipif(not _has_sample(), reason=f"CUDA extension with the sampler kernel not built: "
                                                         f"{_ext.ext_error}")


def _params(B: int, gen: torch.Generator) -> dict:
    """Mixed per-row parameters: every (T, top_k, top_p, min_p) class appears (as the Triton tests')."""
    T = torch.tensor([0.0, 0.7, 1.0, 1.5])[torch.arange(B) % 4]
    K = torch.tensor([0, 1, 5, 50], dtype=torch.int32)[(torch.arange(B) // 4) % 4]
    P = torch.tensor([1.0, 0.9, 0.5])[(torch.arange(B) // 2) % 3]
    MP = torch.tensor([0.0, 0.05])[(torch.arange(B) // 3) % 2]
    seed = torch.randint(-(2**62), 2**62, (B,), generator=gen)
    seed[:3] = torch.tensor([0, 12345, -1])[: min(B, 3)]  # small, and 2**64 - 1 (negative int64)
    step = torch.randint(0, 2**40, (B,), generator=gen)
    return dict(temperature=T, top_k=K, top_p=P, min_p=MP, seed=seed, step=step)


def _sample(scores, prm):
    from pllm_kernels.cuda.decoding import sample_tokens_cuda

    B = scores.shape[0]
    tok = torch.full((B,), -7, dtype=torch.int64)
    lp = torch.full((B,), math.nan)
    sample_tokens_cuda(tok, lp, scores, prm["temperature"], prm["top_k"], prm["top_p"], prm["min_p"], prm["seed"],
                       prm["step"], _emulate=True)
    return tok, lp


def _check(scores, prm, tok, lp, msg=""):
    rt, rl = sample_ref(scores, prm["temperature"], prm["top_k"], prm["top_p"], prm["min_p"], prm["seed"],
                        prm["step"])
    bad = (tok != rt).nonzero().flatten().tolist()
    assert not bad, f"{msg}: rows {bad} drew {tok[bad].tolist()}, the spec {rt[bad].tolist()}"
    assert torch.isfinite(lp).all(), msg
    err = (lp.double() - rl).abs().max().item()
    assert err <= 1e-5, f"{msg}: logprobs off by {err}"


# ------------------------------------------------------------------------------------------------ build and report
@needs_ext
def test_extension_lists_sample_launcher_and_constants():
    from pllm_kernels.cuda.decoding import MAX_VOCAB

    C = _ext.ext()
    for name in ("sample_tokens", "sample_tokens_emu", "sample_kernels", "sample_constants"):
        assert callable(getattr(C, name)), name
    assert C.sample_constants()["max_vocab"] == MAX_VOCAB
    assert sorted(C.sample_kernels()) == sorted(f"sample_tokens<{d}>" for d in ("float32", "float16", "bfloat16"))


@needs_ext
def test_resource_report_covers_every_sample_kernel_without_spills():
    if not DEFAULT_ARCHS:
        pytest.skip("non-default PLLM_CUDA_ARCHS")
    from test_lora_cuda_build import parse_ptxas_report

    path = Path(_ext.ext().__file__).with_name("_C.resources.txt")
    if not path.exists():
        pytest.fail(f"resource report {path} missing (rebuild: python setup.py build_ext --inplace)")
    entries = [e for e in parse_ptxas_report(path.read_text()) if "sample_tokens_kernel" in e.name]
    archs = {}
    for e in entries:
        archs.setdefault(e.name, set()).add(e.arch)
        assert e.registers > 0 and e.spill_stores == 0 and e.spill_loads == 0 and e.stack == 0, e
        assert e.registers <= 128 and e.smem <= 1024, e  # 512-thread blocks: up to 128 registers without spilling
    assert len(archs) == 3, sorted(archs)
    for name, got in archs.items():
        assert {"sm_80", "sm_90"} <= got, f"{name}: compiled for {sorted(got)}"


# ------------------------------------------------------------------------------------------------ vs the spec
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_matches_spec_mixed_rows(dtype):
    gen = torch.Generator().manual_seed(1)
    B, V = 48, 1000
    scores = (torch.randn(B, V, generator=gen) * 3).to(dtype)
    prm = _params(B, gen)
    tok, lp = _sample(scores, prm)
    _check(scores, prm, tok, lp, f"{dtype}")
    greedy = prm["temperature"] == 0
    assert torch.equal(tok[greedy], scores[greedy].float().argmax(-1))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_emulated_ties(dtype):
    """Many exactly equal scores (bf16 / fp16 / a 0.25 grid in fp32): top-k / top-p boundaries fall inside groups of
    ties (broken by index: the index bisection) and greedy ties go to the lowest index."""
    gen = torch.Generator().manual_seed(2)
    B, V = 24, 1000
    prm = _params(B, gen)
    prm["top_k"] = torch.tensor([0, 3, 7, 40], dtype=torch.int32)[torch.arange(B) % 4].roll(1)
    if dtype == torch.float32:
        scores = torch.round(torch.randn(B, V, generator=gen) * 3 * 4) / 4
    else:
        scores = (torch.randn(B, V, generator=gen) * 3).to(dtype)
    scores[0, [10, 20]] = scores[0].max() + 1  # a greedy tie at the top
    scores[4, [5, 6, 7, 900]] = scores[4].max() + 1  # four tied maxima, top_k = 3 (row 4): cut inside the group
    scores[5, :] = 0.0  # one group of V ties: top-k 3 / top-p by index
    tok, lp = _sample(scores, prm)
    _check(scores, prm, tok, lp, f"ties {dtype}")
    assert tok[0] == 10
    assert tok[4] in (5, 6, 7)


@needs_ext
def test_emulated_top_p_boundary_in_tie_group():
    """Top-p whose smallest prefix ends inside a group of equal scores (mass needs 2 of the 5 tied tokens)."""
    V = 300
    row = torch.full((V,), -30.0)
    row[[40, 80, 120, 160, 200]] = 0.0  # five equal tokens carry ~all the mass
    scores = row.expand(16, V).contiguous()
    n = scores.shape[0]
    prm = dict(temperature=torch.ones(n), top_k=torch.zeros(n, dtype=torch.int32), top_p=torch.full((n,), 0.3),
               min_p=torch.zeros(n), seed=torch.arange(n, dtype=torch.int64) * 31, step=torch.arange(n))
    tok, lp = _sample(scores, prm)
    _check(scores, prm, tok, lp, "top-p tie group")
    assert set(tok.tolist()) == {40, 80}
    prm["top_k"] = torch.full((n,), 4, dtype=torch.int32)  # top-k inside the group, then top-p inside it again
    prm["top_p"] = torch.full((n,), 0.6)
    tok, lp = _sample(scores, prm)
    _check(scores, prm, tok, lp, "top-k + top-p tie group")
    assert set(tok.tolist()) == {40, 80, 120}


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_emulated_consecutive_ties_many_seeds(dtype):
    """Groups of equal scores at consecutive indices, 32 seeds: the index cut of top-k / top-p must stop at exactly
    the right token (one more kept index would be the next member of the group)."""
    V, n = 64, 32
    row = torch.zeros(V)
    row[40:] = -1.0  # a second group
    scores = row.to(dtype).expand(n, V).contiguous()
    base = dict(temperature=torch.ones(n), top_k=torch.zeros(n, dtype=torch.int32), top_p=torch.ones(n),
                min_p=torch.zeros(n), seed=torch.arange(n, dtype=torch.int64) * 104729 + 1,
                step=torch.arange(n, dtype=torch.int64))
    for kw, allowed in ((dict(top_k=3), range(3)), (dict(top_p=0.1), None), (dict(top_k=45, top_p=0.5), None),
                        (dict(top_k=42), range(42))):
        prm = {k: v.clone() for k, v in base.items()}
        for key, v in kw.items():
            prm[key] = torch.full_like(prm[key], v)
        tok, lp = _sample(scores, prm)
        _check(scores, prm, tok, lp, f"{kw} {dtype}")
        if allowed is not None:
            assert set(tok.tolist()) <= set(allowed), kw
    assert set(_sample(scores, {**base, "top_k": torch.full((n,), 3, dtype=torch.int32)})[0].tolist()) == {0, 1, 2}


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_neg_inf_entries(dtype):
    """-inf scores (masked tokens): never drawn, top-k larger than the finite count, a single finite token, small
    temperatures."""
    gen = torch.Generator().manual_seed(3)
    B, V = 24, 1000
    scores = torch.randn(B, V, generator=gen) * 3
    scores[torch.rand(B, V, generator=gen) < 0.6] = NEG_INF
    scores[1, :] = NEG_INF
    scores[1, 637] = 0.5  # one finite token
    scores[2, 30:] = NEG_INF  # 30 finite tokens, top_k = 50 (row 2 is in the top_k=0 class: set it)
    scores = scores.to(dtype)
    prm = _params(B, gen)
    prm["top_k"][2] = 50
    prm["temperature"][5:8] = 0.05
    tok, lp = _sample(scores, prm)
    _check(scores, prm, tok, lp, f"-inf {dtype}")
    assert torch.isfinite(scores.float().gather(1, tok[:, None])).all()
    assert tok[1] == 637 and lp[1] == 0.0


@needs_ext
@pytest.mark.parametrize("V,dtype", [(1001, torch.float16), (32003, torch.bfloat16), (32003, torch.float32)])
def test_emulated_odd_vocabularies(V, dtype):
    gen = torch.Generator().manual_seed(V)
    B = 8
    scores = (torch.randn(B, V, generator=gen) * 3).to(dtype)
    prm = _params(B, gen)
    prm["top_k"] = torch.tensor([0, 5, 50, 1000, 0, 2, 0, 40], dtype=torch.int32)
    prm["top_p"] = torch.tensor([1.0, 0.9, 0.95, 0.5, 0.8, 1.0, 0.3, 1.0])
    tok, lp = _sample(scores, prm)
    _check(scores, prm, tok, lp, f"V={V} {dtype}")


@needs_ext
def test_emulated_kept_set_many_seeds():
    """One score row, 32 seeds: every draw lies in the spec's kept set (top-k 5 / top-p 0.5 / min-p 0.3 / all three)
    and different seeds draw different tokens."""
    gen = torch.Generator().manual_seed(4)
    V, n = 1000, 32
    row = torch.randn(V, generator=gen) * 2
    scores = row.expand(n, V).contiguous()
    order = torch.sort(row, descending=True, stable=True).indices
    q = torch.softmax(row.double(), -1)[order]
    cases = {"top_k": (dict(top_k=5), set(order[:5].tolist())),
             "top_p": (dict(top_p=0.5), set(order[:int((torch.cumsum(q, 0) < 0.5).sum()) + 1].tolist())),
             "min_p": (dict(min_p=0.3), set(order[q >= 0.3 * q[0]].tolist())),
             "all": (dict(top_k=20, top_p=0.7, min_p=0.1), None)}
    for name, (kw, allowed) in cases.items():
        prm = dict(temperature=torch.ones(n), top_k=torch.zeros(n, dtype=torch.int32), top_p=torch.ones(n),
                   min_p=torch.zeros(n), seed=torch.arange(n, dtype=torch.int64) * 7919,
                   step=torch.arange(n, dtype=torch.int64))
        for key, v in kw.items():
            prm[key] = torch.full_like(prm[key], v)
        tok, lp = _sample(scores, prm)
        if allowed is not None:
            assert set(tok.tolist()) <= allowed, name
        assert len(set(tok.tolist())) > 1, name
        _check(scores, prm, tok, lp, name)


# ------------------------------------------------------------------------------------------------ determinism
@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_emulated_row_alone_equals_row_in_batch(dtype):
    gen = torch.Generator().manual_seed(5)
    B, V = 12, 777
    big = (torch.randn(2 * B, V + 5, generator=gen) * 3).to(dtype)
    scores = big[::2, 2 : V + 2]  # strided rows, unit stride along V
    prm = _params(B, gen)
    tok, lp = _sample(scores, prm)
    _check(scores, prm, tok, lp, "strided")
    for b in (0, 5, B - 1):
        one = {k: v[b : b + 1].clone() for k, v in prm.items()}
        t1, l1 = _sample(scores[b : b + 1].contiguous(), one)
        assert t1[0] == tok[b]
        assert_bitwise_equal(l1, lp[b : b + 1], msg=f"row {b}")


@needs_ext
def test_emulated_matches_torch_backend_and_ops_wiring():
    from pllm_kernels.ops import decoding as ops_dec
    from pllm_kernels.torch_ops.decoding import sample_torch

    gen = torch.Generator().manual_seed(6)
    B, V = 16, 3000
    scores = (torch.randn(B, V, generator=gen) * 3).to(torch.bfloat16)
    prm = _params(B, gen)
    want_tok = torch.empty(B, dtype=torch.int64)
    want_lp = torch.empty(B)
    sample_torch(want_tok, want_lp, scores, *prm.values())
    tok, lp = _sample(scores, prm)
    assert torch.equal(tok, want_tok)
    assert (lp - want_lp).abs().max() <= 1e-5
    assert ops_dec._SAMPLE.impls["cuda"] is not None


@needs_ext
def test_gpu_test_module_passes_on_the_emulator():
    """tests/cuda/test_sample_cuda_gpu.py runs for real only on a GPU; here its small cases run on the emulator."""
    env = {**os.environ, "PLLM_DECODING_GPU_TESTS_ON_EMULATOR": "1"}
    env.pop("PLLM_SANITIZER", None)
    path = Path(__file__).with_name("test_sample_cuda_gpu.py")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
                          capture_output=True, text=True, env=env, cwd=str(Path(__file__).parents[2]), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


# ------------------------------------------------------------------------------------------------ errors, supports
def _args(B=2, V=10):
    scores = torch.randn(B, V)
    prm = dict(temperature=torch.ones(B), top_k=torch.zeros(B, dtype=torch.int32), top_p=torch.ones(B),
               min_p=torch.zeros(B), seed=torch.zeros(B, dtype=torch.int64), step=torch.zeros(B, dtype=torch.int64))
    return torch.empty(B, dtype=torch.int64), torch.empty(B), scores, prm


def test_cpu_tensors_raise_clear_error():
    from pllm_kernels.cuda.decoding import sample_tokens_cuda

    tok, lp, scores, prm = _args()
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        sample_tokens_cuda(tok, lp, scores, *prm.values())


@needs_ext
def test_launcher_without_device_raises():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _ext.ext().sample_tokens(*([4096] * 9), 2, 10, 10, 0, 0)


@needs_ext
def test_emulated_argument_errors():
    from pllm_kernels.cuda.decoding import sample_tokens_cuda

    C = _ext.ext()
    tok, lp, scores, prm = _args()
    ptrs = [tok.data_ptr(), lp.data_ptr(), scores.data_ptr(), *(t.data_ptr() for t in prm.values())]
    with pytest.raises(RuntimeError, match="unsupported dtype code"):
        C.sample_tokens_emu(*ptrs, 2, 10, 10, 5)
    with pytest.raises(RuntimeError, match="vocabularies of 1..16777216"):
        C.sample_tokens_emu(*ptrs, 2, 0, 10, 0)
    with pytest.raises(RuntimeError, match="null pointer"):
        C.sample_tokens_emu(0, *ptrs[1:], 2, 10, 10, 0)
    with pytest.raises(RuntimeError, match="float32 / float16 / bfloat16"):
        sample_tokens_cuda(tok, lp, scores.double(), *prm.values(), _emulate=True)
    with pytest.raises(RuntimeError, match="expected tokens"):
        sample_tokens_cuda(tok.int(), lp, scores, *prm.values(), _emulate=True)
    with pytest.raises(RuntimeError, match="per-row parameters"):
        sample_tokens_cuda(tok, lp, scores, *list(prm.values())[:-1], torch.zeros(3, dtype=torch.int64),
                           _emulate=True)
    empty = torch.empty(0, 10)
    sample_tokens_cuda(tok[:0], lp[:0], empty, *(t[:0] for t in prm.values()), _emulate=True)  # B = 0: no launch


def test_supports_and_op_table():
    """The op table reports the CUDA kernel; ``auto`` on CPU tensors (or without a usable device) picks Triton /
    torch, ``backend='cuda'`` there raises a clear RuntimeError."""
    import pllm_kernels
    from pllm_kernels.ops import sample_tokens
    from pllm_kernels.ops._backend import pick_backend

    assert pllm_kernels.backend_table()["sample_tokens"] == {"torch": True, "triton": True, "cuda": True}
    assert pick_backend("sample_tokens", torch.device("cpu"), torch.bfloat16, "auto") == "torch"
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        sample_tokens(torch.randn(2, 10), 1.0, backend="cuda")
    if not _ext.cuda_ext_usable():
        assert pick_backend("sample_tokens", torch.device("cuda"), torch.bfloat16, "auto") in ("torch", "triton")
    else:
        assert pick_backend("sample_tokens", torch.device("cuda"), torch.bfloat16, "auto") == "cuda"
    assert pick_backend("sample_tokens", torch.device("cuda"), torch.float64, "auto") != "cuda"
