"""Ahead-of-time compilation of every steering kernel variant (plain, fused Llama / Gemma RMSNorm; hidden blocks
1024..16384; K = 1, 2) for sm_80 and sm_90, fp16 and bf16, with no GPU: no register spills (cuobjdump STACK/LOCAL
bytes 0). The kernels are one-row-per-program reductions (no matmul), so no tensor cores are expected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
from pllm_kernels.triton import steer as tl_steer  # noqa: E402

SCRIPT = Path(__file__).with_name("aot_compile.py")


@pytest.fixture(scope="module")
def aot_results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--family", "steer", "--archs", "80,90", "--dtypes",
                           "fp16,bf16"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for r in results:
        print(f"sm_{r['arch']} {r['dtype']} {r['name']:28s} regs={r['regs']:3d} stack={r['stack']}")
    return results


def test_every_steer_variant_compiles_without_spills(aot_results):
    names = {v[0] for v in tl_steer.aot_variants("fp16")}
    assert len(aot_results) == len(names) * 4
    assert any("rmsnorm_gemma" in n for n in names) and any(n.endswith("_k2") for n in names)
    spilled = [r for r in aot_results if r["stack"] or r["local"]]
    assert not spilled, spilled
