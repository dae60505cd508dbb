"""CPU smoke run of the decoding benchmark (``pllm_kernels.bench.decoding``, < 30 s): both sections at smoke size,
the skip rows of backends that cannot run here, the bytes-moved floor, and the correctness guard (ours must draw the
torch implementation's tokens before it is timed)."""

import csv

import pytest
import torch

from pllm_kernels.bench import decoding as BD
from pllm_kernels.bench import harness as H

FAST = ["--warmup-ms", "1", "--rep-ms", "3"]


@pytest.fixture
def out(tmp_path, monkeypatch):
    monkeypatch.setenv("PLLM_BENCH_OUT", str(tmp_path))
    monkeypatch.setenv("PLLM_BENCH_RUN_ID", "test-run")
    return tmp_path


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_registered():
    assert H.BENCHES["decoding"] == "pllm_kernels.bench.decoding" and H.load_bench("decoding") is BD
    assert "contrast" not in H.BENCHES and "sampling" not in H.BENCHES  # one benchmark covers both


def test_cases_and_floor():
    suite = BD.cases_for("suite")
    assert suite[0].name == "contrast-top_p-v128256-B64" and "target_contrast" in suite[0].tags
    assert {c.B for c in suite} == {1, 8, 64, 256} and {c.V for c in suite} == {128256}
    assert {(c.section, c.mode) for c in suite} == {("sample", m) for m in BD.MODES} | {("contrast", "top_p")}
    smoke = BD.cases_for("smoke")
    assert {c.B for c in smoke} == {1, 8} and {c.V for c in smoke} == {32000}
    # the floor of anchors section 8.2: V=128256, B=64, two bf16 sources = 32.8 MB (+ tokens / log-probs out)
    P = BD.Problem(suite[0], torch.bfloat16, torch.device("cpu"), {},
                   [{"x": torch.empty(2, 1, 1, dtype=torch.bfloat16)}])
    assert P.floor_bytes() == 2 * 64 * 128256 * 2 + 64 * 12 and round(P.floor_bytes() / 1e6, 1) == 32.8


def test_dry_run(capsys):
    assert BD.main(["--smoke", "--dry-run", "--sections", "contrast"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines[:-1]] == ["contrast-top_p-v32000-B8", "contrast-top_p-v32000-B1"]


def test_bench_decoding_smoke(out, capsys):
    assert BD.main(["--smoke", "--out", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    rows = _rows(out / BD.CSV)
    assert {r["device"] for r in rows} == {H.env_info()["device"]}
    assert not [r for r in rows if r["status"] == "error"]
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        assert float(r["median_ms"]) > 0 and float(r["gbps"]) > 0 and float(r["x_floor"]) > 0, r
        S, B, V = int(r["S"]), int(r["B"]), int(r["V"])
        assert int(r["bytes"]) == S * B * V * 4 + 12 * B, r
    by_section = {s: {r["backend"] for r in ok if r["section"] == s} for s in BD.SECTIONS}
    assert {"torch", "multinomial", "sort_free", "sort_filter"} <= by_section["sample"]
    want = {"torch", "ops_unfused", "unfused_torch"}
    try:
        import transformers  # noqa: F401

        want.add("hf_cfg")
    except ImportError:
        assert all(r["status"] == "skip" for r in rows if r["backend"] == "hf_cfg")
    assert want <= by_section["contrast"]

    # ours (torch) and the two-op pipeline were checked against the torch implementation before they were timed
    for r in ok:
        if r["backend"] in ("torch", "ops_unfused"):
            assert r["tok_mismatch"] == "0" and float(r["max_lp_err"]) <= BD.LP_TOL, r
        if r["backend"] == "torch" and r["section"] == "sample":
            assert float(r["ratio_vs_multinomial"]) > 0 and float(r["ratio_vs_sort_free"]) > 0
            if r["mode"] != "plain":
                assert float(r["ratio_vs_sort_filter"]) > 0
        if r["backend"] == "torch" and r["section"] == "contrast":
            assert float(r["ratio_vs_unfused_torch"]) > 0 and float(r["ratio_vs_ops_unfused"]) > 0

    # the cuda backend: a skip row per case with the op's own refusal (no CUDA kernel for the op, or, for an op that
    # has one, CPU tensors); triton: needs a GPU
    from pllm_kernels import backend_table

    table = backend_table()
    cuda = [r for r in rows if r["backend"] == "cuda"]
    assert cuda and all(r["status"] == "skip" for r in cuda)
    for r in cuda:
        op = "fused_sample" if r["section"] == "contrast" else "sample_tokens"
        why = f"the {op} inputs are on cpu" if table[op]["cuda"] else f"no kernel for {op}"
        assert why in r["note"], r
    triton = [r for r in rows if r["backend"] == "triton"]
    assert triton and all(r["status"] == "skip" and "needs a CUDA device" in r["note"] for r in triton)
    assert "target checks" in text and "cuda skipped" in text
    summary = (out / BD.SUMMARY).read_text()
    assert summary.count("**SKIP**") == 2 and "fused_sample" in summary and "sample_tokens" in summary


@pytest.mark.parametrize("section", ["sample", "contrast"])
def test_guard_refuses_wrong_tokens(out, monkeypatch, capsys, section):
    """Ours drawing other tokens is not timed: an error row naming the refusal, exit code 1; the baselines of the
    same case are still measured."""
    name = "sample_tokens" if section == "sample" else "fused_sample"
    real = getattr(BD, name)

    def wrong(*a, **kw):
        tok, lp = real(*a, **kw)
        return (tok + 1) % 32000, lp

    monkeypatch.setattr(BD, name, wrong)
    base = "sort_free" if section == "sample" else "unfused_torch"
    rc = BD.main(["--smoke", "--sections", section, "--modes", "top_k", "--batch", "2", "--backend", f"torch,{base}",
                  "--spec-rows", "0", *FAST])
    assert rc == 1
    rows = _rows(out / BD.CSV)
    by = {r["backend"]: r for r in rows}
    assert by["torch"]["status"] == "error" and "refused: 2/2 tokens differ" in by["torch"]["note"]
    assert by[base]["status"] == "ok" and float(by[base]["median_ms"]) > 0
    assert "ERROR" in capsys.readouterr().out


def test_spec_guard(out, monkeypatch):
    """The torch implementation is checked against the float64 spec on a slice: a mismatch is an error row."""
    monkeypatch.setattr(BD, "spec_tokens", lambda P, n: torch.full((n,), -1, dtype=torch.int64))
    rc = BD.main(["--smoke", "--sections", "sample", "--modes", "top_k", "--batch", "1", "--backend", "sort_free",
                  *FAST])
    assert rc == 1
    rows = _rows(out / BD.CSV)
    spec = [r for r in rows if r["backend"] == "spec"]
    assert len(spec) == 1 and spec[0]["status"] == "error" and "differs from the spec" in spec[0]["note"]
