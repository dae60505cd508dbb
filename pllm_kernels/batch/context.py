"""Per-call state of a patched model: the request being served and the :class:`PersonalBatch` of its forward.

One :class:`ForwardContext` per patched model, shared by its layers, holds **no per-call state itself**: the
request's plan and the current forward's batch live in context variables, so every thread (and every asyncio task)
sees only its own call. Concurrent forwards on one model therefore never read each other's routing.

Flow: ``with ctx.request(plan):`` around a call (``forward`` / ``generate``); a forward pre-hook calls
:meth:`ForwardContext.begin` with the tokens' layout, which builds the batch once; the layers read
:attr:`ForwardContext.batch`; a forward post-hook calls :meth:`ForwardContext.end`.

Decode steps reuse their routing: a single-token forward (``seq_len == 1``, a KV-cache decode step) routes every
row's token to its row's user whatever its attention-mask value (a masked decode position's output is never
attended to), so its routing depends only on the plan and the batch size; it is built by the first decode step of
a request and reused by the later ones (kept in the request's context variable, never shared between calls or
threads). Every forward still gets a fresh :class:`PersonalBatch` (fresh ``scratch``).

Static decoding (:mod:`pllm_kernels.hf.static_decode`) pushes prebuilt batches instead: ``with
ctx.pinned(batch, batch_size, seq_len):`` makes every forward of that layout in the block use ``batch`` (its routing
tensors are persistent buffers refilled in place between calls, as CUDA-graph replay needs), each forward with a
fresh ``scratch``. Under ``torch.compile`` (which cannot trace context variables) the layers read the batch given
to :meth:`ForwardContext.compiled` instead.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from pllm_kernels.batch.personal import PersonalBatch, SteerBatch
from pllm_kernels.batch.plan import BatchPlan
from pllm_kernels.batch.routing import tokens_from_rows

__all__ = ["ForwardContext"]

_ids = itertools.count()


class _Reuse:
    """Routing kept for the decode steps of one request (see the module docstring): private to the request."""

    __slots__ = ("plan", "entries")

    def __init__(self, plan):
        self.plan = plan
        self.entries: dict = {}


class ForwardContext:
    """Per-call routing of one patched model (see the module docstring). ``num_slots``: the adapter slot count.

    Counters (all calls together): ``builds`` counts the :class:`PersonalBatch` es pushed for personalized forwards
    (one per forward), ``routing_builds`` the routings actually built (a decode step that reuses its request's
    routing adds none)."""

    def __init__(self, num_slots: int):
        self.num_slots = int(num_slots)
        n = next(_ids)
        self._plan: ContextVar[BatchPlan | None] = ContextVar(f"pllm_plan_{n}", default=None)
        self._stack: ContextVar[tuple] = ContextVar(f"pllm_batches_{n}", default=())
        self._reuse: ContextVar[_Reuse | None] = ContextVar(f"pllm_reuse_{n}", default=None)
        self._pinned: ContextVar[tuple | None] = ContextVar(f"pllm_pinned_{n}", default=None)
        self._builds = itertools.count(1)
        self._routing_builds = itertools.count(1)
        self.builds = 0  # PersonalBatch pushes so far, all calls together (one per personalized model forward)
        self.routing_builds = 0  # routings built so far (decode steps reusing their request's routing add none)
        self._compiled_batch: PersonalBatch | None = None
        self._compiled_lock = threading.RLock()

    @property
    def plan(self) -> BatchPlan | None:
        """The plan of the request this thread / task is serving, or ``None``."""
        return self._plan.get()

    @contextmanager
    def request(self, plan: BatchPlan | None):
        """Serve the forwards inside the block with ``plan`` (``None`` = base model); restores the previous plan.

        A nested ``request`` with the very same plan keeps the outer request's reusable decode routing."""
        token = self._plan.set(plan)
        reuse = self._reuse.get()
        reuse_token = None if reuse is not None and reuse.plan is plan else self._reuse.set(_Reuse(plan))
        try:
            yield plan
        finally:
            if reuse_token is not None:
                self._reuse.reset(reuse_token)
            self._plan.reset(token)

    @property
    def batch(self) -> PersonalBatch | None:
        """The :class:`PersonalBatch` of the innermost forward being run by this thread / task, or ``None``."""
        # dynamo cannot trace ContextVar.get: see compiled() (is_dynamo_compiling: one call, read per layer call;
        # code run as plain Python while tracing, e.g. non-strict export, reads the same batch from the stack)
        if torch.compiler.is_dynamo_compiling():
            return self._compiled_batch
        stack = self._stack.get()
        return stack[-1] if stack else None

    # ------------------------------------------------------------------------------------ prebuilt batches
    @property
    def pinned_batch(self) -> PersonalBatch | None:
        """The prebuilt batch of the innermost :meth:`pinned` block of this thread / task, or ``None``."""
        p = self._pinned.get()
        return None if p is None else p[0]

    @contextmanager
    def pinned(self, batch: PersonalBatch, batch_size: int, seq_len: int):
        """Serve every forward inside the block (this thread / task) with the prebuilt ``batch`` instead of building
        one from the plan: each forward gets a copy with a fresh ``scratch`` (layers keep per-forward values there).
        The forwards must have the ``(batch_size, seq_len)`` layout the batch routes (checked in :meth:`begin`).
        ``batch.lora_slots=None`` makes every patched layer run (needed when the batch's buffers are refilled with
        other users later, e.g. under a captured CUDA graph)."""
        if not isinstance(batch, PersonalBatch):
            raise TypeError(f"pinned: expected a PersonalBatch, got {type(batch).__name__}")
        token = self._pinned.set((batch, int(batch_size), int(seq_len)))
        try:
            yield batch
        finally:
            self._pinned.reset(token)

    @contextmanager
    def compiled(self, batch: PersonalBatch):
        """Run a ``torch.compile`` d forward with ``batch``: dynamo cannot trace context variables, so while it
        traces, :attr:`batch` returns this plain attribute. Compiled forwards of one model are therefore serialized
        (a lock held for the block); the batch's ``scratch`` is emptied (in place) on entry. Code that dynamo runs
        as plain Python (after a graph break) gets the same object from the context variables."""
        with self._compiled_lock:
            prev = self._compiled_batch
            batch.scratch.clear()
            self._compiled_batch = batch
            # Code that dynamo leaves to eager Python (graph breaks, skipped frames) reads the context variables:
            # the very same batch (same scratch) is pinned and pushed for it.
            pin = self._pinned.set((batch, None, None))
            stack = self._stack.set(self._stack.get() + (batch,))
            try:
                yield batch
            finally:
                self._stack.reset(stack)
                self._pinned.reset(pin)
                self._compiled_batch = prev

    # ------------------------------------------------------------------------------------ per forward
    def begin(self, batch_size: int, seq_len: int, attention_mask: torch.Tensor | None = None) -> None:
        """Build the forward's :class:`PersonalBatch` for a padded ``(batch_size, seq_len)`` token layout.

        ``attention_mask`` ``(B, S_total)`` (the last ``seq_len`` columns are the current tokens): padding
        positions are routed to ``-1``; a single-token forward (``seq_len == 1``) routes every row's token (see the
        module docstring) and reuses its request's routing. Rows are repeated when the model runs ``n`` sequences
        per request row (``num_return_sequences``, beams), in HF's ``repeat_interleave`` order. Inside
        :meth:`pinned`, the pinned batch is pushed instead (a copy with a fresh ``scratch``).
        """
        pinned = self._pinned.get()
        if pinned is not None:
            batch, pb, ps = pinned
            if pb is None:  # compiled(): the very batch the compiled code reads
                self._stack.set(self._stack.get() + (batch,))
                return
            if (batch_size, seq_len) != (pb, ps):
                raise RuntimeError(f"the pinned PersonalBatch routes a ({pb}, {ps}) token layout but the forward has "
                                   f"({batch_size}, {seq_len})")
            self.builds = next(self._builds)
            self._stack.set(self._stack.get() + (dataclasses.replace(batch, scratch={}),))
            return
        plan = self._plan.get()
        batch = None
        if plan is not None and (plan.active_slots or plan.steering is not None):
            n = plan.lora_slots.shape[0]
            rep = 1
            if batch_size != n:
                if n == 0 or batch_size % n:
                    raise ValueError(f"the forward has {batch_size} rows but {n} users were given")
                rep = batch_size // n
            if seq_len == 1:
                batch = self._decode_batch(plan, rep)
            else:
                batch = self._build(plan, rep, self._layout(batch_size, seq_len, attention_mask))
            self.builds = next(self._builds)
        self._stack.set(self._stack.get() + (batch,))

    @staticmethod
    def _layout(batch_size: int, seq_len: int, attention_mask: torch.Tensor | None) -> dict:
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[0] == batch_size \
                and attention_mask.shape[1] >= seq_len:
            return dict(attention_mask=attention_mask[:, attention_mask.shape[1] - seq_len:])
        return dict(seq_len=seq_len)

    def _build(self, plan: BatchPlan, rep: int, layout: dict) -> PersonalBatch:
        batch = PersonalBatch()
        if plan.active_slots:
            row_slots, row_weights = plan.lora_slots, plan.lora_weights
            if rep > 1:
                row_slots = row_slots.repeat_interleave(rep, dim=0)
                row_weights = row_weights.repeat_interleave(rep, dim=0)
            # Outside inference mode: routing tensors with a version counter, so the values the layers derive
            # from them (torch_ops.memo) are validated by (address, version) instead of a snapshot compare per
            # layer call; normal tensors also serve both inference-mode and autograd forwards.
            with torch.inference_mode(False):
                batch = PersonalBatch.from_rows(row_slots, self.num_slots, row_weights,
                                                active_slots=plan.active_slots, **layout)
        if plan.steering is not None:
            batch.steering = self._steering(plan, rep, layout)
        self.routing_builds = next(self._routing_builds)
        return batch

    def _decode_batch(self, plan: BatchPlan, rep: int) -> PersonalBatch:
        """A single-token forward's batch: the request's routing for ``rep`` (built once per request and layout),
        in a fresh :class:`PersonalBatch` (fresh scratch; the steering part rebuilt for the current grad mode)."""
        reuse = self._reuse.get()
        if reuse is None or reuse.plan is not plan:  # begin() outside request(): nothing to keep it in
            return self._build(plan, rep, dict(seq_len=1))
        key = (rep, torch.is_inference_mode_enabled())  # inference tensors cannot serve an autograd forward
        hit = reuse.entries.get(key)
        if hit is None:
            hit = self._build(plan, rep, dict(seq_len=1))
            reuse.entries[key] = hit
        st = hit.steering
        if st is not None:
            st = SteerBatch(st.layers, st.token_slots, st.token_scales, st.tables, fused=not torch.is_grad_enabled())
        return PersonalBatch(lora=hit.lora, lora_slots=hit.lora_slots, steering=st)

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
