"""``build_dataset(cfg, split)``: the dataset a configuration names, at the configured crop size."""

from __future__ import annotations

from torch.utils.data import Dataset

from ..config import Config
from .folder import ImageFolder
from .synthetic import SyntheticScenes

__all__ = ["build_dataset", "DATASET_NAMES"]

DATASET_NAMES = ("synthetic", "folder", "cocostuff27", "cityscapes27", "potsdam3")


def build_dataset(cfg: Config, split: str = "train") -> Dataset:
    """The ``train`` or ``val`` split of ``cfg.data.dataset`` (crop ``image_size`` / ``val_size``).

    ``folder`` serves your own images from ``data.root`` (labels, when there, from ``data.labels``).
    """
    d = cfg.data
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    size = d.image_size if split == "train" else d.val_size
    if d.dataset == "synthetic":
        count = d.num_train if split == "train" else d.num_val
        return SyntheticScenes(split, num_images=count or (1000 if split == "train" else 200), image_size=size,
                               seed=cfg.train.seed)
    if d.dataset not in DATASET_NAMES:
        raise ValueError(f"unknown data.dataset={d.dataset!r}; choose one of {', '.join(DATASET_NAMES)}")
    if d.root is None:
        raise ValueError(f"data.dataset={d.dataset} needs data.root=/path/to/the/dataset (see data/README.md)")
    if d.dataset == "folder":
        return ImageFolder(d.root, image_size=size)
    if d.dataset == "cocostuff27":
        from .cocostuff import CocoStuff27

        return CocoStuff27(d.root, split, image_size=size)
    if d.dataset == "cityscapes27":
        from .cityscapes import Cityscapes27

        return Cityscapes27(d.root, split, image_size=size)
    from .potsdam import Potsdam3

    return Potsdam3(d.root, split, image_size=size)
