"""The images a pretraining run (or attention alignment) reads: synthetic scenes or a folder."""

from __future__ import annotations

from torch.utils.data import Dataset, Subset

from hpkit.backbones.pretrain.config import PretrainConfig

__all__ = ["pretraining_images"]


def pretraining_images(dataset: str, root: str | None, num_images: int | None, image_size: int,
                       data_seed: int) -> Dataset:
    """The images of a ``dataset="synthetic"`` (train scenes) or ``"folder"`` (``root``) run, as
    ``(image (3, S, S) in [0, 1], label)`` pairs whose labels are never used."""
    if dataset == "synthetic":
        from hpkit.data.synthetic import SyntheticScenes

        return SyntheticScenes("train", num_images=num_images or 1000, image_size=image_size, seed=data_seed)
    from hpkit.data.folder import ImageFolder, scan_folder

    data = ImageFolder(root, image_size=image_size, layout=scan_folder(root, labels=False))  # label maps unread
    if num_images is not None and num_images < len(data):
        data = Subset(data, range(num_images))
    return data


def _dataset(cfg: PretrainConfig) -> Dataset:
    """The pretraining images (labels are never used)."""
    return pretraining_images(cfg.dataset, cfg.root, cfg.num_images, cfg.image_size, cfg.data_seed)
