"""Demo: one patched model serves several users' LoRA adapters in one batch, checked against PEFT on the spot.

    python -m pllm_kernels.testing.demo            # tiny random Llama, offline, < 1 minute on 2 CPU cores
    python -m pllm_kernels.testing.demo --arch gpt2 --new-tokens 12

Builds a tiny random model, creates random PEFT LoRA adapters for a few users (mixed ranks, rsLoRA, partial
layers; one user mixes a shared adapter with a personal one), runs one left-padded mixed batch (with a row that
has no user) through ``forward`` and ``generate``, prints each user's tokens and the timings, and compares logits
and greedy tokens with PEFT's mixed batch. Exits with status 1 if the check fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llama", help="llama, mistral, qwen2, gemma2, gemma3, phi3 or gpt2")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)

    transformers.logging.set_verbosity_error()
    from pllm_kernels.hf import patch_model
    from pllm_kernels.testing import left_padded_batch, peft_reference, tiny_model

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    base = tiny_model(args.arch, seed=args.seed)
    if args.arch == "gpt2":
        lin, attn, some = "all-linear", ["c_attn"], ["c_proj", "c_fc"]
        extra = dict(fan_in_fan_out=True)
    elif args.arch == "phi3":
        lin, attn, some = "all-linear", ["qkv_proj"], ["o_proj", "gate_up_proj"]
        extra = {}
    else:
        lin, attn, some = "all-linear", ["q_proj", "v_proj"], ["o_proj", "up_proj", "down_proj"]
        extra = {}
    specs = {
        "shared": dict(r=4, lora_alpha=8, target_modules=lin, **extra),
        "alice": dict(r=8, lora_alpha=16, target_modules=attn, use_rslora=True, **extra),
        "bob": dict(r=2, lora_alpha=4, target_modules=some, layers_to_transform=[1], **extra),
        "carol": dict(r=6, lora_alpha=6, target_modules=lin, **extra),
    }
    peft_model, sds = peft_reference(base, specs, seed=args.seed)
    # PEFT's view of "dave" = 0.5 * shared + 1.0 * his own adapter (carol's weights reused as his own).
    peft_model.add_weighted_adapter(["shared", "carol"], [0.5, 1.0], "dave_mix", combination_type="cat")
    t_build = time.perf_counter() - t0

    t0 = time.perf_counter()
    pm = patch_model(base, num_slots=8, max_rank=8)
    with tempfile.TemporaryDirectory() as tmp:  # alice arrives as a PEFT directory, the others as state dicts
        peft_model.save_pretrained(tmp, selected_adapters=["alice"])
        pm.register_user("alice", f"{tmp}/alice")
    pm.add_adapter("shared", *sds["shared"])
    pm.register_user("bob", *sds["bob"])
    pm.register_user("carol", *sds["carol"])
    pm.add_user("dave", [("carol", 1.0), ("shared", 0.5)])
    t_reg = time.perf_counter() - t0
    print(f"model: tiny random {args.arch} ({sum(p.numel() for p in base.parameters()) / 1e3:.0f}k params), "
          f"{len(pm.patched)} patched layers ({pm.how})")
    for u in ("alice", "bob", "carol", "dave"):
        print(f"  user {u:<6} adapters {pm.profile(u).adapters}")

    users = ["alice", None, "bob", "carol", "dave", "alice"]
    peft_names = ["alice", "__base__", "bob", "carol", "dave_mix", "alice"]
    ids, mask = left_padded_batch([6, 9, 4, 9, 7, 3], base.config.vocab_size, seed=args.seed + 1)
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    ok = True
    def timed(fn):
        """(result, best of 3 warm runs in seconds): the first call loads adapters into slots and warms caches."""
        out = fn()
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return out, best

    with torch.inference_mode():
        ours, t_fwd = timed(lambda: pm(ids, attention_mask=mask, users=users).logits)
        ref, t_fwd_peft = timed(lambda: peft_model(input_ids=ids, attention_mask=mask, adapter_names=peft_names).logits)
        gen, t_gen = timed(lambda: pm.generate(ids, attention_mask=mask, users=users, **kw))
        gen_ref, t_gen_peft = timed(lambda: peft_model.generate(input_ids=ids, attention_mask=mask,
                                                                adapter_names=peft_names, **kw))
        base_logits = pm(ids, attention_mask=mask).logits

    valid = mask.bool()
    err = (ours - ref)[valid].abs().max().item()
    scale = ref[valid].abs().max().item()
    effect = (ref - base_logits)[valid].abs().max().item()
    tol = 1e-4 * scale + 1e-5
    print(f"\nforward: max |ours - PEFT| = {err:.2e} (tolerance {tol:.1e}; LoRA effect {effect:.2f})")
    ok &= err <= tol and effect > 1e-3
    print("generate (greedy), new tokens per row:")
    S = ids.shape[1]
    for b, u in enumerate(users):
        same = torch.equal(gen[b], gen_ref[b])
        ok &= same
        verdict = "== PEFT" if same else f"!= PEFT {gen_ref[b, S:].tolist()}"
        print(f"  row {b} {str(u):<6} {gen[b, S:].tolist()}  {verdict}")
    n_tok = len(users) * args.new_tokens
    print(f"\ntimings: build {t_build:.2f}s, register {t_reg * 1e3:.0f} ms, forward {t_fwd * 1e3:.1f} ms "
          f"(PEFT {t_fwd_peft * 1e3:.1f} ms), generate {t_gen * 1e3:.0f} ms = {n_tok / t_gen:.0f} tok/s "
          f"(PEFT mixed batch {t_gen_peft * 1e3:.0f} ms = {n_tok / t_gen_peft:.0f} tok/s)")
    print(f"batch metadata builds: {pm.context.builds} (one per forward, not per layer)")
    pm.unpatch()
    print("PEFT check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
