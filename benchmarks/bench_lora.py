"""Shim: the benchmark ships in the package; ``python -m benchmarks.bench_lora`` = ``python -m pllm_kernels.bench
lora``."""
from pllm_kernels.bench.lora import main

if __name__ == "__main__":
    raise SystemExit(main())
