"""A user's decoding policy: contrast (Context Steering), reward guidance weights, sampling parameters and a seed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["DecodingPolicy"]


def _finite(name: str, x, lo=-math.inf, hi=math.inf, lo_open=False) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {x!r}") from None
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise ValueError(f"{name} must be finite and in {rng}, got {x!r}")
    return v


@dataclass
class DecodingPolicy:
    """How a user's rows are decoded by :meth:`pllm_kernels.hf.PersonalizedModel.personalized_generate`.

    * ``contrast``: Context Steering's lambda (0 = off: no second branch; ``1 + lambda`` = HF's guidance scale),
      with ``context``: the token ids ``(n,)`` of the user's context, prepended to the prompt of the contrasted
      ("with context") branch.
    * ``reward_weights``: one weight per reward source of the call (multi-objective; ``None`` = no guidance),
      ``beta``: the guidance strength, ``reward_top_k``: candidates (0 = every token).
    * ``temperature`` (0 = greedy), ``top_k``, ``top_p``, ``min_p``: sampling; ``seed``: the row's RNG seed
      (``None``: the call's seed).
    """

    contrast: float = 0.0
    context: torch.Tensor | None = None
    reward_weights: tuple[float, ...] | None = None
    beta: float = 1.0
    reward_top_k: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.contrast = _finite("contrast", self.contrast)
        if self.context is not None:
            c = torch.as_tensor(self.context)
            if c.dim() == 2 and c.shape[0] == 1:
                c = c[0]
            if c.dim() != 1 or c.numel() == 0 or c.is_floating_point() or c.dtype == torch.bool:
                raise ValueError(f"context must be a non-empty 1-D tensor of token ids, got {tuple(c.shape)} "
                                 f"{c.dtype}")
            if int(c.min()) < 0:
                raise ValueError("context token ids must be >= 0")
            self.context = c.to("cpu", torch.long).clone()
        if self.reward_weights is not None:
            ws = tuple(_finite("reward_weights", w) for w in self.reward_weights)
            if not ws:
                raise ValueError("reward_weights must have at least one weight (or be None)")
            self.reward_weights = ws
        self.beta = _finite("beta", self.beta)
        if isinstance(self.reward_top_k, bool) or not isinstance(self.reward_top_k, int) or self.reward_top_k < 0:
            raise ValueError(f"reward_top_k must be an int >= 0 (0 = every token), got {self.reward_top_k!r}")
        self.temperature = _finite("temperature", self.temperature, lo=0.0)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        self.top_p = _finite("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        self.min_p = _finite("min_p", self.min_p, lo=0.0, hi=1.0)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
