"""Global hidden positives (GHP), Eq. 2-4 of the paper.

For every anchor feature ``x_i`` (a backbone feature ``f_i`` for the task-agnostic set, a momentum-head
feature ``s'_i`` for the task-specific set) the *criterion* is its similarity to the closest entry of
a reference pool (Eq. 2)::

    c_i = max_m <q_m, x_i>

and patch ``j`` of the mini-batch is a hidden positive of ``i`` when (Eq. 3 / Eq. 4)::

    <x_i, x_j> > c_i   or   <x_i, x_j> > c_j        (symmetric rule, the paper's default)
    <x_i, x_j> > c_i                                 (non-symmetric variant, Table 4 (e))

All vectors are L2-normalised, so ``<.,.>`` is the cosine similarity. Only ``j == i`` is excluded:
other patches of the anchor's own image may be positives (docs/official-code-differences.md#d16;
this matches the paper's "different patch features in the mini-batch").

Rows are image-major everywhere: row ``b * P + y * w + x`` is patch ``(y, x)`` of image ``b``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["criterion", "positive_mask", "global_hidden_positives", "has_positive"]


def criterion(x: Tensor, pool: Tensor, *, chunk_size: int = 8192) -> Tensor:
    """Eq. 2: similarity of each row to its closest pool entry.

    Args:
        x: (N, d) L2-normalised anchor features.
        pool: (M, d) L2-normalised reference pool.
        chunk_size: rows processed at a time (bounds memory to ``chunk_size * M``).

    Returns:
        (N,) criterion ``c``.
    """
    if x.shape[-1] != pool.shape[-1]:
        raise ValueError(
            f"feature width {x.shape[-1]} does not match the reference pool width {pool.shape[-1]}: "
            "build the task-agnostic pool from backbone features and the task-specific pool from "
            "momentum-head features"
        )
    pool = pool.to(device=x.device, dtype=x.dtype)
    return torch.cat([(rows @ pool.T).amax(dim=1) for rows in x.split(chunk_size)])


def positive_mask(
    x_rows: Tensor,
    x_all: Tensor,
    c_rows: Tensor,
    c_all: Tensor,
    *,
    row_offset: int = 0,
    symmetric: bool = True,
) -> Tensor:
    """Eq. 3 / 4 for a block of anchor rows against every patch of the mini-batch.

    Args:
        x_rows: (n, d) anchor features, rows ``row_offset .. row_offset + n`` of ``x_all``.
        x_all: (N, d) all features of the mini-batch.
        c_rows: (n,) criteria of the anchors.
        c_all: (N,) criteria of every patch.
        row_offset: index of the first anchor row in ``x_all`` (used to exclude self-pairs).
        symmetric: use the symmetric OR rule (Eq. 3); ``False`` keeps only ``sim > c_i``.

    Returns:
        (n, N) bool mask, ``mask[r, j]`` = patch ``j`` is a positive of anchor ``row_offset + r``.
    """
    sim = x_rows @ x_all.T
    mask = sim > c_rows[:, None]
    if symmetric:
        mask |= sim > c_all[None, :]
    rows = torch.arange(x_rows.shape[0], device=mask.device)
    mask[rows, rows + row_offset] = False
    return mask


def global_hidden_positives(x: Tensor, pool: Tensor, *, symmetric: bool = True) -> Tensor:
    """Dense GHP mask for the whole mini-batch (teaching and visualisation; O(N^2) memory).

    Args:
        x: (N, d) L2-normalised features (backbone ``f`` or momentum-head ``s'``).
        pool: (M, d) L2-normalised reference pool of the same kind.

    Returns:
        (N, N) bool mask of hidden positives (diagonal False).
    """
    c = criterion(x, pool)
    return positive_mask(x, x, c, c, symmetric=symmetric)


def has_positive(x: Tensor, c: Tensor, *, symmetric: bool = True, chunk_size: int = 1024,
                 column_block: int = 1024) -> Tensor:
    """Which anchors have at least one hidden positive, without building their full mask rows.

    Each block of anchors is compared with one block of columns at a time, starting with its own
    rows (same-image patches are the likeliest positives); anchors stop as soon as one positive is
    found, so the cost is usually a small fraction of the full (N, N) comparison.

    Args:
        x: (N, d) L2-normalised features; c: (N,) their criteria (Eq. 2).

    Returns:
        (N,) bool, ``positive_mask(...).any(1)``.
    """
    n = x.shape[0]
    found = torch.zeros(n, dtype=torch.bool, device=x.device)
    starts = list(range(0, n, column_block))
    for row_start in range(0, n, chunk_size):
        pending = torch.arange(row_start, min(row_start + chunk_size, n), device=x.device)
        first = row_start // column_block
        for col_start in starts[first:] + starts[:first]:
            if pending.numel() == 0:
                break
            cols = slice(col_start, min(col_start + column_block, n))
            sim = x[pending] @ x[cols].T
            hit = sim > c[pending, None]
            if symmetric:
                hit |= sim > c[None, cols]
            own = pending - col_start
            inside = (own >= 0) & (own < sim.shape[1])
            hit[inside.nonzero().flatten(), own[inside]] = False  # self is never a positive
            got = hit.any(dim=1)
            found[pending[got]] = True
            pending = pending[~got]
    return found
