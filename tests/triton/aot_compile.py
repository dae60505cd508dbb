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
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if not m:
        raise RuntimeError(f"no resource usage for {name}: {usage}")
    regs, stack, _, local = (int(g) for g in m.groups())
    return {
        "name": name, "arch": arch, "dtype": dtype, "regs": regs, "stack": stack, "local": local,
        "shared": int(getattr(compiled.metadata, "shared", 0)),
        "mma": bool(re.search(r"\bmma\.sync", ptx)), "wgmma": "wgmma.mma_async" in ptx,
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
