"""The CUDA ``fused_sample`` (mixing + token-level guidance + sampling) on a machine without GPU (CI), on the
extension's CPU emulator:

* the guidance step's kernel variant (values: the mixed float32 log-probs; candidates: the first ``top_k`` tokens of
  another row, ``sources[0]``): exactly the spec's ``-inf`` pattern (the candidates of the base logits, not of the
  mixed ones) and finite values within 1e-5 of the float64 spec, fp32 / fp16 / bf16 base logits, ties, per-row beta /
  top_k;
* ``fused_sample_cuda`` against the float64 composition (``mix_logprobs_ref`` -> guidance with candidates from
  ``sources[0]`` -> ``sample_ref``): the spec's tokens, log-probs within tolerance, 1..3 sources, with and without
  rewards, greedy and sampled rows; a row alone equals the row in its batch (bitwise);
* the op table: ``backend="cuda"`` on CPU tensors is a clear error, ``auto`` falls back.
"""

from __future__ import annotations

import math

import pytest
import torch
from fused_cases import fused_spec_guided, run_fused_cuda
from utils import assert_bitwise_equal, assert_close

from pllm_kernels import _ext
from pllm_kernels.reference.decoding import mix_logprobs_ref, sample_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _has() -> bool:
    return _ext.HAS_CUDA_EXT and hasattr(_ext.ext(), "reward_guided_cand")


needs_ext = pytest.mark.skipif(not _has(), reason=f"CUDA extension with the fused sampler not built: {_ext.ext_error}")


def _logits(S, B, V, seed, dtype, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(S, B, V, generator=g) * scale).to(dtype)


def _guided_cand(z, base, reward, beta, rk):
    B, V = z.shape
    out = torch.full((B, V), math.nan)
    r = reward.float().contiguous()
    b32, k32 = beta.float().contiguous(), rk.to(torch.int32).contiguous()
    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    _ext.ext().reward_guided_cand_emu(out.data_ptr(), z.data_ptr(), base.data_ptr(), r.data_ptr(), b32.data_ptr(),
                                      k32.data_ptr(), B, V, z.stride(0), base.stride(0), r.stride(0), out.stride(0),
                                      codes[base.dtype])
    return out


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_guidance_candidates_come_from_the_base_row(dtype):
    """Coefficients that reorder the tokens (1.5 * base - 2 * context): the candidates are the base logits' top-k,
    not the mixed log-probs' (their sets differ here), values within 1e-5 of the spec."""
    S, B, V = 2, 12, 1001
    src = _logits(S, B, V, 1, dtype)
    src[0, 3, 10:20] = src[0, 3, 10]  # ties at the k-th base logit: index order decides
    coefs = torch.tensor([[1.5, -2.0]] * B)
    reward = torch.randn(B, V, generator=torch.Generator().manual_seed(2))
    beta = torch.tensor([0.0, 0.5, 1.0, 2.5, -1.5, 0.7] * 2)
    rk = torch.tensor([0, 1, 5, 17, V - 1, V, 3, 12, 40, 2, 0, 9], dtype=torch.int32)
    z = mix_logprobs_ref(src, coefs).float()
    out = _guided_cand(z, src[0].contiguous(), reward, beta, rk)
    want, cand = fused_spec_guided(src, coefs, reward, beta, rk)
    z_cand = torch.zeros_like(cand)
    for b in range(B):
        if 0 < int(rk[b]) < V:
            z_cand[b, torch.topk(z[b], int(rk[b])).indices] = True
    assert (z_cand != cand).any(), "the test needs rows whose mixed top-k differs from the base top-k"
    assert torch.equal(torch.isneginf(out), ~cand)
    assert (out[cand] - want[cand]).abs().max() <= 1e-5


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [1, 2, 3])
def test_fused_sample_cuda_matches_spec(S, dtype):
    B, V = 10, 700
    src = _logits(S, B, V, 10 + S, dtype)
    coefs = torch.tensor([[1.5, -0.5, 0.25][:S]] * B) if S > 1 else torch.ones(B, 1)
    reward = torch.randn(B, V, generator=torch.Generator().manual_seed(5))
    temp = torch.tensor([0.0, 1.0, 0.8, 1.0, 1.2, 0.0, 0.7, 1.0, 2.0, 0.5])
    topk = torch.tensor([0, 5, 0, 50, 1, 0, 20, 0, 3, 0], dtype=torch.int32)
    topp = torch.tensor([1.0, 0.9, 0.5, 1.0, 1.0, 0.8, 0.95, 1.0, 1.0, 0.3])
    minp = torch.tensor([0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.05, 0.0, 0.0, 0.0])
    seed, step = torch.arange(B, dtype=torch.int64) * 7 + 1, torch.full((B,), 3, dtype=torch.int64)
    beta = torch.tensor([0.8, 0.0, 1.5, -0.5, 0.8, 2.0, 0.3, 0.8, 1.0, 0.1])
    for r, rk in ((None, 0), (reward, 0), (reward, 5), (reward, torch.tensor([0, 1, 5, 17, V, 2, 9, 0, 30, 4]))):
        rk_t = torch.full((B,), rk, dtype=torch.int32) if isinstance(rk, int) else rk.to(torch.int32)
        tok, lp = run_fused_cuda(src, coefs, r, beta, rk_t, temp, topk, topp, minp, seed, step, True)
        z = fused_spec_guided(src, coefs, r, beta, rk_t)[0] if r is not None else mix_logprobs_ref(src, coefs)
        want, want_lp = sample_ref(z, temp, topk, topp, minp, seed, step)
        assert torch.equal(tok, want), (r is None, rk)
        assert_close(lp, want_lp, torch.float32, scale=20)
        # a row alone gives the same token and bits
        i = slice(6, 7)
        t1, l1 = run_fused_cuda(src[:, i], coefs[i], None if r is None else r[i], beta[i], rk_t[i], temp[i], topk[i],
                                topp[i], minp[i], seed[i], step[i], True)
        assert int(t1) == int(tok[i])
        assert_bitwise_equal(l1, lp[i], msg="row alone vs in the batch")


def test_op_table_and_errors():
    import pllm_kernels
    from pllm_kernels.ops import fused_sample
    from pllm_kernels.ops._backend import pick_backend

    assert pllm_kernels.backend_table()["fused_sample"]["cuda"]
    assert pick_backend("fused_sample", torch.device("cpu"), torch.float32, "auto") == "torch"
    src = torch.randn(2, 3, 50)
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        fused_sample(src, torch.tensor([[1.5, -0.5]] * 3), backend="cuda")
    tok, lp = fused_sample(src, torch.tensor([[1.5, -0.5]] * 3), temperature=0.0)  # auto on CPU: torch
    assert torch.equal(tok, mix_logprobs_ref(src, torch.tensor([[1.5, -0.5]] * 3)).argmax(-1))
