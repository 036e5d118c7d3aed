"""Segmentation head S, projection head Z and the momentum copy S' (docs/official-code-differences.md#heads).

All heads are pointwise (1x1 convolutions / linear layers): the output at a patch depends only on the
backbone feature at that patch, which is why the task-specific pool can be refreshed from cached
backbone features (:mod:`hpkit.method.pools`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["SegmentationHead", "ProjectionHead", "MomentumHead", "to_rows", "from_rows"]


def to_rows(x: Tensor) -> Tensor:
    """(B, D, h, w) maps -> (B * h * w, D) rows in image-major order (row = b*P + y*w + x)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def from_rows(rows: Tensor, batch: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`to_rows`: (B * h * w, D) -> (B, D, h, w)."""
    return rows.reshape(batch, h, w, -1).permute(0, 3, 1, 2)


class SegmentationHead(nn.Module):
    """S: ``s = L(drop(f)) + M(drop(f))`` (STEGO form; "two-layer ReLU MLP" in the paper, docs/official-code-differences.md#d5).

    ``L`` is a 1x1 conv C -> D, ``M`` is 1x1 conv C -> C, ReLU, 1x1 conv C -> D. With ``dropout > 0``
    each branch gets its own ``Dropout2d`` on its input (channel dropout, as the official code).

    Args:
        in_dim: backbone width C.
        dim: segmentation feature width D (K in the paper: 512 for ViT-S/8, 256 for ViT-S/16).
        dropout: channel-dropout probability on each branch input (official: 0.1; paper: none).
    """

    def __init__(self, in_dim: int, dim: int, dropout: float = 0.0):
        super().__init__()
        self.linear = nn.Conv2d(in_dim, dim, 1)
        self.nonlinear = nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.ReLU(), nn.Conv2d(in_dim, dim, 1))
        self.drop_linear = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.drop_nonlinear = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.in_dim, self.dim = in_dim, dim

    def forward(self, f: Tensor) -> Tensor:
        """(B, C, h, w) backbone features -> (B, D, h, w) segmentation features (not normalised)."""
        return self.linear(self.drop_linear(f)) + self.nonlinear(self.drop_nonlinear(f))

    def rows(self, f_rows: Tensor) -> Tensor:
        """Apply the (pointwise) head to rows: (K, C) -> (K, D)."""
        return self(f_rows[:, :, None, None])[:, :, 0, 0]


class ProjectionHead(nn.Module):
    """Z: ``z = normalize(W s + b)``, a linear layer with bias followed by L2 normalisation (docs/official-code-differences.md#d6)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, s_rows: Tensor) -> Tensor:
        """(N, D) segmentation features -> (N, D) unit-norm projections."""
        return F.normalize(self.linear(s_rows), dim=-1)


class MomentumHead(AveragedModel):
    """S': an exponential moving average of a :class:`SegmentationHead` (never receives gradients).

    ``update(head)`` applies ``theta' <- m * theta' + (1 - m) * theta`` (the first call copies, which
    equals the rule because S' starts as a copy of S). Its forward runs without autograd.

    Args:
        head: the online segmentation head to follow.
        momentum: ``m`` (official ``ema_m``: 0.99 COCO-Stuff, 0.999 Cityscapes and Potsdam).
    """

    def __init__(self, head: SegmentationHead, momentum: float):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        super().__init__(head, multi_avg_fn=get_ema_multi_avg_fn(momentum), use_buffers=True)
        self.momentum = momentum
        self.requires_grad_(False)

    @torch.no_grad()
    def update(self, head: SegmentationHead) -> None:
        """One EMA step towards the online head's current parameters."""
        self.update_parameters(head)

    @torch.no_grad()
    def forward(self, f: Tensor) -> Tensor:  # type: ignore[override]
        """(B, C, h, w) -> (B, D, h, w) momentum-head features (not normalised)."""
        return self.module(f)

    @torch.no_grad()
    def rows(self, f_rows: Tensor) -> Tensor:
        """(K, C) -> (K, D), as :meth:`SegmentationHead.rows`."""
        return self.module.rows(f_rows)
