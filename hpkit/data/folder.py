"""A folder of your own images as a dataset, with optional label maps.

``ImageFolder(root, labels=None, image_size=224)`` finds every image below ``root`` (jpg, jpeg, png,
bmp, tif, tiff, webp; sorted paths), converts it to RGB (grayscale, palette, RGBA and 16-bit images
included: alpha is dropped, 16-bit values are scaled to 8 bits), resizes the shorter side to
``image_size`` and centre-crops a square. Images smaller than the crop are scaled up; sizes that are
not a multiple of the backbone's patch are handled by choosing ``image_size`` as a multiple of it.

Labels (optional): a folder of PNG label maps with the same relative paths and stems as the images;
they are resized with nearest-neighbour sampling. Value 255 and any value outside
``[0, num_classes)`` become -1 (ignored by the metrics).

Bad input: a missing or empty folder raises ``FileNotFoundError`` saying what was looked for; an
unreadable image raises ``OSError`` naming the file, or, with ``verify=True``, is left out at
construction time with a warning that names it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = ["ImageFolder", "IMAGE_EXTENSIONS", "load_rgb"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def load_rgb(path: str | Path) -> Image.Image:
    """Open any supported image as 8-bit RGB (16-bit and float images are rescaled to 0-255)."""
    try:
        with Image.open(path) as img:
            img.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise OSError(f"cannot read image {path}: {err}") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))
    return img.convert("RGB")


def _resize_crop(img: Image.Image, size: int, resample: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


class ImageFolder(Dataset):
    """Your images (and optionally label maps) as ``(image (3, S, S) in [0, 1], label (S, S) int64)``.

    Args:
        root: folder searched recursively for images.
        labels: optional folder of PNG label maps mirroring ``root``.
        image_size: output side S (use a multiple of the backbone's patch size, e.g. 224 for patch 8).
        num_classes: labels at or above this (and 255) become -1; ``None`` keeps all but 255.
        verify: open every image once now and leave out unreadable ones with a warning.

    Without labels the label map is all -1.
    """

    def __init__(self, root: str | Path, *, labels: str | Path | None = None, image_size: int = 224,
                 num_classes: int | None = None, verify: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found below {self.root}")
        if verify:
            good = []
            for path in self.files:
                try:
                    load_rgb(path)
                    good.append(path)
                except OSError as err:
                    warnings.warn(f"skipping unreadable image: {err}", stacklevel=2)
            if not good:
                raise FileNotFoundError(f"none of the images below {self.root} could be read")
            self.files = good
        self.labels = Path(labels) if labels is not None else None
        if self.labels is not None:
            missing = [p for p in self.files if not self._label_path(p).is_file()]
            if missing:
                raise FileNotFoundError(f"{len(missing)} images have no label map, e.g. {missing[0].name}: "
                                        f"expected {self._label_path(missing[0])}")
        self.image_size = image_size
        self.num_classes = num_classes

    def _label_path(self, image: Path) -> Path:
        return (self.labels / image.relative_to(self.root)).with_suffix(".png")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.files[index]
        img = _resize_crop(load_rgb(path), self.image_size, Image.BILINEAR)
        image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        if self.labels is None:
            return image, torch.full((self.image_size, self.image_size), -1, dtype=torch.long)
        with Image.open(self._label_path(path)) as lab:
            lab.load()
        raw = np.asarray(_resize_crop(lab, self.image_size, Image.NEAREST)).astype(np.int64)
        if raw.ndim == 3:
            raise ValueError(f"label map {self._label_path(path)} has colour channels; expected one class id "
                             "per pixel (a grayscale or palette PNG)")
        label = torch.from_numpy(raw)
        invalid = label == 255
        if self.num_classes is not None:
            invalid |= (label < 0) | (label >= self.num_classes)
        return image, label.masked_fill(invalid, -1)
