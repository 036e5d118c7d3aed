"""Run folders: atomic checkpoint writes, and rebuilding a trained run for evaluation and inference.

A run folder written by :func:`hpkit.pipeline.train.train` holds ``checkpoint.pt`` (head, EMA head, projection
head, probes, optimiser states, pools, RNG state, config, step, history), ``config.json`` (the resolved
configuration) and ``history.json`` (losses per step, validation metrics).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hpkit._util import atomic_write
from hpkit.backbones.vit import FrozenViT, load_backbone
from hpkit.method.heads import MomentumHead, ProjectionHead, SegmentationHead
from hpkit.method.pools import ReferencePools
from hpkit.pipeline.config import Config, from_dict
from hpkit.pipeline.probes import ClusterProbe, LinearProbe

__all__ = ["CHECKPOINT", "RUN_FILES", "DERIVED_FILES", "save_checkpoint", "load_checkpoint", "load_run", "TrainedRun",
           "run_folder", "prepare_run_folder"]

CHECKPOINT = "checkpoint.pt"
#: what a training run writes; a folder holding one of them holds a run
RUN_FILES = (CHECKPOINT, "config.json", "history.json")
#: what eval writes from a run's state (deleted when the run changes)
DERIVED_FILES = ("eval.json", "history.png", "confusion_cluster.png", "confusion_linear.png", "clusters.png")


def save_checkpoint(state: dict, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def run_folder(path: str | Path) -> Path:
    """The run folder of ``path``: the folder itself, or the folder of a ``checkpoint.pt`` given directly."""
    path = Path(path)
    return path.parent if path.suffix == ".pt" and not path.is_dir() else path


def prepare_run_folder(out: str | Path, *, resume: bool, force: bool) -> None:
    """Make ``out`` ready for training: never replace a run silently, never keep stale outputs.

    A folder holding a run (``checkpoint.pt``, ``config.json`` or ``history.json``) is refused unless
    ``resume`` (continue it) or ``force`` (delete it and start over). Outputs derived from an earlier
    state (``eval.json`` and the plots) are deleted either way: they would describe another model.
    """
    out = Path(out)
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not resume and not force:
        raise FileExistsError(f"{out} already holds a run ({', '.join(existing)}): continue it with --resume "
                              "(resume=True), or start over with --force (force=True), which deletes it")
    stale = list(DERIVED_FILES) + ([] if resume else list(RUN_FILES) + [f".{CHECKPOINT}.tmp"])
    for name in stale:
        (out / name).unlink(missing_ok=True)


def load_checkpoint(run_dir: str | Path, device: str | torch.device = "cpu") -> dict:
    """The checkpoint dict of a run folder (or of its ``checkpoint.pt``; clear error when there is none)."""
    path = run_folder(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train first (`hpkit train` or hpkit.pipeline.train.train)")
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
    folder: Path | None = None  # the run folder it was loaded from
    ema: MomentumHead | None = None  # S', the momentum head that selects task-specific positives
    proj: ProjectionHead | None = None  # Z, the projection the objective contrasts
    pools: ReferencePools | None = None  # Q^ag and Q^sp as they were at the last step


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> TrainedRun:
    """Rebuild the backbone, S (head), S' (EMA head), Z (projection), the pools and the probes of a run
    written by :func:`hpkit.pipeline.train.train`, in eval mode."""
    state = load_checkpoint(run_dir, device)
    cfg = from_dict(state["config"])
    backbone = load_backbone(cfg.model.backbone, weights=cfg.model.weights, device=device)
    head = SegmentationHead(backbone.embed_dim, cfg.model.dim, cfg.model.dropout).to(device).eval()
    head.load_state_dict(state["head"])
    cluster = ClusterProbe(cfg.model.dim, state["cluster"]["centroids"].shape[0]).to(device)
    cluster.load_state_dict(state["cluster"])
    linear = LinearProbe(cfg.model.dim, state["linear"]["conv.weight"].shape[0]).to(device)
    linear.load_state_dict(state["linear"])
    ema = MomentumHead(SegmentationHead(backbone.embed_dim, cfg.model.dim, cfg.model.dropout),
                       cfg.model.ema_momentum).to(device).eval()
    ema.load_state_dict(state["ema"])
    proj = ProjectionHead(cfg.model.dim).to(device).eval()
    proj.load_state_dict(state["proj"])
    pools = ReferencePools.from_state_dict(state["pools"])
    return TrainedRun(cfg, backbone, head, cluster, linear, state, run_folder(run_dir), ema, proj, pools)
