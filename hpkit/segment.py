"""Segment a new image with a trained run, on CPU, at any image size.

``segment(image, run_dir)`` returns a label map of the image's own size and a colour overlay. The
image is resized so that both sides are multiples of the backbone's patch (nearest multiple, at least
one patch; the label map is resized back), features are optionally averaged with the horizontal flip
(as STEGO's evaluation), clusters come from the trained cluster probe and are named by the mapping
found at evaluation time when ``eval.json`` exists, and the dense CRF can refine the result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .crf import dense_crf
from .data.folder import load_rgb
from .data.synthetic import CLASS_NAMES
from .checkpoint import load_run

__all__ = ["segment", "Segmentation"]


@dataclass
class Segmentation:
    labels: np.ndarray  # (H, W) int64 class ids (cluster ids mapped to classes when known)
    overlay: Image.Image  # the image blended with the label colours
    class_names: list[str]


@torch.no_grad()
def segment(image: str | Path | Image.Image | np.ndarray, run_dir: str | Path, *, crf: bool = False,
            flip: bool = True, device: str = "cpu") -> Segmentation:
    """Label every pixel of an image with the run's cluster probe.

    Args:
        image: a path, a PIL image or an (H, W, 3) uint8 array (any size, any PIL mode).
        run_dir: folder written by ``hpkit train``.
        crf: refine with the dense CRF.
        flip: average the features of the image and its horizontal flip.

    Returns:
        :class:`Segmentation` with the (H, W) label map, an overlay image and the class names.
    """
    run = load_run(run_dir, device)
    cfg, backbone, head, cluster = run.cfg, run.backbone, run.head, run.cluster
    if isinstance(image, (str, Path)):
        pil = load_rgb(image)
    elif isinstance(image, np.ndarray):
        pil = Image.fromarray(image).convert("RGB")
    else:
        pil = image.convert("RGB")

    w, h = pil.size
    p = backbone.patch_size
    size = (max(p, round(h / p) * p), max(p, round(w / p) * p))  # nearest multiple of the patch
    x = torch.from_numpy(np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32) / 255)
    x = x.permute(2, 0, 1)[None].to(device)
    s = head(backbone(x, attention=False).feats)
    if flip:
        s = (s + head(backbone(x.flip(-1), attention=False).feats).flip(-1)) / 2
    scores = F.interpolate(cluster(s), size=(h, w), mode="bilinear", align_corners=False)[0]
    if crf:
        full = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)
        labels = dense_crf(full, 2.0 * scores.cpu()).argmax(0)
    else:
        labels = scores.argmax(0).cpu()

    names = list(CLASS_NAMES) if cfg.data.dataset == "synthetic" else []
    eval_file = Path(run_dir) / "eval.json"
    if eval_file.is_file():
        mapping = torch.tensor(json.loads(eval_file.read_text())["cluster"]["mapping"])
        labels = mapping[labels]
    labels = labels.numpy().astype(np.int64)
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, size=(max(int(labels.max()) + 2, 2), 3), dtype=np.uint8)
    colour = palette[np.where(labels >= 0, labels, palette.shape[0] - 1)]
    overlay = Image.blend(pil, Image.fromarray(colour), alpha=0.5)
    return Segmentation(labels=labels, overlay=overlay, class_names=names)
