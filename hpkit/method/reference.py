"""The HP objective as the paper writes it: Eq. 1-11, one short function per equation.

Read this module next to section 3 of the paper. Everything is a dense (N x N) tensor and autograd finds
the gradients; nothing is chunked or fused, so memory grows as N^2 (fine for reading and testing, a few
thousand patches at most). :func:`hpkit.method.objective.hp_objective` computes the same values and
gradients with the kernels of :mod:`hpkit.method._kernels`; ``hp_objective(..., reference=True)`` calls
:func:`hp_objective` of this module instead, and the tests check that the two agree.

Notation. Rows are image-major: row ``b * P + y * w + x`` is patch (y, x) of image b, ``P = h * w``,
``N = B * P``. Every feature is L2-normalised, so ``sim`` is a dot product.

===========  =============  ===========================================================================
paper        code           shape and meaning
===========  =============  ===========================================================================
f_i          ``f``          (N, C) backbone features (task-agnostic selection, Eq. 2-3)
s'_i         ``s_ema``      (N, D) momentum-head features (task-specific selection, Eq. 4)
z_i          ``z``          (N, D) projections ``Z(S(f_i))`` of the clean view
z_i^mix      ``z_mix``      (N, D) projections ``Z(s_mix_i)`` of the LHP-mixed features (Eq. 9-10)
Q^ag, Q^sp   ``pool_*``     (M, C), (M', D) reference pools
c_i          ``criterion``  (N,) closest-pool similarity (Eq. 2)
P_i          ``positives``  (N, N) bool, row i is the set P_i (P^ag from f, P^sp from s')
R_i, N_i     ``random``,    (N, N) bool: the random sample (rate rho) and the negatives N_i = R_i \\ P_i
             ``negatives``
tau, lam     ``tau, lam``   temperature; weight of the task-specific terms (Eq. 11)
===========  =============  ===========================================================================

Two styles, as in :func:`hp_objective`: ``"paper"`` (:func:`paper_objective`, Eq. 5, 6, 10, 11 as
written) and ``"official"`` (:func:`official_objective`, the official code's ``SupConLoss``, which
departs from the paper in D1, D2, D13 and D17: docs/official-code-differences.md).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hpkit.method._kernels import bernoulli_mask
from hpkit.method.local_positives import attention_scores, neighbour_index

__all__ = [
    "OFFICIAL_BASE_TEMPERATURE",
    "similarity", "self_contrastive_loss",
    "criterion", "global_positives",
    "random_negatives", "negative_set", "contrastive_loss",
    "surrounding_patches", "local_hidden_positives", "mix_local_positives", "local_mix",
    "neighbour_rows", "loss_propagation",
    "paper_branch", "final_objective", "paper_objective",
    "official_pair_average", "official_objective",
    "hp_objective",
]

OFFICIAL_BASE_TEMPERATURE = 0.07
"""SupCon's ``base_temperature``: the official loss is scaled by ``tau / 0.07`` (D1)."""


def _eye(n: int, device: torch.device) -> Tensor:
    return torch.eye(n, dtype=torch.bool, device=device)


def _upcast(x: Tensor) -> Tensor:
    """At least float32 (fp16/bf16 inputs are upcast, float64 stays float64), as the fast path does."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def similarity(x: Tensor, y: Tensor) -> Tensor:
    """``sim(x_i, y_j)`` for every pair: cosine similarity of L2-normalised rows, (n, d), (m, d) -> (n, m)."""
    return x @ y.T


# ---------------------------------------------------------------------------------------------------
# Eq. 1: the plain per-patch contrastive loss (Table 4 (g))


def self_contrastive_loss(z: Tensor, z_aug: Tensor, *, tau: float) -> Tensor:
    """Eq. 1 over both views: ``L_i = -log( exp(sim(z_i, z_j)/tau) / sum_{a in A} exp(sim(z_i, z_a)/tau) )``.

    Each of the 2N rows of ``[z; z_aug]`` is an anchor i; j is the same patch in the other view and A
    every row except i.

    Args:
        z, z_aug: (N, D) projections of two pixel-aligned views.

    Returns:
        scalar, the mean of ``L_i`` over the 2N anchors.
    """
    views = _upcast(torch.cat([z, z_aug]))
    n2 = views.shape[0]
    logits = similarity(views, views) / tau
    others = ~_eye(n2, views.device)  # A: every index except i
    partner = torch.arange(n2, device=views.device).roll(n2 // 2)  # j: row i + N of the other view
    log_denominator = torch.logsumexp(logits.masked_fill(~others, -math.inf), dim=1)
    positive = logits[torch.arange(n2, device=views.device), partner]
    return -(positive - log_denominator).mean()


# ---------------------------------------------------------------------------------------------------
# Eq. 2-4: global hidden positives


def criterion(x: Tensor, pool: Tensor) -> Tensor:
    """Eq. 2: ``c_i = max_{q_m in Q} sim(q_m, x_i)``, the similarity to the closest pool entry.

    With ``(f, Q^ag)`` this is c_i; with ``(s', Q^sp)`` it is c'_i of Eq. 4.

    Args:
        x: (N, d) features; pool: (M, d) reference pool.

    Returns:
        (N,) criteria.
    """
    return similarity(x, pool.to(device=x.device, dtype=x.dtype)).amax(dim=1)


def global_positives(x: Tensor, pool: Tensor, *, symmetric: bool = True) -> Tensor:
    """Eq. 3 / 4: ``P_i = {j != i : sim(x_i, x_j) > c_i  or  sim(x_i, x_j) > c_j}``.

    ``global_positives(f, Q^ag)`` is the task-agnostic set P^ag (Eq. 3), ``global_positives(s', Q^sp)``
    the task-specific set P^sp (Eq. 4). ``symmetric=False`` keeps only ``sim > c_i`` (Table 4 (e)).
    Only ``j = i`` is excluded: patches of the anchor's own image may be positives (D16).

    Args:
        x: (N, d) features; pool: (M, d) reference pool of the same kind.

    Returns:
        (N, N) bool, row i is P_i.
    """
    c = criterion(x, pool)
    sim = similarity(x, x)
    positives = sim > c[:, None]
    if symmetric:
        positives = positives | (sim > c[None, :])
    return positives & ~_eye(x.shape[0], x.device)


# ---------------------------------------------------------------------------------------------------
# Section 3.3, Eq. 5: negatives and the contrastive loss with several positives


def random_negatives(rows: int, n: int, rho: float, *, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> Tensor:
    """R: each of the n patches enters an anchor's random sample with probability ``rho`` (section 3.3).

    Drawn with :func:`hpkit.method._kernels.bernoulli_mask`, the sampler of the fast path, so that a
    seeded ``generator`` gives the reference and the fast path the same sample (on the CPU, where the
    fast path's chunk-by-chunk draws continue one serial stream; tested).

    Returns:
        (rows, n) bool, one row per anchor (or per anchor position, for the official shared mask).
    """
    return bernoulli_mask(rows, n, rho, generator=generator, device=device)


def negative_set(positives: Tensor, random: Tensor) -> Tensor:
    """``N_i = R_i \\ (P_i u {i})``: the random sample without the anchor's positives and itself.

    Args:
        positives: (N, N) bool P; random: (N, N) bool R (the same R serves P^ag and P^sp, so
            N^ag_i and N^sp_i differ exactly by their positives).

    Returns:
        (N, N) bool, row i is N_i.
    """
    return random & ~positives & ~_eye(positives.shape[0], positives.device)


def contrastive_loss(anchors: Tensor, contrast: Tensor, positives: Tensor, negatives: Tensor,
                     tau: float) -> Tensor:
    """Eq. 5 for a batch of anchors, each with several positives::

        L^cont(a_i, P_i, N_i) = -1/|P_i| sum_{p in P_i} log( exp(sim(a_i, z_p)/tau)
                                                             / sum_{n in N_i u P_i} exp(sim(a_i, z_n)/tau) )

    Args:
        anchors: (n, D) anchor vectors a_i: ``z_i`` (Phi, Eq. 6) or ``z_mix_i`` (Psi, Eq. 10).
        contrast: (N, D) the vectors z_p, z_n the anchors are compared with.
        positives: (n, N) bool P_i, at least one per row (anchors without positives are left out
            before, as the paper says); negatives: (n, N) bool N_i.
        tau: temperature.

    Returns:
        (n,) the loss of each anchor.
    """
    logits = similarity(anchors, contrast) / tau
    denominator = negatives | positives  # N_i u P_i
    log_denominator = torch.logsumexp(logits.masked_fill(~denominator, -math.inf), dim=1, keepdim=True)
    log_prob = logits - log_denominator
    return -(log_prob * positives).sum(dim=1) / positives.sum(dim=1)


# ---------------------------------------------------------------------------------------------------
# Eq. 7-9: local hidden positives and the mixed feature (gradient propagation, section 3.4)


def surrounding_patches(h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """``I^surr``: (P, P) bool, ``[i, j]`` = patch j lies in the 3x3 neighbourhood of patch i (i included)."""
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    return ((ys[:, None] - ys[None, :]).abs() <= 1) & ((xs[:, None] - xs[None, :]).abs() <= 1)


def local_hidden_positives(scores: Tensor, surr: Tensor, *, style: str = "paper") -> Tensor:
    """Eq. 7: ``I^local_i = {j in I^surr_i : t_ij > Avg(T~_i)}`` (``>=`` in the official code, D3).

    Args:
        scores: (B, P, P) scaled attention ``sigma * p_ij`` (:func:`hpkit.method.local_positives.attention_scores`);
            a constant scale does not move the threshold.
        surr: (P, P) bool ``I^surr`` (:func:`surrounding_patches`).

    Returns:
        (B, P, P) bool, ``[b, i, j]`` = j is a local hidden positive of anchor i in image b.
    """
    average = scores.mean(dim=-1, keepdim=True)  # Avg(T~_i)
    above = scores > average if style == "paper" else scores >= average
    return above & surr


def mix_local_positives(s: Tensor, scores: Tensor, local: Tensor, surr: Tensor, *,
                        style: str = "paper") -> Tensor:
    """Eq. 8-9: ``s_mix_i = 1/|I^local_i| sum_{j in I^local_i} sigma t_j g_j`` with ``g_j = s_j``.

    The official code divides by ``|I^surr_i|`` (9, 6 or 4) instead of ``|I^local_i|`` (D3). The
    weights are constants: the gradient of any loss on ``s_mix_i`` reaches each ``s_j`` of I^local_i in
    proportion to ``sigma t_j`` (Fig. 3).

    Args:
        s: (B, P, D) segmentation features per image; scores: (B, P, P) ``sigma * t``;
        local: (B, P, P) bool I^local (Eq. 7); surr: (P, P) bool I^surr.

    Returns:
        (B, P, D) mixed features, differentiable in ``s``.
    """
    divisor = local.sum(dim=-1).clamp(min=1) if style == "paper" else surr.sum(dim=-1).expand(local.shape[:-1])
    weights = torch.where(local, scores, 0.0) / divisor[..., None]  # sigma t_ij / |I_i|, 0 outside I^local_i
    return weights.to(s.dtype) @ s


def local_mix(s: Tensor, attn_logits: Tensor, *, sigma: float | None = None, style: str = "paper") -> Tensor:
    """Eq. 7-9 end to end, densely (the fast version is :func:`hpkit.method.local_positives.local_mix`).

    Args:
        s: (B, D, h, w) segmentation features.
        attn_logits: (B, heads, P, P) last-block pre-softmax logits; LHP uses ``sigma * softmax`` of
            their head average (``sigma`` default: ``P`` paper, 28 official).

    Returns:
        (B, D, h, w) ``s_mix``.
    """
    b, d, h, w = s.shape
    scores = attention_scores(attn_logits.float().mean(dim=1), sigma=sigma, style=style)  # (B, P, P)
    surr = surrounding_patches(h, w, device=s.device)
    local = local_hidden_positives(scores, surr, style=style)
    mixed = mix_local_positives(s.flatten(2).transpose(1, 2), scores, local, surr, style=style)
    return mixed.transpose(1, 2).reshape(b, d, h, w)


def neighbour_rows(neighbour_weights: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of each anchor's 9 neighbours and their share ``t_ik / sum_k' t_ik'`` (for Table 5).

    Args:
        neighbour_weights: (B, 9, h, w) LHP weights from :func:`hpkit.method.local_positives.local_weights`
            (0 for neighbours outside I^local_i).

    Returns:
        rows: (N, 9) long, the row of neighbour k of each anchor; shares: (N, 9), summing to 1 per anchor
        (0 where no neighbour is selected).
    """
    b, _, h, w = neighbour_weights.shape
    p = h * w
    index, _ = neighbour_index(h, w, device=neighbour_weights.device)  # (P, 9) within one image
    rows = (torch.arange(b, device=index.device)[:, None, None] * p + index).reshape(b * p, 9)
    weights = neighbour_weights.flatten(2).transpose(1, 2).reshape(b * p, 9)
    return rows, weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-12)


def loss_propagation(z: Tensor, anchors: Tensor, rows: Tensor, shares: Tensor, positives: Tensor,
                     negatives: Tensor, tau: float) -> Tensor:
    """Loss propagation, Table 5's alternative to Psi: neighbour j of anchor i takes the anchor's loss.

    ``sum_k share_ik * L^cont(z_{j_k}, P_i, N_i)`` over the 9 neighbours j_k of each anchor i.

    Args:
        z: (N, D); anchors: (n,) long, the anchor rows; rows, shares: (N, 9) from :func:`neighbour_rows`;
        positives, negatives: (n, N) bool P_i, N_i of the anchors.

    Returns:
        (n,) the propagated loss of each anchor.
    """
    terms = [shares[anchors, k] * contrastive_loss(z[rows[anchors, k]], z, positives, negatives, tau)
             for k in range(9)]
    return torch.stack(terms).sum(dim=0)


# ---------------------------------------------------------------------------------------------------
# Eq. 6, 10, 11: the paper's objective


def paper_branch(z: Tensor, z_mix: Tensor | None, positives: Tensor, random: Tensor, tau: float, *,
                 neighbour_weights: Tensor | None = None) -> Tensor:
    """One kind t of global positives: ``mean_i (Phi^t_i + Psi^t_i)`` (Eq. 6 and 10).

    ``Phi^t_i = L^cont(z_i, P^t_i, N^t_i)`` and ``Psi^t_i = L^cont(z_mix_i, P^t_i, N^t_i)``: the mixed
    anchor is contrasted with the clean ``z`` (Eq. 10). The mean runs over the anchors with at least one
    positive ("the sample with zero positive is excluded from training"); none gives 0.

    Args:
        z: (N, D); z_mix: (N, D) or ``None`` (no Psi); positives: (N, N) bool P^t; random: (N, N) bool R.
        neighbour_weights: (B, 9, h, w) replaces Psi by loss propagation (:func:`loss_propagation`).

    Returns:
        scalar.
    """
    negatives = negative_set(positives, random)
    anchors = positives.any(dim=1).nonzero().flatten()  # anchors with at least one positive
    pos, neg = positives[anchors], negatives[anchors]
    per_anchor = contrastive_loss(z[anchors], z, pos, neg, tau)  # Phi^t_i (Eq. 6)
    if z_mix is not None:
        per_anchor = per_anchor + contrastive_loss(z_mix[anchors], z, pos, neg, tau)  # Psi^t_i (Eq. 10)
    if neighbour_weights is not None:
        rows, shares = neighbour_rows(neighbour_weights.to(z.dtype))
        per_anchor = per_anchor + loss_propagation(z, anchors, rows, shares, pos, neg, tau)
    return per_anchor.sum() / max(anchors.numel(), 1)


def final_objective(agnostic: Tensor, specific: Tensor, *, lam: float, alpha: float = 0.0,
                    regularizer: Tensor | float = 0.0) -> Tensor:
    """Eq. 11 averaged over the anchors: ``(Phi^ag + Psi^ag) + lam (Phi^sp + Psi^sp) + alpha R``.

    ``agnostic`` and ``specific`` are :func:`paper_branch` of P^ag and P^sp; ``regularizer`` is
    :func:`hpkit.method.objective.consistency_regularizer` (the training loop adds it, alpha = 0.05).
    """
    return agnostic + lam * specific + alpha * regularizer


def paper_objective(z: Tensor, f: Tensor, s_ema: Tensor | None, pool_ag: Tensor, pool_sp: Tensor | None, *,
                    random: Tensor, lam: float, tau: float, z_mix: Tensor | None = None, symmetric: bool = True,
                    task_specific: bool = True, neighbour_weights: Tensor | None = None) -> Tensor:
    """``style="paper"``: Eq. 3-6, 10 and 11 (without ``alpha R``) as written.

    Args:
        z, f, s_ema, pool_ag, pool_sp, z_mix: see the module docstring.
        random: (N, N) bool R, the random sample of each anchor (one draw for both kinds).
        task_specific: include the P^sp terms (off, or ``lam = 0``: task-agnostic only).

    Returns:
        scalar.
    """
    agnostic = paper_branch(z, z_mix, global_positives(f, pool_ag, symmetric=symmetric), random, tau,
                            neighbour_weights=neighbour_weights)  # Phi^ag + Psi^ag
    specific = z.new_zeros(())
    if task_specific and lam != 0:
        specific = paper_branch(z, z_mix, global_positives(s_ema, pool_sp, symmetric=symmetric), random, tau,
                                neighbour_weights=neighbour_weights)  # Phi^sp + Psi^sp
    return final_objective(agnostic, specific, lam=lam)


# ---------------------------------------------------------------------------------------------------
# The official code's objective (docs/official-code-differences.md#objective)


def official_pair_average(v: Tensor, anchors: Tensor, weights: Tensor, denominator: Tensor, n_images: int,
                          patches_per_image: int, tau: float) -> Tensor:
    """``Phi_b`` of every image b (``Psi_b`` with ``v = z_mix``: mixed against mixed, D2)::

        Phi_b = - sum_{i in V_b} sum_j w_ij l_ij / sum_{i in V_b} sum_j w_ij       (pair average)
        l_ij  = x_ij - log sum_{k in D_i} exp(x_ik),     x_ij = sim(v_i, v_j) / tau

    Args:
        v: (N, D) the branch's vectors, on the anchor and the contrast side alike.
        anchors: (n,) long, the valid anchors V; weights: (n, N) their w_ij; denominator: (n, N) bool D_i.

    Returns:
        (n_images,) ``Phi_b`` (0 for an image without valid anchors).
    """
    logits = similarity(v[anchors], v) / tau  # x_ij
    log_prob = logits - torch.logsumexp(logits.masked_fill(~denominator, -math.inf), dim=1, keepdim=True)  # l_ij
    image = anchors // patches_per_image
    weighted = v.new_zeros(n_images).index_add(0, image, (weights * log_prob).sum(dim=1))
    total_weight = v.new_zeros(n_images).index_add(0, image, weights.sum(dim=1))
    return -weighted / total_weight.clamp(min=1e-12)


def official_objective(z: Tensor, f: Tensor, s_ema: Tensor | None, pool_ag: Tensor, pool_sp: Tensor | None, *,
                       random: Tensor, patches_per_image: int, lam: float, tau: float, z_mix: Tensor | None = None,
                       symmetric: bool = True, task_specific: bool = True) -> Tensor:
    """``style="official"``: the official ``SupConLoss`` in closed form::

        w_ij = A_ij + lam S_ij                  joint weights, one term per branch          (D1)
        D_i  = (A_i u R_i) \\ {i}                one denominator; S-only positives not in it (D1, D13)
        V    = {i : A_i not empty}              validity decided by A alone                 (D17)
        L    = (tau / 0.07) * 1/(2B) * sum_b (Phi_b + Psi_b)       (1/B without z_mix)

    with A = P^ag, S = P^sp (Eq. 3, 4) and Phi_b, Psi_b from :func:`official_pair_average`.

    Args:
        random: (N, N) bool R; the official code shares one (P, N) draw by every image (D13), so that
            row i is row ``i mod P`` of that draw.
        the others: as :func:`paper_objective`.

    Returns:
        scalar.
    """
    n, p = z.shape[0], patches_per_image
    agnostic = global_positives(f, pool_ag, symmetric=symmetric)  # A
    weights = agnostic.to(z.dtype)
    if task_specific and lam != 0:
        weights = weights + lam * global_positives(s_ema, pool_sp, symmetric=symmetric).to(z.dtype)  # A + lam S
    denominator = (agnostic | random) & ~_eye(n, z.device)  # D_i
    anchors = agnostic.any(dim=1).nonzero().flatten()  # V
    branches = [z] + ([z_mix] if z_mix is not None else [])
    per_image = sum(official_pair_average(v, anchors, weights[anchors], denominator[anchors], n // p, p, tau)
                    for v in branches)
    return (tau / OFFICIAL_BASE_TEMPERATURE) * per_image.sum() / (len(branches) * (n // p))


# ---------------------------------------------------------------------------------------------------
# Both styles behind the signature of the fast objective


def hp_objective(z: Tensor, f: Tensor, s_ema: Tensor | None, pool_ag: Tensor, pool_sp: Tensor | None, *,
                 patches_per_image: int, lam: float, tau: float, rho: float, z_mix: Tensor | None = None,
                 style: str = "paper", negatives: Tensor | None = None, symmetric: bool = True,
                 task_specific: bool = True, neighbour_weights: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """The readable twin of :func:`hpkit.method.objective.hp_objective`: same arguments, same results.

    Draws or expands the random sample R, then calls :func:`paper_objective` or :func:`official_objective`.
    Inputs are not checked here: ``objective.hp_objective(..., reference=True)`` checks them, then
    calls this function.

    Args:
        negatives: bool R, (N, N) per anchor or (P, N) shared by every image. ``None``: drawn with rate
            ``rho`` from ``generator``: (N, N) for the paper style, one shared (P, N) draw for the official
            style (D13); on the CPU the fast path draws the same R from the same generator state.
        the others: as :func:`hpkit.method.objective.hp_objective`.

    Returns:
        scalar loss, differentiable in ``z`` and ``z_mix``.
    """
    n, p = z.shape[0], patches_per_image
    z, f = _upcast(z), _upcast(f)  # computed in at least float32, like the fast path
    z_mix = _upcast(z_mix) if z_mix is not None else None
    s_ema = _upcast(s_ema) if s_ema is not None else None
    if negatives is None:  # paper: one row per anchor; official: one (P, N) draw for every image (D13)
        negatives = random_negatives(n if style == "paper" else p, n, rho, generator=generator, device=z.device)
    random = negatives.to(z.device)
    if random.shape[0] != n:  # (P, N) shared by every image: row i is row i mod P
        random = random.repeat(n // p, 1)
    if style == "paper":
        return paper_objective(z, f, s_ema, pool_ag, pool_sp, random=random, lam=lam, tau=tau, z_mix=z_mix,
                               symmetric=symmetric, task_specific=task_specific,
                               neighbour_weights=neighbour_weights)
    return official_objective(z, f, s_ema, pool_ag, pool_sp, random=random, patches_per_image=p, lam=lam,
                              tau=tau, z_mix=z_mix, symmetric=symmetric, task_specific=task_specific)
