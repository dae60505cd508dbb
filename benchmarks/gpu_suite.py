"""The GPU suite: one command, one output folder, under 10 minutes (run it through ``benchmarks/gpu_suite.sh``).

    bash benchmarks/gpu_suite.sh [--dry-run] [--budget-s 480] [--benches lora,generate|none] [--pack DIR] [OUT_DIR]
    python -m benchmarks.gpu_suite --import FILE.tar.gz      # here, after the run: unpack into benchmarks/results/

Steps, each with its own timeout inside the overall budget (default 480 s, leaving margin in a 10-minute call),
each logged to ``OUT/logs/<step>.log``:

1. build     ``PLLM_REQUIRE_CUDA_EXT=1 python setup.py build_ext --inplace``
2. gpu_tests ``pytest -m gpu -q`` (junit xml ``OUT/junit_gpu.xml``), except the static-decode tests:
   gpu_decode ``pytest -m gpu tests/hf/test_static_decode.py`` (CUDA-graph decode replayed while users change,
   torch.compile reduce-overhead; ``OUT/junit_gpu_decode.xml``)
3. sanitizer ``compute-sanitizer --tool memcheck`` over ``pytest -m gpu tests/cuda`` and ``--tool racecheck`` over
             ``tests/cuda/test_{lora,steer,decoding,sample,reward}_cuda_gpu.py -k sanitizer`` (both with
             ``PLLM_SANITIZER=1``: small shapes)
3b. tune_lora ``python -m pllm_kernels.bench.tune_lora --T 1,8,64 --rank 16 --budget-s 35``: a short timing pass of
             the Triton LoRA launch configs at decode shapes, written to ``OUT/lora_configs.json`` (review, then
             commit as ``pllm_kernels/triton/lora_configs.json``)
4. bench_*   ``python -m pllm_kernels.bench <op> --out OUT`` for every benchmark registered in
             ``pllm_kernels.bench.harness.BENCHES`` (registered but not written: "not yet implemented"), sharing
             what is left of the budget; CSVs and ``bench_<op>_summary.md`` land in OUT
5. plots     ``python -m benchmarks.plot OUT``
6. summary   ``OUT/summary.md``: step table, env, every bench summary (with the target checks)

``--dry-run``, or no CUDA device: steps 1-3 are skipped (and the summary says so) and the benchmarks run at
smoke size on CPU. OUT defaults to ``benchmarks/results/<date>-<device>`` (GPU) or
``benchmarks/results/tmp-dryrun-<date>`` (dry run; git-ignored). Installs nothing; tests and benchmarks the
package of this checkout (PYTHONPATH=<repo>, set here and by the .sh wrapper).

Packing (the lent device machine returns at most 8 files from ``$OUT``, two folders deep): ``--pack DIR`` writes
the whole result folder as ``DIR/gpu_suite.tar.gz`` (one top folder ``<date>-<device>/``) plus ``DIR/summary.md``.
When ``$OUT`` is set and no OUT_DIR is given, the suite works in ``/tmp/pllm_gpu_suite/<date>-<device>`` and packs
into ``$OUT`` by itself, so ``bash benchmarks/gpu_suite.sh`` is the whole device command. ``--import FILE`` unpacks
such a tarball into ``benchmarks/results/`` and refreshes the latest-figures table of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/gpu_suite.py`: test and benchmark this checkout's package
    sys.path.insert(0, str(ROOT))

from pllm_kernels.bench import harness as H  # noqa: E402

RESERVE_S = 25  # kept back for plots + summary
DECODE_TESTS = "tests/hf/test_static_decode.py"  # step gpu_decode (kept out of gpu_tests)


class Suite:
    def __init__(self, out: Path, budget_s: float, dry: bool):
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.dry = dry
        self.steps: list[dict] = []

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def record(self, name, status, seconds=0.0, detail="", log=None):
        self.steps.append({"step": name, "status": status, "seconds": round(seconds, 1), "detail": detail,
                           "log": str(log.relative_to(self.out)) if log else ""})
        print(f"[gpu_suite] {name:<14} {status:<8} {seconds:6.1f}s  {detail}", flush=True)

    def skip(self, name, why):
        self.record(name, "SKIPPED", 0.0, why)

    def run(self, name, cmd, *, timeout, env=None, ok_codes=(0,), reserve=RESERVE_S) -> tuple[int | None, str]:
        """Run ``cmd`` (list) with a timeout (killing its process group), log to logs/<name>.log."""
        timeout = max(5.0, min(timeout, self.left() - reserve))
        log = self.logs / f"{name}.log"
        full_env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(
            os.pathsep), **(env or {})}
        t = time.monotonic()
        with open(log, "w") as f:
            f.write(f"$ {' '.join(map(str, cmd))}\n# timeout {timeout:.0f}s\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                rc = None
        dt = time.monotonic() - t
        tail = log.read_text(errors="replace").strip().splitlines()
        last = tail[-1][:160] if tail else ""
        if rc is None:
            self.record(name, "TIMEOUT", dt, f"killed after {timeout:.0f}s; last: {last}", log)
        else:
            self.record(name, "OK" if rc in ok_codes else "FAIL", dt, f"rc={rc}; {last}", log)
        return rc, log.read_text(errors="replace")


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and Path(base, "bin", "compute-sanitizer").exists():
            return str(Path(base, "bin", "compute-sanitizer"))
    return None


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower()[:40]


def _run_folder_name(dry: bool) -> str:
    date = _dt.datetime.now().strftime("%Y%m%d-%H%M")
    return f"tmp-dryrun-{date}" if dry else f"{date}-{_slug(H.env_info()['device'])}"


def _default_out(dry: bool, packing: bool) -> Path:
    if packing:  # results go back as one tarball: work in /tmp, under the folder name they will be committed as
        return Path(os.environ.get("TMPDIR", "/tmp")) / "pllm_gpu_suite" / _run_folder_name(dry)
    return ROOT / "benchmarks" / "results" / _run_folder_name(dry)


def pack(out: Path, dest: Path) -> list[Path]:
    """``dest/gpu_suite.tar.gz`` (``out`` as its one top folder) and ``dest/summary.md``: two files, so the result
    set survives a transfer that returns only a few files (the device tool returns at most 8 from ``$OUT``)."""
    dest.mkdir(parents=True, exist_ok=True)
    tar_path = dest / "gpu_suite.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        # never pack the tarball into itself (DIR may lie inside the result folder)
        tar.add(out, arcname=out.name, filter=lambda ti: None if ti.name.endswith("/gpu_suite.tar.gz") else ti)
    written = [tar_path]
    if (out / "summary.md").exists() and out.resolve() != dest.resolve():
        shutil.copyfile(out / "summary.md", dest / "summary.md")
        written.append(dest / "summary.md")
    return written


def import_pack(tar_path: Path, results: Path | None = None, update_readme: bool = True) -> Path:
    """Unpack a ``gpu_suite.tar.gz`` into ``results`` (default ``benchmarks/results/``); refuses to overwrite an
    existing run folder and any member outside its one top folder. Returns the run folder."""
    results = results or (ROOT / "benchmarks" / "results")
    with tarfile.open(tar_path, "r:gz") as tar:
        members = tar.getmembers()
        tops = {Path(m.name).parts[0] for m in members if m.name not in ("", ".")}
        if len(tops) != 1:
            raise ValueError(f"tar_path: expected one top folder in {tar_path}, found {sorted(tops)}")
        top = tops.pop()
        for m in members:
            if Path(m.name).is_absolute() or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
                raise ValueError(f"tar_path: unsafe member {m.name!r} in {tar_path}")
        run_dir = results / top
        if run_dir.exists():
            raise FileExistsError(f"tar_path: {run_dir} exists already; remove it first to re-import")
        results.mkdir(parents=True, exist_ok=True)
        for m in members:
            target = results / m.name
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None
            with open(target, "wb") as f:
                shutil.copyfileobj(src, f)
    if update_readme:
        from benchmarks import plot

        plot.main([str(results), "--update-readme", "--no-charts"])
    return run_dir


def _pytest_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if re.search(r"\b(passed|failed|skipped|error|no tests ran)\b", line):
            return line.strip("= ").strip()
    return ""


def write_summary(s: Suite, env: dict, benches: list[str]) -> Path:
    lines = ["# GPU suite summary", "",
             f"- device: **{env['device']}** ({'dry run / CPU' if s.dry else 'GPU run'})",
             f"- torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, peft {env['peft']}, "
             f"CUDA {env['cuda']}; git {env['git_sha']}; CUDA ext: {env['cuda_ext']}",
             f"- run id {H.run_id()}, total {time.monotonic() - s.t0:.0f}s of a {s.budget_s:.0f}s budget"]
    skipped = [st for st in s.steps if st["status"] == "SKIPPED"]
    if skipped:
        lines += ["", "**Skipped steps:** " + "; ".join(f"{st['step']} ({st['detail']})" for st in skipped)]
    lines += ["", "| step | status | seconds | detail | log |", "|---|---|---|---|---|"]
    for st in s.steps:
        detail = st["detail"].replace("|", "\\|")
        lines.append(f"| {st['step']} | {st['status']} | {st['seconds']} | {detail} | {st['log']} |")
    for name in benches:
        md = s.out / f"bench_{name}_summary.md"
        if md.exists():
            lines += ["", md.read_text().rstrip()]
    plots = sorted((s.out / "plots").glob("*.png")) if (s.out / "plots").exists() else []
    if plots:
        lines += ["", "## Plots", ""] + [f"- [{p.name}](plots/{p.name})" for p in plots]
    path = s.out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default=None, help="output folder (default $OUT or benchmarks/results/...)")
    ap.add_argument("--dry-run", action="store_true", help="skip every GPU step; smoke benchmarks on CPU")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("PLLM_SUITE_BUDGET_S", 480)))
    ap.add_argument("--benches", default="all", help="comma list of benchmarks, 'all' or 'none'")
    ap.add_argument("--skip", default="",
                    help="comma list of steps to skip: build,gpu_tests,gpu_decode,sanitizer,plots")
    ap.add_argument("--pack", default=None, metavar="DIR",
                    help="also write DIR/gpu_suite.tar.gz + DIR/summary.md (default: $OUT when set and no OUT_DIR)")
    ap.add_argument("--import", dest="import_tar", default=None, metavar="FILE",
                    help="unpack a gpu_suite.tar.gz into benchmarks/results/ and refresh the README table; no run")
    args = ap.parse_args(argv)

    if args.import_tar:
        run_dir = import_pack(Path(args.import_tar))
        print(f"[gpu_suite] imported {args.import_tar} -> {run_dir}; README table refreshed")
        return 0
    pack_dir = Path(args.pack) if args.pack else (
        Path(os.environ["OUT"]) if os.environ.get("OUT") and not args.out else None)

    cuda = _cuda_available()
    dry = args.dry_run or not cuda
    out = Path(args.out) if args.out else _default_out(dry, packing=pack_dir is not None)
    out = out.resolve()
    s = Suite(out, args.budget_s, dry)
    os.environ["PLLM_BENCH_OUT"] = str(out)
    os.environ.setdefault("PLLM_BENCH_RUN_ID", H.run_id())
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    env = H.env_info()
    print(f"[gpu_suite] output folder {out}")
    print(f"[gpu_suite] {env['device']}; torch {env['torch']}; triton {env['triton']}; git {env['git_sha']}; "
          f"budget {args.budget_s:.0f}s")
    if dry:
        why = "dry run (--dry-run)" if args.dry_run else "no CUDA device (torch.cuda.is_available() is False)"
        print(f"[gpu_suite] {why}: SKIPPING the GPU steps build, gpu_tests, gpu_decode, sanitizer; benchmarks run "
              "at smoke size")

    gpu_why = "dry run" if args.dry_run else "no CUDA device"
    # 1. build the CUDA extension
    if dry:
        s.skip("build", gpu_why)
    elif "build" in skip:
        s.skip("build", "--skip build")
    else:
        s.run("build", [sys.executable, "setup.py", "build_ext", "--inplace"], timeout=180,
              env={"PLLM_REQUIRE_CUDA_EXT": "1"})
    # 2. GPU tests
    if dry:
        s.skip("gpu_tests", gpu_why)
    elif "gpu_tests" in skip:
        s.skip("gpu_tests", "--skip gpu_tests")
    else:
        rc, text = s.run("gpu_tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                       f"--ignore={DECODE_TESTS}", f"--junitxml={out / 'junit_gpu.xml'}"],
                         timeout=150)
        if s.steps[-1]["status"] != "TIMEOUT":
            s.steps[-1]["detail"] = f"rc={rc}; {_pytest_line(text)}"
    # 2b. static decoding on the GPU: CUDA-graph capture + replay with changing users, torch.compile
    #     (reduce-overhead); its own step and timeout, since compiling the model can take a while
    if dry:
        s.skip("gpu_decode", gpu_why)
    elif "gpu_decode" in skip:
        s.skip("gpu_decode", "--skip gpu_decode")
    else:
        rc, text = s.run("gpu_decode", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                        DECODE_TESTS, f"--junitxml={out / 'junit_gpu_decode.xml'}"], timeout=120)
        if s.steps[-1]["status"] != "TIMEOUT":
            s.steps[-1]["detail"] = f"rc={rc}; {_pytest_line(text)}"
    # 3. compute-sanitizer over the CUDA tests
    san = _sanitizer()
    if dry:
        s.skip("sanitizer", gpu_why)
    elif "sanitizer" in skip:
        s.skip("sanitizer", "--skip sanitizer")
    elif san is None:
        s.skip("sanitizer", "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    else:
        # PLLM_SANITIZER=1: tests/cuda/test_{lora,steer,decoding,sample,reward}_cuda_gpu.py keep their small shapes
        # (every kernel variant) and skip Triton; racecheck (shared-memory hazards of the cp.async pipelines and of the
        # steering / mixing / sampling / reward kernels' block reductions) runs on their sanitizer subsets.
        racecheck = ["tests/cuda/test_lora_cuda_gpu.py", "tests/cuda/test_steer_cuda_gpu.py",
                     "tests/cuda/test_decoding_cuda_gpu.py", "tests/cuda/test_sample_cuda_gpu.py",
                     "tests/cuda/test_reward_cuda_gpu.py", "-k", "sanitizer"]
        for tool, tests, limit in (("memcheck", ["tests/cuda"], 120), ("racecheck", racecheck, 90)):
            name = "sanitizer" if tool == "memcheck" else f"sanitizer_{tool}"
            rc, text = s.run(name, [san, "--tool", tool, "--error-exitcode", "99", "--target-processes", "all",
                                    sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                    *tests], timeout=limit, env={"PLLM_SANITIZER": "1"})
            m = re.search(r"ERROR SUMMARY: \d+ errors?", text)
            if s.steps[-1]["status"] != "TIMEOUT":
                s.steps[-1]["detail"] = f"rc={rc}; {m.group(0) if m else 'no ERROR SUMMARY line'}; {_pytest_line(text)}"

    # 3b. a short tuning pass of the Triton LoRA launch configs (decode shapes): OUT/lora_configs.json, to commit as
    # pllm_kernels/triton/lora_configs.json once reviewed (the shipped entries are untimed guesses until then)
    if dry:
        s.skip("tune_lora", gpu_why)
    elif "tune_lora" in skip:
        s.skip("tune_lora", "--skip tune_lora")
    else:
        s.run("tune_lora", [sys.executable, "-m", "pllm_kernels.bench.tune_lora", "--out",
                            str(out / "lora_configs.json"), "--T", "1,8,64", "--rank", "16", "--budget-s", "35"],
              timeout=50)

    # 4. benchmarks: share what is left of the budget
    names = list(H.BENCHES) if args.benches == "all" else (
        [] if args.benches == "none" else [b.strip() for b in args.benches.split(",") if b.strip()])
    present = [n for n in names if H.implemented(n)]
    for n in names:
        if n not in present:
            why = "not yet implemented" if n in H.BENCHES else f"not a registered benchmark ({', '.join(H.BENCHES)})"
            s.record(f"bench_{n}", "N/A", 0.0, why)
    for i, n in enumerate(present):
        share = (s.left() - RESERVE_S) / (len(present) - i)
        if share < 15:
            s.skip(f"bench_{n}", f"no time left in the {args.budget_s:.0f}s budget")
            continue
        cmd = [sys.executable, "-m", "pllm_kernels.bench", n, "--out", str(out)]
        cmd += ["--smoke"] if dry else ["--budget-s", f"{max(10.0, share - 30):.0f}"]
        s.run(f"bench_{n}", cmd, timeout=share)

    # 5. plots
    if "plots" in skip:
        s.skip("plots", "--skip plots")
    else:
        s.run("plots", [sys.executable, "-m", "benchmarks.plot", str(out), "--out", str(out / "plots")],
              timeout=60, reserve=3)
    (out / "env.json").write_text(json.dumps({**env, "run_id": H.run_id(), "steps": s.steps}, indent=1))
    path = write_summary(s, env, names)
    print(f"[gpu_suite] summary {path}")
    print(path.read_text())
    if pack_dir is not None:
        written = pack(out, pack_dir.resolve())
        print(f"[gpu_suite] packed {out} -> {', '.join(str(p) for p in written)} "
              f"({written[0].stat().st_size / 2**20:.2f} MiB); here: python -m benchmarks.gpu_suite --import "
              f"<files_at>/{written[0].name}")
    bad = [st["step"] for st in s.steps if st["status"] in ("FAIL", "TIMEOUT")]
    if bad:
        print(f"[gpu_suite] steps not OK: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
