"""HP on real photos without labels: train the demo preset on a folder, segment every photo, one picture.

Usage::

    python benchmarks/real_photos.py --out docs/images/real_photos_hp_tiny.png            # hp-tiny
    python benchmarks/real_photos.py --set model.backbone=random_tiny \\
        --set model.weights=runs/photos_recipe/backbone.safetensors --out docs/images/real_photos_recipe.png
    python benchmarks/real_photos.py --root DIR --out mine.png                              # your photos

The photos are ``--root`` or, by default, the sample photos that scikit-learn, matplotlib and
scikit-image ship (:func:`hpkit.data.write_sample_photos`). HP trains with the demo preset on the
folder (:func:`hpkit.lessons.workspace.photos_config`: ``data.dataset=folder``, one random 128 px square per
photo, pool size and batch capped at the number of photos, at least 64 steps; ``model.num_clusters``
6 unless set), then :func:`hpkit.segment` labels each whole
photo at ``data.val_size`` (128 px shorter side). The picture has one row per photo: the photo and its
clusters, coloured alike in every row (cluster k has the same colour everywhere). With no labels there
is no score: the picture is the result. Prints the time and each cluster's share of the pixels.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hpkit  # noqa: E402
from hpkit.pipeline.checkpoint import load_run  # noqa: E402
from hpkit.data import scan_folder, write_sample_photos  # noqa: E402
from hpkit.lessons.plots import colorize, legend_handles  # noqa: E402
from hpkit.pipeline.train import train  # noqa: E402
from hpkit.lessons.workspace import photos_config, resolved_backbone  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None, help="a folder of photos (default: the packages' sample photos)")
    parser.add_argument("--out", required=True, help="the picture to write (PNG)")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --set model.weights=FILE")
    parser.add_argument("--rows", type=int, default=4, help="photos shown")
    args = parser.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "photos"
        if args.root is None:
            write_sample_photos(root)
        files = scan_folder(root).splits["train"].images
        cfg = photos_config(root, overrides=["model.num_clusters=6", *args.set])
        name = resolved_backbone(cfg)
        run = Path(tmp) / "run"
        train(cfg, run, progress=False)
        trained = load_run(run)
        results = [hpkit.segment(path, trained) for path in files]
        shown = results[: args.rows]
        fig, axes = plt.subplots(len(shown), 2, figsize=(7.5, 2.6 * len(shown)), squeeze=False, layout="constrained")
        for row, (path, seg) in zip(axes, zip(files, shown)):
            row[0].imshow(seg.image)
            row[0].set_title(path.name, fontsize=8)
            row[1].imshow(colorize(seg.labels, seg.colors), interpolation="nearest")
            row[1].set_title(f"HP clusters ({Path(name.split(':')[-1]).name})", fontsize=8)
            for ax in row:
                ax.axis("off")
        fig.legend(handles=legend_handles(shown[0].class_names, shown[0].colors), loc="outside right center",
                   fontsize=8)
        fig.savefig(args.out, dpi=90)
    pixels = np.concatenate([r.labels.ravel() for r in results])
    shares = np.bincount(pixels, minlength=len(results[0].class_names)) / pixels.size
    print(f"{len(files)} photos; clusters' share of the pixels: " + ", ".join(f"{100 * s:.0f}%" for s in shares))
    print(f"picture written to {args.out}; {time.time() - started:.0f} s; load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
