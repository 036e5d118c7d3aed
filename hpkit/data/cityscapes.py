"""Cityscapes-27: the fine annotations with label ids 7-33 as 27 classes (ids below 7 are void).

Layout below ``root`` (torchvision's Cityscapes layout)::

    leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
    gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png
    cropped/cityscapes_five_crop_0.5/{img,label}/train/<k>.{jpg,png}   five-crop copies (training)

Images are listed in sorted order (city, then file name); torchvision lists them in directory order,
so the official crop numbering may differ on another file system (the set of crops is the same).
Training reads the five-crop copies (``python -m hpkit prepare cityscapes27 --root ROOT`` writes
them); validation reads the full images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpkit.data.transforms import PairDataset

__all__ = ["Cityscapes27", "CITYSCAPES_CLASS_NAMES", "CITYSCAPES_COLORS", "ID_TO_CLASS"]

CITYSCAPES_CLASS_NAMES: list[str] = [
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel",
    "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider",
    "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle"]

CITYSCAPES_COLORS = np.array([  # the official Cityscapes label colours of ids 7-33
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70), (102, 102, 156),
    (190, 153, 153), (180, 165, 180), (150, 100, 100), (150, 120, 90), (153, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230), (119, 11, 32)],
    dtype=np.uint8)

ID_TO_CLASS = np.full(256, -1, dtype=np.int64)
"""(256,) int64: Cityscapes label id -> class (id - 7 for ids 7-33; other ids, 255 included, -> -1)."""
ID_TO_CLASS[7:34] = np.arange(27)


class Cityscapes27(PairDataset):
    """Cityscapes-27 as ``(image (3, S, S) float32 in [0, 1], label (S, S) int64, -1 = ignore)``.

    Args:
        root: the Cityscapes folder (see the module docstring for its layout).
        split: ``"train"`` or ``"val"``.
        image_size: output side S (shorter side resized to S, centre crop: a 2:1 image keeps its centre).
        cropped: ``None`` uses the five-crop copies for ``train`` when they exist (else the full images,
            with a warning), ``True`` requires them, ``False`` reads the full images.

    Attributes: ``class_names`` (27 names), ``colors`` ((27, 3) uint8), ``pairs`` (full-image paths).
    """

    name = "cityscapes27"
    crop_folder = "cityscapes_five_crop_0.5"
    table = ID_TO_CLASS
    class_names = CITYSCAPES_CLASS_NAMES
    colors = CITYSCAPES_COLORS

    def _pairs(self) -> list[tuple[Path, Path]]:
        images = self.root / "leftImg8bit" / self.split
        if not images.is_dir():
            raise FileNotFoundError(f"Cityscapes27: {images} not found; {self.fix_hint()}")
        suffix = "_leftImg8bit.png"
        return [(path, self.root / "gtFine" / self.split / path.parent.name
                 / path.name.replace(suffix, "_gtFine_labelIds.png"))
                for path in sorted(images.glob(f"*/*{suffix}"))]
