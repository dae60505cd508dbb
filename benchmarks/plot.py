"""Charts and tables from the benchmark CSVs (matplotlib; without it, markdown tables only, and it says so).

    python -m benchmarks.plot [RESULTS_DIR ...] [--out DIR] [--all-runs]
    python -m benchmarks.plot benchmarks/results --table            # latest figures per device (markdown)
    python -m benchmarks.plot benchmarks/results --update-readme    # rewrite that table in benchmarks/README.md

Reads every ``*.csv`` under the given folders (default ``benchmarks/results``). Rows are grouped by ``device``
and never compared across devices: one chart per (device, bench). By default only the latest ``run_id`` of each
(device, bench) is drawn. Charts: ``speedup_<bench>_<device>.png`` (for each ``ratio_vs_<baseline>`` column: the
speed-up of every backend over that baseline, per case, log scale) and ``roofline_<bench>_<device>.png``
(``pct_of_copy_bw`` and, where present, ``pct_of_matmul`` per case and backend).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "benchmarks" / "README.md"
TABLE_START, TABLE_END = "<!-- latest-figures:start -->", "<!-- latest-figures:end -->"
MAX_CASES = 40  # per chart; the rest are listed in the markdown table


def load_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        # Folders named tmp* (smoke and dry runs) are skipped unless given explicitly.
        files = [p] if p.is_file() else sorted(
            f for f in p.rglob("*.csv") if not any(part.startswith("tmp") for part in f.relative_to(p).parts[:-1]))
        for f in files:
            with open(f, newline="") as fh:
                for r in csv.DictReader(fh):
                    r["_file"] = str(f)
                    rows.append(r)
    return rows


def _num(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x else None


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower()[:40]


def latest(rows: list[dict], all_runs: bool) -> dict[tuple[str, str], list[dict]]:
    """(device, bench) -> rows of the latest run_id (or all runs)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("device") and r.get("bench"):
            groups[(r["device"], r["bench"])].append(r)
    if all_runs:
        return dict(groups)
    out = {}
    for key, rs in groups.items():
        last = max(r.get("run_id", "") for r in rs)
        out[key] = [r for r in rs if r.get("run_id", "") == last]
    return out


def _cases_backends(rows):
    cases = list(dict.fromkeys(r["case"] for r in rows))[:MAX_CASES]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    return cases, backends


def _bar_chart(plt, rows, column, title, path, log=False, ref_line=None):
    cases, backends = _cases_backends(rows)
    val = {(r["case"], r["backend"]): _num(r.get(column)) for r in rows}
    backends = [b for b in backends if any(val.get((c, b)) for c in cases)]
    if not backends:
        return None
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(cases) * max(1, len(backends) / 3)), 5.5))
    for i, b in enumerate(backends):
        xs = [j + i * width for j, c in enumerate(cases) if val.get((c, b))]
        ys = [val[(c, b)] for c in cases if val.get((c, b))]
        ax.bar(xs, ys, width, label=b)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels(cases, rotation=70, ha="right", fontsize=7)
    if log:
        ax.set_yscale("log")
    if ref_line is not None:
        ax.axhline(ref_line, color="k", lw=0.8, ls="--")
    ax.set_ylabel(column)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw(groups, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        print(f"[plot] matplotlib not available ({type(e).__name__}: {e}): no charts, markdown tables only")
        return []
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for (device, bench), rows in sorted(groups.items()):
        tag = f"{bench}_{_slug(device)}"
        sha = rows[0].get("git_sha", "")
        for col in sorted({k for r in rows for k in r if k.startswith("ratio_vs_") and r[k]}):
            base = col.removeprefix("ratio_vs_")
            p = _bar_chart(plt, [r for r in rows if r["backend"] != base], col,
                           f"{bench}: speed-up over {base} (>1 = faster) -- {device} @ {sha}",
                           out / f"speedup_{tag}_vs_{base}.png", log=True, ref_line=1.0)
            made += [p] if p else []
        if any(_num(r.get("pct_of_copy_bw")) for r in rows):
            p = _bar_chart(plt, [r for r in rows if r.get("backend") != "base_mm"], "pct_of_copy_bw",
                           f"{bench}: % of measured copy bandwidth -- {device} @ {sha}", out / f"roofline_{tag}.png",
                           ref_line=100.0)
            made += [p] if p else []
        if any(_num(r.get("pct_of_matmul")) for r in rows if r.get("backend") == "base_mm"):
            p = _bar_chart(plt, rows, "pct_of_matmul", f"{bench}: % of measured matmul rate -- {device} @ {sha}",
                           out / f"matmul_{tag}.png")
            made += [p] if p else []
    for p in made:
        print(f"[plot] wrote {p}")
    return made


def table(groups) -> str:
    """Markdown: latest run per device, the fastest of our backends per case with its speed-ups."""
    lines = []
    for (device, bench), rows in sorted(groups.items()):
        r0 = rows[0]
        lines += [f"**{bench}** on **{device}** (git {r0.get('git_sha', '?')}, torch {r0.get('torch', '?')}, triton "
                  f"{r0.get('triton', '?')}, {r0.get('timestamp', '?')})", ""]
        ratio_cols = sorted({k for r in rows for k in r if k.startswith("ratio_vs_") and r[k]})
        head = ["case", "best", "median ms", "%copy bw"] + [c.replace("ratio_vs_", "x ") for c in ratio_cols]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        by_case: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_case[r["case"]].append(r)
        for case, rs in by_case.items():
            ours = [r for r in rs if r.get("kind", "ours") == "ours" and _num(r.get("median_ms"))]
            pick = min(ours or [r for r in rs if _num(r.get("median_ms"))], key=lambda r: _num(r["median_ms"]),
                       default=None)
            if pick is None:
                continue
            cells = [case, pick["backend"], f"{_num(pick['median_ms']):.4g}",
                     f"{_num(pick.get('pct_of_copy_bw')):.1f}" if _num(pick.get("pct_of_copy_bw")) else "-"]
            cells += [f"{_num(pick.get(c)):.2f}" if _num(pick.get(c)) else "-" for c in ratio_cols]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) if lines else "_no results yet_\n"


def update_readme(text: str) -> None:
    doc = README.read_text()
    if TABLE_START not in doc or TABLE_END not in doc:
        raise SystemExit(f"{README} has no {TABLE_START} ... {TABLE_END} markers")
    head, rest = doc.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    README.write_text(f"{head}{TABLE_START}\n{text.rstrip()}\n{TABLE_END}{tail}")
    print(f"[plot] updated {README}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", default=None, help="CSV files or folders (default benchmarks/results)")
    ap.add_argument("--out", default=None, help="chart folder (default <first path>/plots)")
    ap.add_argument("--all-runs", action="store_true", help="draw every run, not only the latest per device")
    ap.add_argument("--table", action="store_true", help="print the latest-figures markdown table")
    ap.add_argument("--update-readme", action="store_true", help="write that table into benchmarks/README.md")
    ap.add_argument("--no-charts", action="store_true")
    args = ap.parse_args(argv)
    paths = [Path(p) for p in (args.paths or [ROOT / "benchmarks" / "results"])]
    rows = load_rows(paths)
    groups = latest(rows, args.all_runs)
    print(f"[plot] {len(rows)} rows, {len(groups)} (device, bench) groups from {', '.join(map(str, paths))}")
    md = table(groups)
    if args.table:
        print(md)
    if args.update_readme:
        update_readme(md)
    if not args.no_charts:
        out = Path(args.out) if args.out else (paths[0] if paths[0].is_dir() else paths[0].parent) / "plots"
        draw(groups, out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "latest_figures.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
