"""Potsdam-3: ISPRS Potsdam aerial tiles (IIC's 200 x 200 px cut) with 6 classes merged into 3.

Layout below ``root``::

    imgs/<id>.mat     key "img": (H, W, C) with C >= 3 (R, G, B, IR); the first 3 channels are used
    gt/<id>.mat       key "gt": (H, W) ids 0 roads, 1 buildings, 2 low vegetation, 3 trees, 4 cars, 5 clutter
    labelled_train.txt, labelled_test.txt, unlabelled_train.txt, all.txt   one id per line

Pixel values: IIC wrote uint8 (0-255), used as is. Other integer types are used as is when they fit in
0-255 and otherwise scaled from their type's range (e.g. uint16 / 65535). Floats are taken as [0, 1]
(as torchvision's ``to_pil_image`` in the official code assumes) when the tile's maximum is at most 1,
otherwise as 0-255; both are clipped to the range.

No five-crop copies: the official code trains Potsdam on the tiles themselves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from hpkit.data.transforms import fix_hint, image_to_tensor, label_to_tensor, lookup, read_list

__all__ = ["Potsdam3", "POTSDAM_CLASS_NAMES", "POTSDAM_COLORS", "POTSDAM_TO_3"]

POTSDAM_CLASS_NAMES: list[str] = ["roads and cars", "buildings and clutter", "trees and vegetation"]
POTSDAM_COLORS = np.array([(255, 255, 255), (0, 0, 255), (0, 255, 0)], dtype=np.uint8)  # ISPRS road/building/tree

POTSDAM_TO_3 = np.full(256, -1, dtype=np.int64)
"""(256,) int64: Potsdam id -> class ({0, 4} -> 0, {1, 5} -> 1, {2, 3} -> 2, anything else -> -1)."""
POTSDAM_TO_3[[0, 4]], POTSDAM_TO_3[[1, 5]], POTSDAM_TO_3[[2, 3]] = 0, 1, 2

SPLIT_LISTS = {"train": "labelled_train.txt", "val": "labelled_test.txt",
               "unlabelled_train": "unlabelled_train.txt", "all": "all.txt"}


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) pixels of any numeric type -> uint8 0-255 (see the module docstring for the rule)."""
    if img.dtype == np.uint8:
        return img
    if np.issubdtype(img.dtype, np.integer):
        top = 255 if img.size == 0 or img.max() <= 255 else np.iinfo(img.dtype).max
        return np.clip(img.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)
    img = img.astype(np.float64)
    scale = 255.0 if np.nanmax(img, initial=0.0) <= 1.0 else 1.0
    return np.clip(np.nan_to_num(img) * scale, 0, 255).round().astype(np.uint8)


class Potsdam3(Dataset):
    """Potsdam-3 as ``(image (3, S, S) float32 in [0, 1], label (S, S) int64, -1 = ignore)``.

    Args:
        root: the Potsdam folder (see the module docstring for its layout).
        split: ``"train"`` (labelled_train.txt), ``"val"`` (labelled_test.txt), ``"unlabelled_train"`` or
            ``"all"``; in the last two a tile without ``gt/<id>.mat`` gets an all -1 label.
        image_size: output side S (the 200 px tiles are scaled up to 224 by default, as officially).

    Attributes: ``class_names`` (3 names), ``colors`` ((3, 3) uint8), ``ids`` (tile ids).
    """

    name = "potsdam3"
    class_names = POTSDAM_CLASS_NAMES
    colors = POTSDAM_COLORS
    table = POTSDAM_TO_3
    ignore_index = -1

    def __init__(self, root: str | Path, split: str = "train", *, image_size: int = 224):
        if split not in SPLIT_LISTS:
            raise ValueError(f"Potsdam3: split must be one of {tuple(SPLIT_LISTS)}, got {split!r}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.root, self.split, self.image_size = Path(root), split, image_size
        if not self.root.is_dir():
            raise FileNotFoundError(f"Potsdam3: dataset folder {self.root} does not exist; {fix_hint(self.name, root)}")
        self.ids = read_list(self.root / SPLIT_LISTS[split], fix_hint(self.name, root))
        self.labelled = split in ("train", "val")
        self._path(self.ids[0], "imgs")  # fail now, not in a worker, if the folder is wrong

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    def _path(self, tile: str, folder: str) -> Path:
        path = self.root / folder / f"{tile}.mat"
        if not path.is_file() and (folder == "imgs" or self.labelled):
            raise FileNotFoundError(f"Potsdam3: {path} not found (listed in {SPLIT_LISTS[self.split]}); "
                                    f"{fix_hint(self.name, self.root)}")
        return path

    @staticmethod
    def _load(path: Path, key: str) -> np.ndarray:
        from scipy.io import loadmat  # imported here: scipy.io adds 0.2 s to ``import hpkit``

        try:
            data = loadmat(path)
        except Exception as err:  # scipy raises several types for damaged files
            raise OSError(f"cannot read {path}: {err}") from None
        if key not in data:
            found = sorted(k for k in data if not k.startswith("__"))
            raise KeyError(f"{path} has no variable {key!r} (found {found})")
        return np.asarray(data[key])

    def load_full(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """Tile ``index`` at its own size: RGB image and label (H, W) int64 class ids, -1 = ignore."""
        tile = self.ids[index]
        path = self._path(tile, "imgs")
        img = self._load(path, "img")
        if img.ndim != 3 or img.shape[2] < 3:
            raise ValueError(f"{path}: 'img' has shape {img.shape}; expected (H, W, C) with C >= 3")
        image = Image.fromarray(_to_uint8(img[..., :3]))
        gt_path = self._path(tile, "gt")
        if not gt_path.is_file():
            return image, np.full(img.shape[:2], -1, dtype=np.int64)
        gt = self._load(gt_path, "gt")
        if gt.shape != img.shape[:2]:
            raise ValueError(f"{gt_path}: 'gt' has shape {gt.shape}; expected {img.shape[:2]} like its image")
        return image, lookup(gt, self.table)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} tiles")
        image, label = self.load_full(index)
        return image_to_tensor(image, self.image_size), label_to_tensor(label, self.image_size)
