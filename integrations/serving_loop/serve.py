"""Toy continuous-batching decode loop with per-user LoRA adapters (see README.md)."""

from __future__ import annotations

import argparse
import random

import torch

from pllm_kernels import LoRAMetaBuffers, lora_apply


def make_block(h: int, n_users: int, max_rank: int, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(2 * h, h, generator=g) / h**0.5  # fused "gate/up"-like projection: two slices of width h
    w2 = torch.randn(h, h, generator=g) / h**0.5
    ranks = torch.tensor([random.Random(seed + u).choice([4, 8, max_rank]) for u in range(n_users)], dtype=torch.int32)
    a1 = torch.randn(n_users, 2, max_rank, h, generator=g) / h**0.5
    b1 = torch.randn(n_users, 2 * h, max_rank, generator=g) / max_rank**0.5
    a2 = torch.randn(n_users, 1, max_rank, h, generator=g) / h**0.5
    b2 = torch.randn(n_users, h, max_rank, generator=g) / max_rank**0.5
    scales = torch.full((n_users,), 0.5)
    t = {k: v.to(device=device, dtype=dtype) for k, v in dict(w1=w1, w2=w2, a1=a1, b1=b1, a2=a2, b2=b2).items()}
    t.update(ranks=ranks.to(device), scales=scales.to(device))
    return t


def block_step(x, p, meta, h):
    y1 = x @ p["w1"].t()
    lora_apply(y1, x, p["a1"], p["b1"], p["ranks"], p["scales"], meta, [h, h])
    hidden = torch.nn.functional.silu(y1[:, :h]) * y1[:, h:]
    y2 = hidden @ p["w2"].t()
    lora_apply(y2, hidden, p["a2"], p["b2"], p["ranks"], p["scales"], meta, [h])
    return y2


def block_one(x, p, user, h):
    """One request alone, adapters merged into dense weights (what a naive server does per user)."""
    def delta(a, b, s):
        r = int(p["ranks"][user])
        return float(p["scales"][user]) * b[user, :, :r].float() @ a[user, s, :r].float()

    w1 = p["w1"].float() + torch.cat([delta(p["a1"], p["b1"][:, :h], 0), delta(p["a1"], p["b1"][:, h:], 1)])
    w2 = p["w2"].float() + delta(p["a2"], p["b2"], 0)
    y1 = x.float() @ w1.t()
    return (torch.nn.functional.silu(y1[:, :h]) * y1[:, h:]) @ w2.t()


def main(argv=None) -> float:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--users", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=64)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    h, B = args.hidden, args.max_batch
    p = make_block(h, args.users, 16, dtype, device)
    bufs = LoRAMetaBuffers(num_tokens=B, k=1, num_slots=args.users, device=device)
    rng = random.Random(0)
    running: list[int | None] = [None] * B  # user per batch row; None = free row or a base-model request
    worst = 0.0
    for step in range(args.steps):
        for i in range(B):  # requests finish and new ones (some without an adapter) take their rows
            if rng.random() < 0.3:
                running[i] = rng.choice([None, *range(args.users)])
        slots = torch.tensor([[-1 if u is None else u] for u in running], dtype=torch.int32, device=device)
        meta = bufs.fill(slots)  # in place: same addresses every step
        x = torch.randn(B, h, device=device, dtype=dtype)
        y = block_step(x, p, meta, h)
        for i, u in enumerate(running):
            if u is None:
                continue
            err = (y[i].float() - block_one(x[i : i + 1], p, u, h)[0]).abs().max().item()
            worst = max(worst, err)
        print(f"step {step}: {sum(u is not None for u in running)}/{B} rows with adapters, max |err| {worst:.2e}")
    return worst


if __name__ == "__main__":
    err = main()
    raise SystemExit(0 if err < 5e-2 else 1)
