"""Global hidden positives as numbers: precision of positive sets against labels, positives per anchor
against pool size, symmetric-only pairs, and a task-agnostic pool that remembers where each patch came
from (:func:`sample_pool`). Pure computations on tensors; the pictures are in :mod:`hpkit.lessons.explorer`.

Rows are image-major as everywhere in hpkit: row ``b * P + y * w + x`` is patch ``(y, x)`` of image ``b``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from hpkit._util import to_uint8
from hpkit.method.global_positives import criterion, positive_mask
from hpkit.method.heads import to_rows
from hpkit.method.local_positives import local_weights, neighbour_index
from hpkit.method.pools import sample_patches
from hpkit.pipeline.checkpoint import load_run
from hpkit.pipeline.datasets import build_dataset
from hpkit.pipeline.evaluate import feature_batches

__all__ = ["run_positive_diagnostics", "patch_labels", "positive_precision", "positive_stats", "positives_vs_pool_size", "label_base_rate", "symmetric_only_pairs", "find_symmetric_pair", "locate_patches", "PatchPool", "batch_features", "sample_pool", "patch_crop"]


def patch_labels(labels: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, H, W) pixel labels -> (B, h, w) the label at each patch's centre pixel."""
    h, w = grid
    ph, pw = labels.shape[-2] // h, labels.shape[-1] // w
    return labels[:, ph // 2::ph, pw // 2::pw][:, :h, :w]



# --------------------------------------------------------------------------------------------------
# pure computations
# --------------------------------------------------------------------------------------------------

def positive_precision(mask: Tensor, anchor_labels: Tensor, labels: Tensor, *, ignore_index: int = -1) -> Tensor:
    """Per-anchor precision of a positive set against patch labels.

    Positives whose label is ``ignore_index`` are left out of the count; an anchor with an ignored
    label, or without any counted positive, gets NaN.

    Args:
        mask: (n, N) bool, ``mask[r, j]`` = patch ``j`` is a positive of anchor ``r``.
        anchor_labels: (n,) labels of the anchors.
        labels: (N,) labels of all patches.

    Returns:
        (n,) float: (positives with the anchor's label) / (positives with a valid label).
    """
    if mask.dim() != 2 or mask.shape != (anchor_labels.shape[0], labels.shape[0]):
        raise ValueError(f"mask must be (n, N) = ({anchor_labels.shape[0]}, {labels.shape[0]}) for "
                         f"{anchor_labels.shape[0]} anchors and {labels.shape[0]} patches, got {tuple(mask.shape)}")
    valid = mask & (labels != ignore_index)[None, :]
    same = valid & (labels[None, :] == anchor_labels[:, None])
    counted = valid.sum(1).double()
    out = same.sum(1).double() / counted
    out[(counted == 0) | (anchor_labels == ignore_index)] = float("nan")
    return out


def positive_stats(x: Tensor, c: Tensor, labels: Tensor, *, symmetric: bool = True, chunk_size: int = 1024,
                   ignore_index: int = -1) -> dict[str, Tensor]:
    """Per-anchor counts of the GHP set (Eq. 3 / 4) and of its correct members, without the (N, N) mask.

    Args:
        x: (N, d) L2-normalised features; c: (N,) their criteria (Eq. 2); labels: (N,) patch labels.

    Returns:
        ``count`` (N,) positives per anchor, ``counted`` (N,) those with a valid label, ``correct``
        (N,) those with the anchor's label (all int64).
    """
    out = {"count": [], "counted": [], "correct": []}
    valid = labels != ignore_index
    for start in range(0, x.shape[0], chunk_size):
        rows = slice(start, min(start + chunk_size, x.shape[0]))
        mask = positive_mask(x[rows], x, c[rows], c, row_offset=start, symmetric=symmetric)
        good = mask & valid[None, :]
        out["count"].append(mask.sum(1))
        out["counted"].append(good.sum(1))
        correct = (good & (labels[None, :] == labels[rows, None])).sum(1)
        out["correct"].append(torch.where(valid[rows], correct, torch.zeros_like(correct)))
    return {k: torch.cat(v) for k, v in out.items()}


def _summarise(stats: dict[str, Tensor], labels: Tensor, ignore_index: int = -1) -> dict[str, float]:
    """Scalars of :func:`positive_stats`: mean positives per anchor, micro / macro precision, coverage."""
    valid = labels != ignore_index
    counted = stats["counted"][valid].double()
    correct = stats["correct"][valid].double()
    has = counted > 0
    return {
        "positives_per_anchor": float(stats["count"].double().mean()),
        "precision": float(correct.sum() / counted.sum()) if counted.sum() > 0 else float("nan"),
        "anchor_precision": float((correct[has] / counted[has]).mean()) if has.any() else float("nan"),
        "with_positive": float((stats["count"] > 0).double().mean()),
    }


def positives_vs_pool_size(x: Tensor, bank: Tensor, sizes: Sequence[int], labels: Tensor, *,
                           symmetric: bool = True, chunk_size: int = 1024,
                           ignore_index: int = -1) -> dict[str, list[float]]:
    """How the GHP sets of a mini-batch change with the pool size M (the argument of Fig. 6a).

    The pool of size ``m`` is the first ``m`` rows of ``bank`` (so the pools are nested and every
    criterion ``c_i`` can only grow with M); shuffle the bank first for random pools.

    Args:
        x: (N, d) L2-normalised anchor features of the mini-batch.
        bank: (K, d) pool candidates (normalised here), K >= max(sizes).
        sizes: pool sizes M to try.
        labels: (N,) patch labels of the anchors (``ignore_index`` = unlabelled).

    Returns:
        lists over ``sizes``: ``size``, ``criterion`` (mean c_i), ``positives_per_anchor``,
        ``precision`` (correct / counted positives over the batch), ``anchor_precision`` (mean over
        anchors with positives), ``with_positive`` (fraction of anchors with at least one positive).
    """
    if max(sizes) > bank.shape[0]:
        raise ValueError(f"pool size {max(sizes)} exceeds the {bank.shape[0]} rows of the bank: lower the sizes "
                         "or collect the bank from more images")
    bank = F.normalize(bank.to(x.dtype), dim=1)
    out: dict[str, list[float]] = {"size": [], "criterion": []}
    for m in sizes:
        c = criterion(x, bank[:m])
        summary = _summarise(positive_stats(x, c, labels, symmetric=symmetric, chunk_size=chunk_size,
                                            ignore_index=ignore_index), labels, ignore_index)
        out["size"].append(int(m))
        out["criterion"].append(float(c.double().mean()))
        for k, v in summary.items():
            out.setdefault(k, []).append(v)
    return out


def label_base_rate(labels: Tensor, *, ignore_index: int = -1) -> float:
    """Precision of the trivial positive set "every other patch": the fraction of ordered pairs
    ``(i, j)``, ``i != j``, of labelled patches that share a label. labels: (N,)."""
    valid = labels[labels != ignore_index]
    n = valid.numel()
    if n < 2:
        return float("nan")
    counts = torch.bincount(valid).double()
    return float((counts * (counts - 1)).sum() / (n * (n - 1)))


def symmetric_only_pairs(x: Tensor, c: Tensor) -> Tensor:
    """Pairs that only the symmetric rule (Eq. 3) makes positive.

    Returns:
        (K, 2) int64 ``(i, j)`` with ``<x_i, x_j> > c_j`` but ``<x_i, x_j> <= c_i``: ``j`` is a
        positive of anchor ``i`` only because ``i`` is close enough to ``j`` by ``j``'s criterion.
    """
    sim = x @ x.T
    only = (sim > c[None, :]) & ~(sim > c[:, None])
    only.fill_diagonal_(False)
    return only.nonzero()


def find_symmetric_pair(x: Tensor, c: Tensor, labels: Tensor | None = None, *,
                        patches_per_image: int | None = None) -> dict | None:
    """One pair where the symmetric rule matters, for showing.

    Preference: the two patches share a (valid) label, come from different images
    (``patches_per_image`` given), and the margin ``sim - c_j`` is largest.

    Returns:
        ``{"i", "j", "sim", "c_i", "c_j", "same_label"}`` or None when the non-symmetric rule already
        gives the same sets.
    """
    pairs = symmetric_only_pairs(x, c)
    if pairs.shape[0] == 0:
        return None
    i, j = pairs[:, 0], pairs[:, 1]
    sim = (x[i] * x[j]).sum(1)
    score = (sim - c[j]).double()
    rank = torch.zeros_like(score)
    if labels is not None:
        rank += 2.0 * ((labels[i] == labels[j]) & (labels[i] >= 0)).double()
    if patches_per_image:
        rank += 1.0 * (i // patches_per_image != j // patches_per_image).double()
    best = int(torch.argmax(rank * 10.0 + score))  # rank first (margins are < 2), then margin
    bi, bj = int(i[best]), int(j[best])
    return {"i": bi, "j": bj, "sim": float(sim[best]), "c_i": float(c[bi]), "c_j": float(c[bj]),
            "same_label": None if labels is None else bool(labels[bi] == labels[bj])}


def locate_patches(feats: Tensor, rows: Tensor) -> Tensor:
    """Which patch of each image a feature row came from (e.g. the draw of :func:`sample_patches`).

    Args:
        feats: (B, C, h, w) backbone features; rows: (B, C) one row taken from each image.

    Returns:
        (B,) patch index ``y * w + x`` (the closest patch; exact for rows copied from ``feats``).
    """
    if rows.shape != feats.shape[:2]:
        raise ValueError(f"rows must be (B, C) = {tuple(feats.shape[:2])}, one per image, got {tuple(rows.shape)}")
    flat = feats.flatten(2)  # (B, C, P)
    return (flat - rows[:, :, None]).pow(2).sum(1).argmin(1)


# --------------------------------------------------------------------------------------------------
# data helpers
# --------------------------------------------------------------------------------------------------

@dataclass
class PatchPool:
    """A task-agnostic reference pool that remembers where each patch came from.

    Attributes:
        bank: (M, C) raw backbone features, one random patch per image (what ``Q^ag`` normalises).
        image_index: (M,) dataset index of each patch's image.
        position: (M,) patch index ``y * w + x`` in that image.
        labels: (M,) label at the patch centre (-1 where unlabelled).
        crops: (M, S, S, 3) uint8 picture of each patch with context (see :func:`patch_crop`).
        grid: (h, w) patch grid; patch_size, context: pixels.
    """

    bank: Tensor
    image_index: Tensor
    position: Tensor
    labels: Tensor
    crops: np.ndarray
    grid: tuple[int, int]
    patch_size: int
    context: int

    @property
    def agnostic(self) -> Tensor:
        """(M, C) L2-normalised ``Q^ag``."""
        return F.normalize(self.bank.float(), dim=1)


@torch.no_grad()
def batch_features(backbone, data: Dataset, count: int, *, start: int = 0,
                   batch_size: int = 16) -> dict[str, Tensor]:
    """Images, labels and backbone features of ``data[start : start + count]`` (all returned on the CPU).

    The backbone runs on its own device. Returns ``images`` (B, 3, H, W), ``labels`` (B, H, W) and
    ``feats`` (B, C, h, w).
    """
    if start + count > len(data):
        raise ValueError(f"asked for images {start}..{start + count - 1} but the dataset has {len(data)}: "
                         "lower the count")
    out: dict[str, list[Tensor]] = {"images": [], "labels": [], "feats": []}
    for images, labels, feats, _ in feature_batches(backbone, data, range(start, start + count), batch_size=batch_size):
        out["images"].append(images.cpu())
        out["labels"].append(labels)
        out["feats"].append(feats.float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def sample_pool(backbone, data: Dataset, size: int, *, generator: torch.Generator | None = None,
                context: int = 8, batch_size: int = 16) -> PatchPool:
    """``Q^ag`` from the first ``size`` images of ``data``: one random patch per image (section 3.2).

    The draw is :func:`hpkit.method.pools.sample_patches`, batch by batch as in
    :func:`hpkit.method.pools.collect_patch_bank`; the patch positions are recovered with
    :func:`locate_patches` so that the pool can be shown as image crops.
    """
    if size > len(data):
        raise ValueError(f"pool size M={size} is larger than the {len(data)} images of the dataset: lower M")
    rows, positions, labels, crops = [], [], [], []
    grid = (0, 0)
    for images, batch_labels, feats, _ in feature_batches(backbone, data, size, batch_size=batch_size):
        images, feats = images.cpu(), feats.float().cpu()
        grid = tuple(feats.shape[-2:])
        bank = sample_patches(feats, generator=generator)
        pos = locate_patches(feats, bank)
        lab = patch_labels(batch_labels, grid).flatten(1)
        rows.append(bank)
        positions.append(pos)
        labels.append(lab.gather(1, pos[:, None])[:, 0])
        crops += [to_uint8(patch_crop(img, int(p) // grid[1], int(p) % grid[1], backbone.patch_size, context))
                  for img, p in zip(images, pos)]
    return PatchPool(torch.cat(rows), torch.arange(size), torch.cat(positions), torch.cat(labels), np.stack(crops),
                     grid, backbone.patch_size, context)


def _hwc(image) -> np.ndarray:
    """(3, H, W) tensor / (H, W, 3) array -> (H, W, 3) float array in [0, 1]."""
    image = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)
    if image.dtype == np.uint8:
        image = image / 255.0
    return image.astype(np.float32)


def patch_crop(image, y: int, x: int, patch_size: int, context: int = 8) -> np.ndarray:
    """The patch ``(y, x)`` with ``context`` pixels around it (grey outside the image).

    Args:
        image: (3, H, W) tensor or (H, W, 3) array in [0, 1].

    Returns:
        (S, S, 3) float array, S = patch_size + 2 * context; the patch is at ``[context:context+patch_size]``.
    """
    img = _hwc(image)
    padded = np.pad(img, ((context, context), (context, context), (0, 0)), constant_values=0.5)
    top, left = y * patch_size, x * patch_size
    size = patch_size + 2 * context
    return padded[top:top + size, left:left + size]


@torch.no_grad()
def run_positive_diagnostics(run, *, max_images: int = 8, device: str = "cpu") -> dict[str, float]:
    """How good a trained run's positives are, measured against the labels on its validation images.

    For the first ``max_images`` validation images (every patch an anchor):

    - ``ag_precision`` / ``sp_precision``: the share of an anchor's task-agnostic (Eq. 3, from the frozen
      f and Q^ag) / task-specific (Eq. 4, from the run's S' and Q^sp) positives with the anchor's label,
      over the anchors that have one (unlabelled patches count neither as anchors nor as positives);
      ``ag_positives`` / ``sp_positives``: positives per anchor;
    - ``lhp_precision``: the share of the neighbours LHP keeps (Eq. 7) with the anchor's label, the
      anchor itself left out; ``neighbour_base_rate``: the same share over all 8 neighbours (what
      keeping neighbours at random would give);
    - ``label_base_rate``: the same-label share of random patch pairs (what a random positive would give).

    Args:
        run: a run folder written by :func:`hpkit.train`.
    """
    trained = load_run(run, device=device)
    loss = trained.cfg.loss
    batch = [(labels, feats.float(), attn) for _, labels, feats, attn in
             feature_batches(trained.backbone, build_dataset(trained.cfg, "val"), max_images, attention=True)]
    labels, feats, attn = (torch.cat(parts) for parts in zip(*batch))
    grid = tuple(feats.shape[-2:])
    label_map = patch_labels(labels.to(feats.device), grid)  # (B, h, w)
    flat = label_map.reshape(-1)
    out = {"label_base_rate": label_base_rate(flat)}
    sets = {"ag": (F.normalize(to_rows(feats), dim=1), trained.pools.agnostic.to(feats.device)),
            "sp": (F.normalize(to_rows(trained.ema(feats)), dim=1), trained.pools.specific.to(feats.device))}
    for name, (x, pool) in sets.items():
        c = criterion(x, pool)  # Eq. 2
        mask = positive_mask(x, x, c, c, symmetric=loss.symmetric)  # Eq. 3 / 4
        precision = positive_precision(mask, flat, flat)
        out[f"{name}_precision"] = float(precision[~precision.isnan()].mean())
        out[f"{name}_positives"] = float(mask.sum(1).double().mean())
    weights = local_weights(attn, grid, sigma=loss.sigma, style=loss.style)  # (B, 9, h, w), 0 = not kept
    index, inside = neighbour_index(*grid, device=label_map.device)  # (P, 9), the weights' order
    rows = label_map.flatten(1)  # (B, P)
    neighbours, centre = rows[:, index], rows[:, :, None]  # (B, P, 9), (B, P, 1)
    valid = inside & (centre >= 0) & (neighbours >= 0)
    valid[:, :, 4] = False  # the anchor itself
    same = neighbours == centre
    kept = valid & (weights.flatten(2).transpose(1, 2) > 0)
    out["lhp_precision"] = float(same[kept].double().mean()) if kept.any() else float("nan")
    out["neighbour_base_rate"] = float(same[valid].double().mean())
    return out
