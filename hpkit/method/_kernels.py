"""Fused, chunked kernels behind :func:`hpkit.method.objective.hp_objective` and
:func:`hpkit.method.objective.self_contrastive_loss` (the fast path).

They compute exactly what :mod:`hpkit.method.reference` writes out equation by equation (the tests
check values and gradients against it); this module is about doing it in bounded memory and few passes.

Why it is fast (hot spot H1, docs/official-code-differences.md#h1): nothing of size N x N is ever held.
Anchors are processed in chunks of rows; for each chunk the value *and* its gradient with respect to
``z`` and ``z_mix`` are computed at once (``dL/dx_ij = softmax_D(x_i)_j - [j in P_i]/|P_i|`` for the
paper style) and accumulated into (N, D) buffers, so backward is a multiplication
(:class:`GradientInForward`) and the peak memory is O(chunk x N) in forward and backward. Log-sum-exp over masked logits replaces
exp/log of masked products. The official style chunks by whole images (its pair average is per image),
so its chunks hold at least P rows. The paper style first counts the anchors with a positive
(:func:`hpkit.method.global_positives.has_positive`, which stops at each anchor's first positive) so
that each chunk can sum its ag and sp gradients before the matmuls. Per chunk of n anchors the work is
n*N*(C + 7D) multiply-adds for the official style (selection C + D, logits 2D, gradients 4D), the same
as autograd through the official slab loop: the savings are in memory and in element-wise passes, and
``matmul_dtype=torch.bfloat16`` runs the logit and gradient matmuls on bf16 units.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from hpkit.method.global_positives import has_positive, positive_mask
from hpkit.method.local_positives import neighbour_index

_CHUNK_ELEMENTS = 1 << 22  # ~4 M entries (16 MB in fp32) per (chunk, N) buffer by default

Selection = tuple[Tensor, Tensor]  # (features (N, d), criteria (N,)) of one kind of global positives


def upcast(x: Tensor) -> Tensor:
    """Compute in at least float32 (fp16/bf16 inputs under AMP are upcast; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def default_chunk_size(n: int) -> int:
    """Anchor rows per chunk so that each (chunk, N) buffer holds about 4 M entries."""
    return max(1, min(n, _CHUNK_ELEMENTS // max(n, 1)))


class GradientInForward(torch.autograd.Function):
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
    """(rows, cols) bool mask with independent Bernoulli(``rate``) entries: the random negatives R.

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


def _masks(selections: list[Selection], start: int, n: int, symmetric: bool) -> list[Tensor]:
    """Positive masks (n, N) of every selection kind for anchors ``start .. start + n``."""
    return [positive_mask(x[start:start + n], x, c[start:start + n], c, row_offset=start, symmetric=symmetric)
            for x, c in selections]


def _denominator(pos: Tensor, rand: Tensor, start: int, dtype: torch.dtype) -> Tensor:
    """(n, N) 0/1 float mask of ``D_i = (P_i u R_i) \\ {i}`` for anchors ``start .. start + n``."""
    out = (pos | rand).to(dtype)
    rows = torch.arange(out.shape[0], device=out.device)
    out[rows, rows + start] = 0.0
    return out


def _loss_propagation_rows(neighbour_weights: Tensor, p: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(N, 9) rows of every anchor's 3x3 neighbours and their weights ``t_ik / sum_k' t_ik'`` (Table 5)."""
    b, _, h, w = neighbour_weights.shape
    device = neighbour_weights.device
    index, _ = neighbour_index(h, w, device=device)
    images = torch.arange(b, device=device)[:, None, None] * p
    lp_index = (images + index[None]).reshape(b * p, 9)
    wts = neighbour_weights.to(dtype).reshape(b, 9, p).transpose(1, 2).reshape(b * p, 9)
    return lp_index, wts / wts.sum(1, keepdim=True).clamp(min=1e-12)


def paper_pass(z: Tensor, z_mix: Tensor | None, *, selections: list[Selection], negatives: Tensor | None,
               p: int, lam: float, tau: float, rho: float, symmetric: bool, chunk: int,
               generator: torch.Generator | None, want: tuple[bool, bool], mm_dtype: torch.dtype,
               neighbour_weights: Tensor | None) -> tuple[Tensor, list[Tensor | None]]:
    """Value and gradients of the paper-style objective (:func:`hpkit.method.reference.paper_objective`).

    Kept in one piece (~80 lines) on purpose: the chunk loop shares a dozen accumulators (loss sums,
    valid counts, gradient buffers) and frees each chunk's (chunk, N) buffers as it goes.
    """
    n_total, device = z.shape[0], z.device
    zf = upcast(z)
    mf = upcast(z_mix) if z_mix is not None else None
    want_any = want[0] or want[1]
    contrast = zf.to(mm_dtype)  # every paper-style branch contrasts against the clean z (Eq. 5, 10)
    # Pass 1: anchors with at least one positive, per kind, give the means of Eq. 11 (V^ag, V^sp).
    # Knowing them first lets each chunk sum its terms before the gradient matmuls (one instead of
    # one per term); has_positive stops at each anchor's first positive, so this pass is cheap.
    n_valid = [int(has_positive(x, c, symmetric=symmetric).sum()) if want_any else 0 for x, c in selections]
    lp_index = lp_weight = None
    if neighbour_weights is not None:  # loss propagation: neighbour rows and normalised weights
        lp_index, lp_weight = _loss_propagation_rows(neighbour_weights.to(device), p, zf.dtype)

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


def official_pass(z: Tensor, z_mix: Tensor | None, *, selections: list[Selection], negatives: Tensor | None,
                  p: int, lam: float, tau: float, rho: float, symmetric: bool, chunk: int,
                  generator: torch.Generator | None, want: tuple[bool, bool], mm_dtype: torch.dtype,
                  base_temperature: float) -> tuple[Tensor, list[Tensor | None]]:
    """Value and gradients of the official-style objective (:func:`hpkit.method.reference.official_objective`)."""
    n_total, device = z.shape[0], z.device
    n_images = n_total // p
    branches = [(upcast(z), 0)] + ([(upcast(z_mix), 1)] if z_mix is not None else [])
    # (tau / 0.07) and the mean over images and over the Phi / Psi branches (the official 1/(2B)).
    scale = (tau / base_temperature) / (n_images * len(branches))
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


def self_contrastive_pass(a: Tensor, b: Tensor, *, tau: float, chunk_size: int | None,
                          want: tuple[bool, bool]) -> tuple[Tensor, list[Tensor | None]]:
    """Value and gradients of Eq. 1 over both views (:func:`hpkit.method.reference.self_contrastive_loss`)."""
    n = a.shape[0]
    views = upcast(torch.cat([a, b]))
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
