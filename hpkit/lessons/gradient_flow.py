"""Where one anchor's loss sends its gradient, with and without LHP (section 3.4, Fig. 3, Table 5).

Without LHP the anchor term ``Phi_i = L^cont(z_i, P_i, N_i)`` (Eq. 5-6) reads only ``s_i``, so on the
anchor's side its gradient reaches the segmentation features of patch ``i`` alone. With LHP the extra
term ``Psi_i = L^cont(z_mix_i, P_i, N_i)`` (Eq. 10) reads ``s_mix_i = sum_k w_ik s_k`` (Eq. 9, the
weights of :func:`hpkit.method.local_positives.local_weights`, constants), so by the chain rule::

    dPsi_i / ds_k = w_ik * dPsi_i / ds_mix_i      ->      ||dPsi_i / ds_k|| = w_ik * ||dPsi_i / ds_mix_i||

every selected neighbour ``k`` receives the anchor's gradient in proportion to its weight, and the
others receive none (gradient propagation). The contrast targets ``z_p``, ``z_n`` (positives and
negatives, Eq. 5) are treated as constants here: in training they receive gradient too, but as
targets of *other* anchors' terms, not through the anchor's mixing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from hpkit.method.global_positives import criterion, positive_mask
from hpkit.method.heads import to_rows
from hpkit.method.local_positives import NEIGHBOUR_OFFSETS, local_weights, mix_neighbours
from hpkit.method.pools import sample_patches
from hpkit.method.reference import contrastive_loss

__all__ = ["anchor_contrastive_loss", "patch_gradient_norms", "GradientFlow", "anchor_gradient_flow"]

_VIEWS = ("clean", "mix", "both")


def anchor_contrastive_loss(z_anchor: Tensor, z: Tensor, positives: Tensor, negatives: Tensor, tau: float) -> Tensor:
    """Eq. 5 for one anchor: ``-1/|P| sum_{p in P} log softmax_{N u P}(<z_anchor, z_.> / tau)_p``
    (:func:`hpkit.method.reference.contrastive_loss` with one anchor row).

    Args:
        z_anchor: (D,) or (1, D) L2-normalised anchor projection (``z_i`` or ``z_mix_i``).
        z: (N, D) L2-normalised projections of the mini-batch (the contrast targets).
        positives: (N,) bool positive set ``P``; negatives: (N,) bool negative set ``N``.
        tau: temperature.

    Returns:
        scalar loss, differentiable in ``z_anchor`` (and in ``z`` if it requires grad).
    """
    if positives.shape != negatives.shape or positives.shape[0] != z.shape[0]:
        raise ValueError(f"positives {tuple(positives.shape)} and negatives {tuple(negatives.shape)} must both "
                         f"be ({z.shape[0]},) bool masks over the rows of z")
    if not bool(positives.any()):
        raise ValueError("the anchor has no positive, so Eq. 5 is undefined; pick another anchor or a larger pool")
    return contrastive_loss(z_anchor.reshape(1, -1), z, positives[None], negatives[None], tau)[0]


def patch_gradient_norms(
    s: Tensor,
    anchor: tuple[int, int, int],
    loss_fn: Callable[[Tensor], Tensor],
    *,
    weights: Tensor | None = None,
    proj: Callable[[Tensor], Tensor] | None = None,
    views: str = "clean",
) -> Tensor:
    """Per-patch norm ``||dL / ds_j||`` of one anchor's loss with respect to the segmentation features.

    Args:
        s: (B, D, h, w) segmentation features; a detached copy is the leaf of the graph.
        anchor: ``(b, y, x)`` the anchor patch.
        loss_fn: maps the anchor's (1, D') vector to a scalar (e.g. :func:`anchor_contrastive_loss`).
        weights: (B, 9, h, w) LHP weights (:func:`hpkit.method.local_positives.local_weights`); needed for
            ``views="mix"`` and ``"both"``.
        proj: optional map (1, D) -> (1, D') applied to the anchor vector first (the projection head Z).
        views: ``"clean"``: L = loss_fn(Z(s_i)) (Phi, no LHP); ``"mix"``: L = loss_fn(Z(s_mix_i)) (Psi);
            ``"both"``: the sum of the two (Phi + Psi, HP with LHP).

    Returns:
        (B, h, w) gradient norms over the D channels, for every patch of every image.
    """
    if views not in _VIEWS:
        raise ValueError(f"views must be one of {_VIEWS}, got {views!r}")
    if s.dim() != 4:
        raise ValueError(f"s must be (B, D, h, w), got shape {tuple(s.shape)}")
    b, y, x = anchor
    if not (0 <= b < s.shape[0] and 0 <= y < s.shape[2] and 0 <= x < s.shape[3]):
        raise ValueError(f"anchor {anchor} lies outside s of shape {tuple(s.shape)} (b, y, x are 0-based)")
    if views != "clean" and weights is None:
        raise ValueError(f"views={views!r} mixes the neighbours and needs weights=local_weights(attn, grid)")
    leaf = s.detach().clone().requires_grad_(True)
    project = proj if proj is not None else (lambda v: v)
    loss = leaf.new_zeros(())
    if views in ("clean", "both"):
        loss = loss + loss_fn(project(leaf[b, :, y, x][None]))
    if views in ("mix", "both"):
        mixed = mix_neighbours(leaf, weights.to(leaf.device))
        loss = loss + loss_fn(project(mixed[b, :, y, x][None]))
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad.norm(dim=1)


@dataclass
class GradientFlow:
    """What :func:`anchor_gradient_flow` measured for one anchor (maps on the anchor's image)."""

    anchor: tuple[int, int, int]
    weights: Tensor  # (9,) the anchor's LHP weights in neighbour order k (0 = not selected)
    phi: Tensor  # (h, w) ||dPhi_i / ds_j||: the anchor term without LHP
    psi: Tensor  # (h, w) ||dPsi_i / ds_j||: the LHP term alone
    total: Tensor  # (h, w) ||d(Phi_i + Psi_i) / ds_j||: HP with LHP
    mix_grad_norm: float  # ||dPsi_i / ds_mix_i||
    losses: dict[str, float] = field(default_factory=dict)  # {"phi": ..., "psi": ...}
    positives: int = 0
    negatives: int = 0

    def neighbour_rows(self) -> list[dict]:
        """One row per in-grid neighbour ``k``: offset, weight, measured ``||dPsi/ds_k||`` and the
        chain-rule prediction ``w_ik * ||dPsi/ds_mix_i||``."""
        _, y, x = self.anchor
        h, w = self.psi.shape
        rows = []
        for k, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
            ny, nx = y + dy, x + dx
            if 0 <= ny < h and 0 <= nx < w:
                weight = float(self.weights[k])
                rows.append({"k": k, "offset": (dy, dx), "weight": weight, "grad_norm": float(self.psi[ny, nx]),
                             "predicted": weight * self.mix_grad_norm})
        return rows


def anchor_gradient_flow(
    feats: Tensor,
    attn_logits: Tensor,
    head: Callable[[Tensor], Tensor],
    proj: Callable[[Tensor], Tensor],
    anchor: tuple[int, int, int],
    *,
    tau: float,
    rho: float,
    pool: Tensor | None = None,
    sigma: float | None = None,
    style: str = "paper",
    generator: torch.Generator | None = None,
) -> GradientFlow:
    """Gradient maps of one anchor's task-agnostic HP terms, without and with LHP.

    The anchor's positives are its task-agnostic global hidden positives (Eq. 2-3, backbone
    features against ``pool``), its negatives a random ``rho`` share of the other patches (section
    3.3); the contrast targets ``z = Z(S(f))`` are constants (see the module docstring).

    Args:
        feats: (B, C, h, w) backbone features; attn_logits: (B, heads, P, P) last-block logits.
        head: segmentation head S ((B, C, h, w) -> (B, D, h, w)); proj: projection head Z ((n, D) -> (n, D)).
        anchor: ``(b, y, x)``.
        tau, rho: temperature and random-negative rate of the configuration.
        pool: (M, C) L2-normalised task-agnostic pool ``Q^ag``; ``None``: one random patch per image
            of ``feats`` (how ``Q^ag`` is built, here from the batch itself).
        sigma, style: LHP scale and style (:func:`hpkit.method.local_positives.local_weights`).
        generator: random generator for the pool and the negatives (reproducible with a seed).

    Returns:
        a :class:`GradientFlow`.
    """
    b, y, x = anchor
    h, w = feats.shape[-2:]
    i = b * h * w + y * w + x
    with torch.no_grad():
        f = F.normalize(to_rows(feats.float()), dim=1)
        if pool is None:
            pool = F.normalize(sample_patches(feats.float(), generator=generator), dim=1)
        c = criterion(f, pool)
        positives = positive_mask(f[i:i + 1], f, c[i:i + 1], c, row_offset=i)[0]
        negatives = torch.rand(f.shape[0], generator=generator).to(f.device) < rho
        negatives &= ~positives
        negatives[i] = False
        s = head(feats.float())
        z = proj(to_rows(s))
        weights = local_weights(attn_logits, (h, w), sigma=sigma, style=style)

    def loss_fn(z_anchor: Tensor) -> Tensor:
        return anchor_contrastive_loss(z_anchor, z, positives, negatives, tau)

    maps = {v: patch_gradient_norms(s, anchor, loss_fn, weights=weights, proj=proj, views=v)[b]
            for v in _VIEWS}
    s_mix = mix_neighbours(s, weights)[b, :, y, x][None].detach().requires_grad_(True)
    psi = loss_fn(proj(s_mix))
    (g_mix,) = torch.autograd.grad(psi, s_mix)
    with torch.no_grad():
        phi = loss_fn(proj(s[b, :, y, x][None]))
    return GradientFlow(anchor=anchor, weights=weights[b, :, y, x].detach(), phi=maps["clean"], psi=maps["mix"],
                        total=maps["both"], mix_grad_norm=float(g_mix.norm()),
                        losses={"phi": float(phi), "psi": float(psi.detach())}, positives=int(positives.sum()),
                        negatives=int(negatives.sum()))
