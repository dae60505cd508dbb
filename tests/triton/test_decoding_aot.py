"""Ahead-of-time compilation of every decoding kernel variant (the plain sampler; mixing and fused mix + sampling
for S = 1, 2, 3 sources, with and without reward guidance) for sm_80 and sm_90, fp16 and bf16 scores, with no GPU:
no register spills (cuobjdump STACK/LOCAL bytes 0). Row reductions and bisection loops only: no tensor cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
from pllm_kernels.triton import decoding as tl_dec  # noqa: E402

SCRIPT = Path(__file__).with_name("aot_compile.py")


@pytest.fixture(scope="module")
def aot_results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--family", "decoding", "--archs", "80,90", "--dtypes",
                           "fp16,bf16"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for r in results:
        print(f"sm_{r['arch']} {r['dtype']} {r['name']:18s} regs={r['regs']:3d} stack={r['stack']}")
    return results


def test_every_decoding_variant_compiles_without_spills(aot_results):
    names = {v[0] for v in tl_dec.aot_variants("fp16")}
    assert len(aot_results) == len(names) * 4
    assert {"sample", "mix_s2", "fused_s2", "fused_s3_reward"} <= names
    spilled = [r for r in aot_results if r["stack"] or r["local"]]
    assert not spilled, spilled
    assert not any(r["mma"] or r["wgmma"] for r in aot_results)
