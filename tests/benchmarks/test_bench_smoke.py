"""CPU smoke run of the benchmark stack (CI, < 30 s): the lora benchmark at smoke size, the harness, the CLI, the
GPU suite's dry mode and the plot tables."""

import csv
import sys
import time
from pathlib import Path

import pytest
import torch

import pllm_kernels
from pllm_kernels.bench import harness as H
from pllm_kernels.bench import lora as BL

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ (the GPU suite, the plots) lives in the source tree only
    sys.path.insert(0, str(ROOT))

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


def _cuda_refusal() -> str:
    """What ``lora_apply(..., backend="cuda")`` says here (today: no CUDA kernel for lora_apply yet)."""
    from pllm_kernels.ops import lora_apply

    P = BL.build_problem(BL.Case("q", 4, 8, "distinct"), smoke=True, device="cpu", dtype=torch.float32, max_sets=1,
                         mem_cap=1 << 30)
    s = P.sets[0]
    with pytest.raises(RuntimeError) as info:
        lora_apply(s["y"], s["x"], s["a"], s["b"], P.slot_ranks, P.slot_scales, P.meta, list(P.slice_sizes),
                   backend="cuda")
    return str(info.value).splitlines()[0]


def test_bench_lora_smoke(out, capsys):
    assert BL.main(["--smoke", "--out", str(out)]) == 0
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
    # the cuda backend is skipped in every case with the op's own reason (the op is called with backend="cuda")
    assert f"cuda skipped in {len(cases)}/{len(cases)} cases: {_cuda_refusal()}" in text
    assert (out / "bench_lora_summary.md").read_text().count("SKIP") >= 2


def test_time_fn_cpu_rotates_sets():
    seen = []
    res = H.time_fn(seen.append, arg_sets=[1, 2, 3], warmup=1, rep=5, device="cpu")
    assert {1, 2, 3} <= set(seen)
    assert res["n_sets"] == 3 and res["method"] == "perf_counter"
    assert res["p20_ms"] <= res["median_ms"] <= res["p80_ms"]


@pytest.fixture
def fresh_roofline():
    H._roofline_cached.cache_clear()  # measure_roofline caches per device: measure now, and leave no fake behind
    yield
    H._roofline_cached.cache_clear()


def test_roofline_cpu_formulas(fresh_roofline, monkeypatch):
    """With a fake clock, the figures are exactly bytes read + written / time and 2*n^3 / time, of the sizes the
    timed functions really move / multiply."""
    timed = []

    def fake_time_fn(fn, **kw):
        timed.append(fn())  # the copy returns its destination, the matmul its product
        return {"median_ms": 2.0 if len(timed) == 1 else 5.0}

    monkeypatch.setattr(H, "time_fn", fake_time_fn)
    roof = H.measure_roofline("cpu")
    dst, prod = timed
    nbytes, n = roof["copy_bytes"], roof["matmul_n"]
    assert dst.numel() * dst.element_size() == nbytes and prod.shape == (n, n)
    assert roof["copy_gbps"] == pytest.approx(2 * nbytes / 2e-3 / 1e9)  # read + write, per second, in GB
    assert roof["bf16_tflops"] == pytest.approx(2 * n**3 / 5e-3 / 1e12)
    assert roof["matmul_dtype"] == "float32" and prod.dtype == torch.float32
    assert roof["device"] == H.env_info()["device"]


def _best_ms(fn, reps=5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def test_roofline_cpu_agrees_with_a_direct_measurement(fresh_roofline):
    """The measured figures are the right order of magnitude (units, factors): within 8x of a best-of-5 timing of
    the same copy and matmul done here (a shared 2-core machine is noisy; a unit slip is >= 1000x)."""
    roof = H.measure_roofline("cpu")
    src = torch.randn(roof["copy_bytes"] // 4)
    dst = torch.empty_like(src)
    copy_gbps = 2 * roof["copy_bytes"] / (_best_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9
    n = roof["matmul_n"]
    a, b = torch.randn(n, n), torch.randn(n, n)
    tflops = 2 * n**3 / (_best_ms(lambda: torch.mm(a, b)) * 1e-3) / 1e12
    assert copy_gbps / 8 <= roof["copy_gbps"] <= copy_gbps * 8, (roof, copy_gbps)
    assert tflops / 8 <= roof["bf16_tflops"] <= tflops * 8, (roof, tflops)


def test_append_rows_union_of_columns(out):
    H.append_rows("x.csv", [{"bench": "b", "case": "c1", "backend": "torch", "median_ms": 1.0}])
    H.append_rows("x.csv", [{"bench": "b", "case": "c2", "backend": "triton", "median_ms": 0.5, "gbps": 3.0}])
    rows = _rows(out / "x.csv")
    assert [r["case"] for r in rows] == ["c1", "c2"]
    assert rows[0]["gbps"] == "" and rows[1]["gbps"] == "3"
    assert rows[0]["run_id"] == "test-run" and rows[0]["git_sha"]


def test_results_dir_default_is_under_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("PLLM_BENCH_OUT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert H.results_dir() == tmp_path / H.DEFAULT_OUT and (tmp_path / H.DEFAULT_OUT).is_dir()
    assert H.default_out("smoke") == tmp_path / H.DEFAULT_OUT / "smoke"
    pkg = Path(pllm_kernels.__file__).resolve().parent
    assert pkg not in H.results_dir().resolve().parents


def test_registry_modules():
    assert list(H.BENCHES)[:1] == ["lora"] and H.implemented("lora") and H.implemented("generate")
    assert H.load_bench("lora") is BL
    for name, module in H.BENCHES.items():
        assert (H.load_bench(name) is None) == (module is None)
        if module is not None:
            assert module == f"pllm_kernels.bench.{name}" and callable(H.load_bench(name).main)
    with pytest.raises(KeyError, match="unknown benchmark"):
        H.load_bench("nope")


def test_cli(capsys, monkeypatch):
    from pllm_kernels.bench import main

    assert main(["list"]) == 0
    listed = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert listed == {n: m or "not yet implemented" for n, m in H.BENCHES.items()}

    unwritten = next(n for n, m in H.BENCHES.items() if m is None)
    assert main([unwritten]) == 2  # registered, not written: an error, not a silent success
    assert main(["nope"]) == 2
    err = capsys.readouterr().err
    assert f"{unwritten} is registered but not yet implemented" in err and "unknown benchmark 'nope'" in err

    assert main(["lora", "--dry-run", "--shape", "q"]) == 0
    printed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[:-1]]
    assert printed == [c.name for c in BL.cases_for("smoke") if c.shape == "q"]

    calls = []  # options reach the benchmark unchanged, its exit code comes back; `all` runs every written one
    for name in H.BENCHES:
        if H.implemented(name):
            monkeypatch.setattr(H.load_bench(name), "main", lambda argv, n=name: calls.append((n, argv)) or 3)
    assert main(["bench_lora", "--smoke", "--out", "x"]) == 3
    assert calls == [("lora", ["--smoke", "--out", "x"])]
    calls.clear()
    assert main(["all", "--smoke"]) == 3
    assert calls == [(n, ["--smoke"]) for n in H.BENCHES if H.implemented(n)]
    assert f"{unwritten}: not yet implemented" in capsys.readouterr().out


def test_gpu_suite_dry_run(out, monkeypatch):
    from benchmarks import gpu_suite

    monkeypatch.setenv("PLLM_BENCH_OUT", str(out))
    unwritten = next(n for n, m in H.BENCHES.items() if m is None)
    rc = gpu_suite.main(["--dry-run", "--benches", unwritten, "--skip", "plots", str(out / "suite")])
    assert rc == 0
    summary = (out / "suite" / "summary.md").read_text()
    for step in ("build", "gpu_tests", "sanitizer"):
        assert f"| {step} | SKIPPED |" in summary
    assert f"| bench_{unwritten} | N/A | 0.0 | not yet implemented |" in summary
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


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch"])
def test_bench_lora_backend_reaches_that_backend(out, monkeypatch, backend):
    """``--backend triton`` / ``torch`` call the op with ``backend=`` (the process default, PLLM_BACKEND, is read
    once and cannot be switched at run time): only that backend's implementation runs, and it is right."""
    from pllm_kernels.ops._backend import TABLES, Impl

    monkeypatch.setenv("PLLM_BENCH_INTERPRET", "1")
    calls = {"torch": 0, "triton": 0}
    impls = TABLES["lora_apply"].impls
    for name in calls:
        orig = impls[name]

        def counted(*a, _name=name, _fn=orig.fn, **k):
            calls[_name] += 1
            return _fn(*a, **k)

        monkeypatch.setitem(impls, name, Impl(counted, orig.supports))
    args = ["--smoke", "--shape", "o", "--backend", backend, "--warmup-ms", "1", "--rep-ms", "1", "--out", str(out)]
    assert BL.main(args) == 0
    other = "torch" if backend == "triton" else "triton"
    assert calls[backend] > 0 and calls[other] == 0, calls
    rows = _rows(out / "lora.csv")
    assert [r["backend"] for r in rows] == [backend] and float(rows[0]["rel_err"]) < 1e-3, rows
