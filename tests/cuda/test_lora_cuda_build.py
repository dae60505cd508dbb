"""The CUDA multi-LoRA kernels on a machine without GPU (CI).

* the extension imports and lists the lora launchers;
* the ptxas resource report (``pllm_kernels/_C.resources.txt``, written by setup.py) shows every kernel for sm_80 and
  sm_90 with no register spill, no local-memory stack frame, <= 255 registers and <= 48 KiB static shared memory;
* the ``__host__ __device__`` index / tiling helpers (exposed as ``_C.lora_*``) against brute force and against the
  Triton launchers' own helpers;
* the device code itself, run by the extension's CPU emulator (``_emulate=True``: the same kernels compiled for the
  host, threads as cooperative contexts, cp.async deferred until its wait): every path (bgmv, sgmv, fused) of shrink /
  expand / apply against the float64 reference in fp32 / fp16 / bf16, rows without adapter bit for bit untouched, and
  the determinism promises: bitwise identical results across paths, batch sizes, 16-byte vs scalar loads and launch
  variants;
* a clear RuntimeError for CPU tensors / no device, and ``supports()`` reasons.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from utils import assert_bitwise_equal, assert_close

from pllm_kernels import _ext
from pllm_kernels.batch import build_lora_meta
from pllm_kernels.reference.lora import lora_apply_ref, lora_expand_ref, lora_shrink_ref

REQUIRE = os.environ.get("PLLM_REQUIRE_CUDA_EXT", "").strip().lower() not in ("", "0", "false", "no", "off")
DEFAULT_ARCHS = os.environ.get("PLLM_CUDA_ARCHS", "80;90").replace(" ", "") in ("80;90", "80,90")


def _has_lora() -> bool:
    return _ext.HAS_CUDA_EXT and hasattr(_ext.ext(), "lora_apply")


needs_ext = pytest.mark.skipif(not _has_lora(), reason=f"CUDA extension with lora kernels not built: {_ext.ext_error}")


# ------------------------------------------------------------------------------------------------ build and report
def test_required_extension_has_lora():
    if not REQUIRE:
        pytest.skip("PLLM_REQUIRE_CUDA_EXT not set")
    assert _has_lora(), f"PLLM_REQUIRE_CUDA_EXT=1 but pllm_kernels._C has no lora launchers ({_ext.ext_error})"


@needs_ext
def test_extension_lists_lora_launchers():
    C = _ext.ext()
    for name in ("lora_shrink", "lora_expand", "lora_apply", "lora_shrink_emu", "lora_expand_emu", "lora_apply_emu",
                 "lora_choose_path", "lora_kernels", "lora_constants"):
        assert callable(getattr(C, name)), name
    kernels = C.lora_kernels()
    for dt in ("float32", "float16", "bfloat16"):
        for fam in ("lora_shrink_bgmv", "lora_shrink_sgmv", "lora_expand_bgmv", "lora_expand_sgmv", "lora_fused"):
            assert any(k.startswith(f"{fam}<{dt},") for k in kernels), (fam, dt)
    assert dict(C.LORA_PATHS) == {"auto": 0, "sgmv": 1, "bgmv": 2, "fused": 3, "sgmv_tc": 4}
    for dt in ("float16", "bfloat16"):
        assert any(k.startswith(f"lora_shrink_sgmv_tc<{dt},") for k in kernels), dt
    assert not any(k.startswith("lora_shrink_sgmv_tc<float32,") for k in kernels)


@dataclass
class KernelResources:
    name: str
    arch: str
    registers: int = -1
    stack: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    smem: int = 0


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_ptxas_report(text: str) -> list[KernelResources]:
    """Entries of an ``nvcc -Xptxas -v`` report: one per (kernel, arch)."""
    entries: list[KernelResources] = []
    cur: KernelResources | None = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = KernelResources(m.group(1), m.group(2))
            entries.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.stack, cur.spill_stores, cur.spill_loads = (int(g) for g in m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur.registers = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur.smem = int(s.group(1)) if s else 0
    return entries


def _report() -> tuple[Path, list[KernelResources]]:
    path = Path(_ext.ext().__file__).with_name("_C.resources.txt")
    if not path.exists():
        pytest.fail(f"resource report {path} missing: setup.py writes it when it builds the extension "
                    "(rebuild: python setup.py build_ext --inplace)")
    return path, parse_ptxas_report(path.read_text())


@needs_ext
def test_resource_report_no_spills():
    path, entries = _report()
    assert entries, f"no kernel entries in {path}"
    names = _demangle(sorted({e.name for e in entries}))
    bad = []
    for e in entries:
        pretty = f"{names[e.name]} [{e.arch}]"
        if e.registers < 0 or e.spill_stores < 0:
            bad.append(f"{pretty}: incomplete report entry")
        elif e.spill_stores or e.spill_loads:
            bad.append(f"{pretty}: {e.spill_stores} bytes spill stores, {e.spill_loads} bytes spill loads")
        elif e.registers > 255:
            bad.append(f"{pretty}: {e.registers} registers")
        elif e.smem > 48 * 1024:
            bad.append(f"{pretty}: {e.smem} bytes static shared memory")
        elif ("lora" in e.name or "steer" in e.name) and e.stack:
            bad.append(f"{pretty}: {e.stack} bytes stack frame (local memory)")
    assert not bad, "resource report " + str(path) + ":\n" + "\n".join(bad)


@needs_ext
def test_resource_report_covers_every_lora_kernel_and_arch():
    if not DEFAULT_ARCHS:
        pytest.skip("non-default PLLM_CUDA_ARCHS")
    _, entries = _report()
    names = _demangle(sorted({e.name for e in entries}))
    lora = {}
    for e in entries:
        if "lora" in e.name:
            lora.setdefault(names[e.name], set()).add(e.arch)
    families = ("lora_shrink_bgmv_kernel", "lora_shrink_sgmv_kernel", "lora_expand_bgmv_kernel",
                "lora_expand_sgmv_kernel", "lora_fused_kernel")
    for fam in families:
        for dt in ("float", "__half", "__nv_bfloat16"):
            hits = [n for n in lora if fam in n and f"<{dt}," in n]
            assert hits, f"{fam}<{dt}> not in the resource report"
    for name, archs in lora.items():
        assert {"sm_80", "sm_90"} <= archs, f"{name}: compiled for {sorted(archs)}"
    for dt in ("__half", "__nv_bfloat16"):
        assert [n for n in lora if "lora_shrink_sgmv_tc_kernel" in n and f"<{dt}," in n], f"sgmv_tc<{dt}> missing"
    # 14 kernels per dtype: shrink bgmv 4, sgmv 2, expand bgmv 4, sgmv 2, fused 2 (as _C.lora_kernels() lists them),
    # + the tensor-core SGMV shrink (2) for fp16 and bf16
    assert len(lora) == 3 * 14 + 2 * 2 == len(_ext.ext().lora_kernels()), sorted(lora)


# ------------------------------------------------------------------------------------------------ host-side helpers
@needs_ext
@pytest.mark.parametrize("elem_bytes", [2, 4])
def test_lane_positions_partition_h(elem_bytes):
    """Every input element has exactly one (split, step, lane, elem) owner: lane l of step j owns the VEC = 16 bytes
    [j*32*VEC + l*VEC, + VEC); splits are runs of 4 steps."""
    C = _ext.ext()
    vec = 16 // elem_bytes
    consts = C.lora_constants()
    assert consts["steps_per_split"] == 4 and consts["warp"] == 32
    seen = set()
    for h in range(0, 3 * 4 * 32 * vec + 17):
        split, step, lane, elem = C.lora_lane_pos(h, elem_bytes)
        assert step * 32 * vec + lane * vec + elem == h
        assert 0 <= lane < 32 and 0 <= elem < vec and split == step // 4
        assert (step, lane, elem) not in seen
        seen.add((step, lane, elem))
    assert C.lora_smem_bytes(1024 * 3 + 1, 2, 3, 16, elem_bytes, 4)[0] == -(-(1024 * 3 + 1) // (4 * 32 * vec)) * 4 * 4


def _brute_tiles(sizes, block_n):
    """Flat tiles of each launch group of 8 slices: (slice in group, first column, width, tile in slice)."""
    groups, off = [], 0
    for base in range(0, len(sizes), 8):
        tiles = []
        for s_local, s in enumerate(range(base, min(base + 8, len(sizes)))):
            start = sum(sizes[:s])
            for jt in range(-(-sizes[s] // block_n)):
                tiles.append((s_local, start, sizes[s], jt))
        groups.append((base, tiles))
        off += 1
    return groups


SLICE_LAYOUTS = [(48,), (4096, 1024, 1024), (111, 64), (16, 8, 8, 24, 12, 4), (7,) * 10,
                 (1, 300, 2, 129, 5, 64, 9, 3, 1)]


@needs_ext
@pytest.mark.parametrize("sizes", SLICE_LAYOUTS)
@pytest.mark.parametrize("block_n", [64, 128, 256])
def test_slice_groups_and_tile_mapping(sizes, block_n):
    C = _ext.ext()
    groups = C.lora_slice_groups(list(sizes), block_n)
    brute = _brute_tiles(list(sizes), block_n)
    assert len(groups) == len(brute)
    for gi, (g, (base, tiles)) in enumerate(zip(groups, brute)):
        assert g[0] == base and g[1] == min(8, len(sizes) - base)
        assert g[2 + 8 + 8 + g[1]] == len(tiles)  # tile_start[count] = tiles in the group
        for j, want in enumerate(tiles):
            assert tuple(C.lora_tile_slice(list(sizes), block_n, gi, j)) == want, (gi, j)


@needs_ext
@pytest.mark.parametrize("sizes", [s for s in SLICE_LAYOUTS if len(s) <= 4])
def test_slice_groups_match_triton_layout(sizes):
    """For up to 4 slices the CUDA group holds the same offsets, widths and tile starts as the Triton launcher's."""
    from pllm_kernels.triton.lora import slice_groups

    C = _ext.ext()
    (t_base, t_ints, t_tiles), = slice_groups(sizes, 128)
    (g,) = C.lora_slice_groups(list(sizes), 128)
    n = len(sizes)
    assert g[0] == t_base == 0 and g[2 + 8 + 8 + n] == t_tiles
    assert list(g[2 : 2 + n]) == list(t_ints[0:n])  # offsets
    assert list(g[10 : 10 + n]) == list(t_ints[4 : 4 + n])  # widths
    assert list(g[18 + 1 : 18 + n]) == list(t_ints[8 : 8 + n - 1])  # tile starts of slices 1..n-1


@needs_ext
@pytest.mark.parametrize("log2n", [0, 1, 2, 3, 4])
def test_reduce_scatter_is_the_butterfly(log2n):
    """Simulate the kernels' warp reduce-scatter with symbolic values, using the exact lane rules of the device code
    (``lora::rs_keep_upper`` / ``rs_value_index`` via _C): every lane ends with the full butterfly sum (offsets 16, 8,
    4, 2, 1, same operand pairs) of the value it is said to hold, so its bits equal those of a plain all-reduce."""
    C = _ext.ext()
    n = 1 << log2n

    def add(a, b):  # commutative fp add: operand order does not matter, the pairing does
        return ("+",) + tuple(sorted((a, b), key=repr))

    lanes = [[("v", lane, q) for q in range(n)] for lane in range(32)]
    for st in range(log2n):
        half, off = n >> (st + 1), 16 >> st
        new = []
        for lane in range(32):
            upper = C.lora_reduce_scatter_map(lane, log2n, st)[0]
            partner = lane ^ off
            p_upper = C.lora_reduce_scatter_map(partner, log2n, st)[0]
            assert p_upper != upper
            mine = lanes[lane]
            theirs = lanes[partner]
            row = []
            for e in range(half):
                keep = mine[e + half] if upper else mine[e]
                recv = theirs[e] if p_upper else theirs[e + half]  # what the partner sends
                row.append(add(keep, recv))
            new.append(row)
        lanes = new
    vals = [row[0] for row in lanes]
    off = 16 >> log2n
    while off:
        vals = [add(vals[lane], vals[lane ^ off]) for lane in range(32)]
        off >>= 1

    def butterfly(q):
        v = [("v", lane, q) for lane in range(32)]
        for o in (16, 8, 4, 2, 1):
            v = [add(v[lane], v[lane ^ o]) for lane in range(32)]
        return v[0]

    for lane in range(32):
        _, q, writer = C.lora_reduce_scatter_map(lane, log2n, 0)
        assert q == (lane >> (5 - log2n)) & (n - 1) and writer == q << (5 - log2n)
        assert vals[lane] == butterfly(q), lane


@needs_ext
def test_choose_path_matches_triton_rule():
    from pllm_kernels.cuda.lora import choose_path
    from pllm_kernels.triton.lora import choose_path as triton_choose
    from pllm_kernels.triton.lora import fused_blocks

    C = _ext.ext()
    for op in ("shrink", "expand", "apply"):
        for T in (1, 2, 5, 8, 9, 33, 64, 65, 300):
            for K in (1, 2):
                for S, R, H in ((1, 16, 4096), (3, 16, 4096), (1, 8, 4096), (2, 64, 256), (4, 4, 40), (3, 128, 64)):
                    for dtype in (torch.float16, torch.float32):
                        esize = 2 if dtype == torch.float16 else 4
                        smem = C.lora_smem_bytes(H, K, S, R, esize, 4)[2]
                        if op == "apply" and smem > 48 * 1024:
                            continue  # the CUDA rule also needs the fused kernel's shared memory to fit
                        want = triton_choose("auto", T * K, op, sr=fused_blocks(R, S)["BLOCK_SR"], num_slices=S,
                                             a_bytes=R * S * H * esize)
                        got = choose_path("auto", op, T, K, S, R, H, dtype)
                        assert got == want, (op, T, K, S, R, H, dtype)
    assert choose_path("sgmv", "apply", 1, 1, 1, 16, 64, torch.float16) == "sgmv"
    # the tensor-core path: shrink / apply in fp16 / bf16; its expand (and fp32) is plain SGMV; auto never picks it
    for dt in (torch.float16, torch.bfloat16):
        assert choose_path("sgmv_tc", "shrink", 1, 1, 1, 16, 64, dt) == "sgmv_tc"
        assert choose_path("sgmv_tc", "apply", 300, 2, 3, 16, 64, dt) == "sgmv_tc"
        assert choose_path("sgmv_tc", "expand", 300, 1, 1, 16, 64, dt) == "sgmv"
        assert choose_path("auto", "apply", 8192, 1, 3, 16, 4096, dt) == "sgmv"
    assert choose_path("sgmv_tc", "shrink", 300, 1, 1, 16, 64, torch.float32) == "sgmv"
    with pytest.raises(RuntimeError, match="only for lora_apply"):
        choose_path("fused", "shrink", 1, 1, 1, 16, 64, torch.float16)
    # 5..8 slices: the CUDA fused kernel takes them (Triton's stops at 4)
    assert choose_path("auto", "apply", 1, 1, 6, 4, 64, torch.float16) == "fused"
    assert choose_path("auto", "apply", 1, 1, 9, 4, 64, torch.float16) == "bgmv"


# ------------------------------------------------------------------------------------------------ emulated kernels
@dataclass
class Case:
    T: int
    H: int
    L: int
    S: int
    R: int
    sizes: tuple
    K: int = 1
    ranks: tuple | None = None  # per slot (cycled); default R
    p_none: float = 0.25
    x_layout: str = "contig"  # contig | stride2 | transposed | offset (16-byte misaligned rows -> scalar loads)
    y_layout: str = "contig"  # contig | colslice | stride2
    chunk: int | None = None
    w_layout: str = "contig"  # contig | offset (lora_a / lora_b misaligned -> scalar loads)


CASES = {
    # odd hidden (scalar loads), mixed ranks 1/8/16/64/0 in an R = 64 buffer (two rank chunks in SGMV expand)
    "odd111_mixed": Case(T=37, H=111, L=5, S=1, R=64, sizes=(48,), ranks=(1, 8, 16, 64, 0), x_layout="transposed",
                         y_layout="colslice", chunk=32),
    # qkv-like: 3 slices of different widths, K = 2 weighted slots, 16-byte loads
    "qkv_k2": Case(T=13, H=64, L=4, S=3, R=16, sizes=(40, 16, 16), K=2, ranks=(16, 8, 1, 16)),
    # two splits of h_in (1024 elements per fp16 / bf16 split, 512 per fp32): the fixed-order split-K
    "h1100_splits": Case(T=3, H=1100, L=2, S=1, R=8, sizes=(24,), ranks=(8, 3), p_none=0.0, x_layout="stride2"),
    "h2048_vec": Case(T=5, H=2048, L=3, S=2, R=8, sizes=(16, 8), K=2, ranks=(8, 1, 5)),
    # many slots, a few hundred tokens, chunk 64 (4 row blocks per chunk)
    "many_slots": Case(T=150, H=32, L=33, S=1, R=16, sizes=(40,), ranks=(16, 8, 1), p_none=0.1, chunk=64),
    # 6 and 10 slices (10 > 8: two launch groups), K = 3
    "six_slices": Case(T=9, H=24, L=3, S=6, R=8, sizes=(16, 8, 8, 24, 12, 4), K=2, ranks=(8, 4, 1),
                       x_layout="stride2", y_layout="colslice"),
    "ten_slices_k3": Case(T=6, H=48, L=3, S=10, R=4, sizes=(3, 5, 8, 1, 2, 7, 4, 4, 9, 2), K=3, ranks=(4, 2, 1),
                          y_layout="stride2"),
    # misaligned rows: the scalar-load variants of every kernel
    "misaligned": Case(T=11, H=64, L=3, S=2, R=16, sizes=(24, 8), K=2, ranks=(16, 5, 9), x_layout="offset",
                       w_layout="offset", y_layout="colslice"),
    # few slots, chunk 64: segments of up to 64 rows (4 row blocks of 16 per chunk), K = 2
    "long_segments": Case(T=90, H=48, L=2, S=2, R=16, sizes=(24, 40), K=2, ranks=(16, 7), p_none=0.1, chunk=64),
    # rank up to 128: four rank chunks in the SGMV expand pipeline (stage reuse), 128 combined shrink outputs
    "big_rank": Case(T=20, H=32, L=3, S=1, R=128, sizes=(20,), ranks=(128, 100, 33), p_none=0.1, chunk=16),
    # decode sizes for the fused kernel
    "decode": Case(T=4, H=40, L=3, S=3, R=16, sizes=(32, 16, 16), K=2, ranks=(16, 1, 8), x_layout="stride2",
                   y_layout="colslice"),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["deferred", "eager_reverse"])
def emu_mode(request):
    """Emulator modes: cp.async copies land at their wait, threads in order (catches reads before the wait); or copies
    land at issue, threads in reverse order (catches a stage refilled while others read it, other interleavings)."""
    C = _ext.ext()
    eager = request.param == "eager_reverse"
    C.emu_config(eager, eager)
    yield request.param
    C.emu_config(False, False)


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _offset_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` stored one element past a 16-byte boundary (every row pointer misaligned for 16-byte loads)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


def _build(case: Case, dtype: torch.dtype, g: torch.Generator, *, all_none: bool = False, slots=None):
    T, H, L, S, R, K = case.T, case.H, case.L, case.S, case.R, case.K
    N = sum(case.sizes)
    if case.x_layout == "stride2":
        x = torch.randn(T, 2 * H, generator=g).to(dtype)[:, ::2]
    elif case.x_layout == "transposed":
        x = torch.randn(H, T, generator=g).to(dtype).t()
    elif case.x_layout == "offset":
        x = _offset_copy(torch.randn(T, H, generator=g).to(dtype))
    else:
        x = torch.randn(T, H, generator=g).to(dtype)
    lora_a = (torch.randn(L, S, R, H, generator=g) / H**0.5).to(dtype)  # whole buffer random: padding = garbage
    lora_b = (torch.randn(L, N, R, generator=g) / max(R, 1) ** 0.5).to(dtype)
    if case.w_layout == "offset":
        lora_a, lora_b = _offset_copy(lora_a), _offset_copy(lora_b)
    rk = case.ranks or (R,)
    ranks = torch.tensor([rk[i % len(rk)] for i in range(L)], dtype=torch.int32)
    scales = 0.5 + torch.rand(L, generator=g)
    if slots is None:
        slots = torch.randint(0, L, (T, K), generator=g, dtype=torch.int32)
        slots[torch.rand(T, K, generator=g) < case.p_none] = -1
        if all_none:
            slots.fill_(-1)
    weights = 0.5 + torch.rand(T, K, generator=g)
    if case.y_layout == "colslice":
        y_full = torch.randn(T, N + 7, generator=g).to(dtype)
        y = y_full[:, 3 : 3 + N]
    elif case.y_layout == "stride2":
        y_full = torch.randn(T, 2 * N, generator=g).to(dtype)
        y = y_full[:, ::2]
    else:
        y_full = torch.randn(T, N, generator=g).to(dtype)
        y = y_full
    y_full[:, ::3] = -0.0  # a "+ 0" read-modify-write of a no-adapter row would turn these into +0.0 (bits differ)
    meta = build_lora_meta(slots, L, weights, chunk=case.chunk)
    return dict(x=x, lora_a=lora_a, lora_b=lora_b, ranks=ranks, scales=scales, slots=slots, weights=weights,
                y=y, y_full=y_full, meta=meta)


def _meta(m):
    return m.token_slots, m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len


def _shrink(d, out, path):
    from pllm_kernels.cuda.lora import lora_shrink_cuda

    m = d["meta"]
    lora_shrink_cuda(d["x"], d["lora_a"], d["ranks"], *_meta(m), out, chunk=m.chunk, path=path, _emulate=True)
    return out


def _expand(d, v, sizes, path):
    from pllm_kernels.cuda.lora import lora_expand_cuda

    m = d["meta"]
    lora_expand_cuda(d["y"], v, d["lora_b"], d["ranks"], d["scales"], m.token_slots, m.token_weights, m.sorted_pairs,
                     m.seg_slot, m.seg_start, m.seg_len, sizes, chunk=m.chunk, path=path, _emulate=True)


def _apply(d, sizes, path):
    from pllm_kernels.cuda.lora import lora_apply_cuda

    m = d["meta"]
    lora_apply_cuda(d["y"], d["x"], d["lora_a"], d["lora_b"], d["ranks"], d["scales"], m.token_slots,
                    m.token_weights, m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, sizes, chunk=m.chunk,
                    path=path, _emulate=True)


def _ref_apply(d, sizes):
    valid = (d["slots"] >= 0) & (d["slots"] < d["ranks"].shape[0])
    slots = torch.where(valid, d["slots"], torch.full_like(d["slots"], -1))
    ranks = d["ranks"].clamp(0, d["lora_a"].shape[2])
    return lora_apply_ref(d["y"].double(), d["x"].double(), d["lora_a"].double(), d["lora_b"].double(), slots,
                          d["weights"].double(), ranks, d["scales"].double(), sizes)


def _check_y(d, y_full0, ref, dtype, case):
    """Adapted rows close to the reference; rows without adapter and columns outside y bit for bit untouched."""
    y, y_full = d["y"], d["y_full"]
    has = ((d["slots"] >= 0) & (d["slots"] < d["ranks"].shape[0])).any(1)
    assert_close(y[has], ref[has], dtype, scale=ref.abs().max().item(), msg="adapted rows")
    if case.y_layout == "colslice":
        n = y.shape[1]
        assert_bitwise_equal(y_full[:, :3], y_full0[:, :3], msg="columns left of y")
        assert_bitwise_equal(y_full[:, 3 + n :], y_full0[:, 3 + n :], msg="columns right of y")
        y0 = y_full0[:, 3 : 3 + n]
    elif case.y_layout == "stride2":
        assert_bitwise_equal(y_full[:, 1::2], y_full0[:, 1::2], msg="interleaved columns")
        y0 = y_full0[:, ::2]
    else:
        y0 = y_full0
    assert_bitwise_equal(y[~has], y0[~has], msg="rows without adapter")


def _paths(case: Case, op: str):
    paths = ["sgmv", "bgmv"]
    if op == "apply" and case.T <= 16 and case.S <= 8:
        paths.append("fused")
    return paths


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_emulated_shrink(name, dtype, emu_mode):
    case = CASES[name]
    d = _build(case, dtype, _gen("shrink", name, dtype))
    ref = lora_shrink_ref(d["x"].double(), d["lora_a"].double(), d["slots"], d["ranks"])
    outs = {}
    for path in _paths(case, "shrink"):
        out = torch.randn(case.S, case.K * case.T, case.R, generator=_gen("garbage", name))  # fully overwritten
        outs[path] = _shrink(d, out, path)
        assert_close(out, ref, dtype, scale=ref.abs().max().item(), msg=f"shrink {path}")
    assert_bitwise_equal(outs["sgmv"], outs["bgmv"], msg="shrink: sgmv vs bgmv")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_emulated_expand(name, dtype, emu_mode):
    case = CASES[name]
    results = {}
    for path in _paths(case, "expand"):
        g = _gen("expand", name, dtype)
        d = _build(case, dtype, g)
        v = torch.randn(case.S, case.K * case.T, case.R, generator=g)  # padding beyond rank = garbage to ignore
        y_full0 = d["y_full"].clone()
        ref = lora_expand_ref(d["y"].double(), v.double(), d["lora_b"].double(), d["slots"], d["weights"].double(),
                              d["ranks"], d["scales"].double(), case.sizes)
        _expand(d, v, case.sizes, path)
        _check_y(d, y_full0, ref, dtype, case)
        results[path] = d["y_full"]
    assert_bitwise_equal(results["sgmv"], results["bgmv"], msg="expand: sgmv vs bgmv")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_emulated_apply(name, dtype, emu_mode):
    case = CASES[name]
    results = {}
    for path in _paths(case, "apply") + ["auto"]:
        d = _build(case, dtype, _gen("apply", name, dtype))
        y_full0 = d["y_full"].clone()
        ref = _ref_apply(d, case.sizes)
        _apply(d, case.sizes, path)
        _check_y(d, y_full0, ref, dtype, case)
        results[path] = d["y_full"]
    for path, y in results.items():
        assert_bitwise_equal(y, results["bgmv"], msg=f"apply: {path} vs bgmv")


@needs_ext
@pytest.mark.parametrize("path", ["sgmv", "bgmv", "fused"])
def test_emulated_all_rows_without_adapter_untouched(path):
    case = CASES["decode"]
    d = _build(case, torch.float16, _gen("none", path), all_none=True)
    y_full0 = d["y_full"].clone()
    _apply(d, case.sizes, path)
    assert_bitwise_equal(d["y_full"], y_full0)
    if path != "fused":
        out = _shrink(d, torch.randn(case.S, case.K * case.T, case.R, generator=_gen("garbage")), path)
        assert not out.any()
        _expand(d, torch.randn(case.S, case.K * case.T, case.R, generator=_gen("v")), case.sizes, path)
        assert_bitwise_equal(d["y_full"], y_full0)


@needs_ext
@pytest.mark.parametrize("path", ["sgmv", "bgmv", "fused"])
def test_emulated_out_of_range_slots_and_ranks(path):
    """Slot ids >= num_slots route nowhere (like -1); ranks above max_rank are clamped; a valid slot of rank 0 touches
    its row (y + 0, as the reference does)."""
    case = CASES["decode"]
    slots = torch.tensor([[0, 3], [103, -1], [2, 1], [-1, -1]], dtype=torch.int32)
    d = _build(case, torch.float32, _gen("oob", path), slots=slots)
    d["ranks"][0] = case.R + 7
    d["ranks"][2] = 0
    y_full0 = d["y_full"].clone()
    ref = _ref_apply(d, case.sizes)
    _apply(d, case.sizes, path)
    _check_y(d, y_full0, ref, torch.float32, case)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 2])
def test_emulated_batch_invariance(dtype, K, emu_mode):
    """A token's delta is the same bits whether it is alone (fused), in a batch of 64 (bgmv) or of 70 (sgmv)."""
    case = Case(T=70, H=72, L=5, S=2, R=16, sizes=(40, 24), K=K, ranks=(16, 8, 1, 3, 16), p_none=0.2)
    d = _build(case, dtype, _gen("batch", dtype, K))
    full = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    _apply(full, case.sizes, "auto")  # T*K >= 70 > 64: sgmv
    from pllm_kernels.cuda.lora import choose_path

    assert choose_path("auto", "apply", 70, K, 2, 16, 72, dtype) == "sgmv"
    for lo, hi, want in ((0, 64 // K, "bgmv"), (5, 6, "fused"), (69, 70, "fused"), (10, 10 + 8 // K, "fused")):
        part = dict(d)
        for name in ("x", "slots", "weights"):
            part[name] = d[name][lo:hi].clone()
        part["y"] = d["y"][lo:hi].clone()
        part["meta"] = build_lora_meta(part["slots"], case.L, part["weights"])
        assert choose_path("auto", "apply", hi - lo, K, 2, 16, 72, dtype) == want
        _apply(part, case.sizes, "auto")
        assert_bitwise_equal(part["y"], full["y"][lo:hi], msg=f"tokens {lo}:{hi} ({want}) vs the batch of 70")


# ------------------------------------------------------------------------------------------------ per-slice outputs
def _slice_outputs(d, sizes, layout):
    """One output per slice, cut from the case's y (copies): contiguous, every other row of a taller buffer (row
    stride), or a column slice of a wider one; -0.0 planted in every other column (untouched rows keep it)."""
    outs, bufs = [], []
    off = 0
    for n in sizes:
        part = d["y"][:, off : off + n].clone()
        off += n
        T = part.shape[0]
        if layout == "rowstride":
            buf = torch.randn(2 * T, n, generator=_gen("rs", n)).to(part.dtype)
            view = buf[::2]
        elif layout == "colslice":
            buf = torch.randn(T, n + 9, generator=_gen("cs", n)).to(part.dtype)
            view = buf[:, 5 : 5 + n]
        else:
            buf = part
            view = buf
        view.copy_(part)
        view[:, ::2] = -0.0
        outs.append(view)
        bufs.append(buf)
    return outs, bufs


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["qkv_k2", "six_slices", "decode", "misaligned", "long_segments"])
@pytest.mark.parametrize("layout", ["contig", "rowstride", "colslice"])
def test_emulated_apply_per_slice_outputs(name, dtype, layout):
    """``lora_apply_cuda(y=[y_0, ..., y_{S-1}])`` (the q / k / v outputs of a grouped projection): on every path the
    same bits as the single-output call, rows without adapter (and the bytes around each output) untouched."""
    from pllm_kernels.cuda.lora import lora_apply_cuda

    case = CASES[name]
    paths = _paths(case, "apply") + ["auto"] + (["sgmv_tc"] if dtype != torch.float32 else [])
    for path in paths:
        d = _build(case, dtype, _gen("sliced", name, dtype))
        outs, bufs = _slice_outputs(d, case.sizes, layout)
        y0 = torch.cat([o.clone() for o in outs], 1)
        bufs0 = [b.clone() for b in bufs]
        single = y0.clone()
        m = d["meta"]
        args = (d["x"], d["lora_a"], d["lora_b"], d["ranks"], d["scales"], m.token_slots, m.token_weights,
                m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, case.sizes)
        lora_apply_cuda(single, *args, chunk=m.chunk, path=path, _emulate=True)
        lora_apply_cuda(outs, *args, chunk=m.chunk, path=path, _emulate=True)
        assert_bitwise_equal(torch.cat(outs, 1), single, msg=f"per-slice vs one y [{path}]")
        has = ((d["slots"] >= 0) & (d["slots"] < case.L)).any(1)
        assert_bitwise_equal(torch.cat(outs, 1)[~has], y0[~has], msg=f"rows without adapter [{path}]")
        for b, b0, o in zip(bufs, bufs0, outs):
            if b is not o:
                mask = torch.ones_like(b, dtype=torch.bool)
                if layout == "rowstride":
                    mask[::2] = False
                else:
                    mask[:, 5 : 5 + o.shape[1]] = False
                assert_bitwise_equal(b[mask], b0[mask], msg=f"bytes around the output [{path}]")


@needs_ext
def test_emulated_per_slice_outputs_errors():
    from pllm_kernels.cuda.lora import lora_apply_cuda

    case = CASES["qkv_k2"]
    d = _build(case, torch.float16, _gen("sliced_err"))
    outs, _ = _slice_outputs(d, case.sizes, "contig")
    m = d["meta"]
    args = (d["x"], d["lora_a"], d["lora_b"], d["ranks"], d["scales"], m.token_slots, m.token_weights,
            m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, case.sizes)
    with pytest.raises(RuntimeError, match="per-slice outputs"):
        lora_apply_cuda(outs[:2], *args, chunk=m.chunk, _emulate=True)
    with pytest.raises(RuntimeError, match="per-slice outputs"):
        lora_apply_cuda([outs[0][:, :-1], *outs[1:]], *args, chunk=m.chunk, _emulate=True)
    with pytest.raises(RuntimeError, match="dtype"):
        lora_apply_cuda([outs[0].float(), *outs[1:]], *args, chunk=m.chunk, _emulate=True)


# ------------------------------------------------------------------------------------------------ tensor cores
HALF = [torch.float16, torch.bfloat16]


@needs_ext
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", list(CASES))
def test_emulated_tensor_core_shrink(name, dtype, emu_mode):
    """path ``sgmv_tc`` (mma.m16n8k16, emulated with the PTX fragment layouts): every case against the float64
    reference (odd h_in, mixed ranks in a larger buffer with garbage padding, K = 2 / 3, up to 10 slices, misaligned
    rows -> scalar staging, rows without adapter); outputs not routed or beyond a slot's rank are exactly 0."""
    case = CASES[name]
    d = _build(case, dtype, _gen("shrink_tc", name, dtype))
    ref = lora_shrink_ref(d["x"].double(), d["lora_a"].double(), d["slots"], d["ranks"])
    out = _shrink(d, torch.randn(case.S, case.K * case.T, case.R, generator=_gen("garbage_tc", name)), "sgmv_tc")
    assert_close(out, ref, dtype, scale=ref.abs().max().item(), msg="shrink sgmv_tc")
    assert_bitwise_equal(out[ref == 0], torch.zeros_like(out[ref == 0]), msg="unrouted / beyond-rank outputs")
    fma = _shrink(d, torch.empty_like(out), "sgmv")
    assert_close(out, fma, dtype, scale=ref.abs().max().item(), msg="sgmv_tc vs sgmv")


@needs_ext
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", ["qkv_k2", "odd111_mixed", "misaligned", "long_segments", "ten_slices_k3"])
def test_emulated_tensor_core_apply(name, dtype):
    """``lora_apply(path="sgmv_tc")``: tensor-core shrink + SGMV expand against the reference; rows without adapter
    and columns outside y bit for bit untouched."""
    case = CASES[name]
    d = _build(case, dtype, _gen("apply_tc", name, dtype))
    y_full0 = d["y_full"].clone()
    ref = _ref_apply(d, case.sizes)
    _apply(d, case.sizes, "sgmv_tc")
    _check_y(d, y_full0, ref, dtype, case)


@needs_ext
@pytest.mark.parametrize("dtype", HALF)
def test_emulated_tensor_core_batch_invariant_and_load_variants(dtype):
    """sgmv_tc results of a token do not depend on the other tokens of its batch (rows of an mma never mix; the warp
    partials are summed in warp order), and 16-byte (cp.async) vs scalar staging give the same bits."""
    case = CASES["long_segments"]
    d = _build(case, dtype, _gen("tc_inv", dtype))
    full = _shrink(d, torch.empty(case.S, case.K * case.T, case.R), "sgmv_tc")
    lo, hi = 17, 52
    sub = dict(d)
    sub["x"] = d["x"][lo:hi]
    sub["slots"] = d["slots"][lo:hi]
    sub["meta"] = build_lora_meta(d["slots"][lo:hi], case.L, d["weights"][lo:hi], chunk=case.chunk)
    part = _shrink(sub, torch.empty(case.S, case.K * (hi - lo), case.R), "sgmv_tc")
    T, n = case.T, hi - lo
    for k in range(case.K):
        assert_bitwise_equal(part[:, k * n : (k + 1) * n], full[:, k * T + lo : k * T + hi], msg=f"tokens {lo}:{hi}")
    mis = dict(d)
    mis["x"], mis["lora_a"] = _offset_copy(d["x"]), _offset_copy(d["lora_a"])
    scalar = _shrink(mis, torch.empty_like(full), "sgmv_tc")
    assert_bitwise_equal(scalar, full, msg="scalar vs 16-byte staging")


@needs_ext
def test_tensor_core_switch_routes_auto():
    """``set_tensor_cores(True)`` (= ``PLLM_CUDA_TENSOR_CORES=1``): ``auto`` runs prefill-sized fp16 / bf16 shrinks
    and applies on the tensor-core kernel (the bits of ``path="sgmv_tc"``), decode sizes stay on BGMV / fused, and
    the op layer's ``auto`` stops sending prefill-sized calls to Triton for them; off again, everything is as before."""
    from pllm_kernels.cuda import lora as cu
    from pllm_kernels.ops import lora as ops_lora

    case = CASES["long_segments"]  # T*K = 180 pairs: SGMV
    d = _build(case, torch.bfloat16, _gen("tc_switch"))
    tc = _shrink(d, torch.empty(case.S, case.K * case.T, case.R), "sgmv_tc")
    fma = _shrink(d, torch.empty_like(tc), "sgmv")
    prev = cu.set_tensor_cores(True)
    try:
        assert cu.tensor_cores()
        assert_bitwise_equal(_shrink(d, torch.empty_like(tc), "auto"), tc, msg="auto with tensor cores")
        small = CASES["decode"]
        ds = _build(small, torch.bfloat16, _gen("tc_switch_small"))
        auto_small = _shrink(ds, torch.empty(small.S, small.K * small.T, small.R), "auto")
        assert_bitwise_equal(auto_small, _shrink(ds, torch.empty_like(auto_small), "bgmv"), msg="decode stays BGMV")
        y_auto = dict(d, y=d["y"].clone())
        _apply(y_auto, case.sizes, "auto")
        y_tc = dict(d, y=d["y"].clone())
        _apply(y_tc, case.sizes, "sgmv_tc")
        assert_bitwise_equal(y_auto["y"], y_tc["y"], msg="apply auto with tensor cores")
        assert ops_lora.CUDA_AUTO_MAX_PAIRS < case.T * case.K
    finally:
        cu.set_tensor_cores(prev)
    assert_bitwise_equal(_shrink(d, torch.empty_like(tc), "auto"), fma, msg="auto without tensor cores")


def test_op_auto_keeps_prefill_on_triton_unless_tensor_cores(monkeypatch):
    from pllm_kernels.cuda import lora as cu
    from pllm_kernels.ops import lora as ops_lora

    table = ops_lora._APPLY
    monkeypatch.setattr(table, "pick", lambda backend, device, dtype: ("cuda", table.impls["cuda"]))
    big = ops_lora.CUDA_AUTO_MAX_PAIRS + 1
    for on in (False, True):
        prev = cu.set_tensor_cores(on)
        try:
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                name, _ = ops_lora._pick(table, "auto", torch.device("cuda"), dtype, big)
                assert name == ("cuda" if on and dtype != torch.float32 else "triton"), (on, dtype)
                assert ops_lora._pick(table, "auto", torch.device("cuda"), dtype, 8)[0] == "cuda"
                assert ops_lora._pick(table, "cuda", torch.device("cuda"), dtype, big)[0] == "cuda"
        finally:
            cu.set_tensor_cores(prev)


@needs_ext
def test_emulated_tensor_core_path_float32_is_sgmv():
    case = CASES["qkv_k2"]
    d = _build(case, torch.float32, _gen("tc_f32"))
    a = _shrink(d, torch.empty(case.S, case.K * case.T, case.R), "sgmv_tc")
    b = _shrink(d, torch.empty_like(a), "sgmv")
    assert_bitwise_equal(a, b, msg="float32: sgmv_tc falls back to the FMA SGMV kernel")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_vector_and_scalar_loads_agree(dtype, monkeypatch):
    """16-byte vector loads and the scalar fallback (misaligned rows) evaluate the same FMA chains: same bits; and the
    launch variants (4 or 1 outputs per shrink block, picked from the SM count) do not change results either."""
    import pllm_kernels.cuda.lora as cl

    case = Case(T=9, H=256, L=3, S=3, R=16, sizes=(32, 16, 16), K=2, ranks=(16, 4, 9), p_none=0.2)
    base = _build(case, dtype, _gen("vec", dtype))
    results = {}
    for variant in ("aligned", "misaligned", "nt1", "nt4"):
        d = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in base.items()}
        d["y"] = d["y_full"]
        if variant == "misaligned":
            d["x"], d["lora_a"], d["lora_b"] = (_offset_copy(d[n]) for n in ("x", "lora_a", "lora_b"))
        monkeypatch.setattr(cl, "EMU_NUM_SMS", {"nt1": 100000, "nt4": 1}.get(variant, 132))
        for path in ("sgmv", "bgmv", "fused"):
            y = d["y"]
            d["y"] = y.clone()
            _apply(d, case.sizes, path)
            results[(variant, path)] = d["y"]
            d["y"] = y
    first = results[("aligned", "bgmv")]
    for key, y in results.items():
        assert_bitwise_equal(y, first, msg=f"{key} vs aligned bgmv")


@needs_ext
def test_emulated_shrink_splits_are_batch_independent():
    """Shrink alone: v rows of a token identical between a batch of 1 and of 100, both paths (fixed split-K)."""
    case = Case(T=100, H=1500, L=2, S=1, R=8, sizes=(8,), ranks=(8, 5), p_none=0.0)
    d = _build(case, torch.bfloat16, _gen("splitk"))
    out_big = _shrink(d, torch.empty(1, 100, 8), "sgmv")
    one = dict(d)
    one["x"], one["slots"] = d["x"][42:43], d["slots"][42:43]
    one["meta"] = build_lora_meta(one["slots"], 2)
    out_one = _shrink(one, torch.empty(1, 1, 8), "bgmv")
    assert_bitwise_equal(out_one[0, 0], out_big[0, 42])


@needs_ext
def test_gpu_test_module_passes_on_the_emulator():
    """tests/cuda/test_lora_cuda_gpu.py runs for real only on a GPU; here its small cases run on the CPU emulator
    (PLLM_LORA_GPU_TESTS_ON_EMULATOR=1), so the GPU tests' own logic is checked on every CI run."""
    env = {**os.environ, "PLLM_LORA_GPU_TESTS_ON_EMULATOR": "1"}
    env.pop("PLLM_SANITIZER", None)
    path = Path(__file__).with_name("test_lora_cuda_gpu.py")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
                          capture_output=True, text=True, env=env, cwd=str(Path(__file__).parents[2]), timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


# ------------------------------------------------------------------------------------------------ errors, supports
def _small_case(device="cpu"):
    d = _build(CASES["decode"], torch.float16, _gen("err"))
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


def test_cpu_tensors_raise_clear_error():
    from pllm_kernels.cuda.lora import lora_apply_cuda, lora_expand_cuda, lora_shrink_cuda

    d = _small_case()
    m = d["meta"]
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        lora_apply_cuda(d["y"], d["x"], d["lora_a"], d["lora_b"], d["ranks"], d["scales"], m.token_slots,
                        m.token_weights, m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, [32, 16, 16],
                        chunk=m.chunk)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        lora_shrink_cuda(d["x"], d["lora_a"], d["ranks"], *_meta(m), torch.empty(3, 8, 16), chunk=m.chunk)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        lora_expand_cuda(d["y"], torch.empty(3, 8, 16), d["lora_b"], d["ranks"], d["scales"], m.token_slots,
                         m.token_weights, m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, [32, 16, 16],
                         chunk=m.chunk)


@needs_ext
def test_launcher_without_device_raises():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    C = _ext.ext()
    args = [4096] * 12 + [0, 4, 40, 3, 3, 16, 2, 6, 16, [32, 16, 16], 40, 1920, 640, 40, 64, 1024, 16, 1, 0]
    with pytest.raises(RuntimeError, match="no CUDA device"):
        C.lora_apply(*args, 0)


@needs_ext
def test_emulated_argument_errors():
    C = _ext.ext()
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        C.lora_choose_path(0, 2, 1, 1, 1, 16, 64, 7)
    with pytest.raises(RuntimeError, match="path code"):
        C.lora_choose_path(9, 2, 1, 1, 1, 16, 64, 1)
    d = _small_case()
    with pytest.raises(RuntimeError, match="out must be a contiguous float32"):
        _shrink(d, torch.empty(3, 8, 16, dtype=torch.float16), "bgmv")
    with pytest.raises(ValueError, match="path must be one of"):
        _shrink(d, torch.empty(3, 8, 16), "nope")
    with pytest.raises(RuntimeError, match="only for lora_apply"):
        _shrink(d, torch.empty(3, 8, 16), "fused")


def test_supports_reasons():
    from pllm_kernels.cuda.lora import supports

    assert "float64" in supports(torch.device("cuda"), torch.float64)
    assert "CUDA tensors" in supports(torch.device("cpu"), torch.float16)
    if not torch.cuda.is_available() or not _ext.cuda_ext_usable():
        why = supports(torch.device("cuda"), torch.bfloat16)
        assert isinstance(why, str) and why
    else:
        assert supports(torch.device("cuda"), torch.bfloat16) is None


def test_backend_table_auto_falls_back_without_device():
    """How ops/ uses ``supports``: with a CUDA entry in a table, ``auto`` on CPU tensors (or without a usable device)
    picks torch, and ``backend='cuda'`` raises a clear RuntimeError."""
    from pllm_kernels.cuda.lora import lora_apply_cuda, supports
    from pllm_kernels.ops._backend import TABLES, Impl, OpTable

    name = "_test_lora_apply_cuda_probe"
    table = OpTable(name, torch=Impl(lambda *a, **k: None), cuda=Impl(lora_apply_cuda, supports))
    try:
        assert table.pick("auto", torch.device("cpu"), torch.float16)[0] == "torch"
        with pytest.raises(RuntimeError, match="cuda"):
            table.pick("cuda", torch.device("cpu"), torch.float16)
        if not _ext.cuda_ext_usable():
            assert table.pick("auto", torch.device("cuda"), torch.float16)[0] in ("torch", "triton")
            with pytest.raises(RuntimeError, match="unusable|does not support"):
                table.pick("cuda", torch.device("cuda"), torch.float16)
    finally:
        TABLES.pop(name, None)


def _cuobjdump():
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    except Exception:
        pass
    return shutil.which("cuobjdump")


@needs_ext
def test_sass_tensor_cores_only_in_the_tensor_core_kernels():
    """The built extension's SASS: every tensor-core SGMV shrink (fp16 / bf16, 16-byte and scalar staging, sm_80 and
    sm_90) issues HMMA.16816 with f32 accumulation; no other LoRA kernel uses tensor cores (the default kernels'
    bitwise batch invariance rests on that)."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found")
    so = Path(_ext.ext().__file__)
    sass = subprocess.run([tool, "-sass", str(so)], capture_output=True, text=True, check=True).stdout
    funcs = re.split(r"\n\s*Function : ", sass)[1:]
    tc, other = {}, []
    for body in funcs:
        name = body.split("\n", 1)[0].strip()
        if "lora" not in name:
            continue
        hmma = [ln for ln in body.splitlines() if "HMMA" in ln]
        if "lora_shrink_sgmv_tc_kernel" in name:
            tc[name] = tc.get(name, 0) + 1
            assert hmma and all("HMMA.16816.F32" in ln for ln in hmma), f"{name}: {hmma[:2]}"
        else:
            other.append(name)
            assert not hmma, f"{name} uses tensor cores: {hmma[:2]}"
    assert len(tc) == 4 and all(n == 2 for n in tc.values()), tc  # 4 variants, each for sm_80 and sm_90
    assert other


def test_op_sends_per_slice_outputs_to_cuda(monkeypatch):
    """The op layer hands per-slice outputs straight to the CUDA launcher (one launch) for up to 8 slices, and runs
    more slices on one temporary + adds (the single-output launcher); the results equal the torch backend's."""
    from pllm_kernels.ops import lora as ops_lora

    table = ops_lora._APPLY
    seen = []

    def fake(y, *a, **k):  # the torch backend standing in for the CUDA launcher (no device here)
        seen.append(type(y).__name__)
        sizes = a[11]
        from pllm_kernels.torch_ops.lora import lora_apply_torch

        lora_apply_torch(list(y) if isinstance(y, tuple) else y, *a[:8], list(sizes))

    monkeypatch.setattr(table, "pick", lambda backend, device, dtype: ("cuda", ops_lora.Impl(fake)))
    for S in (3, 10):
        sizes = [4 + i for i in range(S)]
        c_meta = build_lora_meta(torch.tensor([[0], [1], [-1], [0]], dtype=torch.int32), 2,
                                 torch.ones(4, 1))
        g = _gen("op_sliced", S)
        x = torch.randn(4, 16, generator=g)
        a = torch.randn(2, S, 4, 16, generator=g)
        b = torch.randn(2, sum(sizes), 4, generator=g)
        ranks, scales = torch.tensor([4, 2], dtype=torch.int32), torch.tensor([1.0, 0.5])
        outs = [torch.randn(4, n, generator=g) for n in sizes]
        want = [o.clone() for o in outs]
        ops_lora.lora_apply(want, x, a, b, ranks, scales, c_meta, sizes, backend="torch")
        seen.clear()
        ops_lora.lora_apply(outs, x, a, b, ranks, scales, c_meta, sizes, backend="cuda")
        assert seen == (["tuple"] if S <= 8 else ["Tensor"]), (S, seen)
        for o, w in zip(outs, want):
            assert_close(o, w, torch.float32)
