"""One backend table per op, an explicit ``backend=`` argument, ``PLLM_BACKEND`` read in one place, once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from lora_cases import make_case

import pllm_kernels
from pllm_kernels.ops import lora as ops
from pllm_kernels.ops._backend import TABLES, pick_backend


def test_every_op_declares_its_backends():
    table = pllm_kernels.backend_table()
    assert set(table) >= {"lora_shrink", "lora_expand", "lora_apply"}
    for op, backends in table.items():
        assert set(backends) == {"torch", "triton", "cuda"}, op
        assert backends["torch"], f"{op}: the torch backend is the fallback everywhere"
    # every op has CUDA kernels (the fused sampler: three launches of the mixing, guidance and sampling kernels)
    assert table["lora_apply"]["cuda"] and table["lora_shrink"]["cuda"] and table["lora_expand"]["cuda"]
    assert table["steer_add"]["cuda"] and table["steer_rmsnorm"]["cuda"] and table["mix_logprobs"]["cuda"]
    assert table["reward_guided"]["cuda"] and table["sample_tokens"]["cuda"] and table["fused_sample"]["cuda"]


def test_auto_on_cpu_is_torch_and_float64_is_always_torch():
    for op in TABLES:
        assert pick_backend(op, torch.device("cpu"), torch.float32, "auto") == "torch"
        assert pick_backend(op, torch.device("cpu"), torch.float64, "triton") == "torch"


@pytest.mark.skipif(bool(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")), reason="checks the non-interpreter")
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    c = make_case(T=3, h_in=8, slice_sizes=(4,), ranks=(2,), max_rank=2)
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors or TRITON_INTERPRET=1"):
        ops.lora_apply(c.y, c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, backend="triton")


def _child(code: str, env: dict) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)


def test_env_is_read_once_and_validated():
    code = ("import os, pllm_kernels as p; a = p.default_backend(); os.environ['PLLM_BACKEND'] = 'triton'; "
            "b = p.default_backend(); prev = p.set_default_backend('auto'); print(a, b, prev, p.default_backend())")
    r = _child(code, {"PLLM_BACKEND": "torch"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["torch", "torch", "torch", "auto"]
    r = _child("import pllm_kernels as p; p.default_backend()", {"PLLM_BACKEND": "cudaa"})
    assert r.returncode != 0 and "PLLM_BACKEND must be one of" in r.stderr


def test_default_backend_is_used_when_none_given(monkeypatch):
    """``backend=None`` follows the process default; an explicit argument wins over it."""
    from pllm_kernels.ops import _backend

    c = make_case(T=3, h_in=8, slice_sizes=(4,), ranks=(2,), max_rank=2)
    prev = _backend.set_default_backend("cuda")
    try:
        with pytest.raises(RuntimeError, match="backend='cuda' but the lora_apply inputs are on cpu"):
            ops.lora_apply(c.y.clone(), c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta)
        ops.lora_apply(c.y.clone(), c.x, c.lora_a, c.lora_b, c.slot_ranks, c.slot_scales, c.meta, backend="torch")
    finally:
        _backend.set_default_backend(prev)


def test_auto_keeps_prefill_sized_lora_calls_on_triton(monkeypatch):
    """Where a CUDA device and the extension are present, ``auto`` sends decode-sized LoRA calls to the CUDA kernels
    and prefill-sized ones to Triton (tensor cores); ``backend="cuda"`` always runs CUDA. Simulated on CPU."""
    from pllm_kernels.ops import lora as ops_lora

    table = ops_lora._APPLY
    monkeypatch.setattr(table, "pick", lambda backend, device, dtype: ("cuda", table.impls["cuda"]))
    dev = torch.device("cpu")
    assert ops_lora._pick(table, "auto", dev, torch.float16, ops_lora.CUDA_AUTO_MAX_PAIRS)[0] == "cuda"
    assert ops_lora._pick(table, "auto", dev, torch.float16, ops_lora.CUDA_AUTO_MAX_PAIRS + 1)[0] == "triton"
    assert ops_lora._pick(table, "cuda", dev, torch.float16, 10_000)[0] == "cuda"
