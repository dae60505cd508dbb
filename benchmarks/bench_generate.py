"""Shim: the benchmark ships in the package; ``python -m benchmarks.bench_generate`` = ``python -m pllm_kernels.bench
generate``."""
from pllm_kernels.bench.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
