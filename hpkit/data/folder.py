"""Your own photos as a dataset: a folder layout with optional labels, checked before any training.

Layout (every part but ``train/images`` optional)::

    DIR/train/images/*.jpg|png|...   DIR/train/labels/<same stem>.png   (labels optional)
    DIR/val/images/...               DIR/val/labels/...                 (val optional)
    DIR/classes.txt                  one class per line: "name" or "name #rrggbb"

or, for unlabelled use (segment, pretrain, training without metrics), a flat folder of photos
(``DIR/*.jpg``, sub-folders included; a folder named ``labels`` is never read as images).

:func:`scan_folder` reads and checks the layout without decoding a photo: a label map must exist for
every image of a split that has a ``labels`` folder and vice versa, have the image's size and one
class id per pixel; ``classes.txt`` lines must parse; with ``classes.txt``, ids above the class
count are errors. Every problem is a ``ValueError`` (or ``FileNotFoundError``) of one line that says
what is wrong and what to do. Class names come from ``classes.txt``, or else ``class 0`` ...
``class N-1`` with N = the largest label id + 1 (a note says so). Label value 255 is void.

:class:`ImageFolder` serves one split as ``(image (3, H, W) float32 in [0, 1], label (H, W) int64,
-1 = ignore)``, any RGB, grayscale, palette, RGBA or 16-bit image. ``crop`` chooses the geometry,
always after resizing the shorter side to ``image_size`` (bilinear for images, nearest for labels):

- ``"center"``: the centre ``S x S`` square (the paper's datasets);
- ``"random"``: an ``S x S`` square at a random offset along the longer side, drawn once per image
  from ``(seed, index)``: the same crop every epoch, so the feature cache stays exact and a resumed
  run is bit-identical (training on folders);
- ``"whole"``: the whole image at its aspect ratio, the longer side rounded to a multiple of
  ``multiple`` (the backbone's patch), labels resized to the same size (evaluation on folders).

A split without labels yields all -1 labels. A missing ``val`` split is served from ``train``
(``split_used == "train"``; a note says so).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = ["ImageFolder", "FolderLayout", "FolderSplit", "scan_folder", "read_classes", "IMAGE_EXTENSIONS",
           "load_rgb", "resize_shorter", "default_colors", "CROPS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
CROPS = ("center", "random", "whole")
VOID = 255


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


def resize_shorter(img: Image.Image, size: int, resample: int, multiple: int | None = None) -> Image.Image:
    """Resize so the shorter side is ``size``; with ``multiple``, the longer side is rounded to it."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if multiple:
        nw, nh = max(multiple, round(nw / multiple) * multiple), max(multiple, round(nh / multiple) * multiple)
    return img.resize((nw, nh), resample)


def _resize_crop(img: Image.Image, size: int, resample: int, offset: float | None = None) -> Image.Image:
    """Shorter side to ``size``, then the ``size`` square at ``offset`` (0 = left/top, 1 = right/bottom;
    None = the centre, ``(w - size) // 2`` as the paper datasets' loaders have always cropped)."""
    img = resize_shorter(img, size, resample)
    w, h = img.size
    if offset is None:
        left, top = (w - size) // 2, (h - size) // 2
    else:
        left, top = round((w - size) * offset), round((h - size) * offset)
    return img.crop((left, top, left + size, top + size))


@dataclass
class FolderSplit:
    """The files of one split: images, and label maps in the same order (None: unlabelled)."""

    images: list[Path]
    labels: list[Path] | None = None


@dataclass
class FolderLayout:
    """What :func:`scan_folder` found: the splits, the classes and the notes to show the user."""

    root: Path
    splits: dict[str, FolderSplit]
    class_names: tuple[str, ...] = ()  # () when no split has labels
    colors: np.ndarray | None = None  # (n, 3) uint8
    notes: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        """A digest of every file the dataset reads (path, size, modification time): caches and runs
        keyed on it notice photos that were added, removed or replaced."""
        digest = hashlib.sha256()
        files = [p for split in self.splits.values() for p in split.images + (split.labels or [])]
        for path in sorted(files + [p for p in [self.root / "classes.txt"] if p.is_file()]):
            stat = path.stat()
            digest.update(f"{path.relative_to(self.root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


def _images_in(folder: Path) -> list[Path]:
    """Image files below ``folder`` (sub-folders included, folders named ``labels`` left out), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and "labels" not in p.relative_to(folder).parts[:-1])


def read_classes(path: Path) -> tuple[tuple[str, ...], np.ndarray | None]:
    """Parse ``classes.txt``: line k is class k, ``name`` or ``name #rrggbb`` (colours all or none)."""
    names, colors = [], []
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, 1):
        text = line.strip()
        match = re.fullmatch(r"(.*?)\s+#([0-9a-fA-F]{6})", text)
        name = match.group(1).strip() if match else text
        if not name or "#" in name:
            raise ValueError(f"{path} line {number} {line!r} does not parse: write one class per line, "
                             "'name' or 'name #rrggbb' (line k is class id k - 1)")
        if name in names:
            raise ValueError(f"{path} line {number}: class {name!r} appears twice; class names must differ")
        names.append(name)
        colors.append([int(match.group(2)[i:i + 2], 16) for i in (0, 2, 4)] if match else None)
    if not names:
        raise ValueError(f"{path} is empty: write one class name per line, or delete it to name classes by id")
    if any(c is None for c in colors) and not all(c is None for c in colors):
        raise ValueError(f"{path}: give every class a colour (name #rrggbb) or none")
    return tuple(names), (np.asarray(colors, dtype=np.uint8) if colors[0] is not None else None)


#: matplotlib's "tab20" palette as uint8 RGB (written out so the data layer needs no plotting library)
TAB20 = np.array([[31, 119, 180], [174, 199, 232], [255, 127, 14], [255, 187, 120], [44, 160, 44], [152, 223, 138],
                  [214, 39, 40], [255, 152, 150], [148, 103, 189], [197, 176, 213], [140, 86, 75], [196, 156, 148],
                  [227, 119, 194], [247, 182, 210], [127, 127, 127], [199, 199, 199], [188, 189, 34], [219, 219, 141],
                  [23, 190, 207], [158, 218, 229]], dtype=np.uint8)


def default_colors(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct colours (tab20, repeating) for label maps without a palette."""
    return TAB20[np.arange(n) % len(TAB20)]


def _pair_labels(split: str, image_dir: Path, label_dir: Path, images: list[Path]) -> list[Path]:
    labels = {p.relative_to(label_dir).with_suffix("").as_posix(): p
              for p in label_dir.rglob("*") if p.is_file() and p.suffix.lower() == ".png"}
    keys = [p.relative_to(image_dir).with_suffix("").as_posix() for p in images]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"{image_dir} holds two images named {dup}.*: their label maps would be the same file; "
                         "rename one")
    missing = [k for k in keys if k not in labels]
    if missing:
        raise ValueError(f"{len(missing)} image(s) of {split} have no label map, e.g. {missing[0]}: expected "
                         f"{label_dir / (missing[0] + '.png')} (label every image of a split, or remove its labels "
                         "folder)")
    orphans = sorted(set(labels) - set(keys))
    if orphans:
        raise ValueError(f"{len(orphans)} label map(s) of {split} have no image, e.g. {labels[orphans[0]]}: add the "
                         f"image to {image_dir} or delete the label map")
    return [labels[k] for k in keys]


def _check_labels(images: list[Path], labels: list[Path]) -> dict[Path, int]:
    """Check sizes and modes; return each label map's largest class id (255 excluded; -1 if none)."""
    top: dict[Path, int] = {}
    for image, label in zip(images, labels):
        try:
            with Image.open(image) as img:
                size = img.size
            with Image.open(label) as lab:
                lab_size, mode = lab.size, lab.mode
                raw = np.asarray(lab)
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read {err}") from None
        if mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1") or raw.ndim != 2:
            raise ValueError(f"label map {label} has mode {mode}: store one class id per pixel (a grayscale or "
                             "palette PNG), not colours")
        if lab_size != size:
            raise ValueError(f"label map {label} is {lab_size[0]}x{lab_size[1]} but its image {image} is "
                             f"{size[0]}x{size[1]}: label maps must have their image's size")
        ids = np.unique(raw)
        ids = ids[ids != VOID]
        top[label] = int(ids.max()) if ids.size else -1
    return top


def scan_folder(root: str | Path, *, labels: bool = True) -> FolderLayout:
    """Read and check a dataset folder (layout in the module docstring); raises on the first problem.

    ``labels=False`` lists the images only: label maps are neither paired, checked nor read (for work
    that never uses them, such as backbone pretraining)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    notes: list[str] = []
    if (root / "train").is_dir():
        splits: dict[str, FolderSplit] = {}
        for split in ("train", "val"):
            image_dir = root / split / "images"
            if not (root / split).is_dir():
                continue
            if not image_dir.is_dir():
                raise ValueError(f"{root / split} has no images/ folder: put its photos in {image_dir} (and label "
                                 f"maps, if any, in {root / split / 'labels'})")
            images = _images_in(image_dir)
            if not images:
                raise ValueError(f"the {split} split is empty: no images ({', '.join(IMAGE_EXTENSIONS)}) in "
                                 f"{image_dir}")
            label_dir = root / split / "labels"
            paired = _pair_labels(split, image_dir, label_dir, images) if labels and label_dir.is_dir() else None
            splits[split] = FolderSplit(images, paired)
        if "val" not in splits:
            notes.append(f"{root} has no val split ({root / 'val' / 'images'}): metrics are computed on the "
                         "training images")
    else:
        images = _images_in(root)
        if not images:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found below {root}")
        splits = {"train": FolderSplit(images)}
        if (root / "labels").is_dir():
            notes.append(f"{root / 'labels'} is not read: for labels use {root}/train/images and {root}/train/labels")
    layout = FolderLayout(root, splits, notes=notes)
    labelled = {name: s for name, s in splits.items() if s.labels is not None}
    if not labelled:
        return layout
    tops: dict[Path, int] = {}
    for s in labelled.values():
        tops.update(_check_labels(s.images, s.labels))
    bad = max(tops, key=tops.get)
    top = tops[bad]
    classes_file = root / "classes.txt"
    if classes_file.is_file():
        names, colors = read_classes(classes_file)
        if top >= len(names):
            raise ValueError(f"label map {bad} has class id {top} but {classes_file} names {len(names)} classes "
                             f"(ids 0-{len(names) - 1}; 255 = void): add the missing classes or fix the label map")
    else:
        if top < 0:
            raise ValueError(f"every label map below {root} is void (255): label some pixels, or remove the labels "
                             "folders to train without labels")
        names, colors = tuple(f"class {i}" for i in range(top + 1)), None
        notes.append(f"no {classes_file.name} in {root}: {top + 1} classes from the largest label id ({top}), "
                     f"named class 0 ... class {top} (write {classes_file} to name them)")
    layout.class_names = names
    layout.colors = colors if colors is not None else default_colors(len(names))
    return layout


class ImageFolder(Dataset):
    """One split of a folder dataset as ``(image (3, H, W) in [0, 1], label (H, W) int64)``.

    Args:
        root: the dataset folder (layout in the module docstring) or a flat folder of photos.
        split: ``"train"`` or ``"val"`` (served from train, with a note, when there is no val split).
        image_size: the shorter side S after resizing.
        crop: ``"center"``, ``"random"`` (one fixed offset per image from ``seed``) or ``"whole"``.
        multiple: ``crop="whole"`` rounds the longer side to a multiple of this (the backbone's patch).
        seed: seeds the ``"random"`` crops.
        layout: a :func:`scan_folder` result to reuse (it is read from ``root`` otherwise).
        verify: open every image now and leave out unreadable ones with a warning.

    Attributes:
        class_names, colors: from the layout (``()`` and None when unlabelled); ``split_used``: the
        split actually served; ``notes``: lines to show the user; ``files``: the image paths.
    """

    def __init__(self, root: str | Path, split: str = "train", *, image_size: int = 224, crop: str = "center",
                 multiple: int = 8, seed: int = 0, layout: FolderLayout | None = None, verify: bool = False):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
        self.layout = layout if layout is not None else scan_folder(root)
        self.root = self.layout.root
        self.split_used = split if split in self.layout.splits else "train"
        chosen = self.layout.splits[self.split_used]
        self.files, self.label_files = list(chosen.images), chosen.labels
        self.class_names, self.colors = self.layout.class_names, self.layout.colors
        self.notes = list(self.layout.notes)
        self.image_size, self.crop, self.multiple, self.seed = image_size, crop, multiple, seed
        if verify:
            keep = []
            for i, path in enumerate(self.files):
                try:
                    load_rgb(path)
                    keep.append(i)
                except OSError as err:
                    warnings.warn(f"skipping unreadable image: {err}", stacklevel=2)
            if not keep:
                raise FileNotFoundError(f"none of the images below {self.root} could be read")
            self.files = [self.files[i] for i in keep]
            if self.label_files is not None:
                self.label_files = [self.label_files[i] for i in keep]

    @property
    def labelled(self) -> bool:
        return self.label_files is not None and bool(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def _offset(self, index: int) -> float | None:
        if self.crop == "center":
            return None
        return float(torch.rand((), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + index)))

    def _geometry(self, img: Image.Image, index: int, resample: int) -> Image.Image:
        if self.crop == "whole":
            return resize_shorter(img, self.image_size, resample, self.multiple)
        return _resize_crop(img, self.image_size, resample, self._offset(index))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self._geometry(load_rgb(self.files[index]), index, Image.BILINEAR)
        image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        if not self.labelled:
            return image, torch.full(image.shape[1:], -1, dtype=torch.long)
        with Image.open(self.label_files[index]) as lab:
            lab.load()
            if lab.mode != "L" and lab.mode != "P":
                lab = Image.fromarray(np.asarray(lab).astype(np.int32))  # mode "I": 16-bit ids survive the resize
        label = torch.from_numpy(np.asarray(self._geometry(lab, index, Image.NEAREST)).astype(np.int64))
        invalid = (label < 0) | (label >= len(self.class_names))  # 255 (void) included
        return image, label.masked_fill(invalid, -1)
