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
    """Section 1.9's closed form, one image slab at a time, with exp/log of masked products.

    ``rand_shared`` is the (P, N) Bernoulli mask reused by every anchor image (D13).
    """
    n, p = z.shape[0], patches_per_image
    b = n // p
    eye = torch.eye(n, dtype=torch.bool)

    def masks(x, pool):
        c = (x @ pool.T).max(dim=1).values
        sim = x @ x.T
        m = sim > c[:, None]
        if symmetric:
            m = m | (sim > c[None, :])
        return m & ~eye

    a = masks(f, pool_ag).float()
    s = masks(s_ema, pool_sp).float() if task_specific and lam != 0 else torch.zeros_like(a)
    weights = a + lam * s
    rand = rand_shared.repeat(b, 1).float()
    den = torch.clamp(a + rand, max=1.0) * (~eye).float()

    def branch(v):
        total = z.new_zeros(())
        for img in range(b):
            rows = slice(img * p, (img + 1) * p)
            logits = v[rows] @ v.T / tau
            logits = logits - logits.max(dim=1, keepdim=True).values.detach()
            exp = torch.exp(logits) * den[rows]
            log_prob = logits - torch.log(exp.sum(1, keepdim=True))
            w = weights[rows]
            valid = (a[rows].sum(1) > 0).float()
            n_i = w.sum(1)
            mean_lp = (w * log_prob).sum(1) / n_i.clamp(min=1e-12)
            # reweighting = 1: weight each anchor by n_i / mean(n) over valid anchors
            mean_n = (n_i * valid).sum() / valid.sum()
            total = total - (mean_lp * n_i / mean_n * valid).sum() / valid.sum()
        return total

    branches = [branch(z)] + ([branch(z_mix)] if z_mix is not None else [])
    return (tau / 0.07) * sum(branches) / (len(branches) * b)


def official_lhp_dense(s: Tensor, attn_logits: Tensor, sigma: float = 28.0) -> Tensor:
    """Section 1.2 + 1.10 with a dense (B, P, P) matrix T and torch.quantile, as the official code."""
    bsz, d, h, w = s.shape
    p = h * w
    a = attn_logits.float().mean(dim=1)
    q = torch.quantile(a, torch.tensor([0.1, 0.9]), dim=-1)
    a = torch.clamp(a, min=q[0][..., None], max=q[1][..., None])
    t = sigma * torch.softmax(a, dim=-1)
    t = torch.where(t < t.mean(dim=-1, keepdim=True), torch.zeros_like(t), t)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    near = ((ys[:, None] - ys[None, :]).abs() <= 1) & ((xs[:, None] - xs[None, :]).abs() <= 1)
    t = t * near
    flat = s.flatten(2).transpose(1, 2)  # (B, P, D)
    mixed = (t[..., None] * flat[:, None, :, :]).sum(dim=2) / near.sum(1)[None, :, None]
    return mixed.transpose(1, 2).reshape(bsz, d, h, w)


def nt_xent(z: Tensor, z_aug: Tensor, tau: float) -> Tensor:
    """Eq. 1 over both views as a cross-entropy with the diagonal removed."""
    views = torch.cat([z, z_aug])
    n = z.shape[0]
    logits = views @ views.T / tau
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), -math.inf)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return torch.nn.functional.cross_entropy(logits, target)
