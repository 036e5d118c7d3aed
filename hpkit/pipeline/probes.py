"""Evaluation probes: the cluster probe (STEGO/HP centroids), k-means, and the linear probe.

The probes only *measure* the learned features: they train on detached segmentation features and
never send gradients into the segmentation head (users ask, hynnsk/HP#12). The cluster probe uses
no labels at all (its clusters are Hungarian-matched to classes afterwards, :mod:`hpkit.pipeline.metrics`);
the linear probe is supervised and reports how linearly separable the features are.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.vq import kmeans2, vq
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["ClusterProbe", "LinearProbe", "fit_kmeans", "KMEANS_RESTARTS"]

# Restarts of the k-means *baselines* (evaluation, diagnostics): the best of 5 by inertia.
KMEANS_RESTARTS = 5


class ClusterProbe(nn.Module):
    """``n_clusters`` learnable centroids; score = cosine(s, mu_k) (docs/official-code-differences.md#evaluation).

    Training loss: minus the mean over pixels of the cosine to the best centroid (hard assignment),
    i.e. spherical k-means by gradient descent (official: Adam, lr 5e-3). Prediction: argmax. With
    hard assignment a centroid that wins no pixel gets no gradient and stays where it is (a "dead"
    cluster); the random-normal start is the official one, :meth:`from_kmeans` gives a data start.

    Args:
        dim: feature width D.
        n_clusters: number of centroids (>= number of classes).
    """

    def __init__(self, dim: int, n_clusters: int):
        super().__init__()
        self.centroids = nn.Parameter(torch.randn(n_clusters, dim))

    def forward(self, s: Tensor) -> Tensor:
        """(B, D, h, w) features -> (B, K, h, w) cosine scores (inputs are detached)."""
        return torch.einsum("bdhw,kd->bkhw", F.normalize(s.detach(), dim=1), F.normalize(self.centroids, dim=1))

    def loss(self, s: Tensor) -> Tensor:
        """Scalar: ``-mean_pixels max_k cos(s, mu_k)``."""
        return -self(s).amax(dim=1).mean()

    @torch.no_grad()
    def predict(self, s: Tensor) -> Tensor:
        """(B, D, h, w) -> (B, h, w) cluster ids."""
        return self(s).argmax(dim=1)

    @staticmethod
    def crf_logits(scores: Tensor, alpha: float = 2.0) -> Tensor:
        """Cosine scores (B, K, ...) -> the CRF's class logits ``alpha * cosine``: the CRF's unary is
        ``-log softmax`` of them. alpha = 2 sharpens cosines in [-1, 1] as STEGO and HP do."""
        return alpha * scores

    @classmethod
    def from_kmeans(cls, features: Tensor, n_clusters: int, *, seed: int = 0, restarts: int = 1,
                    progress: bool = False) -> "ClusterProbe":
        """A probe whose centroids are :func:`fit_kmeans` of (N, D) features (the k-means baseline)."""
        probe = cls(features.shape[1], n_clusters)
        with torch.no_grad():
            probe.centroids.copy_(fit_kmeans(features, n_clusters, seed=seed, restarts=restarts, progress=progress))
        return probe


def fit_kmeans(features: Tensor, k: int, *, seed: int = 0, iterations: int = 50, restarts: int = 1,
               progress: bool = False) -> Tensor:
    """k-means on L2-normalised rows with ``scipy.cluster.vq.kmeans2`` (k-means++ initialisation).

    Args:
        features: (N, D) features.
        k: number of clusters.
        restarts: runs from different k-means++ draws (``seed``, ``seed + 1``, ...); the one with the
            lowest inertia (sum of squared distances to the nearest centroid) is kept, as
            scikit-learn's ``n_init``. Single runs vary a lot on hard data.
        progress: show a progress bar over the restarts.

    Returns:
        (k, D) float32 centroids (cosine scoring with :class:`ClusterProbe` normalises them).
    """
    if features.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} feature rows, got {features.shape[0]}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    data = F.normalize(features.detach().float(), dim=1).cpu().numpy().astype(np.float64)
    best, best_inertia = None, np.inf
    for run in tqdm(range(restarts), desc=f"k-means (k={k})", disable=not progress, leave=False):
        centroids, _ = kmeans2(data, k, iter=iterations, minit="++", seed=np.random.default_rng(seed + run))
        inertia = float(np.square(vq(data, centroids, check_finite=False)[1]).sum()) if restarts > 1 else 0.0
        if inertia < best_inertia:
            best, best_inertia = centroids, inertia
    return torch.from_numpy(best).float()


class LinearProbe(nn.Module):
    """A 1x1 convolution D -> n_classes trained with cross-entropy on detached features.

    Logits are bilinearly upsampled to the label resolution; labels outside ``[0, n_classes)`` (-1,
    255, ...) are ignored. Official: Adam, lr 1e-3.
    """

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.n_classes = n_classes
        self.conv = nn.Conv2d(dim, n_classes, 1)

    def forward(self, s: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """(B, D, h, w) -> (B, n_classes, *size) logits (``size`` defaults to (h, w))."""
        logits = self.conv(s.detach())
        if size is not None and tuple(size) != tuple(logits.shape[-2:]):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def loss(self, s: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy against (B, H, W) labels, invalid labels ignored."""
        labels = labels.long()
        target = torch.where((labels >= 0) & (labels < self.n_classes), labels, -100)
        return F.cross_entropy(self(s, tuple(labels.shape[-2:])), target, ignore_index=-100)

    @torch.no_grad()
    def predict(self, s: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """(B, D, h, w) -> (B, *size) class ids."""
        return self(s, size).argmax(dim=1)
