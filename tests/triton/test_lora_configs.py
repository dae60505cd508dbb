"""The per-shape launch-configuration table of the multi-LoRA Triton kernels (pllm_kernels/triton/lora_configs.py)
and its offline tuner (pllm_kernels/bench/tune_lora.py).

CPU: the shipped table loads and validates, lookup picks entries by shape range and GPU specificity, bad tables are
refused, the tuner refuses to run without a GPU and lists its candidates with ``--dry-run``. Interpreter: launches
really use a table entry (seen by a spy on the launcher module) and still match the reference with non-default
blocks, warps and a fixed split-K; the tuner's whole loop (measure, numerics check, entries, JSON) on tiny shapes.
"""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from utils import assert_close

from pllm_kernels.batch import build_lora_meta
from pllm_kernels.reference.lora import lora_apply_ref
from pllm_kernels.triton import lora as tl_lora
from pllm_kernels.triton import lora_configs as C

CPU = torch.device("cpu")


@pytest.fixture
def table():
    """Replace the table for one test (restored to the shipped file afterwards)."""
    yield C.set_table
    C.set_table(None)


def test_shipped_table_loads():
    entries = C.load_table(C.TABLE_PATH)
    assert entries == C.table()
    for e in entries:
        assert e["kernel"] in C.TUNABLE and e["config"]
        C.validate_config(e["kernel"], e["config"])


def test_lookup_ranges_and_specificity(table, monkeypatch):
    table([
        {"kernel": "expand_bgmv", "pairs": [1, 2], "config": {"BLOCK_N": 32}},
        {"kernel": "expand_bgmv", "pairs": [1, 2], "rank": [16, 16], "config": {"BLOCK_N": 16}},
        {"kernel": "expand_bgmv", "gpu": "sm_90", "pairs": [None, 8], "config": {"BLOCK_R": 16}},
        {"kernel": "expand_bgmv", "gpu": "NVIDIA H100 80GB HBM3", "pairs": [4, 4], "config": {"num_warps": 8}},
        {"kernel": "expand_sgmv", "m": [64, 64], "config": {"num_warps": 4}},
    ])
    d = C.DEFAULTS["expand_bgmv"]
    assert C.lookup("expand_bgmv", CPU, pairs=3, rank=16, dim=64) == C.config_for("expand_bgmv")
    assert C.lookup("expand_bgmv", CPU, pairs=2, rank=64, dim=64)["BLOCK_N"] == 32
    assert C.lookup("expand_bgmv", CPU, pairs=1, rank=16, dim=64)["BLOCK_N"] == 16  # more fields constrained
    # on a GPU the most specific key wins: name, then capability, then "*"
    monkeypatch.setattr(C, "gpu_keys", lambda dev: ("NVIDIA H100 80GB HBM3", "sm_90", "*"))
    assert C.lookup("expand_bgmv", CPU, pairs=4, rank=16, dim=64) == {**C.config_for("expand_bgmv"), "num_warps": 8}
    assert C.lookup("expand_bgmv", CPU, pairs=1, rank=16, dim=64) == {**C.config_for("expand_bgmv"), "BLOCK_R": 16}
    assert C.lookup("expand_bgmv", CPU, pairs=9, rank=16, dim=64)["BLOCK_N"] == d["BLOCK_N"]
    # SGMV: num_warps_m64 is the default at BLOCK_M 64 unless an entry sets num_warps
    C.set_table([])
    assert C.lookup("expand_sgmv", CPU, pairs=500, rank=16, dim=64, m=64)["num_warps"] == 8
    assert C.lookup("expand_sgmv", CPU, pairs=500, rank=16, dim=64, m=32)["num_warps"] == 4
    assert "num_warps_m64" not in C.lookup("expand_sgmv", CPU, pairs=500, rank=16, dim=64, m=64)


@pytest.mark.parametrize("entry,msg", [
    ({"kernel": "nope", "config": {}}, "unknown kernel"),
    ({"kernel": "fused", "config": {"BLOCK_N": 32}}, "no tunable"),
    ({"kernel": "expand_bgmv", "config": {"BLOCK_N": 48}}, "power of two"),
    ({"kernel": "expand_sgmv", "config": {"BLOCK_R": 8}}, "tl.dot K"),
    ({"kernel": "shrink_bgmv", "config": {"SPLIT_K": 128}}, "in \\[1, 64\\]"),
    ({"kernel": "shrink_bgmv", "pairs": 4, "config": {}}, "lo, hi"),
    ({"kernel": "shrink_bgmv", "config": {}, "color": "red"}, "unknown fields"),
])
def test_bad_tables_are_refused(entry, msg, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"schema": 1, "entries": [entry]}))
    with pytest.raises(ValueError, match=msg):
        C.load_table(path)
    path.write_text(json.dumps({"entries": []}))
    with pytest.raises(ValueError, match="schema"):
        C.load_table(path)


def test_tuner_refuses_without_gpu_and_dry_runs(capsys, tmp_path):
    from pllm_kernels.bench import tune_lora

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert tune_lora.main(["--out", str(tmp_path / "t.json")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()
    assert tune_lora.main(["--dry-run", "--shape", "q,down", "--T", "1,64,2048"]) == 0
    out = capsys.readouterr().out
    assert "decode-q-T1-r16-distinct" in out and "prefill512-down-T2048-r16-distinct" in out
    for kernel in C.TUNABLE:
        assert f"{kernel}: {len(tune_lora.candidates(kernel))} candidates" in out


KERNELS = ("_lora_shrink_sgmv_kernel", "_lora_shrink_bgmv_kernel", "_lora_expand_sgmv_kernel",
           "_lora_expand_bgmv_kernel", "_lora_fused_kernel")


class _Spy:
    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append((self.name, grid, kwargs))
            return launch(*args, **kwargs)

        return run


def _problem(T, dtype=torch.float32, S=2, R=16, H=300, sizes=(40, 24), seed=0):
    g = torch.Generator().manual_seed(zlib.crc32(repr((T, S, R, H, seed)).encode()))
    L = 3
    x = torch.randn(T, H, generator=g).to(dtype)
    a = (torch.randn(L, S, R, H, generator=g) / H**0.5).to(dtype)
    b = (torch.randn(L, sum(sizes), R, generator=g) / R**0.5).to(dtype)
    ranks = torch.tensor([R, 8, 5], dtype=torch.int32)
    scales = 0.5 + torch.rand(L, generator=g)
    slots = torch.randint(0, L, (T, 1), generator=g, dtype=torch.int32)
    y = torch.randn(T, sum(sizes), generator=g).to(dtype)
    return dict(x=x, a=a, b=b, ranks=ranks, scales=scales, slots=slots, y=y, sizes=sizes,
                meta=build_lora_meta(slots, L))


@pytest.mark.interpreter
@pytest.mark.parametrize("path,T", [("bgmv", 2), ("sgmv", 70), ("fused", 2)])
def test_launches_use_the_table(path, T, table, monkeypatch):
    """Non-default entries for every kernel of the path: the launches get exactly those blocks / warps / split,
    and the result still equals the reference."""
    table([
        {"kernel": "shrink_bgmv", "config": {"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 2, "SPLIT_K": 2}},
        {"kernel": "expand_bgmv", "config": {"BLOCK_N": 16, "BLOCK_R": 16, "num_warps": 2}},
        {"kernel": "shrink_sgmv", "config": {"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 2, "SPLIT_K": 4}},
        {"kernel": "expand_sgmv", "config": {"BLOCK_N": 32, "BLOCK_R": 32, "num_warps": 2}},
        {"kernel": "fused", "config": {"FUSED_TILE": 2048, "num_warps": 2}},
        {"kernel": "fused", "pairs": [1000, None], "config": {"FUSED_TILE": 8192}},  # does not match
    ])
    log = []
    for name in KERNELS:
        monkeypatch.setattr(tl_lora, name, _Spy(getattr(tl_lora, name), name, log))
    d = _problem(T)
    m = d["meta"]
    ref = lora_apply_ref(d["y"].double(), d["x"].double(), d["a"].double(), d["b"].double(), d["slots"],
                         m.token_weights.double(), d["ranks"], d["scales"].double(), d["sizes"])
    tl_lora.lora_apply_triton(d["y"], d["x"], d["a"], d["b"], d["ranks"], d["scales"], m.token_slots,
                              m.token_weights, m.sorted_pairs, m.seg_slot, m.seg_start, m.seg_len, d["sizes"],
                              chunk=m.chunk, path=path)
    assert_close(d["y"], ref, torch.float32, scale=float(ref.abs().max()))
    got = {name: (grid, kw) for name, grid, kw in log}
    if path == "bgmv":
        grid, kw = got["_lora_shrink_bgmv_kernel"]
        assert (kw["BLOCK_N"], kw["BLOCK_K"], kw["num_warps"], grid[2], kw["ATOMIC"]) == (16, 64, 2, 2, False)
        grid, kw = got["_lora_expand_bgmv_kernel"]
        assert (kw["BLOCK_N"], kw["BLOCK_R"], kw["num_warps"], kw["P"]) == (16, 16, 2, 2)  # sums 2 partials
    elif path == "sgmv":
        grid, kw = got["_lora_shrink_sgmv_kernel"]
        assert (kw["BLOCK_N"], kw["BLOCK_K"], kw["num_warps"], grid[2], kw["ATOMIC"]) == (32, 32, 2, 4, True)
        grid, kw = got["_lora_expand_sgmv_kernel"]
        assert (kw["BLOCK_N"], kw["BLOCK_R"], kw["num_warps"]) == (32, 32, 2)
    else:
        (grid, kw), = got.values()
        assert kw["num_warps"] == 2 and kw["BLOCK_N"] == tl_lora.fused_blocks(16, 2, 2048)["BLOCK_N"] == 64


@pytest.mark.interpreter
def test_tuner_loop_on_tiny_shapes(monkeypatch, tmp_path, table):
    """The tuner end to end under the interpreter (timings meaningless, plumbing real): two candidates per kernel on
    a tiny two-slice module (single-slice calls take the fused kernel at every decode size), fused (T = 1), BGMV
    (T = 16) and SGMV (T = 80) problems; every candidate passes the numerics check, the written table loads and
    only holds entries for the problems' exact rank / dim."""
    from pllm_kernels.bench import lora as bench_lora
    from pllm_kernels.bench import tune_lora

    monkeypatch.setitem(bench_lora.SHAPES, "q", (48, (16, 16)))
    monkeypatch.setattr(tune_lora, "CANDIDATES", {
        "shrink_bgmv": {"BLOCK_N": (16,), "BLOCK_K": (32, 64)},
        "expand_bgmv": {"BLOCK_N": (16, 32)},
        "fused": {"FUSED_TILE": (2048,), "num_warps": (2,)},
        "shrink_sgmv": {"BLOCK_K": (32,), "num_warps": (2,)},
        "expand_sgmv": {"BLOCK_N": (32,)},
    })
    from pllm_kernels.bench import harness

    monkeypatch.setattr(harness, "time_fn", lambda fn, **kw: {"median_ms": 1.0})  # interpreter: no timing loop
    real_measure = tune_lora.measure

    def measure(P, path, entries, ref, **kw):  # real call and numerics; interpreter timings replaced: each
        ms, err, spills = real_measure(P, path, entries, ref, **kw)  # candidate (one more entry) is "faster"
        return 1.0 / (1 + len(entries)), err, spills

    monkeypatch.setattr(tune_lora, "measure", measure)
    args = type("A", (), dict(shapes=["q"], T=[1, 16, 80], rank=[8], sets=1, warmup_ms=0, rep_ms=1, budget_s=600,
                              min_gain=0.03, merge=False, dtype="float32"))()
    logs = []
    res = tune_lora.tune(args, CPU, torch.float32, logs.append)
    assert not [m for m in logs if "rejected" in m], logs
    kernels = {e["kernel"] for e in res["entries"]}
    assert kernels == {"fused", "shrink_bgmv", "expand_bgmv", "shrink_sgmv", "expand_sgmv"}, logs
    for e in res["entries"]:
        assert e["gpu"] == "cpu" and e["dim"] in ([48, 48], [32, 32]) and e["rank"] in ([8, 8], [16, 16])
    out = tmp_path / "table.json"
    tune_lora.write_table(res, args, out)
    assert C.load_table(out) == [C._validate_entry(e, i) for i, e in enumerate(res["entries"])]
    assert tune_lora._pairs_ranges([1, 8, 64]) == {1: [1, 2], 8: [3, 22], 64: [23, None]}
