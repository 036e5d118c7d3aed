"""The official code's way of computing HP, written as the official code does it; used by the tests.

Nothing here is imported by hpkit. The equations themselves are written out in
:mod:`hpkit.method.reference` (the tests' oracle for the paper style); this module keeps only what the
library should not contain: the official implementation's own formulations
(docs/official-code-differences.md#objective and #lhp-mixing), which check that ``style="official"``
equals them and serve as the "official-like" baselines of ``benchmarks/objective.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def official_objective(z, f, s_ema, pool_ag, pool_sp, rand_shared: Tensor, *, patches_per_image, lam, tau,
                       z_mix=None, symmetric=True, task_specific=True) -> Tensor:
    """The official objective (docs/official-code-differences.md#objective), one image slab at a time,
    written the way the official code is.

    Per anchor image: similarity slabs, comparisons against explicitly repeated criteria, float copies
    of the masks, exp/log of masked products and the ``reweighting = 1`` anchor weights, all kept by
    autograd until backward. ``rand_shared`` is the (P, N) Bernoulli mask reused by every image (D13).
    Also the "official-like slab" baseline of ``benchmarks/objective.py``.
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


def official_lhp_dense(s: Tensor, attn_logits: Tensor, sigma: float = 28.0) -> Tensor:
    """LHP as the official code (#lhp-attention, #lhp-mixing): dense T with torch.quantile, then per image a dense
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
