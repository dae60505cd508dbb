"""Mixed-user generate throughput: a smoke run of ``pllm_kernels.bench.generate`` (always) and pytest-benchmark
entries on CPU (on request only)::

    PLLM_RUN_BENCH=1 pytest tests/hf/test_bench_generate.py            # or: pytest ... --benchmark-enable
    PLLM_RUN_BENCH=1 pytest tests/hf/test_bench_generate.py --benchmark-autosave --benchmark-compare

Entries: ours vs PEFT's mixed batch vs one merged adapter, tiny Llama (hidden 256, 4 layers), 8 distinct users,
one row each, 16-token prompts, 32 greedy new tokens (the CPU profile of bench_generate). Each entry's generated
tokens must equal PEFT's, row by row, with each row run alone under its own adapter.
"""

import csv
import os
from types import SimpleNamespace

import pytest
import torch

from pllm_kernels.bench import generate as BG

pytest.importorskip("transformers")
pytest.importorskip("peft")


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
    # the benchmark checks its contenders' tokens against PEFT's mixed batch: float32, so exactly equal
    assert float(ours["tokens_eq_peft"]) == 1.0 and int(ours["rows_compared"]) == 4 and ours["note"] == ""
    merged = next(r for r in rows if r["backend"] == "merged")
    assert float(merged["tokens_eq_peft"]) == 1.0 and int(merged["rows_compared"]) == 1


def test_bench_generate_flags_wrong_tokens(tmp_path, monkeypatch):
    """A contender whose tokens differ from PEFT's in float32 is an error of the run, not a figure."""
    build = BG.build_contenders

    def swapped_users(prof, n_users, backends):
        c = build(prof, n_users, backends)
        ours = c.gens["ours"]
        c.gens["ours"] = lambda i, m, kw: ours(i.roll(1, 0), m.roll(1, 0), kw).roll(-1, 0)  # rows get others' users
        return c

    monkeypatch.setattr(BG, "build_contenders", swapped_users)
    assert BG.main(["--smoke", "--backend", "ours,peft_mixed", "--out", str(tmp_path)]) == 1
    with open(tmp_path / BG.CSV) as f:
        ours = next(r for r in csv.DictReader(f) if r["backend"] == "ours")
    assert float(ours["tokens_eq_peft"]) < 1.0 and ours["note"].startswith("error: tokens differ")


def _issue_at_smoke_size(monkeypatch):
    """The smoke profile with the cpu-issue profile's statistics and targets: medians of 3 round-robin rounds."""
    profile = BG._profile

    def prof(args):
        return dict(profile(args), stat="median", targets=BG.ISSUE_TARGETS)

    monkeypatch.setattr(BG, "_profile", prof)


def test_bench_generate_extra_contenders(tmp_path, monkeypatch, capsys):
    """peft_one, base and ours_none next to the three others, with the issue's ratio and target columns."""
    monkeypatch.setenv("PLLM_BENCH_RUN_ID", "test-run")
    _issue_at_smoke_size(monkeypatch)
    assert BG.main(["--smoke", "--backend", "all-extra", "--out", str(tmp_path)]) == 0
    with open(tmp_path / BG.CSV) as f:
        rows = {r["backend"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(BG.ALL_BACKENDS)
    assert all(float(r["e2e_tok_s"]) > 0 and int(r["rounds"]) == 3 and r["note"] == "" for r in rows.values())
    assert all(r["method"].startswith("perf_counter(median of 3 rounds") for r in rows.values())
    for (num, den), target in BG.ISSUE_TARGETS.items():
        r = rows[num]
        assert float(r[f"ratio_vs_{den}"]) > 0 and float(r[f"e2e_ratio_vs_{den}"]) > 0, (num, den)
        assert float(r[f"target_vs_{den}"]) == target and r[f"pass_vs_{den}"] in ("True", "False"), (num, den)
        paired = float(r[f"paired_ratio_vs_{den}"])  # judged on the median of the per-round ratios
        assert paired > 0 and r[f"pass_vs_{den}"] == str(paired >= target), (num, den)
    assert float(rows["ours_none"]["tokens_eq_base"]) == 1.0 and int(rows["ours_none"]["rows_compared"]) == 4
    assert float(rows["peft_one"]["tokens_eq_peft"]) == 1.0 and int(rows["peft_one"]["rows_compared"]) == 1
    assert float(rows["merged_reads"]["tokens_eq_peft"]) == 1.0 and int(rows["merged_reads"]["rows_compared"]) == 1
    floor = float(rows["merged_reads"]["ratio_vs_merged"])
    assert float(rows["ours"]["memory_floor_vs_merged"]) == pytest.approx(floor)
    out = capsys.readouterr().out
    assert "ours_none / base decode = " in out and "ours / peft_mixed decode = " in out
    assert "memory floor: merged_reads / merged decode = " in out
    assert ("PASS" in out) or ("FAIL" in out)


def test_bench_generate_base_and_floor_contenders():
    """``base`` runs unpatched on the patched model's very weight tensors (same memory); ``merged_reads`` reads every
    user's adapter bytes once per step on top of the merged model and leaves its tokens alone."""
    prof = BG._profile(SimpleNamespace(smoke=True, gpu=False, profile=None))
    c = BG.build_contenders(prof, 4, ("base", "ours_none", "merged", "merged_reads"))
    try:
        plain = [cell.cell_contents for cell in c.gens["base"].__closure__
                 if isinstance(cell.cell_contents, torch.nn.Module)][0]
        patched = dict(c.pm.model.state_dict(keep_vars=True))
        shared = dict(plain.state_dict(keep_vars=True))
        assert shared.keys() == patched.keys()
        assert all(shared[k].data_ptr() == patched[k].data_ptr() for k in shared)
        assert not any(type(m).__name__ == "MultiLoRALinear" for m in plain.modules())
        assert c.gens["merged_reads"].read_bytes == c.adapter_bytes  # every user's A and B, all targets
        kw = BG._gen_kwargs(3)
        with torch.no_grad():
            assert torch.equal(c.gens["merged_reads"](c.ids, c.mask, kw), c.gens["merged"](c.ids, c.mask, kw))
            assert torch.equal(c.gens["base"](c.ids, c.mask, kw), c.gens["ours_none"](c.ids, c.mask, kw))
    finally:
        c.close()


def test_bench_generate_flags_ours_none_differing_from_base(tmp_path, monkeypatch):
    """ours with every row without a user must give the base model's tokens exactly (float32)."""
    build = BG.build_contenders

    def with_a_user(prof, n_users, backends):
        c = build(prof, n_users, backends)
        pm, users = c.pm, c.users
        c.gens["ours_none"] = lambda i, m, kw: pm.generate(i, attention_mask=m, users=users, **kw)  # not nobody
        return c

    monkeypatch.setattr(BG, "build_contenders", with_a_user)
    assert BG.main(["--smoke", "--backend", "base,ours_none", "--rounds", "1", "--out", str(tmp_path)]) == 1
    with open(tmp_path / BG.CSV) as f:
        row = next(r for r in csv.DictReader(f) if r["backend"] == "ours_none")
    assert float(row["tokens_eq_base"]) < 1.0 and row["note"].startswith("error: tokens differ from base")


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # rounds of (time of new tokens, time of 1 token): decode time = the difference
    num = [(1.0, 0.2), (2.0, 0.4), (1.5, 0.5), (0.3, 0.4)]  # decode 0.8, 1.6, 1.0, (negative: skipped)
    den = [(0.6, 0.2), (1.2, 0.4), (1.0, 0.5), (1.0, 0.5)]  # decode 0.4, 0.8, 0.5
    assert BG.paired_ratio(num, den) == pytest.approx(0.5)  # every usable round: num is half as fast
    assert BG.paired_ratio([(1.0, 1.0)], [(1.0, 0.5)]) is None


def test_bench_generate_cpu_issue_profile():
    prof = BG._profile(SimpleNamespace(smoke=False, gpu=False, profile="cpu-issue"))
    assert prof["model"] == dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                                 num_key_value_heads=4, vocab_size=8192)
    assert (prof["users"], prof["prompt"], prof["new"], prof["threads"]) == ([8], 64, 32, 2)
    assert (prof["rank"], prof["alpha"], prof["stat"]) == (16, 32, "median") and prof["reps"] >= 3
    assert set(prof["backends"]) == set(BG.ALL_BACKENDS) and prof["targets"] == BG.ISSUE_TARGETS
    specs = BG.adapter_specs(8, prof["rank"], prof["alpha"])
    assert all(s["r"] == 16 and s["lora_alpha"] == 32 for s in specs.values())
    assert BG.main(["--profile", "cpu-issue", "--dry-run"]) == 0
    assert BG.main(["--profile", "cpu-issue", "--rounds", "2", "--dry-run"]) == 2  # medians of >= 3 rounds


def _enabled(config) -> bool:
    return os.environ.get("PLLM_RUN_BENCH", "0") not in ("", "0") or bool(config.getoption("benchmark_enable", False))


_CASE = {}


def _case():
    """The benchmark's own contenders of its CPU profile at 8 users (built once per session), and the reference:
    PEFT with each row alone under its own adapter (``set_adapter``), greedy, 32 new tokens."""
    if not _CASE:
        prof = BG._profile(SimpleNamespace(smoke=False, gpu=False))  # the CPU profile
        assert prof["model"] == BG.CPU_MODEL and prof["dtype"] == torch.float32
        c = BG.build_contenders(prof, 8, BG.BACKENDS)
        kw = BG._gen_kwargs(32)
        with torch.no_grad():
            rows = []
            for i, user in enumerate(c.users):
                c.peft_model.set_adapter(user)
                rows.append(c.peft_model.generate(input_ids=c.ids[i : i + 1], attention_mask=c.mask[i : i + 1], **kw))
        _CASE.update(c=c, kw=kw, ref=torch.cat(rows))
    return _CASE


@pytest.mark.benchmark(group="generate-cpu-8users")
@pytest.mark.parametrize("backend", BG.BACKENDS)
def test_generate_8_users(benchmark, request, monkeypatch, backend):
    if not _enabled(request.config):
        pytest.skip("pytest-benchmark entries run on request: PLLM_RUN_BENCH=1 or --benchmark-enable")
    monkeypatch.setenv("PLLM_CHECK_VALUES", "0")
    case = _case()
    c, kw, ref = case["c"], case["kw"], case["ref"]
    with torch.no_grad():
        out = benchmark.pedantic(c.gens[backend], args=(c.ids, c.mask, kw), rounds=5, iterations=1, warmup_rounds=1)
    assert out.shape == ref.shape == (8, 16 + 32)
    rows = BG.compared_rows(backend, c.users)  # merged: one adapter for everyone, so only its own user's row
    assert torch.equal(out[rows], ref[rows]), f"{backend}: generated tokens differ from PEFT's per-row runs"
    benchmark.extra_info["tokens_per_round"] = 8 * 32
