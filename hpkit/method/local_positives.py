"""Local hidden positives (LHP) and gradient propagation, Eq. 7-9 of the paper.

For anchor patch ``i`` the candidates are its 3x3 neighbourhood ``I^surr_i`` *including the anchor
itself* (9 cells inside the grid, 6 on an edge, 4 in a corner). From the last self-attention block of
the frozen backbone we take the head-averaged, pre-softmax patch-to-patch logits ``a_i.`` and the
attention row ``p_i. = softmax_j(a_i.)`` over the patches. A neighbour is a local hidden positive when
its attention is above the row average (Eq. 7), and the mixed feature is (Eq. 9)::

    s_mix_i = 1 / |divisor_i| * sum_{j in I^local_i} sigma * p_ij * s_j

Gradients of any loss on ``s_mix_i`` flow into every ``s_j`` with ``j`` in ``I^local_i``, in
proportion to ``p_ij`` (Fig. 3). The attention weights themselves are constants.

Two styles (docs/official-code-differences.md#lhp-attention and #d3):

==================  =============================================  ==============================
step                ``style="paper"``                              ``style="official"``
==================  =============================================  ==============================
row logits          head-average of pre-softmax logits             same
clamp               none                                           each row clamped to its 10 % and
                                                                   90 % quantiles (linear interp.)
threshold           keep ``p_ij > mean_j p_ij`` (Eq. 7, strict)    keep ``sigma p_ij >= mean``
sigma (default)     ``P = h * w`` (the mean weight is then 1, so   ``28`` (hard-coded in the
                    ``s_mix`` has the scale of ``s`` at any        official code; equals the grid
                    resolution; the paper gives no value)          side only at 224 px, patch 8)
divisor             ``|I^local_i|`` (Eq. 9)                        ``|I^surr_i|`` = 9 / 6 / 4
==================  =============================================  ==============================

The paper says only "attention score"; both styles use the official code's head-averaged logits so
that the two differ exactly in the rows of the table above.

Cost: the row statistics need the full (B, P, P) attention, but the mixing itself reads only the
<= 9 kept neighbours, so it is O(9 N D) (9 shifted views of ``s``), never the dense (P, P, D) product
of the official code (hot spot H2, docs/official-code-differences.md#h2).

Neighbour order ``k = (dy + 1) * 3 + (dx + 1)`` for offsets ``dy, dx`` in ``{-1, 0, 1}`` (row-major,
the same order as ``torch.nn.functional.unfold`` with a 3x3 kernel); ``k = 4`` is the anchor itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "OFFICIAL_SIGMA",
    "NEIGHBOUR_OFFSETS",
    "neighbour_index",
    "row_quantiles",
    "attention_scores",
    "local_weights",
    "mix_neighbours",
    "local_mix",
]

OFFICIAL_SIGMA = 28.0
"""The official code's hard-coded attention scale (``self.sigma = 28``)."""

NEIGHBOUR_OFFSETS: tuple[tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
"""The 9 offsets ``(dy, dx)`` of the 3x3 neighbourhood, in neighbour order ``k``."""

_STYLES = ("paper", "official")


def _check_style(style: str) -> None:
    if style not in _STYLES:
        raise ValueError(f"style must be 'paper' or 'official', got {style!r}")


def neighbour_index(h: int, w: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Row indices of the 3x3 neighbours of every patch of an ``h x w`` grid.

    Returns:
        index: (P, 9) long, ``index[i, k]`` = row of neighbour ``k`` of patch ``i`` (clamped into the
            grid where the neighbour falls outside; see ``valid``).
        valid: (P, 9) bool, whether neighbour ``k`` lies inside the grid.
    """
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    dy = torch.tensor([o[0] for o in NEIGHBOUR_OFFSETS], device=device)
    dx = torch.tensor([o[1] for o in NEIGHBOUR_OFFSETS], device=device)
    ny, nx = ys[:, None] + dy, xs[:, None] + dx
    valid = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    index = ny.clamp(0, h - 1) * w + nx.clamp(0, w - 1)
    return index, valid


def row_quantiles(x: Tensor, qs: tuple[float, ...]) -> list[Tensor]:
    """Quantiles along the last dim with linear interpolation (as ``torch.quantile``).

    One sort serves all requested quantiles (``torch.quantile`` sorts once per call and refuses
    inputs above 16 M elements, docs/official-code-differences.md#h5).

    Args:
        x: (..., P) values.
        qs: quantiles in [0, 1].

    Returns:
        one (...) tensor per quantile.
    """
    sorted_x = x.sort(dim=-1).values
    n = x.shape[-1]
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        out.append(sorted_x[..., lo] + frac * (sorted_x[..., hi] - sorted_x[..., lo]))
    return out


def attention_scores(logits: Tensor, *, sigma: float | None = None, style: str = "paper") -> Tensor:
    """Scaled attention ``sigma * p_ij`` of each row: the ``t_ij`` that Eq. 7 thresholds and Eq. 9 mixes.

    Args:
        logits: (..., P) head-averaged pre-softmax logits, one row per anchor.
        sigma: attention scale; ``None`` picks the style's default (``P`` paper, ``28`` official).
        style: ``"official"`` first clamps each row to its 10 % / 90 % quantiles (D3).

    Returns:
        (..., P) ``sigma * softmax_j(logits)``, in the dtype of ``logits``.
    """
    _check_style(style)
    if sigma is None:
        sigma = float(logits.shape[-1]) if style == "paper" else OFFICIAL_SIGMA
    if style == "official":
        lo, hi = row_quantiles(logits, (0.1, 0.9))
        logits = torch.maximum(torch.minimum(logits, hi[..., None]), lo[..., None])
    return sigma * logits.softmax(dim=-1)


def local_weights(
    attn_logits: Tensor,
    grid: tuple[int, int],
    *,
    sigma: float | None = None,
    style: str = "paper",
) -> Tensor:
    """Per-neighbour LHP weights ``sigma * p_ij / divisor_i`` (zero for non-selected neighbours).

    Args:
        attn_logits: (B, heads, P, P) pre-softmax patch-to-patch logits of the last block
            (no CLS row or column), ``P = h * w``.
        grid: ``(h, w)`` patch grid.
        sigma: attention scale; ``None`` picks the style's default (``P`` paper, ``28`` official).
        style: ``"paper"`` or ``"official"`` (see the module docstring).

    Returns:
        (B, 9, h, w) float32 weights in neighbour order ``k``; ``weights[:, k] > 0`` marks the
        selected local hidden positives ``I^local``.
    """
    _check_style(style)
    h, w = grid
    if attn_logits.dim() != 4 or attn_logits.shape[-1] != attn_logits.shape[-2]:
        raise ValueError(f"attn_logits must be (B, heads, P, P), got {tuple(attn_logits.shape)}")
    b, _, p, _ = attn_logits.shape
    if p != h * w:
        raise ValueError(f"attn_logits has P={p} patches but the grid {h}x{w} has {h * w}")
    index, valid = neighbour_index(h, w, device=attn_logits.device)
    out = []
    for image in attn_logits:  # one image at a time: the row statistics need (P, P) floats, not (B, P, P)
        t = attention_scores(image.float().mean(dim=0), sigma=sigma, style=style)  # (P, P), head average
        threshold = t.mean(dim=-1, keepdim=True)  # = sigma / P up to rounding
        t_nb = t.gather(-1, index)  # (P, 9)
        keep = (t_nb > threshold) if style == "paper" else (t_nb >= threshold)
        keep &= valid
        if style == "paper":
            divisor = keep.sum(-1, keepdim=True).clamp(min=1)  # |I^local_i| (Eq. 9)
        else:
            divisor = valid.sum(-1, keepdim=True)  # |I^surr_i| = 9 / 6 / 4 (D3)
        out.append(torch.where(keep, t_nb, 0.0) / divisor)
    return torch.stack(out).transpose(1, 2).reshape(b, 9, h, w)


def mix_neighbours(s: Tensor, weights: Tensor) -> Tensor:
    """``s_mix_i = sum_k weights[k, i] * s[neighbour_k(i)]`` with 9 shifted views of ``s``.

    Args:
        s: (B, D, h, w) segmentation features.
        weights: (B, 9, h, w) neighbour weights from :func:`local_weights` (constants).

    Returns:
        (B, D, h, w) mixed features; differentiable in ``s``.
    """
    if weights.shape[1] != 9 or weights.shape[0] != s.shape[0] or weights.shape[2:] != s.shape[2:]:
        raise ValueError(f"weights must be (B, 9, h, w) = ({s.shape[0]}, 9, {s.shape[2]}, {s.shape[3]}), "
                         f"got {tuple(weights.shape)}")
    h, w = s.shape[-2:]
    padded = F.pad(s, (1, 1, 1, 1))
    weights = weights.to(s.dtype)
    out = None
    for k, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
        shifted = padded[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        if out is None:
            out = weights[:, k : k + 1] * shifted
        else:
            out.addcmul_(weights[:, k : k + 1], shifted)  # in place: one (B, D, h, w) buffer in all
    return out


def local_mix(s: Tensor, attn_logits: Tensor, *, sigma: float | None = None, style: str = "paper") -> Tensor:
    """Eq. 9: mix each patch's local hidden positives by their attention (gradient propagation).

    Args:
        s: (B, D, h, w) segmentation features (output of the segmentation head).
        attn_logits: (B, heads, h*w, h*w) pre-softmax patch-to-patch logits of the last block.
        sigma: attention scale (``None``: the style's default, see :func:`local_weights`).
        style: ``"paper"`` or ``"official"``.

    Returns:
        s_mix: (B, D, h, w), differentiable in ``s``.
    """
    if s.dim() != 4 or attn_logits.shape[0] != s.shape[0]:
        raise ValueError(f"s must be (B, D, h, w) with the same B as attn_logits, got {tuple(s.shape)} "
                         f"and {tuple(attn_logits.shape)}")
    weights = local_weights(attn_logits, (s.shape[2], s.shape[3]), sigma=sigma, style=style)
    return mix_neighbours(s, weights)
