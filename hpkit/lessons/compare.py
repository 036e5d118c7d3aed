"""Before/after pictures and side-by-side comparisons of trained runs (the training lesson, notebook 04).

- :func:`example_segmentations`: label maps of a few validation images for the k-means baseline on
  the frozen backbone ("before"), the trained cluster probe ("after") and, optionally, the cluster
  probe refined by the dense CRF, each named by a Hungarian matching fitted on the first validation
  images (as :func:`hpkit.pipeline.evaluate.evaluate` does).
- :func:`metrics_table`: accuracy / mIoU of several evaluations (the dicts ``evaluate`` returns) as rows.
- :func:`plot_runs`: the training curves of several runs on shared axes (loss, lambda, validation mIoU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from hpkit._util import to_uint8
from hpkit.data.folder import default_colors
from hpkit.lessons.plots import read_history
from hpkit.method.heads import to_rows
from hpkit.pipeline.checkpoint import load_run
from hpkit.pipeline.crf import crf_available, crf_batch
from hpkit.pipeline.datasets import build_dataset
from hpkit.pipeline.evaluate import feature_batches, kmeans_baseline, upsampled
from hpkit.pipeline.metrics import confusion_matrix, segmentation_metrics
from hpkit.pipeline.probes import ClusterProbe

__all__ = ["Examples", "example_segmentations", "metrics_table", "format_table", "plot_runs",
           "KMEANS", "HP", "HP_CRF"]

KMEANS = "k-means on backbone"
HP = "HP cluster probe"
HP_CRF = "HP + CRF"


@dataclass
class Examples:
    """Label maps of a few validation images; every map holds class ids (-1 = ignore / unmatched)."""

    indices: list[int]
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N, H, W) ground truth
    predictions: dict[str, np.ndarray]  # method -> (N, H, W) matched class ids
    class_names: list[str]
    colors: np.ndarray  # (K, 3) uint8
    metrics: dict[str, dict] = field(default_factory=dict)  # method -> accuracy / mIoU on the fit images
    fit_images: int = 0

    def panels(self, i: int, methods: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """``{"ground truth": ..., method: ...}`` for the i-th example (for :func:`hpkit.lessons.plots.plot_segmentation`)."""
        chosen = list(self.predictions) if methods is None else list(methods)
        return {"ground truth": self.labels[i], **{m: self.predictions[m][i] for m in chosen}}


@torch.no_grad()
def example_segmentations(run_dir: str | Path, indices: Sequence[int], *, fit_images: int | None = 32,
                          crf: bool = False, batch_size: int = 8, device: str = "cpu") -> Examples:
    """Before (k-means on the frozen backbone) and after (trained cluster probe) label maps.

    Both methods are scored exactly as in :func:`hpkit.pipeline.evaluate.score`: features of the first
    ``fit_images`` validation images (bilinear upsampling to the label size), k-means with k = number
    of classes on the backbone's patch features (seed = the run's seed), one confusion matrix per method,
    Hungarian matching. The example images are then labelled with these fitted centroids and matchings.
    With ``crf=True`` (and pydensecrf2 installed) the cluster probe's scores of the examples are also
    refined by the dense CRF and named with the cluster probe's matching, so the CRF panel shows what
    the CRF changed in the HP panel.

    Args:
        run_dir: a trained run folder.
        indices: validation images to show.
        fit_images: validation images used to fit k-means and the matchings (None: all).
        crf: add the ``"HP + CRF"`` maps.

    Returns:
        :class:`Examples`; ``metrics`` has pixel accuracy and mIoU of both methods on the fit images.
    """
    run = load_run(run_dir, device)
    data = build_dataset(run.cfg, "val")
    names = list(getattr(data, "class_names", ()))
    if not names:
        raise ValueError("the validation data has no class names, so clusters cannot be matched to classes")
    k = len(names)
    count = len(data) if fit_images is None else min(fit_images, len(data))
    if count < 1:
        raise ValueError("fit_images must be at least 1")
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < len(data)]
    if bad:
        raise IndexError(f"validation indices {bad} out of range (the split has {len(data)} images)")

    def forward(subset: list[int]):
        for images, labels, feats, _ in feature_batches(run.backbone, data, subset, batch_size=batch_size, device=device):
            yield images.cpu(), labels, feats.cpu(), run.cluster(upsampled(run.head, feats, labels.shape[-2:])).cpu()

    fit = list(forward(list(range(count))))
    feats = torch.cat([f for _, _, f, _ in fit])
    kmeans = kmeans_baseline(to_rows(feats), k, seed=run.cfg.train.seed)

    confusion = {KMEANS: torch.zeros(k, k, dtype=torch.long), HP: torch.zeros(k, k, dtype=torch.long)}
    for _, labels, f, scores in fit:
        confusion[KMEANS] += confusion_matrix(upsampled(kmeans, f, labels.shape[-2:]).argmax(1), labels, k, k)
        confusion[HP] += confusion_matrix(scores.argmax(1), labels, k, k)
    metrics = {m: segmentation_metrics(c, match=True, class_names=names) for m, c in confusion.items()}
    mapping = {m: metrics[m]["mapping"] for m in metrics}

    shown = list(forward(indices)) if indices else []
    images = torch.cat([x for x, _, _, _ in shown]) if shown else torch.zeros(0, 3, 1, 1)
    labels = torch.cat([y for _, y, _, _ in shown]) if shown else torch.zeros(0, 1, 1, dtype=torch.long)
    predictions = {}
    if shown:
        feats_shown = torch.cat([f for _, _, f, _ in shown])
        scores = torch.cat([s for _, _, _, s in shown])
        predictions[KMEANS] = _named(upsampled(kmeans, feats_shown, labels.shape[-2:]).argmax(1), mapping[KMEANS])
        predictions[HP] = _named(scores.argmax(1), mapping[HP])
        if crf and crf_available():
            predictions[HP_CRF] = _named(crf_batch(images, ClusterProbe.crf_logits(scores), workers=1), mapping[HP])
    colors = getattr(data, "colors", None)
    colors = default_colors(k) if colors is None else colors
    return Examples(
        indices=indices,
        images=to_uint8(images),
        labels=labels.numpy().astype(np.int64),
        predictions=predictions,
        class_names=names,
        colors=np.asarray(colors, dtype=np.uint8),
        metrics={m: {"pixel_accuracy": v["pixel_accuracy"], "mean_iou": v["mean_iou"]} for m, v in metrics.items()},
        fit_images=count,
    )


def _named(clusters: torch.Tensor, mapping) -> np.ndarray:
    """Cluster ids -> class ids through a matching (-1 stays for unmatched clusters)."""
    table = torch.as_tensor(mapping, dtype=torch.long)
    return table[clusters.long()].numpy().astype(np.int64)


_METHODS = ("kmeans_backbone", "cluster", "cluster_crf", "linear", "linear_crf")


def metrics_table(results: Mapping[str, Mapping], methods: Sequence[str] = _METHODS) -> list[dict]:
    """One row per (result, method) present: ``{"run", "method", "accuracy", "miou", "images"}`` in %.

    Args:
        results: ``{"paper style": evaluate(run_a), "official style": evaluate(run_b), ...}``.
        methods: which entries of each result to list (those missing from a result are skipped).
    """
    rows = []
    for name, result in results.items():
        for method in methods:
            if method in result:
                rows.append({"run": name, "method": method,
                             "accuracy": 100 * float(result[method]["pixel_accuracy"]),
                             "miou": 100 * float(result[method]["mean_iou"]), "images": result.get("images")})
    return rows


def format_table(rows: Sequence[Mapping]) -> str:
    """A fixed-width text table of :func:`metrics_table` rows (accuracy and mIoU in %)."""
    width = max([len("run")] + [len(str(r["run"])) for r in rows])
    lines = [f"{'run':<{width}}  {'method':<16} {'accuracy %':>10} {'mIoU %':>8} {'images':>6}"]
    for r in rows:
        lines.append(f"{r['run']:<{width}}  {r['method']:<16} {r['accuracy']:>10.1f} {r['miou']:>8.1f} "
                     f"{'' if r['images'] is None else r['images']:>6}")
    return "\n".join(lines)


def plot_runs(runs: Mapping[str, str | Path | Mapping], *, title: str | None = None) -> Figure:
    """Training curves of several runs on shared axes: HP loss, lambda, cluster and linear probe mIoU.

    Args:
        runs: ``{"paper style": run_dir, "official style": other_run_dir}`` (run folders, their
            ``history.json`` or the dicts themselves).
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6), layout="constrained")
    for i, (name, run) in enumerate(runs.items()):
        h = read_history(run)
        color = f"C{i}"
        steps, validation = h.get("steps", []), h.get("validation", [])
        x = [e["step"] for e in steps]
        axes[0].plot(x, [e["loss"] for e in steps], color=color, lw=1, label=name)
        axes[1].plot(x, [e["lambda"] for e in steps], color=color, lw=1.5, label=name)
        vx = [v["step"] for v in validation]
        axes[2].plot(vx, [100 * v["cluster_miou"] for v in validation], "-o", color=color, ms=3,
                     label=f"{name}: cluster probe")
        axes[2].plot(vx, [100 * v["linear_miou"] for v in validation], "--s", color=color, ms=3,
                     label=f"{name}: linear probe")
    axes[0].set(xlabel="step", ylabel="loss", title="HP loss (scale differs between styles)")
    axes[1].set(xlabel="step", ylabel="$\\lambda$", title="$\\lambda$ (weight of the task-specific positives)",
                ylim=(-0.05, 1.05))
    axes[2].set(xlabel="step", ylabel="mIoU %", title="Validation mIoU")
    for ax in axes:
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig
