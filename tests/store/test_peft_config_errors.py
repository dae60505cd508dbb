"""PEFT config fields of the wrong type / range are refused with an AdapterError naming the adapter and the field."""

import math

import pytest
import torch

from pllm_kernels.store.peft_import import AdapterError, load_peft_adapter

MOD = "model.layers.0.self_attn.q_proj"


def _sd(r=4):
    g = torch.Generator().manual_seed(0)
    return {
        f"base_model.model.{MOD}.lora_A.weight": torch.randn(r, 16, generator=g),
        f"base_model.model.{MOD}.lora_B.weight": torch.randn(16, r, generator=g),
    }


def _cfg(**overrides):
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    cfg.update(overrides)
    return cfg


BAD = [
    # (field named in the error, config overrides)
    ("r", {"r": "abc"}),
    ("r", {"r": "4"}),
    ("r", {"r": 8.5}),
    ("r", {"r": True}),
    ("r", {"r": 0}),
    ("r", {"r": -4}),
    ("r", {"r": [4]}),
    ("lora_alpha", {"lora_alpha": "16"}),
    ("lora_alpha", {"lora_alpha": True}),
    ("lora_alpha", {"lora_alpha": [8]}),
    ("lora_alpha", {"lora_alpha": math.nan}),
    ("lora_alpha", {"lora_alpha": math.inf}),
    ("lora_alpha", {"lora_alpha": -math.inf}),
    ("lora_alpha", {"lora_alpha": 10**400}),  # a Python int too large for a float
    ("lora_alpha", {"lora_alpha": 1e40}),  # finite, but the scale 1e40 / 4 overflows float32
    ("lora_alpha", {"lora_alpha": 1e39, "use_rslora": True}),  # 1e39 / sqrt(4) overflows float32
    ("alpha_pattern", {"alpha_pattern": "q_proj"}),
    ("alpha_pattern", {"alpha_pattern": [("q_proj", 2.0)]}),
    ("alpha_pattern", {"alpha_pattern": {"q_proj": "2"}}),
    ("alpha_pattern", {"alpha_pattern": {"q_proj": None}}),
    ("alpha_pattern", {"alpha_pattern": {"q_proj": math.nan}}),
    ("alpha_pattern", {"alpha_pattern": {"q_proj": 1e40}}),
    ("alpha_pattern", {"alpha_pattern": {"q_proj(": 2.0}}),
    ("alpha_pattern", {"alpha_pattern": {1: 2.0}}),
    ("rank_pattern", {"rank_pattern": "q_proj"}),
    ("rank_pattern", {"rank_pattern": {"q_proj": "4"}}),
    ("rank_pattern", {"rank_pattern": {"q_proj": 4.5}}),
    ("rank_pattern", {"rank_pattern": {"q_proj": 0}}),
    ("rank_pattern", {"rank_pattern": {"q_proj": True}}),
    ("rank_pattern", {"rank_pattern": {"q_proj[": 4}}),
    ("target_modules", {"target_modules": 5}),
    ("target_modules", {"target_modules": {"q_proj": 1}}),
    ("target_modules", {"target_modules": ["q_proj", 5]}),
    ("target_modules", {"target_modules": "q_proj("}),
    ("exclude_modules", {"exclude_modules": 5}),
    ("exclude_modules", {"exclude_modules": ["k_proj", None]}),
    ("exclude_modules", {"exclude_modules": "k_proj("}),
    ("layers_to_transform", {"layers_to_transform": "abc"}),
    ("layers_to_transform", {"layers_to_transform": [0, "1"]}),
    ("layers_to_transform", {"layers_to_transform": 0.5}),
    ("layers_to_transform", {"layers_to_transform": True}),
    ("layers_pattern", {"layers_to_transform": [0], "layers_pattern": 5}),
    ("layers_pattern", {"layers_to_transform": [0], "layers_pattern": ["layers", 3]}),
    ("layers_pattern", {"layers_to_transform": [0], "layers_pattern": "layers("}),
    ("use_rslora", {"use_rslora": "false"}),
    ("use_rslora", {"use_rslora": "true"}),
    ("use_rslora", {"use_rslora": 1}),
    ("use_dora", {"use_dora": "false"}),
    ("use_dora", {"use_dora": 0}),
    ("fan_in_fan_out", {"fan_in_fan_out": "no"}),
    ("fan_in_fan_out", {"fan_in_fan_out": 1}),
]


@pytest.mark.parametrize(("field", "overrides"), BAD, ids=[f"{f}={o[f]!r}"[:60] for f, o in BAD])
def test_bad_config_field_refused(field, overrides):
    with pytest.raises(AdapterError, match=f"adapter 'x': config field '{field}'") as info:
        load_peft_adapter(_sd(), _cfg(**overrides), name="x")
    assert len(str(info.value)) < 400  # the offending value is shown, but truncated


def test_valid_dict_passes():
    ad = load_peft_adapter(_sd(), _cfg(), name="x")
    assert sorted(ad.modules) == [MOD]
    assert ad.modules[MOD].scale == 2.0 and ad.modules[MOD].rank == 4


def test_peft_lora_config_passes():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    for cfg in (config, config.to_dict()):  # to_dict(): target_modules is a set, rank_pattern {} ...
        ad = load_peft_adapter(_sd(), cfg, name="x")
        assert sorted(ad.modules) == [MOD] and ad.modules[MOD].scale == 2.0


def test_none_fields_mean_peft_defaults():
    fields = "r lora_alpha use_rslora use_dora fan_in_fan_out rank_pattern alpha_pattern exclude_modules"
    cfg = dict.fromkeys((*fields.split(), "layers_to_transform", "layers_pattern"))
    cfg["target_modules"] = ["q_proj"]
    ad = load_peft_adapter(_sd(r=8), cfg, name="x")  # r=None -> 8, lora_alpha=None -> r
    assert ad.modules[MOD].rank == 8 and ad.modules[MOD].scale == 1.0


def test_integral_float_rank_and_bool_flags_accepted():
    cfg = _cfg(r=4.0, rank_pattern={"q_proj": 4.0}, use_rslora=False, use_dora=False, fan_in_fan_out=True)
    assert load_peft_adapter(_sd(), cfg, name="x").modules[MOD].scale == 2.0


def test_rslora_scale():
    ad = load_peft_adapter(_sd(), _cfg(use_rslora=True), name="x")
    assert ad.modules[MOD].scale == pytest.approx(8 / math.sqrt(4))


def test_alpha_pattern_scale():
    ad = load_peft_adapter(_sd(), _cfg(alpha_pattern={"q_proj": 2.0}), name="x")
    assert ad.modules[MOD].scale == pytest.approx(2 / 4)


def test_large_but_representable_alpha_passes():
    ad = load_peft_adapter(_sd(), _cfg(lora_alpha=1e39), name="x")  # scale 2.5e38 < float32 max
    assert math.isfinite(torch.tensor(ad.modules[MOD].scale, dtype=torch.float32).item())


def test_rank_pattern_overrides_r():
    ad = load_peft_adapter(_sd(), _cfg(r=8, rank_pattern={"q_proj": 4}), name="x")
    assert ad.modules[MOD].rank == 4 and ad.modules[MOD].scale == 2.0


def test_target_modules_regex_string():
    ad = load_peft_adapter(_sd(), _cfg(target_modules=r".*\.(q|k)_proj"), name="x")
    assert sorted(ad.modules) == [MOD]


@pytest.mark.parametrize("layers_pattern", [None, "layers", ["blocks", "layers"]])
def test_layers_to_transform(layers_pattern):
    cfg = _cfg(layers_to_transform=[0], layers_pattern=layers_pattern)
    assert sorted(load_peft_adapter(_sd(), cfg, name="x").modules) == [MOD]
    cfg = _cfg(layers_to_transform=1, layers_pattern=layers_pattern)
    with pytest.raises(AdapterError, match="no LoRA weights found"):
        load_peft_adapter(_sd(), cfg, name="x")


def test_exclude_modules_still_honoured():
    with pytest.raises(AdapterError, match="no LoRA weights found"):
        load_peft_adapter(_sd(), _cfg(exclude_modules=["q_proj"]), name="x")


def test_dora_still_refused():
    with pytest.raises(AdapterError, match="DoRA"):
        load_peft_adapter(_sd(), _cfg(use_dora=True), name="x")
