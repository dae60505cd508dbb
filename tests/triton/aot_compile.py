"""Compile every Triton kernel variant of a family ahead of time (no GPU) and print one JSON line per compile.

    python tests/triton/aot_compile.py [--family lora|steer] [--archs 80,90] [--dtypes fp16,bf16]

Used by ``test_lora_aot.py`` / ``test_steer_aot.py`` (without ``TRITON_INTERPRET``); also handy on its own to read
registers, spills (cuobjdump STACK/LOCAL bytes) and whether the matmul kernels use tensor cores.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# this tree's package, not whichever copy is installed (the test runs this script in a child process)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pllm_kernels.triton import decoding as tl_decoding  # noqa: E402
from pllm_kernels.triton import lora as tl_lora  # noqa: E402
from pllm_kernels.triton import steer as tl_steer  # noqa: E402

FAMILIES = {"lora": tl_lora, "steer": tl_steer, "decoding": tl_decoding}


def _cuobjdump() -> str:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else "cuobjdump"


_REG = re.compile(r"%[a-z]+\d+")
_PARAM = re.compile(r"ld\.param\.\w+\s+(%\w+),\s*\[(\w+)_param_(\d+)\]")


def ptr_loads(ptx: str, sig: dict) -> dict:
    """Global loads (and ``cp.async`` copies) per pointer argument: ``{arg: {"ld.global.v4.b32": n, ...}}``.

    A forward taint analysis of the PTX: the register a pointer parameter is loaded into is tainted with the
    argument's name, and so is the destination of any instruction with a tainted source, except loads (their
    result is data, not an address), iterated to a fixed point (loops). A load is attributed to every argument
    its address register is tainted with, so a load of B is told apart from the loads of y, v, x or A."""
    names = [n for n, t in sig.items() if t != "constexpr"]
    lines = [ln.split("//")[0].strip() for ln in ptx.splitlines()]
    body = "\n".join(ln for ln in lines if ln and not ln.startswith(".") and not ln.endswith(":"))  # directives, labels
    instrs = [" ".join(i.split()) for i in body.split(";")]
    taint: dict[str, set] = {}
    for m in _PARAM.finditer(ptx):
        idx = int(m.group(3))
        if idx < len(names) and names[idx].endswith("_ptr"):
            taint.setdefault(m.group(1), set()).add(names[idx])
    loads = []  # (opcode, address register)
    changed = True
    while changed:
        changed = False
        loads.clear()
        for ins in instrs:
            ins = re.sub(r"^@!?%\w+\s+", "", ins.strip())
            if not ins or " " not in ins or ins.startswith((".", "{", "}")) or ins.endswith(":"):
                continue
            op, rest = ins.split(" ", 1)
            if op.startswith("ld.global") or op.startswith("cp.async."):
                addrs = re.findall(r"\[\s*(%\w+)", rest)
                if op.startswith("cp.async.") and len(addrs) == 2:  # [shared dst], [global src], bytes, ...
                    loads.append((f"cp.async.{int(rest.split(',')[2].strip(), 0)}", addrs[1]))
                elif op.startswith("ld.global") and addrs:
                    loads.append((op, addrs[0]))
                continue
            if op.startswith(("ld.", "st.", "atom.", "red.", "bar", "ret", "bra", "mov.u32 %r")):
                continue
            regs = _REG.findall(rest)
            if len(regs) < 2:
                continue
            dst, srcs = regs[0], regs[1:]
            if rest.lstrip().startswith("{"):  # vector destination: {a, b}, src
                dst_part = rest[: rest.index("}") + 1]
                dsts, srcs = _REG.findall(dst_part), _REG.findall(rest[rest.index("}") + 1:])
            else:
                dsts = [dst]
            src_t = set().union(*(taint.get(r, set()) for r in srcs)) if srcs else set()
            for d in dsts:
                if src_t - taint.get(d, set()):
                    taint.setdefault(d, set()).update(src_t)
                    changed = True
    out: dict[str, dict[str, int]] = {}
    for op, reg in loads:
        for name in taint.get(reg, ()):
            out.setdefault(name, {}).setdefault(op, 0)
            out[name][op] += 1
    return out


def compile_one(job) -> dict:
    family, arch, dtype, index = job
    name, kernel, sig, cx, attrs, opts = list(FAMILIES[family].aot_variants(dtype))[index]
    compiled = triton.compile(ASTSource(kernel, sig, cx, attrs), target=GPUTarget("cuda", arch, 32), options=opts)
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if not m:
        raise RuntimeError(f"no resource usage for {name}: {usage}")
    regs, stack, _, local = (int(g) for g in m.groups())
    return {
        "name": name, "arch": arch, "dtype": dtype, "regs": regs, "stack": stack, "local": local,
        "shared": int(getattr(compiled.metadata, "shared", 0)),
        "mma": bool(re.search(r"\bmma\.sync", ptx)), "wgmma": "wgmma.mma_async" in ptx,
        "ptr_loads": ptr_loads(ptx, sig),
        "atomics": sorted(set(re.findall(r"\b(?:atom|red)\.[\w.]+", ptx))),
        # fences of global (gpu / sys) scope; wgmma's fence.proxy.async / CTA barriers are not about atomics
        "gpu_fences": sorted(set(re.findall(r"\b(?:membar\.(?:gl|sys)|fence\.(?:sc|acq_rel)\.(?:gpu|sys))\b", ptx))),
        "sass_membar_gpu": len(re.findall(r"MEMBAR\.\w+\.(?:GPU|SYS)", sass)),
        "sass_ldg": sorted(set(re.findall(r"\bLDG\.[\w.]+", sass))),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="lora", choices=sorted(FAMILIES))
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--dtypes", default="fp16,bf16")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    n = len(list(FAMILIES[args.family].aot_variants("fp16")))
    jobs = [(args.family, int(a), d, i) for a in args.archs.split(",") for d in args.dtypes.split(",")
            for i in range(n)]
    workers = max(1, min(4, os.cpu_count() or 1))
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            results = list(pool.map(compile_one, jobs))
    except (OSError, ValueError):  # no fork (restricted sandbox): compile serially
        results = [compile_one(j) for j in jobs]
    for r in results:
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
