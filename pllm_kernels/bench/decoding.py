"""Decoding benchmark: the per-row sampler (``sample_tokens``) and fused contrast + sampling (``fused_sample``) against
torch sampling pipelines and HF's classifier-free-guidance processor.

    python -m pllm_kernels.bench decoding                 # GPU: the suite profile (~1 min); CPU: the smoke profile
    python -m pllm_kernels.bench decoding --smoke         # V=32000, B in {1, 8}, fp32: seconds (what CI runs)
    python -m pllm_kernels.bench decoding --sections contrast --batch 64 --backend triton,unfused_torch --out DIR
    python -m pllm_kernels.bench decoding --dry-run       # list the cases

Cases: vocabulary V = 128256 (Llama-3; ``--shape v152064`` for Qwen2.5, ``v32000`` for Llama-2), B in
{1, 8, 64, 256} rows, bf16 logits on GPU (``--dtype``); smoke: V = 32000, B in {1, 8}, fp32. Logits are random normal
with standard deviation 3 (never zeros), ``--max-sets`` independent input sets (default 32 on GPU), each row with its
own seed and every set its own step (the counter-based RNG draws fresh tokens per set).

Sections (``--sections``):

``sample``    ``sample_tokens(scores (B, V), temperature, top_k, top_p, min_p, seed, step, backend=...)`` in four modes
              (``--modes``): ``plain`` (T=1), ``top_k`` (k=50), ``top_p`` (p=0.9) and ``combined`` (T=0.8, k=50,
              p=0.95, min_p=0.05). Baselines: ``multinomial`` (``softmax`` + ``torch.multinomial``), ``sort_free``
              (``probs.div_(torch.empty_like(probs).exponential_()).argmax(-1)``: what vLLM / FlashInfer call
              sort-free sampling; like ``multinomial`` it applies the temperature but no filter, the floor of any torch
              sampler) and, in the filtered modes, ``sort_filter`` (sort descending, mask beyond k, softmax, cumsum,
              mask beyond p, min-p mask, softmax, ``torch.multinomial``, gather the index).
``contrast``  Context Steering / CFG + sampling in one op: ``fused_sample(sources (2, B, V), coefs (B, 2) = [1 + lam,
              -lam], temperature=1, top_p=0.9, seed, step)``, lam = 1 on every row (HF guidance scale 2). Baselines:
              ``unfused_torch`` (``log_softmax`` of both branches, combine, ``log_softmax``, then the ``sort_filter``
              top-p pipeline), ``hf_cfg`` (transformers' ``ClassifierFreeGuidanceLogitsProcessor(1 + lam)`` on the
              concatenated (2B, V) scores copied to fp32 as HF's ``_sample`` does, ``TopPLogitsWarper(0.9)``,
              ``softmax``, ``torch.multinomial``; it combines raw logits, one scalar scale per call) and
              ``ops_unfused`` (our ``contrast_logits`` then our ``sample_tokens``: two ops, the best backend that runs
              here).

Ours (``--backend``): ``torch`` (the ops' torch backend), ``triton`` (only on CUDA tensors; skipped on CPU, and while
``pllm_kernels.triton.decoding`` does not import) and ``cuda`` (skipped, with the op's own refusal, while the
extension has no kernel for the op). Every call passes its per-row parameters as device tensors (graph-safe).

Correctness guard, before timing: every ours backend (and ``ops_unfused``) must draw exactly the tokens of the torch
implementation (:mod:`pllm_kernels.torch_ops.decoding`, called directly on the fp32 cast of the same inputs, set 0,
every row, same seeds / steps) and log-probs within 2e-3; otherwise it is not timed: an ``error`` row, exit code 1.
That torch implementation is itself checked against the spec (:func:`pllm_kernels.reference.decoding.sample_ref`,
float64) on the first ``--spec-rows`` rows of the first case of each section / mode (an ``error`` row ``spec`` when it
differs). Baselines draw with torch's RNG and are not compared.

Figures per row: median ms (GPU: ``do_bench``; graph-safe contenders - ours triton / cuda, ``sort_free``,
``ops_unfused`` on a kernel backend - are replayed from a CUDA graph over >= 32 rotated input sets; the rest -
``torch.multinomial`` syncs the host, the torch backend is a reference - run eagerly over 4 sets; CPU: perf_counter),
``bytes`` = the bytes-moved floor of the case (each logit row read once per source, S * B * V * elt, plus 12 B per row
out: token and log-prob), ``gbps`` and ``pct_of_copy_bw`` (copy bandwidth measured in the same run), ``x_floor`` =
median / (bytes / copy bandwidth), ``ratio_vs_<baseline>`` = baseline median / this median (> 1: faster; the
harness's convention), ``tok_mismatch`` / ``max_lp_err`` of the guard. Baselines return tokens only (ours also the
log-probs).

GPU targets (printed PASS/FAIL, in ``bench_decoding_summary.md``): fused contrast + sampling at V=128256, B=64 within
1.5x of the bytes-moved floor and >= 3x faster than ``unfused_torch``; the sampler (plain, T=1) at least as fast as
``sort_free`` at every B.

Results: ``decoding.csv`` and ``bench_decoding_summary.md`` in ``--out DIR`` (default ``./pllm_bench_results``, smoke
runs ``./pllm_bench_results/smoke``). ``hf_cfg`` needs transformers (skipped, saying so, without it).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from pllm_kernels.bench import harness as H
from pllm_kernels.bench.harness import Skip
from pllm_kernels.bench.harness import env_vars as _env
from pllm_kernels.ops import contrast_logits, fused_sample, sample_tokens

CSV = "decoding.csv"
SUMMARY = "bench_decoding_summary.md"
VOCABS = {"v128256": 128256, "v152064": 152064, "v32000": 32000}  # Llama-3, Qwen2.5, Llama-2
SUITE_SHAPES = ("v128256",)
SMOKE_SHAPES = ("v32000",)
BATCH = (1, 8, 64, 256)
SMOKE_BATCH = (1, 8)
TARGET_B = 64
TARGET_V = 128256
LAM = 1.0
LOGIT_STD = 3.0
OUT_BYTES_PER_ROW = 12  # int64 token + fp32 log-prob
LP_TOL = 2e-3
EAGER_SETS = 4

MODES: dict[str, dict[str, float]] = {
    "plain": {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0},
    "top_k": {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0},
    "top_p": {"temperature": 1.0, "top_k": 0, "top_p": 0.9, "min_p": 0.0},
    "combined": {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "min_p": 0.05},
}
CONTRAST_MODE = "top_p"

SECTIONS = ("sample", "contrast")
OURS = ("torch", "triton", "cuda")
SAMPLE_BASELINES = ("multinomial", "sort_free", "sort_filter")
CONTRAST_BASELINES = ("ops_unfused", "unfused_torch", "hf_cfg")
SECTION_BACKENDS = {"sample": OURS + SAMPLE_BASELINES, "contrast": OURS + CONTRAST_BASELINES}
ALL_BACKENDS = OURS + SAMPLE_BASELINES + CONTRAST_BASELINES
RATIO_BASES = {"sample": ("torch",) + SAMPLE_BASELINES, "contrast": ("torch",) + CONTRAST_BASELINES}

TARGET_X_FLOOR = 1.5
TARGET_VS_UNFUSED = 3.0
TARGET_VS_SORT_FREE = 1.0


# ------------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    section: str  # sample | contrast
    mode: str  # a key of MODES
    shape: str  # a key of VOCABS
    B: int
    tags: tuple[str, ...] = field(default=())

    @property
    def V(self) -> int:
        return VOCABS[self.shape]

    @property
    def S(self) -> int:
        return 2 if self.section == "contrast" else 1

    @property
    def name(self) -> str:
        return f"{self.section}-{self.mode}-{self.shape}-B{self.B}"


def cases_for(profile: str, shapes=None, batch=None, sections=SECTIONS, modes=tuple(MODES)) -> list[Case]:
    """Cases in priority order (a spent budget cuts from the end): the target cases first."""
    if profile not in ("smoke", "suite"):
        raise ValueError(f"unknown profile {profile!r} (smoke, suite)")
    smoke = profile == "smoke"
    shapes = tuple(shapes or (SMOKE_SHAPES if smoke else SUITE_SHAPES))
    bs = tuple(batch or (SMOKE_BATCH if smoke else BATCH))
    tb = TARGET_B if TARGET_B in bs else max(bs)  # smoke: the target figures of the largest B, for the summary
    cs: list[Case] = []
    for shape in shapes:
        if "contrast" in sections:
            cs.append(Case("contrast", CONTRAST_MODE, shape, tb, ("target_contrast",)))
        if "sample" in sections and "plain" in modes:
            cs += [Case("sample", "plain", shape, b, ("target_sampler",)) for b in bs]
        if "contrast" in sections:
            cs += [Case("contrast", CONTRAST_MODE, shape, b) for b in bs if b != tb]
        if "sample" in sections:
            cs += [Case("sample", m, shape, b) for m in modes if m != "plain" for b in bs]
    return cs


# ------------------------------------------------------------------------------------------------ helpers
class Refused(Exception):
    """Ours draws other tokens than the torch implementation: not timed."""



def _first_line(e: BaseException, n: int = 200) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:n] if s else type(e).__name__


def _err_text(e: BaseException) -> str:
    return f"error: {type(e).__name__}: {_first_line(e, 160)}"


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _sync_quietly(device):
    try:
        _sync(device)
    except Exception:  # a sticky CUDA error: the next case reports it
        pass


# ------------------------------------------------------------------------------------------------ problem data
@dataclass
class Problem:
    case: Case
    dtype: torch.dtype
    device: torch.device
    params: dict  # per-row device tensors: temperature, top_k, top_p, min_p (the ops' dtypes), lam, coefs, ...
    sets: list[dict]  # x: (B, V) sample / (2, B, V) contrast logits; flat: (2B, V) view (contrast); seed, step (B,)

    @property
    def n_sets(self) -> int:
        return len(self.sets)

    @property
    def elt(self) -> int:
        return self.sets[0]["x"].element_size()

    def floor_bytes(self) -> int:
        """Each logit row read once per source, token + log-prob written."""
        c = self.case
        return c.S * c.B * c.V * self.elt + c.B * OUT_BYTES_PER_ROW


def set_bytes(case: Case, dtype: torch.dtype) -> int:
    return case.S * case.B * case.V * torch.empty((), dtype=dtype).element_size()


@torch.no_grad()
def build_problem(case: Case, *, device, dtype, max_sets: int, mem_cap: int) -> Problem:
    device = torch.device(device)
    B, V = case.B, case.V
    n_sets = int(max(1, min(max_sets, mem_cap // max(set_bytes(case, dtype), 1))))
    mode = MODES[case.mode]

    def rows(v, dt):
        return torch.full((B,), v, dtype=dt, device=device)

    params = {
        "temperature": rows(mode["temperature"], torch.float32), "top_k": rows(mode["top_k"], torch.int32),
        "top_p": rows(mode["top_p"], torch.float32), "min_p": rows(mode["min_p"], torch.float32),
        "lam": rows(LAM, torch.float32), "beta": rows(0.0, torch.float32), "reward_top_k": rows(0, torch.int32),
    }
    params["coefs"] = torch.stack([1.0 + params["lam"], -params["lam"]], 1).contiguous()
    g = torch.Generator(device=device).manual_seed(1234)
    seed = 1000 + torch.arange(B, dtype=torch.int64, device=device)
    shape = (2, B, V) if case.section == "contrast" else (B, V)
    sets = []
    for i in range(n_sets):
        x = (torch.randn(*shape, generator=g, device=device) * LOGIT_STD).to(dtype)
        s = {"x": x, "seed": seed, "step": torch.full((B,), i, dtype=torch.int64, device=device)}
        if case.section == "contrast":
            s["flat"] = x.view(2 * B, V)  # HF CFG layout: conditional rows first, then the unconditional ones
        sets.append(s)
    return Problem(case, dtype, device, params, sets)


# ------------------------------------------------------------------------------------------------ reference / spec
def reference(P: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and log-probs of set 0 from the torch implementation, called directly (not through the ops, which the
    benchmark times) on the fp32 cast of the inputs."""
    from pllm_kernels.torch_ops import decoding as torch_dec

    c, p, s = P.case, P.params, P.sets[0]
    x = s["x"].float()
    if c.section == "contrast":
        z = torch.empty(c.B, c.V, dtype=torch.float32, device=P.device)
        torch_dec.mix_logprobs_torch(z, x, p["coefs"])
        x = z
    tok = torch.empty(c.B, dtype=torch.int64, device=P.device)
    lp = torch.empty(c.B, dtype=torch.float32, device=P.device)
    torch_dec.sample_torch(tok, lp, x, p["temperature"], p["top_k"], p["top_p"], p["min_p"], s["seed"], s["step"])
    return tok.cpu(), lp.cpu()


def spec_tokens(P: Problem, n: int) -> torch.Tensor:
    """Tokens of the first ``n`` rows of set 0 from the spec (float64, plain loops; slow: a few rows only)."""
    from pllm_kernels.reference.decoding import mix_logprobs_ref, sample_ref

    p, s = P.params, P.sets[0]
    n = min(n, P.case.B)
    if P.case.section == "contrast":
        z = mix_logprobs_ref(s["x"][:, :n].cpu().double(), p["coefs"][:n].cpu())
    else:
        z = s["x"][:n].cpu().double()
    cpu = {k: v[:n].cpu() for k, v in p.items() if k in ("temperature", "top_k", "top_p", "min_p")}
    tok, _ = sample_ref(z, cpu["temperature"], cpu["top_k"], cpu["top_p"], cpu["min_p"], s["seed"][:n].cpu(),
                        s["step"][:n].cpu())
    return tok


def _check(fn, P: Problem, ref) -> tuple[int, float]:
    """Run ``fn`` on set 0 and compare with the reference; raises Refused. Returns (0 mismatches, max lp error)."""
    out = fn(P.sets[0])
    _sync(P.device)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise Refused("refused: returned no (tokens, logprobs)")
    tok, lp = out[0].cpu(), out[1].cpu()
    ref_tok, ref_lp = ref
    if tok.shape != ref_tok.shape:
        raise Refused(f"refused: tokens of shape {tuple(tok.shape)}, expected {tuple(ref_tok.shape)}")
    bad = (tok != ref_tok).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(f"row {b}: {int(tok[b])} != {int(ref_tok[b])}" for b in bad[:3])
        raise Refused(f"refused: {len(bad)}/{len(tok)} tokens differ from the torch implementation on the same "
                      f"seeds / steps ({shown})")
    err = float((lp.double() - ref_lp.double()).abs().max()) if lp.numel() else 0.0
    if not err <= LP_TOL:
        raise Refused(f"refused: log-probs differ from the torch implementation by {err:.3g} (> {LP_TOL})")
    return 0, err


# ------------------------------------------------------------------------------------------------ backends
def _triton_ok(P: Problem) -> None:
    # Interpreter timings mean nothing: on CPU the Triton paths run only when asked for explicitly (to exercise the
    # benchmark code itself), with TRITON_INTERPRET=1 and PLLM_BENCH_INTERPRET=1.
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and os.environ.get("PLLM_BENCH_INTERPRET") == "1"
    if P.device.type != "cuda" and not interp:
        raise Skip("needs a CUDA device (or TRITON_INTERPRET=1 PLLM_BENCH_INTERPRET=1); not benchmarked on CPU")
    try:
        importlib.import_module("pllm_kernels.triton.decoding")
    except Exception as e:
        raise Skip(f"pllm_kernels.triton.decoding does not import: {type(e).__name__}: {_first_line(e)}") from None


def _ours(P: Problem, backend: str):
    """One call of the op of the case's section with ``backend=``: ``fn(set) -> (tokens, logprobs)``."""
    p = P.params
    if P.case.section == "sample":
        def fn(s):
            return sample_tokens(s["x"], p["temperature"], p["top_k"], p["top_p"], p["min_p"], s["seed"], s["step"],
                                 backend=backend)
    else:
        def fn(s):
            return fused_sample(s["x"], p["coefs"], beta=p["beta"], reward_top_k=p["reward_top_k"],
                                temperature=p["temperature"], top_k=p["top_k"], top_p=p["top_p"], min_p=p["min_p"],
                                seed=s["seed"], step=s["step"], backend=backend)
    return fn


def _ops_unfused(P: Problem, backend: str):
    p = P.params

    def fn(s):
        z = contrast_logits(s["x"][0], s["x"][1], p["lam"], backend=backend)
        return sample_tokens(z, p["temperature"], p["top_k"], p["top_p"], p["min_p"], s["seed"], s["step"],
                             backend=backend)

    return fn


def _probe(fn, P: Problem) -> None:
    """One call on set 0: the op's own refusal of a backend (``backend='...': ...``) becomes the skip reason."""
    try:
        fn(P.sets[0])
        _sync(P.device)
    except RuntimeError as e:
        if str(e).startswith("backend="):
            raise Skip(_first_line(e)) from None
        raise


def sort_filter(x: torch.Tensor, inv_t, top_k: int, top_p, min_p) -> torch.Tensor:
    """The sort-based torch sampler (vLLM / HF style): sort descending, top-k, top-p, min-p masks on the sorted row,
    softmax, ``torch.multinomial``, gather the index. ``inv_t``, ``top_p``, ``min_p``: ``(B, 1)`` tensors or None."""
    z = x.float()
    if inv_t is not None:
        z = z * inv_t
    vals, idx = torch.sort(z, dim=-1, descending=True)
    if top_k:
        vals[:, top_k:] = -math.inf  # one k for the batch: the sorted tail is cut in place
    probs = torch.softmax(vals, -1)
    mask = None
    if top_p is not None:
        mask = (torch.cumsum(probs, -1) - probs) >= top_p  # mass strictly before >= p; the first token stays
    if min_p is not None:
        low = probs < min_p * probs[:, :1]
        mask = low if mask is None else mask | low
    if mask is not None:
        vals = vals.masked_fill(mask, -math.inf)
        probs = torch.softmax(vals, -1)
    pick = torch.multinomial(probs, 1)
    return idx.gather(1, pick)[:, 0]


def make_backend(name: str, P: Problem):
    """``(fn(set), graph_safe, checked, note)`` of one contender of a case, or raise Skip. ``checked``: it must draw
    the reference's tokens (checked before timing)."""
    c, p = P.case, P.params
    mode = MODES[c.mode]
    if name in OURS:
        if name == "triton":
            _triton_ok(P)
        fn = _ours(P, name)
        if name != "torch":
            _probe(fn, P)
        return fn, name != "torch", True, ""
    inv_t = None if mode["temperature"] == 1.0 else (1.0 / p["temperature"])[:, None]
    top_p = p["top_p"][:, None] if mode["top_p"] < 1.0 else None
    min_p = p["min_p"][:, None] if mode["min_p"] > 0.0 else None
    top_k = int(mode["top_k"])
    if c.section == "sample":
        if name == "multinomial":
            def fn(s):
                z = s["x"].float() if inv_t is None else s["x"].float() * inv_t
                return torch.multinomial(torch.softmax(z, -1), 1)[:, 0]

            return fn, False, False, "no filter"
        if name == "sort_free":
            def fn(s):
                z = s["x"].float() if inv_t is None else s["x"].float() * inv_t
                probs = torch.softmax(z, -1)
                return probs.div_(torch.empty_like(probs).exponential_()).argmax(-1)

            return fn, True, False, "no filter"
        if name == "sort_filter":
            if not (top_k or top_p is not None or min_p is not None):
                raise Skip("no filter in this mode")

            def fn(s):
                return sort_filter(s["x"], inv_t, top_k, top_p, min_p)

            return fn, False, False, ""
    else:
        lam = p["lam"][:, None]
        if name == "unfused_torch":
            def fn(s):
                lw = torch.log_softmax(s["x"][0].float(), -1)
                lwo = torch.log_softmax(s["x"][1].float(), -1)
                z = torch.log_softmax(lw + lam * (lw - lwo), -1)
                return sort_filter(z, inv_t, top_k, top_p, min_p)

            return fn, False, False, ""
        if name == "hf_cfg":
            try:
                from transformers.generation.logits_process import (
                    ClassifierFreeGuidanceLogitsProcessor,
                    TopPLogitsWarper,
                )
            except Exception as e:
                raise Skip(f"transformers not importable ({type(e).__name__}: {_first_line(e, 120)})") from None
            if mode["temperature"] != 1.0 or top_k or min_p is not None:
                raise Skip("the HF chain here is CFG + top-p only")
            cfg = ClassifierFreeGuidanceLogitsProcessor(1.0 + LAM)
            warp = TopPLogitsWarper(top_p=float(mode["top_p"]))
            ids = torch.ones(c.B, 1, dtype=torch.long, device=P.device)  # only its batch size is read

            def fn(s):
                scores = s["flat"].to(copy=True, dtype=torch.float32)  # HF _sample: fp32 copy of the last logits
                scores = warp(ids, cfg(ids, scores))
                return torch.multinomial(torch.softmax(scores, -1), 1)[:, 0]

            return fn, False, False, f"guidance_scale={1.0 + LAM:g} on raw logits (HF semantics)"
        if name == "ops_unfused":
            errors = []
            for b in ("cuda", "triton", "torch"):
                if b == "triton":
                    try:
                        _triton_ok(P)
                    except Skip as e:
                        errors.append(f"triton: {e}")
                        continue
                fn = _ops_unfused(P, b)
                try:
                    if b != "torch":
                        _probe(fn, P)
                except Skip as e:
                    errors.append(str(e))
                    continue
                return fn, b != "torch", True, f"contrast_logits + sample_tokens, backend={b}"
            raise Skip("; ".join(errors))  # pragma: no cover - torch always runs
    raise Skip(f"not a backend of the {c.section} section")


# ------------------------------------------------------------------------------------------------ driver
def _base_row(case: Case, name: str) -> dict:
    return {"bench": "decoding", "case": case.name, "backend": name, "section": case.section, "mode": case.mode,
            "kind": "ours" if name in OURS else "baseline", "tags": "+".join(case.tags)}


def _status_row(case: Case, name: str, status: str, note: str, extra: dict) -> dict:
    return {**_base_row(case, name), "median_ms": float("nan"), "p20_ms": float("nan"), "p80_ms": float("nan"),
            "method": "", "n_sets": 0, "note": note, "status": status, **extra}


@torch.no_grad()
def run_case(P: Problem, backends, roof, *, warmup, rep, spec_rows: int, log) -> list[dict]:
    case = P.case
    mode = MODES[case.mode]
    nbytes = P.floor_bytes()
    floor_ms = nbytes / (roof["copy_gbps"] * 1e9) * 1e3
    extra = {"op": "fused_sample" if case.section == "contrast" else "sample_tokens", "shape": case.shape,
             "V": case.V, "B": case.B, "S": case.S, "dtype": str(P.dtype).removeprefix("torch."),
             "temperature": mode["temperature"], "top_k": mode["top_k"], "top_p": mode["top_p"],
             "min_p": mode["min_p"], "lam": LAM if case.section == "contrast" else float("nan"),
             "bytes": nbytes, "floor_ms": floor_ms, "copy_gbps": roof["copy_gbps"]}
    rows = []
    ref = reference(P)
    if spec_rows > 0:
        n = min(spec_rows, case.B)
        spec = spec_tokens(P, n)
        if not torch.equal(spec, ref[0][:n]):
            rows.append(_status_row(case, "spec", "error", f"the torch implementation differs from the spec "
                                    f"(sample_ref) on rows 0..{n - 1}: {ref[0][:n].tolist()} != {spec.tolist()}",
                                    extra))
    for name in backends:
        if name not in SECTION_BACKENDS[case.section]:
            continue
        try:
            fn, graph_safe, checked, note = make_backend(name, P)
        except Skip as e:
            if str(e) not in ("no filter in this mode",):
                rows.append(_status_row(case, name, "skip", str(e), extra))
            continue
        except Exception as e:
            _sync_quietly(P.device)
            rows.append(_status_row(case, name, "error", _err_text(e), extra))
            continue
        try:
            mism, err = _check(fn, P, ref) if checked else (float("nan"), float("nan"))
            sets = P.sets if graph_safe else P.sets[:EAGER_SETS]
            res = H.time_fn(fn, warmup=warmup, rep=rep, cuda_graph=graph_safe and P.device.type == "cuda",
                            arg_sets=sets, device=P.device)
        except Refused as e:
            rows.append(_status_row(case, name, "error", str(e), extra))
            continue
        except Exception as e:  # a backend failing must not stop the benchmark
            _sync_quietly(P.device)
            rows.append(_status_row(case, name, "error", _err_text(e), extra))
            continue
        ms = res["median_ms"]
        row = {**_base_row(case, name), **{k: res[k] for k in ("median_ms", "p20_ms", "p80_ms", "method", "n_sets")},
               "note": "; ".join(x for x in (note, res["note"]) if x), "status": "ok", **extra,
               "tok_mismatch": mism, "max_lp_err": err}
        row["gbps"] = H.gbps(nbytes, ms)
        row["pct_of_copy_bw"] = 100 * row["gbps"] / roof["copy_gbps"]
        row["x_floor"] = ms / floor_ms if floor_ms > 0 else float("nan")
        rows.append(row)
    ok = {r["backend"]: r["median_ms"] for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        for b in RATIO_BASES[case.section]:
            if b in ok and b != r["backend"]:
                r[f"ratio_vs_{b}"] = ok[b] / r["median_ms"]
    log(_case_line(case, rows, f"sets={P.n_sets:<2}"))
    return rows


def _case_line(case: Case, rows, info: str) -> str:
    parts = [f"{case.name:<30} {info}"]
    for r in rows:
        if r["status"] == "ok":
            g = "g" if "graph" in str(r["method"]) else ""
            parts.append(f"{r['backend']}={H.fmt_ms(r['median_ms'])}{g} {r['x_floor']:.1f}xfl")
        elif r["status"] == "error":
            parts.append(f"{r['backend']}=ERROR")
    skipped = [r["backend"] for r in rows if r["status"] == "skip"]
    if skipped:
        parts.append(f"({','.join(skipped)} skipped)")
    return "  ".join(parts)


# ------------------------------------------------------------------------------------------------ targets, summary
def _best_ours(rows, case):
    mine = [r for r in rows if r["case"] == case and r["kind"] == "ours" and r["status"] == "ok"]
    return min(mine, key=lambda r: r["median_ms"], default=None)


def target_checks(rows: list[dict], device_kind: str) -> list[dict]:
    on_gpu = device_kind == "cuda"
    out = []

    check = {"name": f"fused contrast + sampling, V={TARGET_V}, B={TARGET_B}: <= {TARGET_X_FLOOR}x the bytes-moved "
                     f"floor and >= {TARGET_VS_UNFUSED:.0f}x faster than unfused torch"}
    cases = list(dict.fromkeys(r["case"] for r in rows if "target_contrast" in r["tags"]))
    details, statuses = [], []
    for c in cases:
        best = _best_ours(rows, c)
        if best is None:
            details.append(f"{c}: no ours row")
            continue
        vs = best.get("ratio_vs_unfused_torch", float("nan"))
        statuses.append(best["V"] == TARGET_V and best["B"] == TARGET_B and best["x_floor"] <= TARGET_X_FLOOR
                        and vs >= TARGET_VS_UNFUSED)
        details.append(f"{c}: {best['backend']} {H.fmt_ms(best['median_ms'])} = {best['x_floor']:.2f}x floor "
                       f"({best['bytes'] / 1e6:.1f} MB at {best['copy_gbps']:.0f} GB/s), {_x(vs)} vs unfused_torch")
    if not on_gpu:
        check.update(status="SKIP", detail="needs a GPU (CPU smoke sizes); here: " + ("; ".join(details) or "-"))
    elif not statuses or not any(r.get("V") == TARGET_V and r.get("B") == TARGET_B for r in rows
                                 if "target_contrast" in r["tags"]):
        check.update(status="SKIP", detail=f"no ours row at V={TARGET_V}, B={TARGET_B}; " + ("; ".join(details)
                                                                                         or "-"))
    else:
        check.update(status="PASS" if all(statuses) else "FAIL", detail="; ".join(details))
    out.append(check)

    check = {"name": "sampler (plain, T=1) at least as fast as torch's sort-free path, every B"}
    cases = list(dict.fromkeys(r["case"] for r in rows if "target_sampler" in r["tags"]))
    details, statuses = [], []
    for c in cases:
        best = _best_ours(rows, c)
        vs = best.get("ratio_vs_sort_free") if best else None
        if best is None or vs is None:
            details.append(f"{c}: no ours / sort_free pair")
            continue
        statuses.append(vs >= TARGET_VS_SORT_FREE)
        details.append(f"{c}: {best['backend']} {H.fmt_ms(best['median_ms'])} {_x(vs)}")
    if not on_gpu:
        check.update(status="SKIP", detail="needs a GPU (CPU smoke sizes); here: " + ("; ".join(details) or "-"))
    elif not statuses:
        check.update(status="SKIP", detail="; ".join(details) or "no plain-sampling case ran")
    else:
        check.update(status="PASS" if all(statuses) and len(statuses) == len(cases) else "FAIL",
                     detail="; ".join(details))
    out.append(check)
    return out


def _x(v) -> str:
    return f"{v:.2f}x" if isinstance(v, float) and math.isfinite(v) else "-"


def _f(v, fmt=".1f") -> str:
    return format(v, fmt) if isinstance(v, float) and math.isfinite(v) else "-"


def summary_markdown(rows, checks, roof, env, profile, cut) -> str:
    lines = [f"## bench_decoding ({profile})", "",
             f"device **{env['device']}**, torch {env['torch']}, triton {env['triton']}, transformers "
             f"{env['transformers']}, git {env['git_sha']}; measured copy {roof['copy_gbps']:.0f} GB/s", "",
             "### Target checks", ""]
    for c in checks:
        lines.append(f"- **{c['status']}** {c['name']}: {c['detail']}")
    for sec, bases, title in (("sample", SAMPLE_BASELINES, "sample_tokens"),
                              ("contrast", CONTRAST_BASELINES, "fused_sample (contrast + sampling)")):
        cases = list(dict.fromkeys(r["case"] for r in rows if r["section"] == sec and r["status"] == "ok"))
        if not cases:
            continue
        lines += ["", f"### {title} (best of ours; x floor = median / bytes-moved floor; vs = speed-up)", "",
                  "| case | backend | median | GB/s | %bw | x floor | " + " | ".join(f"vs {b}" for b in bases) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(bases)]
        for c in cases:
            r = _best_ours(rows, c)
            if r:
                lines.append(f"| {c} | {r['backend']} | {H.fmt_ms(r['median_ms'])} | {_f(r['gbps'], '.3g')} | "
                             f"{_f(r['pct_of_copy_bw'])} | {_f(r['x_floor'], '.2f')} | "
                             + " | ".join(_x(r.get(f"ratio_vs_{b}")) for b in bases) + " |")
    skipped = {}
    for r in rows:
        if r["status"] == "skip":
            skipped.setdefault(r["backend"], r["note"])
    if skipped:
        lines += ["", "### Skipped backends", ""] + [f"- {n}: {why}" for n, why in sorted(skipped.items())]
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        lines += ["", "### Errors", ""] + [f"- {r['case']} {r['backend']}: {r['note']}" for r in errors]
    if cut:
        lines += ["", f"Budget reached: {cut} case(s) not run."]
    return "\n".join(lines) + "\n"


def _int_list(text: str | None, what: str, p) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        p.error(f"{what}: a comma list of integers, got {text!r}")
    if not vals or min(vals) < 1:
        p.error(f"{what}: positive integers, got {text!r}")
    return vals


def _names(text: str, allowed, what: str, p) -> tuple[str, ...]:
    vals = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        p.error(f"unknown {what} {bad}; choose from {list(allowed)}")
    return vals


def main(argv=None) -> int:
    p = H.base_parser(__doc__.splitlines()[0])
    p.prog = "python -m pllm_kernels.bench decoding"
    p.add_argument("--profile", choices=("smoke", "suite"), default=None,
                   help="case list (default: suite on GPU, smoke on CPU or with --smoke)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma list of sample, contrast")
    p.add_argument("--modes", default=",".join(MODES), help="sampler modes: comma list of " + ", ".join(MODES))
    p.add_argument("--batch", default=None, help="rows B, e.g. 1,64 (default: the profile's)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="logits on GPU (CPU: always float32)")
    p.add_argument("--warmup-ms", type=float, default=None)
    p.add_argument("--rep-ms", type=float, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU only: torch intra-op threads (default 1: stable smoke timings on a shared machine; 0 = "
                        "torch's default)")
    p.add_argument("--max-sets", type=int, default=None, help="rotated input sets (default 32 on GPU, 2 on CPU)")
    p.add_argument("--spec-rows", type=int, default=1,
                   help="rows checked against the float64 spec in the first case of each section / mode (0 = off)")
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    profile = args.profile or ("smoke" if (args.smoke or not on_gpu) else "suite")
    smoke = profile == "smoke"
    if smoke and not args.out and not os.environ.get("PLLM_BENCH_OUT"):
        args.out = str(H.default_out("smoke"))  # smoke rows never pollute the results of real runs
    H.apply_out(args)
    dtype = getattr(torch, args.dtype) if on_gpu else torch.float32
    warmup = args.warmup_ms if args.warmup_ms is not None else (10 if on_gpu else 2)
    rep = args.rep_ms if args.rep_ms is not None else (50 if on_gpu else 10)
    max_sets = args.max_sets or (32 if on_gpu else 2)
    if on_gpu:
        mem_cap = int(min(8 << 30, torch.cuda.mem_get_info()[0] // 4))
    else:
        mem_cap = 64 << 20

    sections = _names(args.sections, SECTIONS, "section(s)", p)
    modes = _names(args.modes, tuple(MODES), "mode(s)", p)
    backends = list(ALL_BACKENDS) if args.backend == "all" else list(_names(args.backend, ALL_BACKENDS,
                                                                            "backend(s)", p))
    shapes = None if args.shape == "all" else _names(args.shape, tuple(VOCABS), "shape(s)", p)
    cases = cases_for(profile, shapes, _int_list(args.batch, "--batch", p), sections, modes)
    if args.dry_run:
        for c in cases:
            print(c.name, *c.tags)
        print(f"{len(cases)} cases x backends {backends}")
        return 0

    threads = torch.get_num_threads()
    if not on_gpu and args.threads:
        torch.set_num_threads(args.threads)
    try:  # time the kernels, not the host-side value checks; restore env and threads for in-process callers
        with _env(PLLM_CHECK_VALUES=os.environ.get("PLLM_CHECK_VALUES", "0")):
            return _run(args, cases, backends, device, dtype, profile, warmup, rep, max_sets, mem_cap)
    finally:
        torch.set_num_threads(threads)


def _run(args, cases, backends, device, dtype, profile, warmup, rep, max_sets, mem_cap) -> int:
    on_gpu = device.type == "cuda"
    env = H.env_info()
    roof = H.measure_roofline(device)
    print(f"[bench_decoding] {env['device']} torch {env['torch']} triton {env['triton']} git {env['git_sha']} "
          f"profile={profile} dtype={str(dtype).removeprefix('torch.')}")
    print(f"[bench_decoding] roofline: copy {roof['copy_gbps']:.1f} GB/s; {len(cases)} cases; backends "
          f"{','.join(backends)}")
    budget = H.Budget(args.budget_s)
    all_rows: list[dict] = []
    spec_done: set[tuple[str, str]] = set()
    cut = 0
    t0 = time.perf_counter()
    for i, case in enumerate(cases):
        if budget.expired():
            cut = len(cases) - i
            print(f"[bench_decoding] budget of {args.budget_s:.0f}s reached: {cut} case(s) not run")
            break
        rows: list[dict] = []
        key = (case.section, case.mode)
        spec_rows = 0 if key in spec_done else args.spec_rows
        spec_done.add(key)
        try:
            P = build_problem(case, device=device, dtype=dtype, max_sets=max_sets, mem_cap=mem_cap)
            with torch.inference_mode():
                rows = run_case(P, backends, roof, warmup=warmup, rep=rep, spec_rows=spec_rows, log=print)
            del P
        except torch.OutOfMemoryError as e:
            print(f"{case.name}: out of memory ({_first_line(e)}); skipped")
        except Exception as e:  # building the case failed: one error row, go on
            _sync_quietly(device)
            print(f"{case.name}: {_err_text(e)}")
            rows = [{**_base_row(case, "-"), "median_ms": float("nan"), "method": "", "n_sets": 0,
                     "note": _err_text(e), "status": "error"}]
        if on_gpu:
            torch.cuda.empty_cache()
        all_rows += rows
        if not args.no_csv and rows:
            H.append_rows(args.csv or CSV, rows)
    skipped: dict[str, tuple[str, int]] = {}
    for r in all_rows:
        if r["status"] == "skip":
            why, n = skipped.get(r["backend"], (r["note"], 0))
            skipped[r["backend"]] = (why, n + 1)
    n_cases = len({r["case"] for r in all_rows})
    for name, (why, n) in sorted(skipped.items()):
        print(f"[bench_decoding] {name} skipped in {n}/{n_cases} cases: {why}")
    errors = [r for r in all_rows if r["status"] == "error"]
    for r in errors:
        print(f"[bench_decoding] ERROR {r['case']} {r['backend']}: {r['note']}")
    checks = target_checks(all_rows, env["device_kind"])
    print("[bench_decoding] target checks:")
    for c in checks:
        print(f"  {c['status']}: {c['name']} -- {c['detail']}")
    md = summary_markdown(all_rows, checks, roof, env, profile, cut)
    if not args.no_csv:
        out = H.results_dir()
        (out / SUMMARY).write_text(md)
        print(f"[bench_decoding] {len(all_rows)} rows -> {out / (args.csv or CSV)}; summary {out / SUMMARY}")
    print(f"[bench_decoding] done in {time.perf_counter() - t0:.1f}s" + (f"; {len(errors)} error row(s)" if errors
                                                                           else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
