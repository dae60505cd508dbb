"""Per-call state of a patched model: the request being served and the :class:`PersonalBatch` of its forward.

One :class:`ForwardContext` per patched model, shared by its layers, holds **no per-call state itself**: the
request's plan and the current forward's batch live in context variables, so every thread (and every asyncio task)
sees only its own call. Concurrent forwards on one model therefore never read each other's routing.

Flow: ``with ctx.request(plan):`` around a call (``forward`` / ``generate``); a forward pre-hook calls
:meth:`ForwardContext.begin` with the tokens' layout, which builds the batch once; the layers read
:attr:`ForwardContext.batch`; a forward post-hook calls :meth:`ForwardContext.end`.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from pllm_kernels.batch.personal import PersonalBatch, SteerBatch
from pllm_kernels.batch.plan import BatchPlan
from pllm_kernels.batch.routing import tokens_from_rows

__all__ = ["ForwardContext"]

_ids = itertools.count()


class ForwardContext:
    """Per-call routing of one patched model (see the module docstring). ``num_slots``: the adapter slot count."""

    def __init__(self, num_slots: int):
        self.num_slots = int(num_slots)
        n = next(_ids)
        self._plan: ContextVar[BatchPlan | None] = ContextVar(f"pllm_plan_{n}", default=None)
        self._stack: ContextVar[tuple] = ContextVar(f"pllm_batches_{n}", default=())
        self._builds = itertools.count(1)
        self.builds = 0  # PersonalBatch builds so far, all calls together (one per model forward)

    @property
    def plan(self) -> BatchPlan | None:
        """The plan of the request this thread / task is serving, or ``None``."""
        return self._plan.get()

    @contextmanager
    def request(self, plan: BatchPlan | None):
        """Serve the forwards inside the block with ``plan`` (``None`` = base model); restores the previous plan."""
        token = self._plan.set(plan)
        try:
            yield plan
        finally:
            self._plan.reset(token)

    @property
    def batch(self) -> PersonalBatch | None:
        """The :class:`PersonalBatch` of the innermost forward being run by this thread / task, or ``None``."""
        stack = self._stack.get()
        return stack[-1] if stack else None

    def begin(self, batch_size: int, seq_len: int, attention_mask: torch.Tensor | None = None) -> None:
        """Build the forward's :class:`PersonalBatch` for a padded ``(batch_size, seq_len)`` token layout.

        ``attention_mask`` ``(B, S_total)`` (the last ``seq_len`` columns are the current tokens): padding
        positions are routed to ``-1``. Rows are repeated when the model runs ``n`` sequences per request row
        (``num_return_sequences``, beams), in HF's ``repeat_interleave`` order.
        """
        plan = self._plan.get()
        batch = None
        if plan is not None and (plan.active_slots or plan.steering is not None):
            n = plan.lora_slots.shape[0]
            rep = 1
            if batch_size != n:
                if n == 0 or batch_size % n:
                    raise ValueError(f"the forward has {batch_size} rows but {n} users were given")
                rep = batch_size // n
            mask = None
            if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[0] == batch_size \
                    and attention_mask.shape[1] >= seq_len:
                mask = attention_mask[:, attention_mask.shape[1] - seq_len:]
            layout = dict(attention_mask=mask) if mask is not None else dict(seq_len=seq_len)
            batch = PersonalBatch()
            if plan.active_slots:
                row_slots, row_weights = plan.lora_slots, plan.lora_weights
                if rep > 1:
                    row_slots = row_slots.repeat_interleave(rep, dim=0)
                    row_weights = row_weights.repeat_interleave(rep, dim=0)
                batch = PersonalBatch.from_rows(row_slots, self.num_slots, row_weights,
                                                active_slots=plan.active_slots, **layout)
            if plan.steering is not None:
                batch.steering = self._steering(plan, rep, layout)
            self.builds = next(self._builds)
        self._stack.set(self._stack.get() + (batch,))

    @staticmethod
    def _steering(plan: BatchPlan, rep: int, layout: dict) -> SteerBatch:
        sp = plan.steering
        B, nl, ks = sp.slots.shape
        slots, scales = sp.slots.reshape(B, nl * ks), sp.scales.reshape(B, nl * ks)
        if rep > 1:
            slots, scales = slots.repeat_interleave(rep, dim=0), scales.repeat_interleave(rep, dim=0)
        tok_slots, tok_scales = tokens_from_rows(slots, scales, **layout)
        T = tok_slots.shape[0]
        return SteerBatch(sp.layers, tok_slots.reshape(T, nl, ks), tok_scales.reshape(T, nl, ks), sp.tables,
                          fused=not torch.is_grad_enabled())

    def end(self) -> None:
        """Drop the innermost forward's batch (after the forward, also when it raised)."""
        stack = self._stack.get()
        if stack:
            self._stack.set(stack[:-1])
