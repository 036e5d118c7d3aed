"""On-disk cache of the frozen backbone's clean-view outputs (hot spot H4, docs/official-code-differences.md#h4).

The training images are deterministic (a fixed centre crop, no geometric augmentation), so the clean
view's backbone features ``f`` and the attention-derived LHP neighbour weights never change. The
cache stores them once per training image in float16 ``.npy`` memory maps; epochs after the first need
only the photometric view's backbone pass (or none when the regulariser is off).

Values are always read back from the cache (rounded to float16), also in the epoch that fills it, so a
run does not depend on when an entry was computed: resuming gives the same result as not stopping.
The folder holds a ``key.json`` describing what was cached (backbone, weights, data, crop size, LHP
style and sigma); a cache whose key differs is rebuilt. Several processes (DDP ranks on one machine)
may share a cache: each fills the rows of its own images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["FeatureCache"]


class FeatureCache:
    """Per-image clean-view features ``(C, h, w)`` and, optionally, LHP weights ``(9, h, w)``.

    Args:
        folder: where the memory maps live (created).
        size: number of training images N.
        feat_shape: ``(C, h, w)``.
        with_weights: also cache the (9, h, w) neighbour weights.
        key: JSON-serialisable description of what is cached; a mismatch rebuilds the cache.
        create: this process creates the files (the others wait and open them: DDP rank 0 creates).
    """

    def __init__(self, folder: str | Path, size: int, feat_shape: tuple[int, int, int], *, with_weights: bool,
                 key: dict, create: bool = True):
        self.folder = Path(folder)
        c, h, w = feat_shape
        files = {"feats": (size, c, h, w)} | ({"weights": (size, 9, h, w)} if with_weights else {})
        key = {**key, "shapes": {k: list(v) for k, v in files.items()}}
        key_file = self.folder / "key.json"
        fresh = not key_file.is_file() or json.loads(key_file.read_text()) != key
        if create and fresh:
            self.folder.mkdir(parents=True, exist_ok=True)
            key_file.unlink(missing_ok=True)
            for name, shape in files.items():
                np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", dtype=np.float16, shape=shape)
            np.lib.format.open_memmap(self.folder / "filled.npy", mode="w+", dtype=np.bool_, shape=(size,))
            key_file.write_text(json.dumps(key))  # written last: a crash above leaves no valid key
        elif fresh:
            raise RuntimeError(f"feature cache {self.folder} is not ready (rank 0 creates it first)")
        self.arrays = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r+") for name in files}
        self.filled = np.load(self.folder / "filled.npy", mmap_mode="r+")

    def __len__(self) -> int:
        return int(self.filled.sum())

    def lookup(self, indices: Tensor, compute: Callable[[Tensor], dict[str, Tensor]],
               device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Cached entries of ``indices`` (B,), computing the missing ones first.

        Args:
            compute: called with the (M,) positions (into ``indices``) of missing entries; returns
                ``{"feats": (M, C, h, w), "weights": (M, 9, h, w)}`` for them.

        Returns:
            ``{"feats": (B, C, h, w), "weights": (B, 9, h, w)}`` float32 on ``device``.
        """
        idx = indices.cpu().numpy()
        missing = np.flatnonzero(~self.filled[idx])
        if missing.size:
            new = compute(torch.from_numpy(missing))
            for name, array in self.arrays.items():
                array[idx[missing]] = new[name].detach().to("cpu", torch.float16).numpy()
            self.filled[idx[missing]] = True  # after the data: a reader never sees a half-written row
        return {name: torch.from_numpy(np.ascontiguousarray(array[idx])).to(device=device, dtype=torch.float32)
                for name, array in self.arrays.items()}
