"""Mixed-user generation: tokens/s of ``PersonalizedModel.generate(users=[...])`` against PEFT's mixed batch
(``peft_model.generate(adapter_names=[...])``) and against the same model with one merged adapter.

    python -m pllm_kernels.bench generate                 # CPU: tiny Llama, 8 users (the default without a GPU)
    python -m pllm_kernels.bench generate --gpu           # GPU: ~1.1B Llama-shaped random model, bf16, 8-64 users
    python -m pllm_kernels.bench generate --smoke         # the smallest config, seconds (CI / tests)
    python -m pllm_kernels.bench generate --users 8,32 --new-tokens 64 --backend ours,peft_mixed --out DIR

Every row of the batch belongs to a distinct user with their own random LoRA adapter (ranks alternate 8 / 16,
all attention + MLP projections, random non-zero B), prompts are left padded, decoding is greedy with a fixed
number of new tokens (EOS disabled). Backends: ``ours`` (patched model, one metadata build per forward),
``peft_mixed`` (PEFT's mixed batch on an identical copy), ``merged`` (one adapter merged into the weights:
``merge_and_unload``, the single-adapter ceiling). Figures: ``e2e_tok_s`` = B * new_tokens / generate time;
``decode_tok_s`` = B * (new_tokens - 1) / (time(new_tokens) - time(1)), the decode-only rate. Targets (GPU):
ours >= 5x peft_mixed decode at 32 users, ours within 15 % of merged; (CPU) ours faster than peft_mixed at 8 users.
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

CPU_MODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=1024)
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128)


def _profile(args):
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
    return "ours" if backend == "ours" else "baseline"


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


def adapter_specs(n_users: int) -> dict:
    return {f"user{i}": dict(r=8 if i % 2 == 0 else 16, lora_alpha=16, target_modules="all-linear")
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
    specs = adapter_specs(n_users)
    users = list(specs)
    peft_model, sds = peft_reference(base, specs, seed=1)
    ids, mask = left_padded_batch([prof["prompt"] - (i % 3) for i in range(n_users)], base.config.vocab_size,
                                  seed=2, device=prof["device"])
    c = Contenders(users, ids, mask, peft_model)
    if "merged" in backends:
        merged = copy.deepcopy(peft_model).merge_and_unload(adapter_names=[users[0]]).eval()
        c.gens["merged"] = lambda i, m, kw: merged.generate(input_ids=i, attention_mask=m, **kw)
    if "peft_mixed" in backends:
        c.gens["peft_mixed"] = lambda i, m, kw: peft_model.generate(input_ids=i, attention_mask=m,
                                                                    adapter_names=users, **kw)
    if "ours" in backends:
        pm = patch_model(base, num_slots=n_users, max_rank=16)
        c.pm = pm
        for u in users:
            pm.register_user(u, *sds[u])
        c.gens["ours"] = lambda i, m, kw: pm.generate(i, attention_mask=m, users=users, **kw)
    return c


def compared_rows(backend: str, users: list[str]) -> list[int]:
    """Rows of ``backend``'s output that must equal PEFT's per-user result: all of them, except for ``merged``
    (one adapter merged for everyone), whose rows of the merged user only."""
    return [0] if backend == "merged" else list(range(len(users)))


def tokens_eq(out: torch.Tensor, ref: torch.Tensor, rows: list[int]) -> float:
    """Fraction of ``rows`` whose generated ids in ``out`` equal ``ref``'s."""
    if out.shape != ref.shape:
        return 0.0
    same = (out[rows] == ref[rows]).all(dim=1)
    return float(same.float().mean())


def run_case(prof, n_users: int, backends, verbose=True) -> list[dict]:
    """Build the three contenders on identical weights, check their tokens against PEFT's mixed batch, then time
    them interleaved (best of ``reps`` rounds: robust to a noisy shared machine)."""
    device = prof["device"]
    c = build_contenders(prof, n_users, backends)
    gens, ids, mask, users = c.gens, c.ids, c.mask, c.users
    B = n_users
    new = prof["new"]
    best = {name: [float("inf"), float("inf")] for name in gens}
    failed = {}  # a backend that raises is reported in its row and dropped; the others are still measured

    def attempt(name, fn):
        try:
            fn()
        except Exception as e:
            traceback.print_exc()
            failed[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            gens.pop(name)
            best.pop(name)
            _sync_quietly(device)

    def time_backend(name, gen):
        best[name][0] = min(best[name][0], _time_once(gen, ids, mask, new, device))
        best[name][1] = min(best[name][1], _time_once(gen, ids, mask, 1, device))

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
            for _ in range(prof["reps"]):
                for name, gen in list(gens.items()):
                    attempt(name, lambda name=name, gen=gen: time_backend(name, gen))
    finally:
        if old is None:
            os.environ.pop("PLLM_CHECK_VALUES", None)
        else:
            os.environ["PLLM_CHECK_VALUES"] = old
        c.close()
    agree = {}
    if "peft_mixed" in outs:
        for name, out in outs.items():
            if name != "peft_mixed":
                agree[name] = tokens_eq(out, outs["peft_mixed"], compared_rows(name, users))
    if verbose and agree:
        print("  tokens == peft_mixed: " + ", ".join(f"{n} {v:.0%} of rows" for n, v in agree.items()))
    if agree.get("ours", 1.0) < 1.0 and prof["dtype"] == torch.float32:
        failed_check = f"tokens differ from peft_mixed in {1 - agree['ours']:.0%} of rows (float32: must be equal)"
        print(f"  ours: {failed_check}", file=sys.stderr)
    else:
        failed_check = ""
    results = {}
    for name, (t_full, t_one) in best.items():
        dec = B * (new - 1) / (t_full - t_one) if t_full > t_one else float("nan")
        results[name] = dict(e2e=B * new / t_full, decode=dec, ms=t_full * 1e3)
        if verbose:
            print(f"  {name:<11} users={n_users:<3} e2e {B * new / t_full:10.1f} tok/s   decode {dec:10.1f} tok/s")
    rows = []
    for name, r in results.items():
        row = dict(bench="generate", case=f"users={n_users}", backend=name, kind=_kind(name), users=n_users, batch=B,
                   prompt=prof["prompt"], new_tokens=new, median_ms=r["ms"], method="perf_counter(best of reps)",
                   e2e_tok_s=r["e2e"], decode_tok_s=r["decode"])
        if name in agree:
            row.update(tokens_eq_peft=agree[name], rows_compared=len(compared_rows(name, users)))
        if name == "ours" and failed_check:
            row["note"] = f"error: {failed_check}"
        for other in ("peft_mixed", "merged"):
            if other in results and other != name:
                row[f"ratio_vs_{other}"] = r["decode"] / results[other]["decode"]
        rows.append(row)
    for name, note in failed.items():
        rows.append(dict(bench="generate", case=f"users={n_users}", backend=name, kind=_kind(name), users=n_users,
                         batch=B, prompt=prof["prompt"], new_tokens=new, note=note))
    return rows


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
    args = p.parse_args(argv)
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
    backends = BACKENDS if args.backend == "all" else tuple(b.strip() for b in args.backend.split(","))
    if args.dry_run:
        for u in prof["users"]:
            print(f"users={u}: {', '.join(backends)}")
        return 0
    threads = torch.get_num_threads()
    want = args.threads or (1 if args.smoke and not prof["gpu"] else None)
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
          f"peft {env['peft']}, sha {env['git_sha']})")
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
