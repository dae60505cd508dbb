"""Mixed-user generate throughput: a smoke run of ``benchmarks/bench_generate.py`` (always) and pytest-benchmark
entries on CPU (on request only)::

    PLLM_RUN_BENCH=1 pytest tests/hf/test_bench_generate.py            # or: pytest ... --benchmark-enable
    PLLM_RUN_BENCH=1 pytest tests/hf/test_bench_generate.py --benchmark-autosave --benchmark-compare

Entries: ours vs PEFT's mixed batch vs one merged adapter, tiny Llama (hidden 256, 4 layers), 8 distinct users,
one row each, 16-token prompts, 32 greedy new tokens (the CPU profile of bench_generate).
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_generate as BG  # noqa: E402


def test_bench_generate_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("PLLM_BENCH_RUN_ID", "test-run")
    assert BG.main(["--smoke", "--out", str(tmp_path)]) == 0
    with open(tmp_path / BG.CSV) as f:
        rows = list(csv.DictReader(f))
    assert {r["backend"] for r in rows} == set(BG.BACKENDS)
    for col in ("device", "torch", "transformers", "git_sha", "e2e_tok_s", "decode_tok_s", "median_ms"):
        assert all(r.get(col) not in (None, "") for r in rows), col
    ours = next(r for r in rows if r["backend"] == "ours")
    assert float(ours["e2e_tok_s"]) > 0 and ours["ratio_vs_peft_mixed"] != ""


def _enabled(config) -> bool:
    return os.environ.get("PLLM_RUN_BENCH", "0") not in ("", "0") or bool(config.getoption("benchmark_enable", False))


_MODELS = {}


def _contenders():
    """Ours, PEFT mixed and merged on identical weights (built once per session)."""
    if not _MODELS:
        import copy

        from pllm_kernels.hf import patch_model
        from pllm_kernels.testing import left_padded_batch, peft_reference, tiny_model

        base = tiny_model("llama", **BG.CPU_MODEL)
        specs = BG.adapter_specs(8)
        users = list(specs)
        peft_model, sds = peft_reference(base, specs, seed=1)
        merged = copy.deepcopy(peft_model).merge_and_unload(adapter_names=[users[0]]).eval()
        pm = patch_model(base, num_slots=8, max_rank=16)
        for u in users:
            pm.register_user(u, *sds[u])
        ids, mask = left_padded_batch([16 - (i % 3) for i in range(8)], base.config.vocab_size, seed=2)
        _MODELS.update(
            ours=lambda kw: pm.generate(ids, attention_mask=mask, users=users, **kw),
            peft_mixed=lambda kw: peft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=users, **kw),
            merged=lambda kw: merged.generate(input_ids=ids, attention_mask=mask, **kw),
        )
    return _MODELS


@pytest.mark.benchmark(group="generate-cpu-8users")
@pytest.mark.parametrize("backend", BG.BACKENDS)
def test_generate_8_users(benchmark, request, monkeypatch, backend):
    if not _enabled(request.config):
        pytest.skip("pytest-benchmark entries run on request: PLLM_RUN_BENCH=1 or --benchmark-enable")
    monkeypatch.setenv("PLLM_CHECK_VALUES", "0")
    gen = _contenders()[backend]
    kw = BG._gen_kwargs(32)
    with torch.no_grad():
        out = benchmark.pedantic(gen, args=(kw,), rounds=5, iterations=1, warmup_rounds=1)
    assert out.shape == (8, 16 + 32)
    benchmark.extra_info["tokens_per_round"] = 8 * 32
