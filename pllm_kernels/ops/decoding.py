"""Personalized decoding ops: mixing log-prob sources (Context Steering / CFG / CoSteer / AMULET / GenARM), token-level
reward guidance (ARGS / PAD / multi-objective), and a per-row sorting-free sampler with a counter-based RNG.

``torch.ops.pllm.mix_logprobs``, ``torch.ops.pllm.reward_guided``, ``torch.ops.pllm.sample_tokens`` and
``torch.ops.pllm.fused_sample`` (mix + guidance + sampling in one pass where the backend fuses it). Semantics:
:mod:`pllm_kernels.reference.decoding` (the spec). The public functions validate (``ValueError`` naming the
argument; rows with a NaN or with no finite score are reported by index), then run the op's backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pllm_kernels.ops._backend import Impl, OpTable, triton_available
from pllm_kernels.ops._checks import FLOATS, _backend_arg, _check_tensor, _check_values_enabled, _dispatch, _fail
from pllm_kernels.torch_ops import decoding as torch_dec

__all__ = ["SamplingParams", "contrast_logits", "fused_sample", "mix_logprobs", "reward_guided_logprobs",
           "sample_tokens"]


def _triton():
    from pllm_kernels.triton import decoding as tl_dec

    return tl_dec


def _no_f64(device, dtype):
    return "float64 runs in torch" if dtype == torch.float64 else None


def _fused_torch(tokens, logprobs, sources, coefs, reward, beta, reward_top_k, temperature, top_k, top_p, min_p,
                 seed, step):
    B, V = sources.shape[1:]
    z = torch.empty(B, V, dtype=torch.float32, device=sources.device)
    torch_dec.mix_logprobs_torch(z, sources, coefs)
    if reward is not None:  # guidance on the mixed log-probs; candidates from sources[0] (the base logits)
        cand = torch_dec.candidates_mask(sources[0], reward_top_k)
        s = z + beta.to(torch.float32)[:, None] * torch.where(cand, reward.to(torch.float32), 0.0)
        z = torch.log_softmax(torch.where(cand, s, float("-inf")), -1)
    torch_dec.sample_torch(tokens, logprobs, z, temperature, top_k, top_p, min_p, seed, step)


def _cuda():
    from pllm_kernels.cuda import decoding as cu_dec

    return cu_dec


def _cuda_supports(device, dtype):
    return _cuda().supports(device, dtype)


_MIX = OpTable("mix_logprobs", torch=Impl(torch_dec.mix_logprobs_torch),
               triton=Impl(lambda *a: _triton().mix_logprobs_triton(*a), _no_f64),
               cuda=Impl(lambda *a: _cuda().mix_logprobs_cuda(*a), _cuda_supports))
_REWARD = OpTable("reward_guided", torch=Impl(torch_dec.reward_guided_torch),
                  triton=Impl(lambda *a: _triton().reward_guided_triton(*a), _no_f64),
                  cuda=Impl(lambda *a: _cuda().reward_guided_cuda(*a), _cuda_supports))
_SAMPLE = OpTable("sample_tokens", torch=Impl(torch_dec.sample_torch),
                  triton=Impl(lambda *a: _triton().sample_triton(*a), _no_f64),
                  cuda=Impl(lambda *a: _cuda().sample_tokens_cuda(*a), _cuda_supports))
_FUSED = OpTable("fused_sample", torch=Impl(_fused_torch),
                 triton=Impl(lambda *a: _triton().fused_sample_triton(*a), _no_f64),
                 cuda=Impl(lambda *a: _cuda().fused_sample_cuda(*a), _cuda_supports))


# ------------------------------------------------------------------------------------------- custom ops
def _mix_impl(out: torch.Tensor, sources: torch.Tensor, coefs: torch.Tensor, backend: str) -> None:
    name, impl = _MIX.pick(backend, sources.device, sources.dtype)
    if name == "cuda" and backend == "auto" and sources.shape[0] > _cuda().MAX_SOURCES:  # more than the kernel takes
        impl = _MIX.impls["triton"] if triton_available() else _MIX.impls["torch"]
    impl.fn(out, sources, coefs)


_mix_op = torch.library.custom_op("pllm::mix_logprobs", mutates_args=("out",))(_mix_impl)
_mix_op.register_fake(lambda out, sources, coefs, backend: None)


def _reward_impl(out: torch.Tensor, logits: torch.Tensor, reward: torch.Tensor, beta: torch.Tensor,
                 top_k: torch.Tensor, weights: torch.Tensor | None, backend: str) -> None:
    name, impl = _REWARD.pick(backend, logits.device, logits.dtype)
    if name == "cuda" and backend == "auto" and logits.shape[1] > _cuda().MAX_VOCAB:  # beyond the kernel's vocabulary
        impl = _REWARD.impls["triton"] if triton_available() else _REWARD.impls["torch"]
    impl.fn(out, logits, reward, beta, top_k, weights)


_reward_op = torch.library.custom_op("pllm::reward_guided", mutates_args=("out",))(_reward_impl)
_reward_op.register_fake(lambda out, logits, reward, beta, top_k, weights, backend: None)


def _sample_impl(tokens: torch.Tensor, logprobs: torch.Tensor, scores: torch.Tensor, temperature: torch.Tensor,
                 top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor,
                 step: torch.Tensor, backend: str) -> None:
    name, impl = _SAMPLE.pick(backend, scores.device, scores.dtype)
    if name == "cuda" and backend == "auto" and scores.shape[1] > _cuda().MAX_VOCAB:  # beyond the kernel's vocabulary
        impl = _SAMPLE.impls["triton"] if triton_available() else _SAMPLE.impls["torch"]
    impl.fn(tokens, logprobs, scores, temperature, top_k, top_p, min_p, seed, step)


_sample_op = torch.library.custom_op("pllm::sample_tokens", mutates_args=("tokens", "logprobs"))(_sample_impl)
_sample_op.register_fake(lambda tokens, logprobs, scores, temperature, top_k, top_p, min_p, seed, step, backend: None)


def _fused_impl(tokens: torch.Tensor, logprobs: torch.Tensor, sources: torch.Tensor, coefs: torch.Tensor,
                reward: torch.Tensor | None, beta: torch.Tensor, reward_top_k: torch.Tensor,
                temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                seed: torch.Tensor, step: torch.Tensor, backend: str) -> None:
    name, impl = _FUSED.pick(backend, sources.device, sources.dtype)
    if name == "cuda" and backend == "auto" and (sources.shape[0] > _cuda().MAX_SOURCES
                                                 or sources.shape[2] > _cuda().MAX_VOCAB):  # beyond the kernels
        impl = _FUSED.impls["triton"] if triton_available() else _FUSED.impls["torch"]
    impl.fn(tokens, logprobs, sources, coefs, reward, beta, reward_top_k, temperature, top_k, top_p, min_p, seed,
            step)


_fused_op = torch.library.custom_op("pllm::fused_sample", mutates_args=("tokens", "logprobs"))(_fused_impl)
_fused_op.register_fake(lambda *a: None)


# ------------------------------------------------------------------------------------------- validation
def _rows(name: str, x, B: int, dtype: torch.dtype, device, default=None) -> torch.Tensor:
    """A per-row parameter: scalar, sequence or tensor -> ``(B,)`` of ``dtype`` on ``device`` (a copy)."""
    if x is None:
        x = default
    t = torch.as_tensor(x, device=device) if not isinstance(x, torch.Tensor) else x.to(device)
    if t.dim() == 0:
        t = t.expand(B)
    if t.dim() != 1 or t.shape[0] != B:
        _fail(name, f"expected a scalar or one value per row ({B}), got shape {tuple(t.shape)}")
    if dtype.is_floating_point and not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.bool)):
        _fail(name, f"dtype {t.dtype} is not a number type")
    if not dtype.is_floating_point and t.is_floating_point():
        if not bool((t == t.round()).all()):
            _fail(name, f"must hold integers, got {t.tolist()[:8]}")
    return t.to(dtype).contiguous().clone()


def _check_scores(name: str, t: torch.Tensor, dim: int = 2) -> None:
    _check_tensor(name, t, dim=dim, dtypes=FLOATS)
    if t.shape[-1] < 1:
        _fail(name, "has an empty vocabulary")
    if t.stride(-1) != 1:
        _fail(name, "must have unit stride along the vocabulary (last dimension)")
    if _check_values_enabled():
        flat = t.reshape(-1, t.shape[-1])
        bad = torch.isnan(flat).any(-1) | ~torch.isfinite(flat).any(-1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            _fail(name, f"rows {rows[:8]} have a NaN or no finite score (a NaN row is refused: there is no "
                        "distribution to sample from)")


def _check_sampling(B: int, V: int, device, temperature, top_k, top_p, min_p, seed, step):
    t = _rows("temperature", temperature, B, torch.float32, device, 1.0)
    k = _rows("top_k", top_k, B, torch.int32, device, 0)
    p = _rows("top_p", top_p, B, torch.float32, device, 1.0)
    mp = _rows("min_p", min_p, B, torch.float32, device, 0.0)
    sd = _rows("seed", seed, B, torch.int64, device, 0)
    st = _rows("step", step, B, torch.int64, device, 0)
    if _check_values_enabled():
        if not bool(((t >= 0) & torch.isfinite(t)).all()):
            _fail("temperature", f"must be finite and >= 0 (0 = greedy), got {t.tolist()[:8]}")
        if not bool(((k >= 0) & (k <= V)).all()):
            _fail("top_k", f"must be in [0, V={V}] (0 = off), got {k.tolist()[:8]}")
        if not bool(((p > 0) & (p <= 1)).all()):
            _fail("top_p", f"must be in (0, 1] (1 = off), got {p.tolist()[:8]}")
        if not bool(((mp >= 0) & (mp <= 1)).all()):
            _fail("min_p", f"must be in [0, 1] (0 = off), got {mp.tolist()[:8]}")
        if not bool((st >= 0).all()):
            _fail("step", f"must be >= 0, got {st.tolist()[:8]}")
    return t, k, p, mp, sd, st


def _check_sources(sources, coefs):
    if isinstance(sources, (list, tuple)):
        if not sources:
            _fail("sources", "needs at least one (B, V) logits tensor")
        shapes = {tuple(s.shape) if isinstance(s, torch.Tensor) else None for s in sources}
        if len(shapes) != 1:
            _fail("sources", f"all sources must have one shape (same batch and vocabulary), got "
                             f"{sorted(map(str, shapes))}")
        sources = torch.stack(list(sources))
    _check_scores("sources", sources, dim=3)
    S, B, V = sources.shape
    _check_tensor("coefs", coefs, dtypes=FLOATS, device=sources.device)
    if coefs.dim() == 1 and coefs.shape[0] == S:
        coefs = coefs.expand(B, S)
    if tuple(coefs.shape) != (B, S):
        _fail("coefs", f"expected shape (B={B}, S={S}) (or (S,) for every row), got {tuple(coefs.shape)}")
    coefs = coefs.to(torch.float32).contiguous().clone()
    if _check_values_enabled() and not bool(torch.isfinite(coefs).all()):
        _fail("coefs", "must be finite")
    return sources, coefs


# ------------------------------------------------------------------------------------------- public API
def mix_logprobs(sources, coefs, *, backend: str | None = None) -> torch.Tensor:
    """``log_softmax(sum_i coefs[b, i] * log_softmax(sources[i, b]))`` ``(B, V)`` float32.

    ``sources``: ``(S, B, V)`` logits (or a list of S ``(B, V)`` tensors; one vocabulary); ``coefs``: ``(B, S)`` (or
    ``(S,)`` for every row). CoS / CFG: :func:`contrast_logits`; CoSteer ``[1, c, -c]``; AMULET ``[1 + c, -c]``."""
    backend = _backend_arg(backend)
    sources, coefs = _check_sources(sources, coefs)
    out = torch.empty(sources.shape[1:], dtype=torch.float32, device=sources.device)
    _dispatch(_mix_op, _mix_impl, out, sources, coefs, backend)
    return out


def contrast_logits(logits_with: torch.Tensor, logits_without: torch.Tensor, lam, *,
                    backend: str | None = None) -> torch.Tensor:
    """Context Steering (He et al., ICLR 2025): ``log_softmax(lw + lam (lw - lwo))`` with ``lw, lwo`` the
    log-softmax of the logits with and without the user's context; ``lam`` a scalar or one per row (0 = ``lw``,
    -1 = ``lwo``). HF's classifier-free guidance is ``guidance_scale = 1 + lam``. Returns ``(B, V)`` float32."""
    _check_scores("logits_with", logits_with)
    _check_tensor("logits_without", logits_without, dim=2, dtypes=FLOATS, device=logits_with.device)
    if logits_without.shape != logits_with.shape:
        _fail("logits_without", f"has shape {tuple(logits_without.shape)} but logits_with has "
                                f"{tuple(logits_with.shape)} (the two branches need one vocabulary)")
    B = logits_with.shape[0]
    lam = _rows("lam", lam, B, torch.float32, logits_with.device)
    return mix_logprobs(torch.stack([logits_with, logits_without]), torch.stack([1.0 + lam, -lam], 1),
                        backend=backend)


def reward_guided_logprobs(logits: torch.Tensor, reward: torch.Tensor, beta, top_k=0,
                           weights: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Token-level reward guidance (ARGS / PAD / GenARM): ``log_softmax(log_softmax(logits) + beta * reward)`` over
    the candidates, ``-inf`` (probability exactly 0) elsewhere. Returns ``(B, V)`` float32.

    ``reward``: ``(B, V)`` token rewards; ``(B, M, V)`` objectives combined with per-row ``weights (B, M)``
    (multi-objective decoding); or ``(B, k)`` per-candidate rewards aligned with the candidate order. ``beta``: a
    scalar or ``(B,)`` (0 with ``top_k = 0``: the base model exactly). ``top_k``: a scalar or ``(B,)``, 0 = every
    token, else the first ``k`` tokens of the base logits in (logit descending, index ascending) order."""
    backend = _backend_arg(backend)
    _check_scores("logits", logits)
    B, V = logits.shape
    _check_tensor("reward", reward, dtypes=FLOATS, device=logits.device)
    k = _rows("top_k", top_k, B, torch.int32, logits.device, 0)
    if _check_values_enabled() and not bool(((k >= 0) & (k <= V)).all()):
        _fail("top_k", f"must be in [0, V={V}] (0 = every token), got {k.tolist()[:8]}")
    if reward.dim() == 3:
        if reward.shape[0] != B or reward.shape[2] != V:
            _fail("reward", f"expected (B={B}, M, V={V}) with weights, got {tuple(reward.shape)} (a reward model "
                            "with another vocabulary?)")
        if weights is None:
            _fail("weights", "(B, M) per-row objective weights are required with (B, M, V) rewards")
        _check_tensor("weights", weights, dim=2, dtypes=FLOATS, device=logits.device)
        if tuple(weights.shape) != tuple(reward.shape[:2]):
            _fail("weights", f"expected shape {tuple(reward.shape[:2])}, got {tuple(weights.shape)}")
        weights = weights.to(torch.float32).contiguous()
    elif reward.dim() == 2 and reward.shape[0] == B and reward.shape[1] == V:
        pass
    elif reward.dim() == 2 and reward.shape[0] == B:
        kk = reward.shape[1]
        if _check_values_enabled() and not bool((k == kk).all()):
            _fail("reward", f"per-candidate rewards (B, {kk}) need top_k == {kk} on every row, got {k.tolist()[:8]}")
    else:
        _fail("reward", f"expected (B={B}, V={V}), (B, M, V) or (B, k), got {tuple(reward.shape)} (a reward model "
                        "with another vocabulary?)")
    if _check_values_enabled() and not bool(torch.isfinite(reward).all()):
        _fail("reward", "must be finite")
    b = _rows("beta", beta, B, torch.float32, logits.device)
    if _check_values_enabled() and not bool(torch.isfinite(b).all()):
        _fail("beta", "must be finite")
    out = torch.empty(B, V, dtype=torch.float32, device=logits.device)
    _dispatch(_reward_op, _reward_impl, out, logits, reward, b, k, weights, backend)
    return out


def sample_tokens(scores: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, step=0, *,
                  backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sampling without sorting: temperature (0 = greedy), top-k (0 = off), top-p over the renormalised
    top-k set (1 = off), min-p (0 = off), then a Gumbel-max draw keyed by the row's own ``(seed, step)``
    (counter-based: independent of the row's position and of other rows; every backend draws the same token).

    Every parameter is a scalar or one value per row. Returns ``(tokens (B,) int64, logprobs (B,) float32)``:
    each token and its log-prob under ``log_softmax(scores)``."""
    backend = _backend_arg(backend)
    _check_scores("scores", scores)
    B, V = scores.shape
    t, k, p, mp, sd, st = _check_sampling(B, V, scores.device, temperature, top_k, top_p, min_p, seed, step)
    tokens = torch.empty(B, dtype=torch.int64, device=scores.device)
    logprobs = torch.empty(B, dtype=torch.float32 if scores.dtype != torch.float64 else torch.float64,
                           device=scores.device)
    _dispatch(_sample_op, _sample_impl, tokens, logprobs, scores, t, k, p, mp, sd, st, backend)
    return tokens, logprobs


def fused_sample(sources, coefs, *, reward: torch.Tensor | None = None, beta=0.0, reward_top_k=0, temperature=1.0,
                 top_k=0, top_p=1.0, min_p=0.0, seed=0, step=0, backend: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixing + token-level reward guidance + sampling in one op (one pass over each logit row where the backend
    fuses it): ``z = mix_logprobs(sources, coefs)``; with ``reward (B, V)``,
    ``z = log_softmax(z + beta * reward)`` over the candidates (``-inf`` elsewhere), where the candidates are the
    first ``reward_top_k`` tokens of ``sources[0]`` (the base logits; 0 = every token); then :func:`sample_tokens`
    on ``z``. With one source this is ``reward_guided_logprobs(z, ...)`` exactly. Returns ``(tokens, logprobs)``."""
    backend = _backend_arg(backend)
    sources, coefs = _check_sources(sources, coefs)
    S, B, V = sources.shape
    dev = sources.device
    b = _rows("beta", beta, B, torch.float32, dev)
    rk = _rows("reward_top_k", reward_top_k, B, torch.int32, dev, 0)
    if reward is not None:
        _check_tensor("reward", reward, dim=2, dtypes=FLOATS, device=dev)
        if tuple(reward.shape) != (B, V):
            _fail("reward", f"expected (B={B}, V={V}) token rewards (the same vocabulary as the sources), got "
                            f"{tuple(reward.shape)}")
        reward = reward.to(torch.float32).contiguous()
        if _check_values_enabled():
            if not bool(torch.isfinite(reward).all()):
                _fail("reward", "must be finite")
            if not bool(((rk >= 0) & (rk <= V)).all()):
                _fail("reward_top_k", f"must be in [0, V={V}], got {rk.tolist()[:8]}")
    t, k, p, mp, sd, st = _check_sampling(B, V, dev, temperature, top_k, top_p, min_p, seed, step)
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    logprobs = torch.empty(B, dtype=torch.float32, device=dev)
    _dispatch(_fused_op, _fused_impl, tokens, logprobs, sources, coefs, reward, b, rk, t, k, p, mp, sd, st, backend)
    return tokens, logprobs


class SamplingParams:
    """One row's decoding parameters (a user's defaults): ``temperature`` (0 = greedy), ``top_k``, ``top_p``,
    ``min_p``, ``seed`` (``None`` = drawn per call)."""

    __slots__ = ("temperature", "top_k", "top_p", "min_p", "seed")

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: int | None = None):
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
        if not (isinstance(min_p, (int, float)) and 0 <= min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {min_p!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.temperature, self.top_k, self.top_p, self.min_p, self.seed = (float(temperature), top_k, float(top_p),
                                                                           float(min_p), seed)

    def __repr__(self) -> str:
        return (f"SamplingParams(temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}, "
                f"min_p={self.min_p}, seed={self.seed})")

    def __eq__(self, other) -> bool:
        return isinstance(other, SamplingParams) and all(getattr(self, a) == getattr(other, a)
                                                         for a in self.__slots__)


def stack_params(params: Sequence[SamplingParams]) -> dict:
    """Per-row tensors (host) of a list of :class:`SamplingParams`."""
    return {a: [getattr(p, a) for p in params] for a in ("temperature", "top_k", "top_p", "min_p")}
