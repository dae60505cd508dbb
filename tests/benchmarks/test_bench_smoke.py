"""CPU smoke run of the benchmark stack (CI, < 30 s): bench_lora at smoke size, the harness, the CLI, the GPU
suite's dry mode and the plot tables."""

import csv
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _harness as H  # noqa: E402

REQUIRED = ("device", "torch", "triton", "git_sha", "timestamp", "bench", "case", "backend", "median_ms", "gbps",
            "pct_of_copy_bw", "tflops", "ratio_vs_torch", "ratio_vs_peft_mixed", "bytes", "flops", "rel_err")


@pytest.fixture
def out(tmp_path, monkeypatch):
    monkeypatch.setenv("PLLM_BENCH_OUT", str(tmp_path))
    monkeypatch.setenv("PLLM_BENCH_RUN_ID", "test-run")
    return tmp_path


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bench_lora_smoke(out, capsys):
    from benchmarks import bench_lora

    assert bench_lora.main(["--smoke", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rows = _rows(out / "lora.csv")
    assert rows and all(c in rows[0] for c in REQUIRED)
    backends = {r["backend"] for r in rows}
    assert {"torch", "peft_mixed", "adapter_loop", "unfused_torch", "base_mm"} <= backends
    assert {r["device"] for r in rows} == {H.env_info()["device"]}
    for r in rows:
        assert float(r["median_ms"]) > 0
        if r["backend"] != "base_mm":
            assert float(r["rel_err"]) < 1e-3, r  # fp32 on CPU: every implementation computes the same delta
    cases = {r["case"] for r in rows}
    assert any("target_decode" in r["tags"] for r in rows) and any("target_prefill" in r["tags"] for r in rows)
    assert len(cases) >= 10
    assert "target checks" in text and "skipped" in text
    assert "triton" in text and "needs a CUDA device" in text  # missing backends are reported, not errors
    assert (out / "bench_lora_summary.md").read_text().count("SKIP") >= 2


def test_time_fn_cpu_rotates_sets():
    seen = []
    res = H.time_fn(seen.append, arg_sets=[1, 2, 3], warmup=1, rep=5, device="cpu")
    assert {1, 2, 3} <= set(seen)
    assert res["n_sets"] == 3 and res["method"] == "perf_counter"
    assert res["p20_ms"] <= res["median_ms"] <= res["p80_ms"]


def test_roofline_cpu():
    roof = H.measure_roofline("cpu")
    assert roof["copy_gbps"] > 0 and roof["bf16_tflops"] > 0 and roof["matmul_dtype"] == "float32"


def test_append_rows_union_of_columns(out):
    H.append_rows("x.csv", [{"bench": "b", "case": "c1", "backend": "torch", "median_ms": 1.0}])
    H.append_rows("x.csv", [{"bench": "b", "case": "c2", "backend": "triton", "median_ms": 0.5, "gbps": 3.0}])
    rows = _rows(out / "x.csv")
    assert [r["case"] for r in rows] == ["c1", "c2"]
    assert rows[0]["gbps"] == "" and rows[1]["gbps"] == "3"
    assert rows[0]["run_id"] == "test-run" and rows[0]["git_sha"]


def test_cli(capsys):
    from pllm_kernels.bench import main

    assert main(["list"]) == 0
    assert main(["steering"]) == 0  # registered, script not written yet
    assert main(["lora", "--dry-run", "--shape", "q"]) == 0
    assert main(["nope"]) == 2
    text = capsys.readouterr()
    assert "lora" in text.out and "not yet implemented" in text.out and "decode-q-T64-r16-distinct" in text.out
    assert "unknown benchmark" in text.err


def test_gpu_suite_dry_run(out, monkeypatch):
    from benchmarks import gpu_suite

    monkeypatch.setenv("PLLM_BENCH_OUT", str(out))
    rc = gpu_suite.main(["--dry-run", "--benches", "none", "--skip", "plots", str(out / "suite")])
    assert rc == 0
    summary = (out / "suite" / "summary.md").read_text()
    for step in ("build", "gpu_tests", "sanitizer"):
        assert f"| {step} | SKIPPED |" in summary
    assert "Skipped steps" in summary and (out / "suite" / "env.json").exists()


def test_plot_tables_never_mix_devices(out, monkeypatch):
    from benchmarks import plot

    rows = [
        {"device": "A", "bench": "lora", "case": "c", "backend": "triton", "kind": "ours", "median_ms": "1",
         "run_id": "1", "ratio_vs_torch": "2"},
        {"device": "B", "bench": "lora", "case": "c", "backend": "triton", "kind": "ours", "median_ms": "3",
         "run_id": "1", "ratio_vs_torch": "1.5"},
        {"device": "A", "bench": "lora", "case": "c", "backend": "triton", "kind": "ours", "median_ms": "9",
         "run_id": "0", "ratio_vs_torch": "1"},
    ]
    groups = plot.latest(rows, all_runs=False)
    assert set(groups) == {("A", "lora"), ("B", "lora")}
    assert [r["median_ms"] for r in groups[("A", "lora")]] == ["1"]
    md = plot.table(groups)
    assert "**A**" in md and "**B**" in md
