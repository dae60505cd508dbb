"""Static decoding for patched models: ``pm.generate(..., decode="static" | "graph" | "compile")``.

``decode="eager"`` (the default) is Hugging Face's ``generate`` on the patched model. The other modes run our own
generation loop over fixed-address state, everything a CUDA graph needs:

* a ``transformers.StaticCache`` of ``bucket rows x cache length`` (the prompt plus ``max_new_tokens``, rounded up
  to a power of two >= 64 so that later calls reuse it);
* fixed input buffers for a decode step (token ids ``(rows, 1)``, position ids, an additive 4-D attention mask
  ``(rows, 1, 1, cache length)``, the cache position on transformers versions that take one), refilled in place;
* the decode step's LoRA routing in :class:`pllm_kernels.batch.LoRAMetaBuffers`, refilled in place from each call's
  plan and pushed to the layers with :meth:`pllm_kernels.batch.ForwardContext.pinned` (each forward gets a fresh
  ``scratch``).

Modes:

* ``"static"``: that loop run eagerly (what a CPU runs; no padding rows). Layers without an adapter of the call's
  users are skipped, as in the eager path.
* ``"graph"`` (CUDA only): the decode step captured as a CUDA graph per (batch-size bucket 1, 2, 4, ..., cache
  length, adapters per row K) and replayed across steps and across later calls while the users change: rows are
  padded to the bucket with rows routed to no adapter, and routing is data, not shape (the buffers are refilled,
  the graph replayed). The capture routes with ``lora_slots=None`` (every patched layer runs), so a replay serves
  any users.
* ``"compile"``: the static decode step under ``torch.compile`` (``mode="reduce-overhead"`` on CUDA, plain compile
  elsewhere), one compiled step per bucket; the compiled forwards of one model run one at a time (dynamo cannot
  trace context variables, so the layers read the batch from :meth:`ForwardContext.compiled`).

The prefill runs eagerly into the static cache (with the prompt's own routing). Token selection follows HF's
``generate``: greedy ``argmax``, or HF's temperature / top-k / top-p / min-p warpers then ``torch.multinomial``
(the same draws as ``generate`` for the same ``torch.manual_seed``), ``eos_token_id`` stops a row (later tokens
are ``pad_token_id``) and the loop ends when every row has stopped. Unsupported ``generate`` arguments are refused
by name; so are users with steering vectors or soft prompts (not served by the static path yet: use
``decode="eager"``).

State lifetime: the runners (static cache, buffers, graph or compiled step) are cached on the
:class:`~pllm_kernels.hf.PersonalizedModel` (``pm.static_decode_stats()``; ``pm.clear_static_decode()`` frees
them); a runner serves one call at a time (concurrent calls take another runner of the same key, or build one).
A graph keeps the addresses of the model's weights and of the adapter slot buffers: the slots' contents may change
between calls (an evicted adapter's slot refilled in place with another's weights) because every call refills the
routing from its own plan, whose slots are pinned for the call; moving the model or the store (new tensors) changes
the runners' key, and runners of the old placement are dropped.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import threading
from collections import OrderedDict

import torch

from pllm_kernels.batch import LoRAMetaBuffers, PersonalBatch

__all__ = ["DECODE_MODES", "static_generate", "batch_bucket"]

DECODE_MODES = ("eager", "static", "graph", "compile")
MIN_CACHE_LEN = 64
MAX_IDLE_RUNNERS = 8

#: generate() arguments the static loop serves (others are refused by name)
_SUPPORTED = frozenset({"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "min_p",
                        "eos_token_id", "pad_token_id", "bos_token_id", "use_cache", "num_beams",
                        "num_return_sequences"})
#: HF's defaults for the fields the loop reads (transformers 5.x fills unset fields with these)
_DEFAULTS = dict(max_length=20, do_sample=False, temperature=1.0, top_k=50, top_p=1.0, use_cache=True, num_beams=1,
                 num_return_sequences=1)
#: generation-config fields that change the output unless at their neutral value: (name, neutral test)
_NEUTRAL = (
    ("num_beams", lambda v: v in (None, 1)), ("num_return_sequences", lambda v: v in (None, 1)),
    ("repetition_penalty", lambda v: v in (None, 1.0)), ("encoder_repetition_penalty", lambda v: v in (None, 1.0)),
    ("no_repeat_ngram_size", lambda v: not v), ("encoder_no_repeat_ngram_size", lambda v: not v),
    ("bad_words_ids", lambda v: not v), ("min_length", lambda v: not v), ("min_new_tokens", lambda v: not v),
    ("typical_p", lambda v: v in (None, 1.0)), ("epsilon_cutoff", lambda v: not v), ("eta_cutoff", lambda v: not v),
    ("top_h", lambda v: v is None), ("forced_bos_token_id", lambda v: v is None),
    ("forced_eos_token_id", lambda v: v is None), ("suppress_tokens", lambda v: not v),
    ("begin_suppress_tokens", lambda v: not v), ("sequence_bias", lambda v: not v),
    ("guidance_scale", lambda v: v in (None, 1.0)), ("exponential_decay_length_penalty", lambda v: v is None),
    ("renormalize_logits", lambda v: not v), ("remove_invalid_values", lambda v: not v),
    ("penalty_alpha", lambda v: v is None), ("dola_layers", lambda v: v is None),
    ("diversity_penalty", lambda v: not v), ("constraints", lambda v: not v), ("force_words_ids", lambda v: not v),
    ("stop_strings", lambda v: not v), ("max_time", lambda v: v is None), ("watermarking_config", lambda v: v is None),
    ("prompt_lookup_num_tokens", lambda v: v is None), ("output_scores", lambda v: not v),
    ("output_logits", lambda v: not v), ("return_dict_in_generate", lambda v: not v),
    ("output_attentions", lambda v: not v), ("output_hidden_states", lambda v: not v),
)


def batch_bucket(n: int) -> int:
    """The captured batch size serving ``n`` rows: the next power of two (1, 2, 4, 8, 16, 32, 64, ...)."""
    return 1 << max(0, int(n) - 1).bit_length()


def _pow2(n: int, lo: int) -> int:
    return max(lo, batch_bucket(n))


# ------------------------------------------------------------------------------------------------ arguments
@dataclasses.dataclass
class _Spec:
    max_new_tokens: int
    do_sample: bool
    warpers: list
    eos: torch.Tensor | None
    pad: int


def _spec(model, kwargs: dict, prompt_len: int, decode: str, device) -> _Spec:
    bad = sorted(k for k in kwargs if k not in _SUPPORTED)
    if bad:
        raise ValueError(f"decode={decode!r} does not support the generate argument(s) {', '.join(bad)}: the static "
                         f"loop serves {', '.join(sorted(_SUPPORTED))}; use decode='eager' (HF's generate) for others")
    gc = copy.deepcopy(getattr(model, "generation_config", None))
    fields = {} if gc is None else {k: v for k, v in gc.to_dict().items() if v is not None}
    for k, v in _DEFAULTS.items():
        fields.setdefault(k, v)
    explicit_max_len = "max_length" in kwargs
    fields.update(kwargs)
    refused = [name for name, neutral in _NEUTRAL if not neutral(fields.get(name))]
    if refused:
        raise ValueError(f"decode={decode!r} does not support {', '.join(f'{n}={fields[n]!r}' for n in refused)} "
                         "(from the arguments or the model's generation_config); use decode='eager'")
    if fields.get("use_cache") is False:
        raise ValueError(f"decode={decode!r} decodes with a static KV cache: use_cache=False is not supported")
    n = kwargs.get("max_new_tokens")
    if n is None and not explicit_max_len:
        n = fields.get("max_new_tokens")
    if n is None:
        n = int(fields["max_length"]) - prompt_len
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1 (got {n!r}; max_length={fields.get('max_length')!r} "
                         f"for a prompt of {prompt_len} tokens)")
    do_sample = bool(fields.get("do_sample"))
    warpers = []
    if do_sample:
        from transformers.generation import (
            MinPLogitsWarper,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        t, k, p, mp = fields.get("temperature"), fields.get("top_k"), fields.get("top_p"), fields.get("min_p")
        if t is not None and t != 1.0:
            warpers.append(TemperatureLogitsWarper(t))
        if k is not None and k != 0:
            warpers.append(TopKLogitsWarper(top_k=k, min_tokens_to_keep=1))
        if p is not None and p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=p, min_tokens_to_keep=1))
        if mp is not None:
            warpers.append(MinPLogitsWarper(min_p=mp, min_tokens_to_keep=1))
    eos = fields.get("eos_token_id")
    if eos is not None:
        eos = torch.as_tensor(eos if isinstance(eos, (list, tuple)) else [eos], dtype=torch.long, device=device)
        eos = eos.reshape(-1)
    pad = fields.get("pad_token_id")
    if pad is None:
        pad = int(eos[0]) if eos is not None else 0
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    return _Spec(n, do_sample, warpers, eos, int(pad))


def _check_plan(plan, decode: str) -> None:
    if plan is None:
        return
    why = []
    if plan.steering is not None:
        why.append("steering vectors (" + ", ".join(repr(r.user) for r in plan.rows
                                                     if r.profile is not None and r.profile.steering) + ")")
    if plan.soft_prompts is not None:
        why.append("soft prompts (" + ", ".join(repr(r.user) for r, p in zip(plan.rows, plan.soft_prompts)
                                                if p is not None) + ")")
    if why:
        raise ValueError(f"decode={decode!r} serves LoRA users only for now; users with {' and '.join(why)} need "
                         "decode='eager'")


# ------------------------------------------------------------------------------------------------ model facts
def _takes(model, arg: str) -> bool:
    try:
        return arg in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_kw(model) -> str:
    return "cache" if _takes(model, "cache") else "past_key_values"


def _text_config(model):
    cfg = getattr(model, "config", None)
    get = getattr(cfg, "get_text_config", None)
    return get(decoder=True) if callable(get) else cfg


def _tf_version() -> str:
    import transformers

    return transformers.__version__


def _compute_dtype(model) -> torch.dtype:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) else next(model.parameters()).dtype


def _fingerprint(pm) -> int:
    """Changes when the model's or the store's tensors are replaced (``model.to``, ``store.to``): a captured graph
    holds their addresses."""
    ptrs = [t.data_ptr() for t in pm.model.parameters()]
    ptrs += [t.data_ptr() for t in pm.model.buffers()]
    for b in list(pm.store.buffers.values()) + list(pm.store.groups.values()):
        ptrs += [b.lora_a.data_ptr(), b.lora_b.data_ptr(), b.slot_ranks.data_ptr(), b.slot_scales.data_ptr()]
    return hash(tuple(ptrs))


# ------------------------------------------------------------------------------------------------ runners
class _Runner:
    """The fixed-address state of one key ``(mode, rows, cache length, K, dtype, device, placement)``."""

    def __init__(self, pm, mode: str, rows: int, cache_len: int, k: int, dtype, device, need: int = 0):
        from transformers import StaticCache

        model = pm.model
        self.pm, self.mode, self.rows, self.cache_len, self.k = pm, mode, rows, cache_len, k
        self.dtype, self.device = dtype, device
        self.cache = StaticCache(config=model.config, max_cache_len=cache_len)
        for layer in getattr(self.cache, "layers", ()):
            if getattr(layer, "is_sliding", False) and getattr(layer, "max_cache_len", cache_len) < cache_len:
                raise ValueError(
                    f"decode={mode!r}: {type(model).__name__} has sliding-window layers (window "
                    f"{layer.max_cache_len}) and this generation needs {need} positions (prompt + max_new_tokens); "
                    "the static path serves sliding layers only within their window: use decode='eager'")
        self.cache_kw = _cache_kw(model)
        self.takes_cache_position = _takes(model, "cache_position")
        self.takes_logits_to_keep = _takes(model, "logits_to_keep")
        self.min = torch.finfo(dtype).min
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.mask = torch.full((rows, 1, 1, cache_len), self.min, dtype=dtype, device=device)
        self.cache_pos = torch.zeros(1, dtype=torch.long, device=device)
        self.routing = LoRAMetaBuffers(rows, k, pm.store.num_slots, device)
        self.batch = PersonalBatch(lora=self.routing.meta, lora_slots=None)
        self.graph = None
        self.graph_logits = None
        self.compiled = None
        self.busy = False
        self.checked = False

    # -------------------------------------------------------------------------------- per call
    def reset(self) -> None:
        """Ready the cache for a new call without moving its tensors (positions are written from 0 again)."""
        for layer in getattr(self.cache, "layers", ()):
            cl = getattr(layer, "cumulative_length", None)
            if isinstance(cl, torch.Tensor):
                cl.zero_()
            elif isinstance(cl, int):
                layer.cumulative_length = 0
            if hasattr(layer, "cumulative_length_int"):
                layer.cumulative_length_int = 0

    def fill_routing(self, plan, B: int) -> None:
        """The decode step's routing for this call's rows (padding rows and missing adapters: ``-1``)."""
        slots = torch.full((self.rows, self.k), -1, dtype=torch.int32, device=self.device)
        weights = torch.zeros(self.rows, self.k, dtype=torch.float32, device=self.device)
        if plan is not None and plan.lora_slots.numel():
            K = plan.lora_slots.shape[1]
            slots[:B, :K] = plan.lora_slots.to(self.device)
            weights[:B, :K] = plan.lora_weights.to(self.device)
        self.routing.fill(slots, weights)

    def _model_kwargs(self, ids, mask, pos, cache_pos, logits_to_keep=None) -> dict:
        kw = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": True,
              self.cache_kw: self.cache}
        if self.takes_cache_position:
            kw["cache_position"] = cache_pos
        if logits_to_keep is not None and self.takes_logits_to_keep:
            kw["logits_to_keep"] = logits_to_keep
        return kw

    def prefill(self, ids, mask2d, pos, plan, B: int) -> torch.Tensor:
        """Run the prompt ``(rows, S)`` into the cache (eagerly, with the prompt's own routing); returns the last
        position's logits ``(rows, V)``."""
        pm, S = self.pm, ids.shape[1]
        L = self.cache_len
        keep = mask2d.bool()
        causal = torch.ones(S, S, dtype=torch.bool, device=self.device).tril()
        allowed = torch.zeros(self.rows, 1, S, L, dtype=torch.bool, device=self.device)
        allowed[:, 0, :, :S] = causal[None] & keep[:, None, :]
        mask4 = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, self.min)
        batch = PersonalBatch()
        if plan is not None and plan.active_slots:
            slots = torch.full((self.rows, plan.lora_slots.shape[1]), -1, dtype=torch.int32, device=self.device)
            weights = torch.zeros(slots.shape, dtype=torch.float32, device=self.device)
            slots[:B] = plan.lora_slots.to(self.device)
            weights[:B] = plan.lora_weights.to(self.device)
            batch = PersonalBatch.from_rows(slots, pm.store.num_slots, weights, attention_mask=mask2d,
                                            active_slots=plan.active_slots)
        cache_pos = torch.arange(S, device=self.device)
        with pm.context.pinned(batch, self.rows, S):
            out = pm.model(**self._model_kwargs(ids, mask4, pos, cache_pos, logits_to_keep=1))
        if not self.checked:  # once per runner: this transformers version wrote the prompt where we think it did
            seen = self.cache.get_seq_length()
            if int(seen) != S:
                raise RuntimeError(f"decode={self.mode!r}: after a prompt of {S} tokens the StaticCache reports "
                                   f"{int(seen)} cached positions (transformers {_tf_version()}): the static path "
                                   "does not know this version's cache positions; use decode='eager'")
            self.checked = True
        # the decode mask: the prompt's keys, nothing beyond yet
        self.mask.fill_(self.min)
        self.mask[:, 0, 0, :S].masked_fill_(keep, 0.0)
        self.pos.copy_(pos[:, -1:])
        return out.logits[:, -1]

    # -------------------------------------------------------------------------------- per step
    def _forward(self) -> torch.Tensor:
        out = self.pm.model(**self._model_kwargs(self.ids, self.mask, self.pos, self.cache_pos))
        return out.logits

    def step(self, tokens: torch.Tensor, position: int, plan) -> torch.Tensor:
        """One decode step: ``tokens (rows,)`` written at cache position ``position``; returns logits ``(rows, V)``
        (for ``graph``, a view of the graph's output buffer, valid until the next replay)."""
        self.ids.copy_(tokens[:, None])
        self.pos.add_(1)
        self.mask[:, 0, 0, position] = 0.0
        self.cache_pos.fill_(position)
        ctx = self.pm.context
        if self.mode == "static":
            batch = self.batch
            if plan is not None:  # layers no user of this call has an adapter at skip themselves (eager only)
                batch = dataclasses.replace(batch, lora_slots=plan.active_slots) if plan.active_slots else \
                    PersonalBatch()
            else:
                batch = PersonalBatch()
            with ctx.pinned(batch, self.rows, 1):
                return self._forward()[:, -1]
        if self.mode == "compile":
            if self.compiled is None:
                on_cuda = self.device.type == "cuda"
                self.compiled = torch.compile(self._forward, dynamic=False,
                                              mode="reduce-overhead" if on_cuda else None)
                _bump(self.pm, "compiles")
            with ctx.compiled(self.batch):
                if self.device.type == "cuda":  # a new iteration: the previous step's outputs were copied out
                    torch.compiler.cudagraph_mark_step_begin()
                return self.compiled()[:, -1]
        # graph
        if self.graph is None:
            # warm-up: this step runs eagerly on a side stream (lazy initialisation, kernel compilation), then the
            # same step is captured for the following ones
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), ctx.pinned(self.batch, self.rows, 1):
                logits = self._forward()[:, -1].clone()
            torch.cuda.current_stream(self.device).wait_stream(side)
            logits.record_stream(torch.cuda.current_stream(self.device))
            graph = torch.cuda.CUDAGraph()
            with ctx.pinned(self.batch, self.rows, 1), \
                    torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.graph_logits = self._forward()
            self.graph = graph
            _bump(self.pm, "captures")
            return logits
        self.graph.replay()
        _bump(self.pm, "replays")
        return self.graph_logits[:, -1]


class _Pool:
    """The model's runners by key; a runner serves one call at a time."""

    def __init__(self):
        self.lock = threading.Lock()
        self.runners: OrderedDict = OrderedDict()  # key -> [runners]

    def acquire(self, key, make):
        with self.lock:
            for r in self.runners.get(key, ()):
                if not r.busy:
                    r.busy = True
                    self.runners.move_to_end(key)
                    return r
        r = make()  # built outside the lock (a StaticCache allocates lazily, at the prefill)
        r.busy = True
        with self.lock:
            self.runners.setdefault(key, []).append(r)
            self.runners.move_to_end(key)
            self._trim(key[-1])
        return r

    def release(self, r) -> None:
        with self.lock:
            r.busy = False

    def _trim(self, placement) -> None:
        for key in [k for k in self.runners if k[-1] != placement]:  # an old placement: its tensors are gone
            self.runners[key] = [r for r in self.runners[key] if r.busy]
        idle = [(k, r) for k, rs in self.runners.items() for r in rs if not r.busy]
        for k, r in idle[:max(0, len(idle) - MAX_IDLE_RUNNERS)]:
            self.runners[k].remove(r)
        for k in [k for k, rs in self.runners.items() if not rs]:
            del self.runners[k]

    def clear(self) -> int:
        with self.lock:
            n = 0
            for k in list(self.runners):
                keep = [r for r in self.runners[k] if r.busy]
                n += len(self.runners[k]) - len(keep)
                if keep:
                    self.runners[k] = keep
                else:
                    del self.runners[k]
            return n

    def count(self) -> int:
        with self.lock:
            return sum(len(rs) for rs in self.runners.values())


def _state(pm):
    d = pm.__dict__
    if "_static_pool" not in d:
        d.setdefault("_static_pool", _Pool())
        d.setdefault("_static_stats", {"captures": 0, "replays": 0, "compiles": 0, "calls": 0})
    return d["_static_pool"], d["_static_stats"]


def _bump(pm, name: str) -> None:
    pool, stats = _state(pm)
    with pool.lock:
        stats[name] += 1


# ------------------------------------------------------------------------------------------------ the loop
def static_generate(pm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, plan, decode: str,
                    kwargs: dict) -> torch.Tensor:
    """``generate`` through the static path (see the module docstring); ``plan``: the call's resolved
    :class:`~pllm_kernels.batch.BatchPlan` (or ``None``: every row is the base model). Returns prompt + new
    tokens ``(B, S + n)`` like ``generate``."""
    if decode not in DECODE_MODES[1:]:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    if "inputs_embeds" in kwargs:
        raise ValueError(f"decode={decode!r} needs input_ids (inputs_embeds is not supported)")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"decode={decode!r} needs input_ids of shape (B, S)")
    device = input_ids.device
    if decode == "graph" and device.type != "cuda":
        raise ValueError(f"decode='graph' captures CUDA graphs, but input_ids are on {device}: use decode='static' "
                         "(the same static loop run eagerly) or decode='compile' off CUDA")
    model = pm.model
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl not in (None, "eager", "sdpa"):
        raise ValueError(f"decode={decode!r} passes a 4-D additive attention mask, which attention implementation "
                         f"{impl!r} does not take: load the model with attn_implementation='sdpa' or 'eager', or use "
                         "decode='eager'")
    _check_plan(plan, decode)
    if decode == "graph" or (decode == "compile" and device.type == "cuda"):  # compile: reduce-overhead captures
        _check_capturable(pm, decode)
    B, S = input_ids.shape
    mask2d = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
    if mask2d.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask2d.shape)}, input_ids {tuple(input_ids.shape)}")
    if S == 0 or not bool(mask2d[:, -1].all()):
        raise ValueError(f"decode={decode!r} needs left padding (every row's last prompt position a real token); "
                         "pad on the left (tokenizer.padding_side = 'left')")
    spec = _spec(model, kwargs, S, decode, device)
    N = spec.max_new_tokens
    dtype = _compute_dtype(model)
    K = 1 if plan is None or not plan.lora_slots.numel() else int(plan.lora_slots.shape[1])
    if decode == "static":
        rows, k = B, K
    else:
        rows, k = batch_bucket(B), max(2, batch_bucket(K))  # K >= 2: shared + personal batches and K=1 ones share
    cache_len = _pow2(S + N, MIN_CACHE_LEN)
    window = getattr(_text_config(model), "sliding_window", None)
    if isinstance(window, int) and S + N <= window < cache_len:  # sliding layers serve the whole generation
        cache_len = window
    pool, _ = _state(pm)
    _bump(pm, "calls")
    # inference tensors (made under torch.inference_mode) cannot be updated in place outside it, and vice versa
    key = (decode, rows, cache_len, k, dtype, device, torch.is_inference_mode_enabled(), _fingerprint(pm))
    runner = pool.acquire(key, lambda: _Runner(pm, decode, rows, cache_len, k, dtype, device, S + N))
    try:
        with torch.no_grad():
            return _loop(runner, input_ids, mask2d, plan, spec, B, S, N)
    finally:
        pool.release(runner)


def _check_capturable(pm, decode: str) -> None:
    from pllm_kernels.ops._backend import default_backend

    torch_layers = [n for n, m in pm.patched.items() if (m.lora_backend or default_backend()) == "torch"]
    if torch_layers:
        raise ValueError(f"decode={decode!r}: {len(torch_layers)} patched layers (e.g. {torch_layers[0]}) use the "
                         "torch backend, whose LoRA path reads routing on the host and cannot be captured in a CUDA "
                         "graph; use pm.set_backend('auto') (Triton / CUDA kernels) or decode='static'")


def _loop(runner: _Runner, input_ids, mask2d, plan, spec: _Spec, B: int, S: int, N: int) -> torch.Tensor:
    device = input_ids.device
    rows = runner.rows
    ids = input_ids
    if rows > B:  # padding rows: a prompt of pad tokens, routed to no adapter; their tokens are dropped
        ids = torch.cat([ids, ids.new_full((rows - B, S), spec.pad)])
        mask2d = torch.cat([mask2d, mask2d.new_ones(rows - B, S)])
    pos = (mask2d.cumsum(-1) - 1).masked_fill_(mask2d == 0, 0)
    runner.reset()
    runner.fill_routing(plan, B)
    out = torch.full((B, S + N), spec.pad, dtype=input_ids.dtype, device=device)
    out[:, :S] = input_ids
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    logits = runner.prefill(ids, mask2d, pos, plan, B)
    n = 0
    while True:
        scores = logits[:B].to(dtype=torch.float32, copy=True)
        for w in spec.warpers:
            scores = w(out[:, :S + n], scores)
        if spec.do_sample:
            tok = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tok = torch.argmax(scores, dim=-1)
        if spec.eos is not None:
            tok = torch.where(unfinished, tok, torch.full_like(tok, spec.pad))
        out[:, S + n] = tok
        n += 1
        if spec.eos is not None:
            unfinished &= ~torch.isin(tok, spec.eos)
        if n == N or (spec.eos is not None and not bool(unfinished.any())):
            break
        step_tok = tok if rows == B else torch.cat([tok, tok.new_full((rows - B,), spec.pad)])
        logits = runner.step(step_tok, S + n - 1, plan)
    return out[:, :S + n]
