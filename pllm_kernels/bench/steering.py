"""Per-token activation steering benchmark: ``steer_add``, the fused ``steer_rmsnorm`` and a decode step of a patched
model with steering on vs off.

    python -m pllm_kernels.bench steering                 # GPU: the suite profile (~1-2 min); CPU: the smoke profile
    python -m pllm_kernels.bench steering --smoke         # tiny sizes, seconds (what CI runs)
    python -m pllm_kernels.bench steering --sections op,fused --shape h4096 --tokens 64,4096 --out DIR
    python -m pllm_kernels.bench steering --dry-run       # list the cases

Sections (``--sections``):

``op``     ``steer_add(h (T, H), vectors (64, H) fp32, token_slots (T, 1), token_scales (T, 1), slot_modes)``, mode
           add, K=1, hidden 4096 (Llama-3-8B) and 8192 (Llama-3-70B), T in {1, 8, 64, 512, 4096} (smoke: hidden
           512, T in {1, 64}), bf16 on GPU / fp32 on CPU. ``all``: every row steered by its own slot (row t -> slot
           t mod 64, rows unsorted); ``half``: every other row unsteered (slot -1). Ours: the op with
           ``backend=torch|triton|cuda``, ``validate=False`` (triton only on CUDA tensors; cuda skipped with the op's
           own refusal while it has no CUDA kernel). Baselines: ``gather`` (unfused torch, as a hook would do it:
           ``h += token_scales[:, :1] * vectors[token_slots[:, 0]]``; ``half``: the same under a precomputed row
           mask, ``torch.where``) and ``broadcast`` (the steering-vectors / repeng hook: ONE vector added to every
           row, ``h += s * v``: the lower bound of any steering pass). Bytes (``bytes``): h read + written for the
           steered rows (2 * n_steered * H * elt) + each distinct slot's vector read once (fp32) + slots / scales /
           modes; ``broadcast``: 2 * T * H * elt + H * 4.
``fused``  ``steer_rmsnorm(h, weight, eps, vectors, ...)`` (steer h in place + RMSNorm of the steered h, one pass)
           on the same cases. Baselines: ``unfused`` (our ``steer_add``, backend auto, then an HF-style torch
           RMSNorm: ``x.float()``, ``pow(2).mean``, ``rsqrt``, ``weight * x.to(dtype)``), ``unfused_torch`` (the
           ``gather`` add, then that RMSNorm: all torch) and ``rmsnorm_alone`` (that RMSNorm, no steering).
           Bytes: h read, steered rows written, out written, weight, vectors, slots; ``rmsnorm_alone``: h read, out
           written, weight.
``model``  one greedy decode step of a Llama (smoke: ``tiny_model("llama")``, fp32, B=4, prompt 16; GPU:
           ``llama_1b_config()`` shapes, random weights, bf16, sdpa, B in {32, 1}, prompt 128) patched with
           ``patch_model(num_slots=8, max_rank=16)``; user i steers layers i mod L and (i + L/2) mod L
           (``add_steering(..., scale=2.0)``), so every row is steered (at B=32 every layer has steered rows).
           Variants: ``base`` (the unpatched model), ``hooks`` (the unpatched model with one forward hook per
           steered block adding each row's pre-gathered ``scale * vector``: per-row steering done with hooks),
           ``off`` / ``on`` (the patched model inside ``pm.users([None] * B)`` / ``pm.users(users)``, the model
           called directly: what ``pm.generate`` pays per decode step), ``off_call`` / ``on_call``
           (``pm(next_ids, users=..., cache=...)`` per step: adds the per-call plan resolution).

Every case first checks that ours computes what the unfused baseline computes (op: ``gather``; fused:
``unfused_torch``; model: ``on`` against ``hooks`` and ``off`` against ``base``), with
``torch.testing.assert_close`` (fp32: rtol 1e-4, atol 1e-5 x max|ref|; bf16: rtol 1.6e-2, atol 4e-3 x max|ref|;
the model's fp32 logits: rtol 1e-3, atol 1e-4 x max|ref|; bf16 model logits: the on/hooks difference must stay
below 5 % of the on/off difference), and refuses to time a backend that differs: an ``error`` row, exit code 1.
A backend that raises also gets an ``error`` row (exit code 1); one that cannot run here a ``skip`` row whose
``note`` says why.

Figures per row: median ms (GPU: ``do_bench``, CUDA-graph replay for the op / fused contenders, >= 32 rotated
input sets that fit in 3 GiB; CPU: perf_counter), GB/s and % of the copy bandwidth measured in the same run,
``ratio_vs_<baseline>`` = baseline median / this median (> 1: faster), ``pct_of_rmsnorm`` = this / RMSNorm alone,
``ratio_on_vs_off`` = on / off (a time ratio: > 1 = steering costs that much), ``time_vs_base`` = this / base,
``max_err`` (max |ours - baseline| / max |baseline|). GPU targets (printed PASS/FAIL, in
``bench_steering_summary.md``): ``steer_add`` at T=4096, every row steered, >= 85 % of copy bandwidth (both
hidden sizes); ``steer_rmsnorm`` <= 110 % of RMSNorm alone (every T and hidden size, all rows steered); a decode
step with every row steered <= 3 % slower than unsteered (``on`` / ``off``, B=1 and 32).

Results: ``steering.csv`` and ``bench_steering_summary.md`` in ``--out DIR`` (default ``./pllm_bench_results``,
smoke runs ``./pllm_bench_results/smoke``). The model section needs transformers (``pip install
pllm-kernels[hf]``).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from pllm_kernels.bench import harness as H
from pllm_kernels.bench.harness import Skip
from pllm_kernels.bench.harness import env_vars as _env

CSV = "steering.csv"
SLOTS = 64
STEER_SCALE = 2.0
OP_HIDDEN = {"h4096": 4096, "h8192": 8192}  # Llama-3-8B, Llama-3-70B
SMOKE_HIDDEN = {"h512": 512}
TOKENS = (1, 8, 64, 512, 4096)
SMOKE_TOKENS = (1, 64)
MODEL_BATCH = (32, 1)  # the target cases, largest first
SMOKE_BATCH = (4,)
PROMPT = {"llama1b": 128, "tiny": 16}
RMS_EPS = 1e-5

SECTIONS = ("op", "fused", "model")
OURS = ("torch", "triton", "cuda")
OP_BASELINES = ("gather", "broadcast")
FUSED_BASELINES = ("unfused", "unfused_torch", "rmsnorm_alone")
MODEL_VARIANTS = ("base", "hooks", "off", "on", "off_call", "on_call")
SECTION_BACKENDS = {"op": OURS + OP_BASELINES, "fused": OURS + FUSED_BASELINES, "model": MODEL_VARIANTS}
ALL_BACKENDS = tuple(dict.fromkeys(OURS + OP_BASELINES + FUSED_BASELINES + MODEL_VARIANTS))

TARGET_OP_PCT = 85.0
TARGET_FUSED_PCT = 110.0
TARGET_DECODE_RATIO = 1.03

# torch.testing.assert_close tolerances: (rtol, atol as a fraction of max |reference|)
TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (1.6e-2, 4e-3), torch.float16: (2e-3, 5e-4)}
MODEL_TOL_FP32 = (1e-3, 1e-4)
MODEL_BF16_FRACTION = 0.05  # bf16 model logits: |on - hooks| must stay below this fraction of |on - off|


# ------------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    section: str  # op | fused | model
    shape: str  # h4096 / h8192 / h512 (op, fused); llama1b / tiny (model)
    T: int  # tokens (op, fused) or batch rows (model)
    steered: str = "all"  # all | half
    tags: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        if self.section == "model":
            return f"decode-{self.shape}-B{self.T}"
        return f"{self.section}-{self.shape}-T{self.T}-{self.steered}"


def cases_for(profile: str, tokens=None, batch=None, sections=SECTIONS) -> list[Case]:
    """Cases in priority order (a spent budget cuts from the end): the target cases first."""
    if profile not in ("smoke", "suite"):
        raise ValueError(f"unknown profile {profile!r} (smoke, suite)")
    smoke = profile == "smoke"
    hidden = SMOKE_HIDDEN if smoke else OP_HIDDEN
    ts = tuple(tokens or (SMOKE_TOKENS if smoke else TOKENS))
    bs = tuple(batch or (SMOKE_BATCH if smoke else MODEL_BATCH))
    tmax = max(ts)
    first: list[Case] = []
    rest: list[Case] = []
    for sec in ("op", "fused"):
        if sec not in sections:
            continue
        for shape in hidden:
            for t in ts:
                for st in ("all", "half"):
                    if st == "half" and (t == 1 or (smoke and t != tmax)):
                        continue  # one row cannot be half steered; smoke: the half case at the largest T only
                    target = st == "all" and (sec == "fused" or t == tmax)
                    tags = (f"target_{sec}",) if target else ()
                    (first if st == "all" and t == tmax else rest).append(Case(sec, shape, t, st, tags))
    model = [Case("model", "tiny" if smoke else "llama1b", b, "all", ("target_decode",)) for b in bs]
    return first + (model if "model" in sections else []) + rest


# ------------------------------------------------------------------------------------------------ helpers
class Refused(Exception):
    """Ours differs from the unfused baseline: not timed."""



def _steer_ops():
    """The module whose ``steer_add`` / ``steer_rmsnorm`` the benchmark calls (looked up when a case is built)."""
    from pllm_kernels.ops import steer

    return steer


def _first_line(e: BaseException, n: int = 200) -> str:
    s = str(e).strip()
    return (s.splitlines()[0][:n] if s else type(e).__name__)


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


def hf_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm written as HF's ``LlamaRMSNorm.forward``."""
    dtype = x.dtype
    x = x.float()
    var = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(var + eps)
    return weight * x.to(dtype)


def check_close(got: torch.Tensor, ref: torch.Tensor, rtol: float, atol_rel: float) -> float:
    """``assert_close`` with atol relative to max |ref|; returns max |got - ref| / max |ref|."""
    g, r = got.float(), ref.float()
    scale = float(r.abs().max()) if r.numel() else 0.0
    torch.testing.assert_close(g, r, rtol=rtol, atol=atol_rel * max(scale, 1e-30))
    return float((g - r).abs().max()) / max(scale, 1e-30) if r.numel() else 0.0


# ------------------------------------------------------------------------------------------------ op / fused problem
@dataclass
class OpProblem:
    case: Case
    hidden: int
    dtype: torch.dtype
    device: torch.device
    slots: torch.Tensor  # (T, 1) int32, -1 = none
    scales: torch.Tensor  # (T, 1) float32
    modes: torch.Tensor  # (SLOTS,) int32, all add
    weight: torch.Tensor  # (H,) norm weight, h's dtype
    sets: list[dict]  # h (T, H), vectors (SLOTS, H) fp32: fresh random values per set, never zeros
    n_steered: int
    n_slots_read: int

    @property
    def n_sets(self) -> int:
        return len(self.sets)

    @property
    def elt(self) -> int:
        return self.sets[0]["h"].element_size()

    def meta_bytes(self) -> int:
        return self.slots.numel() * 4 + self.scales.numel() * 4 + self.modes.numel() * 4

    def op_bytes(self) -> int:
        H_ = self.hidden
        return 2 * self.n_steered * H_ * self.elt + self.n_slots_read * H_ * 4 + self.meta_bytes()

    def broadcast_bytes(self) -> int:
        return 2 * self.case.T * self.hidden * self.elt + self.hidden * 4

    def fused_bytes(self) -> int:
        T, H_, e = self.case.T, self.hidden, self.elt
        return (2 * T + self.n_steered) * H_ * e + H_ * self.weight.element_size() + self.n_slots_read * H_ * 4 \
            + self.meta_bytes()

    def rmsnorm_bytes(self) -> int:
        return 2 * self.case.T * self.hidden * self.elt + self.hidden * self.weight.element_size()


def row_slots(T: int, steered: str, seed: int = 0) -> torch.Tensor:
    """(T, 1) int32: row t steered by slot t mod SLOTS (rows shuffled, so slots are unsorted); ``half``: odd rows
    unsteered (-1)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.arange(T, dtype=torch.int32) % SLOTS
    s = s[torch.randperm(T, generator=g)]
    if steered == "half":
        s[1::2] = -1
    return s[:, None].contiguous()


@torch.no_grad()
def build_op_problem(case: Case, hidden: int, *, device, dtype, max_sets: int, mem_cap: int) -> OpProblem:
    device = torch.device(device)
    T = case.T
    elt = torch.empty((), dtype=dtype).element_size()
    per_set = T * hidden * elt + SLOTS * hidden * 4  # what a set keeps; outputs and temporaries are transient
    n_sets = int(max(1, min(max_sets, mem_cap // max(per_set, 1))))
    g = torch.Generator(device=device).manual_seed(1234)
    slots = row_slots(T, case.steered).to(device)
    gs = torch.Generator().manual_seed(5)
    scales = (0.5 + torch.rand(T, 1, generator=gs)).to(device)
    modes = torch.zeros(SLOTS, dtype=torch.int32, device=device)
    weight = (1.0 + 0.1 * torch.randn(hidden, generator=g, device=device)).to(dtype)
    sets = []
    for _ in range(n_sets):
        sets.append({
            "h": torch.randn(T, hidden, generator=g, device=device).to(dtype),
            "vectors": torch.randn(SLOTS, hidden, generator=g, device=device) * 0.5,
        })
    used = slots[slots >= 0]
    n_steered = int(used.numel())
    n_read = int(torch.unique(used).numel()) if n_steered else 0
    return OpProblem(case, hidden, dtype, device, slots, scales, modes, weight, sets, n_steered, n_read)


def _triton_ok(P: OpProblem) -> None:
    # Interpreter timings mean nothing: on CPU the Triton paths run only when asked for explicitly (to exercise the
    # benchmark code itself), with TRITON_INTERPRET=1 and PLLM_BENCH_INTERPRET=1.
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and os.environ.get("PLLM_BENCH_INTERPRET") == "1"
    if P.device.type != "cuda" and not interp:
        raise Skip("needs a CUDA device (or TRITON_INTERPRET=1 PLLM_BENCH_INTERPRET=1); not benchmarked on CPU")
    try:
        import pllm_kernels.triton.steer  # noqa: F401
    except Exception as e:
        raise Skip(f"pllm_kernels.triton.steer does not import: {type(e).__name__}: {e}") from None


def _gather_add(P: OpProblem):
    """The unfused torch baseline: gather each row's vector, scale, add (masked when some rows are unsteered)."""
    sl = P.slots[:, 0]
    sc = P.scales[:, :1]
    if P.n_steered == P.case.T:
        def fn(s):
            s["h"] += sc * s["vectors"][sl]
    else:
        mask = (sl >= 0)[:, None]
        slc = sl.clamp_min(0)

        def fn(s):
            s["h"] += torch.where(mask, sc * s["vectors"][slc], 0.0)

    return fn


def make_backend(name: str, P: OpProblem):
    """``(fn(set), graph_safe, checked)`` of one contender of an op / fused case, or raise Skip. ``checked``: it
    must compute what the unfused baseline computes (checked before timing)."""
    ops = _steer_ops()
    fused = P.case.section == "fused"
    if name in OURS:
        if name == "triton":
            _triton_ok(P)
        if fused:
            def fn(s, _b=name):
                return ops.steer_rmsnorm(s["h"], P.weight, RMS_EPS, s["vectors"], P.slots, P.scales, P.modes,
                                         backend=_b, validate=False)
        else:
            def fn(s, _b=name):
                ops.steer_add(s["h"], s["vectors"], P.slots, P.scales, P.modes, backend=_b, validate=False)
        if name == "cuda":
            # The op itself says whether it can run here (no kernel yet, CPU tensors, extension not built /
            # unusable): one probe call on a copy of h; its RuntimeError is the skip reason.
            try:
                fn(dict(P.sets[0], h=P.sets[0]["h"].clone()))
            except RuntimeError as e:
                raise Skip(_first_line(e)) from None
        return fn, True, True
    gather = _gather_add(P)
    if not fused:
        if name == "gather":
            return gather, True, False
        if name == "broadcast":
            def fn(s):
                s["h"] += STEER_SCALE * s["vectors"][0]

            return fn, True, False
    else:
        if name == "unfused":
            def fn(s):
                ops.steer_add(s["h"], s["vectors"], P.slots, P.scales, P.modes, backend="auto", validate=False)
                return hf_rmsnorm(s["h"], P.weight, RMS_EPS)

            return fn, True, True
        if name == "unfused_torch":
            def fn(s):
                gather(s)
                return hf_rmsnorm(s["h"], P.weight, RMS_EPS)

            return fn, True, False
        if name == "rmsnorm_alone":
            def fn(s):
                return hf_rmsnorm(s["h"], P.weight, RMS_EPS)

            return fn, True, False
    raise Skip(f"not a backend of the {P.case.section} section")


def _reference(P: OpProblem) -> dict:
    """The unfused torch result on a copy of set 0 as built (``h0``: timing steers the sets in place): steered h
    (and, fused, the normed output)."""
    h0 = P.sets[0]["h"].clone()
    s = dict(P.sets[0], h=h0.clone())
    _gather_add(P)(s)
    ref = {"h0": h0, "h": s["h"]}
    if P.case.section == "fused":
        ref["out"] = hf_rmsnorm(s["h"], P.weight, RMS_EPS)
    return ref


def _check_backend(fn, P: OpProblem, ref: dict) -> float:
    """Run ``fn`` on a copy of set 0 as built and compare with the reference; raises Refused. Returns the max
    error."""
    s = dict(P.sets[0], h=ref["h0"].clone())
    out = fn(s)
    _sync(P.device)
    rtol, atol = TOL.get(P.dtype, TOL[torch.float32])
    err = 0.0
    try:
        err = max(err, check_close(s["h"], ref["h"], rtol, atol))
        if "out" in ref:
            if not isinstance(out, torch.Tensor):
                raise AssertionError("returned no output tensor")
            err = max(err, check_close(out, ref["out"], rtol, atol))
    except AssertionError as e:
        what = "normed output / steered h" if "out" in ref else "steered h"
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise Refused(f"refused: {what} differs from the unfused torch baseline ({'; '.join(lines[:3])[:220]})") \
            from None
    return err


def _base_row(case: Case, name: str) -> dict:
    return {"bench": "steering", "case": case.name, "backend": name, "section": case.section,
            "kind": "ours" if name in OURS else "baseline", "tags": "+".join(case.tags)}


def _status_row(case: Case, name: str, status: str, note: str, extra: dict) -> dict:
    return {**_base_row(case, name), "median_ms": float("nan"), "p20_ms": float("nan"), "p80_ms": float("nan"),
            "method": "", "n_sets": 0, "note": note, "status": status, **extra}


@torch.no_grad()
def run_op_case(P: OpProblem, backends, roof, *, warmup, rep, log) -> list[dict]:
    case = P.case
    fused = case.section == "fused"
    extra = {"op": "steer_rmsnorm" if fused else "steer_add", "shape": case.shape, "hidden": P.hidden, "T": case.T,
             "steered": case.steered, "n_steered": P.n_steered, "n_slots_read": P.n_slots_read, "K": 1,
             "num_slots": SLOTS, "dtype": str(P.dtype).removeprefix("torch."), "copy_gbps": roof["copy_gbps"]}
    rows = []
    ref = _reference(P)
    for name in backends:
        if name not in SECTION_BACKENDS[case.section]:
            continue
        try:
            fn, graph_safe, checked = make_backend(name, P)
        except Skip as e:
            rows.append(_status_row(case, name, "skip", str(e), extra))
            continue
        except Exception as e:
            _sync_quietly(P.device)
            rows.append(_status_row(case, name, "error", _err_text(e), extra))
            continue
        try:
            err = _check_backend(fn, P, ref) if checked else float("nan")
            res = H.time_fn(fn, warmup=warmup, rep=rep, cuda_graph=graph_safe and P.device.type == "cuda",
                            arg_sets=P.sets, device=P.device)
        except Refused as e:
            rows.append(_status_row(case, name, "error", str(e), extra))
            continue
        except Exception as e:  # a backend failing must not stop the benchmark
            _sync_quietly(P.device)
            rows.append(_status_row(case, name, "error", _err_text(e), extra))
            continue
        note = res["note"]
        if name == "unfused":
            from pllm_kernels.ops._backend import pick_backend

            used = pick_backend("steer_add", P.device, P.dtype, "auto")
            note = "; ".join(x for x in (note, f"steer_add backend auto -> {used}") if x)
        if fused:
            nbytes = P.rmsnorm_bytes() if name == "rmsnorm_alone" else P.fused_bytes()
        else:
            nbytes = P.broadcast_bytes() if name == "broadcast" else P.op_bytes()
        row = {**_base_row(case, name), **{k: res[k] for k in ("median_ms", "p20_ms", "p80_ms", "method", "n_sets")},
               "note": note, "status": "ok", **extra, "bytes": nbytes, "max_err": err}
        row["gbps"] = H.gbps(nbytes, res["median_ms"])
        row["pct_of_copy_bw"] = 100 * row["gbps"] / roof["copy_gbps"]
        rows.append(row)
    ok = {r["backend"]: r["median_ms"] for r in rows if r["status"] == "ok"}
    ratio_bases = ("torch", "unfused", "unfused_torch", "rmsnorm_alone") if fused else ("torch", "gather", "broadcast")
    for r in rows:
        if r["status"] != "ok":
            continue
        for b in ratio_bases:
            if b in ok and b != r["backend"] and not (fused and r["backend"] == "rmsnorm_alone"):
                r[f"ratio_vs_{b}"] = ok[b] / r["median_ms"]
        if fused and "rmsnorm_alone" in ok and r["backend"] != "rmsnorm_alone":
            r["pct_of_rmsnorm"] = 100 * r["median_ms"] / ok["rmsnorm_alone"]
    log(_case_line(case, rows, f"sets={P.n_sets:<2} read={P.n_slots_read:<3}"))
    return rows


def _case_line(case: Case, rows, info: str) -> str:
    parts = [f"{case.name:<28} {info}"]
    for r in rows:
        if r["status"] == "skip":
            parts.append(f"{r['backend']}=skip")
        elif r["status"] == "error":
            parts.append(f"{r['backend']}=ERROR")
        else:
            g = "g" if "graph" in str(r["method"]) else ""
            bw = f" {r['pct_of_copy_bw']:.0f}%bw" if isinstance(r.get("pct_of_copy_bw"), float) else ""
            parts.append(f"{r['backend']}={H.fmt_ms(r['median_ms'])}{g}{bw}")
    return "  ".join(parts)


# ------------------------------------------------------------------------------------------------ model section
def build_model(shape: str, device, dtype):
    """The model of a decode case: ``tiny`` (tiny_model's default tiny Llama) or ``llama1b`` (llama_1b_config's
    shapes, random weights, sdpa)."""
    from pllm_kernels.testing import llama_1b_config, tiny_model

    if shape == "tiny":
        return tiny_model("llama", seed=0, dtype=dtype, device=device)
    import transformers as tf

    cfg = llama_1b_config()
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    return model.to(dtype).eval()


def _cache_kw(model) -> str:
    """The forward's KV-cache argument (transformers >= 5.24: ``cache``; before: ``past_key_values``)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    for k in ("cache", "past_key_values"):
        v = out.get(k) if hasattr(out, "get") else getattr(out, k, None)
        if v is not None:
            return v
    raise RuntimeError("the forward returned no KV cache (use_cache=True)")


def _rewind(cache, length: int) -> None:
    """Drop the positions a decode step appended, so the next step sees the same prompt-length cache again.
    ``crop(-n)`` (a negative count: drop the last n positions) means the same in transformers 4.x and 5.x."""
    n = cache.get_seq_length() - length
    if n > 0:
        cache.crop(-n)
    if cache.get_seq_length() != length:
        raise RuntimeError(f"could not rewind the KV cache to {length} positions (got {cache.get_seq_length()})")


@dataclass
class ModelCase:
    case: Case
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    ids: torch.Tensor  # (B, S) prompt
    mask: torch.Tensor  # (B, S + 1) attention mask of the decode step
    users: list[str]
    vectors: dict  # (user, layer) -> (hidden,) fp32 vector
    n_layers: int
    hidden: int

    @property
    def S(self) -> int:
        return int(self.ids.shape[1])

    @property
    def steered_layers(self) -> list[int]:
        return sorted({lyr for _, lyr in self.vectors})


def build_model_case(case: Case, model, device, dtype) -> ModelCase:
    cfg = model.config
    B, S = case.T, PROMPT.get(case.shape, 16)
    L, hidden = int(cfg.num_hidden_layers), int(cfg.hidden_size)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, int(cfg.vocab_size), (B, S), generator=g).to(device)
    mask = torch.ones(B, S + 1, dtype=torch.long, device=device)
    users = [f"u{i}" for i in range(B)]
    vectors = {}
    for i, u in enumerate(users):
        for lyr in sorted({i % L, (i + L // 2) % L}):
            vectors[(u, lyr)] = torch.randn(hidden, generator=g)
    return ModelCase(case, model, torch.device(device), dtype, ids, mask, users, vectors, L, hidden)


def _hook_deltas(M: ModelCase) -> dict[int, torch.Tensor]:
    """Per steered layer, ``(B, 1, H)`` fp32: each row's ``scale * vector`` at that layer (0 for rows without)."""
    out = {}
    for lyr in M.steered_layers:
        d = torch.zeros(len(M.users), M.hidden)
        for b, u in enumerate(M.users):
            v = M.vectors.get((u, lyr))
            if v is not None:
                d[b] += STEER_SCALE * v
        out[lyr] = d[:, None, :].to(M.device)
    return out


@contextlib.contextmanager
def _steering_hooks(M: ModelCase):
    """Per-row steering with forward hooks on the unpatched model (the hook way: one broadcast add per steered
    block, the rows' vectors gathered once per batch, outside the timed step)."""
    from pllm_kernels.hf.targets import find_decoder_layers

    _, layers = find_decoder_layers(M.model)

    def make(d):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h += d  # fp32 delta, h rounded once (as the op does)

        return hook

    handles = [layers[lyr].register_forward_hook(make(d)) for lyr, d in _hook_deltas(M).items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _Stepper:
    """One greedy decode step at a fixed position, repeatable.

    A forward appends to the KV cache it is given, so each timed call runs the step on the prompt's cache and then
    crops the appended position again (``_rewind``: slicing views, a few microseconds of host time per layer,
    paid equally by every variant). This times exactly one decode step at position S, with the same cache and
    inputs every call, which ``generate`` runs could not (prefill included, fewer samples) and which rebuilding the
    cache per call would flood with copies."""

    def __init__(self, call, M: ModelCase, next_ids: torch.Tensor | None):
        self.call, self.M = call, M
        self.kw = _cache_kw(M.model)
        out = call(M.ids, attention_mask=M.mask[:, :-1], use_cache=True)
        self.cache = _cache_of(out)
        self.next_ids = out.logits[:, -1:].argmax(-1) if next_ids is None else next_ids

    def __call__(self):
        out = self.call(self.next_ids, attention_mask=self.M.mask, use_cache=True, **{self.kw: self.cache})
        _rewind(self.cache, self.M.S)
        return out.logits


def _model_row(M: ModelCase, name: str, res: dict | None, status: str, note: str, err: float) -> dict:
    case = M.case
    kind = {"on": "ours", "on_call": "ours", "base": "baseline", "hooks": "baseline"}.get(name, "reference")
    row = {"bench": "steering", "case": case.name, "backend": name, "section": "model", "kind": kind,
           "tags": "+".join(case.tags), "op": "decode_step", "shape": case.shape, "B": case.T, "prompt": M.S,
           "hidden": M.hidden, "layers": M.n_layers, "steered_layers": len(M.steered_layers),
           "dtype": str(M.dtype).removeprefix("torch."), "status": status, "max_err": err}
    if res is None:
        row.update(median_ms=float("nan"), p20_ms=float("nan"), p80_ms=float("nan"), method="", n_sets=0, note=note)
    else:
        row.update({k: res[k] for k in ("median_ms", "p20_ms", "p80_ms", "method", "n_sets")},
                   note="; ".join(x for x in (res["note"], note) if x))
    return row


@torch.inference_mode()
def run_model_case(M: ModelCase, backends, *, warmup, rep, log) -> list[dict]:
    from pllm_kernels.hf import patch_model

    want = [b for b in MODEL_VARIANTS if b in backends]
    model, B = M.model, M.case.T
    logits: dict[str, torch.Tensor] = {}
    timed: dict[str, dict] = {}
    errors: dict[str, str] = {}

    def measure(name, call, ctx=None):
        if name not in want:
            return
        try:
            with ctx if ctx is not None else contextlib.nullcontext():
                st = _Stepper(call, M, next_ids)
                logits[name] = st().float()
                _sync(M.device)
                timed[name] = H.time_fn(st, warmup=warmup, rep=rep, device=M.device)
        except Exception as e:
            _sync_quietly(M.device)
            errors[name] = _err_text(e)

    # the same next token for every variant (the base model's greedy choice), so every step reads identical inputs
    first = model(M.ids, attention_mask=M.mask[:, :-1], use_cache=True)
    next_ids = first.logits[:, -1:].argmax(-1)
    del first
    measure("base", model)
    measure("hooks", model, _steering_hooks(M))
    if any(v in want for v in ("off", "on", "off_call", "on_call")):
        pm = patch_model(model, num_slots=8, max_rank=16)
        try:
            for (u, lyr), v in M.vectors.items():
                pm.add_steering(u, lyr, v, scale=STEER_SCALE)
            none = [None] * B
            measure("off", pm.model, pm.users(none))
            measure("on", pm.model, pm.users(M.users))

            def call_with(users):
                def call(*a, **kw):
                    return pm(*a, users=users, **kw)

                return call

            measure("off_call", call_with(none))
            measure("on_call", call_with(M.users))
        finally:
            pm.unpatch()

    # correctness: on == hooks (per-row steering), off == base (a patched model without users is the model)
    checks = {"on": "hooks", "on_call": "hooks", "off": "base", "off_call": "base"}
    errs: dict[str, float] = {}
    for name, ref_name in checks.items():
        if name not in logits or ref_name not in logits or name in errors:
            continue
        got, ref = logits[name], logits[ref_name]
        try:
            if M.dtype == torch.float32:
                errs[name] = check_close(got, ref, *MODEL_TOL_FP32)
            else:
                errs[name] = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                if name.startswith("on") and "off" in logits:
                    effect = float((logits["off"] - got).abs().max())
                    diff = float((got - ref).abs().max())
                    if not (math.isfinite(diff) and diff <= MODEL_BF16_FRACTION * effect):
                        raise AssertionError(f"|{name} - {ref_name}| = {diff:.3g} is not below "
                                             f"{MODEL_BF16_FRACTION:g} x |{name} - off| = {effect:.3g}")
        except AssertionError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            errors[name] = f"refused: {name} logits differ from {ref_name} ({'; '.join(lines[:3])[:220]})"
            timed.pop(name, None)

    rows = []
    for name in want:
        if name in errors:
            rows.append(_model_row(M, name, None, "error", errors[name], errs.get(name, float("nan"))))
        elif name in timed:
            rows.append(_model_row(M, name, timed[name], "ok", "", errs.get(name, float("nan"))))
    ok = {r["backend"]: r["median_ms"] for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        b = r["backend"]
        if "base" in ok and b != "base":
            r["time_vs_base"] = r["median_ms"] / ok["base"]
        if b in ("on", "on_call"):
            off = "off" if b == "on" else "off_call"
            if off in ok:
                r["ratio_on_vs_off"] = r["median_ms"] / ok[off]
            if "hooks" in ok:
                r["ratio_vs_hooks"] = ok["hooks"] / r["median_ms"]
    info = f"L={M.n_layers} steered_layers={len(M.steered_layers)}"
    line = _case_line(M.case, rows, info)
    on = next((r for r in rows if r["backend"] == "on" and "ratio_on_vs_off" in r), None)
    log(line + (f"  on/off={on['ratio_on_vs_off']:.3f}" if on else ""))
    return rows


# ------------------------------------------------------------------------------------------------ targets, summary
def target_checks(rows: list[dict], device_kind: str) -> list[dict]:
    on_gpu = device_kind == "cuda"
    ok = [r for r in rows if r["status"] == "ok"]
    out = []

    check = {"name": f"steer_add, every row its own slot, largest T: >= {TARGET_OP_PCT:.0f}% of copy bandwidth"}
    tgt = [r for r in ok if "target_op" in r["tags"] and r["kind"] == "ours"]
    shapes = list(dict.fromkeys(r["shape"] for r in tgt))
    details, statuses = [], []
    for s in shapes:
        best = max((r for r in tgt if r["shape"] == s), key=lambda r: r["pct_of_copy_bw"])
        statuses.append(best["pct_of_copy_bw"] >= TARGET_OP_PCT)
        details.append(f"{best['case']}: {best['backend']} {H.fmt_ms(best['median_ms'])} {best['gbps']:.0f} GB/s "
                       f"= {best['pct_of_copy_bw']:.1f}% of {best['copy_gbps']:.0f} GB/s")
    if not on_gpu:
        check.update(status="SKIP", detail="needs a GPU (CPU smoke shapes); here: " + ("; ".join(details) or "-"))
    elif not statuses:
        check.update(status="SKIP", detail="no ours row for the target cases")
    else:
        check.update(status="PASS" if all(statuses) else "FAIL", detail="; ".join(details))
    out.append(check)

    check = {"name": f"steer_rmsnorm (fused) <= {TARGET_FUSED_PCT:.0f}% of RMSNorm alone, all rows steered, every T"}
    cases = list(dict.fromkeys(r["case"] for r in ok if "target_fused" in r["tags"]))
    details, statuses = [], []
    for c in cases:
        mine = [r for r in ok if r["case"] == c and r["kind"] == "ours" and "pct_of_rmsnorm" in r]
        if not mine:
            continue
        best = min(mine, key=lambda r: r["median_ms"])
        statuses.append(best["pct_of_rmsnorm"] <= TARGET_FUSED_PCT)
        details.append(f"{c}: {best['backend']} {best['pct_of_rmsnorm']:.0f}%")
    if not on_gpu:
        check.update(status="SKIP", detail="needs a GPU (CPU smoke shapes); here: " + ("; ".join(details) or "-"))
    elif not statuses:
        check.update(status="SKIP", detail="no fused rows with an RMSNorm-alone baseline")
    else:
        check.update(status="PASS" if all(statuses) else "FAIL", detail="; ".join(details))
    out.append(check)

    check = {"name": f"decode step, every row steered, <= {100 * (TARGET_DECODE_RATIO - 1):.0f}% slower than "
                     "unsteered (on / off)"}
    dec = [r for r in ok if r["backend"] == "on" and "ratio_on_vs_off" in r]
    details = [f"{r['case']}: on/off {r['ratio_on_vs_off']:.3f} ({H.fmt_ms(r['median_ms'])})" for r in dec]
    if not on_gpu:
        check.update(status="SKIP", detail="needs a GPU (CPU: tiny model); here: " + ("; ".join(details) or "-"))
    elif not dec:
        check.update(status="SKIP", detail="no on/off pair measured")
    else:
        good = all(r["ratio_on_vs_off"] <= TARGET_DECODE_RATIO for r in dec)
        check.update(status="PASS" if good else "FAIL", detail="; ".join(details))
    out.append(check)
    return out


def _x(v) -> str:
    return f"{v:.2f}x" if isinstance(v, float) and math.isfinite(v) else "-"


def _pct(v) -> str:
    return f"{v:.1f}" if isinstance(v, float) and math.isfinite(v) else "-"


def summary_markdown(rows, checks, roof, env, profile, cut) -> str:
    lines = [f"## bench_steering ({profile})", "",
             f"device **{env['device']}**, torch {env['torch']}, triton {env['triton']}, git {env['git_sha']}; "
             f"measured copy {roof['copy_gbps']:.0f} GB/s", "", "### Target checks", ""]
    for c in checks:
        lines.append(f"- **{c['status']}** {c['name']}: {c['detail']}")
    ok = [r for r in rows if r["status"] == "ok"]

    def best_ours(case):
        mine = [r for r in ok if r["case"] == case and r["kind"] == "ours"]
        return min(mine, key=lambda r: r["median_ms"], default=None)

    op_cases = list(dict.fromkeys(r["case"] for r in ok if r["section"] == "op"))
    if op_cases:
        lines += ["", "### steer_add (best of ours; x = speed-up vs baseline; %bw = % of copy bandwidth)", "",
                  "| case | backend | median | GB/s | %bw | vs gather | vs broadcast |",
                  "|---|---|---|---|---|---|---|"]
        for c in op_cases:
            r = best_ours(c)
            if r:
                lines.append(f"| {c} | {r['backend']} | {H.fmt_ms(r['median_ms'])} | {r['gbps']:.1f} | "
                             f"{_pct(r['pct_of_copy_bw'])} | {_x(r.get('ratio_vs_gather'))} | "
                             f"{_x(r.get('ratio_vs_broadcast'))} |")
    fused_cases = list(dict.fromkeys(r["case"] for r in ok if r["section"] == "fused"))
    if fused_cases:
        lines += ["", "### steer_rmsnorm (best of ours)", "",
                  "| case | backend | median | GB/s | %bw | vs unfused | vs unfused_torch | % of rmsnorm alone |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in fused_cases:
            r = best_ours(c)
            if r:
                lines.append(f"| {c} | {r['backend']} | {H.fmt_ms(r['median_ms'])} | {r['gbps']:.1f} | "
                             f"{_pct(r['pct_of_copy_bw'])} | {_x(r.get('ratio_vs_unfused'))} | "
                             f"{_x(r.get('ratio_vs_unfused_torch'))} | {_pct(r.get('pct_of_rmsnorm'))} |")
    model_cases = list(dict.fromkeys(r["case"] for r in rows if r["section"] == "model"))
    if model_cases:
        lines += ["", "### decode step (median per step)", "",
                  "| case | base | hooks | off | on | on/off | off_call | on_call | on_call/off_call |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in model_cases:
            by = {r["backend"]: r for r in ok if r["case"] == c}

            def ms(b, by=by):
                return H.fmt_ms(by[b]["median_ms"]) if b in by else "-"

            def ratio(b, by=by):
                v = by.get(b, {}).get("ratio_on_vs_off")
                return f"{v:.3f}" if isinstance(v, float) else "-"

            lines.append(f"| {c} | {ms('base')} | {ms('hooks')} | {ms('off')} | {ms('on')} | {ratio('on')} | "
                         f"{ms('off_call')} | {ms('on_call')} | {ratio('on_call')} |")
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


# ------------------------------------------------------------------------------------------------ driver
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


def main(argv=None) -> int:
    p = H.base_parser(__doc__.splitlines()[0])
    p.prog = "python -m pllm_kernels.bench steering"
    p.add_argument("--profile", choices=("smoke", "suite"), default=None,
                   help="case list (default: suite on GPU, smoke on CPU or with --smoke)")
    p.add_argument("--sections", default="op,fused,model", help="comma list of op, fused, model")
    p.add_argument("--tokens", default=None, help="op / fused token counts T, e.g. 1,64 (default: the profile's)")
    p.add_argument("--batch", default=None, help="model rows B, e.g. 1,32 (default: the profile's)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="activations on GPU (CPU: always float32)")
    p.add_argument("--warmup-ms", type=float, default=None)
    p.add_argument("--rep-ms", type=float, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU only: torch intra-op threads (default 1: stable smoke timings on a shared machine; 0 = "
                        "torch's default)")
    p.add_argument("--max-sets", type=int, default=None, help="rotated input sets (default 32 on GPU, 2 on CPU)")
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    profile = args.profile or ("smoke" if (args.smoke or not on_gpu) else "suite")
    smoke = profile == "smoke"
    if smoke and not args.out and not os.environ.get("PLLM_BENCH_OUT"):
        args.out = str(H.default_out("smoke"))  # smoke rows never pollute the results of real runs
    H.apply_out(args)
    dtype = getattr(torch, args.dtype) if on_gpu else torch.float32
    warmup = args.warmup_ms if args.warmup_ms is not None else (10 if on_gpu else 5)
    rep = args.rep_ms if args.rep_ms is not None else (50 if on_gpu else 25)
    max_sets = args.max_sets or (32 if on_gpu else 2)
    mem_cap = (3 << 30) if on_gpu else (64 << 20)

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        p.error(f"unknown section(s) {bad}; choose from {list(SECTIONS)}")
    backends = list(ALL_BACKENDS) if args.backend == "all" else [b.strip() for b in args.backend.split(",") if b]
    unknown = [b for b in backends if b not in ALL_BACKENDS]
    if unknown:
        p.error(f"unknown backend(s) {unknown}; choose from {list(ALL_BACKENDS)}")
    # a section none of whose backends was asked for is not run at all
    sections = [s for s in sections if any(b in SECTION_BACKENDS[s] for b in backends)]
    cases = cases_for(profile, _int_list(args.tokens, "--tokens", p), _int_list(args.batch, "--batch", p),
                      tuple(sections))
    if args.shape != "all":
        want = {s.strip() for s in args.shape.split(",")}
        names = {c.shape for c in cases}
        if want - names:
            p.error(f"unknown shape(s) {sorted(want - names)} for this profile; choose from {sorted(names)}")
        cases = [c for c in cases if c.shape in want]
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
    print(f"[bench_steering] {env['device']} torch {env['torch']} triton {env['triton']} git {env['git_sha']} "
          f"profile={profile} dtype={str(dtype).removeprefix('torch.')}")
    print(f"[bench_steering] roofline: copy {roof['copy_gbps']:.1f} GB/s; {len(cases)} cases; backends "
          f"{','.join(backends)}")
    budget = H.Budget(args.budget_s)
    all_rows: list[dict] = []
    models: dict[str, torch.nn.Module] = {}
    cut = 0
    t0 = time.perf_counter()
    hidden_of = {**OP_HIDDEN, **SMOKE_HIDDEN}
    for i, case in enumerate(cases):
        if budget.expired():
            cut = len(cases) - i
            print(f"[bench_steering] budget of {args.budget_s:.0f}s reached: {cut} case(s) not run")
            break
        if case.section != "model" and models:
            models.clear()  # the model cases come in one run: free the model before the remaining op cases
            if on_gpu:
                torch.cuda.empty_cache()
        rows: list[dict] = []
        try:
            if case.section == "model":
                if case.shape not in models:
                    models[case.shape] = build_model(case.shape, device, dtype)
                M = build_model_case(case, models[case.shape], device, dtype)
                # decode steps are milliseconds and host-bound: 10x the op budget per variant (GPU: ~30 samples)
                rows = run_model_case(M, backends, warmup=5 * warmup, rep=10 * rep, log=print)
                del M
            else:
                P = build_op_problem(case, hidden_of[case.shape], device=device, dtype=dtype, max_sets=max_sets,
                                     mem_cap=mem_cap)
                with torch.inference_mode():
                    rows = run_op_case(P, backends, roof, warmup=warmup, rep=rep, log=print)
                del P
        except torch.OutOfMemoryError as e:
            print(f"{case.name}: out of memory building inputs ({_first_line(e)}); skipped")
        except Exception as e:  # building the case failed (e.g. transformers missing): one error row, go on
            _sync_quietly(device)
            print(f"{case.name}: {_err_text(e)}")
            rows = [{"bench": "steering", "case": case.name, "backend": "-", "section": case.section,
                     "kind": "baseline", "tags": "+".join(case.tags), "median_ms": float("nan"), "method": "",
                     "n_sets": 0, "note": _err_text(e), "status": "error"}]
        if on_gpu:
            torch.cuda.empty_cache()
        all_rows += rows
        if not args.no_csv and rows:
            H.append_rows(args.csv or CSV, rows)
    models.clear()
    skipped: dict[str, tuple[str, int]] = {}
    for r in all_rows:
        if r["status"] == "skip":
            why, n = skipped.get(r["backend"], (r["note"], 0))
            skipped[r["backend"]] = (why, n + 1)
    n_cases = len({r["case"] for r in all_rows})
    for name, (why, n) in sorted(skipped.items()):
        print(f"[bench_steering] {name} skipped in {n}/{n_cases} cases: {why}")
    errors = [r for r in all_rows if r["status"] == "error"]
    for r in errors:
        print(f"[bench_steering] ERROR {r['case']} {r['backend']}: {r['note']}")
    checks = target_checks(all_rows, device.type)
    print("[bench_steering] target checks:")
    for c in checks:
        print(f"  {c['status']}: {c['name']} -- {c['detail']}")
    md = summary_markdown(all_rows, checks, roof, env, profile, cut)
    if not args.no_csv:
        out = H.results_dir()
        (out / "bench_steering_summary.md").write_text(md)
        print(f"[bench_steering] {len(all_rows)} rows -> {out / (args.csv or CSV)}; summary "
              f"{out / 'bench_steering_summary.md'}")
    print(f"[bench_steering] done in {time.perf_counter() - t0:.1f}s" + (f"; {len(errors)} error row(s)" if errors
                                                                           else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
