"""Ahead-of-time compilation of every multi-LoRA Triton kernel at its production configuration (no GPU needed).

The variants come from ``pllm_kernels.triton.lora.aot_variants``, built from ``LORA_CONFIGS`` and the same
constexpr helpers the launchers use, so this compiles exactly what runs. For sm_80 and sm_90, fp16 and bf16:
no register spills (cuobjdump's per-kernel STACK/LOCAL bytes, where ptxas puts spills, must be 0: triton's
``n_spills`` is only filled in when a driver loads the binary), and tensor-core instructions in the matmul
kernels (``mma`` on sm_80, ``wgmma`` or ``mma`` on sm_90: the BLOCK_M = 16/32 chunks are below wgmma's
64-row minimum and use ``mma.sync``). The BGMV and fused kernels serve one token per program (M = 1): they are
bandwidth-bound FMA + reduction kernels that cannot use tensor cores, so no ``mma`` is asserted for them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
from pllm_kernels.triton import lora as tl_lora  # noqa: E402

ARCHS = (80, 90)
DTYPES = ("fp16", "bf16")
SCRIPT = Path(__file__).with_name("aot_compile.py")
MMA_KERNELS = ("shrink_sgmv", "expand_sgmv")  # tensor-core kernels; bgmv/fused are M = 1 FMA kernels


@pytest.fixture(scope="module")
def aot_results():
    """Compile in a child process without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` functions are
    interpreted and cannot be compiled), so this test runs in the same pytest session as the interpreter tests."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    archs, dtypes = ",".join(map(str, ARCHS)), ",".join(DTYPES)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--archs", archs, "--dtypes", dtypes], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for r in results:
        print(f"sm_{r['arch']} {r['dtype']} {r['name']:24s} regs={r['regs']:3d} stack={r['stack']} "
              f"smem={r['shared']} mma={r['mma']} wgmma={r['wgmma']}")
    return results


def test_every_variant_compiled(aot_results):
    names = {v[0] for v in tl_lora.aot_variants("fp16")}
    for kernel in ("shrink_sgmv", "expand_sgmv", "shrink_bgmv", "expand_bgmv", "fused"):
        assert any(n.startswith(kernel) for n in names), kernel
    assert len(aot_results) == len(names) * len(ARCHS) * len(DTYPES)


def test_no_register_spills(aot_results):
    spilled = [r for r in aot_results if r["stack"] or r["local"]]
    assert not spilled, spilled
    assert all(r["regs"] <= 255 for r in aot_results)


def test_tensor_cores_in_matmul_kernels(aot_results):
    for r in aot_results:
        if not r["name"].startswith(MMA_KERNELS):
            continue
        if r["arch"] == 80:
            assert r["mma"] and not r["wgmma"], r
        else:
            assert r["mma"] or r["wgmma"], r


def test_production_configs_are_dot_legal():
    for chunk in tl_lora.SGMV_CHUNKS:
        assert tl_lora.sgmv_block_m(chunk) == chunk  # BLOCK_M is the chunk: no masked tensor-core rows
    assert tl_lora.LORA_CONFIGS["expand_sgmv"]["BLOCK_R"] >= 16  # tl.dot K >= 16
    for rank, s in ((1, 1), (16, 3), (64, 3), (64, 4)):
        b = tl_lora.fused_blocks(rank, s)
        assert b["BLOCK_SR"] >= rank * s and b["BLOCK_K"] >= 16
