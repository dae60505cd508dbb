"""Personalized decoding for patched HF models: one generation loop where every row has its own policy.

``personalized_generate(pm, input_ids, attention_mask, users, ...)`` (also ``PersonalizedModel.personalized_generate``)
decodes a mixed batch in which each row follows its user's :class:`~pllm_kernels.store.DecodingPolicy`:

* **plain** rows: sampled (or greedy) with the row's own temperature / top-k / top-p / min-p and seed;
* **contrasted** rows (Context Steering, He et al. ICLR 2025; CFG with ``guidance_scale = 1 + lambda``): the row's
  prompt runs twice in the same batched forward, once after the user's ``context`` tokens and once without, each
  branch with its own KV-cache rows; the next token is drawn from ``contrast_logits`` of the two branches' last
  positions and appended to both. Rows with lambda = 0 get no second branch;
* **reward-guided** rows (ARGS / PAD / GenARM, multi-objective with per-user weights): token rewards from reward
  sources (a causal LM with the same vocabulary, run batched with its own KV cache on the rows' prompts and tokens,
  giving ``log_softmax`` rewards; or a callable), combined with the row's ``reward_weights`` and ``beta``,
  restricted to the row's ``reward_top_k`` candidates.

LoRA adapters, steering vectors and soft prompts of the rows' users apply to every branch (the same personalized
model scores both). Draws use the counter-based sampler keyed by (row seed, token index): a row's tokens do not
depend on its position in the batch or on the other rows.

Also :class:`ContrastLogitsProcessor` and :class:`RewardGuidanceLogitsProcessor` for stock ``generate()``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from pllm_kernels.ops.decoding import contrast_logits, mix_logprobs, reward_guided_logprobs, sample_tokens
from pllm_kernels.store.decoding import DecodingPolicy

__all__ = ["ContrastLogitsProcessor", "GenerationOutput", "RewardGuidanceLogitsProcessor", "personalized_generate"]


@dataclass
class GenerationOutput:
    """``tokens (B, N)`` new tokens (``pad_token_id`` after a row finished), ``logprobs (B, N)`` each token's
    log-prob under the row's personalized distribution (0 after finishing), ``finished (B,)``."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    finished: torch.Tensor


def _cache_kw(model: nn.Module) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (earlier 5.x): the model's KV-cache argument."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    for key in ("cache", "past_key_values"):
        v = out.get(key, None) if hasattr(out, "get") else getattr(out, key, None)
        if v is not None:
            return v
    raise RuntimeError("the model returned no KV cache (use_cache=True)")


def _rows_of(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    if attention_mask is None:
        return list(input_ids)
    return [ids[m.bool()] for ids, m in zip(input_ids, attention_mask)]


def _left_pad(rows: Sequence[torch.Tensor], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    S = max(int(r.numel()) for r in rows)
    ids = torch.full((len(rows), S), pad, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), S, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if r.numel():
            ids[i, S - r.numel():] = r.to(device)
            mask[i, S - r.numel():] = 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


class _Branches:
    """A causal LM decoded incrementally on left-padded rows with its own KV cache."""

    def __init__(self, model: nn.Module, rows: Sequence[torch.Tensor], pad: int, device, users=None, pm=None,
                 enter: bool = True):
        self.model, self.users, self.pm, self.enter = model, users, pm, enter
        self.kw = _cache_kw(model)
        self.ids, self.mask = _left_pad(rows, pad, device)
        self.cache = None

    def _call(self, **kw):
        if self.pm is not None:  # a patched model: route its rows by user (``enter``: per call; else the caller's)
            with self.pm.users(self.users) if self.enter else nullcontext():
                plan = self.pm.context.plan
                if self.cache is None and plan is not None and plan.soft_prompts is not None:
                    embeds, mask, pos, _ = self.pm._splice(plan, kw.pop("input_ids"), kw.pop("attention_mask"), {})
                    self.mask = mask
                    return self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, **kw)
                return self.model(**kw)
        return self.model(**kw)

    def first(self) -> torch.Tensor:
        out = self._call(input_ids=self.ids, attention_mask=self.mask, position_ids=_positions(self.mask),
                         use_cache=True)
        self.cache = _cache_of(out)
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        out = self._call(input_ids=tokens[:, None], attention_mask=self.mask,
                         position_ids=_positions(self.mask)[:, -1:], use_cache=True, **{self.kw: self.cache})
        self.cache = _cache_of(out)
        return out.logits[:, -1]


def _vocab(model) -> int | None:
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "vocab_size", None)
    if v is None and hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        v = model.get_output_embeddings().weight.shape[0]
    return v


def personalized_generate(pm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          users: Sequence[str | None] | None = None, *, max_new_tokens: int = 32,
                          policies: Sequence[DecodingPolicy | None] | None = None,
                          rewards: Sequence[nn.Module | Callable] = (), eos_token_id: int | None = None,
                          pad_token_id: int = 0, seed: int = 0, backend: str | None = None) -> GenerationOutput:
    """Decode a mixed batch where every row follows its own policy (see the module docstring).

    Args:
        pm: a :class:`~pllm_kernels.hf.PersonalizedModel`.
        input_ids, attention_mask: ``(B, S)`` prompts (left or right padded), **without** users' contexts.
        users: one entry per row (``None`` = base model, greedy).
        policies: per-row overrides of the users' :class:`DecodingPolicy` (``None`` entries keep the profile's).
        rewards: reward sources for guided rows, in the order of their ``reward_weights``: a causal LM with the
            policy's vocabulary (a plain HF model, or a ``PersonalizedModel`` routed by the same users), scored as
            ``log_softmax`` of its next-token logits, or a callable ``fn(sequences (B, L), candidates (B, k) or
            None) -> (B, V) or (B, k)`` (``k`` = the largest ``reward_top_k`` of the batch; a ``(B, k)`` result is
            per-candidate, aligned with ``candidates``, also when ``k == V``).
        eos_token_id: a row stops after drawing it (later positions are ``pad_token_id``, log-prob 0).
        seed: the seed of rows whose policy has none.
    """
    from pllm_kernels.hf.patch import PersonalizedModel

    if not isinstance(pm, PersonalizedModel):
        raise TypeError(f"pm must be a PersonalizedModel (patch_model(...)), got {type(pm).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a (B, S) tensor of token ids")
    B = input_ids.shape[0]
    users = [None] * B if users is None else users
    pm._check_rows(users, input_ids)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if policies is not None and len(policies) != B:
        raise ValueError(f"policies: got {len(policies)} entries for a batch of {B} rows")
    device = input_ids.device
    vocab = _vocab(pm.model)
    for i, r in enumerate(rewards):
        if isinstance(r, nn.Module):
            rv = _vocab(r.model if isinstance(r, PersonalizedModel) else r)
            if rv != vocab:
                raise ValueError(f"rewards[{i}]: the reward model's vocabulary has {rv} tokens but the policy's has "
                                 f"{vocab}: policy and reward model must share a vocabulary")
        elif not callable(r):
            raise TypeError(f"rewards[{i}]: expected a causal LM or a callable, got {type(r).__name__}")
    pol = []
    for b, u in enumerate(users):
        p = policies[b] if policies is not None and policies[b] is not None else None
        if p is None and u is not None:
            p = pm.store.profile(u).decoding
        pol.append(p if p is not None else DecodingPolicy())
    for b, p in enumerate(pol):
        if p.contrast != 0.0 and p.context is None:
            raise ValueError(f"row {b} ({users[b]!r}): contrast={p.contrast} needs the user's context tokens "
                             "(DecodingPolicy(context=...))")
        if p.reward_weights is not None and len(p.reward_weights) != len(rewards):
            raise ValueError(f"row {b} ({users[b]!r}): {len(p.reward_weights)} reward weights but {len(rewards)} "
                             "reward sources were given")
    prompts = _rows_of(input_ids, attention_mask)
    main = [torch.cat([p.context.to(device), r]) if p.context is not None else r for p, r in zip(pol, prompts)]
    second = [b for b, p in enumerate(pol) if p.contrast != 0.0]
    branch_users = list(users) + [users[b] for b in second]
    policy = _Branches(pm.model, main + [prompts[b] for b in second], pad_token_id, device, users=branch_users,
                       pm=pm, enter=False)
    lms = [(i, _Branches(r.model if isinstance(r, PersonalizedModel) else r, prompts, pad_token_id, device,
                         users=list(users) if isinstance(r, PersonalizedModel) else None,
                         pm=r if isinstance(r, PersonalizedModel) else None, enter=False))
           for i, r in enumerate(rewards) if isinstance(r, nn.Module)]
    with ExitStack() as stack:  # one plan per model for the whole call (slots pinned until it returns)
        stack.enter_context(pm.users(branch_users))
        for r in rewards:
            if isinstance(r, PersonalizedModel):
                stack.enter_context(r.users(list(users)))
        return _loop(B, device, policy, lms, pol, second, rewards, max_new_tokens, eos_token_id, pad_token_id, seed,
                     prompts, backend)


def _loop(B, device, policy, lms, pol, second, rewards, max_new_tokens, eos_token_id, pad_token_id, seed, prompts,
          backend):
    guided = [b for b, p in enumerate(pol) if p.reward_weights is not None]
    lam = torch.tensor([p.contrast for p in pol], dtype=torch.float32, device=device)
    beta = torch.tensor([p.beta if p.reward_weights is not None else 0.0 for p in pol], device=device)
    rtk = torch.tensor([p.reward_top_k if p.reward_weights is not None else 0 for p in pol], dtype=torch.int32,
                       device=device)
    weights = torch.tensor([list(p.reward_weights) if p.reward_weights is not None else [0.0] * len(rewards)
                            for p in pol], dtype=torch.float32, device=device).reshape(B, len(rewards))
    samp = dict(temperature=[p.temperature for p in pol], top_k=[p.top_k for p in pol],
                top_p=[p.top_p for p in pol], min_p=[p.min_p for p in pol],
                seed=[p.seed if p.seed is not None else seed for p in pol])
    second_idx = torch.tensor(second, dtype=torch.long, device=device)
    seqs = [r.clone() for r in prompts]
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    logits = policy.first()
    r_logits = [(i, br.first()) for i, br in lms]
    for t in range(max_new_tokens):
        with_ctx = logits[:B]
        if second:
            without = with_ctx.clone()
            without[second_idx] = logits[B:]
            z = contrast_logits(with_ctx, without, lam, backend=backend)
        else:
            z = mix_logprobs(with_ctx[None], torch.ones(B, 1, device=device), backend=backend)
        if guided and rewards:
            z = _guide(z, rewards, r_logits, weights, beta, rtk, seqs, pad_token_id, backend)
        tok, lp = sample_tokens(z, step=t, backend=backend, **samp)
        tok = torch.where(finished, pad_token_id, tok)
        tokens[:, t] = tok
        logprobs[:, t] = torch.where(finished, 0.0, lp.float())
        if eos_token_id is not None:
            finished |= tok == eos_token_id
        seqs = [torch.cat([s, tok[b:b + 1].to(s.device)]) for b, s in enumerate(seqs)]
        if t + 1 == max_new_tokens or bool(finished.all()):
            break
        logits = policy.step(torch.cat([tok, tok[second_idx]]) if second else tok)
        r_logits = [(i, br.step(tok)) for i, br in lms]
    return GenerationOutput(tokens, logprobs, finished)


def _guide(z, rewards, r_logits, weights, beta, rtk, seqs, pad, backend):
    """Combine the reward sources (per-row weights) and apply reward guidance to the scores ``z (B, V)``."""
    B, V = z.shape
    lm = dict(r_logits)
    k_max = int(rtk.max()) if rtk.numel() else 0
    cand = None
    if k_max > 0:
        cand = torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :k_max]
    total = torch.zeros(B, V, dtype=torch.float32, device=z.device)
    for i, src in enumerate(rewards):
        if i in lm:
            r = torch.log_softmax(lm[i].float(), -1)
            r = torch.where(torch.isfinite(r), r, torch.finfo(torch.float32).min / 4)
        else:
            ids, _ = _left_pad(seqs, pad, z.device)
            r = torch.as_tensor(src(ids, cand), device=z.device, dtype=torch.float32)
            if cand is not None and r.shape == (B, k_max):  # per-candidate (wins when k == V)
                full = torch.zeros(B, V, dtype=torch.float32, device=z.device)
                r = full.scatter_(1, cand, r)
            elif r.shape != (B, V):
                raise ValueError(f"rewards[{i}] returned shape {tuple(r.shape)}; expected (B={B}, V={V})"
                                 + (f" or (B, {k_max})" if k_max else ""))
        total += weights[:, i:i + 1] * r
    return reward_guided_logprobs(z, total, beta, top_k=rtk, backend=backend)


class ContrastLogitsProcessor:
    """Context Steering / classifier-free guidance as a ``LogitsProcessor`` for stock ``model.generate``:
    ``generate`` runs the prompts **with** the users' context; this processor runs ``model`` on the prompts
    ``without`` it (its own KV cache, batched) and returns ``contrast_logits(scores, uncond, lam)`` (log-probs;
    HF's temperature / top-k / top-p warpers then apply). ``lam``: a scalar or one per row.

    Args: ``model`` (the same causal LM, or a ``PersonalizedModel`` with ``users``), ``without_ids`` /
    ``without_mask`` ``(B, S')`` the prompts without context."""

    def __init__(self, model: nn.Module, without_ids: torch.Tensor, lam, without_mask: torch.Tensor | None = None,
                 users=None, pad_token_id: int = 0):
        from pllm_kernels.hf.patch import PersonalizedModel

        pm = model if isinstance(model, PersonalizedModel) else None
        rows = _rows_of(without_ids, without_mask)
        self.branch = _Branches(pm.model if pm else model, rows, pad_token_id, without_ids.device, users=users,
                                pm=pm)
        self.lam = lam
        self.rows = len(rows)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != self.rows:
            raise ValueError(f"ContrastLogitsProcessor was built for {self.rows} rows, generate has "
                             f"{scores.shape[0]} (num_return_sequences / beams are not supported)")
        uncond = self.branch.first() if self.branch.cache is None else self.branch.step(input_ids[:, -1])
        return contrast_logits(scores, uncond.to(scores.dtype), self.lam).to(scores.dtype)


class RewardGuidanceLogitsProcessor:
    """Token-level reward guidance as a ``LogitsProcessor``: returns ``reward_guided_logprobs(scores, reward, beta,
    top_k)``. ``reward``: a causal LM with the same vocabulary (fed the same sequences with its own KV cache;
    rewards ``log_softmax`` of its logits) or a callable ``fn(input_ids, scores) -> (B, V)``."""

    def __init__(self, reward, beta, top_k=0, pad_token_id: int = 0):
        self.reward, self.beta, self.top_k, self.pad = reward, beta, top_k, pad_token_id
        self.branch = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if isinstance(self.reward, nn.Module):
            V = _vocab(self.reward)
            if V != scores.shape[-1]:
                raise ValueError(f"the reward model's vocabulary has {V} tokens but the scores have "
                                 f"{scores.shape[-1]}: policy and reward model must share a vocabulary")
            if self.branch is None:
                self.branch = _Branches(self.reward, list(input_ids), self.pad, input_ids.device)
                r = self.branch.first()
            else:
                r = self.branch.step(input_ids[:, -1])
            r = torch.log_softmax(r.float(), -1)
        else:
            r = torch.as_tensor(self.reward(input_ids, scores), dtype=torch.float32, device=scores.device)
        return reward_guided_logprobs(scores, r, self.beta, top_k=self.top_k).to(scores.dtype)
