"""Batched multi-LoRA benchmark: ``lora_apply`` (shrink + expand into y) on Llama-3-8B module shapes.

    python -m pllm_kernels.bench lora                 # GPU: the suite profile (~4 min); CPU: the smoke profile
    python -m pllm_kernels.bench lora --smoke         # tiny shapes, seconds (what CI runs)
    python -m pllm_kernels.bench lora --profile full  # every shape x rank x T x distribution (long)
    python -m pllm_kernels.bench lora --backend triton,peft_mixed --shape q,gate_up --budget-s 120 --out DIR

Cases: Llama-3-8B modules (q 4096->4096, kv 4096->[1024,1024], o 4096->4096, gate_up 4096->[14336,14336],
down 14336->4096), ranks 8-64 and a mixed-rank set {8,16,64} (max rank 64), decode T 1-512 (one token per
sequence) and prefill T 2048-8192 (sequences of 512 tokens), adapters per sequence drawn identical (1 adapter),
distinct (one per sequence), uniform (~sqrt(#seq) equal groups) or zipf(1.5); sequences are not sorted by adapter.

Backends (``--backend``): ours: ``triton`` (the op, ``backend="triton"``, auto path), ``triton_sgmv``,
``triton_bgmv``, ``triton_fused`` (launcher with a forced path), ``cuda`` (the op, ``backend="cuda"``; skipped,
with the op's own reason, while the extension has no lora kernel or cannot run here), ``cuda_tc`` (the CUDA launcher
with the opt-in tensor-core SGMV shrink, ``path="sgmv_tc"``; prefill sizes, fp16 / bf16). Baselines: ``torch`` (the
op's torch backend, ``backend="torch"``, auto strategy),
``peft`` (PEFT's own ``lora.Linear`` mixed-batch forward, when peft imports;
the base layer is stubbed to return y so only the LoRA part is timed; weights of input set 0), ``peft_mixed``
(a replica of PEFT ``LoraLayer._mixed_batch_forward``: Python loop over adapters, index lists
built per call, gather, A GEMM, B GEMM, scaled index-put), ``adapter_loop`` (the same loop with precomputed device
indices and ``index_add_``, CUDA-graph capturable: the best a per-adapter loop can do), ``unfused_torch`` (vLLM
torch_ops style: gather each token's A and B, two einsums; skipped when the gathered weights would exceed a
memory cap), ``mm_single`` (torch.mm with one adapter: vLLM's roofline convention, identical-adapter cases) and
``base_mm`` (the base layer's ``x @ W.T``, for the LoRA / base time ratio).

Figures per row: median ms (do_bench, CUDA-graph replay for graph-safe backends, >= 32 rotated input sets when
they fit in memory), required bytes (each distinct adapter's weights at its true rank once + x once + y read and
write; ``bytes`` column), GB/s and % of the copy bandwidth measured in the same run, TFLOP/s (2*T*r*(S*h_in+N)),
ratio_vs_<baseline> = baseline_ms / ms (> 1: faster), pct_of_base_mm, rel_err of the delta against an fp32
per-adapter computation. The two GPU targets (decode distinct T=64 >= 85 % of copy bandwidth; prefill T=8192
delta <= 10 % of the base matmul) are printed as PASS/FAIL and written to ``bench_lora_summary.md``.

Results: ``lora.csv`` and ``bench_lora_summary.md`` in ``--out DIR`` (default ``./pllm_bench_results``, smoke runs
``./pllm_bench_results/smoke``).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from pllm_kernels.bench import harness as H
from pllm_kernels.bench.harness import Skip
from pllm_kernels.bench.harness import env_vars as _env

# ------------------------------------------------------------------------------------------------ shapes & cases
SHAPES: dict[str, tuple[int, tuple[int, ...]]] = {  # Llama-3-8B, TP=1: (h_in, slice output widths)
    "q": (4096, (4096,)),
    "kv": (4096, (1024, 1024)),
    "o": (4096, (4096,)),
    "gate_up": (4096, (14336, 14336)),
    "down": (14336, (4096,)),
}
SMOKE_DIV = 32  # smoke shapes: every width / 32 (q 128->128, gate_up 128->[448,448], down 448->128)
MIXED_RANKS = (8, 16, 64)
DECODE_T = (1, 8, 32, 64, 128, 256, 512)
PREFILL_T = (2048, 4096, 8192)
PREFILL_SEQ = 512
DISTS = ("identical", "distinct", "uniform", "zipf")

OURS = ("triton", "triton_sgmv", "triton_bgmv", "triton_fused", "cuda", "cuda_tc")
BASELINES = ("torch", "peft", "peft_mixed", "adapter_loop", "unfused_torch", "mm_single", "base_mm")
ALL_BACKENDS = OURS + BASELINES
RATIO_BASELINES = ("torch", "peft", "peft_mixed", "adapter_loop", "unfused_torch")

TARGET_DECODE_PCT = 85.0
TARGET_PREFILL_PCT = 10.0


@dataclass(frozen=True)
class Case:
    shape: str
    T: int
    rank: int | str  # int or "mixed"
    dist: str
    seq_len: int = 1
    tags: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        phase = "decode" if self.seq_len == 1 else f"prefill{self.seq_len}"
        return f"{phase}-{self.shape}-T{self.T}-r{self.rank}-{self.dist}"


def shape_dims(shape: str, smoke: bool, div: int | None = None) -> tuple[int, tuple[int, ...]]:
    """(h_in, slice widths) of a Llama-3-8B module; divided by ``div`` (default SMOKE_DIV when smoke)."""
    h_in, outs = SHAPES[shape]
    div = div or (SMOKE_DIV if smoke else 1)
    return h_in // div, tuple(n // div for n in outs)


def _dedup(cases):
    seen, out = set(), []
    for c in cases:
        key = (c.shape, c.T, c.rank, c.dist, c.seq_len)
        if key in seen:
            continue
        seen.add(key)
        out.append(c)
    return out


def cases_for(profile: str) -> list[Case]:
    """Cases in priority order (the budget cuts from the end)."""
    tgt_d, tgt_p = ("target_decode",), ("target_prefill",)
    if profile == "smoke":
        cs = [Case("q", 64, 16, "distinct", tags=tgt_d)]
        cs += [Case(s, 256, 16, "distinct", 64, tags=tgt_p) for s in ("q", "gate_up", "down")]
        cs += [Case(s, 8, 16, "distinct") for s in ("kv", "o", "gate_up", "down")]
        cs += [Case("q", 8, 16, d) for d in ("identical", "uniform", "zipf")]
        cs += [Case("q", 8, "mixed", "distinct")]
        return _dedup(cs)
    if profile == "suite":
        cs = [Case("q", 64, 16, "distinct", tags=tgt_d)]
        cs += [Case(s, 8192, 16, "distinct", PREFILL_SEQ, tags=tgt_p) for s in SHAPES]
        cs += [Case(s, 64, 16, "distinct") for s in SHAPES if s != "q"]
        cs += [Case("q", t, 16, d) for d in DISTS for t in (1, 8, 32, 64, 128, 256, 512)]
        cs += [Case("q", 64, r, "distinct") for r in (8, 32, 64, "mixed")]
        cs += [Case("gate_up", 64, r, "distinct") for r in (8, 64, "mixed")]
        cs += [Case(s, 2048, 16, d, PREFILL_SEQ) for s in ("q", "gate_up", "down") for d in ("identical", "zipf")]
        cs += [Case("q", 8192, 16, d, PREFILL_SEQ) for d in ("identical", "zipf")]
        cs += [Case("q", 8192, r, "distinct", PREFILL_SEQ) for r in (64, "mixed")]
        cs += [Case(s, t, 16, "distinct") for s in ("gate_up", "down") for t in (1, 256, 512)]
        return _dedup(cs)
    if profile == "full":
        cs = cases_for("suite")
        for s in SHAPES:
            for r in (8, 16, 32, 64, "mixed"):
                for d in DISTS:
                    cs += [Case(s, t, r, d) for t in DECODE_T]
                    cs += [Case(s, t, r, d, PREFILL_SEQ) for t in PREFILL_T]
        return _dedup(cs)
    raise ValueError(f"unknown profile {profile!r} (smoke, suite, full)")


# ------------------------------------------------------------------------------------------------ problem data
@dataclass
class Problem:
    case: Case
    h_in: int
    slice_sizes: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    seq_adapters: list[int]  # adapter slot of each sequence
    ranks: list[int]  # true rank of each slot
    max_rank: int
    slot_ranks: torch.Tensor
    slot_scales: torch.Tensor
    meta: object
    sets: list[dict]
    n_sets: int

    @property
    def N(self) -> int:
        return sum(self.slice_sizes)

    @property
    def S(self) -> int:
        return len(self.slice_sizes)

    @property
    def L(self) -> int:
        return len(self.ranks)

    def required_bytes(self) -> int:
        b = self.sets[0]["x"].element_size()
        used = sorted(set(self.seq_adapters))
        w = sum(self.ranks[s] * (self.S * self.h_in + self.N) for s in used)
        return b * (w + self.case.T * self.h_in + 2 * self.case.T * self.N)

    def flops(self) -> int:
        per_tok = [self.ranks[s] for s in self.seq_adapters for _ in range(self.case.seq_len)]
        return 2 * sum(per_tok) * (self.S * self.h_in + self.N)


def seq_adapters(dist: str, n_seq: int, seed: int = 0) -> list[int]:
    """Adapter of each sequence, relabelled to slots 0..n-1 in order of first appearance; sequences unsorted."""
    g = torch.Generator().manual_seed(seed)
    if dist == "identical":
        raw = [0] * n_seq
    elif dist == "distinct":
        raw = torch.randperm(n_seq, generator=g).tolist()
    elif dist == "uniform":
        groups = max(1, round(math.sqrt(n_seq)))
        raw = [i % groups for i in range(n_seq)]
        raw = [raw[i] for i in torch.randperm(n_seq, generator=g).tolist()]
    elif dist == "zipf":  # zipf(1.5) over an unbounded pool, by inverse-CDF sampling of ranks 1..n_seq*4
        pool = max(4 * n_seq, 4)
        w = torch.arange(1, pool + 1, dtype=torch.float64) ** -1.5
        raw = torch.multinomial(w / w.sum(), n_seq, replacement=True, generator=g).tolist()
    else:
        raise ValueError(f"unknown distribution {dist!r}")
    relabel: dict[int, int] = {}
    return [relabel.setdefault(a, len(relabel)) for a in raw]


def _set_bytes(T, h_in, N, L, S, R, b) -> int:
    return b * (T * h_in + T * N + L * R * (S * h_in + N))


@torch.no_grad()
def build_problem(case: Case, *, smoke: bool, device, dtype, max_sets: int, mem_cap: int,
                  div: int | None = None) -> Problem:
    """Inputs of one case: ``n_sets`` rotated sets of x, y, A, B (fresh random values, never zeros)."""
    h_in, slices = shape_dims(case.shape, smoke, div)
    N, S = sum(slices), len(slices)
    n_seq = max(1, case.T // case.seq_len)
    adapters = seq_adapters(case.dist, n_seq)
    L = max(adapters) + 1
    if case.rank == "mixed":
        ranks = [MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(L)]
    else:
        ranks = [int(case.rank)] * L
    R = max(ranks)
    b = torch.empty((), dtype=dtype).element_size()
    per_set = _set_bytes(case.T, h_in, N, L, S, R, b)
    n_sets = int(max(1, min(max_sets, mem_cap // max(per_set, 1))))
    g = torch.Generator(device=device).manual_seed(1234)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    mask = torch.zeros(L, 1, R, 1, device=device, dtype=dtype)
    for i, r in enumerate(ranks):
        mask[i, :, :r] = 1  # zero padding beyond each slot's rank, so rank-padded baselines compute the same delta
    sets = []
    for _ in range(n_sets):
        sets.append({
            "x": rnd(case.T, h_in),
            "y": rnd(case.T, N),
            "a": rnd(L, S, R, h_in, scale=h_in**-0.5) * mask,
            "b": rnd(L, N, R, scale=R**-0.5) * mask[:, 0, :, :].transpose(1, 2),
        })
    token_slots = torch.tensor(adapters, dtype=torch.int32).repeat_interleave(case.seq_len)[:, None].to(device)
    from pllm_kernels.batch import build_lora_meta

    meta = build_lora_meta(token_slots, L)
    scales = torch.tensor([2.0 / r for r in ranks], dtype=torch.float32, device=device)  # alpha / r, alpha = 2
    return Problem(case, h_in, slices, dtype, torch.device(device), adapters, ranks, R,
                   torch.tensor(ranks, dtype=torch.int32, device=device), scales, meta, sets, n_sets)


# ------------------------------------------------------------------------------------------------ backends

def _offsets(sizes):
    offs = [0]
    for n in sizes:
        offs.append(offs[-1] + n)
    return offs


def _triton_ok(P: Problem) -> None:
    # Interpreter timings mean nothing: on CPU the Triton paths run only when asked for explicitly (to exercise the
    # benchmark code itself), with TRITON_INTERPRET=1 and PLLM_BENCH_INTERPRET=1.
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and os.environ.get("PLLM_BENCH_INTERPRET") == "1"
    if P.device.type != "cuda" and not interp:
        raise Skip("needs a CUDA device (or TRITON_INTERPRET=1 PLLM_BENCH_INTERPRET=1); not benchmarked on CPU")
    try:
        import pllm_kernels.triton.lora  # noqa: F401
    except Exception as e:
        raise Skip(f"pllm_kernels.triton.lora does not import: {type(e).__name__}: {e}") from None


def make_backend(name: str, P: Problem):
    """Return ``(fn(set), graph_safe)``: one lora_apply-equivalent call on one input set, or raise Skip."""
    from pllm_kernels.ops import lora_apply

    meta, sizes = P.meta, list(P.slice_sizes)
    c = P.case

    def op_on(backend):
        def op(s):
            lora_apply(s["y"], s["x"], s["a"], s["b"], P.slot_ranks, P.slot_scales, meta, sizes, backend=backend)

        return op

    if name == "torch":
        return op_on("torch"), False
    if name == "triton":
        _triton_ok(P)
        return op_on("triton"), True
    if name.startswith("triton_"):
        _triton_ok(P)
        import inspect

        from pllm_kernels.triton.lora import lora_apply_triton

        if "path" not in inspect.signature(lora_apply_triton).parameters:
            raise Skip("lora_apply_triton has no path= argument")
        path = name.split("_", 1)[1]
        if path == "fused" and c.T > 512:
            raise Skip("fused path is for decode-sized batches (T <= 512)")
        if path == "bgmv" and c.T > 2048:
            raise Skip("bgmv path re-reads weights per token; skipped for T > 2048")

        def fn(s):
            lora_apply_triton(s["y"], s["x"], s["a"], s["b"], P.slot_ranks, P.slot_scales, meta.token_slots,
                              meta.token_weights, meta.sorted_pairs, meta.seg_slot, meta.seg_start, meta.seg_len,
                              tuple(sizes), chunk=meta.chunk, path=path)

        return fn, True
    if name == "cuda":
        # The op itself says whether it can run here (no kernel yet, CPU tensors, extension not built / unusable,
        # unsupported input): one probe call on a copy of y, its RuntimeError is the skip reason.
        op = op_on("cuda")
        probe = {k: (v.clone() if k == "y" else v) for k, v in P.sets[0].items()}
        try:
            op(probe)
        except RuntimeError as e:
            raise Skip(str(e).splitlines()[0][:200] if str(e) else "RuntimeError") from None
        return op, True
    if name == "cuda_tc":
        from pllm_kernels.cuda.lora import lora_apply_cuda, supports

        if c.T * meta.token_slots.shape[1] <= 64:
            raise Skip("the tensor-core SGMV shrink is a prefill path (more than 64 token-slot pairs)")
        why = supports(P.device, P.sets[0]["x"].dtype)
        if why is None and P.sets[0]["x"].dtype not in (torch.float16, torch.bfloat16):
            why = "tensor cores take float16 / bfloat16"
        if why is not None:
            raise Skip(why)

        def fn(s):
            lora_apply_cuda(s["y"], s["x"], s["a"], s["b"], P.slot_ranks, P.slot_scales, meta.token_slots,
                            meta.token_weights, meta.sorted_pairs, meta.seg_slot, meta.seg_start, meta.seg_len, sizes,
                            chunk=meta.chunk, path="sgmv_tc")

        return fn, True

    offs = _offsets(sizes)
    scales = [2.0 / r for r in P.ranks]
    if name == "peft_mixed":
        names = list(P.seq_adapters)  # PEFT: one adapter name per sample
        n_seq = len(names)

        def fn(s):
            x3 = s["x"].view(n_seq, c.seq_len, P.h_in)
            y3 = s["y"].view(n_seq, c.seq_len, P.N)
            for active in set(names):  # PEFT iterates over the unique adapter names
                idx = [i for i, item in enumerate(names) if item == active]
                sub = x3[idx]
                r = P.ranks[active]
                for si in range(P.S):  # one PEFT LoraLayer per module (q/k/v or gate/up are separate modules)
                    a = s["a"][active, si, :r]
                    bb = s["b"][active, offs[si] : offs[si + 1], :r]
                    out = torch.nn.functional.linear(torch.nn.functional.linear(sub, a), bb) * scales[active]
                    y3[idx, :, offs[si] : offs[si + 1]] += out.to(y3.dtype)

        return fn, False
    if name == "peft":
        layers = _peft_layers(P)
        names = [f"a{a}" for a in P.seq_adapters]
        n_seq = len(names)

        def fn(s):
            x3 = s["x"].view(n_seq, c.seq_len, P.h_in)
            for si, layer in enumerate(layers):
                ys = s["y"][:, offs[si] : offs[si + 1]].view(n_seq, c.seq_len, P.slice_sizes[si])
                # The base layer returns y's slice: PEFT's `result[idx] += lora_out` then accumulates into y.
                layer.base_layer.forward = lambda *a, _y=ys, **k: _y
                layer(x3, adapter_names=names)

        return fn, False
    if name == "adapter_loop":
        groups = []
        tok = P.meta.token_slots[:, 0].long()
        for slot in sorted(set(P.seq_adapters)):
            idx = torch.nonzero(tok == slot).flatten()
            groups.append((slot, idx))

        def fn(s):
            x, y = s["x"], s["y"]
            for slot, idx in groups:
                r = P.ranks[slot]
                sub = x.index_select(0, idx)
                v = sub @ s["a"][slot, :, :r].reshape(P.S * r, P.h_in).t()  # all slices' A in one GEMM
                parts = [v[:, si * r : (si + 1) * r] @ s["b"][slot, offs[si] : offs[si + 1], :r].t()
                         for si in range(P.S)]
                delta = parts[0] if P.S == 1 else torch.cat(parts, dim=1)
                y.index_add_(0, idx, delta, alpha=scales[slot])

        return fn, True
    if name == "unfused_torch":
        gathered = c.T * (P.S * P.max_rank * P.h_in + P.N * P.max_rank) * P.sets[0]["x"].element_size()
        cap = (1536 << 20) if P.device.type == "cuda" else (128 << 20)
        if gathered > cap:
            raise Skip(f"per-token gathered weights {gathered / 2**20:.0f} MiB > cap {cap >> 20} MiB")
        slot_t = P.meta.token_slots[:, 0].long()
        coef = (P.slot_scales[slot_t] * P.meta.token_weights[:, 0])[:, None]

        def fn(s):
            a_tok = s["a"][slot_t]  # (T, S, R, h_in)
            v = torch.einsum("th,tsrh->tsr", s["x"], a_tok)
            b_tok = s["b"][slot_t]  # (T, N, R)
            parts = [torch.einsum("tr,tnr->tn", v[:, si], b_tok[:, offs[si] : offs[si + 1]]) for si in range(P.S)]
            delta = parts[0] if P.S == 1 else torch.cat(parts, dim=1)
            s["y"].add_((delta.float() * coef).to(s["y"].dtype))

        return fn, True
    if name == "mm_single":
        if len(set(P.seq_adapters)) != 1:
            raise Skip("single-adapter roofline only for identical-adapter cases")
        r = P.ranks[0]

        def fn(s):
            v = s["x"] @ s["a"][0, :, :r].reshape(P.S * r, P.h_in).t()
            parts = [v[:, si * r : (si + 1) * r] @ s["b"][0, offs[si] : offs[si + 1], :r].t() for si in range(P.S)]
            delta = parts[0] if P.S == 1 else torch.cat(parts, dim=1)
            s["y"].add_(delta, alpha=scales[0])

        return fn, True
    if name == "base_mm":
        w = (torch.randn(P.N, P.h_in, device=P.device) * P.h_in**-0.5).to(P.dtype)

        def fn(s):
            torch.matmul(s["x"], w.t())

        return fn, True
    raise Skip(f"unknown backend {name!r}")


def _peft_layers(P: Problem) -> list:
    """Real PEFT ``lora.Linear`` layers (one per slice, as PEFT wraps q/k/v or gate/up separately) holding the
    adapters of set 0; calling them with ``adapter_names`` runs PEFT's own ``_mixed_batch_forward``."""
    try:
        import peft
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as LoraLinear
    except Exception as e:
        raise Skip(f"peft not importable ({type(e).__name__}: {e})") from None
    offs = _offsets(P.slice_sizes)
    s0 = P.sets[0]
    used = sorted(set(P.seq_adapters))
    if len(used) * P.S > 256:
        raise Skip("more than 256 PEFT adapter layers to build (setup cost); peft_mixed replicates it")
    layers = []
    with torch.no_grad():
        for si, n in enumerate(P.slice_sizes):
            base = torch.nn.Linear(P.h_in, n, bias=False, device=P.device, dtype=P.dtype)
            layer = None
            for slot in used:
                r = P.ranks[slot]
                kw = dict(r=r, lora_alpha=2, init_lora_weights=False)
                try:
                    cfg = LoraConfig(**kw)
                    if layer is None:
                        layer = LoraLinear(base, f"a{slot}", config=cfg, **kw)
                    else:
                        layer.update_layer(f"a{slot}", config=cfg, lora_dropout=0.0, **kw)
                except TypeError:  # older PEFT: no config argument
                    if layer is None:
                        layer = LoraLinear(base, f"a{slot}", **kw)
                    else:
                        layer.update_layer(f"a{slot}", lora_dropout=0.0, **kw)
                layer.lora_A[f"a{slot}"].weight.copy_(s0["a"][slot, si, :r])
                layer.lora_B[f"a{slot}"].weight.copy_(s0["b"][slot, offs[si] : offs[si + 1], :r])
                layer.scaling[f"a{slot}"] = 2.0 / r
            layer.to(device=P.device, dtype=P.dtype)
            layer.requires_grad_(False)
            layer.eval()
            layers.append(layer)
    if not hasattr(layers[0], "_mixed_batch_forward"):
        raise Skip(f"peft {peft.__version__} has no mixed-batch forward")
    return layers


def reference_delta(P: Problem, s: dict) -> torch.Tensor:
    """fp32 delta on one set (per-adapter loop in fp32), for rel_err."""
    offs = _offsets(P.slice_sizes)
    x = s["x"].float()
    delta = torch.zeros(P.case.T, P.N, device=P.device)
    tok = P.meta.token_slots[:, 0].long()
    for slot in sorted(set(P.seq_adapters)):
        idx = torch.nonzero(tok == slot).flatten()
        r = P.ranks[slot]
        for si in range(P.S):
            v = x[idx] @ s["a"][slot, si, :r].float().t()
            d = v @ s["b"][slot, offs[si] : offs[si + 1], :r].float().t()
            delta[idx, offs[si] : offs[si + 1]] += d * (2.0 / r)
    return delta


def _rel_err(name: str, fn, P: Problem, ref: torch.Tensor | None) -> float:
    if ref is None or name == "base_mm":
        return float("nan")
    s = dict(P.sets[0])
    y0 = s["y"].clone()
    s["y"] = y0.clone()
    fn(s)
    d = s["y"].float() - y0.float()
    return float((d - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------ driver
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run_case(P: Problem, backends, roof, *, warmup, rep, log) -> list[dict]:
    rows, skipped = [], []
    ref = reference_delta(P, P.sets[0]) if P.case.T * P.N <= (1 << 28) else None
    req_bytes, flops = P.required_bytes(), P.flops()
    for name in backends:
        try:
            fn, graph_safe = make_backend(name, P)
        except Skip as e:
            skipped.append((name, str(e)))
            continue
        except Exception as e:  # building a backend failed (e.g. a probe raising something else): report, go on
            _sync(P.device)
            skipped.append((name, f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"))
            continue
        try:
            err = _rel_err(name, fn, P, ref)
            # Host-bound baselines (Python loops, host syncs) are not flattered by L2: 4 sets keep them fast.
            sets = P.sets if graph_safe else P.sets[:4]
            res = H.time_fn(fn, warmup=warmup, rep=rep, cuda_graph=graph_safe and P.device.type == "cuda",
                            arg_sets=sets, device=P.device)
        except Exception as e:  # a backend failing must not stop the benchmark
            _sync(P.device)
            skipped.append((name, f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"))
            continue
        ms = res["median_ms"]
        row = {
            "bench": "lora", "case": P.case.name, "backend": name,
            **{k: res[k] for k in ("median_ms", "p20_ms", "p80_ms", "method", "n_sets", "note")},
            "op": "lora_apply", "shape": P.case.shape, "h_in": P.h_in, "h_out": P.N,
            "slices": "+".join(map(str, P.slice_sizes)), "T": P.case.T, "seq_len": P.case.seq_len,
            "rank": P.case.rank, "max_rank": P.max_rank, "dist": P.case.dist,
            "n_adapters": len(set(P.seq_adapters)), "dtype": str(P.dtype).removeprefix("torch."),
            "tags": "+".join(P.case.tags), "kind": "ours" if name in OURS else "baseline",
            "copy_gbps": roof["copy_gbps"], "roof_tflops": roof["bf16_tflops"], "rel_err": err,
        }
        if name == "base_mm":
            fl = 2 * P.case.T * P.h_in * P.N
            row.update(bytes=(P.case.T * (P.h_in + P.N) + P.N * P.h_in) * P.sets[0]["x"].element_size(), flops=fl)
        else:
            row.update(bytes=req_bytes, flops=flops)
        row["gbps"] = H.gbps(row["bytes"], ms)
        row["pct_of_copy_bw"] = 100 * row["gbps"] / roof["copy_gbps"]
        row["tflops"] = H.tflops(row["flops"], ms)
        row["pct_of_matmul"] = 100 * row["tflops"] / roof["bf16_tflops"]
        rows.append(row)
    by = {r["backend"]: r["median_ms"] for r in rows}
    for r in rows:
        if r["backend"] == "base_mm":
            continue
        for b in RATIO_BASELINES:
            if b in by and b != r["backend"]:
                r[f"ratio_vs_{b}"] = by[b] / r["median_ms"]
        if "base_mm" in by:
            r["pct_of_base_mm"] = 100 * r["median_ms"] / by["base_mm"]
    log(_case_line(P, rows, skipped))
    return rows, skipped


def _case_line(P, rows, skipped) -> str:
    parts = [f"{P.case.name:<40} n={len(set(P.seq_adapters)):<4} sets={P.n_sets:<2}"]
    for r in rows:
        extra = f" {r['pct_of_copy_bw']:.0f}%bw" if r["backend"] != "base_mm" else ""
        g = "g" if "graph" in str(r["method"]) else ""
        bad = " ERR" if isinstance(r["rel_err"], float) and r["rel_err"] > 0.05 else ""
        parts.append(f"{r['backend']}={H.fmt_ms(r['median_ms'])}{g}{extra}{bad}")
    return "  ".join(parts)


def target_checks(rows: list[dict], device_kind: str) -> list[dict]:
    """The two GPU targets of the foundation issue, from this run's rows."""
    out = []
    on_gpu = device_kind == "cuda"
    ours = [r for r in rows if r["kind"] == "ours"]
    dec = [r for r in ours if "target_decode" in r["tags"]]
    base_dec = [r for r in rows if "target_decode" in r["tags"] and r["kind"] == "baseline"
                and r["backend"] != "base_mm"]
    check = {"name": "decode distinct T=64, 64 adapters, r=16, h=4096 (q): >= 85% of copy bandwidth"}
    if not on_gpu:
        best_b = max(base_dec, key=lambda r: r["pct_of_copy_bw"], default=None)
        info = f"; best baseline here {best_b['backend']} {best_b['pct_of_copy_bw']:.1f}%" if best_b else ""
        check.update(status="SKIP", detail=f"needs a GPU (CPU smoke shapes){info}")
    elif not dec:
        check.update(status="SKIP", detail="no triton/cuda backend ran for this case")
    else:
        best = max(dec, key=lambda r: r["pct_of_copy_bw"])
        ok = best["pct_of_copy_bw"] >= TARGET_DECODE_PCT
        check.update(status="PASS" if ok else "FAIL", value=best["pct_of_copy_bw"], backend=best["backend"],
                     detail=f"{best['backend']} {H.fmt_ms(best['median_ms'])} {best['gbps']:.0f} GB/s = "
                            f"{best['pct_of_copy_bw']:.1f}% of {best['copy_gbps']:.0f} GB/s copy "
                            f"(bytes {best['bytes'] / 1e6:.1f} MB)")
    out.append(check)

    check = {"name": "prefill T=8192, r=16, distinct per 512-token sequence: LoRA delta <= 10% of base matmul"}
    pre = [r for r in rows if "target_prefill" in r["tags"]]
    shapes = sorted({r["shape"] for r in pre}, key=list(SHAPES).index)
    details, statuses = [], []
    for s in shapes:
        base = [r for r in pre if r["shape"] == s and r["backend"] == "base_mm"]
        mine = [r for r in pre if r["shape"] == s and r["kind"] == "ours"]
        if not base or not mine:
            details.append(f"{s}: no {'base_mm' if not base else 'triton/cuda'} row")
            continue
        best = min(mine, key=lambda r: r["median_ms"])
        pct = 100 * best["median_ms"] / base[0]["median_ms"]
        statuses.append(pct <= TARGET_PREFILL_PCT)
        details.append(f"{s}: {best['backend']} {H.fmt_ms(best['median_ms'])} / base {H.fmt_ms(base[0]['median_ms'])}"
                       f" = {pct:.1f}%")
    if not on_gpu:
        check.update(status="SKIP", detail="needs a GPU (CPU smoke shapes)")
    elif not statuses:
        check.update(status="SKIP", detail="; ".join(details) or "no rows")
    else:
        check.update(status="PASS" if all(statuses) and len(statuses) == len(shapes) else "FAIL",
                     detail="; ".join(details))
    out.append(check)
    return out


def summary_markdown(rows, checks, skipped_all, roof, env, profile, cut) -> str:
    lines = [f"## bench_lora ({profile})", "",
             f"device **{env['device']}**, torch {env['torch']}, triton {env['triton']}, git {env['git_sha']}; "
             f"measured copy {roof['copy_gbps']:.0f} GB/s, {roof['matmul_dtype']} matmul {roof['bf16_tflops']:.3g} "
             "TFLOP/s", "", "### Target checks", ""]
    for c in checks:
        lines.append(f"- **{c['status']}** {c['name']}: {c['detail']}")
    lines += ["", "### Key figures (median; %bw = % of measured copy bandwidth; x = speed-up vs baseline)", "",
              "| case | backend | median | GB/s | %bw | vs torch | vs peft_mixed | vs adapter_loop | %base_mm |",
              "|---|---|---|---|---|---|---|---|---|"]
    key = [r for r in rows if r["tags"] or (r["dist"] == "distinct" and r["T"] in (1, 64, 512))]
    best: dict[str, dict] = {}
    for r in key:
        if r["kind"] == "ours" and (r["case"] not in best or r["median_ms"] < best[r["case"]]["median_ms"]):
            best[r["case"]] = r
    order = list(dict.fromkeys(r["case"] for r in key))
    for case in order:
        pick = best.get(case) or next((r for r in key if r["case"] == case and r["backend"] == "torch"), None)
        if pick is None:
            continue

        def x(k, p=pick):
            v = p.get(k)
            return f"{v:.2f}x" if isinstance(v, float) else "-"

        pb = pick.get("pct_of_base_mm")
        lines.append(f"| {case} | {pick['backend']} | {H.fmt_ms(pick['median_ms'])} | {pick['gbps']:.0f} | "
                     f"{pick['pct_of_copy_bw']:.1f} | {x('ratio_vs_torch')} | {x('ratio_vs_peft_mixed')} | "
                     f"{x('ratio_vs_adapter_loop')} | {f'{pb:.1f}' if isinstance(pb, float) else '-'} |")
    if skipped_all:
        lines += ["", "### Skipped backends", ""]
        for name, why in sorted(skipped_all.items()):
            lines.append(f"- {name}: {why}")
    if cut:
        lines += ["", f"Budget reached: {cut} case(s) not run."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = H.base_parser(__doc__.splitlines()[0])
    p.prog = "python -m pllm_kernels.bench lora"
    p.add_argument("--profile", choices=("smoke", "suite", "full"), default=None,
                   help="case list (default: suite on GPU, smoke on CPU or with --smoke)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
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
    dtype = getattr(torch, args.dtype)
    if not on_gpu and dtype != torch.float32:
        dtype = torch.float32  # CPU bf16 matmuls are emulated and slow; the smoke run checks plumbing, not speed
    warmup = args.warmup_ms if args.warmup_ms is not None else (10 if on_gpu else 2)
    rep = args.rep_ms if args.rep_ms is not None else (50 if on_gpu else 15)
    max_sets = args.max_sets or (32 if on_gpu else 2)
    mem_cap = (3 << 30) if on_gpu else (64 << 20)

    backends = list(ALL_BACKENDS) if args.backend == "all" else [b.strip() for b in args.backend.split(",") if b]
    unknown = [b for b in backends if b not in ALL_BACKENDS]
    if unknown:
        p.error(f"unknown backend(s) {unknown}; choose from {list(ALL_BACKENDS)}")
    cases = cases_for(profile)
    if args.shape != "all":
        want = {s.strip() for s in args.shape.split(",")}
        bad = want - set(SHAPES)
        if bad:
            p.error(f"unknown shape(s) {sorted(bad)}; choose from {list(SHAPES)}")
        cases = [c for c in cases if c.shape in want]
    if args.dry_run:
        for c in cases:
            print(c.name, *c.tags)
        print(f"{len(cases)} cases x backends {backends}")
        return 0

    threads = torch.get_num_threads()
    if not on_gpu and args.threads:
        torch.set_num_threads(args.threads)
    try:  # time the kernels, not the host-side argument value checks; restore env and threads for in-process callers
        with _env(PLLM_CHECK_VALUES=os.environ.get("PLLM_CHECK_VALUES", "0")):
            return _run(args, cases, backends, device, dtype, profile, smoke, warmup, rep, max_sets, mem_cap)
    finally:
        torch.set_num_threads(threads)


def _run(args, cases, backends, device, dtype, profile, smoke, warmup, rep, max_sets, mem_cap) -> int:
    on_gpu = device.type == "cuda"
    env = H.env_info()
    roof = H.measure_roofline(device)
    print(f"[bench_lora] {env['device']} torch {env['torch']} triton {env['triton']} git {env['git_sha']} "
          f"profile={profile} dtype={str(dtype).removeprefix('torch.')}")
    print(f"[bench_lora] roofline: copy {roof['copy_gbps']:.1f} GB/s, {roof['matmul_dtype']} matmul "
          f"{roof['bf16_tflops']:.3g} TFLOP/s; {len(cases)} cases; backends {','.join(backends)}")
    budget = H.Budget(args.budget_s)
    all_rows: list[dict] = []
    skipped_all: dict[str, tuple[str, int]] = {}  # backend -> (first skip reason, cases skipped)
    cut = 0
    n_run = 0
    t0 = time.perf_counter()
    for i, case in enumerate(cases):
        if budget.expired():
            cut = len(cases) - i
            print(f"[bench_lora] budget of {args.budget_s:.0f}s reached: {cut} case(s) not run")
            break
        try:
            P = build_problem(case, smoke=smoke, device=device, dtype=dtype, max_sets=max_sets, mem_cap=mem_cap)
        except torch.OutOfMemoryError as e:
            print(f"{case.name}: out of memory building inputs ({e}); skipped")
            continue
        rows, skipped = run_case(P, backends, roof, warmup=warmup, rep=rep, log=print)
        ran = {r["backend"] for r in rows}
        for name, why in skipped:
            prev = skipped_all.get(name)
            skipped_all[name] = (prev[0] if prev and prev[0] else why, (prev[1] if prev else 0) + 1)
        for name in ran:
            skipped_all.setdefault(name, ("", 0))
        n_run += 1
        all_rows += rows
        del P
        if on_gpu:
            torch.cuda.empty_cache()
        if not args.no_csv and rows:
            H.append_rows(args.csv or "lora.csv", rows)
    skip_lines = {n: f"skipped in {c}/{n_run} cases: {why}" for n, (why, c) in sorted(skipped_all.items()) if c}
    for name, line in skip_lines.items():
        print(f"[bench_lora] {name} {line}")
    checks = target_checks(all_rows, env["device_kind"])
    print("[bench_lora] target checks:")
    for c in checks:
        print(f"  {c['status']}: {c['name']} -- {c['detail']}")
    md = summary_markdown(all_rows, checks, skip_lines, roof, env, profile, cut)
    if not args.no_csv:
        out = H.results_dir()
        (out / "bench_lora_summary.md").write_text(md)
        print(f"[bench_lora] {len(all_rows)} rows -> {out / (args.csv or 'lora.csv')}; "
              f"summary {out / 'bench_lora_summary.md'}")
    print(f"[bench_lora] done in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
