"""Mixed-user generation: tokens/s of ``PersonalizedModel.generate(users=[...])`` against PEFT's mixed batch
(``peft_model.generate(adapter_names=[...])``) and against the same model with one merged adapter.

    python -m pllm_kernels.bench generate                 # CPU: tiny Llama, 8 users (the default without a GPU)
    python -m pllm_kernels.bench generate --gpu           # GPU: ~1.1B Llama-shaped random model, bf16, 8-64 users
    python -m pllm_kernels.bench generate --smoke         # the smallest config, seconds (CI / tests)
    python -m pllm_kernels.bench generate --profile cpu-issue   # the issue's CPU comparison, all six contenders
    python -m pllm_kernels.bench generate --users 8,32 --new-tokens 64 --backend ours,peft_mixed --out DIR

Every row of the batch belongs to a distinct user with their own random LoRA adapter (ranks alternate 8 / 16,
all attention + MLP projections, random non-zero B), prompts are left padded, decoding is greedy with a fixed
number of new tokens (EOS disabled). Backends: ``ours`` (patched model, one metadata build per forward),
``peft_mixed`` (PEFT's mixed batch on an identical copy), ``merged`` (one adapter merged into the weights:
``merge_and_unload``, the single-adapter ceiling); extra contenders (``--backend all-extra``, and the
``cpu-issue`` profile): ``peft_one`` (PEFT with one active adapter, ``set_adapter``, for every row), ``base`` (the
model without adapters, never patched; when ours is built too, on the patched model's very weight tensors, so
that ``ours_none / base`` measures our overhead, not the placement of a second copy), ``ours_none`` (ours with
``users=[None] * B``: every row without a user; its tokens must equal ``base``'s exactly in float32),
``ours_static`` (ours with ``generate(..., decode="static")``: our own decode loop over a static cache instead of
HF's ``generate``; informative only, the targets compare ``ours``, which runs HF's loop like every baseline) and
``merged_reads`` (the merged model plus one read of every user's adapter bytes in each linear layer's call: the
memory-traffic floor of a mixed batch; ``merged_reads / merged`` bounds ``ours / merged`` from above).
Figures: ``e2e_tok_s`` = B * new_tokens / generate time; ``decode_tok_s`` = B * (new_tokens - 1) /
(time(new_tokens) - time(1)), the decode-only rate (medians: the median of the per-round differences). Targets (GPU):
ours >= 5x peft_mixed decode at 32 users, ours within 15 % of merged; (CPU) ours faster than peft_mixed at 8 users.
Profile ``cpu-issue`` ("Decode at serving speed"): Llama-shaped random model (hidden 512, MLP 1536, 4 layers, 8 heads
/ 4 KV heads, vocab 8192), 8 users with rank-16 LoRA (alpha 32) on all linear layers, batch 8 (one user per row),
64-token prompts, 32 greedy tokens, 2 threads, every contender in one process, round-robin within each round (the
order rotates per round), medians of ``--rounds`` (default 9, at least 3) rounds; it prints and writes the ratios
ours / peft_mixed (target >= 2.0), ours / merged (>= 0.85) and ours_none / base (>= 0.98) of the median decode
tok/s (``ratio_vs_X``) and the median of the per-round ratios (``paired_ratio_vs_X``: each round runs the
contenders back to back, so the machine's drift between rounds cancels; PASS / FAIL is judged on it), with
``target_vs_X``, ``pass_vs_X``, ``e2e_ratio_vs_X`` on the numerator's row. A missed
target is reported, not an error: the exit code stays 0.
Our per-layer value checks are off (``PLLM_CHECK_VALUES=0``): the store validates adapters at registration.
Correctness is checked in the same run: the first ``new_tokens`` generation of each backend (also its warm-up) is
compared with PEFT's mixed batch, token for token; ``tokens_eq_peft`` is the fraction of compared rows that are
identical (ours: every row; merged: the rows of the merged user). In float32 (the CPU profiles) greedy decoding on
identical weights must agree exactly, so a mismatch of ours there is an error (exit code 1); in bf16 it is reported.
A backend that raises gets a row with the error in ``note`` while the others are still measured (exit code 1);
with ``--budget-s``, a case is skipped when the last case's time, scaled by users, no longer fits.
Rows go to ``bench_generate.csv`` in ``--out DIR`` (default ``./pllm_bench_results``, smoke runs
``./pllm_bench_results/smoke``); needs transformers and peft (``pip install pllm-kernels[hf]``).
"""

from __future__ import annotations

import copy
import gc
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pllm_kernels.bench import harness as H

CSV = "bench_generate.csv"
BACKENDS = ("ours", "peft_mixed", "merged")
EXTRA_BACKENDS = ("peft_one", "base", "ours_none", "ours_static", "merged_reads")
ALL_BACKENDS = BACKENDS + EXTRA_BACKENDS
# the issue's CPU targets: (numerator, denominator) -> minimum ratio of median decode tok/s
ISSUE_TARGETS = {("ours", "peft_mixed"): 2.0, ("ours", "merged"): 0.85, ("ours_none", "base"): 0.98}

CPU_MODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=1024)
ISSUE_MODEL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=8192)
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128)


def _profile(args):
    if getattr(args, "profile", None) == "cpu-issue":
        return dict(model=ISSUE_MODEL, users=[8], prompt=64, jitter=1, new=32, reps=9, dtype=torch.float32,
                    device="cpu", gpu=False, rank=16, alpha=32, threads=2, stat="median", backends=ALL_BACKENDS,
                    targets=ISSUE_TARGETS, roofline=True)
    if args.smoke:
        return dict(model=SMOKE_MODEL, users=[4], prompt=8, new=8, reps=3, dtype=torch.float32, device="cpu",
                    gpu=False)
    if args.gpu:  # 32 first: the target case is measured even if the budget runs out
        return dict(model=None, users=[32, 8, 64, 16], prompt=64, new=32, reps=2, dtype=torch.bfloat16,
                    device="cuda", gpu=True)
    return dict(model=CPU_MODEL, users=[8], prompt=16, new=32, reps=5, dtype=torch.float32, device="cpu", gpu=False)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _sync_quietly(device):
    try:
        _sync(device)
    except Exception:  # a sticky CUDA error: the next case reports it
        pass


def _kind(backend: str) -> str:
    """``kind`` column: the plot table picks its "best" among our backends, not the baselines."""
    return "ours" if backend in ("ours", "ours_static") else "baseline"


def build_base(prof, seed=0):
    from pllm_kernels.testing import llama_1b_config, tiny_model

    if prof["gpu"]:
        import transformers as tf

        cfg = llama_1b_config()
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        with torch.device(prof["device"]):
            model = tf.LlamaForCausalLM(cfg).to(prof["dtype"])
        return model.eval()
    return tiny_model("llama", seed=seed, dtype=prof["dtype"], device=prof["device"], **prof["model"])


def adapter_specs(n_users: int, rank: int | None = None, alpha: int | None = None) -> dict:
    """One LoRA per user on every linear layer: ranks alternate 8 / 16 (alpha 16) unless ``rank`` / ``alpha``."""
    return {f"user{i}": dict(r=rank or (8 if i % 2 == 0 else 16), lora_alpha=alpha or 16, target_modules="all-linear")
            for i in range(n_users)}


def _gen_kwargs(new_tokens):
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                eos_token_id=None)


def _time_once(gen, ids, mask, new_tokens, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    out = gen(ids, mask, _gen_kwargs(new_tokens))
    _sync(device)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - t0


@dataclass
class Contenders:
    """The backends of one case on identical weights and inputs: ``gens[name](ids, mask, gen_kwargs)`` returns
    the generated ids ``(B, prompt + new)``. ``peft_model`` is PEFT's model holding every user's adapter."""

    users: list[str]
    ids: torch.Tensor
    mask: torch.Tensor
    peft_model: object
    gens: dict[str, Callable] = field(default_factory=dict)
    pm: object = None
    base_bytes: int = 0  # weights a decode step reads (every parameter but the input embedding)
    adapter_bytes: int = 0  # every user's LoRA weights (all read by a step of the mixed batch)

    def close(self) -> None:
        if self.pm is not None:
            self.pm.unpatch()
            self.pm = None


def build_contenders(prof, n_users: int, backends) -> Contenders:
    """One random adapter per user, PEFT's model over a copy of the base, the merged copy (first user's adapter) and
    our patched base, each registered with the same adapters; left-padded prompts of slightly different lengths."""
    from pllm_kernels.hf import patch_model
    from pllm_kernels.testing import left_padded_batch, peft_reference

    base = build_base(prof)
    specs = adapter_specs(n_users, prof.get("rank"), prof.get("alpha"))
    users = list(specs)
    peft_model, sds = peft_reference(base, specs, seed=1)
    jitter = prof.get("jitter", 3)  # prompt lengths prompt - (row % jitter): 1 = all the same length, no padding
    ids, mask = left_padded_batch([prof["prompt"] - (i % jitter) for i in range(n_users)], base.config.vocab_size,
                                  seed=2, device=prof["device"])
    c = Contenders(users, ids, mask, peft_model)
    c.base_bytes = sum(p.numel() * p.element_size() for n, p in base.named_parameters() if "embed_tokens" not in n)
    c.adapter_bytes = sum(t.numel() * t.element_size() for u in users for k, t in sds[u][0].items()
                          if "lora_" in k)
    if "peft_one" in backends:  # one active adapter for every row (peft_mixed passes adapter_names, unaffected)
        peft_model.set_adapter(users[0])
        c.gens["peft_one"] = lambda i, m, kw: peft_model.generate(input_ids=i, attention_mask=m, **kw)
    if "merged" in backends or "merged_reads" in backends:
        merged = copy.deepcopy(peft_model).merge_and_unload(adapter_names=[users[0]]).eval()
        if "merged" in backends:
            c.gens["merged"] = lambda i, m, kw: merged.generate(input_ids=i, attention_mask=m, **kw)
        if "merged_reads" in backends:
            c.gens["merged_reads"] = _with_adapter_reads(merged, specs, prof)
    if "peft_mixed" in backends:
        c.gens["peft_mixed"] = lambda i, m, kw: peft_model.generate(input_ids=i, attention_mask=m,
                                                                    adapter_names=users, **kw)
    if "ours" in backends or "ours_none" in backends or "ours_static" in backends:
        pm = patch_model(base, num_slots=n_users, max_rank=max(s["r"] for s in specs.values()))
        c.pm = pm
        for u in users:
            pm.register_user(u, *sds[u])
        nobody = [None] * len(users)
        if "ours" in backends:
            c.gens["ours"] = lambda i, m, kw: pm.generate(i, attention_mask=m, users=users, **kw)
        if "ours_none" in backends:
            c.gens["ours_none"] = lambda i, m, kw: pm.generate(i, attention_mask=m, users=nobody, **kw)
        if "ours_static" in backends:
            def static(i, m, kw):  # no EOS here, so min_new_tokens (not served by the static loop) is moot
                kw = {k: v for k, v in kw.items() if k != "min_new_tokens"}
                return pm.generate(i, attention_mask=m, users=users, decode="static", **kw)

            c.gens["ours_static"] = static
    if "base" in backends:  # never patched; on the patched model's very weight tensors when there is one
        plain = build_base(prof)
        if c.pm is not None:  # same memory: the ratio to ours_none is our overhead, not the allocator's placement
            plain.load_state_dict(c.pm.model.state_dict(keep_vars=True), assign=True)
        c.gens["base"] = lambda i, m, kw: plain.generate(input_ids=i, attention_mask=m, **kw)
    return c


def _with_adapter_reads(model, specs: dict, prof):
    """``generate`` of ``model`` (the merged one) plus, in every call of each of its linear layers but the LM head,
    one read (``sum``) of a buffer as large as every user's adapter at that layer (``sum_u r_u * (in + out)``
    elements: the bytes a mixed batch must read on top of the base weights): the memory-traffic floor of any
    mixed-batch implementation, without its math. Hooks are attached for the call only."""
    ranks = sum(s["r"] for s in specs.values())
    dtype, device = prof["dtype"], prof["device"]
    layers = [(mod, torch.rand(ranks * (mod.in_features + mod.out_features), dtype=dtype, device=device))
              for name, mod in model.named_modules()
              if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head")]

    def gen(i, m, kw):
        hooks = [mod.register_forward_hook(lambda _m, _a, _o, buf=buf: (buf.sum(), None)[1]) for mod, buf in layers]
        try:
            return model.generate(input_ids=i, attention_mask=m, **kw)
        finally:
            for h in hooks:
                h.remove()

    gen.read_bytes = sum(buf.numel() * buf.element_size() for _, buf in layers)
    return gen


def compared_rows(backend: str, users: list[str]) -> list[int]:
    """Rows of ``backend``'s output that must equal PEFT's per-user result: all of them, except for ``merged`` and
    ``peft_one`` (one adapter for everyone), whose rows of that user only. (``ours_none`` is compared with ``base``,
    every row.)"""
    return [0] if backend in ("merged", "merged_reads", "peft_one") else list(range(len(users)))


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def tokens_eq(out: torch.Tensor, ref: torch.Tensor, rows: list[int]) -> float:
    """Fraction of ``rows`` whose generated ids in ``out`` equal ``ref``'s."""
    if out.shape != ref.shape:
        return 0.0
    same = (out[rows] == ref[rows]).all(dim=1)
    return float(same.float().mean())


def run_case(prof, n_users: int, backends, verbose=True) -> list[dict]:
    """Build the contenders on identical weights, check their tokens (against PEFT's mixed batch; ``ours_none``
    against ``base``), then time them round-robin within each of ``reps`` rounds, the order rotating per round.
    ``prof["stat"]``: ``best`` (min of the rounds: robust to a noisy shared machine, the default) or ``median``."""
    device = prof["device"]
    c = build_contenders(prof, n_users, backends)
    gens, ids, mask, users = c.gens, c.ids, c.mask, c.users
    B = n_users
    new = prof["new"]
    stat = prof.get("stat", "best")
    times = {name: [] for name in gens}  # per round: (time of new tokens, time of 1 token)
    failed = {}  # a backend that raises is reported in its row and dropped; the others are still measured

    def attempt(name, fn):
        try:
            fn()
        except Exception as e:
            traceback.print_exc()
            failed[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            gens.pop(name)
            times.pop(name)
            _sync_quietly(device)

    def time_backend(name, gen):
        times[name].append((_time_once(gen, ids, mask, new, device), _time_once(gen, ids, mask, 1, device)))

    outs = {}

    def check(name, gen):  # the warm-up: one full generation, kept for the token check
        out = gen(ids, mask, _gen_kwargs(new))
        assert out.shape[1] == ids.shape[1] + new, tuple(out.shape)
        outs[name] = out

    old = os.environ.get("PLLM_CHECK_VALUES")
    os.environ["PLLM_CHECK_VALUES"] = "0"
    try:
        with torch.no_grad():
            for name, gen in list(gens.items()):
                attempt(name, lambda name=name, gen=gen: check(name, gen))
            for r in range(prof["reps"]):
                names = list(gens)
                k = r % len(names) if names else 0
                for name in names[k:] + names[:k]:  # round-robin, the first contender rotating
                    if name in gens:
                        attempt(name, lambda name=name, gen=gens[name]: time_backend(name, gen))
    finally:
        if old is None:
            os.environ.pop("PLLM_CHECK_VALUES", None)
        else:
            os.environ["PLLM_CHECK_VALUES"] = old
        c.close()
    agree = {}
    if "peft_mixed" in outs:
        for name, out in outs.items():
            if name not in ("peft_mixed", "base", "ours_none"):
                agree[name] = tokens_eq(out, outs["peft_mixed"], compared_rows(name, users))
    agree_base = {}
    if "base" in outs and "ours_none" in outs:
        agree_base["ours_none"] = tokens_eq(outs["ours_none"], outs["base"], list(range(B)))
    if verbose and agree:
        print("  tokens == peft_mixed: " + ", ".join(f"{n} {v:.0%} of rows" for n, v in agree.items()))
    if verbose and agree_base:
        print(f"  tokens == base: ours_none {agree_base['ours_none']:.0%} of rows")
    failed_check = {}
    if prof["dtype"] == torch.float32:
        for name in ("ours", "ours_static"):
            if agree.get(name, 1.0) < 1.0:
                failed_check[name] = (f"tokens differ from peft_mixed in {1 - agree[name]:.0%} of rows "
                                      "(float32: must be equal)")
        if agree_base.get("ours_none", 1.0) < 1.0:
            failed_check["ours_none"] = (f"tokens differ from base in {1 - agree_base['ours_none']:.0%} of rows "
                                         "(float32: must be equal)")
    for name, msg in failed_check.items():
        print(f"  {name}: {msg}", file=sys.stderr)
    results = {}
    for name, ts in times.items():
        if stat == "median":
            t_full = _median([t for t, _ in ts])
            t_dec = _median([t - t1 for t, t1 in ts])  # paired within a round
        else:
            t_full = min(t for t, _ in ts)
            t_dec = t_full - min(t1 for _, t1 in ts)
        dec = B * (new - 1) / t_dec if t_dec > 0 else float("nan")
        results[name] = dict(e2e=B * new / t_full, decode=dec, ms=t_full * 1e3)
        if verbose:
            print(f"  {name:<11} users={n_users:<3} e2e {B * new / t_full:10.1f} tok/s   decode {dec:10.1f} tok/s")
    method = (f"perf_counter(median of {prof['reps']} rounds, round-robin)" if stat == "median"
              else "perf_counter(best of reps)")
    targets = prof.get("targets") or {}
    bound = None
    if prof.get("roofline") and "merged" in results and c.adapter_bytes:
        # A mixed batch must read every user's adapter on top of the base weights: with the step memory-bound at
        # the measured copy bandwidth, ours / merged <= t_merged / (t_merged + adapter bytes / bandwidth).
        roof = H.measure_roofline(device)
        t_merged = B / results["merged"]["decode"]
        t_adapters = c.adapter_bytes / (roof["copy_gbps"] * 1e9)
        bound = t_merged / (t_merged + t_adapters)
        if verbose:
            print(f"  roofline: adapters {c.adapter_bytes / 2**20:.1f} MiB per step = "
                  f"{c.adapter_bytes / c.base_bytes:.0%} of the base weights ({c.base_bytes / 2**20:.1f} MiB); "
                  f"copy bandwidth {roof['copy_gbps']:.1f} GB/s "
                  f"-> {t_adapters * 1e3:.2f} ms per step at best; merged step {t_merged * 1e3:.2f} ms; "
                  f"ours / merged <= {bound:.2f} when memory-bound")
    floor = None
    if "merged_reads" in results and "merged" in results:
        floor = results["merged_reads"]["decode"] / results["merged"]["decode"]
        if verbose:
            read = getattr(gens.get("merged_reads"), "read_bytes", 0) or c.adapter_bytes
            print(f"  memory floor: merged_reads / merged decode = {floor:.2f} (merged + one read of every user's "
                  f"adapter bytes per layer, {read / 2**20:.1f} MiB per step, no math): a mixed batch reads at "
                  f"least that much, so ours / merged stays below it")
    rows = []
    for name, r in results.items():
        row = dict(bench="generate", case=f"users={n_users}", backend=name, kind=_kind(name), users=n_users, batch=B,
                   prompt=prof["prompt"], new_tokens=new, median_ms=r["ms"], method=method,
                   e2e_tok_s=r["e2e"], decode_tok_s=r["decode"], rounds=len(times[name]))
        if name in agree:
            row.update(tokens_eq_peft=agree[name], rows_compared=len(compared_rows(name, users)))
        if name in agree_base:
            row.update(tokens_eq_base=agree_base[name], rows_compared=B)
        if name in failed_check:
            row["note"] = f"error: {failed_check[name]}"
        for other in ("peft_mixed", "merged", "base"):
            if other in results and other != name:
                row[f"ratio_vs_{other}"] = r["decode"] / results[other]["decode"]
        if bound is not None and name == "ours":
            row.update(bandwidth_bound_vs_merged=bound, adapter_bytes=c.adapter_bytes, base_bytes=c.base_bytes)
        if floor is not None and name == "ours":
            row.update(memory_floor_vs_merged=floor)
        for (num, den), target in targets.items():
            if num == name and den in results:
                row[f"e2e_ratio_vs_{den}"] = r["e2e"] / results[den]["e2e"]
                row[f"target_vs_{den}"] = target
                paired = paired_ratio(times[name], times[den]) if stat == "median" else None
                if paired is not None:
                    row[f"paired_ratio_vs_{den}"] = paired
                row[f"pass_vs_{den}"] = bool((row[f"ratio_vs_{den}"] if paired is None else paired) >= target)
        rows.append(row)
    for name, note in failed.items():
        rows.append(dict(bench="generate", case=f"users={n_users}", backend=name, kind=_kind(name), users=n_users,
                         batch=B, prompt=prof["prompt"], new_tokens=new, note=note))
    return rows


def paired_ratio(num_times, den_times) -> float | None:
    """Median over the rounds of ``decode tok/s of num / decode tok/s of den`` within each round (the contenders of a
    round run back to back, so a drift of the machine's speed between rounds cancels); rounds whose time difference
    is not positive are skipped. ``None`` without a usable round."""
    ratios = []
    for (tn, tn1), (td, td1) in zip(num_times, den_times):
        if tn - tn1 > 0 and td - td1 > 0:
            ratios.append((td - td1) / (tn - tn1))
    return _median(ratios) if ratios else None


def target_lines(rows) -> list[str]:
    """``ours / peft_mixed decode = 2.31x (target >= 2.0): PASS`` per target of the rows (``pass_vs_X`` columns)."""
    out = []
    for row in rows:
        for key in row:
            if key.startswith("pass_vs_"):
                den = key[len("pass_vs_"):]
                paired = row.get(f"paired_ratio_vs_{den}")
                paired = "" if paired in (None, "") else f"median of per-round ratios {float(paired):.2f}x, "
                out.append(f"{row['backend']} / {den} decode = {row[f'ratio_vs_{den}']:.2f}x "
                           f"({paired}e2e {row[f'e2e_ratio_vs_{den}']:.2f}x; target >= {row[f'target_vs_{den}']}): "
                           f"{'PASS' if row[key] else 'FAIL'}")
    return out


def main(argv=None) -> int:
    p = H.base_parser(__doc__.splitlines()[0])
    p.prog = "python -m pllm_kernels.bench generate"
    p.add_argument("--gpu", action="store_true", help="~1.1B Llama-shaped bf16 model on CUDA, 8-64 users")
    p.add_argument("--users", default=None, help="comma list of distinct-user counts (one row per user)")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for --smoke, whose timings only check the plumbing and must "
                        "not collapse on a busy shared machine; else torch's default)")
    p.add_argument("--cpu", action="store_true", help="the CPU profile even where a GPU is present")
    p.add_argument("--profile", choices=("smoke", "cpu", "gpu", "cpu-issue"), default=None,
                   help="smoke / cpu / gpu = --smoke / --cpu / --gpu; cpu-issue: the issue's CPU comparison (six "
                        "contenders, hidden 512, 8 users rank 16, 64 + 32 tokens, 2 threads, medians of rounds)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (cpu-issue: medians, at least 3)")
    args = p.parse_args(argv)
    if args.profile in ("smoke", "gpu", "cpu"):
        setattr(args, args.profile, True)
    elif args.profile == "cpu-issue":
        args.cpu = True
    if args.smoke and not args.out and not os.environ.get("PLLM_BENCH_OUT"):
        args.out = str(H.default_out("smoke"))  # smoke rows never pollute the results of real runs
    H.apply_out(args)
    if args.gpu and not torch.cuda.is_available():
        print("--gpu needs CUDA", file=sys.stderr)
        return 2
    if torch.cuda.is_available() and not args.smoke and not args.cpu:
        args.gpu = True  # on a GPU machine the GPU profile is the default (the GPU suite calls us without flags)
    prof = _profile(args)
    if args.users:
        prof["users"] = [int(u) for u in args.users.split(",")]
    if args.new_tokens:
        prof["new"] = args.new_tokens
    if args.rounds:
        if prof.get("stat") == "median" and args.rounds < 3:
            print("--rounds: medians need at least 3 rounds", file=sys.stderr)
            return 2
        prof["reps"] = args.rounds
    if args.backend == "all":
        backends = prof.get("backends", BACKENDS)
    elif args.backend == "all-extra":
        backends = ALL_BACKENDS
    else:
        backends = tuple(b.strip() for b in args.backend.split(","))
    unknown = [b for b in backends if b not in ALL_BACKENDS]
    if unknown:
        print(f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(ALL_BACKENDS)}", file=sys.stderr)
        return 2
    if args.dry_run:
        for u in prof["users"]:
            print(f"users={u}: {', '.join(backends)}")
        return 0
    threads = torch.get_num_threads()
    want = args.threads or prof.get("threads") or (1 if args.smoke and not prof["gpu"] else None)
    if want:
        torch.set_num_threads(want)
    try:  # restore the thread count for in-process callers
        return _run(args, prof, backends)
    finally:
        torch.set_num_threads(threads)


def _run(args, prof, backends) -> int:
    budget = H.Budget(args.budget_s)
    env = H.env_info()
    print(f"bench_generate on {env['device']} (torch {env['torch']}, transformers {env['transformers']}, "
          f"peft {env['peft']}, sha {env['git_sha']}); {torch.get_num_threads()} threads, rounds {prof['reps']} "
          f"({prof.get('stat', 'best')}), backends {','.join(backends)}")
    all_rows = []
    errors = 0
    last = None  # (users, seconds) of the last case: a case's time grows about linearly with its users
    for u in prof["users"]:
        need = last[1] * u / last[0] if last else 0.0
        if budget.expired() or need > budget.left():
            print(f"budget: {max(budget.left(), 0):.0f}s left, users={u} needs ~{need:.0f}s; skipping it")
            continue
        t0 = time.perf_counter()
        try:
            rows = run_case(prof, u, backends)
        except Exception:  # building the contenders failed: report it, try the next case
            traceback.print_exc()
            errors += 1
            rows = []
        last = (u, time.perf_counter() - t0)
        errors += sum(str(r.get("note", "")).startswith("error") for r in rows)
        all_rows += rows
        if not args.no_csv and rows:  # per case: a run cut short by a timeout keeps what it measured
            path = H.append_rows(args.csv or CSV, rows)
        by = {r["backend"]: r for r in rows}
        if "ratio_vs_peft_mixed" in by.get("ours", {}):
            print(f"  users={u}: ours / peft_mixed decode = {by['ours']['ratio_vs_peft_mixed']:.2f}x")
        if "ratio_vs_merged" in by.get("ours", {}):
            print(f"  users={u}: ours / merged decode = {by['ours']['ratio_vs_merged']:.2f}")
        for line in target_lines(rows):
            print(f"  users={u}: {line}")
        if prof["gpu"]:
            gc.collect()  # models and PEFT wrappers hold reference cycles: free them before the next, larger case
            torch.cuda.empty_cache()
    if not args.no_csv and all_rows:
        print(f"wrote {len(all_rows)} rows to {path}")
    if errors:
        print(f"bench_generate: {errors} failure(s), see the tracebacks above", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
