"""Evaluate a trained run the way the paper does: cluster probe and linear probe, optionally with CRF.

``evaluate(run_dir)`` loads ``checkpoint.pt`` and its configuration, runs the frozen backbone and the
trained head on the validation split, bilinearly upsamples the segmentation features to the label
size, and accumulates confusion matrices over all valid pixels for

- ``cluster``: the cluster probe, Hungarian-matched to the classes (unsupervised);
- ``linear``: the linear probe (identity matching);
- ``kmeans_backbone``: k-means (k = number of classes, best of ``kmeans_restarts`` runs by inertia) on
  the frozen backbone features, the baseline the trained head should beat;
- with ``crf=True`` also ``cluster_crf`` and ``linear_crf`` (:mod:`hpkit.pipeline.crf`).

Results are returned as a dict and written to ``eval.json`` (accuracy and mIoU in [0, 1]).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from hpkit._util import atomic_write
from hpkit.backbones.vit import FrozenViT
from hpkit.method.heads import SegmentationHead, to_rows
from hpkit.pipeline.checkpoint import load_run, run_folder
from hpkit.pipeline.crf import MISSING_MESSAGE as CRF_MISSING
from hpkit.pipeline.crf import crf_available, crf_batch
from hpkit.pipeline.datasets import build_dataset
from hpkit.pipeline.metrics import confusion_matrix, segmentation_metrics
from hpkit.pipeline.probes import KMEANS_RESTARTS, ClusterProbe, LinearProbe

#: the k-means baseline is fitted on at most this many patch rows (a seeded random subset)
KMEANS_MAX_ROWS = 100_000

__all__ = ["evaluate", "score", "cluster_sizes", "batches", "feature_batches", "kmeans_baseline", "upsampled", "has_labels", "KMEANS_MAX_ROWS"]


def _summary(confusion: torch.Tensor, match: bool, names) -> dict:
    m = segmentation_metrics(confusion, match=match, class_names=names)
    return {"pixel_accuracy": m["pixel_accuracy"], "mean_iou": m["mean_iou"], "iou": m["iou"],
            "mapping": m["mapping"], "confusion": m["confusion"].tolist()}


def batches(data: Dataset, items: int | Sequence[int] | None = None, batch_size: int = 8, *,
            progress: bool = False, desc: str = "evaluation") -> Iterator[tuple[Tensor, Tensor]]:
    """``(images (B, 3, H, W), labels (B, H, W))`` of the first ``items`` items (or of these indices), in order.

    Consecutive items of the same size share a batch (at most ``batch_size``), so datasets of
    photos at their own aspect ratio (``crop="whole"``) go through one item or one size at a time.
    """
    if items is None or isinstance(items, int):
        items = range(len(data) if items is None else min(items, len(data)))
    loader = DataLoader(Subset(data, list(items)), batch_size=batch_size, collate_fn=list)
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        start = 0
        for i in range(1, len(batch) + 1):
            if i == len(batch) or batch[i][0].shape != batch[start][0].shape:
                group = batch[start:i]
                yield torch.stack([x for x, _ in group]), torch.stack([y for _, y in group])
                start = i


@torch.no_grad()
def feature_batches(backbone: FrozenViT, data: Dataset, items: int | Sequence[int] | None = None, *,
                    batch_size: int = 8, attention: bool = False, device: str | torch.device | None = None,
                    progress: bool = False, desc: str = "features") -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor | None]]:
    """The frozen backbone over a dataset, batch by batch (:func:`batches`): ``(images (B, 3, H, W) on
    ``device``, labels (B, H, W) on the CPU, feats (B, C, h, w), attn (B, heads, P, P) or None)``.

    ``device`` defaults to the backbone's. The one pass every evaluation, lesson and diagnostic uses.
    """
    device = backbone.mean.device if device is None else device
    for images, labels in batches(data, items, batch_size, progress=progress, desc=desc):
        images = images.to(device)
        feats, attn = backbone(images, attention=attention)
        yield images, labels, feats, attn


def upsampled(scorer: torch.nn.Module, feats: Tensor, size: tuple[int, int]) -> Tensor:
    """``scorer(feats)`` (the head S, or a k-means probe on backbone features) bilinearly upsampled to
    ``size``: (B, C, h, w) -> (B, D, *size). Every evaluation scores pixels this way."""
    return F.interpolate(scorer(feats), size=size, mode="bilinear", align_corners=False)


def kmeans_baseline(rows: Tensor, k: int, *, seed: int = 0, restarts: int = KMEANS_RESTARTS,
                    progress: bool = False) -> ClusterProbe:
    """The k-means baseline on (N, C) backbone patch rows: the best of ``restarts`` runs by inertia, fitted
    on at most ``KMEANS_MAX_ROWS`` rows (a random subset seeded by ``seed``), as a probe that assigns any patch."""
    if rows.shape[0] > KMEANS_MAX_ROWS:
        rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:KMEANS_MAX_ROWS]]
    return ClusterProbe.from_kmeans(rows, k, seed=seed, restarts=restarts, progress=progress)


@torch.no_grad()
def score(backbone: FrozenViT, head: SegmentationHead, cluster: ClusterProbe, linear: LinearProbe, data: Dataset, *,
          crf: bool = False, kmeans: bool = True, max_images: int | None = None, batch_size: int = 8,
          device: str | torch.device = "cpu", seed: int = 0, kmeans_restarts: int = KMEANS_RESTARTS,
          progress: bool = False) -> dict:
    """Metrics of a head and its probes on a labelled dataset (no files read or written).

    Segmentation features are bilinearly upsampled to the label size; one confusion matrix per
    method is accumulated over all valid pixels, then Hungarian-matched (cluster probe, k-means).
    The cluster probe's K clusters may outnumber the classes (extra clusters count as errors). The
    k-means baseline uses the same K and keeps the best of ``kmeans_restarts`` runs by inertia (a
    single run's mIoU spread over 12 points between seeds on the synthetic scenes); it is fitted on
    at most ``KMEANS_MAX_ROWS`` patch rows (a seeded random subset), then assigns every patch.

    Returns:
        ``{"cluster": {...}, "linear": {...}, ["kmeans_backbone", "cluster_crf", "linear_crf"], "images",
        "classes"}``; each method has ``pixel_accuracy``, ``mean_iou``, ``iou`` (per class),
        ``mapping`` (cluster -> class) and ``confusion`` (matched, rows = prediction).
    """
    names = list(getattr(data, "class_names", ()))
    if not names:
        raise ValueError("the validation data has no class names, so there is nothing to score against")
    n_classes, k = len(names), cluster.centroids.shape[0]
    if k < n_classes:
        raise ValueError(f"the cluster probe has {k} clusters for {n_classes} classes: matching is one-to-one, "
                         f"so train with model.num_clusters >= {n_classes}")
    was_training = head.training
    head.eval()
    notes = []
    if crf and not crf_available():  # say so before any work, then score without it
        crf = False
        notes.append(f"CRF skipped: {CRF_MISSING}")
        warnings.warn(notes[-1], stacklevel=2)
    count = len(data) if max_images is None else min(max_images, len(data))
    rows = {"cluster": k, "linear": n_classes, "cluster_crf": k, "linear_crf": n_classes}  # predictions per method
    keys = ["cluster", "linear"] + (["cluster_crf", "linear_crf"] if crf else [])
    confusion = {key: torch.zeros(rows[key], n_classes, dtype=torch.long) for key in keys}
    kept = []  # (backbone features, labels) per batch, for the k-means baseline
    for images, labels, feats, _ in feature_batches(backbone, data, count, batch_size=batch_size, device=device,
                                                    progress=progress, desc="evaluation"):
        labels = labels.to(device)
        s = upsampled(head, feats, labels.shape[-2:])
        cluster_scores, linear_logits = cluster(s), linear(s)
        confusion["cluster"] += confusion_matrix(cluster_scores.argmax(1), labels, k, n_classes).cpu()
        confusion["linear"] += confusion_matrix(linear_logits.argmax(1), labels, n_classes, n_classes).cpu()
        if crf:
            confusion["cluster_crf"] += confusion_matrix(crf_batch(images.cpu(), ClusterProbe.crf_logits(cluster_scores.cpu())),
                                                         labels.cpu(), k, n_classes)
            confusion["linear_crf"] += confusion_matrix(crf_batch(images.cpu(), linear_logits.cpu()),
                                                        labels.cpu(), n_classes, n_classes)
        if kmeans:
            kept.append((feats.cpu(), labels.cpu()))
    head.train(was_training)
    patches = sum(f.shape[0] * f.shape[2] * f.shape[3] for f, _ in kept)
    if kmeans and patches < k:
        kmeans = False
        notes.append(f"k-means baseline skipped: fewer patches than the {k} clusters")
    if kmeans:  # the baseline: k-means on the frozen backbone's patch features, scored like the cluster probe
        baseline = kmeans_baseline(torch.cat([to_rows(f) for f, _ in kept]), k, seed=seed, restarts=kmeans_restarts,
                                   progress=progress)
        confusion["kmeans_backbone"] = torch.zeros(k, n_classes, dtype=torch.long)
        for feats, labels in kept:
            scores = upsampled(baseline, feats, labels.shape[-2:])
            confusion["kmeans_backbone"] += confusion_matrix(scores.argmax(1), labels, k, n_classes)
    result = {key: _summary(v, match=not key.startswith("linear"), names=names) for key, v in confusion.items()}
    result.update({"images": count, "classes": names, "notes": notes})
    if getattr(data, "colors", None) is not None:
        result["colors"] = [[int(v) for v in c] for c in data.colors]
    return result


@torch.no_grad()
def cluster_sizes(backbone: FrozenViT, head: SegmentationHead, cluster: ClusterProbe, data: Dataset, *,
                  max_images: int | None = None, batch_size: int = 8, device: str | torch.device = "cpu",
                  progress: bool = False) -> dict:
    """What can be said without labels: each cluster's share of the pixels and of the images.

    Returns:
        ``{"labelled": False, "images", "clusters": K, "pixel_share": [K floats summing to 1],
        "image_share": [K floats: the fraction of images where the cluster appears]}``.
    """
    k = cluster.centroids.shape[0]
    was_training = head.training
    head.eval()
    pixels, present, count = torch.zeros(k, dtype=torch.long), torch.zeros(k, dtype=torch.long), 0
    for images, _, feats, _ in feature_batches(backbone, data, max_images, batch_size=batch_size, device=device,
                                               progress=progress, desc="clusters"):
        s = upsampled(head, feats, images.shape[-2:])
        ids = cluster(s).argmax(1).cpu()
        pixels += torch.bincount(ids.flatten(), minlength=k)
        present += torch.stack([torch.bincount(m.flatten(), minlength=k) > 0 for m in ids]).sum(0)
        count += images.shape[0]
    head.train(was_training)
    return {"labelled": False, "images": count, "clusters": k,
            "pixel_share": (pixels.double() / pixels.sum().clamp(min=1)).tolist(),
            "image_share": (present.double() / max(count, 1)).tolist()}


def has_labels(data: Dataset) -> bool:
    """Whether a dataset can be scored: it names its classes and (folders) its split has label maps."""
    return bool(getattr(data, "class_names", ())) and getattr(data, "labelled", True)


def evaluate(run_dir: str | Path, *, crf: bool = False, max_images: int | None = None,
             batch_size: int = 8, device: str = "cpu", progress: bool = False) -> dict:
    """Metrics of a training run on its validation split, also written to ``run_dir/eval.json``.

    Args:
        run_dir: folder written by :func:`hpkit.pipeline.train.train` (or its ``checkpoint.pt``).
        crf: also report CRF-refined predictions.
        max_images: evaluate only the first images (quick looks).
        progress: show progress bars (images, k-means restarts).

    Returns:
        the :func:`score` dict (or, for data without labels, the :func:`cluster_sizes` dict) plus
        ``split`` (the split scored: ``train`` for a folder without a val split), ``config`` (the
        resolved configuration, as a dict), ``step`` and ``backbone``.
    """
    run_dir = run_folder(run_dir)
    run = load_run(run_dir, device)
    data = build_dataset(run.cfg, "val")
    notes = list(getattr(data, "notes", []))
    if has_labels(data):
        result = score(run.backbone, run.head, run.cluster, run.linear, data, crf=crf, max_images=max_images,
                       batch_size=batch_size, device=device, seed=run.cfg.train.seed, progress=progress)
    else:
        notes.append("no labels: reporting cluster sizes only (add label maps for metrics)")
        result = cluster_sizes(run.backbone, run.head, run.cluster, data, max_images=max_images,
                               batch_size=batch_size, device=device, progress=progress)
    result["notes"] = notes + result.get("notes", [])
    result.update({"split": getattr(data, "split_used", "val"), "config": run.state["config"],
                   "step": run.state["step"], "backbone": run.backbone.name})
    atomic_write(run_dir / "eval.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    return result
