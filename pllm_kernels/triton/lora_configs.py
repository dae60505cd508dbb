"""Launch configurations of the multi-LoRA Triton kernels: hand-picked defaults and a per-shape table tuned offline.

Every launch of :mod:`pllm_kernels.triton.lora` asks :func:`lookup` for its block sizes, warps, stages and split-K
with the launch's shape: ``pairs`` (``T*K`` token-slot pairs), ``rank`` (the width of v per token: ``R*S`` for
shrink and fused, the buffer's max rank ``R`` for expand), ``dim`` (``h_in`` for shrink and fused, the total
output width ``N`` for expand) and ``m`` (``BLOCK_M`` of the SGMV kernels, the metadata chunk). The answer is
:data:`DEFAULTS` of the kernel overlaid with the best matching entry of the table (none: the defaults as they are).

The table is ``lora_configs.json`` next to this file (shipped with the package), or the file named by
``$PLLM_LORA_CONFIGS``; ``python -m pllm_kernels.bench.tune_lora --out FILE`` writes one on a GPU. Format::

    {"schema": 1,
     "entries": [{"kernel": "expand_bgmv", "gpu": "NVIDIA H100 80GB HBM3", "pairs": [1, 2], "rank": [16, 16],
                  "config": {"BLOCK_N": 32}, "source": "tune_lora 2025-..., 1.9 us vs 2.4 us default"}, ...]}

``gpu`` is the device name as ``torch.cuda.get_device_name`` reports it, a capability ``"sm_90"``, or ``"*"``.
``pairs`` / ``rank`` / ``dim`` / ``m`` are optional inclusive ranges ``[lo, hi]`` (``null`` for an open end);
a missing field matches every value. Among the entries of the kernel that match the shape, the most specific GPU
key wins (name, then capability, then ``"*"``), then the entry that constrains more fields, then the first in the
file. A bad table (unknown kernel or key, illegal value) is an error at load time, never a silent default: every
configuration in the shipped table is compiled for sm_80 and sm_90 by tests/triton/test_lora_aot.py.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path

import torch

__all__ = ["DEFAULTS", "TABLE_PATH", "config_for", "gpu_keys", "load_table", "lookup", "table", "table_configs"]

TABLE_PATH = Path(__file__).with_name("lora_configs.json")
ENV_VAR = "PLLM_LORA_CONFIGS"
SCHEMA = 1

# ----------------------------------------------------------------------------------------------------------------
# Hand-picked defaults (used wherever the table has no entry). SGMV kernels use BLOCK_M = the metadata chunk
# (16 / 32 / 64, batch.choose_chunk); ``num_warps_m64`` is their warp count at BLOCK_M = 64.
# ----------------------------------------------------------------------------------------------------------------
DEFAULTS: dict[str, dict[str, int]] = {
    # x tile (chunk x 64) read once for all slices; rank*S <= 64 (r16 x qkv) is a single N tile.
    # 8 warps at BLOCK_M = 64 keep the gathered-row pointers and the accumulator out of local memory.
    "shrink_sgmv": {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_warps_m64": 8, "num_stages": 3,
                    "MAX_SPLIT_K": 16},
    # 128 contiguous h_in elements per A row = 256 B fp16 loads; 32x128 fp32 partials = 32 regs/thread.
    # Split-K up to 64 (at least one BLOCK_K per split) so that decode grids fill the SMs.
    "shrink_bgmv": {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 2, "MAX_SPLIT_K": 64},
    # chunk x 128 fp32 accumulator; rank loop in steps of 16 (the minimum tl.dot K) stops at the slot rank.
    "expand_sgmv": {"BLOCK_N": 128, "BLOCK_R": 16, "num_warps": 4, "num_warps_m64": 8, "num_stages": 2},
    # 64 output columns x 32 rank columns per step: 64 B contiguous per B row (fp16), four 16-byte loads each.
    # (128 columns: ptxas caps the kernel at 80 registers and spills one across the rank loop.) 64 also gives
    # twice the programs at decode sizes (T = 1: 96 programs for Llama-3-8B qkv instead of 48 on 132 SMs).
    "expand_bgmv": {"BLOCK_N": 64, "BLOCK_R": 32, "num_warps": 4, "num_stages": 2},
    # register tiles of FUSED_TILE elements: BLOCK_K = FUSED_TILE // (S_PAD * R_PAD) (>= 16), BLOCK_N the same
    # (>= 32), see lora.fused_blocks.
    "fused": {"FUSED_TILE": 4096, "num_warps": 4, "num_stages": 1},
}

# keys a table entry may set, per kernel (SPLIT_K: a fixed split instead of the SM-filling choice)
TUNABLE: dict[str, tuple[str, ...]] = {
    "shrink_sgmv": ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "MAX_SPLIT_K", "SPLIT_K"),
    "shrink_bgmv": ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "MAX_SPLIT_K", "SPLIT_K"),
    "expand_sgmv": ("BLOCK_N", "BLOCK_R", "num_warps", "num_stages"),
    "expand_bgmv": ("BLOCK_N", "BLOCK_R", "num_warps", "num_stages"),
    "fused": ("FUSED_TILE", "num_warps", "num_stages"),
}
MATCH_FIELDS = ("pairs", "rank", "dim", "m")
SPLIT_LIMIT = 64  # largest split-K any configuration may ask for (the BGMV expand sums that many partials)
_POW2_KEYS = ("BLOCK_N", "BLOCK_K", "BLOCK_R", "FUSED_TILE", "MAX_SPLIT_K", "SPLIT_K")
_LIMITS = {"BLOCK_N": (16, 512), "BLOCK_K": (16, 512), "BLOCK_R": (8, 128), "FUSED_TILE": (1024, 16384),
           "MAX_SPLIT_K": (1, SPLIT_LIMIT), "SPLIT_K": (1, SPLIT_LIMIT), "num_warps": (1, 16), "num_stages": (1, 6)}


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def validate_config(kernel: str, config: dict, where: str = "config") -> None:
    """Raise ValueError unless ``config`` only sets tunable keys of ``kernel`` to legal values."""
    if kernel not in TUNABLE:
        raise ValueError(f"{where}: unknown kernel {kernel!r} (one of {sorted(TUNABLE)})")
    for key, val in config.items():
        if key not in TUNABLE[kernel]:
            raise ValueError(f"{where}: {kernel} has no tunable {key!r} (one of {TUNABLE[kernel]})")
        if not isinstance(val, int) or isinstance(val, bool):
            raise ValueError(f"{where}: {key} must be an int, got {val!r}")
        lo, hi = _LIMITS[key]
        if not lo <= val <= hi or (key in _POW2_KEYS or key == "num_warps") and not _is_pow2(val):
            raise ValueError(f"{where}: {key}={val} must be {'a power of two ' if key in _POW2_KEYS else ''}"
                             f"in [{lo}, {hi}]")
    if kernel == "expand_sgmv" and config.get("BLOCK_R", 16) < 16:
        raise ValueError(f"{where}: expand_sgmv BLOCK_R must be >= 16 (tl.dot K)")


def _validate_entry(e: dict, i: int) -> dict:
    where = f"entry {i}"
    if not isinstance(e, dict):
        raise ValueError(f"{where}: expected an object, got {e!r}")
    unknown = set(e) - {"kernel", "gpu", "config", "source", *MATCH_FIELDS}
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
    if not isinstance(e.get("gpu", "*"), str):
        raise ValueError(f"{where}: gpu must be a string")
    validate_config(e.get("kernel"), e.get("config", {}), where)
    for f in MATCH_FIELDS:
        if f in e:
            r = e[f]
            if not (isinstance(r, list) and len(r) == 2 and all(v is None or isinstance(v, int) for v in r)):
                raise ValueError(f"{where}: {f} must be [lo, hi] (ints or null), got {r!r}")
    return {"gpu": "*", "config": {}, **e}


def load_table(path: str | os.PathLike | None = None) -> list[dict]:
    """The validated entries of a table file (default: ``$PLLM_LORA_CONFIGS`` or the shipped one)."""
    explicit = path or os.environ.get(ENV_VAR)
    path = Path(explicit or TABLE_PATH)
    if not explicit and not path.exists():  # an install that left the JSON out: defaults everywhere, said once
        warnings.warn(f"{path} is missing: the multi-LoRA Triton kernels use their default configurations",
                      stacklevel=2)
        return []
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("entries"), list):
        raise ValueError(f"{path}: expected {{'schema': {SCHEMA}, 'entries': [...]}}")
    return [_validate_entry(e, i) for i, e in enumerate(data["entries"])]


_TABLE: list[dict] | None = None


def table() -> list[dict]:
    """The entries in use (loaded once)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = load_table()
    return _TABLE


def set_table(entries: list[dict] | None) -> None:
    """Use ``entries`` (validated) instead of the file; ``None`` reloads the file on next use (tuning, tests)."""
    global _TABLE
    _TABLE = None if entries is None else [_validate_entry(e, i) for i, e in enumerate(entries)]
    _lookup.cache_clear()


@functools.lru_cache(maxsize=16)
def _gpu_keys_of(index: int) -> tuple[str, ...]:
    major, minor = torch.cuda.get_device_capability(index)
    return (torch.cuda.get_device_name(index), f"sm_{major}{minor}", "*")


def gpu_keys(device: torch.device) -> tuple[str, ...]:
    """Table GPU keys of ``device``, most specific first; ``("*",)`` without a GPU (interpreter, CPU)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return ("*",)
    return _gpu_keys_of(device.index if device.index is not None else torch.cuda.current_device())


def _matches(e: dict, shape: dict) -> bool:
    for f in MATCH_FIELDS:
        if f in e and f in shape:
            lo, hi = e[f]
            if (lo is not None and shape[f] < lo) or (hi is not None and shape[f] > hi):
                return False
        elif f in e:  # the entry constrains a field this kernel's launches do not have
            return False
    return True


def best_entry(entries: list[dict], kernel: str, gpus: tuple[str, ...], shape: dict) -> dict | None:
    best, best_key = None, None
    for i, e in enumerate(entries):
        if e["kernel"] != kernel or e["gpu"] not in gpus or not _matches(e, shape):
            continue
        key = (gpus.index(e["gpu"]), -sum(f in e for f in MATCH_FIELDS), i)
        if best_key is None or key < best_key:
            best, best_key = e, key
    return best


def config_for(kernel: str, overrides: dict | None = None, m: int | None = None) -> dict:
    """DEFAULTS of ``kernel`` overlaid with ``overrides``, resolved for ``BLOCK_M = m`` (SGMV warps)."""
    cfg = {**DEFAULTS[kernel], **(overrides or {})}
    warps_m64 = cfg.pop("num_warps_m64", None)
    if warps_m64 is not None and m is not None and m >= 64 and "num_warps" not in (overrides or {}):
        cfg["num_warps"] = warps_m64
    return cfg


@functools.lru_cache(maxsize=4096)
def _lookup(kernel: str, gpus: tuple[str, ...], shape: tuple) -> tuple:
    shape_d = dict(shape)
    e = best_entry(table(), kernel, gpus, shape_d)
    return tuple(sorted(config_for(kernel, e["config"] if e else None, shape_d.get("m")).items()))


def lookup(kernel: str, device: torch.device, **shape: int) -> dict:
    """Resolved launch configuration of ``kernel`` for a launch of this shape on ``device`` (cached)."""
    return dict(_lookup(kernel, gpu_keys(device), tuple(sorted(shape.items()))))


def table_configs(kernel: str, m: int | None = None) -> list[tuple[str, dict]]:
    """``(label, resolved config)`` of every entry of the table for ``kernel`` (SGMV kernels: the entries that admit
    ``BLOCK_M = m``), for the AOT test: every configuration that can run is compiled."""
    out = []
    for i, e in enumerate(table()):
        if e["kernel"] == kernel and (m is None or "m" not in e or _matches({"m": e["m"]}, {"m": m})):
            out.append((f"t{i}", config_for(kernel, e["config"], m)))
    return out
