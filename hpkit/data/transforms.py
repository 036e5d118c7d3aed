"""Pieces shared by the dataset loaders: resizing, label look-up, split lists, five-crop copies.

Resize rule of every loader: the shorter side goes to ``S`` and the centre ``S x S`` square is kept;
images are resampled bilinearly, label maps with nearest neighbour. (The official code, STEGO's
``get_transform``, uses nearest neighbour for the RGB image too; bilinear is kinder to the image and
changes no label.)

:class:`PairDataset` is the base of the COCO-Stuff and Cityscapes loaders: full-resolution
``(image, label map)`` pairs, or their five-crop copies under ``<root>/cropped/<name>_five_crop_0.5``
(``img/<split>/<k>.jpg`` and ``label/<split>/<k>.png``, labels stored as class + 1, 0 = ignore), which
:func:`hpkit.data.prepare.five_crop` writes.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from hpkit.data.folder import _resize_crop as resize_crop  # one resize rule for every loader
from hpkit.data.folder import load_rgb

__all__ = ["resize_crop", "image_to_tensor", "label_to_tensor", "lookup", "read_list", "PairDataset",
           "crop_dirs", "count_crops", "fix_hint", "stored_table", "CROP_RATIO"]

CROP_RATIO = 0.5


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> (3, S, S) float32 in [0, 1] (bilinear resize, centre crop)."""
    arr = np.asarray(resize_crop(img, size, Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def label_to_tensor(label: np.ndarray, size: int) -> torch.Tensor:
    """(H, W) integer class ids (-1 = ignore) -> (S, S) int64 (nearest resize, centre crop)."""
    img = Image.fromarray(np.ascontiguousarray(label, dtype=np.int32))  # mode "I" keeps -1
    return torch.from_numpy(np.asarray(resize_crop(img, size, Image.NEAREST)).astype(np.int64))


def lookup(raw: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Map raw ids (any integer array) through a 256-entry table; ids outside 0-255 become -1."""
    raw = np.asarray(raw)
    if raw.dtype == np.uint8:
        return table[raw]
    raw = raw.astype(np.int64)
    inside = (raw >= 0) & (raw < len(table))
    return np.where(inside, table[np.clip(raw, 0, len(table) - 1)], -1)


def stored_table(num_classes: int) -> np.ndarray:
    """Table for five-crop label PNGs: stored value v -> class v - 1 (0 and values > n -> -1)."""
    table = np.full(256, -1, dtype=np.int64)
    table[1:num_classes + 1] = np.arange(num_classes)
    return table


def fix_hint(name: str, root: str | Path) -> str:
    """What to do when a dataset's files are missing."""
    return (f"get the dataset with `hpkit.data.download({name!r}, {str(root)!r})` (or by hand: see "
            f"hpkit.data.DATASETS[{name!r}].sources and the layout in its docstring)")


def read_list(path: Path, fix: str) -> list[str]:
    """The non-empty lines of a split list; a missing or empty list raises FileNotFoundError with ``fix``."""
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} not found; {fix}")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise FileNotFoundError(f"split list {path} is empty; {fix}")
    return ids


def crop_dirs(root: Path, folder: str, split: str) -> tuple[Path, Path]:
    """``(img_dir, label_dir)`` of the five-crop copies of ``split``."""
    base = Path(root) / "cropped" / folder
    return base / "img" / split, base / "label" / split


_NUMBERED = re.compile(r"^(\d+)\.(jpg|png)$")


def count_crops(img_dir: Path, label_dir: Path, fix: str = "run the preparation again (it resumes)") -> int:
    """Number n of complete crops ``0..n-1`` (``<k>.jpg`` and ``<k>.png``); 0 if the folders are missing.

    Raises RuntimeError if the numbering has gaps or images and labels do not pair up (an
    interrupted preparation).
    """
    if not img_dir.is_dir():
        return 0
    found = {}
    for folder, ext in ((img_dir, "jpg"), (label_dir, "png")):
        names = [e.name for e in folder.iterdir()] if folder.is_dir() else []
        found[ext] = {int(m[1]) for m in map(_NUMBERED.match, names) if m and m[2] == ext}
    n = len(found["jpg"])
    if found["jpg"] != found["png"] or (n and max(found["jpg"]) != n - 1):
        raise RuntimeError(f"the five-crop copies in {img_dir.parent.parent} are incomplete "
                           f"({len(found['jpg'])} images, {len(found['png'])} labels, numbering with gaps or "
                           f"unpaired files); {fix}")
    return n


class PairDataset(Dataset):
    """Base of the 27-class loaders: ``(image (3, S, S) float32 in [0, 1], label (S, S) int64, -1 = ignore)``.

    Subclasses set ``name`` (preset name), ``crop_folder``, ``table`` (raw label id -> class, 256
    entries), ``class_names``, ``colors``, ``splits`` and implement :meth:`_pairs` (full-resolution
    ``(image path, label path)`` per item, in a fixed order).

    ``cropped``: ``True`` reads the five-crop copies of ``split`` (an error if they are missing),
    ``False`` the full images, ``None`` the copies for ``train`` when they exist (else the full
    images, with a warning) and the full images for the other splits.
    """

    name: str = ""
    crop_folder: str = ""
    table: np.ndarray
    class_names: list[str] = []
    colors: np.ndarray
    splits: tuple[str, ...] = ("train", "val")
    ignore_index = -1

    def __init__(self, root: str | Path, split: str = "train", *, image_size: int = 224,
                 cropped: bool | None = None):
        if split not in self.splits:
            raise ValueError(f"{type(self).__name__}: split must be one of {self.splits}, got {split!r}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.root, self.split, self.image_size = Path(root), split, image_size
        if not self.root.is_dir():
            raise FileNotFoundError(f"{type(self).__name__}: dataset folder {self.root} does not exist; "
                                    f"{self.fix_hint()}")
        self.img_dir, self.label_dir = crop_dirs(self.root, self.crop_folder, split)
        prepare = f"run `python -m hpkit prepare {self.name} --root {self.root}`"
        num_crops = 0 if cropped is False else count_crops(self.img_dir, self.label_dir, f"{prepare} to finish them")
        if cropped is None:
            cropped = split == "train" and num_crops > 0
            if split == "train" and not cropped:
                warnings.warn(f"{type(self).__name__}: no five-crop copies in {self.img_dir}; training on the "
                              f"full images (the official pipeline uses the crops): {prepare}", stacklevel=2)
        self.cropped = bool(cropped)
        self.pairs: list[tuple[Path, Path]] = []
        if self.cropped:
            if num_crops == 0:
                raise FileNotFoundError(f"{type(self).__name__}: no five-crop copies in {self.img_dir}; {prepare}")
            try:
                expected = 5 * len(self._pairs())
            except FileNotFoundError:  # only the crops were copied: nothing to compare with
                expected = 0
            if num_crops < expected:
                raise RuntimeError(f"{type(self).__name__}: {num_crops} of {expected} five-crop copies in "
                                   f"{self.img_dir}; {prepare} to finish them (it resumes)")
            self.num_crops = num_crops
        else:
            self.pairs = self._pairs()
            if not self.pairs:
                raise FileNotFoundError(f"{type(self).__name__}: no {split} images below {self.root}; "
                                        f"{self.fix_hint()}")
            self._require(*self.pairs[0])

    def fix_hint(self) -> str:
        return fix_hint(self.name, self.root)

    def _pairs(self) -> list[tuple[Path, Path]]:
        raise NotImplementedError

    def _require(self, *paths: Path) -> None:
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"{type(self).__name__}: {path} not found; {self.fix_hint()}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.num_crops if self.cropped else len(self.pairs)

    def load_full(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """Full-resolution item ``index``: RGB image (W x H) and label (H, W) int64 class ids, -1 = ignore."""
        image_path, label_path = self.pairs[index]
        self._require(image_path, label_path)
        image = load_rgb(image_path)
        return image, self._read_label(label_path, self.table, image.size)

    @staticmethod
    def _read_label(path: Path, table: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        with Image.open(path) as lab:
            lab.load()
        raw = np.asarray(lab)
        if raw.ndim != 2:
            raise ValueError(f"label map {path} has colour channels (mode {lab.mode}); expected one id per pixel")
        if lab.size != size:
            raise ValueError(f"label map {path} is {lab.size[0]}x{lab.size[1]} but its image is {size[0]}x{size[1]}")
        return lookup(raw, table)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        if self.cropped:
            image_path, label_path = self.img_dir / f"{index}.jpg", self.label_dir / f"{index}.png"
            image = load_rgb(image_path)
            label = self._read_label(label_path, stored_table(self.num_classes), image.size)
        else:
            image, label = self.load_full(index)
        return image_to_tensor(image, self.image_size), label_to_tensor(label, self.image_size)
