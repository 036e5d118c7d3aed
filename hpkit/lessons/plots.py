"""Pictures of a run: training curves, confusion matrices, label maps with a cluster-to-class legend.

Every function returns a matplotlib ``Figure`` (shown inline in notebooks; ``fig.savefig(path)``
elsewhere). Inputs are the plain dicts hpkit writes: ``history.json`` of a run, the result of
:func:`hpkit.pipeline.evaluate.evaluate` (``eval.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from hpkit._util import to_uint8
from hpkit.data.folder import default_colors  # noqa: F401 - part of this module's API

if TYPE_CHECKING:  # for the annotation only: drawing needs no model code
    from hpkit.pipeline.inference import Segmentation

__all__ = ["read_history", "plot_history", "plot_confusion", "colorize", "legend_handles", "plot_segmentation",
           "default_colors", "plot_cluster_gallery", "plot_photo_segmentation", "plot_patch_maps", "headless"]


def read_history(history: dict | str | Path) -> dict:
    """A run's history: the dict itself, or ``history.json`` read from a run folder or its path."""
    if isinstance(history, (str, Path)):
        path = Path(history)
        path = path / "history.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no training history at {path}: train a run first")
        history = json.loads(path.read_text())
    return history


#: how the probes' metrics are named in figures
METRIC_NAMES = {"cluster_miou": "cluster probe mIoU", "cluster_accuracy": "cluster probe accuracy",
                "linear_miou": "linear probe mIoU", "linear_accuracy": "linear probe accuracy"}


def plot_history(history: dict | str | Path, *, title: str | None = None) -> Figure:
    """Loss per step above lambda per step (left), and cluster / linear probe accuracy and mIoU at each
    validation (right).

    Args:
        history: a run folder, its ``history.json``, or the dict ``train`` returned.
    """
    h = read_history(history)
    steps = h.get("steps", h.get("history", []))
    validation = h.get("validation", [])
    fig, axes = plt.subplot_mosaic([["loss", "val"], ["lambda", "val"]], figsize=(11, 4.2), layout="constrained",
                                   height_ratios=[3, 1])
    x = [e["step"] for e in steps]
    axes["loss"].plot(x, [e["loss"] for e in steps], lw=1)
    axes["loss"].set(ylabel="HP loss (Eq. 11)", title="HP loss per step (top), $\\lambda$ per step (bottom)")
    axes["loss"].tick_params(labelbottom=False)
    axes["lambda"].plot(x, [e["lambda"] for e in steps], color="tab:orange", lw=1.5)
    axes["lambda"].set(xlabel="step", ylabel="$\\lambda$", ylim=(-0.05, 1.05), yticks=[0, 0.5, 1])
    axes["lambda"].sharex(axes["loss"])
    val = axes["val"]
    if validation:
        vx = [v["step"] for v in validation]
        for key, style in (("cluster_miou", "-o"), ("cluster_accuracy", "--o"), ("linear_miou", "-s"),
                           ("linear_accuracy", "--s")):
            val.plot(vx, [100 * v[key] for v in validation], style, ms=3, label=METRIC_NAMES[key])
        val.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    else:
        val.text(0.5, 0.5, "no validation during training\n(train.val_every=0)", ha="center", va="center")
    val.set(xlabel="step", ylabel="% of the validation pixels", title="Probes on the val split during training")
    if title:
        fig.suptitle(title)
    return fig


def plot_confusion(confusion, class_names: list[str], *, title: str = "Confusion matrix",
                   normalize: bool = True) -> Figure:
    """A (matched) confusion matrix, rows = prediction, columns = ground truth.

    Args:
        confusion: (K, K) counts (``result["cluster"]["confusion"]`` from :func:`hpkit.pipeline.evaluate.evaluate`).
        normalize: show each ground-truth column as fractions (recall per class).
    """
    m = np.asarray(confusion, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] != len(class_names):
        raise ValueError(f"confusion must be (K, {len(class_names)}), got {m.shape}")
    shown = m / np.maximum(m.sum(0, keepdims=True), 1) if normalize else m
    size = 2.5 + 0.35 * len(class_names)
    fig, ax = plt.subplots(figsize=(size + 1, size), layout="constrained")
    im = ax.imshow(shown, cmap="Blues", vmin=0)
    ax.set_xticks(range(len(class_names)), class_names, rotation=90)
    ax.set_yticks(range(m.shape[0]), list(class_names)[: m.shape[0]])
    ax.set(xlabel="ground truth", ylabel="prediction (matched)", title=title)
    if len(class_names) <= 12:
        for (i, j), v in np.ndenumerate(shown):
            ax.text(j, i, f"{v:.2f}" if normalize else f"{int(v)}", ha="center", va="center", fontsize=7,
                    color="white" if v > 0.6 * shown.max() else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the class" if normalize else "pixels")
    return fig


def colorize(labels, colors) -> np.ndarray:
    """(H, W) int label map -> (H, W, 3) uint8 picture; ignored pixels (< 0) are black."""
    labels = np.asarray(labels)
    colors = np.asarray(colors, dtype=np.uint8)
    out = np.zeros(labels.shape + (3,), np.uint8)
    valid = (labels >= 0) & (labels < len(colors))
    out[valid] = colors[labels[valid]]
    return out


def legend_handles(class_names: list[str], colors, mapping: list[int] | None = None) -> list[Patch]:
    """Legend patches: one per class, or with ``mapping`` (cluster -> class) one per cluster,
    labelled ``"cluster k -> class"`` and coloured as its matched class."""
    colors = np.asarray(colors) / 255.0
    if mapping is None:
        return [Patch(color=colors[i], label=name) for i, name in enumerate(class_names)]
    return [Patch(color=colors[c] if c >= 0 else (0, 0, 0), label=f"cluster {k} -> {class_names[c] if c >= 0 else '?'}")
            for k, c in enumerate(mapping)]


def plot_segmentation(image, panels: dict[str, np.ndarray], class_names: list[str], colors,
                      *, title: str | None = None) -> Figure:
    """The image next to one or more (H, W) class-id maps, with a class legend.

    Args:
        image: (H, W, 3) uint8 or float in [0, 1], or a (3, H, W) tensor.
        panels: ``{"ground truth": labels, "HP clusters": pred, ...}`` class ids (-1 = ignore).
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(3.2 * (1 + len(panels)) + 1.8, 3.4), layout="constrained")
    axes = np.atleast_1d(axes)
    axes[0].imshow(image)
    axes[0].set_title("image")
    for ax, (name, labels) in zip(axes[1:], panels.items()):
        ax.imshow(colorize(labels, colors), interpolation="nearest")
        ax.set_title(name)
    for ax in axes:
        ax.axis("off")
    fig.legend(handles=legend_handles(class_names, colors), loc="outside right center", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def plot_cluster_gallery(run_dir: str | Path, *, images: int = 4) -> Figure:
    """The first validation photos of a run next to their clusters (``hpkit eval --plots`` on data
    without labels): one row per photo, photo | clusters, one legend for the K clusters."""
    from hpkit.pipeline.checkpoint import load_run
    from hpkit.pipeline.datasets import build_dataset
    from hpkit.pipeline.inference import segment

    run = load_run(run_dir)
    paths = list(getattr(build_dataset(run.cfg, "val"), "files", []))[:images]
    if not paths:
        raise ValueError(f"the run in {run.folder} has no photo files to show (data.dataset is not a folder)")
    results = [segment(path, run) for path in paths]
    fig, axes = plt.subplots(len(paths), 2, figsize=(8, 3.2 * len(paths)), squeeze=False, layout="constrained")
    for row, (path, seg) in zip(axes, zip(paths, results)):
        row[0].imshow(seg.image)
        row[0].set_title(Path(path).name, fontsize=8)
        row[1].imshow(colorize(seg.labels, seg.colors), interpolation="nearest")
        row[1].set_title(seg.named)
        for ax in row:
            ax.axis("off")
    fig.legend(handles=legend_handles(results[0].class_names, results[0].colors), loc="outside right center",
               fontsize=8)
    return fig


def plot_photo_segmentation(seg: Segmentation, max_side: int = 1024) -> Figure:
    """A :class:`~hpkit.pipeline.inference.Segmentation` as photo | labels side by side, with a legend of
    the ids present (share of the pixels).

    Returns a matplotlib Figure (``fig.savefig(path)``); large photos are shown downscaled.
    """
    scale = min(1.0, max_side / max(seg.image.size))
    size = (max(1, round(seg.image.width * scale)), max(1, round(seg.image.height * scale)))
    photo = np.asarray(seg.image.resize(size, Image.BILINEAR))
    labels = np.asarray(Image.fromarray(seg.labels.astype(np.int32)).resize(size, Image.NEAREST))
    ids, counts = np.unique(seg.labels, return_counts=True)
    share = dict(zip(ids.tolist(), (counts / seg.labels.size).tolist()))
    present = [i for i in range(len(seg.class_names)) if i in share]
    names = [f"{seg.class_names[i]} ({100 * share[i]:.0f}%)" for i in present]
    colors = seg.colors[present]
    remap = np.full(len(seg.class_names), -1)
    remap[present] = np.arange(len(present))
    shown = np.where(labels >= 0, remap[np.clip(labels, 0, None)], -1)
    if -1 in share:
        names.append(f"unmatched ({100 * share[-1]:.0f}%)")
        colors = np.concatenate([colors, np.zeros((1, 3), np.uint8)])
    fig = plot_segmentation(photo, {seg.named: shown}, names, colors)
    if seg.note:
        fig.suptitle(seg.note, fontsize=9)
    return fig


def headless() -> None:
    """Draw figures to files only (matplotlib's Agg backend): for the CLI and scripts without a screen."""
    import matplotlib

    matplotlib.use("Agg")


def plot_patch_maps(images, maps: dict[str, np.ndarray], *, title: str | None = None,
                    label: str = "loss of the anchor") -> Figure:
    """One row per image: the image, then one per-patch map per entry of ``maps`` (e.g. each term of the
    objective for every anchor), one colour scale per column; NaN (no value, e.g. an anchor without a
    positive) is grey.

    Args:
        images: (B, 3, H, W) tensor in [0, 1] or (B, H, W, 3) array.
        maps: ``{name: (B, h, w)}`` values per patch.
    """
    pictures = to_uint8(images)
    maps = {name: np.asarray(m.detach().cpu() if hasattr(m, "detach") else m, dtype=np.float64)
            for name, m in maps.items()}
    rows, cols = len(pictures), 1 + len(maps)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols + 0.6, 2.3 * rows + 0.4), layout="constrained",
                             squeeze=False)
    cmap = plt.get_cmap("magma").with_extremes(bad="0.75")
    for col, (name, values) in enumerate(maps.items(), start=1):
        finite = values[np.isfinite(values)]
        low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        for row in range(rows):
            shown = axes[row, col].imshow(np.ma.masked_invalid(values[row]), cmap=cmap, vmin=low, vmax=high,
                                          interpolation="nearest")
            if row == 0:
                axes[row, col].set_title(name, fontsize=10)
        fig.colorbar(shown, ax=axes[:, col], shrink=0.6, label=label if col == cols - 1 else None)
    for row in range(rows):
        axes[row, 0].imshow(pictures[row])
        axes[row, 0].set_title("image" if row == 0 else "", fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return fig
