"""The HP contrastive objective (Eq. 5, 6, 10, 11), plain Eq. 1, the regulariser and the lambda schedule.

Notation (image-major rows, ``N = B * P``): ``z`` (N, D) projections of the clean view, ``z_mix``
(N, D) projections of the LHP-mixed features, ``f`` (N, C) backbone features and ``s'`` (N, D)
momentum-head features used only to *select* positives, ``tau`` the temperature. ``A`` / ``S`` are the
task-agnostic / task-specific positive masks (Eq. 3 / 4), ``R`` the random-negative mask (rate rho).

``style="paper"`` (the equations as written)::

    L^cont(a_i, P, N) = -1/|P| sum_{p in P} log( exp(<a_i, z_p>/tau) / sum_{n in N u P} exp(<a_i, z_n>/tau) )
    Phi^t_i = L^cont(z_i,     P^t_i, N^t_i)        Psi^t_i = L^cont(z_mix_i, P^t_i, N^t_i)      (t = ag, sp)
    L = mean_{i in V^ag} (Phi^ag_i + Psi^ag_i) + lam * mean_{i in V^sp} (Phi^sp_i + Psi^sp_i)

  with ``N^t_i = R_i \\ P^t_i`` (one random draw, so the two negative sets differ exactly by their
  positives), ``V^t`` the anchors with at least one positive of kind ``t``, self excluded everywhere.
  Psi contrasts ``z_mix_i`` against the clean ``z`` (Eq. 10). The regulariser ``alpha * R`` of Eq. 11
  is added by the training loop (:func:`consistency_regularizer`).

``style="official"`` (the official ``SupConLoss``, docs/official-code-differences.md#objective;
the codes D1 ... D20 are that page's anchors #d1 ... #d20)::

    w_ij = A_ij + lam * S_ij                 joint weights, one term per branch          (D1)
    D_i  = (A_i u R_i) \\ {i}                 one denominator; S-only positives not in it (D1, D13)
    V_b  = {i in image b : sum_j A_ij > 0}   validity decided by A alone                 (D17)
    Phi_b = - sum_{i in V_b} sum_j w_ij (x_ij - LSE_{D_i} x_i) / sum_{i in V_b} sum_j w_ij   (pair average)
    Psi_b = the same with x_mix_ij = <z_mix_i, z_mix_j>/tau   (mix against mix)         (D2)
    L = (tau / 0.07) * 1/(2B) * sum_b (Phi_b + Psi_b)

  and, when ``negatives`` is not given, one (P, N) Bernoulli(rho) mask shared by every anchor image
  (D13). An image without valid anchors contributes 0 (the official code would return NaN).

Two implementations compute these: :mod:`hpkit.method.reference` writes them out equation by equation
on dense (N, N) tensors with autograd (``hp_objective(..., reference=True)``), and the default fast
path runs the fused, chunked kernels of :mod:`hpkit.method._kernels` (memory O(chunk x N), gradients
computed in the forward pass). The tests check that both give the same values and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hpkit.method import reference as _reference
from hpkit.method._kernels import (
    GradientInForward,
    bernoulli_mask,
    default_chunk_size,
    official_pass,
    paper_pass,
    self_contrastive_pass,
    upcast,
)
from hpkit.method.global_positives import criterion

__all__ = [
    "hp_objective",
    "self_contrastive_loss",
    "consistency_regularizer",
    "lambda_schedule",
    "bernoulli_mask",
    "default_chunk_size",
    "OFFICIAL_BASE_TEMPERATURE",
]

OFFICIAL_BASE_TEMPERATURE = _reference.OFFICIAL_BASE_TEMPERATURE
"""SupCon's ``base_temperature``: the official loss is scaled by ``tau / 0.07``."""


def _check_inputs(z: Tensor, f: Tensor, s_ema: Tensor | None, pool_ag: Tensor, pool_sp: Tensor | None,
                  z_mix: Tensor | None, negatives: Tensor | None, neighbour_weights: Tensor | None,
                  patches_per_image: int, tau: float, rho: float, style: str, task_specific: bool,
                  lam: float) -> None:
    """Raise a ValueError that says what to change when the inputs of :func:`hp_objective` do not fit."""
    if style not in ("paper", "official"):
        raise ValueError(f"style must be 'paper' or 'official', got {style!r}")
    if z.dim() != 2:
        raise ValueError(f"z must be (N, D) rows, got shape {tuple(z.shape)}; flatten (B, D, h, w) maps "
                         "with hpkit.method.heads.to_rows")
    n = z.shape[0]
    if patches_per_image <= 0 or n % patches_per_image:
        raise ValueError(f"N={n} rows is not a multiple of patches_per_image={patches_per_image}")
    if f.shape[0] != n:
        raise ValueError(f"f has {f.shape[0]} rows but z has {n}")
    if task_specific and lam != 0 and (s_ema is None or pool_sp is None or s_ema.shape[0] != n):
        raise ValueError("the task-specific set needs s_ema with N rows and pool_sp; pass task_specific=False "
                         "or lam=0 to train without it")
    if z_mix is not None and z_mix.shape != z.shape:
        raise ValueError(f"z_mix must have the shape of z {tuple(z.shape)}, got {tuple(z_mix.shape)}")
    if z_mix is not None and neighbour_weights is not None:
        raise ValueError("give z_mix (gradient propagation) or neighbour_weights (loss propagation), not both")
    if neighbour_weights is not None:
        if style != "paper":
            raise ValueError("loss propagation (Table 5) is not part of the official code; use style='paper'")
        b = n // patches_per_image
        if (neighbour_weights.dim() != 4 or neighbour_weights.shape[:2] != (b, 9)
                or neighbour_weights.shape[2] * neighbour_weights.shape[3] != patches_per_image):
            raise ValueError(f"neighbour_weights must be (B, 9, h, w) with B={b} and h*w={patches_per_image}, "
                             f"got {tuple(neighbour_weights.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho is a rate in [0, 1] (0.02 means 2 %), got {rho}")
    if negatives is not None:
        if negatives.dtype != torch.bool or negatives.dim() != 2 or negatives.shape[1] != n or \
                negatives.shape[0] not in (patches_per_image, n):
            raise ValueError(f"negatives must be a bool mask of shape ({patches_per_image}, {n}) or ({n}, {n}), "
                             f"got {negatives.dtype} {tuple(negatives.shape)}")


def hp_objective(
    z: Tensor,
    f: Tensor,
    s_ema: Tensor | None,
    pool_ag: Tensor,
    pool_sp: Tensor | None,
    *,
    patches_per_image: int,
    lam: float,
    tau: float,
    rho: float,
    z_mix: Tensor | None = None,
    style: str = "paper",
    negatives: Tensor | None = None,
    symmetric: bool = True,
    task_specific: bool = True,
    chunk_size: int | None = None,
    neighbour_weights: Tensor | None = None,
    generator: torch.Generator | None = None,
    matmul_dtype: torch.dtype | None = None,
    reference: bool = False,
) -> Tensor:
    """The HP contrastive loss with global hidden positives and (optionally) LHP, as a scalar.

    Args:
        z: (N, D) L2-normalised projections of the clean view, ``N = B * patches_per_image``.
        f: (N, C) L2-normalised backbone features (task-agnostic selection, Eq. 3).
        s_ema: (N, D) L2-normalised momentum-head features (task-specific selection, Eq. 4).
        pool_ag: (M, C) task-agnostic reference pool ``Q^ag`` (L2-normalised).
        pool_sp: (M', D) task-specific reference pool ``Q^sp`` (L2-normalised).
        patches_per_image: ``P = h * w``.
        lam: weight of the task-specific set (lambda of Eq. 11, 0 -> 1 during training).
        tau: temperature.
        rho: random-negative rate (0.02 = 2 %); ignored where ``negatives`` is given.
        z_mix: (N, D) L2-normalised projections of the LHP-mixed features ``Z(s_mix)``; enables Psi
            (gradient propagation, Eq. 10). ``None``: no LHP term.
        style: ``"paper"`` or ``"official"`` (see the module docstring).
        negatives: optional bool mask of random negatives, (P, N) shared by every anchor image or
            (N, N) per anchor. ``None``: drawn with rate ``rho`` (shared (P, N) for ``"official"``).
        symmetric: symmetric selection rule (Eq. 3); ``False`` for Table 4 (e).
        task_specific: use the task-specific set ``P^sp`` (Table 4 rows (c), (d) switch it off).
        chunk_size: anchor rows per chunk (``None``: about 4 M entries per (chunk, N) buffer). The
            official style rounds it to whole images.
        neighbour_weights: (B, 9, h, w) LHP weights from :func:`hpkit.local_weights`; replaces Psi by
            loss propagation (Table 5): each selected neighbour ``j`` of anchor ``i`` takes the anchor's
            loss ``L^cont(z_j, P_i, N_i)`` with weight ``t_ij / sum_k t_ik``. Paper style only.
        generator: random generator for the negative draw.
        matmul_dtype: dtype of the logit and gradient matmuls. ``None``: float32 (float64 for
            float64 inputs), exact. ``torch.bfloat16`` runs them on bf16 units (AMX CPUs, tensor
            cores; ~4x faster matmuls here) with float32 softmax and accumulation, like AMP training.
            The positive selection is always computed in float32 or better.
        reference: compute with :func:`hpkit.method.reference.hp_objective` (dense (N, N) tensors and
            autograd, the equations written out) instead of the fused kernels; same values and
            gradients, and on the CPU the same random negatives from the same ``generator``. ``chunk_size``
            and ``matmul_dtype`` are settings of the fast path and are ignored.

    Returns:
        scalar loss, differentiable in ``z`` and ``z_mix``.
    """
    _check_inputs(z, f, s_ema, pool_ag, pool_sp, z_mix, negatives, neighbour_weights, patches_per_image,
                  tau, rho, style, task_specific, lam)
    if reference:
        return _reference.hp_objective(z, f, s_ema, pool_ag, pool_sp, patches_per_image=patches_per_image, lam=lam,
                                       tau=tau, rho=rho, z_mix=z_mix, style=style, negatives=negatives,
                                       symmetric=symmetric, task_specific=task_specific,
                                       neighbour_weights=neighbour_weights, generator=generator)
    return _fast_objective(z, f, s_ema, pool_ag, pool_sp, z_mix=z_mix, patches_per_image=patches_per_image,
                           lam=lam, tau=tau, rho=rho, style=style, negatives=negatives, symmetric=symmetric,
                           task_specific=task_specific, chunk_size=chunk_size, neighbour_weights=neighbour_weights,
                           generator=generator, matmul_dtype=matmul_dtype)


def _fast_objective(z: Tensor, f: Tensor, s_ema: Tensor | None, pool_ag: Tensor, pool_sp: Tensor | None, *,
                    z_mix: Tensor | None, patches_per_image: int, lam: float, tau: float, rho: float, style: str,
                    negatives: Tensor | None, symmetric: bool, task_specific: bool, chunk_size: int | None,
                    neighbour_weights: Tensor | None, generator: torch.Generator | None,
                    matmul_dtype: torch.dtype | None) -> Tensor:
    """:func:`hp_objective` on the kernels: selection criteria, chunk size, then one fused pass."""
    n, p = z.shape[0], patches_per_image
    use_sp = task_specific and lam != 0
    device = z.device

    # Selection (no gradients): criteria of Eq. 2 and the features they compare.
    selections = [(upcast(f), criterion(upcast(f), pool_ag))]
    if use_sp:
        selections.append((upcast(s_ema), criterion(upcast(s_ema), pool_sp)))
    if negatives is None and style == "official" and rho < 1.0:
        negatives = bernoulli_mask(p, n, rho, generator=generator, device=device)  # D13: one shared draw

    chunk = chunk_size or default_chunk_size(n)
    if style == "paper":  # paper chunks stack 2 (Phi, Psi) or 10 (loss propagation) rows per anchor
        chunk = chunk_size or max(1, chunk // (1 + (z_mix is not None) + 9 * (neighbour_weights is not None)))
    else:
        chunk = max(1, round(chunk / p)) * p
    want = (z.requires_grad, z_mix is not None and z_mix.requires_grad)
    mm_dtype = matmul_dtype or upcast(z).dtype
    common = dict(selections=selections, negatives=negatives, p=p, lam=lam, tau=tau, rho=rho,
                  symmetric=symmetric, chunk=chunk, generator=generator, want=want, mm_dtype=mm_dtype)
    if style == "paper":
        compute = lambda zz, mm: paper_pass(zz, mm, neighbour_weights=neighbour_weights, **common)  # noqa: E731
    else:
        compute = lambda zz, mm: official_pass(  # noqa: E731
            zz, mm, base_temperature=OFFICIAL_BASE_TEMPERATURE, **common)
    return GradientInForward.apply(compute, z, z_mix)


def self_contrastive_loss(z: Tensor, z_aug: Tensor, *, tau: float, chunk_size: int | None = None,
                          reference: bool = False) -> Tensor:
    """Eq. 1, the plain per-patch contrastive loss of Table 4 (g) (NT-Xent over both views).

    Each of the 2N rows of ``[z; z_aug]`` is an anchor whose only positive is the same patch in the
    other view; its denominator holds every other row.

    Args:
        z, z_aug: (N, D) L2-normalised projections of two pixel-aligned views.
        tau: temperature.
        chunk_size: anchor rows per chunk of the fast path (``None``: about 4 M entries per buffer).
        reference: compute with :func:`hpkit.method.reference.self_contrastive_loss` (dense, autograd).

    Returns:
        scalar, mean over the 2N anchors.
    """
    if z.shape != z_aug.shape or z.dim() != 2:
        raise ValueError(f"z and z_aug must both be (N, D), got {tuple(z.shape)} and {tuple(z_aug.shape)}")
    if reference:
        return _reference.self_contrastive_loss(z, z_aug, tau=tau)
    want = (z.requires_grad, z_aug.requires_grad)
    compute = lambda a, b: self_contrastive_pass(a, b, tau=tau, chunk_size=chunk_size, want=want)  # noqa: E731
    return GradientInForward.apply(compute, z, z_aug)


def consistency_regularizer(z: Tensor, z_aug: Tensor) -> Tensor:
    """Regulariser R of Eq. 11: mean Euclidean (not squared) distance between the two views.

    Args:
        z, z_aug: (N, D) projections of the clean and photometrically augmented, pixel-aligned views.

    Returns:
        scalar ``mean_i ||z_i - z_aug_i||_2`` (eps 1e-6 as ``nn.PairwiseDistance``, like the official code).
    """
    return F.pairwise_distance(z, z_aug, p=2.0, eps=1e-6).mean()


def lambda_schedule(step: int, total_steps: int, warmup: int = 0) -> float:
    """lambda of Eq. 11: 0 during ``warmup`` steps, then linear towards 1 at ``total_steps``.

    ``lambda = 0`` if ``step <= warmup`` else ``(step - warmup) / (total_steps - warmup)`` (the official
    schedule, docs/official-code-differences.md#d7; ``warmup=0`` is the paper's plain 0 -> 1 ramp).
    """
    if total_steps <= warmup:
        return 0.0 if step <= warmup else 1.0
    if step <= warmup:
        return 0.0
    return min(1.0, (step - warmup) / (total_steps - warmup))
