"""Presets, overrides from strings and Python, JSON round trip, clear errors."""

import json

import pytest

from hpkit.pipeline.config import PRESETS, Config, dumps, from_dict, get_config, override, to_dict


def test_presets_carry_table_6_and_the_official_values():
    coco, city, potsdam = get_config("cocostuff27"), get_config("cityscapes27"), get_config("potsdam3")
    assert (coco.loss.pool_size, coco.loss.tau, coco.loss.rho, coco.model.dim) == (2048, 0.8, 0.02, 512)
    assert (city.loss.pool_size, city.loss.tau, city.train.epochs) == (2048, 0.6, 20)
    assert (potsdam.loss.pool_size, potsdam.loss.tau, potsdam.model.backbone) == (1024, 0.4, "dino_vitb8")
    assert coco.optim.lr == 5e-4 and coco.optim.weight_decay == 0.1
    assert get_config("demo").data.dataset == "synthetic" and set(PRESETS) >= {"cocostuff27", "demo"}


def test_overrides_from_strings_are_typed():
    cfg = get_config("demo", ["loss.tau=0.5", "train.epochs=1", "loss.lhp=false", "model.weights=/w.pth",
                              "loss.sigma=28", "loss.matmul_dtype=bfloat16", "name=run1"])
    assert cfg.loss.tau == 0.5 and cfg.train.epochs == 1 and cfg.loss.lhp is False
    assert cfg.model.weights == "/w.pth" and cfg.loss.sigma == 28.0 and isinstance(cfg.loss.sigma, float)
    assert cfg.loss.matmul_dtype == "bfloat16" and cfg.name == "run1"
    assert override(cfg, ["loss.sigma=none"]).loss.sigma is None
    assert get_config("demo").loss.tau == 0.6  # presets are not mutated


def test_overrides_from_python_and_json_round_trip():
    cfg = override(get_config("cocostuff27"), {"loss.tau": 1, "loss.style": "official"})
    assert cfg.loss.tau == 1.0 and cfg.loss.style == "official"
    again = from_dict(json.loads(dumps(cfg)))
    assert to_dict(again) == to_dict(cfg) and isinstance(again, Config)


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown config key 'loss.temperature'.*loss.tau"):
        get_config("demo", ["loss.temperature=0.5"])
    with pytest.raises(ValueError, match="bad value 'fast' for train.epochs"):
        get_config("demo", ["train.epochs=fast"])
    with pytest.raises(ValueError, match="expected true or false"):
        get_config("demo", ["loss.lhp=maybe"])
    with pytest.raises(ValueError, match="section.field=value"):
        get_config("demo", ["loss.tau"])
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("coco")
    with pytest.raises(ValueError, match="cannot be None"):
        override(Config(), {"loss.tau": None})


def test_a_mistyped_key_gets_a_suggestion():
    with pytest.raises(ValueError, match="unknown config key 'model.num_cluster'; did you mean 'model.num_clusters'"):
        get_config("demo", ["model.num_cluster=3"])
    with pytest.raises(ValueError, match="unknown config key 'zzz.qqq'; valid keys"):
        get_config("demo", ["zzz.qqq=3"])
