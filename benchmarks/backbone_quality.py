"""What a frozen backbone offers HP on a labelled dataset, against the random ``random_tiny``.

Usage::

    python benchmarks/backbone_quality.py                          # random_tiny only, synthetic scenes
    python benchmarks/backbone_quality.py hp-tiny                  # plus the bundled backbone
    python benchmarks/backbone_quality.py weights/a.safetensors    # plus backbones exported by hpkit pretrain
    python benchmarks/backbone_quality.py hp-tiny --set data.dataset=folder --set data.root=DIR  # your photos

The data is the demo preset's plus ``--set`` overrides (any dataset of ``hpkit.pipeline.config``; a folder
needs labels, in its ``train`` and ``val`` splits or ``train`` alone). Every image is the centre
square of ``data.image_size`` (train) / ``data.val_size`` (val) px, so features stack into one batch.
For each backbone (``random_tiny`` architecture; a weights file is loaded into it, a name such as
``hp-tiny`` is loaded by name): a linear probe on frozen patch features trained on ``--train``
train images and scored per pixel on ``--val`` val images; k-means (k = the number of classes) on the val
features, Hungarian-matched; the Fig. 1(c) premise: among the 8 neighbours of every patch, the
same-class rate of those above / below the anchor's attention row mean (:mod:`hpkit.lessons.diagnostics`);
and GHP precision: with a task-agnostic pool of one random patch from each of ``--pool`` train
images, the share of the val patches' global hidden positives that have the anchor's class
(:func:`hpkit.lessons.explorer.positives_vs_pool_size`, Eq. 2-3). Prints a markdown table; deterministic
for given inputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpkit import BACKBONES, load_backbone  # noqa: E402
from hpkit.pipeline.config import get_config  # noqa: E402
from hpkit.pipeline.datasets import build_dataset  # noqa: E402
from hpkit.lessons.diagnostics import (attention_agreement, extract, ghp_precision, kmeans_miou,  # noqa: E402
                               linear_probe_miou, patch_labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", nargs="*", help="backbone names (hp-tiny) or safetensors files for the "
                        "random_tiny architecture")
    parser.add_argument("--train", type=int, default=100, help="train images for the linear probe (at most)")
    parser.add_argument("--val", type=int, default=50, help="val images scored (at most)")
    parser.add_argument("--pool", type=int, default=256, help="train images giving one pool patch each (GHP)")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="dataset settings, e.g. --set data.dataset=folder --set data.root=DIR")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    cfg = get_config("demo", ["data.num_train=" + str(max(args.train, args.pool)), f"data.num_val={args.val}",
                              "data.train_crop=center", "data.val_crop=center", *args.set])
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    n = len(train.class_names)
    if not n or not getattr(val, "labelled", True):
        raise SystemExit("backbone_quality.py needs labels: use a folder with train/labels (and val/labels)")
    for note in getattr(train, "notes", []):
        print(f"note: {note}")
    args.train, args.val, args.pool = (min(args.train, len(train)), min(args.val, len(val)),
                                       min(args.pool, len(train)))
    print("| backbone | linear acc | linear mIoU | k-means acc | k-means mIoU | same class: above mean | below mean "
          "| GHP precision |")
    print("|---|---|---|---|---|---|---|---|")
    started = time.time()
    for arg in ["random_tiny", *args.weights]:
        named = arg in BACKBONES
        backbone = load_backbone(arg) if named else load_backbone("random_tiny", weights=arg)
        everything = extract(backbone, train, max_images=max(args.train, args.pool))
        tr = {k: v[: args.train] for k, v in everything.items()}
        va = extract(backbone, val, max_images=args.val, attention=True)
        lin, km = linear_probe_miou(tr, va, n), kmeans_miou(va, n)
        labels = patch_labels(va["labels"], va["feats"].shape[-2:])
        att = attention_agreement(va["attn"], labels)
        ghp = ghp_precision(everything["feats"][: args.pool], va["feats"], labels)
        print(f"| {arg if named else Path(arg).name} | {100 * lin['pixel_accuracy']:.1f} | {100 * lin['mean_iou']:.1f} | "
              f"{100 * km['pixel_accuracy']:.1f} | {100 * km['mean_iou']:.1f} | {att['above']:.3f} | "
              f"{att['below']:.3f} | {100 * ghp:.1f} % |", flush=True)
    where = cfg.data.dataset + (f" ({cfg.data.root})" if cfg.data.root else "")
    print(f"\n{where}: {args.train} train / {args.val} val images, centre squares of {cfg.data.image_size} / "
          f"{cfg.data.val_size} px, {n} classes, GHP pool of {args.pool} train images; {time.time() - started:.0f} s; "
          f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
