"""The networks of a pretraining run: the timm ViT (:func:`build_vit`), DINO's projection head
(:class:`DINOHead`), VICReg's expander (:func:`expander`) and the backbone + heads that see a list of
crops (:class:`DINONet`)."""

from __future__ import annotations

import math
from typing import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpkit.backbones.pretrain.config import _TINY, PretrainConfig

__all__ = ["build_vit", "DINOHead", "expander", "DINONet"]


def build_vit(cfg: PretrainConfig, drop_path_rate: float | None = None) -> nn.Module:
    """The timm ViT of ``cfg``, built like hpkit's ``random_tiny`` (no classifier, any crop size).

    ``model(x)`` maps images (B, 3, H, W) (normalised) to CLS tokens (B, embed_dim) after the final norm.
    """
    return timm.create_model(_TINY.timm_name, pretrained=False, num_classes=0, dynamic_img_size=True,
                             patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                             num_heads=cfg.num_heads, img_size=cfg.img_size,
                             drop_path_rate=cfg.drop_path_rate if drop_path_rate is None else drop_path_rate)


class DINOHead(nn.Module):
    """DINO projection head: (N, in_dim) -> 3-layer MLP -> L2-normalised (N, bottleneck) -> (N, out_dim).

    The last layer is weight-normalised (``weight = g * v / |v|`` per prototype); with
    ``norm_last_layer`` the gain g is fixed to 1, so the logits are cosine similarities to the
    prototypes, which keeps the softmax temperatures meaningful.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 512, bottleneck_dim: int = 128,
                 norm_last_layer: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        nn.init.trunc_normal_(last.weight, std=0.02)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        gain = self.last_layer.parametrizations.weight.original0  # (out_dim, 1)
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_dim) -> logits (N, out_dim)."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def expander(in_dim: int, dim: int, out_dim: int | None = None) -> nn.Sequential:
    """VICReg's expander (also the region projector), 2 layers: (N, in_dim) -> Linear -> BatchNorm ->
    ReLU -> Linear -> (N, out_dim or dim)."""
    return nn.Sequential(nn.Linear(in_dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, out_dim or dim))


def _apply_rows(module: nn.Module, x: Tensor) -> Tensor:
    """Apply a row-wise module to (..., C) -> (..., D) (BatchNorm1d needs 2-d input)."""
    return module(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


class DINONet(nn.Module):
    """ViT backbone + DINO head (+ an optional patch head for the dense term), applied to a list of crops.

    Images are in [0, 1] and normalised inside with the mean/std that :class:`hpkit.FrozenViT`
    will use for this timm model. Consecutive crops of one size go through the ViT as one batch.
    """

    def __init__(self, backbone: nn.Module, head: DINOHead, patch_head: nn.Module | None = None):
        super().__init__()
        self.backbone, self.head, self.patch_head = backbone, head, patch_head
        pcfg = getattr(backbone, "pretrained_cfg", {}) or {}
        self.register_buffer("mean", torch.tensor(pcfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(pcfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1),
                             persistent=False)

    def tokens(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) in [0, 1] -> CLS (B, C) and patch tokens (B, H/p, W/p, C), after the final LayerNorm."""
        x = self.backbone.forward_features((images - self.mean) / self.std)
        prefix = getattr(self.backbone, "num_prefix_tokens", 1)
        b, n, c = x.shape
        side = int(round(math.sqrt(n - prefix)))
        return x[:, 0], x[:, prefix:].reshape(b, side, side, c)

    def encode(self, crops: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """crops: list of (B, 3, S_i, S_i) -> CLS tokens (len(crops) * B, C), crop-major, and per crop
        the patch tokens (B, S_i/p, S_i/p, C)."""
        cls, patches, start = [], [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            c, p = self.tokens(torch.cat(list(crops[start:end])))
            cls.append(c)
            patches.extend(p.chunk(end - start))
            start = end
        return torch.cat(cls), patches

    def forward(self, crops: Sequence[Tensor]) -> Tensor:
        """crops: list of (B, 3, S_i, S_i) -> logits (len(crops) * B, out_dim), crop-major."""
        return self.head(self.encode(crops)[0])
