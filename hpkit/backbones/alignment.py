"""Attention alignment: teach a ViT's last block to attend where its own features are similar.

LHP (lesson 03, :mod:`hpkit.method.local_positives`) picks each patch's local positives by the backbone's
last-block attention, and the paper's Fig. 1(c) premise is that DINO's attention favours neighbours
of the anchor's class. DINO gets there after long training on real images. The tiny backbones that
``hpkit pretrain`` trains on a CPU in half an hour do not: region-level contrast made their patch
*features* far better than a random ViT's (docs/experiments/hp-tiny.md#region-contrast), but its last-block attention stayed
unselective (same-class rate 0.747 for neighbours above the row mean, 0.787 below).

This step fixes that without labels, with a target taken from the network's features as they are
before it starts. For every image, the target of patch ``i``'s attention row is the softmax over patches ``j`` of the cosine
similarity of the frozen network's final patch tokens, ``softmax_j(cos(z_i, z_j) / temperature)``;
every head's row is trained towards it with cross-entropy (:func:`attention_alignment_loss`). Only
the query and key rows of the last block's ``qkv`` projection learn. The values, the MLP and every
earlier block stay as they were, so the features change only through the last block's attention
weights. It is hpkit's addition, not the paper's: with DINO weights, attention needs no such help.

Cost: 100 steps of 32 scenes, about a minute on 2 CPU cores. What it changes, measured with
``benchmarks/backbone_quality.py``: data/README.md and docs/experiments/hp-tiny.md#attention.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from hpkit.backbones.pretrain import (
    add_config_flags,
    config_from_flags,
    pretraining_images,
    read_backbone_metadata,
    save_backbone_file,
)
from hpkit.backbones.vit import BACKBONES, FrozenViT, file_sha256, load_backbone

__all__ = ["AlignConfig", "affinity_targets", "attention_alignment_loss", "align_attention", "align_file", "main"]


@dataclass
class AlignConfig:
    """Settings of :func:`align_attention` (defaults: the bundled ``hp-tiny``'s last stage)."""

    steps: int = 100
    batch_size: int = 32
    temperature: float = 0.1  # of the cosine-affinity target
    lr: float = 1e-3  # Adam, constant
    flip_p: float = 0.5  # horizontal flips of the training images
    seed: int = 0
    # Images (labels are never used): as hpkit pretrain's dataset, root, num_images, image_size, data_seed.
    dataset: str = "synthetic"
    root: str | None = None
    num_images: int | None = 1000
    image_size: int = 128
    data_seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError(f"temperature and lr must be > 0, got {self.temperature} and {self.lr}")
        if not 0 <= self.flip_p <= 1:
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p}")
        if self.dataset not in ("synthetic", "folder"):
            raise ValueError(f"dataset must be 'synthetic' or 'folder', got {self.dataset!r}")
        if self.dataset == "folder" and not self.root:
            raise ValueError("dataset='folder' needs root=/path/to/images")


def affinity_targets(tokens: Tensor, temperature: float) -> Tensor:
    """(B, P, C) patch tokens -> (B, P, P) rows ``softmax_j(cos(z_i, z_j) / temperature)``."""
    z = F.normalize(tokens.float(), dim=-1)
    return (z @ z.transpose(1, 2) / temperature).softmax(dim=-1)


def attention_alignment_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of every head's attention rows against the affinity targets.

    Args:
        logits: (B, heads, P, P) pre-softmax attention logits.
        targets: (B, P, P) target rows (:func:`affinity_targets`), each summing to 1.

    Returns:
        scalar: ``-mean_{b, head, i} sum_j targets[b, i, j] * log_softmax(logits[b, head, i])_j``.
    """
    return -(targets[:, None] * logits.float().log_softmax(dim=-1)).sum(dim=-1).mean()


def align_attention(backbone: FrozenViT, cfg: AlignConfig | None = None, *, progress: bool = True) -> dict:
    """Train ``backbone``'s last-block queries and keys in place (see the module docstring).

    Args:
        backbone: the network to align (its weights change; everything but q and k stays frozen).
        cfg: the settings.

    Returns:
        dict with ``history`` (one entry per step: step, loss, seconds) and ``seconds``.
    """
    cfg = cfg or AlignConfig()
    data = pretraining_images(cfg.dataset, cfg.root, cfg.num_images, cfg.image_size, cfg.data_seed)
    if len(data) < cfg.batch_size:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the {len(data)} images")
    reference = copy.deepcopy(backbone.vit.blocks[-1]).requires_grad_(False)
    norm, prefix = backbone.vit.norm, backbone.vit.num_prefix_tokens
    qkv = backbone.vit.blocks[-1].attn.qkv  # rows: queries, keys, values (dim each)
    params, dim = list(qkv.requires_grad_(True).parameters()), qkv.in_features
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    device = backbone.mean.device
    history, total = [], 0.0
    try:
        for step in tqdm(range(cfg.steps), disable=not progress, desc="attention alignment"):
            started = time.perf_counter()
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            index = torch.randperm(len(data), generator=g)[: cfg.batch_size]
            images = torch.stack([data[int(i)][0] for i in index]).to(device)
            flip = (torch.rand(len(index), generator=g) < cfg.flip_p).to(device)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            x, _ = backbone.last_block_input(images)
            with torch.no_grad():  # the frozen network's final patch tokens
                targets = affinity_targets(norm(reference(x))[:, prefix:], cfg.temperature)
            loss = attention_alignment_loss(backbone.last_attention_logits(x), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for p in params:
                p.grad[2 * dim:] = 0  # the value rows stay as they were
            optimizer.step()
            took = time.perf_counter() - started
            total += took
            history.append({"step": step + 1, "loss": loss.item(), "seconds": took})
    finally:
        backbone.requires_grad_(False)
    return {"history": history, "seconds": total}


def align_file(source: str | Path, out: str | Path, cfg: AlignConfig | None = None, *,
               backbone: str = "random_tiny", progress: bool = True, extra_meta: dict | None = None) -> Path:
    """Load ``source`` (a ``.safetensors`` backbone, e.g. from ``hpkit pretrain --export``) into the
    ``backbone`` architecture, align its attention, and write ``out`` (.safetensors and .json). The
    metadata records the settings, the source file's sha256 and the source's own metadata, so the
    whole recipe travels with the file; ``extra_meta`` adds entries (e.g. the recipe's record)."""
    cfg = cfg or AlignConfig()
    source, out = Path(source), Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"the output must end in .safetensors, got {out}")
    if source.suffix != ".safetensors" or not source.is_file():
        raise FileNotFoundError(f"{source} is not a .safetensors backbone file: export one with "
                                "`hpkit pretrain OUT ... --export FILE.safetensors`")
    network = load_backbone(backbone, weights=source)
    result = align_attention(network, cfg, progress=progress)
    weights = {k: v.detach().contiguous() for k, v in network.vit.state_dict().items()}
    source_meta = read_backbone_metadata(source)
    spec = BACKBONES.get(backbone)
    meta = {"format": "hpkit attention-aligned ViT (timm keys)", "timm_name": spec.timm_name if spec else None,
            "loads_as": backbone, "dtype": str(next(iter(weights.values())).dtype).replace("torch.", ""),
            "parameters": sum(v.numel() for v in weights.values()), "alignment": dataclasses.asdict(cfg),
            "alignment_seconds": round(result["seconds"], 1),
            "first_loss": result["history"][0]["loss"], "final_loss": result["history"][-1]["loss"],
            "source_sha256": file_sha256(source), "source": source_meta}
    return save_backbone_file(weights, out, meta | (extra_meta or {}))


def main(argv: Sequence[str] | None = None, prog: str = "python -m hpkit.backbones.alignment") -> None:
    """``hpkit align-attention SOURCE.safetensors OUT.safetensors [--set steps=100 ...]`` (``--steps 100``
    works too)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], usage="%(prog)s "
                                     "SOURCE.safetensors OUT.safetensors [--set FIELD=VALUE ...] [options]")
    parser.add_argument("source", help="a .safetensors backbone (hpkit pretrain --export)")
    parser.add_argument("out", help="the aligned backbone to write (.safetensors)")
    parser.add_argument("--backbone", default="random_tiny", help="architecture to load it into (default random_tiny)")
    parser.add_argument("--no-progress", action="store_true")
    add_config_flags(parser, AlignConfig)
    args = parser.parse_args(argv)
    cfg = config_from_flags(args, AlignConfig)
    path = align_file(args.source, args.out, cfg, backbone=args.backbone, progress=not args.no_progress)
    meta = json.loads(path.with_suffix(".json").read_text())
    print(f"attention aligned in {cfg.steps} steps ({meta['alignment_seconds'] / 60:.1f} min): loss "
          f"{meta['first_loss']:.4f} -> {meta['final_loss']:.4f}; written to {path}")


if __name__ == "__main__":
    main()
