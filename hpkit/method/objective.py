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

``style="official"`` (the official ``SupConLoss``, section 1.9 of the reference notes)::

    w_ij = A_ij + lam * S_ij                 joint weights, one term per branch          (D1)
    D_i  = (A_i u R_i) \\ {i}                 one denominator; S-only positives not in it (D1, D13)
    V_b  = {i in image b : sum_j A_ij > 0}   validity decided by A alone                 (D17)
    Phi_b = - sum_{i in V_b} sum_j w_ij (x_ij - LSE_{D_i} x_i) / sum_{i in V_b} sum_j w_ij   (pair average)
    Psi_b = the same with x_mix_ij = <z_mix_i, z_mix_j>/tau   (mix against mix)         (D2)
    L = (tau / 0.07) * 1/(2B) * sum_b (Phi_b + Psi_b)

  and, when ``negatives`` is not given, one (P, N) Bernoulli(rho) mask shared by every anchor image
  (D13). An image without valid anchors contributes 0 (the official code would return NaN).

Memory and speed (hot spot H1): nothing of size N x N is ever held. Anchors are processed in chunks
of rows; for each chunk the value *and* its gradient with respect to ``z`` and ``z_mix`` are computed
at once (``dL/dx_ij = softmax_D(x_i)_j - [j in P_i]/|P_i|`` for the paper style) and accumulated into
(N, D) buffers, so backward is a multiplication and the peak memory is O(chunk x N) in forward and
backward. Log-sum-exp over masked logits replaces exp/log of masked products. The official style
chunks by whole images (its pair average is per image), so its chunks hold at least P rows. The
paper style first counts the anchors with a positive (:func:`hpkit.method.global_positives.has_positive`,
which stops at each anchor's first positive) so that each chunk can sum its ag and sp gradients before
the matmuls. Per chunk of n anchors the work is n*N*(C + 7D) multiply-adds for the official style
(selection C + D, logits 2D, gradients 4D), the same as autograd through the official slab loop:
the savings are in memory and in element-wise passes, and ``matmul_dtype=torch.bfloat16`` runs the
logit and gradient matmuls on bf16 units.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from hpkit.method.global_positives import criterion, has_positive, positive_mask
from hpkit.method.local_positives import neighbour_index

__all__ = [
    "hp_objective",
    "self_contrastive_loss",
    "consistency_regularizer",
    "lambda_schedule",
    "default_chunk_size",
    "OFFICIAL_BASE_TEMPERATURE",
]

OFFICIAL_BASE_TEMPERATURE = 0.07
"""SupCon's ``base_temperature``: the official loss is scaled by ``tau / 0.07``."""

_CHUNK_ELEMENTS = 1 << 22  # ~4 M entries (16 MB in fp32) per (chunk, N) buffer by default


def _work(x: Tensor) -> Tensor:
    """Compute in at least float32 (fp16/bf16 inputs under AMP are upcast; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def default_chunk_size(n: int) -> int:
    """Anchor rows per chunk so that each (chunk, N) buffer holds about 4 M entries."""
    return max(1, min(n, _CHUNK_ELEMENTS // max(n, 1)))


class _GradientInForward(torch.autograd.Function):
    """Scalar whose gradients were already computed during the forward pass.

    ``compute(*tensors)`` returns ``(value, grads)``; backward multiplies ``grads`` by the incoming
    gradient. Used by the chunked objectives so that each chunk's (chunk, N) buffers exist once.
    """

    @staticmethod
    def forward(ctx, compute: Callable, *tensors: Tensor | None) -> Tensor:  # type: ignore[override]
        value, grads = compute(*tensors)
        ctx.has_grad = [g is not None for g in grads]
        ctx.save_for_backward(*[g for g in grads if g is not None])
        return value

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        saved = iter(ctx.saved_tensors)
        grads = [grad_out * next(saved) if has else None for has in ctx.has_grad]
        return (None, *grads)


def _exp_over_(x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """In place: ``x <- exp(x - rowmax) * keep``.

    The row max is taken over all entries and the excluded ones are zeroed *after* the exponential:
    ``exp(-inf)`` and deep underflow take a slow path on CPUs (10-100x), and for unit vectors every
    ``x - rowmax`` lies in ``[-2/tau, 0]``, far from underflow. A float 0/1 multiply is also several
    times faster than ``masked_fill_``.

    Args:
        x: (n, N) logits, overwritten.
        keep: (n, N) 0/1 float mask of the softmax entries (``N_i u P_i``), dtype of ``x``.

    Returns:
        lse: (n,) ``log sum_{kept} exp(x_ij)`` (``-inf`` for rows with nothing kept),
        inv_sum: (n, 1) ``1 / sum_j x_ij`` after the update (0 for empty rows), so that
        ``x * inv_sum`` is the masked softmax.
    """
    row_max = x.amax(dim=1, keepdim=True)
    x.sub_(row_max).exp_().mul_(keep)
    row_sum = x.sum(dim=1, keepdim=True)
    lse = (row_max + row_sum.log()).squeeze(1)
    return lse, torch.where(row_sum > 0, 1.0 / row_sum, 0.0)


def bernoulli_mask(rows: int, cols: int, rate: float, *, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> Tensor:
    """(rows, cols) bool mask with independent Bernoulli(``rate``) entries.

    For small rates it draws the geometric gaps between successes instead of one uniform per entry
    (about ``rate * cols`` numbers per row instead of ``cols``): the same distribution, ~1/rate
    times fewer random numbers.
    """
    if rate >= 1.0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    if rate <= 0.0:
        return torch.zeros(rows, cols, dtype=torch.bool, device=device)
    if rate > 0.2:
        return torch.rand(rows, cols, device=device, generator=generator) < rate
    mean = rate * cols
    k = int(mean + 8 * math.sqrt(mean) + 16)  # gaps per row; running short is checked below
    gaps = torch.empty(rows, k, device=device).geometric_(rate, generator=generator).long()
    position = gaps.cumsum(dim=1) - 1  # 0-based index of each success
    short = position[:, -1] < cols  # rows whose k successes all fall inside: draw them densely
    mask = torch.zeros(rows, cols + 1, dtype=torch.bool, device=device)
    mask.scatter_(1, position.clamp(max=cols), True)
    mask = mask[:, :cols]
    if short.any():
        mask[short] = torch.rand(int(short.sum()), cols, device=device, generator=generator) < rate
    return mask


def _negative_rows(
    negatives: Tensor | None, start: int, n: int, total: int, patches_per_image: int, rho: float,
    device: torch.device, generator: torch.Generator | None,
) -> Tensor:
    """(n, N) bool random-negative rows for anchors ``start .. start + n``."""
    if negatives is None:
        return bernoulli_mask(n, total, rho, generator=generator, device=device)
    rows = torch.arange(start, start + n, device=negatives.device)
    if negatives.shape[0] == patches_per_image and negatives.shape[0] != total:
        rows = rows % patches_per_image
    return negatives[rows].to(device)


def _check_inputs(z, f, s_ema, pool_ag, pool_sp, z_mix, negatives, neighbour_weights, patches_per_image,
                  tau, rho, style, task_specific, lam) -> None:
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

    Returns:
        scalar loss, differentiable in ``z`` and ``z_mix``.
    """
    _check_inputs(z, f, s_ema, pool_ag, pool_sp, z_mix, negatives, neighbour_weights, patches_per_image,
                  tau, rho, style, task_specific, lam)
    n, p = z.shape[0], patches_per_image
    use_sp = task_specific and lam != 0
    device = z.device

    # Selection (no gradients): criteria of Eq. 2 and the features they compare.
    selections = [(_work(f), criterion(_work(f), pool_ag))]
    if use_sp:
        selections.append((_work(s_ema), criterion(_work(s_ema), pool_sp)))
    if negatives is None and style == "official" and rho < 1.0:
        negatives = bernoulli_mask(p, n, rho, generator=generator, device=device)  # D13: one shared draw

    chunk = chunk_size or default_chunk_size(n)
    if style == "paper":  # paper chunks stack 2 (Phi, Psi) or 10 (loss propagation) rows per anchor
        chunk = chunk_size or max(1, chunk // (1 + (z_mix is not None) + 9 * (neighbour_weights is not None)))
    else:
        chunk = max(1, round(chunk / p)) * p
    want = (z.requires_grad, z_mix is not None and z_mix.requires_grad)
    mm_dtype = matmul_dtype or _work(z).dtype
    common = dict(selections=selections, negatives=negatives, p=p, lam=lam, tau=tau, rho=rho,
                  symmetric=symmetric, chunk=chunk, generator=generator, want=want, mm_dtype=mm_dtype)
    if style == "paper":
        compute = lambda zz, mm: _paper_pass(zz, mm, neighbour_weights=neighbour_weights, **common)  # noqa: E731
    else:
        compute = lambda zz, mm: _official_pass(zz, mm, **common)  # noqa: E731
    return _GradientInForward.apply(compute, z, z_mix)


def _masks(selections, start: int, n: int, symmetric: bool) -> list[Tensor]:
    """Positive masks (n, N) of every selection kind for anchors ``start .. start + n``."""
    return [positive_mask(x[start:start + n], x, c[start:start + n], c, row_offset=start, symmetric=symmetric)
            for x, c in selections]


def _denominator(pos: Tensor, rand: Tensor, start: int, dtype: torch.dtype) -> Tensor:
    """(n, N) 0/1 float mask of ``D_i = (P_i u R_i) \\ {i}`` for anchors ``start .. start + n``."""
    out = (pos | rand).to(dtype)
    rows = torch.arange(out.shape[0], device=out.device)
    out[rows, rows + start] = 0.0
    return out


def _paper_pass(z, z_mix, *, selections, negatives, p, lam, tau, rho, symmetric, chunk, generator, want,
                mm_dtype, neighbour_weights):
    n_total, device = z.shape[0], z.device
    zf = _work(z)
    mf = _work(z_mix) if z_mix is not None else None
    want_any = want[0] or want[1]
    contrast = zf.to(mm_dtype)  # every paper-style branch contrasts against the clean z (Eq. 5, 10)
    # Pass 1: anchors with at least one positive, per kind, give the means of Eq. 11 (V^ag, V^sp).
    # Knowing them first lets each chunk sum its terms before the gradient matmuls (one instead of
    # one per term); has_positive stops at each anchor's first positive, so this pass is cheap.
    n_valid = [int(has_positive(x, c, symmetric=symmetric).sum()) if want_any else 0 for x, c in selections]

    lp_index = lp_weight = None
    if neighbour_weights is not None:  # loss propagation: neighbour rows and normalised weights
        b, _, h, w = neighbour_weights.shape
        index, _ = neighbour_index(h, w, device=device)
        images = torch.arange(b, device=device)[:, None, None] * p
        lp_index = (images + index[None]).reshape(n_total, 9)
        wts = neighbour_weights.to(zf.dtype).reshape(b, 9, p).transpose(1, 2).reshape(n_total, 9)
        lp_weight = wts / wts.sum(1, keepdim=True).clamp(min=1e-12)

    loss_sum = [zf.new_zeros(()) for _ in selections]
    counted = [0] * len(selections)
    grad_z = torch.zeros_like(zf) if want[0] else None
    grad_m = torch.zeros_like(mf) if want[1] else None
    for start in range(0, n_total, chunk):
        n = min(chunk, n_total - start)
        rows = torch.arange(start, start + n, device=device)
        rand = _negative_rows(negatives, start, n, n_total, p, rho, device, generator)
        pos = _masks(selections, start, n, symmetric)
        denominators = [_denominator(m, rand, start, zf.dtype) for m in pos]
        count = [m.sum(dim=1) for m in pos]
        valid = [c > 0 for c in count]
        pos_f = [m.to(zf.dtype) for m in pos]
        inv_count = [1.0 / c.clamp(min=1) for c in count]
        for t, v in enumerate(valid):
            counted[t] += int(v.sum())
        # Branches stacked into one matrix of anchor rows: Phi (z_i), Psi (z_mix_i) and, for loss
        # propagation, the 9 neighbours z_j of each anchor with weights t_ij / sum_k t_ik.
        branches = [(0, rows, None)] + ([(1, rows, None)] if mf is not None else [])
        if lp_index is not None:
            branches += [(0, lp_index[start:start + n, k], lp_weight[start:start + n, k]) for k in range(9)]
        anchors = torch.cat([(zf if src == 0 else mf)[idx] for src, idx, _ in branches])
        a_mm = anchors.to(mm_dtype)
        logits = ((a_mm / tau) @ contrast.T).to(zf.dtype)  # (branches * n, N)
        grad = torch.zeros_like(logits) if want_any and len(pos) > 1 else None
        for k, (_, _, row_w) in enumerate(branches):
            block = logits[k * n:(k + 1) * n]
            for t in range(len(pos)):
                x = block if t == len(pos) - 1 else block.clone()
                pos_mean = torch.linalg.vecdot(pos_f[t], x) * inv_count[t]
                lse, inv_sum = _exp_over_(x, denominators[t])
                w_row = valid[t].to(x.dtype) if row_w is None else valid[t] * row_w
                loss_sum[t] += (w_row * torch.where(valid[t], lse - pos_mean, 0.0)).sum()
                if not want_any:
                    continue
                # dL/dx_ij = coef_t * w_i * (softmax_ij - [j in P_i] / |P_i|)
                w_row = w_row * ((1.0 if t == 0 else lam) / max(n_valid[t], 1))
                x.mul_(w_row[:, None] * inv_sum)
                x.addcmul_(pos_f[t], (w_row * inv_count[t])[:, None], value=-1.0)
                if grad is not None:
                    grad[k * n:(k + 1) * n].add_(x)
        if not want_any:
            continue
        grad = logits if grad is None else grad
        g_mm = grad.to(mm_dtype)
        anchor_side = (g_mm @ contrast).to(zf.dtype) / tau  # (branches * n, D)
        for k, (src, idx, _) in enumerate(branches):
            if want[src]:
                (grad_z if src == 0 else grad_m).index_add_(0, idx, anchor_side[k * n:(k + 1) * n])
        if want[0]:
            grad_z += (g_mm.T @ a_mm).to(zf.dtype) / tau

    counts = n_valid if want_any else counted  # the same normalisers for the value and its gradient
    coef = [1.0 / max(counts[0], 1)] + [lam / max(v, 1) for v in counts[1:]]
    value = sum(c * s for c, s in zip(coef, loss_sum))
    return value, [grad_z.to(z.dtype) if want[0] else None, grad_m.to(z_mix.dtype) if want[1] else None]


def _official_pass(z, z_mix, *, selections, negatives, p, lam, tau, rho, symmetric, chunk, generator, want,
                   mm_dtype):
    n_total, device = z.shape[0], z.device
    n_images = n_total // p
    branches = [(_work(z), 0)] + ([(_work(z_mix), 1)] if z_mix is not None else [])
    # (tau / 0.07) and the mean over images and over the Phi / Psi branches (the official 1/(2B)).
    scale = (tau / OFFICIAL_BASE_TEMPERATURE) / (n_images * len(branches))
    branches_mm = [v.to(mm_dtype) for v, _ in branches]
    total = branches[0][0].new_zeros(())
    grads = [torch.zeros_like(v) if want[i] else None for v, i in branches]

    for start in range(0, n_total, chunk):
        n = min(chunk, n_total - start)
        rand = _negative_rows(negatives, start, n, n_total, p, rho, device, generator)
        masks = _masks(selections, start, n, symmetric)
        agnostic = masks[0]
        valid = agnostic.any(dim=1)  # only task-agnostic positives decide validity (D17)
        weight = agnostic.to(total.dtype)  # w = A + lam * S
        if len(masks) > 1:
            weight.add_(masks[1], alpha=lam)
        weight.mul_(valid[:, None])
        row_w = weight.sum(dim=1)  # n_i
        image_w = row_w.view(-1, p).sum(dim=1)  # W_b for the images of this chunk
        inv_w = torch.where(image_w > 0, 1.0 / image_w.clamp(min=1e-12), 0.0).repeat_interleave(p)  # (n,)
        weight.mul_(inv_w[:, None])  # w_ij / W_b
        row_w = row_w * inv_w  # n_i / W_b
        denominator = _denominator(agnostic, rand, start, total.dtype)  # D_i = (A_i u R_i) \ {i}
        for (vecs, i), vecs_mm in zip(branches, branches_mm):
            anchors = vecs_mm[start:start + n]
            x = ((anchors / tau) @ vecs_mm.T).to(total.dtype)
            weighted = torch.linalg.vecdot(weight, x)  # sum_j w_ij x_ij / W_b
            lse, inv_sum = _exp_over_(x, denominator)
            total -= (weighted - row_w * torch.where(valid, lse, 0.0)).sum()
            if want[i]:
                # dPhi_b/dx_ij = (n_i softmax_ij - w_ij) / W_b
                x.mul_(row_w[:, None] * inv_sum).sub_(weight)
                if vecs_mm.dtype == x.dtype:
                    grads[i][start:start + n].addmm_(x, vecs, alpha=1.0 / tau)
                    grads[i].addmm_(x.T, anchors, alpha=1.0 / tau)
                else:
                    x = x.to(vecs_mm.dtype)
                    grads[i][start:start + n] += (x @ vecs_mm).to(total.dtype) / tau
                    grads[i] += (x.T @ anchors).to(total.dtype) / tau
    value = scale * total
    out = [g * scale if g is not None else None for g in grads]
    out = [out[0].to(z.dtype) if want[0] else None,
           out[1].to(z_mix.dtype) if len(out) > 1 and want[1] else None]
    return value, out


def self_contrastive_loss(z: Tensor, z_aug: Tensor, *, tau: float, chunk_size: int | None = None) -> Tensor:
    """Eq. 1, the plain per-patch contrastive loss of Table 4 (g) (NT-Xent over both views).

    Each of the 2N rows of ``[z; z_aug]`` is an anchor whose only positive is the same patch in the
    other view; its denominator holds every other row.

    Args:
        z, z_aug: (N, D) L2-normalised projections of two pixel-aligned views.
        tau: temperature.

    Returns:
        scalar, mean over the 2N anchors.
    """
    if z.shape != z_aug.shape or z.dim() != 2:
        raise ValueError(f"z and z_aug must both be (N, D), got {tuple(z.shape)} and {tuple(z_aug.shape)}")
    n = z.shape[0]
    want = (z.requires_grad, z_aug.requires_grad)

    def compute(a: Tensor, b: Tensor):
        views = _work(torch.cat([a, b]))
        total = 2 * n
        chunk = chunk_size or default_chunk_size(total)
        loss_sum = views.new_zeros(())
        grad = torch.zeros_like(views) if any(want) else None
        for start in range(0, total, chunk):
            m = min(chunk, total - start)
            rows = torch.arange(m, device=views.device)
            partner = (rows + start + n) % total
            x = (views[start:start + m] / tau) @ views.T
            positive = x[rows, partner]
            others = torch.ones_like(x)
            others[rows, rows + start] = 0.0
            lse, inv_sum = _exp_over_(x, others)
            loss_sum += (lse - positive).sum()
            if grad is not None:  # dL/dx_ij = softmax_ij - [j = partner(i)]
                x.mul_(inv_sum)
                x[rows, partner] -= 1.0
                grad[start:start + m].addmm_(x, views, alpha=1.0 / tau)
                grad.addmm_(x.T, views[start:start + m], alpha=1.0 / tau)
        value = loss_sum / total
        if grad is None:
            return value, [None, None]
        grad = grad / total
        return value, [grad[:n].to(a.dtype) if want[0] else None, grad[n:].to(b.dtype) if want[1] else None]

    return _GradientInForward.apply(compute, z, z_aug)


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
    schedule, D7; ``warmup=0`` is the paper's plain 0 -> 1 ramp).
    """
    if total_steps <= warmup:
        return 0.0 if step <= warmup else 1.0
    if step <= warmup:
        return 0.0
    return min(1.0, (step - warmup) / (total_steps - warmup))
