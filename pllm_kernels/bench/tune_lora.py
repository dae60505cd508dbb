"""Offline tuning of the multi-LoRA Triton kernels: writes the per-shape configuration table (lora_configs.json).

    python -m pllm_kernels.bench.tune_lora --out FILE            # on a GPU: time candidates, write the table
    python -m pllm_kernels.bench.tune_lora --dry-run             # anywhere: list problems and candidates
    python -m pllm_kernels.bench.tune_lora --out FILE --shape q,kv --T 1,8,64 --rank 16,64 --budget-s 600

Problems: the Llama-3-8B LoRA modules of :mod:`pllm_kernels.bench.lora` (q, kv, o, gate_up, down; one distinct
adapter per sequence), decode T (one token per sequence) and prefill T (sequences of 512), ranks ``--rank``. Each
problem is tuned on the path ``lora_apply`` takes for it automatically (fused, BGMV or SGMV): the timed unit is
one ``lora_apply_triton`` call (``triton.testing.do_bench`` median over ``--sets`` rotated input sets), so a
kernel is tuned in its real context (the BGMV shrink's split-K decides how many partials the expand sums). Two-
kernel paths are tuned one kernel at a time: the shrink with the default expand, then the expand with the best
shrink. A candidate is kept only if its delta matches the fp32 per-adapter reference within the dtype's
tolerance (fp16 1e-2, bf16 5e-2, fp32 1e-4 of max |delta|) and its compiled kernels do not spill registers.

Output: ``{"schema": 1, "meta": {...}, "entries": [...]}`` (format: :mod:`pllm_kernels.triton.lora_configs`),
one entry per (kernel, problem) whose best candidate beats the defaults by more than ``--min-gain`` (default 3 %),
keyed by this GPU's name and the problem's exact ``rank`` / ``dim`` (``m`` for SGMV); the ``pairs`` ranges meet
half-way (geometrically) between the measured T. ``--merge`` keeps the entries of other GPUs already in FILE.
Copy the file over ``pllm_kernels/triton/lora_configs.json`` (or point ``$PLLM_LORA_CONFIGS`` at it) and run
tests/triton/test_lora_aot.py: every configuration in the table must compile without spills for sm_80 and sm_90.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

from pllm_kernels.triton import lora_configs as C

DECODE_T = (1, 2, 4, 8, 16, 32, 64)
PREFILL_T = (512, 2048, 8192)
PREFILL_SEQ = 512
TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4}

# candidate values per tunable key (the product is the candidate set; SGMV BLOCK_M is the metadata chunk)
CANDIDATES: dict[str, dict[str, tuple[int, ...]]] = {
    "shrink_bgmv": {"BLOCK_N": (16, 32, 64), "BLOCK_K": (64, 128, 256), "num_warps": (2, 4, 8),
                    "MAX_SPLIT_K": (16, 64)},
    "expand_bgmv": {"BLOCK_N": (16, 32, 64, 128), "BLOCK_R": (16, 32, 64), "num_warps": (2, 4, 8)},
    "fused": {"FUSED_TILE": (2048, 4096, 8192), "num_warps": (2, 4, 8)},
    "shrink_sgmv": {"BLOCK_N": (32, 64, 128), "BLOCK_K": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3, 4)},
    "expand_sgmv": {"BLOCK_N": (64, 128, 256), "BLOCK_R": (16, 32), "num_warps": (4, 8), "num_stages": (2, 3)},
}
PATH_KERNELS = {"fused": ("fused",), "bgmv": ("shrink_bgmv", "expand_bgmv"), "sgmv": ("shrink_sgmv", "expand_sgmv")}


def candidates(kernel: str) -> list[dict]:
    keys = list(CANDIDATES[kernel])
    out = [dict(zip(keys, vals)) for vals in itertools.product(*(CANDIDATES[kernel][k] for k in keys))]
    for c in out:
        C.validate_config(kernel, c, f"candidate {c}")
    return out


def problems(shapes, ts, ranks) -> list:
    from pllm_kernels.bench.lora import Case

    out = []
    for shape in shapes:
        for rank in ranks:
            for t in ts:
                out.append(Case(shape, t, rank, "distinct", 1 if t in DECODE_T or t < PREFILL_SEQ else PREFILL_SEQ))
    return out


def match_shape(kernel: str, P) -> dict:
    """The lookup shape of ``kernel`` in problem ``P`` (as the launchers pass it to lora_configs.lookup)."""
    from pllm_kernels.triton.lora import sgmv_block_m

    T = P.case.T  # K = 1
    if kernel.startswith("expand"):
        shape = {"pairs": T, "rank": P.max_rank, "dim": P.N}
    else:  # shrink and fused: rank = R*S, the width of v per token
        shape = {"pairs": T, "rank": P.max_rank * P.S, "dim": P.h_in}
    if kernel.endswith("_sgmv"):
        shape["m"] = sgmv_block_m(P.meta.chunk)
    return shape


def _exact(kernel: str, shape: dict, config: dict) -> dict:
    return {"kernel": kernel, "gpu": "*", "config": config, **{f: [v, v] for f, v in shape.items()}}


class _Spy:
    """Stands in for a ``@triton.jit`` kernel of the launcher module and keeps the compiled kernels it ran."""

    def __init__(self, kernel):
        self.kernel, self.compiled = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            ck = launch(*args, **kwargs)
            self.compiled.append(ck)
            return ck

        return run


def _spills(compiled) -> int:
    n = 0
    for ck in compiled:
        try:
            ck._init_handles()
            n = max(n, int(getattr(ck, "n_spills", 0) or 0))
        except Exception:  # noqa: BLE001 (another Triton version: no spill count, the AOT test still checks)
            pass
    return n


def measure(P, path: str, entries: list[dict], ref: torch.Tensor, *, warmup: int, rep: int) -> tuple[float, float, int]:
    """``(median ms, relative error, spills)`` of one ``lora_apply_triton(path=...)`` with ``entries`` as table:
    numerics of the first call against ``ref`` (fp32 delta of set 0), then the harness timing (do_bench of a CUDA
    graph replaying one call per rotated input set: microsecond kernels, no Python launch overhead)."""
    from pllm_kernels.bench import harness as H
    from pllm_kernels.triton import lora as tl_lora

    C.set_table(entries)
    meta, sizes = P.meta, tuple(P.slice_sizes)

    def call(s):
        tl_lora.lora_apply_triton(s["y"], s["x"], s["a"], s["b"], P.slot_ranks, P.slot_scales, meta.token_slots,
                                  meta.token_weights, meta.sorted_pairs, meta.seg_slot, meta.seg_start, meta.seg_len,
                                  sizes, chunk=meta.chunk, path=path)

    names = [n for n in dir(tl_lora) if n.startswith("_lora_") and n.endswith("_kernel")]
    spies = {n: _Spy(getattr(tl_lora, n)) for n in names}
    s0 = dict(P.sets[0])
    y0 = s0["y"].clone()
    s0["y"] = y0.clone()
    try:
        for n, spy in spies.items():
            setattr(tl_lora, n, spy)
        call(s0)
        if P.device.type == "cuda":
            torch.cuda.synchronize()
    finally:
        for n, spy in spies.items():
            setattr(tl_lora, n, spy.kernel)
    err = float(((s0["y"].float() - y0.float()) - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    spills = _spills(c for spy in spies.values() for c in spy.compiled)
    t = H.time_fn(call, warmup=warmup, rep=rep, cuda_graph=True, arg_sets=P.sets, device=P.device)
    return float(t["median_ms"]), err, spills


def _pairs_ranges(ts: list[int]) -> dict[int, list]:
    """Ranges of T*K meeting half-way (geometric mean) between measured points; open at the top."""
    ts = sorted(set(ts))
    out = {}
    for i, t in enumerate(ts):
        lo = 1 if i == 0 else math.floor(math.sqrt(ts[i - 1] * t)) + 1
        hi = None if i == len(ts) - 1 else math.floor(math.sqrt(t * ts[i + 1]))
        out[t] = [lo, hi]
    return out


def tune(args, device, dtype, log) -> dict:
    from pllm_kernels.bench.lora import build_problem, reference_delta
    from pllm_kernels.triton.lora import choose_path, fused_blocks

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"  # cpu: the interpreter test
    results = []  # (kernel, shape, best_cfg, best_ms, default_ms)
    seen = set()
    t_end = time.monotonic() + args.budget_s
    for case in problems(args.shapes, args.T, args.rank):
        if time.monotonic() > t_end:
            log(f"budget spent: stopping before {case.name}")
            break
        P = build_problem(case, smoke=False, device=device, dtype=dtype, max_sets=args.sets, mem_cap=2 << 30)
        sr = fused_blocks(P.max_rank, P.S)["BLOCK_SR"]
        path = choose_path("auto", case.T, "apply", sr=sr, num_slices=P.S,
                           a_bytes=P.max_rank * P.S * P.h_in * P.sets[0]["a"].element_size())
        ref = reference_delta(P, P.sets[0])
        chosen: list[dict] = []  # exact entries already decided for this problem (the shrink before the expand)
        for kernel in PATH_KERNELS[path]:
            shape = match_shape(kernel, P)
            key = (kernel, tuple(sorted(shape.items())))
            if key in seen:
                continue
            seen.add(key)
            base_ms, base_err, _ = measure(P, path, chosen, ref, warmup=args.warmup_ms, rep=args.rep_ms)
            best = (base_ms, None)
            for cand in candidates(kernel):
                try:
                    ms, err, spills = measure(P, path, chosen + [_exact(kernel, shape, cand)], ref,
                                              warmup=args.warmup_ms, rep=args.rep_ms)
                except Exception as e:  # noqa: BLE001 (a candidate that does not compile or launch is skipped)
                    log(f"  {kernel} {cand}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
                    continue
                ok = err <= TOL[dtype] and spills == 0
                if ok and ms < best[0]:
                    best = (ms, cand)
                if not ok:
                    log(f"  {kernel} {cand}: rejected (rel err {err:.2e}, spills {spills})")
            ms, cfg = best
            log(f"{case.name} {kernel} {shape}: default {base_ms * 1e3:.1f} us (err {base_err:.1e}), best "
                f"{ms * 1e3:.1f} us {cfg or '(default)'}")
            results.append((kernel, shape, cfg, ms, base_ms))
            if cfg is not None:
                chosen.append(_exact(kernel, shape, cfg))
        C.set_table(None)

    entries = []
    groups: dict[tuple, list] = {}
    for kernel, shape, cfg, ms, base_ms in results:
        rest = tuple(sorted((f, v) for f, v in shape.items() if f != "pairs"))
        groups.setdefault((kernel, rest), []).append((shape["pairs"], cfg, ms, base_ms))
    for (kernel, rest), rows in groups.items():
        ranges = _pairs_ranges([p for p, *_ in rows])
        for pairs, cfg, ms, base_ms in sorted(rows, key=lambda r: r[0]):
            if cfg is None or ms > base_ms * (1 - args.min_gain):
                continue
            e = {"kernel": kernel, "gpu": gpu, "pairs": ranges[pairs], **{f: [v, v] for f, v in rest},
                 "config": cfg, "source": f"tune_lora: {ms * 1e3:.1f} us vs {base_ms * 1e3:.1f} us default at "
                                           f"T*K = {pairs} ({str(dtype).replace('torch.', '')})"}
            entries.append(e)
    return {"gpu": gpu, "entries": entries}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pllm_kernels.bench.tune_lora", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="table file to write (JSON)")
    p.add_argument("--dry-run", action="store_true", help="list problems and candidate configurations, run nothing")
    p.add_argument("--shape", default="q,kv,o,gate_up,down", help="Llama-3-8B modules (pllm_kernels.bench.lora)")
    p.add_argument("--T", default=",".join(map(str, DECODE_T + PREFILL_T)), help="token counts")
    p.add_argument("--rank", default="16", help="buffer ranks")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--sets", type=int, default=8, help="rotated input sets per problem")
    p.add_argument("--warmup-ms", type=int, default=5)
    p.add_argument("--rep-ms", type=int, default=25)
    p.add_argument("--min-gain", type=float, default=0.03, help="keep an entry only if this much faster (fraction)")
    p.add_argument("--budget-s", type=float, default=3600.0, help="stop starting new problems after this long")
    p.add_argument("--merge", action="store_true", help="keep the entries of other GPUs already in --out")
    args = p.parse_args(argv)
    from pllm_kernels.bench.lora import SHAPES

    args.shapes = [s.strip() for s in args.shape.split(",") if s.strip()]
    bad = [s for s in args.shapes if s not in SHAPES]
    if bad:
        p.error(f"unknown shape(s) {bad}; choose from {list(SHAPES)}")
    args.T = [int(t) for t in args.T.split(",") if t]
    args.rank = [int(r) for r in args.rank.split(",") if r]
    if args.dry_run:
        probs = problems(args.shapes, args.T, args.rank)
        for c in probs:
            print(c.name)
        for kernel in CANDIDATES:
            cands = candidates(kernel)
            print(f"{kernel}: {len(cands)} candidates over {CANDIDATES[kernel]} (defaults {C.DEFAULTS[kernel]})")
        print(f"{len(probs)} problems; each tuned on the path lora_apply takes for it")
        return 0
    if not torch.cuda.is_available():
        print("tune_lora needs a CUDA GPU (none found): the table holds timings of compiled kernels on the target "
              "GPU, and the Triton interpreter's timings mean nothing. Use --dry-run to list the candidates.",
              file=sys.stderr)
        return 2
    if not args.out:
        p.error("--out FILE is required (the table to write)")
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype)

    def log(msg):
        print(msg, flush=True)

    res = tune(args, device, dtype, log)
    write_table(res, args, Path(args.out))
    log(f"wrote {len(res['entries'])} entries for {res['gpu']} to {args.out}")
    return 0


def write_table(res: dict, args, out: Path) -> None:
    """Write the tuned entries (plus, with ``--merge``, the other GPUs' entries already in ``out``); the file must
    load back through :func:`pllm_kernels.triton.lora_configs.load_table`."""
    import triton

    entries = res["entries"]
    if args.merge and out.exists():
        entries = [e for e in C.load_table(out) if e["gpu"] != res["gpu"]] + entries
    doc = {
        "schema": C.SCHEMA,
        "note": "written by python -m pllm_kernels.bench.tune_lora (format: pllm_kernels/triton/lora_configs.py)",
        "meta": {"gpu": res["gpu"], "torch": torch.__version__, "triton": triton.__version__,
                 "dtype": args.dtype, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "shapes": args.shapes, "T": args.T, "rank": args.rank},
        "entries": entries,
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    C.load_table(out)  # what we wrote must load (raises on a bad entry)


if __name__ == "__main__":
    raise SystemExit(main())
