"""The objectives' losses, one function each: image-level DINO (:func:`dino_loss`), patch-level DINO
(:func:`dense_dino_loss`), within-image dense VICReg (:func:`dense_vicreg_loss`, with
:func:`vicreg_terms`), region contrast (:func:`region_contrast_loss`) and the structure-keeping term
(:func:`similarity_keep_loss`). Pure functions of tensors: the loop (:mod:`.objectives`) feeds them."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpkit.backbones.pretrain.geometry import correspondence, neighbour_points

__all__ = ["dino_loss", "dense_dino_loss", "vicreg_terms", "dense_vicreg_loss", "similarity_keep_loss",
           "region_contrast_loss"]


def dino_loss(student_out: Tensor, teacher_out: Tensor, center: Tensor, student_temp: float,
              teacher_temp: float, n_global: int = 2) -> Tensor:
    """DINO's cross-entropy between the centred, sharpened teacher and the student, over crop pairs.

    Args:
        student_out: (n_crops * B, K) student logits, crop-major (global crops first).
        teacher_out: (n_global * B, K) teacher logits of the global crops.
        center: (1, K) running mean of the teacher logits.

    Returns:
        scalar: mean over pairs (teacher crop i, student crop v != i) of
        ``mean_b sum_k -softmax((t - c) / teacher_temp) * log_softmax(s / student_temp)``.
    """
    n_crops = student_out.shape[0] // (teacher_out.shape[0] // n_global)
    student = (student_out / student_temp).chunk(n_crops)
    teacher = F.softmax((teacher_out - center) / teacher_temp, dim=-1).detach().chunk(n_global)
    total, pairs = student_out.new_zeros(()), 0
    for i, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == i:
                continue  # never the same view
            total = total + torch.sum(-t * F.log_softmax(s, dim=-1), dim=-1).mean()
            pairs += 1
    return total / pairs


def dense_dino_loss(student_patches: Sequence[Tensor], teacher_patches: Sequence[Tensor], boxes: Tensor,
                    center: Tensor, student_temp: float, teacher_temp: float) -> Tensor:
    """Patch-level DINO: each student patch predicts the teacher's patch at the same image point.

    Args:
        student_patches: per crop, (B, g_v, g_v, K) student patch logits (global crops first).
        teacher_patches: per global crop, (B, g_t, g_t, K) teacher patch logits.
        boxes: (n_crops, B, 5) the crops' boxes (:class:`MultiCrop` with ``boxes=True``).
        center: (1, K) running mean of the teacher patch logits.

    Returns:
        scalar: mean over pairs (teacher global crop t, student crop v != t) of the mean over the
        student patches whose centre lies in crop t of ``sum_k -softmax((q - c) / teacher_temp) *
        log_softmax(s / student_temp)``, with q the teacher logits of the patch containing that point.
    """
    total, pairs = center.new_zeros(()), 0
    for t, teacher in enumerate(teacher_patches):
        target = F.softmax((teacher - center) / teacher_temp, dim=-1).detach().permute(0, 3, 1, 2)  # (B, K, g, g)
        for v, student in enumerate(student_patches):
            if v == t:
                continue
            points, inside = correspondence(boxes[v], boxes[t], student.shape[1])
            if not inside.any():
                continue
            q = F.grid_sample(target, points.to(target.dtype), mode="nearest", align_corners=False)
            ce = torch.sum(-q.permute(0, 2, 3, 1) * F.log_softmax(student / student_temp, dim=-1), dim=-1)
            total = total + ce[inside].mean()
            pairs += 1
    return total / max(pairs, 1)


def _std_hinge(var: Tensor) -> Tensor:
    """VICReg's variance hinge: mean of ``relu(1 - sqrt(var + 1e-4))`` over the given variances."""
    return F.relu(1 - torch.sqrt(var + 1e-4)).mean()


def vicreg_terms(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """VICReg's three terms (Bardes et al., ICLR 2022) for paired rows a, b (N, D): mean squared
    distance, mean over both of ``relu(1 - std)`` per dimension, and the sum over both of the squared
    off-diagonal covariances divided by D."""
    invariance = F.mse_loss(a, b)
    variance = a.new_zeros(())
    covariance = a.new_zeros(())
    for z in (a, b):
        variance = variance + _std_hinge(z.var(dim=0))
        z = z - z.mean(dim=0)
        cov = (z.T @ z) / (len(z) - 1)
        covariance = covariance + (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / z.shape[1]
    return invariance, variance, covariance


def dense_vicreg_loss(expanded: Sequence[Tensor], boxes: Tensor, radius: tuple[float, float],
                      weights: tuple[float, float, float], generator: torch.Generator,
                      max_pairs: int = 2048) -> Tensor:
    """Within-image dense VICReg between the two global crops.

    Args:
        expanded: the two global crops' expanded patch tokens, each (B, g, g, D).
        boxes: (2, B, 5) their boxes (:class:`MultiCrop` with ``boxes=True``).
        radius: (min, max) distance in patches between paired points (:func:`neighbour_points`).
        weights: (invariance, variance, covariance) weights (VICReg: 25, 25, 1).
        max_pairs: pairs per direction, drawn at random (bounds the D x D covariance cost).

    Returns:
        scalar: ``w_v * within + mean over the 2 directions of (w_i * inv + w_v * var + w_c * cov)``,
        where ``within`` is the mean over images and crops of ``relu(1 - std)`` per dimension over
        the image's patches, and inv/var/cov are :func:`vicreg_terms` of each patch of one crop and
        the patch at a neighbouring image point (nearest patch) in the other crop.
    """
    w_inv, w_var, w_cov = weights
    within = sum(_std_hinge(z.flatten(1, 2).var(dim=1)) for z in expanded)
    total = w_var * within / len(expanded)
    for v, t in ((0, 1), (1, 0)):
        points, _ = correspondence(boxes[v], boxes[t], expanded[v].shape[1])
        points, inside = neighbour_points(points, expanded[t].shape[1], radius, generator)
        target = F.grid_sample(expanded[t].permute(0, 3, 1, 2), points.to(expanded[t].dtype), mode="nearest",
                               align_corners=False).permute(0, 2, 3, 1)
        a, b = expanded[v][inside], target[inside]
        pick = torch.randperm(len(a), generator=generator)[:max_pairs].to(a.device)
        inv, var, cov = vicreg_terms(a[pick], b[pick])
        total = total + (w_inv * inv + w_var * var + w_cov * cov) / 2
    return total


def similarity_keep_loss(patches: Sequence[Tensor], reference: Sequence[Tensor], samples: int,
                         generator: torch.Generator) -> Tensor:
    """How far the patch tokens' cosine-similarity structure moved from a reference network's.

    Args:
        patches: per crop the trained network's patch tokens (B, g, g, C).
        reference: the same crops' patch tokens under the reference network (B, g, g, C').
        samples: tokens drawn at random (without replacement) from each crop's B * g * g.

    Returns:
        scalar: mean over crops of the mean over the samples x samples pairs of
        ``(cos(z_i, z_j) - cos(r_i, r_j)) ** 2``.
    """
    total = patches[0].new_zeros(())
    for z, r in zip(patches, reference):
        z, r = z.reshape(-1, z.shape[-1]), r.reshape(-1, r.shape[-1])
        pick = torch.randperm(len(z), generator=generator)[:samples].to(z.device)
        z, r = F.normalize(z[pick], dim=1), F.normalize(r[pick], dim=1)
        total = total + (z @ z.T - r @ r.T).pow(2).mean()
    return total / len(patches)


def region_contrast_loss(global_patches: Sequence[Tensor], global_ids: Sequence[Tensor],
                         local_patches: Sequence[Tensor], local_ids: Tensor, clusters: int, projector: nn.Module,
                         temperature: float) -> Tensor:
    """Region-level contrast between crops (DetCon-style, with local crops).

    Args:
        global_patches: the 2 global crops' patch tokens, each (B, g, g, C).
        global_ids: their patches' region ids (:func:`region_ids`), each (B, g, g).
        local_patches: the local crops' patch tokens, each (B, l, l, C) (may be empty).
        local_ids: (n_local, B) the region under each local crop's centre.
        clusters: regions per image K (ids are in [0, K)).
        projector: (N, C) -> (N, D) (:func:`expander`).

    Returns:
        scalar: NT-Xent over the regions with >= 2 patches in both global crops (a region's embedding
        is the L2-normalised projection of its mean token; its positive is the same region in the
        other crop, its negatives every other region of the batch in both crops), plus the mean over
        (local crop, global crop) of the cross-entropy of each local crop's embedding against all
        regions present in that global crop, the target being its own region (when it has >= 2
        patches there); logits are cosines / ``temperature``. A term with nothing to compare is 0.

    Raises:
        ValueError: neither term has anything to compare (crops too small for ``clusters``).
    """
    embedded, counts = [], []
    for z, ids in zip(global_patches, global_ids):
        onehot = F.one_hot(ids.flatten(1), clusters).to(z.dtype)  # (B, P, K)
        count = onehot.sum(1).flatten()  # (B*K,)
        pooled = torch.einsum("bpk,bpc->bkc", onehot, z.flatten(1, 2)).flatten(0, 1) / count.clamp_min(1)[:, None]
        present = (count > 0).nonzero()[:, 0]
        rows = F.normalize(projector(pooled[present]), dim=1)
        embedded.append(rows.new_zeros(len(count), rows.shape[1]).index_copy(0, present, rows))  # (B*K, D)
        counts.append(count)
    both = (counts[0] >= 2) & (counts[1] >= 2)
    n = int(both.sum())
    pair = torch.cat([embedded[0][both], embedded[1][both]])  # (2n, D)
    logits = (pair @ pair.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=pair.device), -1e9)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(pair.device)
    # No region in both crops (tiny crops, or many regions): the global-global term is 0 this step.
    total = F.cross_entropy(logits, target) if n else pair.sum() * 0.0
    terms = []
    if len(local_patches):
        local = torch.stack([p.mean(dim=(1, 2)) for p in local_patches])  # (L, B, C)
        local = F.normalize(projector(local.flatten(0, 1)), dim=1).view(*local.shape[:2], -1)
        batch = torch.arange(local.shape[1], device=local.device)
        for emb, count in zip(embedded, counts):
            absent = count == 0
            for z, ids in zip(local, local_ids):
                own = batch * clusters + ids.to(local.device)
                ok = count[own] >= 2
                if ok.any():
                    scores = (z[ok] @ emb.T / temperature).masked_fill(absent[None], -1e9)
                    terms.append(F.cross_entropy(scores, own[ok]))
    if terms:
        total = total + torch.stack(terms).mean()
    elif not n:
        raise ValueError(f"region contrast has nothing to compare in this batch: no region has >= 2 patches in "
                         f"both global crops (or, for a local crop, in a global crop). The crops are too small for "
                         f"region_clusters={clusters}: raise global_crop_size or lower region_clusters")
    return total
