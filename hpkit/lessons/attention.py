"""Figures for local hidden positives (LHP, Eq. 7-9, Fig. 1c and Fig. 3): attention maps per head,
the Eq. 7 threshold of one attention row, the selected 3x3 neighbours with their weights, the
Fig. 1(c) premise check and the gradient-flow heat maps of :mod:`hpkit.lessons.gradient_flow`.

Attention here is what LHP uses: last-block pre-softmax logits ``a`` (heads, P, P) from
``feats, attn = backbone(images)``; the head-averaged row is ``softmax_j(mean_heads a_ij)`` (the mean
of the logits, not of the per-head softmaxes). Anchors are ``(y, x)`` patch coordinates of one image.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from hpkit.lessons.plots import colorize
from hpkit.method.local_positives import NEIGHBOUR_OFFSETS, attention_scores, neighbour_index

__all__ = ["head_agreement", "SAME_HEADS", "attention_maps", "attention_row", "anchor_neighbourhood", "choose_anchors", "plot_attention_heads",
           "plot_row_threshold", "plot_local_positives", "plot_agreement", "plot_gradient_flow"]


def _image(image) -> np.ndarray:
    image = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)
    return image


def _check_attn(attn: Tensor, grid: tuple[int, int]) -> None:
    if attn.dim() != 3 or attn.shape[1] != attn.shape[2] or attn.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"attn must be one image's (heads, P, P) logits with P = {grid[0]}x{grid[1]}, got "
                         f"{tuple(attn.shape)}; index the batch first (attn[b])")


def attention_maps(attn: Tensor, anchor: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """The anchor's attention row per head and head-averaged, as maps on the patch grid.

    Args:
        attn: (heads, P, P) last-block logits of one image; anchor: ``(y, x)``; grid: ``(h, w)``.

    Returns:
        (heads + 1, h, w): ``softmax`` of each head's logits, then ``softmax`` of their mean (LHP's row).
    """
    _check_attn(attn, grid)
    h, w = grid
    i = anchor[0] * w + anchor[1]
    logits = attn[:, i].float()  # (heads, P)
    rows = torch.cat([logits.softmax(-1), logits.mean(0, keepdim=True).softmax(-1)])
    return rows.reshape(-1, h, w)


def attention_row(attn: Tensor, anchor: tuple[int, int], grid: tuple[int, int], *, sigma: float | None = None,
                  style: str = "paper") -> Tensor:
    """The anchor's scaled row ``sigma * p_i.`` as :func:`hpkit.method.local_positives.local_weights` computes it
    (:func:`hpkit.method.local_positives.attention_scores` of the head-averaged row).

    ``style="official"`` clamps the head-averaged logits to their row's 10 % / 90 % quantiles first.
    The Eq. 7 threshold is the row mean, ``sigma / P``.

    Returns:
        (P,) float32 scaled attention (``sigma`` default: ``P`` paper, so the threshold is 1; 28 official).
    """
    _check_attn(attn, grid)
    logits = attn[:, anchor[0] * grid[1] + anchor[1]].float().mean(0)  # head average of the anchor's row
    return attention_scores(logits, sigma=sigma, style=style)


def anchor_neighbourhood(weights: Tensor, anchor: tuple[int, int, int]) -> np.ndarray:
    """(3, 3) LHP weights of an anchor from ``local_weights`` output (B, 9, h, w); NaN outside the grid."""
    b, y, x = anchor
    h, w = weights.shape[-2:]
    out = weights[b, :, y, x].detach().cpu().double().numpy().reshape(3, 3).copy()
    for k, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
        if not (0 <= y + dy < h and 0 <= x + dx < w):
            out.flat[k] = np.nan
    return out


def choose_anchors(labels: Tensor, *, seed: int = 0) -> dict[str, tuple[int, int]]:
    """An interior and a boundary anchor of one image's (h, w) patch labels (-1 = ignore).

    ``"interior"``: all 8 neighbours share the anchor's class; ``"boundary"``: at least one labelled
    neighbour has another class. Drawn at random (``seed``) among such patches away from the border;
    a kind with no candidate is left out.
    """
    h, w = labels.shape
    index, valid = neighbour_index(h, w)
    flat = labels.reshape(-1)
    nb = flat[index]
    inside = valid.all(1) & (flat >= 0)
    same = ((nb == flat[:, None]) | (nb < 0)).all(1)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, ok in (("interior", inside & (nb == flat[:, None]).all(1)), ("boundary", inside & ~same)):
        cand = ok.nonzero().flatten()
        if cand.numel():
            i = int(cand[torch.randint(cand.numel(), (1,), generator=gen)])
            out[name] = (i // w, i % w)
    return out


def _box(ax, y: int, x: int, size: int = 1, patch: float = 1.0, **kw) -> None:
    """Outline ``size x size`` cells centred on cell (y, x) of a grid drawn with ``patch`` pixels per cell."""
    half = size // 2
    ax.add_patch(Rectangle(((x - half) * patch - 0.5, (y - half) * patch - 0.5), size * patch, size * patch,
                           fill=False, **kw))


#: heads whose attention rows correlate above this are drawn as one panel (they show the same thing)
SAME_HEADS = 0.95


def head_agreement(attn: Tensor, anchor: tuple[int, int], grid: tuple[int, int]) -> float:
    """The lowest correlation between two heads' softmax rows for ``anchor`` (1: every head attends alike).

    Args:
        attn: (heads, P, P) logits; anchor: ``(y, x)``; grid: ``(h, w)``.
    """
    return _agreement(attention_maps(attn, anchor, grid))


def _agreement(maps: Tensor) -> float:
    """The lowest pairwise correlation of the heads' maps in :func:`attention_maps`' (heads + 1, h, w)."""
    heads = maps[:-1].flatten(1).double()
    return 1.0 if heads.shape[0] < 2 else float(torch.corrcoef(heads).min())


def plot_attention_heads(image, attn: Tensor, anchor: tuple[int, int], grid: tuple[int, int], *,
                         title: str | None = None) -> Figure:
    """The image, each head's attention map of the anchor, their average and the Eq. 7 mask.

    Heads that agree (:func:`head_agreement` above ``SAME_HEADS``) are not drawn one by one: the title
    says so and the head average stands for them.

    Args:
        image: (H, W, 3) or (3, H, W) in [0, 1]; attn: (heads, P, P) logits; anchor: ``(y, x)``.
    """
    maps = attention_maps(attn, anchor, grid).cpu()
    agreement = _agreement(maps)
    maps = maps.numpy()
    heads = maps.shape[0] - 1
    shown = list(range(heads)) if agreement <= SAME_HEADS else []
    img = _image(image)
    patch = img.shape[0] / grid[0]
    fig, axes = plt.subplots(1, len(shown) + 3, figsize=(2.6 * (len(shown) + 3), 3.0), layout="constrained")
    axes[0].imshow(img)
    _box(axes[0], *anchor, patch=patch, edgecolor="red", linewidth=2)
    axes[0].set_title("image, anchor")
    for ax, k in zip(axes[1:], shown + [heads]):
        im = ax.imshow(maps[k] * maps[k].size, cmap="viridis")  # P * p: 1 = uniform attention
        ax.set_title(f"head {k + 1}" if k < heads else f"average of the {heads} heads (LHP)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    above = maps[-1] > maps[-1].mean()
    axes[-1].imshow(above, cmap="Blues", vmin=0, vmax=1)
    axes[-1].set_title("above average (Eq. 7)")
    for ax in axes[1:]:
        _box(ax, *anchor, edgecolor="red", linewidth=1.5)
        _box(ax, *anchor, size=3, edgecolor="orange", linewidth=1, linestyle="--")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    note = (f"heads drawn one by one (their rows correlate down to {agreement:.2f})" if shown else
            f"the {heads} heads attend alike here (correlation >= {agreement:.2f}), so only their average is drawn")
    fig.suptitle((title or f"Last-block attention of anchor {anchor}")
                 + f"\nP * softmax over all P = {maps[0].size} patches (1 = uniform attention); {note}", fontsize=10)
    return fig


def plot_row_threshold(attn: Tensor, anchor: tuple[int, int], grid: tuple[int, int], *,
                       styles: tuple[str, ...] = ("paper", "official"), title: str | None = None) -> Figure:
    """Eq. 7 on one attention row: the whole row sorted, and the 3x3 neighbours against the threshold.

    For each style one bar chart of ``sigma * p_ij`` for the in-grid neighbours (blue: kept, red:
    not kept) with the threshold (the row mean) as a line; the first panel is the sorted row.
    """
    h, w = grid
    y, x = anchor
    fig, axes = plt.subplots(1, 1 + len(styles), figsize=(4.2 * (1 + len(styles)), 3.2), layout="constrained")
    row = attention_row(attn, anchor, grid, style="paper").cpu().numpy()
    axes[0].plot(np.sort(row)[::-1], color="0.3")
    axes[0].axhline(row.mean(), color="k", linestyle="--", label=f"row average = {row.mean():.2f}")
    axes[0].set(xlabel="patches, sorted", ylabel="P * p_ij (paper scale)",
                title="whole attention row")
    axes[0].legend(fontsize=8)
    for ax, style in zip(axes[1:], styles):
        t = attention_row(attn, anchor, grid, style=style).cpu().numpy()
        threshold = t.mean()
        names, values = [], []
        for dy, dx in NEIGHBOUR_OFFSETS:
            if 0 <= y + dy < h and 0 <= x + dx < w:
                names.append("self" if (dy, dx) == (0, 0) else f"{dy:+d},{dx:+d}")
                values.append(t[(y + dy) * w + x + dx])
        values = np.array(values)
        kept = values > threshold if style == "paper" else values >= threshold
        ax.bar(range(len(values)), values, color=np.where(kept, "tab:blue", "tab:red"))
        ax.axhline(threshold, color="k", linestyle="--", label=f"threshold = {threshold:.2f}")
        ax.set_xticks(range(len(values)), names, rotation=45, fontsize=8)
        ax.set(xlabel="neighbour offset (dy,dx)", ylabel="sigma * p_ij", title=f"3x3 neighbours, style={style!r}")
        ax.legend(fontsize=8)
    fig.suptitle(title or f"Eq. 7 threshold for anchor {anchor}: blue = local hidden positive, red = not")
    return fig


def _weight_table(ax, table: np.ndarray, title: str) -> None:
    shown = np.where(np.isnan(table), -1.0, table)
    masked = np.ma.masked_less_equal(shown, 0.0)
    ax.imshow(np.isnan(table), cmap="Greys", vmin=0, vmax=3)  # outside the grid: light grey
    top = float(np.nanmax(table)) if np.isfinite(table).any() else 1.0
    ax.imshow(masked, cmap="Blues", vmin=0, vmax=max(2.0 * top, 1e-9))  # light enough for black text
    for (r, c), v in np.ndenumerate(table):
        text = "out" if np.isnan(v) else ("-" if v <= 0 else f"{v:.3g}")
        ax.text(c, r, text, ha="center", va="center", fontsize=9)
    ax.add_patch(Rectangle((0.5, 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def plot_local_positives(image, patch_labels, weights: dict[str, Tensor], anchors: dict[str, tuple[int, int]],
                         colors, *, batch_index: int = 0, title: str | None = None) -> Figure:
    """Selected 3x3 neighbours and their weights (Eq. 7-9) for a few anchors, one row per anchor.

    Args:
        image: (H, W, 3) or (3, H, W) in [0, 1]; patch_labels: (h, w) class ids (-1 = ignore).
        weights: ``{"paper": local_weights(...), "official": ...}``, each (B, 9, h, w).
        anchors: ``{"name": (y, x)}`` (e.g. :func:`choose_anchors`).
        colors: (n, 3) uint8 class palette; batch_index: the image's index in the batch.

    Columns: the image with the anchor's 3x3 box, the neighbours' patch labels, then one weight
    table per style (``-``: not selected, ``out``: outside the grid; red box: the anchor).
    """
    img = _image(image)
    labels = np.asarray(patch_labels.cpu() if isinstance(patch_labels, Tensor) else patch_labels)
    patch = img.shape[0] / labels.shape[0]
    n = len(anchors)
    fig, axes = plt.subplots(n, 2 + len(weights), figsize=(2.8 * (2 + len(weights)), 2.8 * n),
                             layout="constrained", squeeze=False)
    padded = np.pad(labels, 1, constant_values=-1)
    for row, (name, (y, x)) in enumerate(anchors.items()):
        axes[row, 0].imshow(img)
        _box(axes[row, 0], y, x, size=3, patch=patch, edgecolor="orange", linewidth=1.5)
        _box(axes[row, 0], y, x, patch=patch, edgecolor="red", linewidth=1.5)
        axes[row, 0].set_title(f"{name} anchor {(y, x)}", fontsize=9)
        axes[row, 0].axis("off")
        axes[row, 1].imshow(colorize(padded[y:y + 3, x:x + 3], colors), interpolation="nearest")
        axes[row, 1].add_patch(Rectangle((0.5, 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        axes[row, 1].set_title("neighbours' classes", fontsize=9)
        axes[row, 1].axis("off")
        for col, (style, wts) in enumerate(weights.items()):
            table = anchor_neighbourhood(wts, (batch_index, y, x))
            _weight_table(axes[row, 2 + col], table, f"{style}: weights, sum {np.nansum(table):.3g}")
    fig.suptitle(title or "Local hidden positives: selected neighbours and their weights sigma * p_ij / divisor")
    return fig


def plot_agreement(result: dict, *, title: str | None = None) -> Figure:
    """Bar chart of :func:`hpkit.lessons.diagnostics.attention_agreement`: same-class rate above / below the mean."""
    rates = [100 * result["above"], 100 * result["below"]]
    pairs = [result["pairs_above"], result["pairs_below"]]
    fig, ax = plt.subplots(figsize=(4.5, 3.4), layout="constrained")
    bars = ax.bar(["attention above\nrow average", "attention at or below\nrow average"], rates,
                  color=["tab:blue", "tab:red"])
    for bar, rate, n in zip(bars, rates, pairs):
        ax.text(bar.get_x() + bar.get_width() / 2, rate, f"{rate:.1f} %\n({n} pairs)", ha="center", va="bottom",
                fontsize=8)
    ax.set(ylabel="neighbour shares the anchor's class (%)", ylim=(0, 115))
    ax.set_title(title or "Fig. 1(c) premise on this data", fontsize=10)
    return fig


def plot_gradient_flow(image, maps: dict[str, Tensor], anchor: tuple[int, int], *, title: str | None = None,
                       annotate: int = 12, zoom: int | None = None) -> Figure:
    """Heat maps of per-patch gradient norms over the image, one panel per entry of ``maps``.

    Args:
        image: (H, W, 3) or (3, H, W) in [0, 1]; maps: ``{"panel title": (h, w) norms}`` (e.g. the
            ``phi`` / ``total`` / ``psi`` maps of :class:`hpkit.lessons.gradient_flow.GradientFlow`).
        anchor: ``(y, x)``; annotate: write the value in each nonzero cell when there are at most this many.
        zoom: show only the patches within this many cells of the anchor (``None``: the whole image).

    Zero cells are transparent, so the image shows where no gradient arrives; the colour scale is
    shared by the panels.
    """
    img = _image(image)
    arrays = {k: v.detach().cpu().double().numpy() for k, v in maps.items()}
    h, w = next(iter(arrays.values())).shape
    vmax = max(float(a.max()) for a in arrays.values()) or 1.0
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)
    fig, axes = plt.subplots(1, len(arrays), figsize=(3.6 * len(arrays) + 0.8, 3.6), layout="constrained",
                             squeeze=False)
    im = None
    for ax, (name, a) in zip(axes[0], arrays.items()):
        ax.imshow(img, extent=extent, alpha=0.6)
        im = ax.imshow(np.ma.masked_equal(a, 0.0), cmap="inferno", vmin=0, vmax=vmax, extent=extent,
                       interpolation="nearest")
        nonzero = np.argwhere(a > 0)
        if len(nonzero) <= annotate:
            for r, c in nonzero:
                ax.text(c, r, f"{a[r, c]:.3f}", ha="center", va="center", fontsize=7 if zoom else 5, color="white",
                        bbox=dict(boxstyle="round,pad=0.1", fc="black", ec="none", alpha=0.6))  # readable on any colour
        _box(ax, *anchor, size=3, edgecolor="orange", linewidth=1, linestyle="--")
        _box(ax, *anchor, edgecolor="red", linewidth=1)
        ax.set_title(f"{name}\n{len(nonzero)} patch(es) get gradient", fontsize=9)
        if zoom is not None:
            ax.set_xlim(anchor[1] - zoom - 0.5, anchor[1] + zoom + 0.5)
            ax.set_ylim(anchor[0] + zoom + 0.5, anchor[0] - zoom - 0.5)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes[0]), fraction=0.03, label="||dL / ds_j|| (per patch)")
    fig.suptitle(title or f"Where anchor {anchor}'s loss sends gradient (segmentation features s)")
    return fig
