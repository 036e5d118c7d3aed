"""Looking at global hidden positives: reference-pool pictures, GHP statistics and an interactive explorer.

Used by notebooks 01 (the reference pool) and 02 (global hidden positives). The statistics the
pictures show are computed in :mod:`hpkit.lessons.positives` (re-exported here); this module draws:

- pictures: :func:`patch_crop`, :func:`plot_pool_patches`, :func:`plot_criterion_hist`,
  :func:`plot_positives_vs_pool_size`, :func:`plot_symmetric_pair`, and :class:`GHPExplorer`
  (static figure ``figure()`` in the style of the paper's Fig. 5, and an ipywidgets ``widget()``).

Rows are image-major as everywhere in hpkit: row ``b * P + y * w + x`` is patch ``(y, x)`` of image
``b``. Patch labels are the label at each patch's centre pixel (:func:`hpkit.lessons.diagnostics.patch_labels`);
``-1`` means ignored. ipywidgets is imported only inside :meth:`GHPExplorer.widget`.
"""

from __future__ import annotations

import io
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from hpkit._util import to_uint8
from hpkit.lessons.plots import colorize, default_colors, legend_handles
from hpkit.lessons.positives import (  # noqa: F401
    PatchPool,
    _hwc,
    _summarise,
    batch_features,
    find_symmetric_pair,
    label_base_rate,
    locate_patches,
    patch_crop,
    patch_labels,
    positive_precision,
    positive_stats,
    positives_vs_pool_size,
    sample_pool,
    symmetric_only_pairs,
)
from hpkit.method.global_positives import positive_mask
from hpkit.method.heads import MomentumHead, to_rows

__all__ = ["positive_precision", "positive_stats", "positives_vs_pool_size", "label_base_rate",
           "symmetric_only_pairs", "find_symmetric_pair", "locate_patches", "PatchPool", "batch_features",
           "sample_pool", "patch_crop", "plot_pool_patches", "plot_criterion_hist",
           "plot_positives_vs_pool_size", "plot_symmetric_pair", "plot_set_summary", "GHPExplorer"]

#: width in pixels of the picture a click chooses the anchor on
PICKER_SIZE = 320


def _click_events(source, callback):
    """Call ``callback(event)`` on every click on the ``source`` widget (ipyevents); None without ipyevents."""
    try:
        from ipyevents import Event
    except ImportError:  # the sliders still work
        return None
    events = Event(source=source, watched_events=["click"], prevent_default_action=True)
    events.on_dom_event(callback)
    return events


# colours of the overlays (RGB in [0, 1])
_SAME = np.array([0.1, 0.85, 0.2])  # positive with the anchor's label
_OTHER = np.array([0.95, 0.1, 0.1])  # positive with another label
_ANCHOR = "yellow"


# --------------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------------

def _box(ax, context: int, patch_size: int, color: str = "red") -> None:
    ax.add_patch(Rectangle((context - 0.5, context - 0.5), patch_size, patch_size, fill=False, ec=color, lw=1.5))


def plot_pool_patches(pool: PatchPool, *, count: int = 32, ncols: int = 8,
                      class_names: Sequence[str] | None = None, title: str | None = None) -> Figure:
    """The first ``count`` patches of ``Q^ag`` as crops (red box: the patch, around it: context)."""
    count = min(count, pool.crops.shape[0])
    nrows = -(-count // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.3 * ncols, 1.45 * nrows), layout="constrained", squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= count:
            continue
        ax.imshow(pool.crops[k], interpolation="nearest")
        _box(ax, pool.context, pool.patch_size)
        lab = int(pool.labels[k])
        name = class_names[lab] if class_names is not None and 0 <= lab < len(class_names) else str(lab)
        ax.set_title(f"#{k} {name}", fontsize=7)
    fig.suptitle(title or f"Task-agnostic reference pool $Q^{{ag}}$: {count} of M={pool.crops.shape[0]} patches "
                 f"(one per image; {pool.patch_size}px patch in red, {pool.context}px context)")
    return fig


def plot_criterion_hist(criteria: dict[str, Tensor], *, sims: Tensor | None = None,
                        title: str = "Criterion $c_i$ (Eq. 2) of the mini-batch anchors") -> Figure:
    """Histograms of the criterion for one or more pools (and, optionally, of all pair similarities).

    Args:
        criteria: ``{"M = 256": c (N,), ...}``.
        sims: optional similarities ``<x_i, x_j>`` of (a sample of) pairs, for reference.
    """
    fig, ax = plt.subplots(figsize=(7, 3.4), layout="constrained")
    values = [v.detach().float().cpu().numpy() for v in criteria.values()]
    lo = min(float(v.min()) for v in values)
    if sims is not None:
        lo = min(lo, float(sims.min()))
    bins = np.linspace(lo, 1.0, 60)
    if sims is not None:
        ax.hist(sims.detach().float().cpu().numpy(), bins=bins, density=True, color="0.8",
                label="$\\langle x_i, x_j\\rangle$, all pairs")
    for (name, _), v in zip(criteria.items(), values):
        ax.hist(v, bins=bins, density=True, histtype="step", lw=1.8, label=f"$c_i$, {name} (mean {v.mean():.3f})")
    ax.set(xlabel="cosine similarity", ylabel="density", title=title)
    ax.legend(fontsize=8)
    return fig


def plot_positives_vs_pool_size(results: dict[str, dict[str, list[float]]], *, chance: float | None = None,
                                title: str = "GHP sets vs pool size M (Fig. 6a's argument)") -> Figure:
    """Mean criterion, positives per anchor and precision against M, for one or more variants.

    Args:
        results: ``{"symmetric": positives_vs_pool_size(...), "non-symmetric": ...}``.
        chance: precision of taking every patch as a positive (:func:`label_base_rate`), drawn dashed.
    """
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), layout="constrained")
    first = next(iter(results.values()))
    axes[0].plot(first["size"], first["criterion"], "-o", ms=4, color="k")
    for name, r in results.items():
        axes[1].plot(r["size"], r["positives_per_anchor"], "-o", ms=4, label=name)
        axes[2].plot(r["size"], [100 * v for v in r["precision"]], "-o", ms=4, label=name)
    if chance is not None:
        axes[2].axhline(100 * chance, ls="--", color="0.5", label="chance (every patch)")
    axes[0].set(ylabel="mean $c_i$ over anchors", title="criterion rises with M")
    axes[1].set(ylabel="positives per anchor", title="fewer positives")
    counts = [v for r in results.values() for v in r["positives_per_anchor"] if v > 0]
    if counts and max(counts) / min(counts) > 20:  # a log axis only where it spans more than a decade
        axes[1].set_yscale("log")
    axes[2].set(ylabel="precision (%)", title="precision vs ground truth")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(first["size"], [str(m) for m in first["size"]])
        ax.minorticks_off()
        ax.set_xlabel("pool size M")
    for ax in axes[1:]:
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def plot_symmetric_pair(pair: dict, images: Tensor, grid: tuple[int, int], patch_size: int, *,
                        labels: Tensor | None = None, class_names: Sequence[str] | None = None,
                        context: int = 16) -> Figure:
    """Two patches of a mini-batch where only the symmetric rule (Eq. 3) makes ``j`` a positive of ``i``.

    Args:
        pair: from :func:`find_symmetric_pair`.
        images: (B, 3, H, W) the mini-batch; grid: (h, w); labels: (N,) patch labels (optional).
    """
    p = grid[0] * grid[1]
    fig, axes = plt.subplots(1, 4, figsize=(11, 3.2), layout="constrained")
    for col, key in enumerate(("i", "j")):
        row = pair[key]
        b, y, x = row // p, (row % p) // grid[1], row % grid[1]
        axes[2 * col].imshow(_hwc(images[b]))
        axes[2 * col].add_patch(Rectangle((x * patch_size - 0.5, y * patch_size - 0.5), patch_size, patch_size,
                                          fill=False, ec="red", lw=1.5))
        name = ""
        if labels is not None:
            lab = int(labels[row])
            name = f", {class_names[lab] if class_names is not None and 0 <= lab < len(class_names) else lab}"
        role = "anchor i" if key == "i" else "patch j"
        axes[2 * col].set_title(f"{role}: image {b}, patch ({y}, {x}){name}", fontsize=9)
        axes[2 * col + 1].imshow(patch_crop(images[b], y, x, patch_size, context), interpolation="nearest")
        _box(axes[2 * col + 1], context, patch_size)
        axes[2 * col + 1].set_title(f"{role} zoomed: $c_{key}$ = {pair['c_' + key]:.3f}\n(similarity to its closest "
                                    f"pool entry, Eq. 2)", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"sim = {pair['sim']:.3f} <= $c_i$ = {pair['c_i']:.3f}: not a positive by anchor i's own "
                 f"criterion;  sim > $c_j$ = {pair['c_j']:.3f}: a positive with the symmetric rule (Eq. 3)",
                 fontsize=10)
    return fig


def plot_set_summary(summary: dict[str, dict[str, float]], *, chance: float | None = None,
                     title: str = "GHP sets over every anchor of the mini-batch") -> Figure:
    """Bars of positives per anchor and precision for each GHP set (:meth:`GHPExplorer.summary`)."""
    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), layout="constrained")
    colors = [f"C{k}" for k in range(len(names))]
    axes[0].bar(names, [summary[n]["positives_per_anchor"] for n in names], color=colors)
    axes[0].set(ylabel="positives per anchor", title="size of the set")
    axes[1].bar(names, [100 * summary[n]["precision"] for n in names], color=colors)
    if chance is not None:
        axes[1].axhline(100 * chance, ls="--", color="0.5", label="chance (every patch)")
        axes[1].legend(fontsize=8, loc="lower right")
    axes[1].set(ylabel="precision (%)", title="precision vs ground truth", ylim=(0, 100))
    for ax, key in zip(axes, ("positives_per_anchor", "precision")):
        for k, n in enumerate(names):
            v = summary[n][key] * (100 if key == "precision" else 1)
            ax.text(k, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(title)
    return fig


def _overlay(image: np.ndarray, positives: np.ndarray, same: np.ndarray, patch_size: int,
             alpha: float = 0.55) -> np.ndarray:
    """Tint positive patches of an (H, W, 3) image: green with the anchor's label, red otherwise.

    positives, same: (h, w) bool.
    """
    up = lambda m: np.kron(m, np.ones((patch_size, patch_size), dtype=bool))[: image.shape[0], : image.shape[1]]
    out = image.copy()
    for mask, color in ((up(positives & same), _SAME), (up(positives & ~same), _OTHER)):
        out[mask] = (1 - alpha) * out[mask] + alpha * color
    return out


# --------------------------------------------------------------------------------------------------
# the explorer
# --------------------------------------------------------------------------------------------------

class GHPExplorer:
    """Global hidden positives of one anchor over a mini-batch, task-agnostic and task-specific (Fig. 5).

    Args:
        images: (B, 3, H, W) the mini-batch, in [0, 1].
        labels: (B, H, W) pixel labels (-1 = ignore), used only to score the sets.
        feats: (B, C, h, w) backbone features of ``images``.
        pool: the task-agnostic pool (:func:`sample_pool`); its bank also gives ``Q^sp``.
        ema_head: the momentum head S' of a trained run (``load_run(run).ema``); without it
            only the task-agnostic set is shown. ``Q^sp = normalize(S'(bank))`` uses the same pool
            patches as ``Q^ag``, as :meth:`hpkit.ReferencePools.refresh_specific` does with its bank.
        symmetric: use the symmetric rule (Eq. 3 / 4).
        class_names, colors: for titles and the label map (default: numbers, tab20 colours).
        max_images: images of the batch drawn in the figure.

    State (for tests and browser checks): ``image_index``, ``anchor`` ``(y, x)``, ``row`` (image-major
    row of the anchor), ``result`` (per set: count, precision, closest reference, mask) and
    ``status_text`` (the HTML shown in the widget's status line).
    """

    def __init__(self, images: Tensor, labels: Tensor, feats: Tensor, pool: PatchPool, *,
                 ema_head: MomentumHead | None = None, symmetric: bool = True,
                 class_names: Sequence[str] | None = None, colors=None, max_images: int = 8):
        b, _, h, w = feats.shape
        if images.shape[0] != b or labels.shape[0] != b:
            raise ValueError(f"images ({images.shape[0]}), labels ({labels.shape[0]}) and feats ({b}) must hold "
                             "the same images")
        self.images, self.labels = images.cpu(), labels.cpu()
        self.grid, self.patch_size = (h, w), images.shape[-1] // w
        self.patch_labels = patch_labels(self.labels, self.grid).reshape(-1)  # (N,)
        self.pool, self.symmetric = pool, symmetric
        self.class_names = list(class_names) if class_names is not None else None
        n_cls = max(len(self.class_names or ()), int(self.labels.max()) + 1, 1)
        self.colors = np.asarray(colors) if colors is not None else default_colors(n_cls)
        self.max_images = max_images
        self.sets: dict[str, dict[str, Tensor]] = {}
        f = F.normalize(to_rows(feats.float()), dim=1)
        q_ag = pool.agnostic
        self.sets["task-agnostic"] = self._set(f, q_ag)
        if ema_head is not None:
            s = F.normalize(to_rows(ema_head(feats.float())), dim=1)
            q_sp = F.normalize(ema_head.rows(pool.bank.float()), dim=1)
            self.sets["task-specific"] = self._set(s, q_sp)
        self._widgets: dict = {}
        self._syncing = False
        self.image_index, self.anchor = 0, (h // 2, w // 2)
        self.select(0, (h // 2, w // 2))

    @staticmethod
    def _set(x: Tensor, pool: Tensor) -> dict[str, Tensor]:
        sims = torch.cat([(rows @ pool.T) for rows in x.split(4096)])
        c, nearest = sims.max(dim=1)
        return {"x": x, "pool": pool, "c": c, "nearest": nearest}

    @property
    def row(self) -> int:
        """Image-major row of the current anchor."""
        h, w = self.grid
        return self.image_index * h * w + self.anchor[0] * w + self.anchor[1]

    def anchor_result(self, image_index: int, anchor: tuple[int, int]) -> dict[str, dict]:
        """The GHP sets of one anchor: per set ``mask`` (N,) bool, ``count``, ``precision``, ``c``,
        ``nearest`` (pool index of the closest reference, Eq. 2) and ``nearest_sim``."""
        h, w = self.grid
        if not 0 <= image_index < self.images.shape[0]:
            raise ValueError(f"image_index must be in [0, {self.images.shape[0] - 1}], got {image_index}")
        if not (0 <= anchor[0] < h and 0 <= anchor[1] < w):
            raise ValueError(f"anchor (row, col) must lie in the {h}x{w} patch grid, got {anchor}")
        row = image_index * h * w + anchor[0] * w + anchor[1]
        out = {}
        for name, s in self.sets.items():
            mask = positive_mask(s["x"][row:row + 1], s["x"], s["c"][row:row + 1], s["c"], row_offset=row,
                                 symmetric=self.symmetric)
            prec = positive_precision(mask, self.patch_labels[row:row + 1], self.patch_labels)
            out[name] = {"mask": mask[0], "count": int(mask.sum()), "precision": float(prec[0]),
                         "c": float(s["c"][row]), "nearest": int(s["nearest"][row])}
        return out

    def select(self, image_index: int | None = None, anchor: tuple[int, int] | None = None) -> dict[str, dict]:
        """Move the anchor; updates ``result``, ``status_text`` and (if built) the widget's status and figure."""
        image_index = self.image_index if image_index is None else int(image_index)
        anchor = self.anchor if anchor is None else (int(anchor[0]), int(anchor[1]))
        self.result = self.anchor_result(image_index, anchor)
        self.image_index, self.anchor = image_index, anchor
        self.status_text = self._status()
        if "status" in self._widgets:
            self._syncing = True  # keep the sliders in step without re-entering select()
            try:
                for key, value in (("image", image_index), ("row", anchor[0]), ("col", anchor[1]),
                                   ("symmetric", self.symmetric)):
                    self._widgets[key].value = value
            finally:
                self._syncing = False
            self._widgets["status"].value = self.status_text
            self._redraw()
        return self.result

    def _name(self, label: int) -> str:
        if self.class_names is not None and 0 <= label < len(self.class_names):
            return self.class_names[label]
        return "ignored" if label < 0 else str(label)

    def _status(self) -> str:
        """One HTML line; counts and precisions sit in ``<span class="hp-count|hp-precision" data-set=...>``."""
        lab = int(self.patch_labels[self.row])
        y, x = self.anchor
        parts = [f"image {self.image_index}, anchor ({y}, {x}), class <b>{self._name(lab)}</b>"]
        for name, r in self.result.items():
            prec = "n/a" if np.isnan(r["precision"]) else f"{100 * r['precision']:.1f}%"
            parts.append(f"{name}: <span class='hp-count' data-set='{name}'>{r['count']}</span> positives, "
                         f"precision <span class='hp-precision' data-set='{name}'>{prec}</span>, "
                         f"c<sub>i</sub> = {r['c']:.3f}")
        return " | ".join(parts)

    def summary(self) -> dict[str, dict[str, float]]:
        """Every anchor of the batch at once: per set, mean positives per anchor, precision (micro and
        mean over anchors), fraction of anchors with a positive (see :func:`positive_stats`)."""
        return {name: _summarise(positive_stats(s["x"], s["c"], self.patch_labels, symmetric=self.symmetric),
                                 self.patch_labels) for name, s in self.sets.items()}

    def example_anchors(self, count: int = 3, *, seed: int = 0) -> list[tuple[int, tuple[int, int]]]:
        """``count`` anchors of different ground-truth classes (the most frequent classes first), each
        with at least one task-agnostic positive; drawn with ``seed``."""
        labels = self.patch_labels
        order = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(seed))
        classes = [int(k) for k in torch.bincount(labels[labels >= 0]).argsort(descending=True)]
        h, w = self.grid
        picks = []
        for k in classes:
            for row in order[labels[order] == k].tolist():
                b, rem = divmod(row, h * w)
                if self.anchor_result(b, divmod(rem, w))["task-agnostic"]["count"] > 0:
                    picks.append((b, divmod(rem, w)))
                    break
            if len(picks) == count:
                break
        return picks

    # ---- the picture ----------------------------------------------------------------------------

    def figure(self, image_index: int | None = None, anchor: tuple[int, int] | None = None) -> Figure:
        """Static Fig.-5-style figure of one anchor (default: the current one); does not move the anchor.

        Top row: the anchor with context, its closest reference patch in each pool (the criterion,
        Eq. 2), the anchor's image and its label map. One row per GHP set: every image of the batch
        with the set's positives tinted green (anchor's label) or red (another label).
        """
        image_index = self.image_index if image_index is None else image_index
        anchor = self.anchor if anchor is None else anchor
        res = self.anchor_result(image_index, anchor)
        h, w = self.grid
        p, ps, ctx = h * w, self.patch_size, self.pool.context
        nb = min(self.images.shape[0], self.max_images)
        cols = max(nb, 3 + len(res))
        fig, axes = plt.subplots(1 + len(res), cols, figsize=(1.55 * cols, 1.75 * (1 + len(res)) + 0.3),
                                 layout="constrained", squeeze=False)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
        y, x = anchor
        anchor_label = int(self.patch_labels[image_index * p + y * w + x])
        top = axes[0]
        top[0].imshow(patch_crop(self.images[image_index], y, x, ps, ctx), interpolation="nearest")
        _box(top[0], ctx, ps)
        top[0].set_title(f"anchor\n{self._name(anchor_label)}", fontsize=8)
        for k, (name, r) in enumerate(res.items(), start=1):
            m = r["nearest"]
            top[k].imshow(self.pool.crops[m], interpolation="nearest")
            _box(top[k], ctx, ps)
            top[k].set_title(f"closest in $Q^{{{'ag' if name == 'task-agnostic' else 'sp'}}}$ (#{m})\n"
                             f"{self._name(int(self.pool.labels[m]))}, $c_i$={r['c']:.2f}", fontsize=8)
        k = len(res) + 1
        top[k].imshow(_hwc(self.images[image_index]))
        top[k].add_patch(Rectangle((x * ps - 0.5, y * ps - 0.5), ps, ps, fill=False, ec=_ANCHOR, lw=2.5))
        top[k].set_title(f"image {image_index}", fontsize=8)
        if k + 1 < cols:
            top[k + 1].imshow(colorize(self.labels[image_index].numpy(), self.colors), interpolation="nearest")
            top[k + 1].set_title("ground truth", fontsize=8)
            present = sorted(int(c) for c in self.labels[image_index].unique() if 0 <= c < len(self.colors))
            names = [self._name(c) for c in range(len(self.colors))]
            fig.legend(handles=[legend_handles(names, self.colors)[c] for c in present], loc="outside right center",
                       fontsize=7, title="ground truth", title_fontsize=7)
        for r_i, (name, r) in enumerate(res.items(), start=1):
            mask = r["mask"].reshape(-1, h, w).numpy()
            same = (self.patch_labels.reshape(-1, h, w) == anchor_label).numpy()
            prec = "n/a" if np.isnan(r["precision"]) else f"{100 * r['precision']:.0f}%"
            axes[r_i, 0].set_ylabel(f"{name}\n{r['count']} pos., prec. {prec}", fontsize=8)
            for b in range(nb):
                ax = axes[r_i, b]
                ax.imshow(_overlay(_hwc(self.images[b]), mask[b], same[b], ps))
                if b == image_index:
                    ax.add_patch(Rectangle((x * ps - 0.5, y * ps - 0.5), ps, ps, fill=False, ec=_ANCHOR, lw=1.5))
                ax.set_title(f"img {b}: {int(mask[b].sum())}", fontsize=7)
        sym = "symmetric, Eq. 3" if self.symmetric else "non-symmetric"
        fig.suptitle(f"GHP of anchor ({y}, {x}) in image {image_index} ({sym}); green: same class as the anchor, "
                     "red: other class", fontsize=9)
        return fig

    def anchor_at(self, x: float, y: float, width: int, height: int) -> tuple[int, int]:
        """The patch ``(row, col)`` under pixel ``(x, y)`` of a ``width`` x ``height`` picture of the image."""
        h, w = self.grid
        return min(max(int(y * h / height), 0), h - 1), min(max(int(x * w / width), 0), w - 1)

    def picker_height(self, size: int = PICKER_SIZE) -> int:
        """Height in pixels of the picker picture ``size`` pixels wide (the images' aspect ratio)."""
        return round(size * self.images.shape[-2] / self.images.shape[-1])

    def picker_picture(self, size: int = PICKER_SIZE) -> bytes:
        """PNG of the current image, ``size`` pixels wide, with the patch grid and the anchor boxed (black and
        yellow, visible on any colour): the picture a click chooses the anchor on."""
        from PIL import Image, ImageDraw

        h, w = self.grid
        image = Image.fromarray(to_uint8(self.images[self.image_index]))
        height = self.picker_height(size)
        image = image.resize((size, height), Image.NEAREST)
        draw = ImageDraw.Draw(image)
        cell_w, cell_h = size / w, height / h
        for k in range(1, w):
            draw.line([(k * cell_w, 0), (k * cell_w, height)], fill=(255, 255, 255), width=1)
        for k in range(1, h):
            draw.line([(0, k * cell_h), (size, k * cell_h)], fill=(255, 255, 255), width=1)
        y, x = self.anchor
        box = [x * cell_w, y * cell_h, (x + 1) * cell_w, (y + 1) * cell_h]
        draw.rectangle([box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3], outline=(0, 0, 0), width=3)
        draw.rectangle(box, outline=(255, 230, 0), width=3)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    # ---- the widget -----------------------------------------------------------------------------

    def widget(self, *, draw: bool = True):
        """An ipywidgets UI: image slider, anchor row / column sliders, symmetric checkbox, status line
        and the figure. CSS classes: ``hp-explorer``, ``hp-image``, ``hp-anchor-row``,
        ``hp-anchor-col``, ``hp-symmetric``, ``hp-status``, ``hp-figure``.

        Args:
            draw: draw the figure on every change (False: status line only, e.g. in tests).
        """
        import ipywidgets as W

        h, w = self.grid
        image = W.IntSlider(value=self.image_index, min=0, max=self.images.shape[0] - 1, description="image",
                            continuous_update=False)
        row = W.IntSlider(value=self.anchor[0], min=0, max=h - 1, description="anchor row", continuous_update=False)
        col = W.IntSlider(value=self.anchor[1], min=0, max=w - 1, description="anchor col", continuous_update=False)
        sym = W.Checkbox(value=self.symmetric, description="symmetric rule (Eq. 3)")
        status = W.HTML(value=self.status_text, description="GHP")
        out = W.Image(format="jpeg")  # an image, not an Output widget: plain widget state, cheap to sync
        pick = W.Image(format="png", layout=W.Layout(width=f"{PICKER_SIZE}px"))
        hint = W.HTML("<b>click a patch</b> to make it the anchor<br>(or use the sliders)")
        for widget, css in ((image, "hp-image"), (row, "hp-anchor-row"), (col, "hp-anchor-col"),
                            (sym, "hp-symmetric"), (status, "hp-status"), (out, "hp-figure"), (pick, "hp-pick")):
            widget.add_class(css)
        self._widgets = {"image": image, "row": row, "col": col, "symmetric": sym, "status": status,
                         "figure": out, "pick": pick, "draw": draw}
        self._clicks = _click_events(pick, self.click)

        def moved(_change) -> None:
            if self._syncing:
                return
            self.symmetric = sym.value
            self.select(image.value, (row.value, col.value))

        for widget in (image, row, col, sym):
            widget.observe(moved, names="value")
        box = W.VBox([W.HBox([image, row, col, sym]), status, W.HBox([pick, hint]), out])
        box.add_class("hp-explorer")
        self._widgets["box"] = box
        self._redraw()
        return box

    def click(self, event: dict) -> None:
        """Handle a click on the picker picture (an ipyevents ``click``: ``dataX``, ``dataY`` in its pixels)."""
        if event.get("dataX") is None or "pick" not in self._widgets:
            return
        self.select(anchor=self.anchor_at(event["dataX"], event["dataY"], PICKER_SIZE, self.picker_height()))

    def _redraw(self) -> None:
        if "pick" in self._widgets:
            self._widgets["pick"].value = self.picker_picture()
        if not self._widgets.get("draw") or "figure" not in self._widgets:
            return
        fig = self.figure()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="jpeg", dpi=100, pil_kwargs={"quality": 85})
        plt.close(fig)
        self._widgets["figure"].value = buffer.getvalue()
