"""Evaluate a trained run the way the paper does: cluster probe and linear probe, optionally with CRF.

``evaluate(run_dir)`` loads ``checkpoint.pt`` and its configuration, runs the frozen backbone and the
trained head on the validation split, bilinearly upsamples the segmentation features to the label
size, and accumulates confusion matrices over all valid pixels for

- ``cluster``: the cluster probe, Hungarian-matched to the classes (unsupervised);
- ``linear``: the linear probe (identity matching);
- ``kmeans_backbone``: k-means (k = number of classes, best of ``kmeans_restarts`` runs by inertia) on
  the frozen backbone features, the baseline the trained head should beat;
- with ``crf=True`` also ``cluster_crf`` and ``linear_crf`` (:mod:`hpkit.crf`).

Results are returned as a dict and written to ``eval.json`` (accuracy and mIoU in [0, 1]).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .backbone import FrozenViT
from .checkpoint import load_run
from .crf import MISSING_MESSAGE as CRF_MISSING
from .crf import crf_available, crf_batch
from .data.build import build_dataset
from .heads import SegmentationHead, to_rows
from .metrics import confusion_matrix, segmentation_metrics
from .probes import KMEANS_RESTARTS, ClusterProbe, LinearProbe

__all__ = ["evaluate", "score"]


def _summary(confusion: torch.Tensor, match: bool, names) -> dict:
    m = segmentation_metrics(confusion, match=match, class_names=names)
    return {"pixel_accuracy": m["pixel_accuracy"], "mean_iou": m["mean_iou"], "iou": m["iou"],
            "mapping": m["mapping"], "confusion": m["confusion"].tolist()}


@torch.no_grad()
def score(backbone: FrozenViT, head: SegmentationHead, cluster: ClusterProbe, linear: LinearProbe, data: Dataset, *,
          crf: bool = False, kmeans: bool = True, max_images: int | None = None, batch_size: int = 8,
          device: str | torch.device = "cpu", seed: int = 0, kmeans_restarts: int = KMEANS_RESTARTS) -> dict:
    """Metrics of a head and its probes on a labelled dataset (no files read or written).

    Segmentation features are bilinearly upsampled to the label size; one confusion matrix per
    method is accumulated over all valid pixels, then Hungarian-matched (cluster probe, k-means).
    The k-means baseline keeps the best of ``kmeans_restarts`` runs by inertia (a single run's mIoU
    spread over 12 points between seeds on the synthetic scenes).

    Returns:
        ``{"cluster": {...}, "linear": {...}, ["kmeans_backbone", "cluster_crf", "linear_crf"], "images",
        "classes"}``; each method has ``pixel_accuracy``, ``mean_iou``, ``iou`` (per class),
        ``mapping`` (cluster -> class) and ``confusion`` (matched, rows = prediction).
    """
    names = list(getattr(data, "class_names", ()))
    if not names:
        raise ValueError("the validation data has no class names, so there is nothing to score against")
    n_classes = len(names)
    was_training = head.training
    head.eval()
    notes = []
    if crf and not crf_available():  # say so before any work, then score without it
        crf = False
        notes.append(f"CRF skipped: {CRF_MISSING}")
        warnings.warn(notes[-1], stacklevel=2)
    count = len(data) if max_images is None else min(max_images, len(data))
    keys = ["cluster", "linear"] + (["cluster_crf", "linear_crf"] if crf else [])
    confusion = {k: torch.zeros(n_classes, n_classes, dtype=torch.long) for k in keys}
    feats_rows, labels_rows = [], []
    for images, labels in DataLoader(torch.utils.data.Subset(data, range(count)), batch_size=batch_size):
        images, labels = images.to(device), labels.to(device)
        feats = backbone(images, attention=False).feats
        s = F.interpolate(head(feats), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        cluster_scores, linear_logits = cluster(s), linear(s)
        confusion["cluster"] += confusion_matrix(cluster_scores.argmax(1), labels, n_classes, n_classes).cpu()
        confusion["linear"] += confusion_matrix(linear_logits.argmax(1), labels, n_classes, n_classes).cpu()
        if crf:
            confusion["cluster_crf"] += confusion_matrix(crf_batch(images.cpu(), 2.0 * cluster_scores.cpu()),
                                                         labels.cpu(), n_classes, n_classes)
            confusion["linear_crf"] += confusion_matrix(crf_batch(images.cpu(), linear_logits.cpu()),
                                                        labels.cpu(), n_classes, n_classes)
        if kmeans:
            feats_rows.append(feats.cpu())
            labels_rows.append(labels.cpu())
    head.train(was_training)
    if kmeans and sum(f.shape[0] * f.shape[2] * f.shape[3] for f in feats_rows) < n_classes:
        kmeans = False
        notes.append(f"k-means baseline skipped: fewer patches than the {n_classes} classes")
    if kmeans:  # the baseline: k-means on the frozen backbone's patch features, scored like the cluster probe
        all_feats, all_labels = torch.cat(feats_rows), torch.cat(labels_rows)
        baseline = ClusterProbe.from_kmeans(to_rows(all_feats), n_classes, seed=seed, restarts=kmeans_restarts)
        scores = F.interpolate(baseline(all_feats), size=all_labels.shape[-2:], mode="bilinear", align_corners=False)
        confusion["kmeans_backbone"] = confusion_matrix(scores.argmax(1), all_labels, n_classes, n_classes)
    result = {k: _summary(v, match=not k.startswith("linear"), names=names) for k, v in confusion.items()}
    result.update({"images": count, "classes": names, "notes": notes})
    if getattr(data, "colors", None) is not None:
        result["colors"] = [[int(v) for v in c] for c in data.colors]
    return result


def evaluate(run_dir: str | Path, *, crf: bool = False, max_images: int | None = None,
             batch_size: int = 8, device: str = "cpu") -> dict:
    """Metrics of a training run on its validation split, also written to ``run_dir/eval.json``.

    Args:
        run_dir: folder written by :func:`hpkit.train.train`.
        crf: also report CRF-refined predictions.
        max_images: evaluate only the first images (quick looks).

    Returns:
        the :func:`score` dict plus ``config`` (the resolved configuration, as a dict) and ``step``.
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir, device)
    data = build_dataset(run.cfg, "val")
    result = score(run.backbone, run.head, run.cluster, run.linear, data, crf=crf, max_images=max_images,
                   batch_size=batch_size, device=device, seed=run.cfg.train.seed)
    result.update({"config": run.state["config"], "step": run.state["step"], "backbone": run.backbone.name})
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result
