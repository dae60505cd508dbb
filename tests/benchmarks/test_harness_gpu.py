"""The benchmark harness's CUDA paths (marker ``gpu``, run by the GPU suite before the benchmarks rely on them):
``triton.testing.do_bench`` timing, CUDA-graph capture and replay of rotated argument sets, and the fallback when
a capture fails. The failing capture runs in a child process: on torch 2.11 an unrepaired failed capture breaks
``torch.cuda.empty_cache()``, later captures and the default CUDA generator for the rest of the process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pllm_kernels
from pllm_kernels.bench import harness as H

pytestmark = pytest.mark.gpu


def test_time_fn_do_bench():
    a = torch.randn(256, 256, device="cuda")
    res = H.time_fn(lambda: a @ a, warmup=2, rep=10, device="cuda")
    assert res["method"] == "do_bench" and res["note"] == "", res
    assert 0 < res["p20_ms"] <= res["median_ms"] <= res["p80_ms"]


def test_time_fn_graph_replays_every_set():
    hits = torch.zeros(4, device="cuda")

    def bump(i):
        hits[i] += 1

    res = H.time_fn(bump, arg_sets=list(range(4)), cuda_graph=True, warmup=2, rep=10, device="cuda")
    assert res["method"] == "do_bench+graph" and res["note"] == "" and res["n_sets"] == 4, res
    assert 0 < res["p20_ms"] <= res["median_ms"] <= res["p80_ms"]
    torch.cuda.synchronize()
    n = hits.tolist()
    assert n[0] >= 3 and all(v == n[0] for v in n), n  # 2 warm-ups, 1 check replay, the timed replays: every set


_FAILED_CAPTURE = """
import torch
from pllm_kernels.bench import harness as H

x = torch.ones(8, device="cuda")
caller = torch.cuda.current_stream()
res = H.time_fn(lambda: x.sum().item(), cuda_graph=True, warmup=1, rep=5, device="cuda")  # host sync: no capture
assert res["note"].startswith("graph capture failed") and res["method"] == "do_bench", res
assert torch.cuda.current_stream() == caller, "still on the capture stream"
torch.cuda.empty_cache()  # torch 2.11 without the repair: captures_underway.empty() INTERNAL ASSERT
torch.randn(4, device="cuda")  # without the repair: "Offset increment outside graph capture"
y = torch.zeros(8, device="cuda")
res = H.time_fn(lambda: y.add_(1), cuda_graph=True, warmup=1, rep=5, device="cuda")
assert res["method"] == "do_bench+graph" and res["note"] == "", res
print("RECOVERED")
"""


def test_failed_capture_falls_back_and_the_process_recovers():
    pkg_parent = str(Path(pllm_kernels.__file__).resolve().parent.parent)  # the child imports the same package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pkg_parent, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _FAILED_CAPTURE], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "RECOVERED" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
