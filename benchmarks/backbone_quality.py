"""What a frozen backbone offers HP on the synthetic scenes, against the random ``random_tiny``.

Usage::

    python benchmarks/backbone_quality.py                          # random_tiny only
    python benchmarks/backbone_quality.py hp-tiny                  # plus the bundled backbone
    python benchmarks/backbone_quality.py weights/a.safetensors    # plus backbones exported by hpkit pretrain

For each backbone (``random_tiny`` architecture; a weights file is loaded into it, a name such as
``hp-tiny`` is loaded by name): a linear probe on frozen patch features trained on ``--train``
synthetic train scenes and scored per pixel on ``--val`` val scenes; k-means (k = 9) on the val
features, Hungarian-matched; the Fig. 1(c) premise: among the 8 neighbours of every patch, the
same-class rate of those above / below the anchor's attention row mean (:mod:`hpkit.diagnostics`);
and GHP precision: with a task-agnostic pool of one random patch from each of ``--pool`` train
scenes, the share of the val patches' global hidden positives that have the anchor's class
(:func:`hpkit.explorer.positives_vs_pool_size`, Eq. 2-3). Prints a markdown table; deterministic
for given inputs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpkit import BACKBONES, load_backbone  # noqa: E402
from hpkit.data import SyntheticScenes  # noqa: E402
from hpkit.diagnostics import (attention_agreement, extract, ghp_precision, kmeans_miou,  # noqa: E402
                               linear_probe_miou, patch_labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", nargs="*", help="backbone names (hp-tiny) or safetensors files for the "
                        "random_tiny architecture")
    parser.add_argument("--train", type=int, default=100, help="train scenes for the linear probe")
    parser.add_argument("--val", type=int, default=50, help="val scenes scored")
    parser.add_argument("--pool", type=int, default=256, help="train scenes giving one pool patch each (GHP)")
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    scenes = max(args.train, args.pool)
    train = SyntheticScenes("train", num_images=scenes, image_size=args.image_size)
    val = SyntheticScenes("val", num_images=args.val, image_size=args.image_size)
    n = len(train.class_names)
    print("| backbone | linear acc | linear mIoU | k-means acc | k-means mIoU | same class: above mean | below mean "
          "| GHP precision |")
    print("|---|---|---|---|---|---|---|---|")
    started = time.time()
    for arg in ["random_tiny", *args.weights]:
        named = arg in BACKBONES
        backbone = load_backbone(arg) if named else load_backbone("random_tiny", weights=arg)
        everything = extract(backbone, train)
        tr = {k: v[: args.train] for k, v in everything.items()}
        va = extract(backbone, val, attention=True)
        lin, km = linear_probe_miou(tr, va, n), kmeans_miou(va, n)
        labels = patch_labels(va["labels"], va["feats"].shape[-2:])
        att = attention_agreement(va["attn"], labels)
        ghp = ghp_precision(everything["feats"][: args.pool], va["feats"], labels)
        print(f"| {arg if named else Path(arg).name} | {100 * lin['pixel_accuracy']:.1f} | {100 * lin['mean_iou']:.1f} | "
              f"{100 * km['pixel_accuracy']:.1f} | {100 * km['mean_iou']:.1f} | {att['above']:.3f} | "
              f"{att['below']:.3f} | {100 * ghp:.1f} % |", flush=True)
    print(f"\n{args.train} train / {args.val} val scenes at {args.image_size} px, GHP pool of {args.pool} train "
          f"scenes; {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
