"""CPU performance tracking with pytest-benchmark (run on request only):

    PLLM_RUN_BENCH=1 pytest tests/benchmarks/test_bench_lora_cpu.py            # or: pytest ... --benchmark-enable
    PLLM_RUN_BENCH=1 pytest tests/benchmarks/test_bench_lora_cpu.py --benchmark-autosave --benchmark-compare

The torch backend of ``lora_apply`` against PEFT's mixed batch (PEFT's own ``lora.Linear`` when peft imports,
and a replica of its ``_mixed_batch_forward``), a per-adapter loop and the unfused torch pipeline (per-token
gathered weights, two einsums), on CPU-sized Llama-3-8B shapes (every width / 8, fp32). The implementations are
those of ``pllm_kernels.bench.lora`` (one definition for the CPU and GPU figures).
"""

import os

import pytest
import torch

from pllm_kernels.bench import lora as B

pytest.importorskip("pytest_benchmark")

CPU_DIV = 8  # q 512->512, kv 512->[128,128], gate_up 512->[1792,1792], down 1792->512
CASES = [
    B.Case("q", 32, 16, "distinct"),
    B.Case("kv", 32, 16, "distinct"),
    B.Case("gate_up", 32, 16, "zipf"),
    B.Case("down", 32, "mixed", "distinct"),
    B.Case("q", 512, 16, "distinct", 128),
]
BACKENDS = ("torch", "peft", "peft_mixed", "adapter_loop", "unfused_torch")


def _enabled(config) -> bool:
    return os.environ.get("PLLM_RUN_BENCH", "0") not in ("", "0") or bool(config.getoption("benchmark_enable", False))


@pytest.fixture(autouse=True)
def _on_request(request, monkeypatch):
    if not _enabled(request.config):
        pytest.skip("pytest-benchmark entries run on request: PLLM_RUN_BENCH=1 or --benchmark-enable")
    monkeypatch.setenv("PLLM_CHECK_VALUES", "0")


_PROBLEMS = {}


def _problem(case):
    if case not in _PROBLEMS:
        _PROBLEMS[case] = B.build_problem(case, smoke=True, div=CPU_DIV, device="cpu", dtype=torch.float32,
                                          max_sets=1, mem_cap=1 << 30)
    return _PROBLEMS[case]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_lora_apply_cpu(benchmark, monkeypatch, case, backend):
    P = _problem(case)
    try:
        fn, _ = B.make_backend(backend, P)
    except B.Skip as e:
        pytest.skip(str(e))
    s = P.sets[0]
    ref = B.reference_delta(P, s)
    y0 = s["y"].clone()
    with torch.no_grad():
        fn(s)
        err = float((s["y"] - y0 - ref).abs().max() / ref.abs().max())
        assert err < 1e-4, f"{backend} disagrees with the fp32 reference: rel err {err:.2e}"
        benchmark.group = case.name
        benchmark.extra_info.update(backend=backend, bytes=P.required_bytes(), flops=P.flops(),
                                    n_adapters=len(set(P.seq_adapters)))
        benchmark(fn, s)
