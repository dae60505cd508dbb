"""Shared benchmark harness of every ``pllm_kernels.bench.<op>`` module (stable, small API).

Ships with the package: ``python -m pllm_kernels.bench <op>`` runs from any install. Nothing here reads or
imports the source tree; results go to ``--out DIR`` / ``$PLLM_BENCH_OUT``, else under the current directory.

Public API (keep it stable: other benches and the GPU suite use it)
-------------------------------------------------------------------
``BENCHES``
    The one registry of op-family benchmarks: name -> module (``pllm_kernels.bench.<name>``, which implements
    ``main(argv) -> int``), or None for a registered benchmark not written yet. The GPU suite and
    ``python -m pllm_kernels.bench`` iterate over it and report a None entry as "not yet implemented"
    (:func:`load_bench` returns None), never as a crash.
``env_info() -> dict``
    device (name), device_kind (cuda/cpu), torch, triton, transformers, peft, cuda (runtime), git_sha, host,
    cuda_ext (one-line summary of :func:`pllm_kernels._ext.capabilities`). Cached. Every CSV row starts with it.
``time_fn(fn, *, warmup=25, rep=100, cuda_graph=False, arg_sets=None, device=None) -> dict``
    Median / 20th / 80th percentile of one call of ``fn``, in milliseconds. ``warmup`` and ``rep`` are time
    budgets in ms (as in ``triton.testing.do_bench``). ``arg_sets``: a list of argument objects; each call is
    ``fn(arg_sets[i])`` and the sets are rotated (use >= 32 sets for microsecond kernels so L2 does not flatter
    the result); without ``arg_sets`` each call is ``fn()``. On CUDA: one timed unit runs ``fn`` once per set
    and is timed with ``triton.testing.do_bench`` (CUDA events when triton does not import); with
    ``cuda_graph=True`` the unit is captured once in a CUDA graph (warm-up on a side stream first) and replayed;
    a failed capture falls back to plain timing and says so in ``note``. On CPU: ``time.perf_counter``.
    Returns ``{median_ms, p20_ms, p80_ms, p20, p80, method, n_sets, note}``.
``measure_roofline(device) -> dict``
    Measured in the same run: ``copy_gbps`` (large device-to-device copy, bytes read + written per second)
    and ``bf16_tflops`` (large bf16 matmul; on CPU an fp32 matmul, reported under the same key with
    ``matmul_dtype`` saying which), plus ``device``. Cached per device.
``append_rows(csv_name, rows) -> Path``
    Append dict rows to ``<results_dir()>/<csv_name>``; the header is the union of the columns (an existing
    file is rewritten when new columns appear). Every row gets env_info() and a timestamp first.
``results_dir() -> Path``
    ``$PLLM_BENCH_OUT`` when set (``--out`` sets it; so does the GPU suite), else ``./pllm_bench_results/``
    under the current working directory (:func:`default_out`); never a folder inside the package.
``base_parser(description) -> argparse.ArgumentParser``
    The common flags: ``--smoke --backend --shape --budget-s --out --csv --dry-run``.
``Budget(seconds)``
    ``.left()`` / ``.expired()``: benches stop starting new cases once their time budget is spent.
``gbps(bytes, ms)``, ``tflops(flops, ms)``, ``fmt_ms(ms)``: small helpers.

CSV columns: device, device_kind, torch, triton, transformers, peft, git_sha, timestamp, run_id, bench, case,
backend, median_ms, p20_ms, p80_ms, method, n_sets, note, then per-bench columns (gbps, pct_of_copy_bw, tflops,
pct_of_matmul, ratio_vs_<baseline>, ...). Rows from different devices must never be compared (the plot script
groups by device).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import functools
import importlib
import importlib.util
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BENCHES",
    "DEFAULT_OUT",
    "Budget",
    "Skip",
    "append_rows",
    "base_parser",
    "default_out",
    "env_info",
    "env_vars",
    "fmt_ms",
    "gbps",
    "implemented",
    "load_bench",
    "measure_roofline",
    "results_dir",
    "run_id",
    "tflops",
    "time_fn",
]

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the pllm_kernels package folder (for the git sha only)
DEFAULT_OUT = "pllm_bench_results"  # default results folder, relative to the current working directory

# The one registry of op-family benchmarks, in the order the GPU suite runs them: name -> module, None = not written
# yet. Point a name at its module when it lands (and add new names here).
BENCHES: dict[str, str | None] = {
    "lora": "pllm_kernels.bench.lora",
    "steering": "pllm_kernels.bench.steering",
    "decoding": "pllm_kernels.bench.decoding",
    "reward": None,
    "generate": "pllm_kernels.bench.generate",
}

BASE_COLUMNS = (
    "device", "device_kind", "torch", "triton", "transformers", "peft", "git_sha", "timestamp", "run_id",
    "bench", "case", "backend", "median_ms", "p20_ms", "p80_ms", "method", "n_sets", "note",
)


# --------------------------------------------------------------------------------------------- registry
class Skip(Exception):
    """A backend that cannot run here (missing, unsupported); the message says why."""


@contextlib.contextmanager
def env_vars(**kv):
    """Set environment variables for the block (restored after, also on error)."""
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update({k: str(v) for k, v in kv.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def implemented(name: str) -> bool:
    """Whether ``name`` is registered and has a module."""
    return BENCHES.get(name) is not None


def load_bench(name: str):
    """Import the module of benchmark ``name``; None when it is registered but not written yet.
    Raises KeyError for a name that is not registered."""
    if name not in BENCHES:
        raise KeyError(f"unknown benchmark {name!r}; registered: {', '.join(BENCHES)}")
    module = BENCHES[name]
    return None if module is None else importlib.import_module(module)


# --------------------------------------------------------------------------------------------- environment
def _version(mod: str) -> str:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        spec = importlib.util.find_spec(mod)
        if spec is None:
            return "none"
        try:
            return str(getattr(importlib.import_module(mod), "__version__", "unknown"))
        except Exception:
            return "unknown"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=10).stdout.strip()


def _git_sha() -> str:
    """``$PLLM_GIT_SHA``, else the commit of the checkout this package runs from (a source tree or an editable
    install), else "unknown" (an installed copy: its folder is not the package folder of a git work tree)."""
    if os.environ.get("PLLM_GIT_SHA"):
        return os.environ["PLLM_GIT_SHA"]
    try:
        top = _git("rev-parse", "--show-toplevel")
        if not top or (Path(top) / PACKAGE_DIR.name).resolve() != PACKAGE_DIR:
            return "unknown"  # e.g. site-packages of a venv that happens to lie inside some repository
        sha = _git("rev-parse", "--short=12", "HEAD")
        if not sha:
            return "unknown"
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def _ext_summary() -> str:
    try:
        from pllm_kernels import _ext

        caps = _ext.capabilities()
    except Exception as e:  # pragma: no cover - defensive
        return f"error: {type(e).__name__}: {e}"
    if not caps.get("has_cuda_ext"):
        return "not built"
    archs = caps.get("compiled_archs")
    return f"built archs={archs} usable={caps.get('usable')}"


def _device_name() -> tuple[str, str]:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0), "cuda"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu:{cpu} x{os.cpu_count()}", "cpu"


@functools.cache
def env_info() -> dict[str, Any]:
    """Device, versions, git sha and CUDA-extension state of this run (cached)."""
    name, kind = _device_name()
    return {
        "device": name,
        "device_kind": kind,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "cuda": torch.version.cuda or "none",
        "git_sha": _git_sha(),
        "host": platform.node(),
        "cuda_ext": _ext_summary(),
    }


@functools.cache
def run_id() -> str:
    """One id per process (or ``$PLLM_BENCH_RUN_ID``, set by the GPU suite so all its benches share it)."""
    return os.environ.get("PLLM_BENCH_RUN_ID") or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


# --------------------------------------------------------------------------------------------- timing
def _triton_testing():
    try:
        import triton.testing as tt

        return tt
    except Exception:
        return None


def _is_cuda(device) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def _quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    s = sorted(samples)
    if len(s) == 1:
        return s[0], s[0], s[0]
    qs = statistics.quantiles(s, n=10, method="inclusive")  # deciles: qs[1] = p20, qs[7] = p80
    return statistics.median(s), qs[1], qs[7]


def _result(median, p20, p80, method, n_sets, note="") -> dict[str, Any]:
    return {
        "median_ms": float(median), "p20_ms": float(p20), "p80_ms": float(p80), "p20": float(p20),
        "p80": float(p80), "method": method, "n_sets": n_sets, "note": note,
    }


def _time_cpu(unit: Callable[[int], None], n_sets: int, warmup: float, rep: float) -> dict[str, Any]:
    t_end = time.perf_counter() + warmup / 1e3
    i = 0
    while True:
        unit(i % n_sets)
        i += 1
        if time.perf_counter() >= t_end:
            break
    samples: list[float] = []
    t_end = time.perf_counter() + rep / 1e3
    while len(samples) < 3 or (time.perf_counter() < t_end and len(samples) < 10_000):
        t0 = time.perf_counter()
        unit(i % n_sets)
        samples.append((time.perf_counter() - t0) * 1e3)
        i += 1
    m, p20, p80 = _quantiles(samples)
    return _result(m, p20, p80, "perf_counter", n_sets)


def _time_cuda_events(fn: Callable[[], None], warmup: float, rep: float) -> tuple[float, float, float]:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(warmup / est))):
        fn()
    n = max(5, min(10_000, int(rep / est)))
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in evs:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return _quantiles([a.elapsed_time(b) for a, b in evs])


def _bench_cuda(fn: Callable[[], None], warmup: float, rep: float) -> tuple[tuple[float, float, float], str]:
    tt = _triton_testing()
    if tt is not None:
        m, p20, p80 = tt.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return (m, p20, p80), "do_bench"
    return _time_cuda_events(fn, warmup, rep), "cuda_events"


def _end_pool_routing(pool) -> None:
    try:
        torch._C._cuda_endAllocateToPool(torch.cuda.current_device(), pool)
    except Exception:  # routing already ended (newer torch) or never begun (failed before capture_begin)
        pass


def _end_failed_capture(caller, pool) -> None:
    """Undo what a failed capture (a host sync or a forbidden call inside it) leaves behind in torch 2.11, so that
    the fallback timing and every later case run normally:

    * ``torch.cuda.graph.__exit__`` raises in ``capture_end()`` before it restores the caller's stream;
    * ``capture_end()`` raises before ending the allocator's routing to the graph's pool: every later
      ``torch.cuda.empty_cache()`` (which each capture calls) then fails an internal assert
      (``captures_underway.empty()``, fixed upstream by pytorch#180395);
    * the default CUDA generator stays in capture mode (its capture epilogue never ran): every later draw from it
      raises "Offset increment outside graph capture". A small capture that succeeds runs the epilogue.
    """
    if torch.cuda.current_stream() != caller:
        torch.cuda.set_stream(caller)
    _end_pool_routing(pool)
    heal_pool = torch.cuda.graph_pool_handle()
    try:
        scratch = torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device()))
        with torch.cuda.graph(torch.cuda.CUDAGraph(), pool=heal_pool):
            scratch.add_(1)
    except Exception:  # the caller reports the first failure
        if torch.cuda.current_stream() != caller:
            torch.cuda.set_stream(caller)
        _end_pool_routing(heal_pool)


def _capture_graph(unit_all: Callable[[], None]):
    """Capture ``unit_all`` in a CUDA graph after a warm-up on a side stream; returns the graph or raises."""
    caller = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(caller)
    with torch.cuda.stream(side):
        for _ in range(2):
            unit_all()
    caller.wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    pool = torch.cuda.graph_pool_handle()  # our own handle: a failed capture's pool routing can be ended below
    try:
        with torch.cuda.graph(graph, pool=pool):
            unit_all()
    except BaseException:
        _end_failed_capture(caller, pool)
        raise
    torch.cuda.synchronize()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def time_fn(
    fn: Callable[..., Any],
    *,
    warmup: float = 25,
    rep: float = 100,
    cuda_graph: bool = False,
    arg_sets: Sequence[Any] | None = None,
    device=None,
) -> dict[str, Any]:
    """Time one call of ``fn`` (median / p20 / p80 in ms). See the module docstring."""
    n_sets = len(arg_sets) if arg_sets else 1

    def unit(i: int) -> None:
        if arg_sets:
            fn(arg_sets[i])
        else:
            fn()

    if not _is_cuda(device):
        return _time_cpu(unit, n_sets, warmup, rep)

    def unit_all() -> None:
        for i in range(n_sets):
            unit(i)

    note = ""
    if cuda_graph:
        try:
            graph = _capture_graph(unit_all)
        except Exception as e:  # capture is fragile (host syncs, allocations): fall back to plain timing
            note = f"graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
            graph = None
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
        if graph is not None:
            (m, p20, p80), method = _bench_cuda(graph.replay, warmup, rep)
            del graph
            return _result(m / n_sets, p20 / n_sets, p80 / n_sets, method + "+graph", n_sets, note)
    (m, p20, p80), method = _bench_cuda(unit_all, warmup, rep)
    return _result(m / n_sets, p20 / n_sets, p80 / n_sets, method, n_sets, note)


# --------------------------------------------------------------------------------------------- roofline
@functools.cache
def _roofline_cached(device_str: str) -> dict[str, Any]:
    device = torch.device(device_str)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        nbytes = int(min(1 << 30, free // 4))  # 1 GiB copy (read 1 GiB + write 1 GiB)
        src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
        dst = torch.empty_like(src)
        copy = time_fn(lambda: dst.copy_(src), warmup=25, rep=200, device=device)
        del src, dst
        n = 8192
        a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        mm = time_fn(lambda: torch.mm(a, b), warmup=50, rep=300, device=device)
        del a, b
        torch.cuda.empty_cache()
        mm_dtype = "bfloat16"
    else:
        nbytes = 64 << 20
        src = torch.randn(nbytes // 4)
        dst = torch.empty_like(src)
        copy = time_fn(lambda: dst.copy_(src), warmup=20, rep=150, device=device)
        n = 768
        a, b = torch.randn(n, n), torch.randn(n, n)
        mm = time_fn(lambda: torch.mm(a, b), warmup=20, rep=150, device=device)
        mm_dtype = "float32"
    return {
        "device": env_info()["device"],
        "copy_gbps": 2 * nbytes / (copy["median_ms"] * 1e-3) / 1e9,
        "copy_bytes": nbytes,
        "bf16_tflops": 2 * n**3 / (mm["median_ms"] * 1e-3) / 1e12,
        "matmul_dtype": mm_dtype,
        "matmul_n": n,
    }


def measure_roofline(device=None) -> dict[str, Any]:
    """Copy bandwidth (GB/s, read+write) and matmul rate (TFLOP/s) of ``device``, measured now (cached)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return dict(_roofline_cached(str(device)))


# --------------------------------------------------------------------------------------------- results
def default_out(*sub: str) -> Path:
    """``<cwd>/pllm_bench_results[/sub...]``: where results go without ``--out`` / ``$PLLM_BENCH_OUT``."""
    return Path.cwd().joinpath(DEFAULT_OUT, *sub)


def results_dir() -> Path:
    """``$PLLM_BENCH_OUT`` when set, else :func:`default_out`; created on first use."""
    out = os.environ.get("PLLM_BENCH_OUT")
    path = Path(out) if out else default_out()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fmt_cell(v: Any) -> Any:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return ""
        return f"{v:.6g}"
    return v


def append_rows(csv_name: str, rows: Sequence[dict[str, Any]]) -> Path:
    """Append rows (dicts) to ``results_dir()/csv_name``; env columns and a timestamp are filled in first."""
    path = results_dir() / csv_name
    if not rows:
        return path
    env = env_info()
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    full = []
    for row in rows:
        r = {k: env.get(k, "") for k in BASE_COLUMNS if k in env}
        r.update(timestamp=stamp, run_id=run_id())
        r.update({k: _fmt_cell(v) for k, v in row.items()})
        full.append(r)
    existing: list[dict[str, Any]] = []
    header: list[str] = []
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            existing = list(reader)
    had_header = bool(header)
    new_cols = [c for r in full for c in r if c not in header]
    if not header:
        header = list(BASE_COLUMNS)
    for c in new_cols:
        if c not in header:
            header.append(c)
    mode = "w" if (not had_header or new_cols) else "a"  # new columns: rewrite the file with the union header
    with open(path, mode, newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore", restval="")
        if mode == "w":
            w.writeheader()
            for r in existing:
                w.writerow(r)
        for r in full:
            w.writerow(r)
    return path


# --------------------------------------------------------------------------------------------- CLI helpers
def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (the default on CPU); seconds, for CI")
    p.add_argument("--backend", default="all", help="comma list of backends/baselines to run, or 'all'")
    p.add_argument("--shape", default="all", help="comma list of shape names, or 'all'")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new cases after this many seconds")
    p.add_argument("--out", default=None, help=f"results folder (default $PLLM_BENCH_OUT, else ./{DEFAULT_OUT})")
    p.add_argument("--csv", default=None, help="CSV file name inside the results folder")
    p.add_argument("--no-csv", action="store_true", help="print only, write no CSV")
    p.add_argument("--dry-run", action="store_true", help="list the cases and exit")
    return p


def apply_out(args: argparse.Namespace) -> None:
    if getattr(args, "out", None):
        os.environ["PLLM_BENCH_OUT"] = str(args.out)


class Budget:
    """Wall-clock budget of one bench: stop starting new cases once it is spent."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def expired(self) -> bool:
        return self.left() <= 0


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")


def fmt_ms(ms: float) -> str:
    if ms != ms:
        return "nan"
    return f"{ms * 1e3:.1f}us" if ms < 1 else f"{ms:.3f}ms"
