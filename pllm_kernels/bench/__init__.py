"""``python -m pllm_kernels.bench <op> [--backend ...] [--shape ...] [--smoke]``: run one benchmark of ``benchmarks/``.

The benchmark scripts live in the source tree (``benchmarks/bench_<op>.py``), not in the installed package: this
CLI finds them next to the package (a source checkout, ``pip install -e .``) or in the current directory and puts
that folder on ``sys.path``; from a plain wheel install it exits with a clear error.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["find_benchmarks_root", "main"]


def find_benchmarks_root() -> Path | None:
    """The repository root holding ``benchmarks/_harness.py``, or None."""
    here = Path(__file__).resolve().parent.parent.parent  # <root>/pllm_kernels/bench/__init__.py -> <root>
    for root in (here, Path.cwd()):
        if (root / "benchmarks" / "_harness.py").is_file():
            return root
    return None


USAGE = """usage: python -m pllm_kernels.bench <op|all|list> [bench options]

  op     one of the registered benchmarks (python -m pllm_kernels.bench list)
  all    every registered benchmark in turn (missing ones are reported as not yet implemented)
  bench options are passed through, e.g. --smoke, --backend triton,torch, --shape q,gate_up, --budget-s 120,
  --out DIR; `python -m pllm_kernels.bench <op> --help` lists them all.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    root = find_benchmarks_root()
    if root is None:
        print("pllm_kernels.bench: the benchmarks/ folder was not found (it ships with the source tree, not the "
              "wheel). Run from a source checkout: `cd <repo> && PYTHONPATH=. python -m pllm_kernels.bench ...`",
              file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks import _harness as H

    op, rest = argv[0], argv[1:]
    if op == "list":
        for name in H.BENCHES:
            state = "implemented" if H.bench_path(name).exists() else "not yet implemented"
            print(f"{name:<10} {state}")
        return 0
    names = list(H.BENCHES) if op == "all" else [op.removeprefix("bench_")]
    unknown = [n for n in names if n not in H.BENCHES]
    if unknown:
        print(f"pllm_kernels.bench: unknown benchmark {unknown[0]!r}; registered: {', '.join(H.BENCHES)}",
              file=sys.stderr)
        return 2
    rc = 0
    for name in names:
        mod = H.load_bench(name)
        if mod is None:
            print(f"[pllm_kernels.bench] {name}: not yet implemented (no {H.bench_path(name).relative_to(root)})")
            continue
        rc = max(rc, int(mod.main(rest) or 0))
    return rc
