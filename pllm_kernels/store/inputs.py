"""Input-layer assets of users: steering vectors in per-layer device slot tables, and soft prompts.

* Steering (ActAdd / CAA / StyleVector): a user's entry ``(layer, vector (hidden,), scale, mode)`` occupies one
  slot of that layer's table ``vectors (steer_slots, hidden)`` float32 + ``modes (steer_slots,)`` int32 on the
  model's device while a request uses it; tables follow the same slot rules as the LoRA buffers (LRU reuse, pinned
  while in flight: :mod:`pllm_kernels.store.slots`), so a batch of thousands of users needs no per-step host work.
* Soft prompts (prompt tuning / PPlug user embeddings): ``(n, hidden)`` float32 host copies, spliced per row.

Vectors and prompts load from tensors or from the files steering-vectors / repeng / PEFT users already have:
safetensors, or ``.pt`` files that load with ``torch.load(weights_only=True)`` (pickled objects are refused) holding
a tensor or a ``{layer: tensor}`` dict (``SteeringVector.layer_activations``, repeng's ``directions``), or a PEFT
prompt-tuning adapter (``prompt_embeddings``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pllm_kernels.store.peft_import import AdapterError
from pllm_kernels.store.slots import SlotPool

__all__ = ["InputAssets", "SteeringEntry", "STEER_MODES", "load_soft_prompt", "load_vectors"]

STEER_MODES = {"add": 0, "ablate": 1, "ablate_add": 2, "norm_preserve": 3}  # = pllm_kernels.reference.steer.MODES


@dataclass(frozen=True)
class SteeringEntry:
    """One steering vector of one user: ``vector (hidden,)`` float32 (host), applied at ``layer``'s output."""

    key: tuple
    layer: int
    vector: torch.Tensor
    scale: float
    mode: int

    @property
    def mode_name(self) -> str:
        return {v: k for k, v in STEER_MODES.items()}[self.mode]


def _read_tensors(path: str, what: str):
    if not os.path.isfile(path):
        raise AdapterError(f"{what}: {path} is not a file")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise AdapterError(f"{what}: {path} is not a valid safetensors file ({e})") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is refused the same way
        raise AdapterError(f"{what}: {path} could not be loaded with torch.load(weights_only=True) ({e}); pickled "
                           "objects are refused: save the tensors (e.g. vector.layer_activations) or use safetensors"
                           ) from e


def _layer_of(key) -> int | None:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    m = re.search(r"(-?\d+)$", str(key))
    return int(m.group(1)) if m else None


def load_vectors(source, what: str = "steering vectors") -> dict[int | None, torch.Tensor]:
    """``{layer: vector}`` from a tensor (layer ``None``), a ``{layer: tensor}`` mapping, or a file (safetensors /
    ``.pt``) holding either (keys ``12``, ``"12"``, ``"layer.12"``, ``"model.layers.12"``)."""
    if isinstance(source, (str, os.PathLike)):
        source = _read_tensors(os.fspath(source), what)
    if isinstance(source, torch.Tensor):
        return {None: source}
    if isinstance(source, Mapping):
        out = {}
        for k, v in source.items():
            layer = _layer_of(k)
            if layer is None:
                if len(source) == 1:
                    return {None: v}
                raise AdapterError(f"{what}: cannot read a layer index from key {k!r} (use {{layer: tensor}})")
            out[layer] = v
        if not out:
            raise AdapterError(f"{what}: no vectors found")
        return out
    raise AdapterError(f"{what}: expected a tensor, a {{layer: tensor}} dict or a file path, got "
                       f"{type(source).__name__}")


def load_soft_prompt(source, what: str = "soft prompt") -> torch.Tensor:
    """``(n, hidden)`` from a tensor, a PEFT prompt-tuning adapter directory / file (``prompt_embeddings``) or a file
    holding one tensor."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            for name in ("adapter_model.safetensors", "adapter_model.bin"):
                if os.path.isfile(os.path.join(path, name)):
                    path = os.path.join(path, name)
                    break
            else:
                raise AdapterError(f"{what}: no adapter_model.safetensors in {path}")
        source = _read_tensors(path, what)
    if isinstance(source, Mapping):
        keys = [k for k in source if str(k).endswith("prompt_embeddings")] or list(source)
        if len(keys) != 1:
            raise AdapterError(f"{what}: expected one tensor (or 'prompt_embeddings'), got keys {list(source)[:6]}")
        source = source[keys[0]]
    if not isinstance(source, torch.Tensor):
        raise AdapterError(f"{what}: expected a tensor (n, hidden), got {type(source).__name__}")
    return source


class InputAssets:
    """Steering tables and soft prompts of a store (see the module docstring).

    Args:
        num_layers, hidden: of the model (layers are its decoder blocks, 0-based).
        steer_slots: rows of each layer's vector table (the most distinct vectors one batch may use per layer).
        device: of the tables.
    """

    def __init__(self, num_layers: int, hidden: int, steer_slots: int, device):
        if steer_slots < 1:
            raise ValueError(f"steer_slots must be >= 1, got {steer_slots}")
        self.num_layers = int(num_layers)
        self.hidden = int(hidden)
        self.steer_slots = int(steer_slots)
        self.device = torch.device(device)
        self.entries: dict[tuple, SteeringEntry] = {}
        self.pools: dict[int, SlotPool] = {}
        self.tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------------------------------ checks
    def check_vector(self, user: str, layer, vector, scale, mode) -> tuple[int, torch.Tensor, float, int]:
        what = f"user {user!r}: steering vector"
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"{what}: layer must be an int, got {layer!r}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"{what}: layer {layer} is out of range: the model has {self.num_layers} decoder layers "
                             f"(0..{self.num_layers - 1})")
        if not isinstance(vector, torch.Tensor):
            raise ValueError(f"{what}: expected a torch.Tensor, got {type(vector).__name__}")
        if not vector.is_floating_point():
            raise ValueError(f"{what}: dtype {vector.dtype} is not a floating dtype")
        if vector.device.type not in ("cpu", self.device.type):
            raise ValueError(f"{what}: is on {vector.device} but the model is on {self.device}")
        if vector.device.type == "meta":
            raise ValueError(f"{what}: is on the meta device (no values)")
        v = vector.detach()
        if v.dim() == 2 and v.shape[0] == 1:
            v = v[0]
        if v.dim() != 1 or v.shape[0] != self.hidden:
            raise ValueError(f"{what}: expected shape ({self.hidden},) (the model's hidden size), got "
                             f"{tuple(vector.shape)}")
        v = v.to("cpu", torch.float32, copy=True)
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{what}: has non-finite values (NaN / inf, or beyond float32)")
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: scale must be a real number, got {scale!r}") from None
        if not math.isfinite(scale) or abs(scale) > 3.4e38:
            raise ValueError(f"{what}: scale must be finite, got {scale}")
        if isinstance(mode, str):
            if mode not in STEER_MODES:
                raise ValueError(f"{what}: mode must be one of {list(STEER_MODES)}, got {mode!r}")
            mode = STEER_MODES[mode]
        elif mode not in STEER_MODES.values() or isinstance(mode, bool):
            raise ValueError(f"{what}: mode must be one of {list(STEER_MODES)}, got {mode!r}")
        return layer, v, scale, int(mode)

    def check_prompt(self, user: str, embeds) -> torch.Tensor:
        what = f"user {user!r}: soft prompt"
        if not isinstance(embeds, torch.Tensor):
            raise ValueError(f"{what}: expected a torch.Tensor (n, hidden), got {type(embeds).__name__}")
        if not embeds.is_floating_point():
            raise ValueError(f"{what}: dtype {embeds.dtype} is not a floating dtype")
        if embeds.device.type not in ("cpu", self.device.type) or embeds.device.type == "meta":
            raise ValueError(f"{what}: is on {embeds.device} but the model is on {self.device}")
        e = embeds.detach()
        if e.dim() == 3 and e.shape[0] == 1:
            e = e[0]
        if e.dim() != 2 or e.shape[1] != self.hidden or e.shape[0] < 1:
            raise ValueError(f"{what}: expected shape (n >= 1, {self.hidden}) (the model's hidden size), got "
                             f"{tuple(embeds.shape)}")
        e = e.to("cpu", torch.float32, copy=True)
        if not bool(torch.isfinite(e).all()):
            raise ValueError(f"{what}: has non-finite values")
        return e

    # ------------------------------------------------------------------------------------------ tables
    def pool(self, layer: int) -> SlotPool:
        if layer not in self.pools:
            self.pools[layer] = SlotPool(self.steer_slots, f"steer{layer}")
            self.tables[layer] = (torch.zeros(self.steer_slots, self.hidden, dtype=torch.float32, device=self.device),
                                  torch.zeros(self.steer_slots, dtype=torch.int32, device=self.device))
        return self.pools[layer]

    def steer_requests(self, steering: Mapping[int, list]) -> list:
        """``[(pool, keys, load)]`` for :func:`pllm_kernels.store.slots.lease_pools` (layer -> entry keys)."""
        return [(self.pool(layer), keys, self._loader(layer)) for layer, keys in steering.items() if keys]

    def _loader(self, layer: int):
        def load(key, slot):
            e = self.entries[key]
            vectors, modes = self.tables[layer]
            self.pools[layer].free(slot)
            vectors[slot].copy_(e.vector)
            modes[slot] = e.mode
            self.pools[layer].take(key, slot)

        return load

    def drop(self, keys) -> None:
        for key in keys:
            e = self.entries.pop(key, None)
            if e is not None and e.layer in self.pools and key in self.pools[e.layer].slot_of:
                self.pools[e.layer].free(self.pools[e.layer].slot_of[key])

    def pinned(self, keys) -> list:
        return [k for k in keys if k in self.entries and self.entries[k].layer in self.pools
                and self.pools[self.entries[k].layer].pinned(k)]

    def in_flight(self) -> int:
        return sum(sum(p.pins) for p in self.pools.values())

    def to(self, device) -> None:
        """Move the tables (values kept)."""
        device = torch.device(device)
        if device == self.device:
            return
        if self.device.type == "meta":  # no values to keep: reload the resident entries
            self.tables = {layer: (torch.zeros(t[0].shape, device=device), torch.zeros(t[1].shape, dtype=torch.int32,
                                                                                      device=device))
                           for layer, t in self.tables.items()}
            for layer, pool in self.pools.items():
                for slot, key in enumerate(list(pool.owner)):
                    if key is not None:
                        self._loader(layer)(key, slot)
        else:
            self.tables = {layer: (v.to(device), m.to(device)) for layer, (v, m) in self.tables.items()}
        self.device = device

    def check_consistent(self) -> None:
        for layer, pool in self.pools.items():
            assert all(p >= 0 for p in pool.pins), (layer, pool.pins)
            for key, slot in pool.slot_of.items():
                assert pool.owner[slot] == key and key in self.entries, (layer, key, slot)
                e = self.entries[key]
                assert e.layer == layer
                assert torch.equal(self.tables[layer][0][slot].cpu(), e.vector), (layer, key)
