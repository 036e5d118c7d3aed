"""How good is a frozen backbone for HP? Three measurements on a labelled dataset.

- :func:`linear_probe_miou`: a linear layer (1x1 conv) trained on frozen patch features of the
  train split, scored on the val split (pixel accuracy and mIoU, identity matching);
- :func:`kmeans_miou`: k-means (k = number of classes) on frozen val features, Hungarian-matched;
- :func:`attention_agreement`: the paper's Fig. 1(c) premise behind LHP. Among the 8 neighbours of
  every patch, those whose (head-averaged, softmaxed) last-block attention from the anchor is above
  the row average should share the anchor's class more often than those below it.

Patch labels are the label at each patch's centre pixel; patches whose centre is ignored (-1) are
left out. Used by the model card of the bundled backbone (``data/README.md``) and notebook 03.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from hpkit.backbones.vit import FrozenViT
from hpkit.lessons.positives import patch_labels, positives_vs_pool_size  # noqa: F401 - patch_labels is public here too
from hpkit.method.heads import to_rows
from hpkit.method.local_positives import neighbour_index
from hpkit.pipeline.evaluate import feature_batches
from hpkit.pipeline.metrics import confusion_matrix, segmentation_metrics
from hpkit.pipeline.probes import KMEANS_RESTARTS, ClusterProbe

__all__ = ["extract", "patch_labels", "linear_probe_miou", "kmeans_miou", "attention_agreement", "ghp_precision"]


@torch.no_grad()
def extract(backbone: FrozenViT, data: Dataset, *, max_images: int | None = None, batch_size: int = 16,
            attention: bool = False) -> dict[str, Tensor]:
    """Frozen features of a dataset: ``feats`` (B, C, h, w), ``labels`` (B, H, W), ``attn`` (B, heads, P, P)."""
    out: dict[str, list[Tensor]] = {"feats": [], "labels": [], "attn": []}
    for _, labels, feats, attn in feature_batches(backbone, data, max_images, batch_size=batch_size, attention=attention):
        out["feats"].append(feats)
        out["labels"].append(labels.to(feats.device))
        if attention:
            out["attn"].append(attn)
    return {k: torch.cat(v) for k, v in out.items() if v}


def _scores(confusion: Tensor, names, match: bool) -> dict:
    m = segmentation_metrics(confusion, match=match, class_names=names)
    return {"pixel_accuracy": m["pixel_accuracy"], "mean_iou": m["mean_iou"]}


def linear_probe_miou(train: dict[str, Tensor], val: dict[str, Tensor], n_classes: int, *, steps: int = 300,
                      lr: float = 0.05, seed: int = 0) -> dict:
    """A linear classifier on frozen patch features, scored per pixel on the val split.

    Args:
        train, val: :func:`extract` outputs (``feats`` and ``labels``).
        steps: full-batch Adam steps on the train patches (deterministic).

    Returns:
        ``{"pixel_accuracy", "mean_iou"}`` in [0, 1].
    """
    feats = train["feats"]
    x = F.normalize(to_rows(feats), dim=1)
    y = patch_labels(train["labels"], feats.shape[-2:]).reshape(-1)
    keep = (y >= 0) & (y < n_classes)
    x, y = x[keep], y[keep]
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(x.shape[1], n_classes)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.01)
        layer.bias.zero_()
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(layer(x), y).backward()
        opt.step()
    with torch.no_grad():
        vf = F.normalize(val["feats"], dim=1)
        logits = torch.einsum("bchw,kc->bkhw", vf, layer.weight) + layer.bias[None, :, None, None]
        logits = F.interpolate(logits, size=val["labels"].shape[-2:], mode="bilinear", align_corners=False)
        confusion = confusion_matrix(logits.argmax(1), val["labels"], n_classes, n_classes)
    return _scores(confusion, None, match=False)


def kmeans_miou(val: dict[str, Tensor], n_classes: int, *, seed: int = 0, restarts: int = KMEANS_RESTARTS) -> dict:
    """k-means with k = ``n_classes`` (best of ``restarts`` by inertia) on the val features,
    Hungarian-matched, scored per pixel."""
    feats = val["feats"]
    probe = ClusterProbe.from_kmeans(to_rows(feats), n_classes, seed=seed, restarts=restarts)
    with torch.no_grad():
        scores = F.interpolate(probe(feats), size=val["labels"].shape[-2:], mode="bilinear", align_corners=False)
    return _scores(confusion_matrix(scores.argmax(1), val["labels"], n_classes, n_classes), None, match=True)


def attention_agreement(attn: Tensor, labels: Tensor) -> dict:
    """How often a neighbour shares the anchor's class, split by attention above / below the row mean.

    Args:
        attn: (B, heads, P, P) last-block attention logits.
        labels: (B, h, w) patch labels (:func:`patch_labels`), -1 = ignore.

    Returns:
        ``{"above": rate, "below": rate, "pairs_above": n, "pairs_below": n}``: the same-class rate
        among the 8 neighbours with attention above / at-or-below the anchor's row mean.
    """
    b, _, p, _ = attn.shape
    h, w = labels.shape[-2:]
    index, valid = neighbour_index(h, w)
    not_self = index != torch.arange(p)[:, None]
    valid = valid & not_self  # the 8 true neighbours
    counts = torch.zeros(2, 2, dtype=torch.long)  # [above?, same?]
    for image, lab in zip(attn, labels.reshape(b, -1)):
        probs = image.float().mean(0).softmax(-1)  # (P, P) head-averaged logits, as LHP
        above = probs.gather(1, index) > probs.mean(-1, keepdim=True)
        anchor, neighbour = lab[:, None].expand(-1, 9), lab[index]
        ok = valid & (anchor >= 0) & (neighbour >= 0)
        same = anchor == neighbour
        for a in (0, 1):
            for s in (0, 1):
                counts[a, s] += int((ok & (above == bool(a)) & (same == bool(s))).sum())
    rate = counts[:, 1].double() / counts.sum(1).clamp(min=1).double()
    return {"above": float(rate[1]), "below": float(rate[0]), "pairs_above": int(counts[1].sum()),
            "pairs_below": int(counts[0].sum())}


def ghp_precision(pool_feats: Tensor, val_feats: Tensor, labels: Tensor, *, seed: int = 0) -> float:
    """Share of global hidden positives (Eq. 2-3) that have the anchor's class.

    Args:
        pool_feats: (M, C, h, w) features of M scenes; the task-agnostic pool is one random patch of each.
        val_feats: (N, C, h, w) features; every patch is an anchor.
        labels: (N, h, w) patch labels of the anchors (:func:`patch_labels`), -1 = ignore.

    Returns:
        the precision in [0, 1] (:func:`hpkit.lessons.positives.positives_vs_pool_size` with the whole pool).
    """
    g = torch.Generator().manual_seed(seed)
    tokens = pool_feats.flatten(2).transpose(1, 2)  # (M, hw, C)
    pool = tokens[torch.arange(len(tokens)), torch.randint(0, tokens.shape[1], (len(tokens),), generator=g)]
    anchors = F.normalize(val_feats.flatten(2).transpose(1, 2).reshape(-1, tokens.shape[-1]), dim=1)
    return positives_vs_pool_size(anchors, pool, [len(pool)], labels.reshape(-1))["precision"][0]
