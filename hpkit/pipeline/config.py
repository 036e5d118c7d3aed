"""One plain dataclass configuration with the paper's presets and ``section.field=value`` overrides.

``get_config("cocostuff27")`` returns a :class:`Config`; ``override(cfg, ["loss.tau=0.6"])`` changes
fields from strings (as on the command line) and ``override(cfg, {"loss.tau": 0.6})`` from Python.
``to_dict`` / ``from_dict`` round-trip through JSON, so the resolved configuration can be saved next
to every checkpoint and result.

Every configuration is checked when it is built (``Config(...)``, :func:`get_config`,
:func:`override`, :func:`from_dict`, the command line's ``--set``): a field of a fixed set of values
(``loss.style``, ``train.amp``, ``data.dataset``, ...) or a number out of its range raises one
``ValueError`` line naming the key, the bad value and the valid choices or range, before any data,
backbone or bank is loaded (:func:`validate`). Checks that need the dataset or the backbone (the pool
against the number of images, sizes against the patch size) happen when training starts.

Preset values follow Table 6 and the official configs (docs/official-code-differences.md#official-configs). Where
the paper and the official config disagree, the choice is marked in the preset with the other value.
Codes such as D9 or H4 in the comments are the official code's departures and hot spots listed there
(anchors #d9, #h4, ...).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Mapping

from hpkit.backbones.vit import BACKBONES

__all__ = ["DataConfig", "ModelConfig", "LossConfig", "OptimConfig", "TrainConfig", "Config", "PRESETS",
           "get_config", "override", "to_dict", "from_dict", "dumps", "validate", "crops", "CHOICES", "RANGES"]


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # synthetic | cocostuff27 | cityscapes27 | potsdam3 | folder
    root: str | None = None  # dataset folder (not needed for synthetic)
    image_size: int = 224  # training crop (the official res)
    val_size: int = 320  # evaluation crop (hard-coded 320 in the official code)
    # Geometry after resizing the shorter side (None: the dataset's default). train_crop: center |
    # random (folder default: one random square per image, fixed for the run); val_crop: center (the
    # paper's protocol) | whole (folder default: the whole image at its aspect ratio, scored at that size).
    train_crop: str | None = None
    val_crop: str | None = None
    num_train: int | None = None  # synthetic only: number of images (None: the dataset's size)
    num_val: int | None = None
    batch_size: int = 64
    num_workers: int = 4

    def __post_init__(self) -> None:
        _check_section("data", self)


@dataclass
class ModelConfig:
    backbone: str = "dino_vits8"  # a name of hpkit.backbones.vit.BACKBONES or auto
    weights: str | None = None  # local checkpoint for the backbone
    dim: int = 512  # segmentation feature width D (K in the paper)
    num_clusters: int | None = None  # the cluster probe's K (None: the number of classes; 8 without labels)
    dropout: float = 0.0  # Dropout2d on head inputs (official 0.1, D4)
    ema_momentum: float = 0.99  # momentum of S'

    def __post_init__(self) -> None:
        _check_section("model", self)


@dataclass
class LossConfig:
    style: str = "paper"  # paper | official
    tau: float = 0.8
    rho: float = 0.02  # random-negative rate
    alpha: float = 0.05  # weight of the consistency regulariser
    pool_size: int = 2048  # M
    renew_interval: int = 100  # Q^sp refresh period (iterations)
    warmup: int = 1000  # lambda = 0 for this many iterations (official, D7; paper: 0)
    sigma: float | None = None  # LHP attention scale (None: the style's default)
    # Table 4 / Table 5 switches
    task_specific: bool = True  # TS-GHP
    lhp: bool = True  # local hidden positives
    symmetric: bool = True  # symmetric selection (SA)
    regularizer: bool = True  # consistency regulariser (Reg)
    plain_contrastive: bool = False  # row (g): Eq. 1 instead of HP
    propagation: str = "gradient"  # gradient | loss (Table 5)
    matmul_dtype: str | None = None  # None (float32) | bfloat16 (| float16 | float32 | float64)

    def __post_init__(self) -> None:
        _check_section("loss", self)


@dataclass
class OptimConfig:
    lr: float = 5e-4  # AdamW for S
    weight_decay: float = 0.1
    projection_lr: float = 5e-4  # Adam for Z
    linear_lr: float = 1e-3  # linear probe
    cluster_lr: float = 5e-3  # cluster probe
    grad_clip: float = 10.0

    def __post_init__(self) -> None:
        _check_section("optim", self)


@dataclass
class TrainConfig:
    epochs: int = 3
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    val_every: int = 100  # iterations between validations + checkpoints (official: 100, Potsdam 50); 0: end only
    val_images: int | None = None  # validate on the first images of the val split (None: all)
    cache_features: bool = False  # cache clean-view backbone features + LHP weights on disk (H4)
    cache_dir: str | None = None  # where (None: OUT/feature_cache)
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | off | bf16 | fp16 (CUDA, with a grad scaler)
    # After the last planned step: re-initialise the cluster probe and train it alone for this many
    # epochs on the final head's features (0: the paper's probe, trained only alongside the head).
    # A probe trained on a head that is still moving settles early in a poor k-means optimum and
    # stays there (hard assignment), which costs mIoU on short runs (docs/experiments/hp-tiny.md#demo-probe).
    probe_refit_epochs: int = 0
    # The refit runs this many times from different random starts on the same batches and keeps the
    # probe with the lowest loss on the train images, as k-means keeps its best restart by inertia.
    probe_refit_restarts: int = 1

    def __post_init__(self) -> None:
        _check_section("train", self)


@dataclass
class Config:
    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        validate(self)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "optim": OptimConfig, "train": TrainConfig}

PRESETS: dict[str, dict[str, Any]] = {
    "cocostuff27": {
        "data.dataset": "cocostuff27", "model.backbone": "dino_vits8", "model.dim": 512,
        "model.ema_momentum": 0.99, "loss.tau": 0.8, "loss.rho": 0.02, "loss.alpha": 0.05,
        "loss.pool_size": 2048, "loss.renew_interval": 100, "loss.warmup": 1000, "train.epochs": 3,
    },
    "cityscapes27": {
        "data.dataset": "cityscapes27", "model.backbone": "dino_vits8", "model.dim": 512,
        "model.ema_momentum": 0.999, "loss.tau": 0.6, "loss.rho": 0.02, "loss.alpha": 0.05,
        "loss.pool_size": 2048,
        "loss.renew_interval": 20,  # official config; the paper says 100 (D9)
        "loss.warmup": 50,
        "train.epochs": 20,  # paper; the official config uses 30 (D11)
    },
    "potsdam3": {
        "data.dataset": "potsdam3", "model.backbone": "dino_vitb8",
        "model.dim": 512,  # paper (K = 512 for ViT-B/8); the official config uses 256 (D10)
        "model.ema_momentum": 0.999, "loss.tau": 0.4,
        "loss.rho": 0.02,  # paper; the official config uses 1.0 (D10)
        "loss.alpha": 0.05,  # paper; the official config uses 0.0 (D10)
        "loss.pool_size": 1024,
        "loss.renew_interval": 20,  # official config; the paper says 100 (D9)
        "loss.warmup": 100, "train.epochs": 10, "train.val_every": 50,
    },
    "demo": {  # small and CPU-friendly: synthetic scenes, minutes on 2 cores
        "data.dataset": "synthetic", "data.image_size": 128, "data.val_size": 128, "data.num_train": 512,
        "data.num_val": 64, "data.batch_size": 8, "data.num_workers": 0,
        "model.backbone": "auto", "model.dim": 64, "model.ema_momentum": 0.99,
        "loss.tau": 0.6, "loss.pool_size": 256, "loss.renew_interval": 20, "loss.warmup": 20,
        "train.epochs": 4, "train.device": "cpu", "train.val_every": 32, "train.cache_features": True,
        # Twice the paper's head lr: 256 steps are short (tuned on seeds 0-3: docs/experiments/hp-tiny.md#demo-tuning).
        "optim.lr": 1e-3,
        # The official cluster lr (5e-3) is meant for thousands of steps; in a demo run the probe's
        # random centroids hardly move (measured: docs/experiments/hp-tiny.md#demo-probe).
        "optim.cluster_lr": 5e-2,
        # Even so, the probe trained alongside the moving head settles early in a poor optimum; a
        # probe refitted on the final head scores far higher (docs/experiments/hp-tiny.md#demo-probe).
        "train.probe_refit_epochs": 4,
        # and, like the k-means baseline (best of 5 by inertia), the best of 5 refits by loss.
        "train.probe_refit_restarts": 5,
    },
}


# --- validation ---------------------------------------------------------------------------------

#: The fields of a fixed set of values, key -> the values (``None`` allowed where the field is optional).
#: ``train.device`` also takes ``cuda:N``; ``data.train_crop`` / ``data.val_crop`` are further
#: limited by the dataset (:func:`crops`).
CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": ("synthetic", "folder", "cocostuff27", "cityscapes27", "potsdam3"),
    "data.train_crop": ("center", "random"),
    "data.val_crop": ("center", "whole"),
    "model.backbone": (*BACKBONES, "auto"),
    "loss.style": ("paper", "official"),
    "loss.propagation": ("gradient", "loss"),
    "loss.matmul_dtype": ("bfloat16", "float16", "float32", "float64"),
    "train.device": ("auto", "cpu", "cuda", "cuda:N", "mps"),
    "train.amp": ("auto", "off", "bf16", "fp16"),
}


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f">= {low}"


def _positive() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > 0), "> 0"


def _unit(closed_right: bool = True) -> tuple[Callable[[Any], bool], str]:
    if closed_right:
        return (lambda v: 0 <= v <= 1), "in [0, 1]"
    return (lambda v: 0 <= v < 1), "in [0, 1)"


#: Numeric fields, key -> (test, the range in words). NaN fails every test; infinities are refused
#: except for ``optim.grad_clip`` (``inf``: no clipping). ``None`` passes where the field is optional.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.image_size": _at_least(1), "data.val_size": _at_least(1),
    "data.num_train": _at_least(1), "data.num_val": _at_least(1),
    "data.batch_size": _at_least(1), "data.num_workers": _at_least(0),
    "model.dim": _at_least(1), "model.num_clusters": _at_least(2),
    "model.dropout": _unit(closed_right=False), "model.ema_momentum": _unit(),
    "loss.tau": _positive(), "loss.rho": _unit(), "loss.alpha": _at_least(0),
    "loss.pool_size": _at_least(1), "loss.renew_interval": _at_least(1), "loss.warmup": _at_least(0),
    "loss.sigma": _positive(),
    "optim.lr": _positive(), "optim.weight_decay": _at_least(0), "optim.projection_lr": _positive(),
    "optim.linear_lr": _positive(), "optim.cluster_lr": _positive(), "optim.grad_clip": _positive(),
    "train.epochs": _at_least(1), "train.seed": _at_least(0), "train.val_every": _at_least(0),
    "train.val_images": _at_least(1), "train.probe_refit_epochs": _at_least(0),
    "train.probe_refit_restarts": _at_least(1),
}
_INFINITE_OK = {"optim.grad_clip"}
_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def _bad(key: str, value: Any, reason: str) -> ValueError:
    return ValueError(f"bad value {value!r} for {key}: {reason}")


def _one_of(key: str, value: str, choices: Iterable[str], optional: bool) -> ValueError:
    choices = list(choices)
    close = difflib.get_close_matches(value, [c for c in choices if c != "cuda:N"], n=1, cutoff=0.6)
    if key == "train.device" and value.startswith("cuda:"):
        close = ["cuda:0"]  # cuda:N means a GPU index
    hint = f"did you mean {close[0]!r}? " if close else ""
    listed = ", ".join(choices) + (" or none" if optional else "")
    return _bad(key, value, f"{hint}choose one of {listed}")


def _check_field(key: str, value: Any, annotation: str) -> None:
    kinds = [part.strip() for part in annotation.split("|")]
    optional = "None" in kinds
    if value is None:
        if not optional:
            raise _bad(key, value, "this field cannot be None")
        return
    kind = next((k for k in kinds if k in _TYPES), None)
    if kind is not None:
        ok = isinstance(value, bool) if kind == "bool" else (
            isinstance(value, (int, float) if kind == "float" else _TYPES[kind]) and not isinstance(value, bool))
        if not ok:
            raise _bad(key, value, f"expected {kind}{' or None' if optional else ''}, got {type(value).__name__}")
    if key in CHOICES:
        choices = CHOICES[key]
        if key == "train.device" and re.fullmatch(r"cuda:\d+", value):
            return
        if value not in choices or value == "cuda:N":
            raise _one_of(key, value, choices, optional)
    if key in RANGES:
        test, words = RANGES[key]
        if isinstance(value, float) and not math.isfinite(value) and not (key in _INFINITE_OK and value > 0):
            raise _bad(key, value, f"must be a finite number {words}")
        if not test(value):
            raise _bad(key, value, f"must be {words}{' (or none)' if optional else ''}")


def crops(cfg: Config | SimpleNamespace) -> tuple[str, str]:
    """``(train_crop, val_crop)``: the configured ones, or the dataset's defaults (checked)."""
    d = cfg.data
    folder = d.dataset == "folder"
    train_crop = d.train_crop or ("random" if folder else "center")
    val_crop = d.val_crop or ("whole" if folder else "center")
    allowed_train = ("center", "random") if folder else ("center",)
    allowed_val = ("center", "whole") if d.dataset in ("folder", "synthetic") else ("center",)
    if train_crop not in allowed_train:
        raise ValueError(f"data.train_crop={train_crop} is not available for data.dataset={d.dataset}; "
                         f"choose {' or '.join(allowed_train)}")
    if val_crop not in allowed_val:
        raise ValueError(f"data.val_crop={val_crop} is not available for data.dataset={d.dataset}; "
                         f"choose {' or '.join(allowed_val)}")
    return train_crop, val_crop


def _check_section(section: str, obj: Any) -> None:
    """Types, choices and ranges of one section's fields, then the rules between them."""
    for name, f in _fields(obj).items():
        _check_field(f"{section}.{name}", getattr(obj, name), str(f.type))
    if section == "loss" and obj.propagation == "loss" and obj.style != "paper" and obj.lhp \
            and not obj.plain_contrastive:
        raise _bad("loss.propagation", obj.propagation,
                   f"loss propagation (Table 5) is not part of the official code: use loss.style=paper with it, "
                   f"or loss.propagation=gradient with loss.style={obj.style}")
    if section == "data":
        crops(SimpleNamespace(data=obj))  # it reads only cfg.data
    if section == "train" and obj.amp == "fp16" and obj.device in ("cpu", "mps"):
        raise _bad("train.amp", obj.amp, f"train.amp=fp16 needs CUDA; use train.amp=bf16 or off with "
                                         f"train.device={obj.device}")


def validate(cfg: Config) -> Config:
    """Check every field of ``cfg`` (types, choices, ranges and the rules between fields) and return it.

    Called by ``Config(...)``, :func:`override`, :func:`get_config` and :func:`from_dict`; call it
    yourself after changing fields in place (``cfg.loss.tau = ...``).

    Raises:
        ValueError: one line naming the key, the bad value and the valid choices or range (with
            "did you mean ...?" for a near miss of a choice).
    """
    _check_field("name", cfg.name, "str")
    for section, kind in _SECTIONS.items():
        value = getattr(cfg, section)
        if not isinstance(value, kind):
            raise _bad(section, value, f"expected a {kind.__name__}, got {type(value).__name__}")
        _check_section(section, value)
    return cfg


def _fields(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _keys(cfg: Config) -> list[str]:
    out = []
    for name, f in _fields(cfg).items():
        value = getattr(cfg, name)
        out += [f"{name}.{k}" for k in _fields(value)] if dataclasses.is_dataclass(value) else [name]
    return out


def _parse(text: str, current: Any, annotation: str) -> Any:
    """Turn a command-line string into the type of the field it sets."""
    if text.lower() in ("none", "null") and "None" in annotation:
        return None
    kind = type(current) if current is not None else None
    if kind is None:  # an optional field that is None now: use its annotation
        kind = next((t for t in (bool, int, float) if t.__name__ in annotation), str)
    if kind is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    return kind(text)


def override(cfg: Config, changes: Mapping[str, Any] | Iterable[str]) -> Config:
    """A copy of ``cfg`` with fields changed.

    Args:
        changes: ``{"loss.tau": 0.6}`` or ``["loss.tau=0.6", "train.epochs=1"]`` (strings are parsed
            to the field's type; ``none`` sets an optional field to None).

    Raises:
        ValueError: unknown key (the message lists the valid ones), a value of the wrong type, or a
            configuration that :func:`validate` refuses (checked once all changes are applied, so
            fields that depend on each other can change together).
    """
    cfg = copy.deepcopy(cfg)
    items = changes.items() if isinstance(changes, Mapping) else [_split(c) for c in changes]
    for key, value in items:
        section, _, name = key.partition(".")
        target = getattr(cfg, section, None) if name else cfg
        name = name or section
        if target is None or not dataclasses.is_dataclass(target) or name not in _fields(target):
            close = difflib.get_close_matches(key, _keys(cfg), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown config key {key!r}; {hint}valid keys: {', '.join(_keys(cfg))}")
        current = getattr(target, name)
        annotation = str(_fields(target)[name].type)
        if isinstance(value, os.PathLike) and "str" in annotation:  # data.root=Path(...): stored as text
            value = os.fspath(value)
        try:
            if isinstance(value, str) and annotation != "str":
                value = _parse(value, current, annotation)
            elif value is None:
                if "None" not in annotation:
                    raise TypeError("this field cannot be None")
            elif current is not None and not isinstance(value, type(current)):
                if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
                    value = float(value)
                else:
                    raise TypeError(f"expected {type(current).__name__}, got {type(value).__name__}")
        except (TypeError, ValueError) as err:
            raise ValueError(f"bad value {value!r} for {key}: {err}") from None
        setattr(target, name, value)
    return validate(cfg)


def _split(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.field=value, e.g. loss.tau=0.6")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def get_config(preset: str = "demo", overrides: Mapping[str, Any] | Iterable[str] = ()) -> Config:
    """The configuration of a preset (``cocostuff27``, ``cityscapes27``, ``potsdam3``, ``demo``) plus overrides."""
    if preset not in PRESETS:
        close = difflib.get_close_matches(preset, PRESETS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown preset {preset!r}; {hint}choose one of {sorted(PRESETS)}")
    cfg = override(Config(name=preset), PRESETS[preset])
    return override(cfg, overrides)


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def from_dict(data: Mapping[str, Any]) -> Config:
    """Inverse of :func:`to_dict`; unknown keys are an error (they usually mean a typo)."""
    flat = {}
    for section, value in data.items():
        if isinstance(value, Mapping):
            flat.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            flat[section] = value
    return override(Config(), flat)


def dumps(cfg: Config) -> str:
    """JSON text of the configuration."""
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)
