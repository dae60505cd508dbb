"""The benchmarks ship with the package: ``python -m pllm_kernels.bench`` runs from a copy of ``pllm_kernels/`` alone
(no source tree next to it, nothing of ``benchmarks/`` or ``tests/`` importable), and no package module imports the
source tree or edits ``sys.path``."""

import ast
import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pllm_kernels

PKG = Path(pllm_kernels.__file__).resolve().parent
SOURCE_TREE = ("benchmarks", "tests")


def _package_only(tmp_path: Path) -> Path:
    """``tmp_path/pllm_kernels``: a copy of the package folder (with a built ``_C*.so`` if there is one) and nothing
    else."""
    shutil.copytree(PKG, tmp_path / "pllm_kernels", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return tmp_path


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def _run(root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    drop = ("PYTHONPATH", "PLLM_GIT_SHA")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLLM_BENCH_") and k not in drop}
    env["PYTHONPATH"] = str(root)
    return subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_bench_runs_from_the_package_alone(tmp_path):
    root = _package_only(tmp_path)
    shipped = _files(root / "pllm_kernels")

    probe = _run(root, "-c", "import importlib.util as u, pllm_kernels; print(pllm_kernels.__file__); "
                             "print(*[int(u.find_spec(m) is not None) for m in ('benchmarks', 'tests')])")
    assert probe.returncode == 0, probe.stderr[-3000:]
    where, reachable = probe.stdout.splitlines()[-2:]
    assert Path(where).resolve().is_relative_to(root / "pllm_kernels"), where  # the copy runs, not the checkout
    assert reachable == "0 0", "benchmarks/ or tests/ importable: the check would not prove anything"

    lst = _run(root, "-m", "pllm_kernels.bench", "list")
    assert lst.returncode == 0, lst.stderr[-3000:]
    assert re.search(r"^lora\s+pllm_kernels\.bench\.lora$", lst.stdout, re.M), lst.stdout

    out = tmp_path / "out"
    # the smallest smoke run: smoke shapes, 1 ms warm-up / 2 ms timing per backend and case
    proc = _run(root, "-m", "pllm_kernels.bench", "lora", "--smoke", "--out", str(out), "--warmup-ms", "1",
                "--rep-ms", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "lora.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"torch", "peft_mixed", "adapter_loop", "base_mm"} <= {r["backend"] for r in rows}
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert {r["git_sha"] for r in rows} == {"unknown"}  # an installed copy: no checkout to read a sha from
    assert (out / "bench_lora_summary.md").exists() and "target checks" in proc.stdout

    # without --out: under the current directory, never inside the package
    proc = _run(root, "-m", "pllm_kernels.bench", "lora", "--smoke", "--shape", "o", "--backend", "torch",
                "--warmup-ms", "1", "--rep-ms", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (root / "pllm_bench_results" / "smoke" / "lora.csv").is_file()
    assert _files(root / "pllm_kernels") == shipped


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__", "find_spec", "run_module"):
                found.append((node.lineno, node.args[0].value))
    return found


def _is_sys_path(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
        and node.value.id == "sys"


def _sys_path_edits(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if _is_sys_path(node.func.value) or node.func.attr == "addsitedir":  # sys.path.insert/append/...
                lines.append(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(_is_sys_path(t) or (isinstance(t, ast.Subscript) and _is_sys_path(t.value)) for t in targets):
                lines.append(node.lineno)
    return lines


def test_package_never_imports_the_source_tree():
    bad = {}
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text, filename=str(path))
        rel = path.relative_to(PKG.parent)
        for line, mod in _imported_modules(tree):
            if mod.split(".")[0] in SOURCE_TREE:
                bad[(rel, line)] = f"imports {mod}"
        for line in _sys_path_edits(tree):
            bad[(rel, line)] = "edits sys.path"
        for m in re.finditer(r"^\s*(import|from)\s+(benchmarks|tests)\b.*$", text, re.M):  # also in exec'd code
            bad.setdefault((rel, text.count("\n", 0, m.start()) + 1), m.group(0).strip())
    assert not bad, "the package must not depend on the source tree:\n" + "\n".join(
        f"{rel}:{line}: {what}" for (rel, line), what in sorted(bad.items()))
