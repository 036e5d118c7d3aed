"""Independent, deliberately literal implementations used as oracles by the tests.

Nothing here is imported by hpkit. Loops follow the equations term by term (Eq. 2-5, 9, 10, 11 of the
paper; section 1.2 and 1.9 of the official-code notes), autograd provides the gradients, and the
sizes are tiny, so readability wins over speed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def ghp_sets(x: Tensor, pool: Tensor, symmetric: bool = True) -> list[set[int]]:
    """P_i of Eq. 3 as Python sets, one criterion at a time."""
    n = x.shape[0]
    c = [max(float(x[i] @ q) for q in pool) for i in range(n)]
    out = []
    for i in range(n):
        sims = [float(x[i] @ x[j]) for j in range(n)]
        out.append({j for j in range(n) if j != i and (sims[j] > c[i] or (symmetric and sims[j] > c[j]))})
    return out


def l_cont(anchor: Tensor, contrast: Tensor, pos: set[int], neg: set[int], tau: float) -> Tensor:
    """Eq. 5 for one anchor vector, literally: -1/|P| sum_p log(exp(x_p) / sum_{n in N u P} exp(x_n))."""
    denom = sum(torch.exp(anchor @ contrast[k] / tau) for k in pos | neg)
    return -sum(torch.log(torch.exp(anchor @ contrast[p] / tau) / denom) for p in pos) / len(pos)


def paper_objective(z, f, s_ema, pool_ag, pool_sp, rand: Tensor, *, lam, tau, z_mix=None, symmetric=True,
                    task_specific=True, lp_weights: Tensor | None = None, grid=None) -> Tensor:
    """Eq. 11 without the regulariser, anchor by anchor. ``rand`` is an (N, N) bool negative mask.

    ``lp_weights`` (N, 9) switches Psi to loss propagation over the 3x3 neighbours of ``grid``.
    """
    n = z.shape[0]
    kinds = [(ghp_sets(f, pool_ag, symmetric), 1.0)]
    if task_specific and lam != 0:
        kinds.append((ghp_sets(s_ema, pool_sp, symmetric), lam))
    total = z.new_zeros(())
    for sets, weight in kinds:
        terms = []
        for i in range(n):
            pos = sets[i]
            if not pos:
                continue
            neg = {j for j in range(n) if rand[i, j] and j != i} - pos
            term = l_cont(z[i], z, pos, neg, tau)
            if z_mix is not None:
                term = term + l_cont(z_mix[i], z, pos, neg, tau)
            if lp_weights is not None:
                h, w = grid
                p = h * w
                b, r = divmod(i, p)
                y, x = divmod(r, w)
                k = 0
                wsum = float(lp_weights[i].sum())
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        if lp_weights[i, k] > 0:
                            j = b * p + (y + dy) * w + (x + dx)
                            term = term + lp_weights[i, k] / wsum * l_cont(z[j], z, pos, neg, tau)
                        k += 1
            terms.append(term)
        if terms:
            total = total + weight * torch.stack(terms).mean()
    return total


def official_objective(z, f, s_ema, pool_ag, pool_sp, rand_shared: Tensor, *, patches_per_image, lam, tau,
                       z_mix=None, symmetric=True, task_specific=True) -> Tensor:
    """Section 1.9's closed form, one image slab at a time, written the way the official code is.

    Per anchor image: similarity slabs, comparisons against explicitly repeated criteria, float copies
    of the masks, exp/log of masked products and the ``reweighting = 1`` anchor weights, all kept by
    autograd until backward. ``rand_shared`` is the (P, N) Bernoulli mask reused by every image (D13).
    Also the "official-like" baseline of ``benchmarks/objective.py``.
    """
    n, p = z.shape[0], patches_per_image
    b = n // p
    use_sp = task_specific and lam != 0
    c_ag = (f @ pool_ag.T).max(dim=1).values
    c_sp = (s_ema @ pool_sp.T).max(dim=1).values if use_sp else None

    def slab_mask(x, c, rows):
        sim = x[rows] @ x.T
        c_row = c[rows].unsqueeze(1).repeat(1, n)  # the official Rpoint / Rpoint_T copies
        c_col = c.unsqueeze(0).repeat(p, 1)
        m = (sim > c_row) | (sim > c_col) if symmetric else sim > c_row
        return m.float()

    branches = [z] + ([z_mix] if z_mix is not None else [])
    total = z.new_zeros(())
    for img in range(b):
        rows = slice(img * p, (img + 1) * p)
        not_self = torch.ones(p, n, dtype=z.dtype)
        not_self[torch.arange(p), torch.arange(img * p, (img + 1) * p)] = 0
        a = slab_mask(f, c_ag, rows) * not_self
        w = a + lam * slab_mask(s_ema, c_sp, rows) * not_self if use_sp else a
        den = torch.clamp(a + rand_shared.to(z.dtype), max=1.0) * not_self
        valid = (a.sum(1) > 0).to(z.dtype)
        n_i = w.sum(1)
        mean_n = (n_i * valid).sum() / valid.sum()
        for v in branches:
            logits = v[rows] @ v.T / tau
            logits = logits - logits.max(dim=1, keepdim=True).values.detach()
            exp = torch.exp(logits) * den
            log_prob = logits - torch.log(exp.sum(1, keepdim=True))
            mean_lp = (w * log_prob).sum(1) / n_i.clamp(min=1e-12)
            # reweighting = 1: weight each valid anchor by n_i / mean(n)
            total = total - (mean_lp * n_i / mean_n * valid).sum() / valid.sum()
    return (tau / 0.07) * total / (len(branches) * b)


def dense_paper_objective(z, f, s_ema, pool_ag, pool_sp, rand: Tensor, *, lam, tau, z_mix=None) -> Tensor:
    """Eq. 11 (paper style) the naive vectorised way: full (N, N) tensors and autograd.

    The "naive dense" baseline of ``benchmarks/objective.py``; tested against the literal loops.
    """
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool)

    def positives(x, pool):
        c = (x @ pool.T).max(dim=1).values
        sim = x @ x.T
        return ((sim > c[:, None]) | (sim > c[None, :])) & ~eye

    total = z.new_zeros(())
    kinds = [(positives(f, pool_ag), 1.0)] + ([(positives(s_ema, pool_sp), lam)] if lam != 0 else [])
    for pos, weight in kinds:
        den = (pos | rand) & ~eye
        valid = pos.any(dim=1)
        count = pos.sum(dim=1).clamp(min=1)
        for anchor in [z] + ([z_mix] if z_mix is not None else []):
            x = anchor @ z.T / tau
            per_anchor = torch.logsumexp(x.masked_fill(~den, -math.inf), dim=1) - (x * pos).sum(1) / count
            total = total + weight * per_anchor[valid].mean()
    return total


def official_lhp_dense(s: Tensor, attn_logits: Tensor, sigma: float = 28.0) -> Tensor:
    """Section 1.2 + 1.10 as the official code: dense T with torch.quantile, then per image a dense
    (P, P, D) weighted sum (hot spot H2). Also the "dense" LHP baseline of ``benchmarks/objective.py``."""
    bsz, d, h, w = s.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    near = ((ys[:, None] - ys[None, :]).abs() <= 1) & ((xs[:, None] - xs[None, :]).abs() <= 1)
    flat = s.flatten(2).transpose(1, 2)  # (B, P, D)
    out = []
    for img in range(bsz):
        a = attn_logits[img].float().mean(dim=0)  # (P, P)
        q = torch.quantile(a, torch.tensor([0.1, 0.9]), dim=-1)
        a = torch.clamp(a, min=q[0][:, None], max=q[1][:, None])
        t = sigma * torch.softmax(a, dim=-1)
        t = torch.where(t < t.mean(dim=-1, keepdim=True), torch.zeros_like(t), t) * near
        out.append((t[..., None] * flat[img][None, :, :]).sum(dim=1) / near.sum(1)[:, None])
    return torch.stack(out).transpose(1, 2).reshape(bsz, d, h, w)


def nt_xent(z: Tensor, z_aug: Tensor, tau: float) -> Tensor:
    """Eq. 1 over both views as a cross-entropy with the diagonal removed."""
    views = torch.cat([z, z_aug])
    n = z.shape[0]
    logits = views @ views.T / tau
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), -math.inf)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return torch.nn.functional.cross_entropy(logits, target)
