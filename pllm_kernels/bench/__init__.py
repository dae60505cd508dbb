"""``python -m pllm_kernels.bench <op|all|list> [options]``: the op and model benchmarks, shipped with the package.

Every benchmark is a module of this package (``pllm_kernels.bench.lora``, ``pllm_kernels.bench.generate``, ...)
with ``main(argv) -> int``, registered by name in :data:`pllm_kernels.bench.harness.BENCHES` and built on the
shared harness :mod:`pllm_kernels.bench.harness` (timing, measured roofline, CSV rows with device / versions).
They run from any install (``pip install pllm-kernels``; the model benchmark needs the ``hf`` extra) and write
their CSV / summary files into ``--out DIR`` (default ``./pllm_bench_results`` under the current directory).

The source tree's ``benchmarks/`` keeps the one-command GPU suite, the plots and the committed results; it runs
these modules.
"""

from __future__ import annotations

import sys

__all__ = ["USAGE", "main"]

USAGE = """usage: python -m pllm_kernels.bench <op|all|list> [bench options]

  op     one of the registered benchmarks (python -m pllm_kernels.bench list)
  all    every implemented benchmark in turn (registered ones not written yet are listed as such)
  list   the registered benchmarks and whether each is implemented
  bench options are passed through, e.g. --smoke, --backend triton,torch, --shape q,gate_up, --budget-s 120,
  --out DIR (default ./pllm_bench_results); `python -m pllm_kernels.bench <op> --help` lists them all.
"""


def _err(msg: str) -> None:
    print(f"pllm_kernels.bench: {msg}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 ok; 1 a benchmark failed; 2 usage error, unknown benchmark or one not implemented yet."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    from pllm_kernels.bench import harness as H

    op, rest = argv[0], argv[1:]
    if op == "list":
        for name, module in H.BENCHES.items():
            print(f"{name:<10} {module if module else 'not yet implemented'}")
        return 0
    if op == "all":
        rc = 0
        for name, module in H.BENCHES.items():
            if module is None:
                print(f"[pllm_kernels.bench] {name}: not yet implemented")
                continue
            print(f"[pllm_kernels.bench] {name}: python -m pllm_kernels.bench {name} {' '.join(rest)}".rstrip(),
                  flush=True)
            try:
                code = int(H.load_bench(name).main(rest) or 0)
            except SystemExit as e:  # argparse errors of one bench
                code = e.code if isinstance(e.code, int) else 2
            except Exception as e:  # one failing benchmark (e.g. the hf extra missing) must not stop the others
                _err(f"{name} failed: {type(e).__name__}: {e}")
                code = 1
            rc = max(rc, code)
        return rc
    name = op.removeprefix("bench_")
    if name not in H.BENCHES:
        _err(f"unknown benchmark {op!r}; registered: {', '.join(H.BENCHES)}")
        return 2
    mod = H.load_bench(name)
    if mod is None:
        _err(f"{name} is registered but not yet implemented (implemented: "
             f"{', '.join(n for n in H.BENCHES if H.implemented(n))})")
        return 2
    return int(mod.main(rest) or 0)
