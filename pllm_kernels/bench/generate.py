"""Mixed-user generation: tokens/s of ``PersonalizedModel.generate(users=[...])`` against PEFT's mixed batch
(``peft_model.generate(adapter_names=[...])``) and against the same model with one merged adapter.

    python -m benchmarks.bench_generate                 # CPU: tiny Llama, 8 users (the default without a GPU)
    python -m benchmarks.bench_generate --gpu           # GPU: ~1.1B Llama-shaped random model, bf16, 8-64 users
    python -m benchmarks.bench_generate --smoke         # the smallest config, seconds (CI / tests)
    python -m benchmarks.bench_generate --users 8,32 --new-tokens 64 --backend ours,peft_mixed

Every row of the batch belongs to a distinct user with their own random LoRA adapter (ranks alternate 8 / 16,
all attention + MLP projections, random non-zero B), prompts are left padded, decoding is greedy with a fixed
number of new tokens (EOS disabled). Backends: ``ours`` (patched model, one metadata build per forward),
``peft_mixed`` (PEFT's mixed batch on an identical copy), ``merged`` (one adapter merged into the weights:
``merge_and_unload``, the single-adapter ceiling). Figures: ``e2e_tok_s`` = B * new_tokens / generate time;
``decode_tok_s`` = B * (new_tokens - 1) / (time(new_tokens) - time(1)), the decode-only rate. Targets (GPU):
ours >= 5x peft_mixed decode at 32 users, ours within 15 % of merged; (CPU) ours faster than peft_mixed at 8 users.
Our per-layer value checks are off (``PLLM_CHECK_VALUES=0``): the store validates adapters at registration.
A backend that raises gets a row with the error in ``note`` while the others are still measured (exit code 1);
with ``--budget-s``, a case is skipped when the last case's time, scaled by users, no longer fits.
"""

from __future__ import annotations

import copy
import gc
import os
import sys
import time
import traceback

import torch

from benchmarks import _harness as H

CSV = "bench_generate.csv"
BACKENDS = ("ours", "peft_mixed", "merged")

CPU_MODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=1024)
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128)


def _profile(args):
    if args.smoke:
        return dict(model=SMOKE_MODEL, users=[4], prompt=8, new=4, reps=1, dtype=torch.float32, device="cpu",
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


def run_case(prof, n_users: int, backends, verbose=True) -> list[dict]:
    """Build the three contenders on identical weights, then time them interleaved (best of ``reps`` rounds:
    robust to a noisy shared machine)."""
    from pllm_kernels.hf import patch_model
    from pllm_kernels.testing import left_padded_batch, peft_reference

    device = prof["device"]
    base = build_base(prof)
    specs = adapter_specs(n_users)
    users = list(specs)
    B = n_users
    peft_model, sds = peft_reference(base, specs, seed=1)
    ids, mask = left_padded_batch([prof["prompt"] - (i % 3) for i in range(B)], base.config.vocab_size, seed=2,
                                  device=device)
    gens = {}
    pm = None
    if "merged" in backends:
        merged = copy.deepcopy(peft_model).merge_and_unload(adapter_names=[users[0]]).eval()
        gens["merged"] = lambda i, m, kw: merged.generate(input_ids=i, attention_mask=m, **kw)
    if "peft_mixed" in backends:
        gens["peft_mixed"] = lambda i, m, kw: peft_model.generate(input_ids=i, attention_mask=m,
                                                                  adapter_names=users, **kw)
    if "ours" in backends:
        pm = patch_model(base, num_slots=n_users, max_rank=16)
        for u in users:
            pm.register_user(u, *sds[u])
        gens["ours"] = lambda i, m, kw: pm.generate(i, attention_mask=m, users=users, **kw)
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

    old = os.environ.get("PLLM_CHECK_VALUES")
    os.environ["PLLM_CHECK_VALUES"] = "0"
    try:
        with torch.no_grad():
            for name, gen in list(gens.items()):  # warm-up
                attempt(name, lambda gen=gen: gen(ids, mask, _gen_kwargs(2)))
            for _ in range(prof["reps"]):
                for name, gen in list(gens.items()):
                    attempt(name, lambda name=name, gen=gen: time_backend(name, gen))
    finally:
        if old is None:
            os.environ.pop("PLLM_CHECK_VALUES", None)
        else:
            os.environ["PLLM_CHECK_VALUES"] = old
        if pm is not None:
            pm.unpatch()
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
    p.add_argument("--gpu", action="store_true", help="~1.1B Llama-shaped bf16 model on CUDA, 8-64 users")
    p.add_argument("--users", default=None, help="comma list of distinct-user counts (one row per user)")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cpu", action="store_true", help="the CPU profile even where a GPU is present")
    args = p.parse_args(argv)
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
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = BACKENDS if args.backend == "all" else tuple(b.strip() for b in args.backend.split(","))
    if args.dry_run:
        for u in prof["users"]:
            print(f"users={u}: {', '.join(backends)}")
        return 0
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
