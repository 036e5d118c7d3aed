"""Pretrain hpkit's tiny ViT with DINO self-distillation (Caron et al., ICCV 2021), offline, on CPU.

DINO in a few lines: a *student* and a *teacher* network (the same ViT + projection head) see
different random crops of one image: the teacher only the 2 large "global" crops, the student
those and several small "local" crops. The student learns, by cross-entropy, to predict the
teacher's output distribution over K prototypes for every other crop ("local-to-global"
correspondence). The teacher is not trained by gradients: it is an exponential moving average
(EMA) of the student. Collapse is avoided by *centering* the teacher's logits (subtracting a
running mean, which prevents one prototype from dominating) and *sharpening* them (a low teacher
temperature, which prevents the uniform distribution). The teacher's backbone is the result.

``pretrain(cfg, out_dir)`` runs one readable loop (nanoGPT style) and writes ``checkpoint.pt``,
``config.json`` and ``history.json``; ``export_backbone(out_dir, path)`` writes the teacher ViT as
``.safetensors`` (timm keys, no DINO head) plus ``path.json`` metadata, loadable with
``hpkit.load_backbone("random_tiny", weights=path)``. Command line::

    python -m hpkit.backbones.pretrain runs/dino --export weights/hpkit_dino_tiny.safetensors   # --resume to continue

Where hpkit differs from the official DINO code (all configurable, see :class:`PretrainConfig`):

- the ViT is timm's, built exactly like ``BACKBONES["random_tiny"]`` (``img_size=224``,
  ``dynamic_img_size=True``): its position embedding keeps the 28 x 28 grid and is interpolated for
  the 96 and 48 px crops, so the weights load into the same model at any image size;
- augmentations are DINO's, written with ``torchvision.transforms.v2.functional`` on images in
  [0, 1] and drawn from an explicit generator; the hue jitter is a rotation in YIQ space
  (torchvision's HSV hue costs ~12 ms per crop on CPU, more than everything else together);
- photometric augmentation is milder, for textures: the synthetic classes are texture families
  (speckle, streaks, stripes 1-3 px wide) whose colours overlap, and half of the regions borrow
  another class's colours, so colour is a weak cue and texture the strong one. Blur, which erases
  1-3 px textures, has its sigma scaled to the crop size (DINO's 0.1-2.0 at 224 px -> 0.1-0.8 at
  96 px) and probability 0.2 / 0.1 / 0.2 (global 1 / global 2 / local; DINO 1.0 / 0.1 / 0.5).
  Colour jitter (0.2, 0.2, 0.1, 0.02) with p 0.5 and grayscale p 0.05 (DINO: (0.4, 0.4, 0.2, 0.1),
  p 0.8, 0.2): in 400-step trials on 1000 scenes (64/32 px crops) DINO's strength kept the loss near
  ln(out_dim) with a near-uniform teacher, the milder one let it fall (7.4 vs 8.2 at step 400);
  solarization (p 0.2 on the second global crop) keeps edges and stays;
- gradients are clipped by their total norm (``clip_grad_norm_``), not per parameter;
- optional dense term (``dense_weight > 0``; off by default, so the default is plain DINO): every
  student patch token predicts, through a second DINO head with its own center, the teacher's patch
  token at the same image point in each other global crop (:func:`correspondence` maps patch centres
  between crops from their boxes; :func:`dense_dino_loss`). In 50-600-step CPU trials it did not
  beat the random backbone either (README, *Status*);
- ``dense_objective="vicreg"`` swaps that term for within-image dense VICReg
  (:func:`dense_vicreg_loss`): patches 1-3 patches apart in the two global crops are pulled together
  while each feature must also vary across the patches of every image. Without the within-image
  term, every dense objective tried here (patch DINO, InfoNCE, batch-level VICReg) found the same
  shortcut: one code per image, which matches neighbours perfectly and separates images, but says
  nothing about regions; with it, an 80-step trial reached 37.5 linear-probe mIoU against 31.0 for
  the random backbone (README, *Status*);
- ``dense_objective="regions"`` swaps it for region-level contrast (:func:`region_contrast_loss`,
  after DetCon): pseudo-regions from k-means of each image's tokens under the frozen random
  initialisation (:func:`region_masks`), matched between the two global crops and from each local
  crop (which sees little context) to the region under its centre, with the batch's other regions,
  those of the same image included, as negatives (README, *Status*);
- ``keep_weight > 0`` adds a term that holds the patch tokens' cosine similarities close to those of
  the frozen initialisation (:func:`similarity_keep_loss`); when no DINO term trains against the
  teacher, ``export_backbone`` writes the student;
- ``init_weights=FILE`` starts from an exported backbone instead of the seed's random
  initialisation (the keep term and the pseudo-regions then refer to it), so that recipes can be
  chained; the file's digest and metadata travel with the export (data/README.md gives the chain
  behind the bundled ``hp-tiny``);
- the teacher temperature is 0.04 throughout (DINO's default for ViT-S/16, 100 epochs); DINO's
  0.04 -> 0.07 warm-up over 30 epochs (``warmup_teacher_temp_epochs``) is meant for long runs: in a
  300-step trial it drove the teacher towards the uniform distribution.

Determinism: the image order is drawn from a generator keyed on ``(seed, epoch)``, the crops from
one keyed on ``(seed, step)``, and the global RNG (stochastic depth) is re-seeded from
``(seed, step)`` every step, so a run resumed from a checkpoint reproduces the losses of an
uninterrupted one exactly. Checkpoints are written atomically (temporary file + ``os.replace``);
a non-finite loss stops with an error naming the step and keeps the last good checkpoint; Ctrl-C
finishes the step in flight, saves it and stops (a second Ctrl-C stops at once).

Monitoring: ``loss`` and ``teacher_entropy`` both near ln(out_dim) (8.3 for 4096) mean a uniform
teacher (no learning signal); ``teacher_entropy`` near 0 means a one-hot collapse. Short CPU runs
learn slowly: check the exported backbone with a patch-level probe before relying on it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from hpkit.backbones.vit import BACKBONES, file_sha256
from hpkit._util import atomic_write, deferred_sigint, sequence_generator

__all__ = ["PretrainConfig", "DINOHead", "DINONet", "MultiCrop", "PretrainingDiverged", "build_vit", "dino_loss",
           "correspondence", "dense_dino_loss", "neighbour_points", "vicreg_terms", "dense_vicreg_loss", "expander",
           "similarity_keep_loss", "load_init_weights", "region_masks", "region_ids", "region_contrast_loss",
           "update_center", "ema_update", "cosine_schedule", "teacher_temperature", "pretrain", "trains_teacher",
           "export_backbone", "save_backbone_file", "read_backbone_metadata", "pretraining_images",
           "CHECKPOINT"]

CHECKPOINT = "checkpoint.pt"
_TINY = BACKBONES["random_tiny"]
# Settings that may change between a run and its resumption (everything else must match).
_RUN_ONLY = ("device", "num_workers", "checkpoint_every", "amp")


@dataclass
class PretrainConfig:
    """Everything a DINO pretraining run depends on (defaults: about an hour on 2 idle CPU cores).

    Schedules are given in epochs and evaluated per step; ``epochs`` sets the length that the
    cosine schedules span (``pretrain(max_steps=...)`` can stop earlier).
    """

    # Architecture: must equal BACKBONES["random_tiny"] to load with load_backbone("random_tiny", weights=...).
    patch_size: int = 8
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    img_size: int = 224  # position-embedding grid = img_size / patch_size (28 x 28), interpolated per crop size
    drop_path_rate: float = 0.0  # stochastic depth of the student (DINO ViT-S: 0.1); a short run underfits
    # Data: "synthetic" (hpkit.data.SyntheticScenes, train split) or "folder" (hpkit.data.ImageFolder at root).
    dataset: str = "synthetic"
    root: str | None = None
    num_images: int | None = 1000  # synthetic: number of scenes; folder: at most this many (None: all)
    image_size: int = 128  # side of the source images (synthetic scenes are rendered at this size)
    data_seed: int = 0  # synthetic: SyntheticScenes(seed=...); hpkit's HP training uses the same train split
    # Multi-crop (sizes multiples of patch_size).
    global_crop_size: int = 96
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    num_local_crops: int = 4
    local_crop_size: int = 48
    local_crop_scale: tuple[float, float] = (0.1, 0.4)
    # Photometric augmentation (DINO's, blur weakened for textures; see the module docstring).
    jitter: tuple[float, float, float, float] = (0.2, 0.2, 0.1, 0.02)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.5
    grayscale_p: float = 0.05
    blur_sigma: tuple[float, float] = (0.1, 0.8)
    blur_p: tuple[float, float, float] = (0.2, 0.1, 0.2)  # global 1, global 2, local
    solarize_p: float = 0.2  # second global crop only, as DINO
    # DINO head: MLP -> L2-normalised bottleneck -> weight-normalised linear layer to out_dim prototypes.
    # 4096 prototypes (DINO: 65536 for ImageNet; small-data setups use ~4096): the last layer costs
    # 128 x 4096 multiply-adds per crop, <1 % of the ViT, and K above the number of images lets the
    # teacher tell every image apart; the softmax temperatures are tuned for K in the thousands.
    out_dim: int = 4096
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    norm_last_layer: bool = True  # fix the weight-norm gain g = 1 (DINO's default for stability)
    freeze_last_layer: int = 1  # epochs during which the prototypes get no update
    # Loss.
    warmup_teacher_temp: float = 0.04  # linear warm-up from this to teacher_temp (long runs: 0.04 -> 0.07)
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    # Dense (patch-level) self-distillation, hpkit's addition (0 disables: plain DINO). Every student
    # patch token predicts the teacher's patch token at the same image point in each other global
    # crop (the crops' boxes give the correspondence), through a second DINO head with its own
    # center; the loss adds dense_weight times this term.
    dense_weight: float = 0.0
    dense_out_dim: int = 1024
    # Weight of the image-level DINO term (class tokens, all crops). 0 switches it off: with
    # dense_objective "vicreg" the backbone then learns from the dense term alone, only the two
    # global crops are encoded, and the teacher is the EMA of the student.
    dino_weight: float = 1.0
    # dense_objective "vicreg" replaces that term by within-image dense VICReg (:func:`dense_vicreg_loss`):
    # a patch of one global crop is pulled towards the point 1-3 patches away (``dense_radius``) in the
    # other crop (invariance), while every feature must vary across the patches of each image
    # (within-image variance) and across the batch (variance, covariance). The within-image term is
    # what makes it work: without it the cheapest solution is one code per image (an image-level
    # shortcut), and every dense objective tried (DINO, InfoNCE, batch-level VICReg) stayed at the
    # random backbone's linear-probe mIoU (README, *Status*).
    dense_objective: str = "dino"
    dense_radius: tuple[float, float] = (1.0, 3.0)  # vicreg: neighbour distance, in patches of the other crop
    vicreg_weights: tuple[float, float, float] = (25.0, 25.0, 1.0)  # invariance, variance, covariance
    expander_dim: int = 1024  # vicreg: width of the 2-layer expander on the patch tokens
    # dense_objective "regions" replaces it by region-level contrast (:func:`region_contrast_loss`,
    # after DetCon, Henaff et al., ICCV 2021): every image is split once into region_clusters
    # pseudo-regions by k-means of the frozen random initialisation's patch tokens
    # (:func:`region_masks`); a region's mean-pooled tokens in one global crop must pick out the same
    # region in the other global crop among all regions of the batch, and each local crop (little
    # context) the region under its centre. Negatives include the image's other regions, so one code
    # per image does not solve it. Projector: embed_dim -> hidden_dim -> bottleneck_dim.
    region_clusters: int = 4
    region_temperature: float = 0.1
    # Structure-keeping term (0 disables; :func:`similarity_keep_loss`): the mean squared difference
    # between the cosine similarities of keep_samples random patch tokens of each global crop under
    # the student and under the frozen random initialisation. The random ViT's cosine neighbours
    # are good on the synthetic scenes (they keep colour); jitter-invariant objectives alone trade
    # them away before texture takes over (README, *Status*), this term keeps them while the
    # dense term adds texture.
    keep_weight: float = 0.0
    keep_samples: int = 1024
    # Start the backbone from this .safetensors file (an ``export_backbone`` file or any timm-keyed
    # state dict of the same architecture) instead of the seed's random initialisation; the keep term
    # then holds *its* cosine structure, and ``region_masks`` are computed from it. The run records
    # the file's sha256 and refuses to resume from a file with other content.
    init_weights: str | None = None
    momentum_teacher: float = 0.996  # cosine schedule to 1.0
    # Optimisation: AdamW, linear warm-up then cosine; lr is per 256 images (scaled by batch_size / 256).
    batch_size: int = 32
    epochs: int = 50  # 1550 steps of 32 images: ~55 min at ~2.1 s per step on 2 idle CPU cores
    lr: float = 5e-4  # DINO's base lr; 6.25e-5 at batch 32
    min_lr: float = 1e-6
    warmup_epochs: int = 5
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # max total gradient norm (0 disables)
    # Run.
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", "auto"
    amp: bool = False  # bfloat16 autocast (CPUs with AMX, recent GPUs); the loss stays float32
    seed: int = 0
    num_workers: int = 0  # DataLoader workers for reading images (folder datasets; synthetic scenes are cached)
    checkpoint_every: int = 100  # steps (and always at the end)

    def __post_init__(self) -> None:
        for name in ("global_crop_scale", "local_crop_scale", "jitter", "blur_sigma", "blur_p", "dense_radius",
                     "vicreg_weights"):
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        p = self.patch_size
        for name in ("global_crop_size", "local_crop_size", "img_size"):
            if getattr(self, name) % p:
                raise ValueError(f"{name}={getattr(self, name)} is not a multiple of patch_size={p}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.keep_weight < 0 or self.keep_samples < 2:
            raise ValueError(f"keep_weight must be >= 0 and keep_samples >= 2, got {self.keep_weight} and "
                             f"{self.keep_samples}")
        if self.dino_weight < 0 or self.dense_weight < 0:
            raise ValueError(f"dino_weight and dense_weight must be >= 0, got {self.dino_weight} and "
                             f"{self.dense_weight}")
        if self.dino_weight == 0 and self.dense_weight == 0:
            raise ValueError("dino_weight=0 and dense_weight=0 leave nothing to learn: set one of them above 0")
        if self.dense_objective not in ("dino", "vicreg", "regions"):
            raise ValueError(f"dense_objective must be 'dino', 'vicreg' or 'regions', got {self.dense_objective!r}")
        if self.region_clusters < 2 or self.region_temperature <= 0:
            raise ValueError(f"region_clusters must be >= 2 and region_temperature > 0, got {self.region_clusters} "
                             f"and {self.region_temperature}")
        if self.dataset not in ("synthetic", "folder"):
            raise ValueError(f"dataset must be 'synthetic' or 'folder', got {self.dataset!r}")
        if self.dataset == "folder" and not self.root:
            raise ValueError("dataset='folder' needs root=/path/to/images")

    @property
    def matches_random_tiny(self) -> bool:
        """Whether the architecture is ``BACKBONES["random_tiny"]`` (so ``load_backbone`` accepts it)."""
        return (self.patch_size, self.embed_dim, self.depth, self.num_heads, self.img_size) == tuple(
            _TINY.timm_kwargs[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "img_size"))


class PretrainingDiverged(RuntimeError):
    """The DINO loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------- model

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


# ------------------------------------------------------------------------------ loss and schedules

def dino_loss(student_out: Tensor, teacher_out: Tensor, center: Tensor, student_temp: float,
              teacher_temp: float, n_global: int = 2) -> Tensor:
    """DINO's cross-entropy between the centred, sharpened teacher and the student, over crop pairs.

    Args:
        student_out: (n_crops * B, K) student logits, crop-major (global crops first).
        teacher_out: (n_global * B, K) teacher logits of the global crops.
        center: (1, K) running mean of the teacher logits.

    Returns:
        scalar: mean over pairs (teacher crop i, student crop v != i) of
        ``mean_b sum_k -softmax((t - c) / teacher_temp) * log_softmax(s / student_temp)``.
    """
    n_crops = student_out.shape[0] // (teacher_out.shape[0] // n_global)
    student = (student_out / student_temp).chunk(n_crops)
    teacher = F.softmax((teacher_out - center) / teacher_temp, dim=-1).detach().chunk(n_global)
    total, pairs = student_out.new_zeros(()), 0
    for i, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == i:
                continue  # never the same view
            total = total + torch.sum(-t * F.log_softmax(s, dim=-1), dim=-1).mean()
            pairs += 1
    return total / pairs


def correspondence(student_box: Tensor, teacher_box: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """Where the centres of a student crop's ``grid x grid`` patches lie in a teacher crop.

    Args:
        student_box, teacher_box: (B, 5) crop boxes from :class:`MultiCrop` (top, left, height,
            width as fractions of the image side, flipped).
        grid: the student crop's patch grid side.

    Returns:
        points (B, grid, grid, 2): (x, y) in the teacher crop in ``grid_sample`` coordinates
        ([-1, 1] spans the crop, ``align_corners=False``); inside (B, grid, grid) bool: the point
        lies in the teacher crop.
    """
    u = (torch.arange(grid, dtype=student_box.dtype, device=student_box.device) + 0.5) / grid  # (grid,)
    sb, tb = student_box[:, :, None], teacher_box[:, :, None]  # (B, 5, 1)
    col = torch.where(sb[:, 4] > 0.5, 1 - u, u)  # (B, grid) position across the unflipped student crop
    img_y = sb[:, 0] + u * sb[:, 2]  # (B, grid) image coordinates (fractions)
    img_x = sb[:, 1] + col * sb[:, 3]
    ty = (img_y - tb[:, 0]) / tb[:, 2]  # (B, grid) teacher-crop coordinates in [0, 1] when inside
    tx = (img_x - tb[:, 1]) / tb[:, 3]
    tx = torch.where(tb[:, 4] > 0.5, 1 - tx, tx)
    y = ty[:, :, None].expand(-1, -1, grid)
    x = tx[:, None, :].expand(-1, grid, -1)
    inside = (y >= 0) & (y < 1) & (x >= 0) & (x < 1)
    return torch.stack([2 * x - 1, 2 * y - 1], dim=-1), inside


def dense_dino_loss(student_patches: Sequence[Tensor], teacher_patches: Sequence[Tensor], boxes: Tensor,
                    center: Tensor, student_temp: float, teacher_temp: float) -> Tensor:
    """Patch-level DINO: each student patch predicts the teacher's patch at the same image point.

    Args:
        student_patches: per crop, (B, g_v, g_v, K) student patch logits (global crops first).
        teacher_patches: per global crop, (B, g_t, g_t, K) teacher patch logits.
        boxes: (n_crops, B, 5) the crops' boxes (:class:`MultiCrop` with ``boxes=True``).
        center: (1, K) running mean of the teacher patch logits.

    Returns:
        scalar: mean over pairs (teacher global crop t, student crop v != t) of the mean over the
        student patches whose centre lies in crop t of ``sum_k -softmax((q - c) / teacher_temp) *
        log_softmax(s / student_temp)``, with q the teacher logits of the patch containing that point.
    """
    total, pairs = center.new_zeros(()), 0
    for t, teacher in enumerate(teacher_patches):
        target = F.softmax((teacher - center) / teacher_temp, dim=-1).detach().permute(0, 3, 1, 2)  # (B, K, g, g)
        for v, student in enumerate(student_patches):
            if v == t:
                continue
            points, inside = correspondence(boxes[v], boxes[t], student.shape[1])
            if not inside.any():
                continue
            q = F.grid_sample(target, points.to(target.dtype), mode="nearest", align_corners=False)
            ce = torch.sum(-q.permute(0, 2, 3, 1) * F.log_softmax(student / student_temp, dim=-1), dim=-1)
            total = total + ce[inside].mean()
            pairs += 1
    return total / max(pairs, 1)


def neighbour_points(points: Tensor, grid: int, radius: tuple[float, float], generator: torch.Generator
                     ) -> tuple[Tensor, Tensor]:
    """Move every point (B, g, g, 2) (``grid_sample`` coordinates of a crop with ``grid`` patches a
    side) by a random distance in ``radius`` (in patches) in a random direction.

    Returns the moved points and inside (B, g, g) bool: the moved point lies in the crop."""
    shape = points.shape[:-1]
    angle = torch.rand(shape, generator=generator) * (2 * math.pi)
    dist = radius[0] + torch.rand(shape, generator=generator) * (radius[1] - radius[0])
    step = torch.stack([angle.cos(), angle.sin()], dim=-1) * (dist * 2 / grid)[..., None]
    moved = points + step.to(points)
    return moved, (moved.abs() < 1).all(dim=-1)


def _std_hinge(var: Tensor) -> Tensor:
    """VICReg's variance hinge: mean of ``relu(1 - sqrt(var + 1e-4))`` over the given variances."""
    return F.relu(1 - torch.sqrt(var + 1e-4)).mean()


def vicreg_terms(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """VICReg's three terms (Bardes et al., ICLR 2022) for paired rows a, b (N, D): mean squared
    distance, mean over both of ``relu(1 - std)`` per dimension, and the sum over both of the squared
    off-diagonal covariances divided by D."""
    invariance = F.mse_loss(a, b)
    variance = a.new_zeros(())
    covariance = a.new_zeros(())
    for z in (a, b):
        variance = variance + _std_hinge(z.var(dim=0))
        z = z - z.mean(dim=0)
        cov = (z.T @ z) / (len(z) - 1)
        covariance = covariance + (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / z.shape[1]
    return invariance, variance, covariance


def dense_vicreg_loss(expanded: Sequence[Tensor], boxes: Tensor, radius: tuple[float, float],
                      weights: tuple[float, float, float], generator: torch.Generator,
                      max_pairs: int = 2048) -> Tensor:
    """Within-image dense VICReg between the two global crops.

    Args:
        expanded: the two global crops' expanded patch tokens, each (B, g, g, D).
        boxes: (2, B, 5) their boxes (:class:`MultiCrop` with ``boxes=True``).
        radius: (min, max) distance in patches between paired points (:func:`neighbour_points`).
        weights: (invariance, variance, covariance) weights (VICReg: 25, 25, 1).
        max_pairs: pairs per direction, drawn at random (bounds the D x D covariance cost).

    Returns:
        scalar: ``w_v * within + mean over the 2 directions of (w_i * inv + w_v * var + w_c * cov)``,
        where ``within`` is the mean over images and crops of ``relu(1 - std)`` per dimension over
        the image's patches, and inv/var/cov are :func:`vicreg_terms` of each patch of one crop and
        the patch at a neighbouring image point (nearest patch) in the other crop.
    """
    w_inv, w_var, w_cov = weights
    within = sum(_std_hinge(z.flatten(1, 2).var(dim=1)) for z in expanded)
    total = w_var * within / len(expanded)
    for v, t in ((0, 1), (1, 0)):
        points, _ = correspondence(boxes[v], boxes[t], expanded[v].shape[1])
        points, inside = neighbour_points(points, expanded[t].shape[1], radius, generator)
        target = F.grid_sample(expanded[t].permute(0, 3, 1, 2), points.to(expanded[t].dtype), mode="nearest",
                               align_corners=False).permute(0, 2, 3, 1)
        a, b = expanded[v][inside], target[inside]
        pick = torch.randperm(len(a), generator=generator)[:max_pairs].to(a.device)
        inv, var, cov = vicreg_terms(a[pick], b[pick])
        total = total + (w_inv * inv + w_var * var + w_cov * cov) / 2
    return total


def similarity_keep_loss(patches: Sequence[Tensor], reference: Sequence[Tensor], samples: int,
                         generator: torch.Generator) -> Tensor:
    """How far the patch tokens' cosine-similarity structure moved from a reference network's.

    Args:
        patches: per crop the trained network's patch tokens (B, g, g, C).
        reference: the same crops' patch tokens under the reference network (B, g, g, C').
        samples: tokens drawn at random (without replacement) from each crop's B * g * g.

    Returns:
        scalar: mean over crops of the mean over the samples x samples pairs of
        ``(cos(z_i, z_j) - cos(r_i, r_j)) ** 2``.
    """
    total = patches[0].new_zeros(())
    for z, r in zip(patches, reference):
        z, r = z.reshape(-1, z.shape[-1]), r.reshape(-1, r.shape[-1])
        pick = torch.randperm(len(z), generator=generator)[:samples].to(z.device)
        z, r = F.normalize(z[pick], dim=1), F.normalize(r[pick], dim=1)
        total = total + (z @ z.T - r @ r.T).pow(2).mean()
    return total / len(patches)


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


def region_contrast_loss(global_patches: Sequence[Tensor], global_ids: Sequence[Tensor],
                         local_patches: Sequence[Tensor], local_ids: Tensor, clusters: int, projector: nn.Module,
                         temperature: float) -> Tensor:
    """Region-level contrast between crops (DetCon-style, with local crops).

    Args:
        global_patches: the 2 global crops' patch tokens, each (B, g, g, C).
        global_ids: their patches' region ids (:func:`region_ids`), each (B, g, g).
        local_patches: the local crops' patch tokens, each (B, l, l, C) (may be empty).
        local_ids: (n_local, B) the region under each local crop's centre.
        clusters: regions per image K (ids are in [0, K)).
        projector: (N, C) -> (N, D) (:func:`expander`).

    Returns:
        scalar: NT-Xent over the regions with >= 2 patches in both global crops (a region's embedding
        is the L2-normalised projection of its mean token; its positive is the same region in the
        other crop, its negatives every other region of the batch in both crops), plus the mean over
        (local crop, global crop) of the cross-entropy of each local crop's embedding against all
        regions present in that global crop, the target being its own region (when it has >= 2
        patches there); logits are cosines / ``temperature``. A term with nothing to compare is 0.

    Raises:
        ValueError: neither term has anything to compare (crops too small for ``clusters``).
    """
    embedded, counts = [], []
    for z, ids in zip(global_patches, global_ids):
        onehot = F.one_hot(ids.flatten(1), clusters).to(z.dtype)  # (B, P, K)
        count = onehot.sum(1).flatten()  # (B*K,)
        pooled = torch.einsum("bpk,bpc->bkc", onehot, z.flatten(1, 2)).flatten(0, 1) / count.clamp_min(1)[:, None]
        present = (count > 0).nonzero()[:, 0]
        rows = F.normalize(projector(pooled[present]), dim=1)
        embedded.append(rows.new_zeros(len(count), rows.shape[1]).index_copy(0, present, rows))  # (B*K, D)
        counts.append(count)
    both = (counts[0] >= 2) & (counts[1] >= 2)
    n = int(both.sum())
    pair = torch.cat([embedded[0][both], embedded[1][both]])  # (2n, D)
    logits = (pair @ pair.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=pair.device), -1e9)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(pair.device)
    # No region in both crops (tiny crops, or many regions): the global-global term is 0 this step.
    total = F.cross_entropy(logits, target) if n else pair.sum() * 0.0
    terms = []
    if len(local_patches):
        local = torch.stack([p.mean(dim=(1, 2)) for p in local_patches])  # (L, B, C)
        local = F.normalize(projector(local.flatten(0, 1)), dim=1).view(*local.shape[:2], -1)
        batch = torch.arange(local.shape[1], device=local.device)
        for emb, count in zip(embedded, counts):
            absent = count == 0
            for z, ids in zip(local, local_ids):
                own = batch * clusters + ids.to(local.device)
                ok = count[own] >= 2
                if ok.any():
                    scores = (z[ok] @ emb.T / temperature).masked_fill(absent[None], -1e9)
                    terms.append(F.cross_entropy(scores, own[ok]))
    if terms:
        total = total + torch.stack(terms).mean()
    elif not n:
        raise ValueError(f"region contrast has nothing to compare in this batch: no region has >= 2 patches in "
                         f"both global crops (or, for a local crop, in a global crop). The crops are too small for "
                         f"region_clusters={clusters}: raise global_crop_size or lower region_clusters")
    return total


@torch.no_grad()
def update_center(center: Tensor, teacher_out: Tensor, momentum: float) -> Tensor:
    """New center (1, K): ``momentum * center + (1 - momentum) * mean of teacher_out (N, K)``."""
    return center * momentum + teacher_out.mean(dim=0, keepdim=True) * (1 - momentum)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place, for every parameter: ``teacher = momentum * teacher + (1 - momentum) * student``."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)


def cosine_schedule(step: int, total: int, base: float, final: float, warmup: int = 0,
                    start: float = 0.0) -> float:
    """DINO's scheduler at ``step``: linear ``start -> base`` over ``warmup`` steps, then cosine to ``final``."""
    if step < warmup:
        return start + (base - start) * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t))


def teacher_temperature(step: int, steps_per_epoch: int, cfg: PretrainConfig) -> float:
    """Teacher temperature: linear warm-up over ``warmup_teacher_temp_epochs``, then constant."""
    warm = cfg.warmup_teacher_temp_epochs * steps_per_epoch
    if step >= warm:
        return cfg.teacher_temp
    return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * step / warm


# --------------------------------------------------------------------------------- augmentation

_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                           dtype=torch.float64)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def _shift_hue(img: Tensor, shift: float) -> Tensor:
    """Hue rotation of (3, H, W) in [0, 1] by ``shift`` turns (rotation of the IQ chroma plane)."""
    a = 2 * math.pi * shift
    rot = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]],
                       dtype=torch.float64)
    m = (_YIQ_TO_RGB @ rot @ _RGB_TO_YIQ).to(img.dtype)
    return (m @ img.reshape(3, -1)).reshape(img.shape).clamp_(0, 1)


def _uniform(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _crop_box(height: int, width: int, scale: tuple[float, float], g: torch.Generator,
              ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(top, left, h, w)``: area fraction in ``scale``, log-uniform aspect ratio."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    side = min(height, width)  # fallback: the central square
    return (height - side) // 2, (width - side) // 2, side, side


class MultiCrop:
    """DINO's multi-crop augmentation of a batch (B, 3, H, W) in [0, 1].

    ``crops = MultiCrop(cfg)(images, generator)`` is a list of ``2 + num_local_crops`` tensors: two
    global crops (B, 3, G, G) then the local crops (B, 3, L, L), all in [0, 1]. Each crop: random
    resized crop (antialiased), horizontal flip, colour jitter in random order (p ``jitter_p``),
    grayscale (p ``grayscale_p``), Gaussian blur (p ``blur_p`` per crop kind) and, for the second
    global crop, solarization (p ``solarize_p``). All randomness comes from ``generator``.
    """

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.blur_kernel = 2 * math.ceil(3 * cfg.blur_sigma[1]) + 1

    def _jitter(self, x: Tensor, g: torch.Generator) -> Tensor:
        b, c, s, h = self.cfg.jitter
        for op in torch.randperm(4, generator=g).tolist():
            if op == 0 and b > 0:
                x = TF.adjust_brightness(x, _uniform(g, max(0.0, 1 - b), 1 + b))
            elif op == 1 and c > 0:
                x = TF.adjust_contrast(x, _uniform(g, max(0.0, 1 - c), 1 + c))
            elif op == 2 and s > 0:
                x = TF.adjust_saturation(x, _uniform(g, max(0.0, 1 - s), 1 + s))
            elif op == 3 and h > 0:
                x = _shift_hue(x, _uniform(g, -h, h))
        return x

    def view(self, image: Tensor, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float,
             g: torch.Generator) -> tuple[Tensor, Tensor]:
        """One augmented crop (3, size, size) of ``image`` (3, H, W) in [0, 1], and its box (5,):
        top, left, height, width as fractions of the image side, and 1.0 if flipped (else 0.0)."""
        cfg = self.cfg
        height, width = image.shape[-2:]
        top, left, h, w = _crop_box(height, width, scale, g)
        x = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True).clamp_(0, 1)
        flip = _uniform(g) < 0.5
        if flip:
            x = TF.horizontal_flip(x)
        if _uniform(g) < cfg.jitter_p:
            x = self._jitter(x, g)
        if _uniform(g) < cfg.grayscale_p:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if _uniform(g) < blur_p:
            sigma = _uniform(g, *cfg.blur_sigma)
            x = TF.gaussian_blur(x, [self.blur_kernel, self.blur_kernel], [sigma, sigma])
        if _uniform(g) < solarize_p:
            x = TF.solarize(x, 0.5)
        return x, torch.tensor([top / height, left / width, h / height, w / width, float(flip)])

    def __call__(self, images: Tensor, generator: torch.Generator, *, boxes: bool = False
                 ) -> list[Tensor] | tuple[list[Tensor], Tensor]:
        """images (B, 3, H, W) in [0, 1] -> [global 1, global 2, local 1, ...], each (B, 3, S, S).

        With ``boxes=True`` also the crop boxes (n_crops, B, 5) (see :meth:`view`); the crops are
        the same either way."""
        cfg = self.cfg
        kinds = [(cfg.global_crop_size, cfg.global_crop_scale, cfg.blur_p[0], 0.0),
                 (cfg.global_crop_size, cfg.global_crop_scale, cfg.blur_p[1], cfg.solarize_p)]
        kinds += [(cfg.local_crop_size, cfg.local_crop_scale, cfg.blur_p[2], 0.0)] * cfg.num_local_crops
        images = images.float().cpu()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # hundreds of tiny ops: thread start-up costs more than it saves (10x on 2 cores)
        try:
            views = [[self.view(img, size, scale, blur, sol, generator) for img in images]
                     for size, scale, blur, sol in kinds]
        finally:
            torch.set_num_threads(threads)
        crops = [torch.stack([x for x, _ in kind]) for kind in views]
        if not boxes:
            return crops
        return crops, torch.stack([torch.stack([box for _, box in kind]) for kind in views])


# --------------------------------------------------------------------------------- run helpers

def _seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative integer keys (the same on every machine)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


_generator = sequence_generator


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but CUDA is not available here; use device='cpu'")
    return device


def pretraining_images(dataset: str, root: str | None, num_images: int | None, image_size: int,
                       data_seed: int) -> Dataset:
    """The images of a ``dataset="synthetic"`` (train scenes) or ``"folder"`` (``root``) run, as
    ``(image (3, S, S) in [0, 1], label)`` pairs whose labels are never used."""
    if dataset == "synthetic":
        from hpkit.data.synthetic import SyntheticScenes

        return SyntheticScenes("train", num_images=num_images or 1000, image_size=image_size, seed=data_seed)
    from hpkit.data.folder import ImageFolder

    data = ImageFolder(root, image_size=image_size)
    if num_images is not None and num_images < len(data):
        data = Subset(data, range(num_images))
    return data


def _dataset(cfg: PretrainConfig) -> Dataset:
    """The pretraining images (labels are never used)."""
    return pretraining_images(cfg.dataset, cfg.root, cfg.num_images, cfg.image_size, cfg.data_seed)


def _config_dict(cfg: PretrainConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def _deferred_sigint():
    return deferred_sigint("hpkit.pretrain")


# ---------------------------------------------------------------------------------- training

def pretrain(cfg: PretrainConfig, out_dir: str | Path, *, resume: bool = False, max_steps: int | None = None,
             progress: bool = True) -> dict:
    """Pretrain a ViT with DINO and write ``checkpoint.pt``, ``config.json`` and ``history.json``.

    Args:
        cfg: the configuration.
        out_dir: output folder.
        resume: continue from ``out_dir/checkpoint.pt`` (same configuration, except ``device``,
            ``num_workers``, ``checkpoint_every`` and ``amp``).
        max_steps: stop after this many steps in total; the schedules still span ``cfg.epochs``.
        progress: show a tqdm progress bar.

    Returns:
        dict with ``history`` (one entry per step: step, epoch, loss, lr, weight_decay, teacher_temp,
        momentum, teacher_entropy, grad_norm, seconds), ``steps``, ``seconds`` (time spent in steps
        since the start of the run, image loading and checkpoints excluded) and ``checkpoint`` (its path).

    Raises:
        PretrainingDiverged: the loss became NaN or infinite (the last good checkpoint is kept).
        KeyboardInterrupt: after Ctrl-C, once the checkpoint of the last completed step is written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    device = _device(cfg.device)
    data = _dataset(cfg)
    steps_per_epoch = len(data) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the {len(data)} images")
    total = steps_per_epoch * cfg.epochs  # the schedules span the whole configured run
    stop = total if max_steps is None else min(total, max_steps)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the caller's global RNG is left as it was
        torch.manual_seed(cfg.seed)
        dense = cfg.dense_weight > 0

        vicreg = dense and cfg.dense_objective == "vicreg"
        regions = dense and cfg.dense_objective == "regions"
        dense_dino = dense and cfg.dense_objective == "dino"
        use_dino = cfg.dino_weight > 0
        use_teacher = use_dino or dense_dino  # teacher outputs are targets of the DINO terms only

        def heads() -> tuple[DINOHead, nn.Module | None]:
            head = DINOHead(cfg.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.norm_last_layer)
            if vicreg:
                patch_head = expander(cfg.embed_dim, cfg.expander_dim)
            elif regions:
                patch_head = expander(cfg.embed_dim, cfg.hidden_dim, cfg.bottleneck_dim)
            elif dense:
                patch_head = DINOHead(cfg.embed_dim, cfg.dense_out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                                      cfg.norm_last_layer)
            else:
                patch_head = None
            return head, patch_head

        student = DINONet(build_vit(cfg), *heads()).to(device)
        init_sha256, init_meta = None, None
        if cfg.init_weights is not None:
            init_sha256 = load_init_weights(student.backbone, cfg.init_weights)
            init_meta = read_backbone_metadata(cfg.init_weights)
        teacher = DINONet(build_vit(cfg, drop_path_rate=0.0), *heads()).to(device)
        teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False).eval()
        keep = cfg.keep_weight > 0
        # The frozen random initialisation whose cosine structure the keep term holds on to.
        init = DINONet(build_vit(cfg, drop_path_rate=0.0), student.head).to(device) if keep else None
        if keep:
            init.backbone.load_state_dict(student.backbone.state_dict())
            init.backbone.requires_grad_(False).eval()
        masks = None
        if regions:  # from the seed's initialisation, before a resumed state is loaded: the same every time
            student.eval()
            masks = region_masks(student, data, cfg.region_clusters, _generator(cfg.seed, 5))
            student.train()
        # DINO's parameter groups: no weight decay on biases and norm parameters (1-d tensors).
        named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            [{"params": [p for n, p in named if p.ndim > 1 and not n.endswith(".bias")], "decay": True},
             {"params": [p for n, p in named if p.ndim <= 1 or n.endswith(".bias")], "decay": False,
              "weight_decay": 0.0}], lr=0.0)
        last_layer = list(student.head.last_layer.parameters())
        if dense_dino:
            last_layer += list(student.patch_head.last_layer.parameters())
        center = torch.zeros(1, cfg.out_dim, device=device)
        patch_center = torch.zeros(1, cfg.dense_out_dim, device=device)
        step, history, seconds = 0, [], 0.0
        if resume:
            if not ckpt_path.is_file():
                raise FileNotFoundError(f"nothing to resume: {ckpt_path} does not exist")
            state = torch.load(ckpt_path, map_location=device, weights_only=True)
            # A setting the checkpoint does not record (added to hpkit later) had its default then.
            before = _config_dict(PretrainConfig()) | state["config"]
            changed = {k: (v, before.get(k)) for k, v in _config_dict(cfg).items()
                       if k not in _RUN_ONLY and before.get(k) != v}
            if changed:
                raise ValueError("cannot resume with a different configuration; changed (now, before): "
                                 + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in changed.items()))
            if state.get("init_weights_sha256") != init_sha256:
                raise ValueError(f"cannot resume: the content of init_weights={cfg.init_weights} has changed since "
                                 "the run started (its sha256 differs); put the original file back or start a "
                                 "new run in another folder")
            student.load_state_dict(state["student"])
            teacher.load_state_dict(state["teacher"])
            optimizer.load_state_dict(state["optimizer"])
            center = state["center"].to(device)
            patch_center = state.get("patch_center", patch_center).to(device)
            if keep:
                init.backbone.load_state_dict(state["init_backbone"])
            step, history, seconds = state["step"], state["history"], state["seconds"]
            torch.set_rng_state(state["rng"])
        (out / "config.json").write_text(json.dumps(_config_dict(cfg), indent=2))

        def checkpoint() -> None:
            state = {"student": student.state_dict(), "teacher": teacher.state_dict(),
                     "optimizer": optimizer.state_dict(), "center": center, "patch_center": patch_center, "step": step, "history": history,
                     "seconds": seconds, "steps_per_epoch": steps_per_epoch, "rng": torch.get_rng_state(),
                     "config": _config_dict(cfg), "init_weights_sha256": init_sha256,
                     "init_weights_metadata": init_meta}
            if keep:
                state["init_backbone"] = init.backbone.state_dict()
            atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))
            atomic_write(out / "history.json", lambda tmp: tmp.write_text(json.dumps(history)))

        crop = MultiCrop(cfg)
        n_crops = 2 + cfg.num_local_crops
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp)
        bar = tqdm(total=stop, initial=step, disable=not progress, desc="DINO pretraining")
        updating = False  # parameters half-updated: an interrupt then keeps the previous checkpoint
        try:
            with _deferred_sigint() as sigint:
                while step < stop:
                    epoch, skip = divmod(step, steps_per_epoch)
                    order = torch.randperm(len(data), generator=_generator(cfg.seed, 0, epoch))
                    batches = order[: steps_per_epoch * cfg.batch_size].view(steps_per_epoch, cfg.batch_size)
                    loader = DataLoader(data, batch_sampler=batches[skip:].tolist(), num_workers=cfg.num_workers)
                    for (images, _), indices in zip(loader, batches[skip:]):
                        if step >= stop:
                            break
                        started = time.perf_counter()
                        # Schedules (DINO's, per step).
                        lr = cosine_schedule(step, total, cfg.lr * cfg.batch_size / 256, cfg.min_lr,
                                             warmup=cfg.warmup_epochs * steps_per_epoch)
                        wd = cosine_schedule(step, total, cfg.weight_decay, cfg.weight_decay_end)
                        momentum = cosine_schedule(step, total, cfg.momentum_teacher, 1.0)
                        t_temp = teacher_temperature(step, steps_per_epoch, cfg)
                        for group in optimizer.param_groups:
                            group["lr"] = lr
                            if group["decay"]:
                                group["weight_decay"] = wd
                        # Forward: teacher on the 2 global crops, student on all crops (only the global
                        # ones when dense VICReg trains alone).
                        torch.manual_seed(_seed(cfg.seed, 2, step))  # stochastic depth, if any
                        crops, boxes = crop(images, _generator(cfg.seed, 1, step), boxes=True)
                        crops = [c.to(device, non_blocking=True) for c in crops]
                        with amp:
                            if use_teacher:
                                with torch.no_grad():
                                    t_cls, t_patches = teacher.encode(crops[:2])
                                    t_out = teacher.head(t_cls).float() if use_dino else None
                            s_cls, s_patches = student.encode(crops if use_dino or not vicreg else crops[:2])
                            s_out = student.head(s_cls).float() if use_dino else None
                            if vicreg:
                                s_dense = [_apply_rows(student.patch_head, p).float() for p in s_patches[:2]]
                            elif dense_dino:
                                with torch.no_grad():
                                    t_dense = [teacher.patch_head(p).float() for p in t_patches]
                                s_dense = [student.patch_head(p).float() for p in s_patches]
                            if keep:
                                with torch.no_grad():
                                    _, i_patches = init.encode(crops[:2])
                        loss = torch.zeros((), device=device)
                        if use_dino:
                            loss = loss + cfg.dino_weight * dino_loss(s_out, t_out, center, cfg.student_temp, t_temp)
                        if vicreg:
                            dense_value = dense_vicreg_loss(s_dense, boxes[:2].to(device), cfg.dense_radius,
                                                            cfg.vicreg_weights, _generator(cfg.seed, 3, step))
                            loss = loss + cfg.dense_weight * dense_value
                        elif regions:
                            image_masks = masks[indices].to(device)
                            dense_value = region_contrast_loss(
                                [p.float() for p in s_patches[:2]],
                                [region_ids(boxes[v].to(device), image_masks, s_patches[v].shape[1]) for v in (0, 1)],
                                [p.float() for p in s_patches[2:]],
                                torch.stack([region_ids(b.to(device), image_masks, 1)[:, 0, 0] for b in boxes[2:]])
                                if len(boxes) > 2 else torch.zeros(0, len(images), dtype=torch.long),
                                cfg.region_clusters, student.patch_head, cfg.region_temperature)
                            loss = loss + cfg.dense_weight * dense_value
                        elif dense:
                            dense_value = dense_dino_loss(s_dense, t_dense, boxes.to(device), patch_center,
                                                          cfg.student_temp, t_temp)
                            loss = loss + cfg.dense_weight * dense_value
                        keep_value = None
                        if keep:
                            keep_value = similarity_keep_loss([p.float() for p in s_patches[:2]],
                                                              [p.float() for p in i_patches], cfg.keep_samples,
                                                              _generator(cfg.seed, 4, step))
                            loss = loss + cfg.keep_weight * keep_value
                        value = loss.item()
                        if not math.isfinite(value):
                            raise PretrainingDiverged(
                                f"the DINO loss is {value} at step {step} (epoch {epoch}); the last good "
                                f"checkpoint ({ckpt_path if ckpt_path.exists() else 'none yet'}) is kept. Try a "
                                "lower lr, a lower clip_grad or a higher teacher temperature")
                        # Backward and update: student by AdamW, teacher by EMA, center by EMA.
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        updating = True
                        if epoch < cfg.freeze_last_layer:
                            for p in last_layer:
                                p.grad = None  # the prototypes stay fixed while the rest settles
                        params = [p for p in student.parameters() if p.grad is not None]
                        grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad) if cfg.clip_grad > 0
                                     else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
                        optimizer.step()
                        ema_update(teacher, student, momentum)
                        entropy = None
                        if use_dino:
                            with torch.no_grad():
                                probs = F.softmax((t_out - center) / t_temp, dim=-1)
                                entropy = float(-(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean())
                            center = update_center(center, t_out, cfg.center_momentum)
                        if dense_dino:
                            patch_center = update_center(
                                patch_center, torch.cat([p.flatten(0, 2) for p in t_dense]), cfg.center_momentum)
                        step += 1
                        took = time.perf_counter() - started
                        seconds += took
                        history.append({"step": step, "epoch": epoch, "loss": value, "lr": lr, "weight_decay": wd,
                                        "teacher_temp": t_temp, "momentum": momentum, "teacher_entropy": entropy,
                                        "dense_loss": dense_value.item() if dense else None,
                                        "keep_loss": keep_value.item() if keep else None,
                                        "grad_norm": float(grad_norm), "seconds": took})
                        updating = False
                        if step % cfg.checkpoint_every == 0 and step < stop:
                            checkpoint()
                        bar.update(1)
                        bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2e}", mom=f"{momentum:.4f}")
                        if sigint["stop"]:
                            raise KeyboardInterrupt
        except KeyboardInterrupt:
            if not updating:
                checkpoint()
            print(f"hpkit.pretrain: interrupted at step {step}; {ckpt_path} "
                  f"{'holds it' if not updating else 'holds the last regular checkpoint'}: continue with "
                  "resume=True (--resume)", file=sys.stderr, flush=True)
            raise
        finally:
            bar.close()
        checkpoint()
    return {"history": history, "steps": step, "seconds": seconds, "checkpoint": ckpt_path}


def load_init_weights(backbone: nn.Module, path: str | Path) -> str:
    """Load a ``.safetensors`` backbone file into ``backbone`` (``PretrainConfig.init_weights``).

    Returns:
        the file's sha256 (hex), which the run records.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file's tensors do not fit the configured architecture.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_weights={path} does not exist: give a .safetensors backbone file, for "
                                "example one written by `hpkit pretrain ... --export FILE`")
    try:
        backbone.load_state_dict(load_file(str(path)))
    except RuntimeError as err:
        raise ValueError(f"init_weights={path} does not fit the configured ViT (patch_size, embed_dim, depth, "
                         f"num_heads, img_size must match the run that wrote it): {err}") from None
    return file_sha256(path)


# ----------------------------------------------------------------------------------------- export

def trains_teacher(cfg: PretrainConfig) -> bool:
    """Whether a run's loss uses the EMA teacher (a DINO term); otherwise the teacher is only an
    EMA copy of the student, which lags it: in an 8-epoch ``--dino-weight 0 --keep-weight 50`` run
    the exported teacher scored 32.4 linear-probe mIoU and the student 38.8 (README, *Status*)."""
    return cfg.dino_weight > 0 or (cfg.dense_weight > 0 and cfg.dense_objective == "dino")


def export_backbone(source: str | Path, path: str | Path, *, dtype: str = "float32", network: str = "auto"
                    ) -> Path:
    """Write a pretrained ViT (timm state-dict keys, no DINO head) as ``.safetensors``.

    Args:
        source: a pretraining folder (with ``checkpoint.pt``) or a checkpoint file.
        path: the ``.safetensors`` file to write; ``path`` with suffix ``.json`` gets the metadata
            (configuration, steps, epochs, training time, last loss, parameter count, sha256).
        dtype: ``"float32"`` (~11 MB for the default model) or ``"float16"`` (half of that).
        network: ``"teacher"``, ``"student"`` or ``"auto"``: the teacher when the loss used it
            (:func:`trains_teacher`: DINO, as in DINO's own releases), else the student.

    Returns:
        ``path``. Load it with ``hpkit.load_backbone("random_tiny", weights=path)`` when the
        architecture is the default one (``PretrainConfig().matches_random_tiny``).
    """
    source, path = Path(source), Path(path)
    ckpt = source / CHECKPOINT if source.is_dir() else source
    if not ckpt.is_file():
        raise FileNotFoundError(f"no pretraining checkpoint at {ckpt}: run hpkit.backbones.pretrain.pretrain first")
    if path.suffix != ".safetensors":
        raise ValueError(f"export path must end in .safetensors, got {path}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    if network not in ("auto", "teacher", "student"):
        raise ValueError(f"network must be 'auto', 'teacher' or 'student', got {network!r}")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    # A setting the checkpoint does not record (added to hpkit later) had its default then.
    cfg = PretrainConfig(**_config_dict(PretrainConfig()) | state["config"])
    if network == "auto":
        network = "teacher" if trains_teacher(cfg) else "student"
    weights = {k[len("backbone."):]: v.to(getattr(torch, dtype)).contiguous()
               for k, v in state[network].items() if k.startswith("backbone.")}
    history = state["history"]
    meta = {"format": f"hpkit-pretrained ViT ({network} backbone, timm keys)", "network": network,
            "timm_name": _TINY.timm_name,
            "loads_as": "random_tiny" if cfg.matches_random_tiny else None, "dtype": dtype,
            "parameters": sum(v.numel() for v in weights.values()), "steps": state["step"],
            "epochs": round(state["step"] / state["steps_per_epoch"], 2),
            "training_seconds": round(state["seconds"], 1), "final_loss": history[-1]["loss"] if history else None,
            "config": state["config"]}
    if state.get("init_weights_sha256"):  # where the run started: the file's digest and its own metadata
        meta["init_weights"] = {"sha256": state["init_weights_sha256"],
                                "metadata": state.get("init_weights_metadata")}

    return save_backbone_file(weights, path, meta)


def read_backbone_metadata(path: str | Path) -> dict | None:
    """The ``hpkit`` metadata of a ``.safetensors`` backbone file (:func:`save_backbone_file`), or None."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("hpkit")
    return json.loads(raw) if raw else None


def save_backbone_file(weights: dict[str, Tensor], path: str | Path, meta: dict) -> Path:
    """Write timm-keyed backbone ``weights`` to ``path`` (.safetensors, ``meta`` as JSON under the
    metadata key ``hpkit``) and ``meta`` plus the file's ``sha256`` beside it as ``.json``, both atomically.
    Returns ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp), metadata={"hpkit": json.dumps(meta)})
        os.chmod(tmp, 0o644)  # safetensors creates the file owner-only; the weights are meant to be shipped

    atomic_write(path, write)
    meta = meta | {"sha256": file_sha256(path)}
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return path


# ------------------------------------------------------------------------------------ command line

def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name V`` option per field of the dataclass ``cls`` (its defaults as help)."""
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        kind = "comma-separated" if isinstance(value, tuple) else type(value).__name__
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, metavar="V",
                            help=f"{kind} (default {value})")


def config_from_flags(args: argparse.Namespace, cls: type):
    """The ``cls`` instance of the parsed :func:`add_config_flags` options (unset ones keep their
    defaults; ``none`` gives None; tuples are comma-separated; booleans 1/true/yes/on)."""
    defaults, overrides = cls(), {}
    for f in dataclasses.fields(cls):
        raw = getattr(args, f.name)
        if raw is None:
            continue
        value = getattr(defaults, f.name)
        if isinstance(value, tuple):
            overrides[f.name] = tuple(float(v) for v in raw.split(","))
        elif isinstance(value, bool):
            overrides[f.name] = raw.lower() in ("1", "true", "yes", "on")
        elif raw.lower() == "none":
            overrides[f.name] = None
        elif isinstance(value, int):
            overrides[f.name] = int(raw)
        elif isinstance(value, float):
            overrides[f.name] = float(raw)
        else:
            overrides[f.name] = raw
    return cls(**overrides)


def main(argv: Sequence[str] | None = None, prog: str = "python -m hpkit.backbones.pretrain") -> None:
    """``hpkit pretrain OUT_DIR [--FIELD VALUE ...] [--resume] [--max-steps N] [--export FILE]``.

    With ``--recipe NAME`` among the arguments, a whole named recipe runs instead (:mod:`hpkit.recipe`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg == "--recipe" or arg.startswith("--recipe=") for arg in argv):
        from hpkit.backbones.recipe import main as recipe_main

        return recipe_main(argv, prog=prog)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--export", metavar="FILE.safetensors", help="export the teacher backbone at the end")
    parser.add_argument("--export-dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--export-network", default="auto", choices=("auto", "teacher", "student"),
                        help="auto: the teacher when a DINO term trained it, else the student")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--recipe", metavar="NAME", help="run a whole named recipe instead, e.g. hp-tiny: "
                        "--recipe hp-tiny OUT --root DIR --minutes 30 (--recipe hp-tiny --help lists its options)")
    add_config_flags(parser, PretrainConfig)
    args = parser.parse_args(argv)
    cfg = config_from_flags(args, PretrainConfig)
    result = pretrain(cfg, args.out_dir, resume=args.resume, max_steps=args.max_steps, progress=not args.no_progress)
    print(f"{result['steps']} steps in {result['seconds'] / 60:.1f} min; checkpoint {result['checkpoint']}")
    if args.export:
        written = export_backbone(args.out_dir, args.export, dtype=args.export_dtype, network=args.export_network)
        print(f"{json.loads(written.with_suffix('.json').read_text())['network']} backbone written to {written}")


if __name__ == "__main__":
    main()
