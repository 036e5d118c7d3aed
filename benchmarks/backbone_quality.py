"""What a frozen backbone offers HP on the synthetic scenes, against the random ``random_tiny``.

Usage::

    python benchmarks/backbone_quality.py                          # random_tiny only
    python benchmarks/backbone_quality.py weights/a.safetensors    # plus backbones exported by hpkit pretrain

For each backbone (``random_tiny`` architecture; a weights file is loaded into it): a linear probe on
frozen patch features trained on ``--train`` synthetic train scenes and scored per pixel on ``--val``
val scenes; k-means (k = 9) on the val features, Hungarian-matched; and the Fig. 1(c) premise: among
the 8 neighbours of every patch, the same-class rate of those above / below the anchor's attention
row mean (:mod:`hpkit.diagnostics`). Prints a markdown table; deterministic for given inputs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpkit import load_backbone  # noqa: E402
from hpkit.data import SyntheticScenes  # noqa: E402
from hpkit.diagnostics import attention_agreement, extract, kmeans_miou, linear_probe_miou, patch_labels  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", nargs="*", help="safetensors files for the random_tiny architecture")
    parser.add_argument("--train", type=int, default=100, help="train scenes for the linear probe")
    parser.add_argument("--val", type=int, default=50, help="val scenes scored")
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    train = SyntheticScenes("train", num_images=args.train, image_size=args.image_size)
    val = SyntheticScenes("val", num_images=args.val, image_size=args.image_size)
    n = len(train.class_names)
    print("| backbone | linear acc | linear mIoU | k-means acc | k-means mIoU | same class: above mean | below mean |")
    print("|---|---|---|---|---|---|---|")
    started = time.time()
    for name, weights in [("random_tiny", None)] + [(Path(w).name, w) for w in args.weights]:
        backbone = load_backbone("random_tiny", weights=weights)
        tr, va = extract(backbone, train), extract(backbone, val, attention=True)
        lin, km = linear_probe_miou(tr, va, n), kmeans_miou(va, n)
        att = attention_agreement(va["attn"], patch_labels(va["labels"], va["feats"].shape[-2:]))
        print(f"| {name} | {100 * lin['pixel_accuracy']:.1f} | {100 * lin['mean_iou']:.1f} | "
              f"{100 * km['pixel_accuracy']:.1f} | {100 * km['mean_iou']:.1f} | {att['above']:.3f} | "
              f"{att['below']:.3f} |", flush=True)
    print(f"\n{args.train} train / {args.val} val scenes at {args.image_size} px; {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
