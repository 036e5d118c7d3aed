"""Reference pools: task-agnostic ``Q^ag`` (fixed) and task-specific ``Q^sp`` (refreshed), section 3.2.

``Q^ag`` holds M backbone features, one random patch per image (so the pool covers M different
images). ``Q^sp`` holds momentum-head features ``s' = S'(f)`` of random patches and is renewed every
``renew_interval`` iterations.

Refreshing needs no backbone pass (hot spot H3 of the official code, docs/official-code-differences.md#h3, which re-runs the ViT on M
images at every refresh): S' is pointwise, so ``s'`` of a stored patch is exactly ``S'(f_patch)``. A
:class:`ReferencePools` therefore keeps a *bank* of raw backbone patch features, gathered once, and a
refresh re-applies the current momentum head to M random rows of it.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from hpkit.method.heads import MomentumHead

__all__ = ["sample_patches", "collect_patch_bank", "ReferencePools"]


def sample_patches(feats: Tensor, *, per_image: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """Random patch features from each image.

    Args:
        feats: (B, C, h, w) backbone features.
        per_image: patches drawn per image (without replacement).

    Returns:
        (B * per_image, C) raw (not normalised) features, image-major.
    """
    b, c, h, w = feats.shape
    if per_image > h * w:
        raise ValueError(f"per_image={per_image} exceeds the {h * w} patches of an image")
    scores = torch.rand(b, h * w, generator=generator, device=generator.device if generator else "cpu")
    idx = scores.argsort(dim=1)[:, :per_image].to(feats.device)  # (B, per_image) distinct patches
    rows = feats.flatten(2).transpose(1, 2)  # (B, P, C)
    return rows.gather(1, idx[..., None].expand(-1, -1, c)).reshape(-1, c)


@torch.no_grad()
def collect_patch_bank(
    backbone,
    batches: Iterable,
    num_images: int,
    *,
    per_image: int = 1,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Tensor:
    """Run the backbone over ``num_images`` images and keep random patch features.

    Args:
        backbone: a :class:`hpkit.FrozenViT` (or any callable returning ``(feats, ...)``).
        batches: iterable of image batches (B, 3, H, W) in [0, 1], or of tuples whose first item is one.
        num_images: how many images to use (the pool size M, or more for a larger bank).
        per_image: patches kept per image.
        progress: show a progress bar over the images.

    Returns:
        (num_images * per_image, C) raw backbone features.

    Raises:
        ValueError: fewer than ``num_images`` images were available.
    """
    rows, seen = [], 0
    bar = tqdm(total=num_images, desc="reference pool", unit="img", disable=not progress, leave=False)
    for batch in batches:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        images = images[: num_images - seen].to(device)
        feats = backbone(images, attention=False)[0]
        rows.append(sample_patches(feats, per_image=per_image, generator=generator).cpu())
        seen += images.shape[0]
        bar.update(images.shape[0])
        if seen >= num_images:
            break
    bar.close()
    if seen < num_images:
        raise ValueError(f"only {seen} images available but the reference pool needs {num_images}: "
                         "lower the pool size M or use more images")
    return torch.cat(rows)


class ReferencePools:
    """The two reference pools of HP, built from a bank of raw backbone patch features.

    Args:
        bank: (K, C) raw backbone features of random patches (see :func:`collect_patch_bank`). Build
            it with ``per_image=1`` so that ``Q^ag`` holds one patch per image, as in the paper; a
            bank from more images than M gives every refresh of ``Q^sp`` a fresh sample.
        size: pool size M (<= K). ``Q^ag`` takes M random rows of the bank once.
        generator: random generator for the row draws.

    Attributes:
        agnostic: (M, C) L2-normalised ``Q^ag``.
        specific: (M, D) L2-normalised ``Q^sp`` (None until :meth:`refresh_specific`).
    """

    def __init__(self, bank: Tensor, size: int, *, generator: torch.Generator | None = None):
        if bank.dim() != 2:
            raise ValueError(f"bank must be (K, C) patch features, got shape {tuple(bank.shape)}")
        if size > bank.shape[0]:
            raise ValueError(f"pool size M={size} is larger than the {bank.shape[0]} patches in the bank: "
                             "lower M or collect the bank from more images")
        self.bank = bank
        self.size = size
        self.agnostic = F.normalize(bank[self._draw(generator)].float(), dim=1)
        self.specific: Tensor | None = None

    def _draw(self, generator: torch.Generator | None) -> Tensor:
        return torch.randperm(self.bank.shape[0], generator=generator)[: self.size]

    @torch.no_grad()
    def refresh_specific(self, ema_head: MomentumHead, *, generator: torch.Generator | None = None) -> Tensor:
        """Renew ``Q^sp`` = normalize(S'(M random bank rows)); no backbone pass. Returns the new pool."""
        param = next(ema_head.parameters())
        rows = self.bank[self._draw(generator)].to(param.device, param.dtype)
        self.specific = F.normalize(ema_head.rows(rows).float(), dim=1)
        return self.specific

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors needed to restore the pools exactly (for checkpoints)."""
        out = {"bank": self.bank, "agnostic": self.agnostic}
        if self.specific is not None:
            out["specific"] = self.specific
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "ReferencePools":
        pools = cls.__new__(cls)
        pools.bank, pools.agnostic = state["bank"], state["agnostic"]
        pools.size = pools.agnostic.shape[0]
        pools.specific = state.get("specific")
        return pools
