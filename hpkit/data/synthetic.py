"""Synthetic scenes: a deterministic, offline dataset of textured scenes with exact per-pixel labels.

Each image has 2-3 "stuff" regions (sky, grass, water, wall, sand) with irregular boundaries drawn
from smooth random fields (sky is pushed towards the top, so context matters), and 1-5 "things"
(ball, bush, zebra, crate) with shapes from star-shaped random contours that occlude each other.
Every class is a texture family (value noise, stripes, dots, bricks, checks, gradients) with random
scale, orientation and colour jitter, and the colour ranges of different classes overlap (sky and
water, grass and bush, wall, sand and crate), so colour alone cannot separate the classes.

The same ``(seed, split, index)`` gives the same image on any machine (NumPy's PCG64 generator and
plain float64 NumPy arithmetic).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SyntheticScenes", "CLASS_NAMES", "CLASS_COLORS", "render_scene", "write_scene_folder"]

CLASS_NAMES: tuple[str, ...] = ("sky", "grass", "water", "wall", "sand", "ball", "bush", "zebra", "crate")
STUFF = (0, 1, 2, 3, 4)
THINGS = (5, 6, 7, 8)
CLASS_COLORS = np.array([  # a palette for label maps (not the texture colours)
    [70, 130, 180], [34, 139, 34], [0, 0, 142], [150, 100, 100], [210, 180, 140],
    [220, 20, 60], [107, 142, 35], [140, 70, 190], [255, 165, 0]], dtype=np.uint8)

# Base colours (RGB in [0, 1]) of each class's texture; jittered per image. Ranges overlap on purpose.
_BASE = {
    0: ((0.45, 0.6, 0.9), (0.75, 0.85, 1.0)),   # sky: light blue gradient
    1: ((0.2, 0.5, 0.15), (0.45, 0.7, 0.3)),    # grass: greens
    2: ((0.15, 0.35, 0.7), (0.5, 0.65, 0.9)),   # water: blues, overlapping sky
    3: ((0.55, 0.35, 0.3), (0.75, 0.7, 0.65)),  # wall: brick / grey
    4: ((0.7, 0.6, 0.4), (0.85, 0.75, 0.55)),   # sand: beige, overlapping wall
    5: ((0.3, 0.3, 0.3), (0.95, 0.8, 0.7)),     # ball: any colour, shaded
    6: ((0.15, 0.45, 0.1), (0.4, 0.65, 0.25)),  # bush: greens, overlapping grass
    7: ((0.05, 0.05, 0.05), (0.9, 0.9, 0.9)),   # zebra: dark / light stripes
    8: ((0.6, 0.45, 0.3), (0.8, 0.65, 0.45)),   # crate: wood, overlapping sand and wall
}


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random ``cells x cells`` grid, bilinearly upsampled to ``size``."""
    grid = rng.random((cells + 1, cells + 1))
    t = np.linspace(0, cells, size, endpoint=False)
    i = t.astype(int)
    f = t - i
    f = f * f * (3 - 2 * f)  # smoothstep between grid points
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


_BORROW = 0.5  # chance that a region takes another class's colours (its texture stays its own)


def _mix(rng: np.random.Generator, cls: int, amount: np.ndarray) -> np.ndarray:
    """Blend two jittered base colours by ``amount`` (H, W) in [0, 1] -> (H, W, 3).

    The colours are the class's own, or with probability ``_BORROW`` those of a random class, so
    that colour alone cannot tell the classes apart while texture, shape and context can.
    """
    if rng.random() < _BORROW:
        cls = int(rng.integers(len(_BASE)))
    lo, hi = (np.clip(np.array(c) + rng.normal(0, 0.06, 3), 0, 1) for c in _BASE[cls])
    return lo[None, None] + amount[..., None] * (hi - lo)[None, None]


def _texture(rng: np.random.Generator, cls: int, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """The (size, size, 3) texture of one class, in [0, 1]."""
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)  # a rotated coordinate
    if cls == 0:  # sky: vertical gradient + faint clouds
        amount = 0.8 * (1 - yy) + 0.2 * _value_noise(rng, size, 3)
    elif cls == 1:  # grass: fine noise with vertical streaks
        amount = 0.6 * _value_noise(rng, size, int(rng.integers(12, 24))) + 0.4 * (np.sin(xx * rng.uniform(60, 120)) > 0)
    elif cls == 2:  # water: wavy horizontal stripes
        period = rng.uniform(0.04, 0.09)
        amount = 0.5 + 0.5 * np.sin(2 * np.pi * (yy + 0.03 * np.sin(2 * np.pi * xx * rng.uniform(2, 5))) / period)
    elif cls == 3:  # wall: bricks (mortar lines on a staggered grid)
        h = rng.uniform(0.06, 0.12)
        row = np.floor(yy / h)
        w = 2 * h
        col = (xx / w + 0.5 * (row % 2)) % 1.0
        mortar = ((yy / h) % 1.0 < 0.12) | (col < 0.06)
        amount = np.where(mortar, 1.0, 0.25 * _value_noise(rng, size, 8))
    elif cls == 4:  # sand: fine speckle
        amount = 0.5 * _value_noise(rng, size, int(rng.integers(20, 40))) + 0.5 * rng.random((size, size))
    elif cls == 5:  # ball: radial shading from a light direction
        amount = 0.5 + 0.5 * np.cos(2 * np.pi * u * rng.uniform(1, 3))
    elif cls == 6:  # bush: dots of leaves on noise
        freq = rng.uniform(25, 45)
        dots = (np.sin(2 * np.pi * xx * freq) * np.sin(2 * np.pi * yy * freq) > 0.5)
        amount = 0.6 * dots + 0.4 * _value_noise(rng, size, 10)
    elif cls == 7:  # zebra: sharp oriented stripes
        amount = (np.sin(2 * np.pi * u * rng.uniform(12, 22)) > 0).astype(float)
    else:  # crate: checks
        freq = rng.uniform(8, 16)
        v = -xx * np.sin(angle) + yy * np.cos(angle)
        amount = 0.3 + 0.7 * ((np.floor(u * freq) + np.floor(v * freq)) % 2)
    return _mix(rng, cls, amount)


def _star_shape(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cls: int) -> np.ndarray:
    """A random star-shaped region (bool (H, W)) whose outline family depends on the thing class."""
    cy, cx = rng.uniform(0.15, 0.85, 2)
    radius = rng.uniform(0.1, 0.22)
    dy, dx = yy - cy, xx - cx
    theta = np.arctan2(dy, dx)
    r = np.hypot(dy, dx)
    if cls == 7:  # zebra: elongated body
        stretch = rng.uniform(1.6, 2.4)
        rot = rng.uniform(0, np.pi)
        along = dx * np.cos(rot) + dy * np.sin(rot)
        across = -dx * np.sin(rot) + dy * np.cos(rot)
        r = np.hypot(along / stretch, across)
        theta = np.arctan2(across, along)
    harmonics = {5: (1, 2), 6: (5, 9), 7: (2, 3), 8: (4, 4)}[cls]
    outline = np.ones_like(theta)
    for k in range(harmonics[0], harmonics[1] + 1):
        outline += rng.uniform(0.03, 0.15) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    if cls == 8:  # crate: squarish (superellipse)
        outline = outline / np.power(np.abs(np.cos(theta)) ** 4 + np.abs(np.sin(theta)) ** 4, 0.25)
    return r < radius * outline


def render_scene(seed: int, index: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Render one scene.

    Args:
        seed: dataset seed (split already folded in by :class:`SyntheticScenes`).
        index: image index.
        size: side length in pixels.

    Returns:
        image (size, size, 3) float32 in [0, 1], label (size, size) int64 class ids.
    """
    rng = np.random.default_rng([seed, index])
    yy, xx = np.meshgrid(np.linspace(0, 1, size, endpoint=False), np.linspace(0, 1, size, endpoint=False),
                         indexing="ij")
    n_stuff = int(rng.integers(2, 4))
    stuff = [int(c) for c in rng.choice(STUFF, size=n_stuff, replace=False)]
    # Irregular stuff regions: argmax of smooth random fields; sky is favoured at the top.
    fields = []
    for cls in stuff:
        field = _value_noise(rng, size, int(rng.integers(2, 5)))
        if cls == 0:
            field = field + 1.5 * (0.45 - yy)
        fields.append(field)
    label = np.asarray(stuff)[np.argmax(np.stack(fields), axis=0)]
    image = np.zeros((size, size, 3))
    for cls in stuff:
        region = label == cls
        if region.any():
            image[region] = _texture(rng, cls, size, yy, xx)[region]
    for _ in range(int(rng.integers(1, 6))):  # things, later ones occlude earlier ones
        cls = int(rng.choice(THINGS))
        shape = _star_shape(rng, yy, xx, cls)
        if shape.any():
            image[shape] = _texture(rng, cls, size, yy, xx)[shape]
            label[shape] = cls
    image = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1)  # sensor noise
    return image.astype(np.float32), label.astype(np.int64)


class SyntheticScenes(Dataset):
    """Torch dataset of :func:`render_scene` images: ``(image (3, H, W) float in [0, 1], label (H, W) int64)``.

    Args:
        split: ``"train"`` or ``"val"`` (disjoint random streams).
        num_images: dataset length.
        image_size: side length in pixels (default 128: a 16 x 16 grid for patch 8).
        seed: dataset seed; the same seed gives the same images on any machine.
        cache: keep rendered images in memory (each is rendered once).

    Attributes:
        class_names: tuple of the 9 class names; ``colors``: (9, 3) uint8 palette for label maps.
    """

    class_names = CLASS_NAMES
    colors = CLASS_COLORS
    ignore_index = -1

    def __init__(self, split: str = "train", *, num_images: int = 1000, image_size: int = 128, seed: int = 0,
                 cache: bool = True):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if num_images <= 0 or image_size < 16:
            raise ValueError(f"need num_images > 0 and image_size >= 16, got {num_images} and {image_size}")
        self.split, self.num_images, self.image_size, self.seed = split, num_images, image_size, seed
        self._stream = seed * 2 + (0 if split == "train" else 1)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        image, label = render_scene(self._stream, index, self.image_size)
        item = (torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(label))
        if self._cache is not None:
            self._cache[index] = item
        return item


def write_scene_folder(root, *, num_train: int = 16, num_val: int = 8, sizes: tuple[tuple[int, int], ...] = (
        (160, 120), (120, 160)), seed: int = 0, void_edges: bool = True, classes_file: bool = True):
    """Write synthetic scenes as a labelled folder dataset (the layout of :mod:`hpkit.data.folder`).

    Image ``i`` of a split has size ``sizes[i % len(sizes)]`` (width, height): a scene rendered at the
    longer side and cut to that size. Images are JPEG (quality 95), label maps 8-bit PNG; with
    ``void_edges`` the pixels on a class boundary (4-neighbourhood) are void (255), as in real
    annotations. ``classes.txt`` names the 9 classes with their palette colours.

    Returns:
        the root folder (``Path``).
    """
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    for split, count, stream in (("train", num_train, seed * 2), ("val", num_val, seed * 2 + 1)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "labels").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            w, h = sizes[i % len(sizes)]
            image, label = render_scene(stream, i, max(w, h))
            image, label = image[:h, :w], label[:h, :w].astype(np.uint8)
            if void_edges:
                edge = np.zeros_like(label, dtype=bool)
                edge[1:] |= label[1:] != label[:-1]
                edge[:, 1:] |= label[:, 1:] != label[:, :-1]
                label[edge] = 255
            Image.fromarray((image * 255).round().astype(np.uint8)).save(root / split / "images" / f"{i:04d}.jpg",
                                                                         quality=95)
            Image.fromarray(label, mode="L").save(root / split / "labels" / f"{i:04d}.png")
    if classes_file:
        (root / "classes.txt").write_text("".join(f"{name} #{r:02x}{g:02x}{b:02x}\n"
                                                  for name, (r, g, b) in zip(CLASS_NAMES, CLASS_COLORS)))
    return root
