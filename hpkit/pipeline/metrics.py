"""Segmentation metrics: confusion matrix, Hungarian cluster-to-class matching, accuracy, IoU.

As in the paper's protocol (STEGO / HP, docs/official-code-differences.md#evaluation): the confusion matrix is
accumulated over *all* valid pixels of the evaluation set, clusters are matched one-to-one to classes
by ``scipy.optimize.linear_sum_assignment`` maximising the matched pixel count, and

- pixel accuracy = matched-correct pixels / valid pixels,
- IoU_k = tp / (tp + fp + fn) per class, mIoU = mean over the classes that occur in the ground truth
  or the prediction (classes absent from both are skipped, as NaN in the official code).

Valid pixels have a label in ``[0, n_classes)``; anything else (-1, 255, out-of-range ids) is ignored.
A linear probe predicts classes directly: use the identity matching (``match=False``).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = ["confusion_matrix", "hungarian_match", "segmentation_metrics"]


def confusion_matrix(pred: Tensor, target: Tensor, n_pred: int, n_classes: int) -> Tensor:
    """Counts of (predicted cluster or class, ground-truth class) pairs over valid pixels.

    Args:
        pred: (...) integer predictions in ``[0, n_pred)``.
        target: (...) integer labels, same shape; values outside ``[0, n_classes)`` are ignored.
        n_pred: number of clusters (or classes for a linear probe).
        n_classes: number of ground-truth classes.

    Returns:
        (n_pred, n_classes) int64 matrix; accumulate it over batches by adding.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} shapes differ")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    valid = (target >= 0) & (target < n_classes) & (pred >= 0) & (pred < n_pred)
    flat = pred[valid] * n_classes + target[valid]
    return torch.bincount(flat, minlength=n_pred * n_classes).reshape(n_pred, n_classes)


def hungarian_match(confusion: Tensor) -> Tensor:
    """One-to-one cluster -> class assignment maximising the matched pixels.

    Args:
        confusion: (n_pred, n_classes) counts, ``n_pred >= n_classes``.

    Returns:
        (n_pred,) long, the class of each cluster; -1 for clusters left unmatched (extra clusters).
    """
    n_pred, n_classes = confusion.shape
    if n_pred < n_classes:
        raise ValueError(f"{n_pred} clusters cannot be matched one-to-one to {n_classes} classes; "
                         "use at least as many clusters as classes")
    rows, cols = linear_sum_assignment(confusion.cpu().numpy().astype(np.float64), maximize=True)
    mapping = torch.full((n_pred,), -1, dtype=torch.long)
    mapping[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return mapping


def segmentation_metrics(confusion: Tensor, *, match: bool = True,
                         class_names: list[str] | tuple[str, ...] | None = None) -> dict:
    """Pixel accuracy, mIoU and per-class IoU from an accumulated confusion matrix.

    Args:
        confusion: (n_pred, n_classes) counts from :func:`confusion_matrix`.
        match: Hungarian-match clusters to classes (cluster probe, k-means); ``False`` for a linear
            probe whose outputs already are classes (then ``n_pred == n_classes``).
        class_names: optional names for the per-class entries.

    Returns:
        dict with ``pixel_accuracy`` and ``mean_iou`` (in [0, 1]), ``iou`` (per class, NaN where the
        class occurs in neither ground truth nor prediction), ``mapping`` (cluster -> class) and
        ``confusion`` (n_classes, n_classes) after matching, rows = predicted class.
    """
    confusion = confusion.long().cpu()
    n_pred, n_classes = confusion.shape
    if match:
        mapping = hungarian_match(confusion)
    else:
        if n_pred != n_classes:
            raise ValueError(f"without matching, predictions must be classes: got {n_pred} vs {n_classes}")
        mapping = torch.arange(n_classes)
    matched = torch.zeros(n_classes, n_classes, dtype=torch.long)
    keep = mapping >= 0
    matched.index_add_(0, mapping[keep], confusion[keep])  # unmatched clusters' pixels count as errors
    tp = matched.diag().double()
    predicted = matched.sum(1).double()
    actual = confusion.sum(0).double()  # every valid pixel of the class, matched or not
    union = predicted + actual - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.tensor(float("nan"), dtype=torch.double))
    total = actual.sum()
    out = {
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_iou": float(iou[~iou.isnan()].mean()) if (~iou.isnan()).any() else float("nan"),
        "iou": iou.tolist(),
        "mapping": mapping.tolist(),
        "confusion": matched,
    }
    if class_names is not None:
        out["iou_by_class"] = dict(zip(class_names, out["iou"]))
    return out
