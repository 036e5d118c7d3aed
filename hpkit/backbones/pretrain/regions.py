"""Pseudo-regions for the ``regions`` objective: k-means of each image's patch tokens under the
frozen initialisation (:func:`region_masks`), and the region under each patch of a crop
(:func:`region_ids`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from hpkit.backbones.pretrain.geometry import correspondence
from hpkit.backbones.pretrain.model import DINONet

__all__ = ["region_masks", "region_ids"]


@torch.no_grad()
def region_masks(network: "DINONet", data: Dataset, clusters: int, generator: torch.Generator, *,
                 iterations: int = 20, batch_size: int = 50) -> Tensor:
    """Pseudo-regions of every image: spherical k-means of the image's own patch tokens.

    Args:
        network: the (frozen, randomly initialised) network whose tokens are clustered.
        data: dataset of (image (3, H, W) in [0, 1], label); labels are not used.
        clusters: regions per image (K).
        generator: draws each image's K starting tokens.

    Returns:
        (N, H/p, W/p) uint8 region ids in [0, K): the nearest of K centres (cosine), after
        ``iterations`` rounds of assignment and mean update; a centre that wins no token stays put.
    """
    out = []
    device = next((t.device for t in (*network.parameters(), *network.buffers())), torch.device("cpu"))
    for images, _ in DataLoader(data, batch_size=batch_size):
        _, tokens = network.tokens(images.float().to(device))
        b, h, w, c = tokens.shape
        x = F.normalize(tokens.reshape(b, h * w, c).float(), dim=-1)  # (b, P, C)
        start = torch.stack([torch.randperm(h * w, generator=generator)[:clusters] for _ in range(b)])
        centres = x[torch.arange(b)[:, None], start.to(x.device)]  # (b, K, C)
        for _ in range(iterations):
            onehot = F.one_hot(torch.einsum("bpc,bkc->bpk", x, centres).argmax(-1), clusters).to(x.dtype)
            sums = torch.einsum("bpk,bpc->bkc", onehot, x)
            centres = torch.where(onehot.sum(1)[..., None] > 0, F.normalize(sums, dim=-1), centres)
        assign = torch.einsum("bpc,bkc->bpk", x, centres).argmax(-1)
        out.append(assign.reshape(b, h, w).to(torch.uint8).cpu())
    return torch.cat(out)


def region_ids(boxes: Tensor, masks: Tensor, grid: int) -> Tensor:
    """The pseudo-region under the centre of each patch of crops: boxes (B, 5) (:class:`MultiCrop`),
    masks (B, G, G) region ids of the whole images -> (B, grid, grid) long (``grid=1``: the crop centre)."""
    whole = boxes.new_tensor([0.0, 0.0, 1.0, 1.0, 0.0]).expand(len(boxes), 5)
    points, _ = correspondence(boxes, whole, grid)  # patch centres in whole-image coordinates
    ids = F.grid_sample(masks[:, None].float(), points.to(boxes.dtype), mode="nearest", align_corners=False)
    return ids[:, 0].long()
