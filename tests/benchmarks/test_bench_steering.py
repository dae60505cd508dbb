"""CPU smoke run of the steering benchmark (``pllm_kernels.bench.steering``, < 30 s): every section at smoke size,
the skip rows of backends that cannot run here, and the correctness guard (ours must equal the unfused baseline
before it is timed)."""

import csv

import pytest
import torch

from pllm_kernels.bench import harness as H
from pllm_kernels.bench import steering as BS
from pllm_kernels.ops import steer as steer_ops

FAST = ["--warmup-ms", "1", "--rep-ms", "3"]


@pytest.fixture
def out(tmp_path, monkeypatch):
    monkeypatch.setenv("PLLM_BENCH_OUT", str(tmp_path))
    monkeypatch.setenv("PLLM_BENCH_RUN_ID", "test-run")
    # the CPU smoke run (fp32: the tolerances below), also on a machine with a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return tmp_path


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_registered():
    assert H.BENCHES["steering"] == "pllm_kernels.bench.steering" and H.load_bench("steering") is BS


def test_bench_steering_smoke(out, capsys):
    pytest.importorskip("transformers")
    assert BS.main(["--smoke", "--out", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    rows = _rows(out / BS.CSV)
    assert {r["device"] for r in rows} == {H.env_info()["device"]}
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        assert float(r["median_ms"]) > 0, r
    by_section = {s: {r["backend"] for r in ok if r["section"] == s} for s in BS.SECTIONS}
    assert {"torch", "gather", "broadcast"} <= by_section["op"]
    assert {"torch", "unfused", "unfused_torch", "rmsnorm_alone"} <= by_section["fused"]
    assert set(BS.MODEL_VARIANTS) <= by_section["model"]
    assert not [r for r in rows if r["status"] == "error"]

    # every case: ours (torch) was checked against the unfused baseline before it was timed
    for r in ok:
        if r["backend"] == "torch" or (r["section"] == "model" and r["backend"] in ("on", "off")):
            assert float(r["max_err"]) <= 1e-4, r
    for r in ok:
        if r["section"] in ("op", "fused") and r["backend"] != "rmsnorm_alone":
            assert float(r["gbps"]) > 0 and float(r["pct_of_copy_bw"]) > 0
        if r["section"] == "op" and r["backend"] == "torch":
            assert float(r["ratio_vs_gather"]) > 0 and float(r["ratio_vs_broadcast"]) > 0
        if r["section"] == "fused" and r["backend"] == "torch":
            assert float(r["ratio_vs_unfused"]) > 0 and float(r["ratio_vs_rmsnorm_alone"]) > 0
        if r["section"] == "model" and r["backend"] == "on":
            assert float(r["ratio_on_vs_off"]) > 0

    # the cuda backend on CPU tensors: a skip row per op / fused case, with the op's own refusal
    cuda = [r for r in rows if r["backend"] == "cuda"]
    assert cuda and all(r["status"] == "skip" for r in cuda)
    for r in cuda:
        op = "steer_rmsnorm" if r["section"] == "fused" else "steer_add"
        assert f"backend='cuda' but the {op} inputs are on cpu" in r["note"], r
    triton = [r for r in rows if r["backend"] == "triton"]
    assert triton and all(r["status"] == "skip" and "needs a CUDA device" in r["note"] for r in triton)
    assert "target checks" in text and "cuda skipped" in text
    summary = (out / "bench_steering_summary.md").read_text()
    assert summary.count("**SKIP**") == 3 and "decode step" in summary


def test_guard_refuses_a_wrong_steer_add(out, monkeypatch, capsys):
    """A steer_add that is 1 % off is not timed: an error row naming the refusal, exit code 1; the baselines of the
    same case are still measured."""
    real = steer_ops.steer_add

    def wrong(h, vectors, token_slots, token_scales=None, slot_modes=None, **kw):
        return real(h, vectors, token_slots, token_scales * 1.01, slot_modes, **kw)

    monkeypatch.setattr(steer_ops, "steer_add", wrong)
    assert BS.main(["--smoke", "--out", str(out), "--sections", "op", "--tokens", "8", *FAST]) == 1
    rows = _rows(out / BS.CSV)
    assert {r["case"] for r in rows} == {"op-h512-T8-all", "op-h512-T8-half"}
    bad = [r for r in rows if r["backend"] == "torch"]
    assert len(bad) == 2 and all(r["status"] == "error" and r["note"].startswith("refused") for r in bad)
    assert not any(r["median_ms"] for r in bad)
    base = [r for r in rows if r["backend"] in ("gather", "broadcast")]
    assert len(base) == 4 and all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in base)
    assert "ERROR op-h512-T8-all torch: refused" in capsys.readouterr().out


def test_guard_refuses_a_wrong_steer_rmsnorm(out, monkeypatch):
    real = steer_ops.steer_rmsnorm

    def wrong(*args, **kw):
        return real(*args, **kw) * 1.01  # the steered h is right, the normed output 1 % off

    monkeypatch.setattr(steer_ops, "steer_rmsnorm", wrong)
    assert BS.main(["--smoke", "--out", str(out), "--sections", "fused", "--tokens", "8", *FAST]) == 1
    rows = _rows(out / BS.CSV)
    by = {(r["case"], r["backend"]): r for r in rows}
    for case in ("fused-h512-T8-all", "fused-h512-T8-half"):
        assert by[(case, "torch")]["status"] == "error" and "refused" in by[(case, "torch")]["note"]
        for b in ("unfused", "unfused_torch", "rmsnorm_alone"):  # our steer_add + RMSNorm still passes its check
            assert by[(case, b)]["status"] == "ok", by[(case, b)]


def test_dry_run_lists_target_cases_first(capsys):
    assert BS.main(["--profile", "suite", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [ln.split()[0] for ln in lines[:-1]]
    assert names == [c.name for c in BS.cases_for("suite")]
    assert names[:6] == ["op-h4096-T4096-all", "op-h8192-T4096-all", "fused-h4096-T4096-all",
                         "fused-h8192-T4096-all", "decode-llama1b-B32", "decode-llama1b-B1"]
    assert len(names) == 38 and all("target" in ln for ln in lines[:6])
