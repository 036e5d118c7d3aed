"""``build_dataset(cfg, split)``: the dataset a configuration names, at the configured size and crop."""

from __future__ import annotations

from torch.utils.data import Dataset

from hpkit.data.folder import FolderLayout, ImageFolder, scan_folder
from hpkit.data.synthetic import SyntheticScenes
from hpkit.pipeline.config import CHOICES, Config, crops

__all__ = ["build_dataset", "DATASET_NAMES", "crops", "UNLABELLED_CLUSTERS"]

DATASET_NAMES = tuple(CHOICES["data.dataset"])
#: the cluster probe's K for data without labels when ``model.num_clusters`` is not set
UNLABELLED_CLUSTERS = 8


def _patch_size(cfg: Config) -> int:
    from hpkit.backbones.vit import BACKBONES  # "auto" and unknown names: patch 8 (DINO ViT-S/8 or hp-tiny)

    spec = BACKBONES.get(cfg.model.backbone)
    return spec.patch_size if spec is not None else 8


def build_dataset(cfg: Config, split: str = "train", *, layout: FolderLayout | None = None) -> Dataset:
    """The ``train`` or ``val`` split of ``cfg.data.dataset`` (size ``image_size`` / ``val_size``).

    ``folder`` serves your own photos from ``data.root`` (layout and checks:
    :mod:`hpkit.data.folder`; pass ``layout`` to reuse one :func:`scan_folder` for both splits).
    """
    d = cfg.data
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if d.dataset not in DATASET_NAMES:
        raise ValueError(f"unknown data.dataset={d.dataset!r}; choose one of {', '.join(DATASET_NAMES)}")
    size = d.image_size if split == "train" else d.val_size
    train_crop, val_crop = crops(cfg)
    if d.dataset == "synthetic":  # square scenes: "whole" and "center" are the same
        count = d.num_train if split == "train" else d.num_val
        return SyntheticScenes(split, num_images=count or (1000 if split == "train" else 200), image_size=size,
                               seed=cfg.train.seed)
    if d.root is None:
        raise ValueError(f"data.dataset={d.dataset} needs data.root=/path/to/the/dataset (see data/README.md)")
    if d.dataset == "folder":
        return ImageFolder(d.root, split, image_size=size, crop=train_crop if split == "train" else val_crop,
                           multiple=_patch_size(cfg), seed=cfg.train.seed,
                           layout=layout if layout is not None else scan_folder(d.root))
    if d.dataset == "cocostuff27":
        from hpkit.data.cocostuff import CocoStuff27

        return CocoStuff27(d.root, split, image_size=size)
    if d.dataset == "cityscapes27":
        from hpkit.data.cityscapes import Cityscapes27

        return Cityscapes27(d.root, split, image_size=size)
    from hpkit.data.potsdam import Potsdam3

    return Potsdam3(d.root, split, image_size=size)
