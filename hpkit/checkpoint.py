"""Run folders: atomic checkpoint writes, and rebuilding a trained run for evaluation and inference.

A run folder written by :func:`hpkit.train.train` holds ``checkpoint.pt`` (head, EMA head, projection
head, probes, optimiser states, pools, RNG state, config, step, history), ``config.json`` (the resolved
configuration) and ``history.json`` (losses per step, validation metrics).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbone import FrozenViT, load_backbone
from .config import Config, from_dict
from .heads import SegmentationHead
from .probes import ClusterProbe, LinearProbe

__all__ = ["CHECKPOINT", "save_checkpoint", "load_checkpoint", "load_run", "TrainedRun"]

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(state: dict, path: str | Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash mid-write never replaces the old file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(run_dir: str | Path, device: str | torch.device = "cpu") -> dict:
    """The checkpoint dict of a run folder (clear error when there is none)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train first (`hpkit train` or hpkit.train.train)")
    return torch.load(path, map_location=device, weights_only=False)


@dataclass
class TrainedRun:
    """What :func:`load_run` restores from a run folder (modules in eval mode, on ``device``)."""

    cfg: Config
    backbone: FrozenViT
    head: SegmentationHead
    cluster: ClusterProbe
    linear: LinearProbe
    state: dict  # the whole checkpoint (step, history, ...)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> TrainedRun:
    """Rebuild the backbone, head and probes of a run written by :func:`hpkit.train.train`."""
    state = load_checkpoint(run_dir, device)
    cfg = from_dict(state["config"])
    backbone = load_backbone(cfg.model.backbone, weights=cfg.model.weights, device=device)
    head = SegmentationHead(backbone.embed_dim, cfg.model.dim, cfg.model.dropout).to(device).eval()
    head.load_state_dict(state["head"])
    cluster = ClusterProbe(cfg.model.dim, state["cluster"]["centroids"].shape[0]).to(device)
    cluster.load_state_dict(state["cluster"])
    linear = LinearProbe(cfg.model.dim, state["linear"]["conv.weight"].shape[0]).to(device)
    linear.load_state_dict(state["linear"])
    return TrainedRun(cfg, backbone, head, cluster, linear, state)
