"""``MultiLoRALinear``: a base linear layer plus the batch's per-token LoRA adapters (Punica-style multi-LoRA).

The layer keeps the original module as ``base_layer`` (weights untouched), computes its output, then adds
``sum_k w[t,k] * scale[slot] * B[slot] A[slot] x[t]`` for every token through :func:`pllm_kernels.ops.lora_apply`
on the ``(tokens, out_features)`` view of that output. The routing comes from the model's
:class:`pllm_kernels.batch.ForwardContext`: a :class:`pllm_kernels.batch.PersonalBatch` built **once per model
forward** and private to the calling thread, never rebuilt per layer; layers keep no per-call state of their own,
so concurrent forwards on one model are safe. Rows whose slots are all ``-1`` keep the base output bit for bit.

The wrapper is transparent to ``state_dict`` / ``load_state_dict`` (keys as without it: ``q_proj.weight``, not
``q_proj.base_layer.weight``; the slot buffers are not in it) and to ``model.to(...)`` / ``.half()`` / ``.cuda()``,
which move the base layer and then hand the conversion to the store that owns the slot buffers (``on_apply``).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from pllm_kernels.batch import ForwardContext, PersonalBatch
from pllm_kernels.modules._wrap import call_inner, make_transparent
from pllm_kernels.ops.lora import lora_apply, prepare_lora_apply

__all__ = ["LoRAGroup", "MultiLoRALinear"]


def _check_device(where: str, x: torch.Tensor, lora_a: torch.Tensor) -> None:
    if x.device != lora_a.device:
        raise RuntimeError(
            f"{where}: the input x is on {x.device} but the adapter slot buffers (lora_a, lora_b, slot_ranks, "
            f"slot_scales) are on {lora_a.device}. Move the model after patching with model.to(...) / .cuda() (the "
            f"slot buffers follow it), or move the store with store.to({str(x.device)!r}); models split over "
            "several devices (device_map) are not supported yet"
        )


def _touched(batch: PersonalBatch, meta) -> torch.Tensor:
    """``(T, 1)`` bool: tokens with at least one adapter (once per forward, kept in the batch's scratch)."""
    t = batch.scratch.get("lora_touched")
    if t is None:
        t = ((meta.token_slots >= 0) & (meta.token_slots < meta.num_slots)).any(1, keepdim=True)
        batch.scratch["lora_touched"] = t
    return t


def _add_rows(y2: torch.Tensor, delta: torch.Tensor, touched: torch.Tensor) -> None:
    """``y2 += delta`` on the touched rows only (``torch.where``, no host sync): rows without an adapter keep their
    bits (adding a zero delta would turn -0.0 into +0.0)."""
    y2.copy_(torch.where(touched, y2 + delta.to(y2.dtype), y2))


class LoRAGroup:
    """Runtime side of a group of targets that read the same input (q/k/v, gate/up; see the store's
    ``GroupBuffers``): the first member called in a forward runs the base layer of **every** member on that input
    and one multi-slice ``lora_apply`` whose per-slice outputs are those members' outputs (x read once; one LoRA
    call per group instead of one per member; no delta buffer, no add per member); the other members then return
    their already personalized output.

    The outputs waiting for their member live in the forward's :class:`PersonalBatch` (``scratch``), never on this
    object, and are handed out only to a member called with the very same input tensor in the same forward;
    anything else (a member fed another input, a member called twice) recomputes, so sharing is never wrong, only
    sometimes not taken.
    """

    def __init__(self, buffers):
        self.buffers = buffers  # the store's GroupBuffers (its tensors are replaced when the store moves)
        self._key = ("group", buffers.name)  # this group's entry in a forward's scratch
        self._validated = None
        self._prepared = None  # the last call's PreparedLoRA (any thread's: each call checks it fits its own)
        self._members: dict[str, weakref.ref] = {}
        self._wrappers = None

    def attach(self, name: str, layer: MultiLoRALinear) -> None:
        """Register the patched layer serving member ``name`` (its base layer is run for the group)."""
        self._members[name] = weakref.ref(layer)
        layers = [self._members.get(m) for m in self.buffers.members]
        layers = [None if r is None else r() for r in layers]
        # every member attached: their wrappers in slice order (a reference cycle with them, collected with them)
        self._wrappers = None if any(w is None for w in layers) else tuple(layers)

    def _layers(self):
        """The members' base layers in slice order, or None while a member is not attached."""
        wrappers = self._wrappers
        if wrappers is None:
            return None
        return [w._modules["base_layer"] for w in wrappers]

    def _validate_key(self, member: str, x2: torch.Tensor, meta):
        if torch.compiler.is_compiling():  # traced: checked in eager before, and data_ptr() would break the graph
            return self._validated, False
        g = self.buffers
        vkey = (x2.get_device(), x2.dtype, meta.num_slots, meta.k, g.lora_a.data_ptr(), g.lora_a.get_device())
        validate = self._validated != vkey
        if validate:
            _check_device(f"{member} (group {g.name})", x2, g.lora_a)
        return vkey, validate

    def take(self, member: str, x: torch.Tensor, batch: PersonalBatch) -> torch.Tensor | None:
        """``member``'s output computed by the group on this very ``x`` in this forward (handed out once), or None."""
        hit = batch.scratch.get(self._key)
        if hit is None or hit[0] is not x or hit[1] != x.shape:
            return None
        out = hit[2].pop(member, None)
        if out is not None and not hit[2]:
            del batch.scratch[self._key]
        return out

    def serve(self, member: str, y: torch.Tensor, x: torch.Tensor, x2: torch.Tensor, batch: PersonalBatch, meta,
              backend=None, strategy="auto", rows3d: bool = False) -> torch.Tensor:
        """The personalized output of ``member`` whose base output on ``x`` is ``y`` (contiguous; ``x2``: the 2-D view
        of ``x``; ``rows3d``: ``x`` is a contiguous ``(B, 1, H)`` decode input); the other members' outputs wait in
        the batch's scratch for :meth:`take`."""
        g = self.buffers
        layers = self._layers()
        if layers is None or y.dtype != x2.dtype:
            return self._serve_alone(member, y, x2, batch, meta, backend, strategy)
        members = g.members
        outs = [y if m == member else call_inner(layers[i], x) for i, m in enumerate(members)]
        dtype = y.dtype
        for o in outs:
            if o.dtype != dtype or not o.is_contiguous():
                return self._serve_alone(member, y, x2, batch, meta, backend, strategy)
        # the prepared call is eager-only: under dynamo the registered op is traced (its checks read versions)
        prep = None if torch.compiler.is_dynamo_compiling() else self._prepared
        if prep is not None and prep.valid(meta, x2, g.lora_a, g.lora_b, g.slot_ranks, g.slot_scales):
            # a decode step like the last one: its plan, no per-call checks or planning
            if rows3d and prep.run_rows is not None:
                prep.run_rows(outs, x)  # the (B, 1, N) outputs as they are
            else:
                T = x2.shape[0]
                prep.run([o.view(T, n) for o, n in zip(outs, g.slice_sizes)], x2)
        else:
            T = x2.shape[0]
            ys = [o.view(T, n) for o, n in zip(outs, g.slice_sizes)]
            vkey, validate = self._validate_key(member, x2, meta)
            lora_apply(ys, x2, g.lora_a, g.lora_b, g.slot_ranks, g.slot_scales, meta, g.slice_sizes,
                       backend=backend, strategy=strategy, validate=validate)
            if validate:
                self._validated = vkey
            self._prepared = prepare_lora_apply(x2, g.lora_a, g.lora_b, g.slot_ranks, g.slot_scales, meta,
                                                g.slice_sizes, backend=backend, strategy=strategy)
        # x itself (not a weak reference): the entry lives as long as the forward's scratch, and an id is never reused
        batch.scratch[self._key] = (x, x.shape, {m: o for m, o in zip(members, outs) if m != member})
        return y

    def _serve_alone(self, member, y, x2, batch, meta, backend, strategy) -> torch.Tensor:
        """Fallback (members not all attached, or outputs in another dtype than the slot buffers): the group's
        deltas into a temporary, this member's slice added on the touched rows."""
        g = self.buffers
        vkey, validate = self._validate_key(member, x2, meta)
        d = torch.zeros(x2.shape[0], sum(g.slice_sizes), dtype=x2.dtype, device=x2.device)
        lora_apply(d, x2, g.lora_a, g.lora_b, g.slot_ranks, g.slot_scales, meta, g.slice_sizes,
                   backend=backend, strategy=strategy, validate=validate)
        self._validated = vkey
        i = g.members.index(member)
        off, n = g.offsets[i], g.slice_sizes[i]
        y = y if y.is_contiguous() else y.contiguous()
        _add_rows(y.view(-1, n), d[:, off : off + n], _touched(batch, meta))
        return y


class MultiLoRALinear(nn.Module):
    """A patched ``nn.Linear`` / GPT-2 ``Conv1D`` / fused projection serving many adapters in one batch.

    Args:
        base_layer: the original module (kept as ``self.base_layer``; called unchanged).
        buffers: the target's slot buffers (:class:`pllm_kernels.store.TargetBuffers`: ``lora_a (L, S, R, in)``,
            ``lora_b (L, out, R)``, ``slot_ranks``, ``slot_scales``, ``slice_sizes``, ``ranks_host``).
        context: the model's :class:`pllm_kernels.batch.ForwardContext`.
        in_features, out_features: of the base layer (for ``Conv1D`` the weight is ``(in, out)``).
        group: ``(LoRAGroup, slice index, target name)`` when this target shares its input with siblings.
        name: the target's name in the model (for error messages).
        on_apply: called with the function of every ``nn.Module._apply`` (``model.to(...)``, ``.half()``,
            ``.cuda()``, ...) after the base layer was converted: the owner of the slot buffers converts them
            (:meth:`pllm_kernels.store.AdapterStore.follow`; it must be cheap when nothing changes).
        backend, strategy: passed to :func:`pllm_kernels.ops.lora_apply` (``None`` = the process default backend).
    """

    def __init__(self, base_layer: nn.Module, buffers, context: ForwardContext, in_features: int, out_features: int,
                 group: tuple[LoRAGroup, int, str] | None = None, *, name: str = "", on_apply=None,
                 backend: str | None = None, strategy: str = "auto"):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        # Plain attributes (not submodules / buffers): the store owns the tensors, refills them in place and
        # moves them itself (nn.Module's buffer conversion would cast the float32 scales with the weights and
        # turn the grouped targets' views into separate copies).
        self.__dict__["lora_buffers"] = buffers
        self.__dict__["lora_context"] = context
        self.__dict__["lora_group"] = group
        self.__dict__["lora_name"] = name or "MultiLoRALinear"
        self.__dict__["lora_on_apply"] = on_apply
        self.__dict__["lora_backend"] = backend
        self.__dict__["lora_strategy"] = strategy
        if group is not None:
            group[0].attach(group[2], self)
        make_transparent(self, "base_layer")

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        on_apply = self.__dict__.get("lora_on_apply")
        if on_apply is not None:
            on_apply(fn)
        return out

    @property
    def weight(self):  # code that reads `layer.weight` (tied weights, dtype probes) keeps working
        return self.base_layer.weight

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    def extra_repr(self) -> str:
        buf = self.lora_buffers
        return (f"in={self.in_features}, out={self.out_features}, slots={buf.lora_a.shape[0]}, "
                f"max_rank={buf.lora_a.shape[2]}, slices={buf.slice_sizes}")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        batch = self.lora_context.batch
        if batch is None or batch.lora is None:
            return call_inner(self._modules["base_layer"], x, *args, **kwargs)
        group = self.lora_group
        if group is not None and not args and not kwargs and group[0]._key in batch.scratch:
            done = group[0].take(group[2], x, batch)  # computed by the group's first member on this very input
            if done is not None:
                return done
        buf = self.lora_buffers
        # A grouped member follows its group's activity so that every member consumes the shared deltas.
        slots = batch.lora_slots
        if slots is not None:
            rh = (group[0].buffers if group is not None else buf).ranks_host
            for s in slots:
                if rh[s]:
                    break
            else:
                return call_inner(self._modules["base_layer"], x, *args, **kwargs)
        y = call_inner(self._modules["base_layer"], x, *args, **kwargs)
        meta = batch.lora
        contiguous = x.is_contiguous()
        x2 = x.view(-1, self.in_features) if contiguous else x.reshape(-1, self.in_features)
        if x2.shape[0] != meta.token_slots.shape[0]:
            raise RuntimeError(
                f"MultiLoRALinear: the batch metadata routes {meta.num_tokens} tokens but this layer sees "
                f"{x2.shape[0]} (was the model called outside the patched forward/generate with other inputs?)"
            )
        if not y.is_contiguous():
            y = y.contiguous()
        if x2.dtype != buf.lora_a.dtype:  # slot buffers in another dtype (patch_model(dtype=...), store.to(dtype=))
            x2 = x2.to(buf.lora_a.dtype)
        shape = x.shape
        rows3d = contiguous and len(shape) == 3 and shape[1] == 1  # a decode step's (B, 1, H) input
        if group is not None:
            runtime, _i, name = group
            return runtime.serve(name, y, x, x2, batch, meta, self.lora_backend, self.lora_strategy, rows3d)
        y2 = y.view(-1, self.out_features)
        prep = None if torch.compiler.is_dynamo_compiling() else self.__dict__.get("_prepared")  # eager-only
        if prep is not None and y2.dtype == x2.dtype and prep.valid(meta, x2, buf.lora_a, buf.lora_b, buf.slot_ranks,
                                                                    buf.slot_scales):
            # a decode step like the last one: its plan, no per-call checks or planning
            if rows3d and prep.run_rows is not None and y.dim() == 3:
                prep.run_rows([y], x)
            else:
                prep.run([y2], x2)
            return y
        # Full argument checks once per (device, dtype, routing layout, buffer placement); after that the per-call
        # checks are skipped (~150 calls per decode step): the store validated the adapters and built the routing.
        if torch.compiler.is_compiling():  # traced: checked in eager before, and data_ptr() would break the graph
            key, validate = self.__dict__.get("_validated"), False
        else:
            key = (x2.get_device(), x2.dtype, y2.dtype, meta.num_slots, meta.k, buf.lora_a.data_ptr(),
                   buf.lora_a.get_device())
            validate = self.__dict__.get("_validated") != key
        if validate:
            _check_device(self.lora_name, x2, buf.lora_a)
        out = y2 if y2.dtype == x2.dtype else torch.zeros(y2.shape, dtype=x2.dtype, device=x2.device)
        lora_apply(out, x2, buf.lora_a, buf.lora_b, buf.slot_ranks, buf.slot_scales, meta, buf.slice_sizes,
                   backend=self.lora_backend, strategy=self.lora_strategy, validate=validate)
        if out is not y2:
            _add_rows(y2, out, _touched(batch, meta))
        else:
            self.__dict__["_prepared"] = prepare_lora_apply(x2, buf.lora_a, buf.lora_b, buf.slot_ranks,
                                                            buf.slot_scales, meta, buf.slice_sizes,
                                                            backend=self.lora_backend, strategy=self.lora_strategy)
        if validate:
            self.__dict__["_validated"] = key
        return y
