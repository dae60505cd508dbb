"""Ahead-of-time compilation of every multi-LoRA Triton kernel at its production configuration (no GPU needed).

The variants come from ``pllm_kernels.triton.lora.aot_variants``, built from ``LORA_CONFIGS`` and the same
constexpr helpers the launchers use, so this compiles exactly what runs. For sm_80 and sm_90, fp16 and bf16:
no register spills (cuobjdump's per-kernel STACK/LOCAL bytes, where ptxas puts spills, must be 0: triton's
``n_spills`` is only filled in when a driver loads the binary), and tensor-core instructions in the matmul
kernels (``mma`` on sm_80, ``wgmma`` or ``mma`` on sm_90: the BLOCK_M = 16/32 chunks are below wgmma's
64-row minimum and use ``mma.sync``). The BGMV and fused kernels serve one token per program (M = 1): they are
bandwidth-bound FMA + reduction kernels that cannot use tensor cores, so no ``mma`` is asserted for them.
Also: 16-byte loads of LoRA-B in every expand-type kernel (and of v in the BGMV expand), relaxed split-K atomics
without GPU-scope fences, and every configuration of the shipped per-shape table (lora_configs.json) compiled.
The compiles run in one child process (4 workers) and hit Triton's on-disk cache when nothing changed.
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
from pllm_kernels.triton import lora_configs as tl_configs  # noqa: E402

ARCHS = (80, 90)
DTYPES = ("fp16", "bf16")
SCRIPT = Path(__file__).with_name("aot_compile.py")
MMA_KERNELS = ("shrink_sgmv", "expand_sgmv")  # tensor-core kernels; bgmv/fused are M = 1 FMA kernels
EXPAND_KERNELS = ("expand_sgmv", "expand_bgmv", "fused")  # the kernels that read LoRA-B
WIDE_LOADS = {"ld.global.v4.b32", "ld.global.nc.v4.b32", "cp.async.16"}  # 128-bit global loads (cp.async: bytes)


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


def test_split_k_atomics_are_relaxed(aot_results):
    """Split-K variants add with relaxed fp32 atomics (PTX ``red/atom ... .relaxed``) and no fences: no
    ``membar.gl`` / ``fence.sc|acq_rel.gpu`` in the PTX and no ``MEMBAR.*.GPU`` in the SASS (the default
    ``acq_rel`` semantics wrapped every add in ``MEMBAR.ALL.GPU``: fails on the previous kernels). No other variant
    has atomics (the BGMV expand sums split-K partials instead)."""
    seen = 0
    for r in aot_results:
        where = f"{r['name']} sm_{r['arch']} {r['dtype']}"
        if r["name"].endswith("_splitk"):
            assert r["atomics"] and all(".relaxed." in a for a in r["atomics"]), (where, r["atomics"])
            seen += 1
        else:
            assert not r["atomics"], (where, r["atomics"])
        assert not r["gpu_fences"] and r["sass_membar_gpu"] == 0, (where, r["gpu_fences"], r["sass_membar_gpu"])
    assert seen >= 2 * len(ARCHS) * len(DTYPES)  # SGMV and BGMV shrink, at least


def test_every_table_config_compiled(aot_results):
    """Every entry of the shipped lora_configs.json (and the defaults) is among the compiled variants, so the
    no-spill and load-width checks above cover every configuration the launchers can pick. (An entry that resolves
    to the defaults for every BLOCK_M it admits is the default variant.)"""
    names = {r["name"] for r in aot_results}
    assert tl_configs.table() == tl_configs.load_table(tl_configs.TABLE_PATH)  # the shipped file, validated
    for i, e in enumerate(tl_configs.table()):
        k = e["kernel"]
        ms = tl_lora.SGMV_CHUNKS if k.endswith("_sgmv") else (None,)
        differs = any(cfg != tl_configs.config_for(k, m=m)
                      for m in ms for label, cfg in tl_configs.table_configs(k, m) if label == f"t{i}")
        if differs:
            assert any(n.startswith(k) and f"_t{i}" in n for n in names), (i, e, sorted(names))


def test_lora_b_loads_are_128_bit(aot_results):
    """Every global load of LoRA-B in every expand-type kernel is 16 bytes wide (``ld.global.v4.b32``, or a 16-byte
    ``cp.async`` where the SGMV pipeline stages B in shared memory): no 2-byte loads along the rank dimension.

    ``ptr_loads`` attributes each PTX load to the pointer argument its address is computed from (taint analysis
    in aot_compile.py), so y's 2-byte loads (one column per thread after the rank reduction) do not count. Fails on
    the kernels before the rank-mask change (B read with ``ld.global.b16``: the mask came from memory)."""
    seen = 0
    for r in aot_results:
        if not r["name"].startswith(EXPAND_KERNELS) or r["name"].endswith("_vec1"):  # vec1: R % 8 != 0
            continue
        b = r["ptr_loads"].get("b_ptr", {})
        assert b, f"no load of b_ptr found in {r['name']} sm_{r['arch']} {r['dtype']}: {r['ptr_loads']}"
        assert set(b) <= WIDE_LOADS, f"{r['name']} sm_{r['arch']} {r['dtype']}: B loads {b}"
        seen += 1
    assert seen == len(ARCHS) * len(DTYPES) * sum(
        1 for v in tl_lora.aot_variants("fp16") if v[0].startswith(EXPAND_KERNELS) and not v[0].endswith("_vec1"))


def test_bgmv_v_loads_are_128_bit(aot_results):
    """The BGMV expand reads its fp32 v row along the rank with the same vectorizable bound: 16-byte loads."""
    for r in aot_results:
        if r["name"].startswith("expand_bgmv") and not r["name"].endswith("_vec1"):
            v = r["ptr_loads"].get("v_ptr", {})
            assert v and set(v) <= WIDE_LOADS, (r["name"], r["arch"], r["dtype"], v)


def test_production_configs_are_dot_legal():
    for chunk in tl_lora.SGMV_CHUNKS:
        assert tl_lora.sgmv_block_m(chunk) == chunk  # BLOCK_M is the chunk: no masked tensor-core rows
    assert tl_lora.LORA_CONFIGS["expand_sgmv"]["BLOCK_R"] >= 16  # tl.dot K >= 16
    for rank, s in ((1, 1), (16, 3), (64, 3), (64, 4)):
        b = tl_lora.fused_blocks(rank, s)
        assert b["BLOCK_SR"] >= rank * s and b["BLOCK_K"] >= 16


def test_ptr_loads_attributes_loads_to_their_pointer():
    """The taint analysis behind ``ptr_loads`` on a hand-written PTX fragment: a 16-byte load through an address
    computed from parameter 1 (b_ptr), a 2-byte load from parameter 0 (y_ptr) whose offset came from a load of
    parameter 2, a loop-carried address, and a cp.async copy."""
    sys.path.insert(0, str(SCRIPT.parent))
    from aot_compile import ptr_loads

    ptx = """
    ld.param.b64 %rd1, [k_param_0];
    ld.param.b64 %rd2, [k_param_1];
    ld.param.b64 %rd3, [k_param_2];
    .loc 1 2 3 // comment ; with a semicolon
    ld.global.b32 { %r1 }, [ %rd3 + 0 ];
    mad.wide.s32 %rd4, %r1, 2, %rd1;
    @%p1 ld.global.b16 { %rs1 }, [ %rd4 + 0 ];
    mov.u64 %rd6, %rd2;
$L__BB0_1:
    add.s64 %rd5, %rd6, 16;
    @%p2 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd5 + 0 ];
    mov.u64 %rd6, %rd5;
    cp.async.cg.shared.global [ %r9 + 0 ], [ %rd5 + 0 ], 0x10, %r10;
    cp.async.wait_group 0;
    """
    sig = {"y_ptr": "*fp16", "b_ptr": "*fp16", "slots_ptr": "*i32", "BLOCK": "constexpr"}
    assert ptr_loads(ptx, sig) == {"slots_ptr": {"ld.global.b32": 1}, "y_ptr": {"ld.global.b16": 1},
                                   "b_ptr": {"ld.global.v4.b32": 1, "cp.async.16": 1}}
