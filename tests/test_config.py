"""Presets, overrides from strings and Python, JSON round trip, clear errors."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpkit.pipeline.config import (CHOICES, PRESETS, Config, dumps, from_dict, get_config, override, to_dict,
                                   validate)


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


# --- validation when a configuration is built ---------------------------------------------------

ENUMS = {  # key -> (a value that is not a choice, the close choice that "did you mean" names, or None)
    "data.dataset": ("cocostuff", "cocostuff27"),
    "data.train_crop": ("randm", "random"),
    "data.val_crop": ("hole", "whole"),
    "model.backbone": ("dino_vit8", "dino_vits8"),
    "loss.style": ("papr", "paper"),
    "loss.propagation": ("bogus", None),
    "loss.matmul_dtype": ("bf16", "bfloat16"),
    "train.device": ("gpu0", None),
    "train.amp": ("fp-16", "fp16"),
}


def test_every_enum_field_is_covered():
    assert set(ENUMS) == set(CHOICES)


@pytest.mark.parametrize("key", sorted(ENUMS))
def test_an_unknown_choice_is_refused_with_the_choices(key):
    bad, close = ENUMS[key]
    with pytest.raises(ValueError) as err:
        get_config("demo", [f"{key}={bad}"])
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"bad value {bad!r} for {key}: ")
    assert all(choice in message for choice in CHOICES[key]), message
    if close is not None:
        assert f"did you mean {close!r}?" in message
    with pytest.raises(ValueError, match=re.escape(f"for {key}: ")):  # the same from Python and from JSON
        override(get_config("demo"), {key: bad})
    data = to_dict(get_config("demo"))
    section, name = key.split(".")
    data[section][name] = bad
    with pytest.raises(ValueError, match=re.escape(f"for {key}: ")):
        from_dict(data)


def test_choices_match_what_the_code_accepts():
    import torch

    from hpkit.backbones.vit import BACKBONES
    from hpkit.pipeline.datasets import DATASET_NAMES, crops

    assert set(CHOICES["data.dataset"]) == set(DATASET_NAMES)
    assert set(CHOICES["model.backbone"]) == set(BACKBONES) | {"auto"}
    assert all(isinstance(getattr(torch, name), torch.dtype) for name in CHOICES["loss.matmul_dtype"])
    for dataset in DATASET_NAMES:  # every crop a dataset takes builds; crops() agrees with the config
        for train_crop in CHOICES["data.train_crop"]:
            for val_crop in CHOICES["data.val_crop"]:
                changes = {"data.dataset": dataset, "data.train_crop": train_crop, "data.val_crop": val_crop}
                try:
                    cfg = override(get_config("demo"), changes)
                except ValueError as err:
                    assert "is not available for data.dataset" in str(err)
                else:
                    assert crops(cfg) == (train_crop, val_crop)


RANGES_BAD = [  # key, a value out of range, the range the message names
    ("data.image_size", 0, ">= 1"), ("data.val_size", -8, ">= 1"), ("data.num_train", 0, ">= 1"),
    ("data.num_val", 0, ">= 1"), ("data.batch_size", 0, ">= 1"), ("data.num_workers", -1, ">= 0"),
    ("model.dim", 0, ">= 1"), ("model.num_clusters", 1, ">= 2"), ("model.dropout", 1.0, "in [0, 1)"),
    ("model.ema_momentum", 1.5, "in [0, 1]"), ("model.ema_momentum", -0.1, "in [0, 1]"),
    ("loss.tau", 0.0, "> 0"), ("loss.tau", -0.5, "> 0"), ("loss.tau", float("nan"), "> 0"),
    ("loss.tau", float("inf"), "finite"), ("loss.rho", 1.5, "in [0, 1]"), ("loss.rho", -0.01, "in [0, 1]"),
    ("loss.alpha", -0.05, ">= 0"), ("loss.pool_size", 0, ">= 1"), ("loss.renew_interval", 0, ">= 1"),
    ("loss.warmup", -1, ">= 0"), ("loss.sigma", 0.0, "> 0"),
    ("optim.lr", 0.0, "> 0"), ("optim.weight_decay", -0.1, ">= 0"), ("optim.projection_lr", -1e-4, "> 0"),
    ("optim.linear_lr", 0.0, "> 0"), ("optim.cluster_lr", 0.0, "> 0"), ("optim.grad_clip", 0.0, "> 0"),
    ("train.epochs", 0, ">= 1"), ("train.seed", -1, ">= 0"), ("train.val_every", -1, ">= 0"),
    ("train.val_images", 0, ">= 1"), ("train.probe_refit_epochs", -1, ">= 0"),
    ("train.probe_refit_restarts", 0, ">= 1"),
]


@pytest.mark.parametrize("key,value,words", RANGES_BAD, ids=[f"{k}={v}" for k, v, _ in RANGES_BAD])
def test_a_number_out_of_range_is_refused_with_the_range(key, value, words):
    with pytest.raises(ValueError) as err:
        get_config("demo", [f"{key}={value}"])
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"bad value {value!r} for {key}: ") and words in message


def test_every_numeric_field_has_a_range():
    numeric = {f"{section}.{f.name}" for section in ("data", "model", "loss", "optim", "train")
               for f in dataclasses.fields(getattr(Config(), section))
               if "int" in str(f.type) or "float" in str(f.type)}
    assert numeric == {key for key, _, _ in RANGES_BAD}


def test_valid_edges_and_every_preset_build():
    for preset in PRESETS:
        assert validate(get_config(preset)) == get_config(preset)
    cfg = get_config("demo", ["loss.rho=0", "loss.alpha=0", "model.ema_momentum=1", "model.dropout=0.5",
                              "train.val_every=0", "loss.warmup=0", "data.num_workers=0", "model.num_clusters=2",
                              "train.device=cuda:1", "train.device=mps", "optim.grad_clip=inf", "loss.rho=1",
                              "loss.sigma=none", "loss.matmul_dtype=none", "data.val_crop=whole", "train.amp=bf16",
                              "train.seed=0", "model.backbone=hp-tiny"])
    assert cfg.loss.rho == 1.0 and cfg.train.device == "mps" and cfg.model.num_clusters == 2
    folder = get_config("demo", {"data.dataset": "folder", "data.train_crop": "random", "data.val_crop": "whole"})
    assert (folder.data.train_crop, folder.data.val_crop) == ("random", "whole")  # both in one override
    for device in ("auto", "cpu", "cuda", "cuda:0"):
        assert get_config("demo", [f"train.device={device}"]).train.device == device


def test_rules_between_fields():
    with pytest.raises(ValueError, match="bad value 'loss' for loss.propagation: .*use loss.style=paper"):
        get_config("demo", ["loss.style=official", "loss.propagation=loss"])
    # without LHP (or with Eq. 1) the propagation is never used: allowed as before
    assert get_config("demo", ["loss.style=official", "loss.propagation=loss", "loss.lhp=false"]).loss.lhp is False
    with pytest.raises(ValueError, match="train.amp=fp16 needs CUDA"):
        get_config("demo", ["train.amp=fp16"])  # the demo preset trains on the CPU
    assert get_config("demo", ["train.amp=fp16", "train.device=cuda"]).train.amp == "fp16"
    with pytest.raises(ValueError, match="data.train_crop=random is not available for data.dataset=synthetic; "
                                         "choose center"):
        get_config("demo", ["data.train_crop=random"])
    with pytest.raises(ValueError, match="data.val_crop=whole is not available for data.dataset=cocostuff27"):
        get_config("cocostuff27", ["data.val_crop=whole"])


def test_direct_construction_and_in_place_changes_are_checked():
    from hpkit.pipeline.config import DataConfig, LossConfig, TrainConfig

    with pytest.raises(ValueError, match="bad value -1 for loss.tau"):
        LossConfig(tau=-1)
    with pytest.raises(ValueError, match="bad value 'gpu' for train.device"):
        Config(train=TrainConfig(device="gpu"))
    with pytest.raises(ValueError, match="bad value 'imagenet' for data.dataset"):
        DataConfig(dataset="imagenet")
    cfg = get_config("demo")
    cfg.loss.rho = 2.0  # dataclasses do not check assignments: validate() does, and so does the next override
    with pytest.raises(ValueError, match="bad value 2.0 for loss.rho"):
        validate(cfg)
    with pytest.raises(ValueError, match="bad value 2.0 for loss.rho"):
        override(cfg, {"loss.tau": 0.5})


def test_types_are_checked_and_paths_become_text(tmp_path):
    with pytest.raises(ValueError, match="bad value 3.5 for model.num_clusters: expected int or None, got float"):
        override(get_config("demo"), {"model.num_clusters": 3.5})
    with pytest.raises(ValueError, match="bad value 1 for data.root: expected str or None, got int"):
        override(get_config("demo"), {"data.root": 1})
    with pytest.raises(ValueError, match="bad value True for data.batch_size"):
        override(get_config("demo"), {"data.batch_size": True})
    cfg = override(get_config("demo"), {"data.root": tmp_path, "model.weights": tmp_path / "w.pth"})
    assert cfg.data.root == str(tmp_path) and cfg.model.weights == str(tmp_path / "w.pth")
    json.loads(dumps(cfg))  # still JSON


def test_a_mistyped_preset_gets_a_suggestion():
    with pytest.raises(ValueError, match="unknown preset 'cocostuff'; did you mean 'cocostuff27'"):
        get_config("cocostuff")


def test_cli_refuses_a_bad_choice_in_one_line_before_any_work(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HPKIT_WEIGHTS": str(tmp_path / "no_weights")}  # a backbone load would print a notice
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "hpkit", "train", "--preset", "demo", "--set",
                             "loss.propagation=bogus", "--out", str(out)], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == ["hpkit: bad value 'bogus' for loss.propagation: choose one of gradient, loss"], result.stderr
    assert result.stdout == "" and not out.exists() and not (tmp_path / "no_weights").exists()
    assert time.perf_counter() - started < 60  # the import of torch, no data, backbone or bank
