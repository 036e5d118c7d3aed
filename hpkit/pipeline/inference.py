"""Segment a photo with a trained run, on CPU, at any image size, in bounded memory.

``segment(image, run_dir)`` returns a label map of the photo's own size, its names and colours, an
and an overlay (``hpkit.lessons.plot_photo_segmentation`` draws photo | labels with a legend). The photo is resized so
its shorter side is ``size`` (default: the run's ``data.val_size``; both sides rounded to the
backbone's patch), so a 4000 x 3000 photo costs what a 427 x 320 one does; features are optionally
averaged with the horizontal flip (as STEGO's evaluation). The cluster scores are bilinearly
upsampled to the photo's size, or, above ``MAX_PIXELS``, to a size with that many pixels and the
label map then enlarged with nearest neighbour (the dense CRF, when asked, runs at that size too).
Clusters are named by the mapping ``hpkit eval`` found when ``eval.json`` exists (clusters left
unmatched get -1, "unmatched"), else ``cluster 0`` ... ``cluster K-1``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hpkit.data.folder import default_colors, load_rgb, resize_shorter
from hpkit.pipeline.checkpoint import TrainedRun, load_run
from hpkit.pipeline.crf import dense_crf
from hpkit.pipeline.probes import ClusterProbe

__all__ = ["segment", "Segmentation", "MAX_PIXELS", "save_label_png"]

#: label maps above this many pixels are computed at this size and enlarged with nearest neighbour
MAX_PIXELS = 2_000_000


@dataclass
class Segmentation:
    """A segmented photo."""

    labels: np.ndarray  # (H, W) int64 ids into class_names; -1 = a cluster with no matched class
    overlay: Image.Image  # the photo blended with the label colours
    class_names: list[str]  # the name of each id
    colors: np.ndarray  # (len(class_names), 3) uint8
    image: Image.Image  # the photo (RGB)
    named: str = "clusters"  # "clusters" (cluster k) or "classes" (matched by hpkit eval)
    note: str = ""  # how to read the names (e.g. that they are the synthetic demo's classes)


def save_label_png(labels: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W) id map as PNG: 8-bit with -1 stored as 255, or 16-bit when ids reach 255."""
    path = Path(path)
    if labels.max(initial=0) < 255:
        Image.fromarray(np.where(labels >= 0, labels, 255).astype(np.uint8), mode="L").save(path)
    else:
        Image.fromarray(np.where(labels >= 0, labels, 65535).astype(np.uint16)).save(path)
    return path


def _as_rgb(image: str | Path | Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, (str, Path)):
        return load_rgb(image)
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    return image.convert("RGB")


@torch.no_grad()
def segment(image: str | Path | Image.Image | np.ndarray, run_dir: str | Path | TrainedRun, *, crf: bool = False,
            flip: bool = True, size: int | None = None, device: str = "cpu") -> Segmentation:
    """Label every pixel of a photo with the run's cluster probe.

    Args:
        image: a path, a PIL image or an (H, W, 3) uint8 array (any size, any PIL mode).
        run_dir: folder written by ``hpkit train`` (or its ``checkpoint.pt``), or a run already
            loaded with :func:`hpkit.pipeline.checkpoint.load_run` (segmenting many photos loads it once).
        crf: refine with the dense CRF.
        flip: average the features of the image and its horizontal flip.
        size: the shorter side the backbone sees (default: the run's ``data.val_size``).

    Returns:
        :class:`Segmentation` with the (H, W) label map, names, colours, overlay and photo.
    """
    run = run_dir if isinstance(run_dir, TrainedRun) else load_run(run_dir, device)
    run_dir = run.folder
    cfg, backbone, head, cluster = run.cfg, run.backbone, run.head, run.cluster
    pil = _as_rgb(image)
    w, h = pil.size
    side = size or cfg.data.val_size
    if side < backbone.patch_size:
        raise ValueError(f"size={side} is below the backbone's patch ({backbone.patch_size} px)")
    x = np.asarray(resize_shorter(pil, side, Image.BILINEAR, backbone.patch_size), dtype=np.float32) / 255
    x = torch.from_numpy(x).permute(2, 0, 1)[None].to(device)
    s = head(backbone(x, attention=False).feats)
    if flip:
        s = (s + head(backbone(x.flip(-1), attention=False).feats).flip(-1)) / 2
    shrink = min(1.0, math.sqrt(MAX_PIXELS / (h * w)))
    out_h, out_w = max(1, round(h * shrink)), max(1, round(w * shrink))
    scores = F.interpolate(cluster(s), size=(out_h, out_w), mode="bilinear", align_corners=False)[0]
    if crf:
        shown = pil if shrink == 1.0 else pil.resize((out_w, out_h), Image.BILINEAR)
        full = torch.from_numpy(np.asarray(shown, dtype=np.float32) / 255).permute(2, 0, 1)
        ids = dense_crf(full, ClusterProbe.crf_logits(scores.cpu())).argmax(0)
    else:
        ids = scores.argmax(0).cpu()
    if shrink < 1.0:
        ids = torch.from_numpy(np.array(Image.fromarray(ids.numpy().astype(np.int32)).resize((w, h), Image.NEAREST)))

    k = cluster.centroids.shape[0]
    names, colors, named = [f"cluster {i}" for i in range(k)], default_colors(k), "clusters"
    note = "clusters of a run trained on hpkit's synthetic scenes" if cfg.data.dataset == "synthetic" else ""
    eval_file = run_dir / "eval.json" if run_dir is not None else None
    if eval_file is not None and eval_file.is_file():
        result = json.loads(eval_file.read_text())
        if "mapping" in result.get("cluster", {}):  # labelled evaluation: clusters -> classes
            ids = torch.tensor(result["cluster"]["mapping"])[ids.long()]
            names = list(result["classes"])
            colors = np.asarray(result["colors"], np.uint8) if "colors" in result else default_colors(len(names))
            named = "classes"
            if cfg.data.dataset == "synthetic":
                note = "class names of hpkit's synthetic scenes (the run was trained on them), not of this photo"
    labels = ids.numpy().astype(np.int64)
    colour = np.where(labels[..., None] >= 0, colors[np.clip(labels, 0, None)], 0).astype(np.uint8)
    overlay = Image.blend(pil, Image.fromarray(colour), alpha=0.5)
    return Segmentation(labels=labels, overlay=overlay, class_names=names, colors=colors, image=pil,
                        named=named, note=note)
