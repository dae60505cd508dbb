"""Import PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``, or a state dict).

Only what the multi-LoRA kernels compute exactly is accepted: plain LoRA ``y += scale * B (A x)`` on linear
layers, with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA), honouring ``rank_pattern`` /
``alpha_pattern``, ``target_modules`` (list, regex or ``"all-linear"``), ``exclude_modules``,
``layers_to_transform`` / ``layers_pattern`` and ``fan_in_fan_out`` (which only changes how PEFT *merges*: the
stored ``lora_A (r, in)`` / ``lora_B (out, r)`` are the same either way). Everything else is refused with an
:class:`AdapterError` that says what is unsupported: DoRA, trained biases (``bias != "none"``, ``lora_bias``),
embedding / ``lm_head`` LoRA (checked against the model's targets by the store), ``modules_to_save``, non-LoRA
PEFT types, and pickled ``.bin`` weights unless they load with ``torch.load(weights_only=True)``.

No transformers or peft import: configs are plain dicts (or any object with the same attributes, e.g. a
``peft.LoraConfig``).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["AdapterError", "LoRAModuleWeights", "LoRAAdapter", "load_peft_adapter", "config_to_dict"]

_KEY_RE = re.compile(r"^(?P<mod>.+?)\.lora_(?P<ab>A|B)(?:\.(?P<name>[^.]+))?\.weight$")
_PREFIXES = ("base_model.model.",)
_F32_MAX = float(torch.finfo(torch.float32).max)


class AdapterError(ValueError):
    """An adapter cannot be imported or registered (bad file, unsupported feature, shape mismatch, ...)."""


@dataclass
class LoRAModuleWeights:
    """One target module's LoRA: ``a (r, in_features)``, ``b (out_features, r)``, ``scale`` (alpha/r or rslora)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class LoRAAdapter:
    """A parsed adapter: module name (as in the base model's ``named_modules()``) -> weights."""

    name: str
    modules: dict[str, LoRAModuleWeights]
    config: dict = field(default_factory=dict)
    source: str = "<state dict>"

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)


def config_to_dict(config) -> dict:
    """A PEFT config as a plain dict (accepts a dict, a ``peft.LoraConfig`` or any object with attributes)."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    return {k: v for k, v in vars(config).items() if not k.startswith("_")}


def _pattern_key(pattern_keys, key: str) -> str:
    """PEFT's ``get_pattern_key``: the first pattern that matches a suffix of ``key`` (else ``key``)."""
    for pk in pattern_keys:
        if re.match(rf"(.*\.)?({pk})$", key):
            return pk
    return key


def _targeted(cfg: dict, key: str) -> bool:
    """PEFT's ``check_target_module_exists`` for a module name, minus what needs the model (``all-linear``)."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith("." + e) for e in exclude):
            return False
    target = cfg.get("target_modules")
    if target is None or target == "all-linear" or target == ["all-linear"]:
        found = True  # the weights present are the truth; lm_head etc. are refused by the store
    elif isinstance(target, str):
        found = re.fullmatch(target, key) is not None
    else:
        found = key in target or any(key.endswith("." + t) for t in target)
    if not found:
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or (isinstance(layers, (list, tuple)) and len(layers) == 0):
        return True
    if isinstance(layers, int):
        layers = [layers]
    pattern = cfg.get("layers_pattern")
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return match is not None and int(match.group("idx")) in set(int(i) for i in layers)


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field_error(name: str, fld: str, what: str, value) -> AdapterError:
    return AdapterError(f"adapter {name!r}: config field {fld} must be {what}, got {_short(value)}")


def _as_pos_int(value) -> int | None:
    """``value`` as an int >= 1 (ints and integral floats; never bools or strings), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        value = int(value)
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    else:
        return None
    return value if value >= 1 else None


def _as_finite_real(value) -> float | None:
    """``value`` as a finite float (real numbers only; never bools or strings), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        value = float(value)
    except (OverflowError, ValueError, TypeError):  # e.g. an int too large for a float
        return None
    return value if math.isfinite(value) else None


def _check_regex(name: str, fld: str, pattern: str, compiled: str) -> None:
    """``pattern`` (config field ``fld``) must compile as used (``compiled`` embeds it)."""
    try:
        re.compile(pattern)  # first on its own, so that a reported error position is one in the user's pattern
        re.compile(compiled)
    except re.error as e:
        raise AdapterError(
            f"adapter {name!r}: config field {fld} is not a valid regular expression ({pattern!r}: {e})"
        ) from e


def _check_module_names(cfg: dict, name: str, key: str) -> None:
    """``target_modules`` / ``exclude_modules``: ``None``, a regex string, or a list / tuple / set of names."""
    value = cfg.get(key)
    fld = repr(key)
    if value is None:
        return
    if isinstance(value, str):
        _check_regex(name, fld, value, value)
        return
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise _field_error(name, fld, "None, a regex string or a list of module names", value)
    for item in value:
        if not isinstance(item, str):
            raise _field_error(name, fld, "a list of module names (strings); one entry is not a string", item)


def _check_field_types(cfg: dict, name: str) -> None:
    """Type / range checks of every config field the import reads, so that nothing below can fail on them."""
    r = cfg.get("r")
    if r is not None and _as_pos_int(r) is None:
        raise _field_error(name, "'r'", "a positive integer", r)
    alpha = cfg.get("lora_alpha")
    if alpha is not None and _as_finite_real(alpha) is None:
        raise _field_error(name, "'lora_alpha'", "a finite real number", alpha)
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        value = cfg.get(key)
        if value is not None and not isinstance(value, bool):
            raise _field_error(name, repr(key), "a bool (true / false)", value)
    for key, check, what in (
        ("rank_pattern", _as_pos_int, "a positive integer"),
        ("alpha_pattern", _as_finite_real, "a finite real number"),
    ):
        pattern = cfg.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, Mapping):
            raise _field_error(name, repr(key), "a dict of {module pattern: value}", pattern)
        for pk, value in pattern.items():
            if not isinstance(pk, str):
                raise _field_error(name, repr(key), "a dict with string keys (module patterns)", pk)
            _check_regex(name, f"{key!r}[{pk!r}]", pk, rf"(.*\.)?({pk})$")
            if check(value) is None:
                raise _field_error(name, f"{key!r}[{pk!r}]", what, value)
    _check_module_names(cfg, name, "target_modules")
    _check_module_names(cfg, name, "exclude_modules")
    layers = cfg.get("layers_to_transform")
    if layers is not None:
        items = [layers] if not isinstance(layers, (list, tuple)) else layers
        if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in items):
            raise _field_error(name, "'layers_to_transform'", "None, a layer index or a list of layer indices", layers)
    lpattern = cfg.get("layers_pattern")
    if lpattern is not None:
        items = [lpattern] if isinstance(lpattern, str) else lpattern
        if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
            raise _field_error(name, "'layers_pattern'", "None, a regex string or a list of them", lpattern)
        for p in items:
            _check_regex(name, "'layers_pattern'", p, rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.")


def _check_config(cfg: dict, name: str) -> None:
    ptype = str(cfg.get("peft_type", "LORA")).upper().split(".")[-1]
    if ptype != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {ptype!r} is not supported (only LORA)")
    _check_field_types(cfg, name)
    if cfg.get("use_dora"):
        raise AdapterError(f"adapter {name!r}: DoRA (use_dora=True) is not supported by the multi-LoRA kernels")
    if str(cfg.get("bias", "none")) != "none" or cfg.get("lora_bias"):
        raise AdapterError(
            f"adapter {name!r}: trained biases (bias={cfg.get('bias')!r}, lora_bias={cfg.get('lora_bias')!r}) "
            "are not supported; retrain with bias='none'"
        )
    if cfg.get("modules_to_save"):
        raise AdapterError(
            f"adapter {name!r}: modules_to_save={cfg['modules_to_save']!r} (fully trained modules) is not supported"
        )
    for opt in ("trainable_token_indices", "alora_invocation_tokens"):
        if cfg.get(opt):
            raise AdapterError(f"adapter {name!r}: {opt} is not supported")


def _load_weights(path: str, name: str) -> dict[str, torch.Tensor]:
    st = os.path.join(path, "adapter_model.safetensors")
    binf = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(st):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(st, device="cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise AdapterError(f"adapter {name!r}: {st} is not a valid safetensors file ({e})") from e
    if os.path.isfile(binf):
        try:
            sd = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is refused the same way
            raise AdapterError(
                f"adapter {name!r}: {binf} could not be loaded with torch.load(weights_only=True) ({e}); "
                "pickled weights are refused, convert the adapter to safetensors"
            ) from e
        if not isinstance(sd, Mapping):
            raise AdapterError(f"adapter {name!r}: {binf} does not hold a state dict")
        return dict(sd)
    raise AdapterError(f"adapter {name!r}: no adapter_model.safetensors (or adapter_model.bin) in {path}")


def load_peft_adapter(source, config=None, name: str | None = None) -> LoRAAdapter:
    """Parse a PEFT LoRA adapter into per-module ``(A, B, scale)``.

    Args:
        source: a directory holding ``adapter_config.json`` + ``adapter_model.safetensors`` (or a ``.bin`` that
            loads with ``weights_only=True``), or a state dict as produced by ``get_peft_model_state_dict`` /
            ``save_pretrained`` (keys ``base_model.model.<module>.lora_A.weight``; an adapter-name segment
            ``lora_A.<name>.weight`` is accepted too).
        config: the adapter config (dict or ``peft.LoraConfig``); required with a state dict, read from the
            directory otherwise (an explicit one overrides the file).
        name: adapter name used in error messages.
    Raises:
        AdapterError: unreadable / corrupt files, unsupported features, inconsistent A/B shapes.
    """
    name = name or (os.path.basename(os.path.normpath(source)) if isinstance(source, (str, os.PathLike)) else "?")
    src_desc = "<state dict>"
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        src_desc = path
        if not os.path.isdir(path):
            raise AdapterError(f"adapter {name!r}: {path} is not a directory")
        if config is None:
            cfg_path = os.path.join(path, "adapter_config.json")
            if not os.path.isfile(cfg_path):
                raise AdapterError(f"adapter {name!r}: no adapter_config.json in {path}")
            try:
                with open(cfg_path) as f:
                    config = json.load(f)
            except (OSError, ValueError) as e:
                raise AdapterError(f"adapter {name!r}: cannot read {cfg_path} ({e})") from e
        state = _load_weights(path, name)
    elif isinstance(source, Mapping):
        if config is None:
            raise AdapterError(f"adapter {name!r}: a config (dict or peft.LoraConfig) is required with a state dict")
        state = dict(source)
    else:
        raise AdapterError(f"adapter {name!r}: source must be a directory or a state dict, got {type(source).__name__}")

    cfg = config_to_dict(config)
    _check_config(cfg, name)
    # the values below were type-checked by _check_config; None means PEFT's default
    r_default = _as_pos_int(cfg["r"]) if cfg.get("r") is not None else 8
    alpha_default = _as_finite_real(cfg["lora_alpha"]) if cfg.get("lora_alpha") is not None else float(r_default)
    rank_pattern = dict(cfg.get("rank_pattern") or {})
    alpha_pattern = dict(cfg.get("alpha_pattern") or {})
    use_rslora = bool(cfg.get("use_rslora") or False)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise AdapterError(f"adapter {name!r}: entry {key!r} is not a tensor")
        if "lora_magnitude_vector" in key:
            raise AdapterError(f"adapter {name!r}: DoRA weights ({key}) are not supported")
        if "lora_embedding_" in key:
            raise AdapterError(f"adapter {name!r}: embedding LoRA ({key}) is not supported")
        m = _KEY_RE.match(key)
        if m is None:
            if key.endswith(".bias") and ".lora_" in key:
                raise AdapterError(f"adapter {name!r}: trained LoRA biases ({key}) are not supported")
            raise AdapterError(
                f"adapter {name!r}: unexpected entry {key!r} (only lora_A/lora_B weights are supported; "
                "modules_to_save, biases and other PEFT methods are refused)"
            )
        mod = m.group("mod")
        for p in _PREFIXES:
            if mod.startswith(p):
                mod = mod[len(p):]
        pairs.setdefault(mod, {})[m.group("ab")] = t

    modules: dict[str, LoRAModuleWeights] = {}
    for mod, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: module {mod} has lora_{'A' if 'A' in ab else 'B'} only")
        if not _targeted(cfg, mod):
            continue  # PEFT would not create a LoRA layer here (target_modules / layers_to_transform)
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"adapter {name!r}: module {mod} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                "expected (r, in_features) and (out_features, r)"
            )
        r = int(a.shape[0])
        rkey = _pattern_key(rank_pattern.keys(), mod)
        r_cfg = _as_pos_int(rank_pattern[rkey]) if rkey in rank_pattern else r_default
        if r != r_cfg:
            raise AdapterError(f"adapter {name!r}: module {mod} has rank {r} but the config says r={r_cfg}")
        akey = _pattern_key(alpha_pattern.keys(), mod)
        if akey in alpha_pattern:
            alpha, alpha_fld = _as_finite_real(alpha_pattern[akey]), f"'alpha_pattern'[{akey!r}]"
        else:
            alpha, alpha_fld = alpha_default, "'lora_alpha'"
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        if not (math.isfinite(scale) and abs(scale) <= _F32_MAX):
            raise AdapterError(
                f"adapter {name!r}: config field {alpha_fld} = {alpha!r} gives module {mod} the scale "
                f"{alpha!r}/{'sqrt(' + str(r) + ')' if use_rslora else r} = {scale!r}, not representable in float32"
            )
        modules[mod] = LoRAModuleWeights(a=a.detach().cpu(), b=b.detach().cpu(), scale=scale)
    if not modules:
        raise AdapterError(f"adapter {name!r}: no LoRA weights found (matching its target_modules) in {src_desc}")
    return LoRAAdapter(name=name, modules=modules, config=cfg, source=src_desc)
