"""Evaluate a trained run the way the paper does: cluster probe and linear probe, optionally with CRF.

``evaluate(run_dir)`` loads ``checkpoint.pt`` and its configuration, runs the frozen backbone and the
trained head on the validation split, bilinearly upsamples the segmentation features to the label
size, and accumulates confusion matrices over all valid pixels for

- ``cluster``: the cluster probe, Hungarian-matched to the classes (unsupervised);
- ``linear``: the linear probe (identity matching);
- ``kmeans_backbone``: k-means (k = number of classes) on the frozen backbone features, the baseline
  the trained head should beat;
- with ``crf=True`` also ``cluster_crf`` and ``linear_crf`` (:mod:`hpkit.crf`).

Results are returned as a dict and written to ``eval.json`` (accuracy and mIoU in [0, 1]).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .crf import crf_batch
from .heads import to_rows
from .metrics import confusion_matrix, segmentation_metrics
from .probes import ClusterProbe
from .train import build_dataset, load_run

__all__ = ["evaluate"]


def _summary(confusion: torch.Tensor, match: bool, names) -> dict:
    m = segmentation_metrics(confusion, match=match, class_names=names)
    return {"pixel_accuracy": m["pixel_accuracy"], "mean_iou": m["mean_iou"], "iou": m["iou"],
            "mapping": m["mapping"]}


@torch.no_grad()
def evaluate(run_dir: str | Path, *, crf: bool = False, max_images: int | None = None,
             batch_size: int = 8, device: str = "cpu") -> dict:
    """Metrics of a training run on its validation split.

    Args:
        run_dir: folder written by :func:`hpkit.train.train`.
        crf: also report CRF-refined predictions.
        max_images: evaluate only the first images (quick looks).

    Returns:
        dict with one entry per method (``pixel_accuracy``, ``mean_iou``, ``iou``, ``mapping``), the
        number of images and the configuration name.
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir, device)
    cfg, backbone, head, cluster, linear = run.cfg, run.backbone, run.head, run.cluster, run.linear
    data = build_dataset(cfg, "val")
    names = list(getattr(data, "class_names", ()))
    if not names:
        raise ValueError("the validation data has no class names, so there is nothing to score against")
    n_classes = len(names)

    count = len(data) if max_images is None else min(max_images, len(data))
    subset = torch.utils.data.Subset(data, range(count))
    keys = ["cluster", "linear", "kmeans_backbone"] + (["cluster_crf", "linear_crf"] if crf else [])
    confusion = {k: torch.zeros(n_classes, n_classes, dtype=torch.long) for k in keys}
    feats_rows, labels_rows = [], []
    for images, labels in DataLoader(subset, batch_size=batch_size):
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
        feats_rows.append(feats.cpu())
        labels_rows.append(labels.cpu())
    # k-means baseline on the frozen backbone's patch features, scored like the cluster probe
    all_feats = torch.cat(feats_rows)
    baseline = ClusterProbe.from_kmeans(to_rows(all_feats), n_classes, seed=cfg.train.seed)
    all_labels = torch.cat(labels_rows)
    scores = F.interpolate(baseline(all_feats), size=all_labels.shape[-2:], mode="bilinear", align_corners=False)
    confusion["kmeans_backbone"] += confusion_matrix(scores.argmax(1), all_labels, n_classes, n_classes)

    result = {k: _summary(v, match=not k.startswith("linear"), names=names) for k, v in confusion.items()}
    result.update({"images": count, "config": cfg.name, "classes": names})
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result
