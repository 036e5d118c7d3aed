"""COCO-Stuff-27: COCO-Stuff 164k with the 182 fine ids merged into 27 coarse classes (12 things, 15 stuff).

Layout below ``root`` (the dataset folder itself, as in the official HP code)::

    images/{train2017,val2017}/<id>.jpg
    annotations/{train2017,val2017}/<id>.png        fine ids 0-181, 255 = unlabelled
    curated/train2017/Coco164kFull_Stuff_Coarse.txt    training list (IIC's curated images)
    curated/val2017/Coco164kFull_Stuff_Coarse_7.txt    validation list
    cropped/cocostuff27_five_crop_0.5/{img,label}/train/<k>.{jpg,png}   five-crop copies (training)

Training reads the five-crop copies (``python -m hpkit prepare cocostuff27 --root ROOT`` writes
them); validation reads the full val2017 images of the curated list, as the official code does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpkit.data.transforms import PairDataset, fix_hint, read_list

__all__ = ["CocoStuff27", "FINE_TO_COARSE", "COCO_CLASS_NAMES", "COCO_COLORS"]

COCO_CLASS_NAMES: list[str] = [
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle",  # things: COCO super-categories
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall", "window", "building",
    "ground", "plant", "sky", "solid", "structural", "water"]  # stuff

_COARSE_TO_FINE: dict[int, list[int]] = {
    0: list(range(71, 77)), 1: list(range(77, 83)), 2: list(range(51, 61)), 3: list(range(61, 71)),
    4: list(range(83, 91)), 5: list(range(43, 51)), 6: list(range(25, 33)), 7: list(range(15, 25)),
    8: list(range(9, 15)), 9: [0], 10: list(range(33, 43)), 11: list(range(1, 9)),
    12: [101, 102], 13: [100, 113, 114, 115, 116, 117], 14: [120, 121, 152, 169],
    15: [97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164], 16: [99, 131, 138, 142],
    17: [91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167], 18: list(range(170, 177)), 19: [179, 180],
    20: [94, 95, 127, 150, 157, 165], 21: [110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158],
    22: [93, 96, 118, 123, 128, 133, 141, 162, 168], 23: [105, 156], 24: [126, 134, 149, 159, 161, 181],
    25: [98, 112, 137, 145, 163], 26: [119, 147, 154, 177, 178]}

FINE_TO_COARSE = np.full(256, -1, dtype=np.int64)
"""(256,) int64: fine COCO-Stuff id -> coarse class 0-26; 255 (unlabelled) and unused ids -> -1."""
for _coarse, _fine in _COARSE_TO_FINE.items():
    FINE_TO_COARSE[_fine] = _coarse
del _coarse, _fine


def _pascal_colors(n: int) -> np.ndarray:
    """The first n colours of the PASCAL VOC label palette (STEGO's colour map for COCO-Stuff), (n, 3) uint8."""
    colors = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, value = i, [0, 0, 0]
        for shift in range(7, -1, -1):
            for ch in range(3):
                value[ch] |= ((c >> ch) & 1) << shift
            c >>= 3
        colors[i] = value
    return colors


COCO_COLORS = _pascal_colors(28)[1:]  # PASCAL palette without its black, which stays free for "ignore"


class CocoStuff27(PairDataset):
    """COCO-Stuff-27 as ``(image (3, S, S) float32 in [0, 1], label (S, S) int64, -1 = ignore)``.

    Args:
        root: the COCO-Stuff folder (see the module docstring for its layout).
        split: ``"train"`` (curated list ``Coco164kFull_Stuff_Coarse.txt``) or ``"val"``
            (``Coco164kFull_Stuff_Coarse_7.txt``).
        image_size: output side S (shorter side resized to S, centre crop).
        cropped: ``None`` uses the five-crop copies for ``train`` when they exist (else the full images,
            with a warning), ``True`` requires them, ``False`` reads the full images.

    Attributes: ``class_names`` (27 names), ``colors`` ((27, 3) uint8), ``pairs`` (full-image paths).
    """

    name = "cocostuff27"
    crop_folder = "cocostuff27_five_crop_0.5"
    table = FINE_TO_COARSE
    class_names = COCO_CLASS_NAMES
    colors = COCO_COLORS
    lists = {"train": "Coco164kFull_Stuff_Coarse.txt", "val": "Coco164kFull_Stuff_Coarse_7.txt"}

    def _pairs(self) -> list[tuple[Path, Path]]:
        folder = f"{self.split}2017"
        ids = read_list(self.root / "curated" / folder / self.lists[self.split], fix_hint(self.name, self.root))
        return [(self.root / "images" / folder / f"{i}.jpg", self.root / "annotations" / folder / f"{i}.png")
                for i in ids]
