"""Command line: ``python -m hpkit <command>`` (also installed as ``hpkit``).

Commands: ``quickstart`` (one HP step, explained), ``train`` (a preset plus ``--set`` overrides;
under ``torchrun`` on several GPUs), ``eval`` (metrics of a trained run, optionally with CRF;
``--json`` prints one JSON object, ``--plots`` writes figures), ``segment`` (label map and a
picture of one photo), ``sample-photos`` (real photos that installed packages ship, as a folder),
``prepare`` (five-crop copies of a real dataset), ``download`` (a real dataset's sources, a
resumable download and a layout check), ``pretrain`` (DINO pretraining of a tiny ViT,
:mod:`hpkit.backbones.pretrain`), ``align-attention`` (train a backbone's last-block attention to follow its
features' affinity, :mod:`hpkit.backbones.alignment`).

Each command imports what it needs when it runs, so ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpkit", description="Hidden positives for unsupervised segmentation")
    sub = parser.add_subparsers(dest="command", required=True)
    quick = sub.add_parser("quickstart", help="run one HP step end to end and explain each stage")
    quick.add_argument("--backbone", default="auto", help="backbone name (default: auto)")
    quick.add_argument("--batch", type=int, default=4)
    quick.add_argument("--image-size", type=int, default=64, help="multiple of the patch size")
    quick.add_argument("--seed", type=int, default=0)
    train = sub.add_parser("train", help="train HP from a preset")
    train.add_argument("--preset", default="demo", help="cocostuff27 | cityscapes27 | potsdam3 | demo")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set loss.tau=0.6 (repeatable)")
    train.add_argument("--out", required=True, help="output folder (checkpoint, config, history)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    train.add_argument("--force", action="store_true", help="delete a run already in OUT and start over")
    train.add_argument("--max-steps", type=int, default=None, help="stop after this many iterations")
    ev = sub.add_parser("eval", help="evaluate a trained run on its validation split")
    ev.add_argument("run_dir", help="folder written by `hpkit train` (or its checkpoint.pt)")
    ev.add_argument("--crf", action="store_true", help="also report CRF-refined predictions")
    ev.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    ev.add_argument("--max-images", type=int, default=None)
    ev.add_argument("--plots", action="store_true",
                    help="also write history.png and confusion_cluster.png / confusion_linear.png (labelled data) "
                         "or clusters.png (unlabelled) into the run folder")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    prep = sub.add_parser("prepare", help="write the five-crop training copies of a real dataset")
    prep.add_argument("dataset", help="cocostuff27 | cityscapes27 (potsdam3 needs no crops)")
    prep.add_argument("--root", required=True, help="the dataset folder (as data.root)")
    prep.add_argument("--split", default="train", help="split to crop (default: train, as the official code)")
    prep.add_argument("--workers", type=int, default=4, help="threads reading and writing images")
    down = sub.add_parser("download", help="print a dataset's sources, download it (resumable) and check it")
    down.add_argument("dataset", help="cocostuff27 | cityscapes27 | potsdam3")
    down.add_argument("--root", required=True, help="the dataset folder to create")
    down.add_argument("--url", default=None, help="another mirror of the pre-packaged zip")
    down.add_argument("--check", action="store_true", help="only check the folder's layout, download nothing")
    sub.add_parser("pretrain", add_help=False,
                   help="pretrain a tiny ViT with DINO, settings as --set FIELD=VALUE (hpkit pretrain --help lists "
                        "them), or a whole recipe with --recipe NAME")
    sub.add_parser("align-attention", add_help=False,
                   help="train a backbone's last-block attention to follow its features' cosine affinity "
                        "(--set FIELD=VALUE; hpkit align-attention --help lists them)")
    photos = sub.add_parser("sample-photos", help="copy the real sample photos that installed packages ship into DIR")
    photos.add_argument("dir", help="folder to create (flat, no labels: train on it with data.dataset=folder)")
    seg = sub.add_parser("segment", help="segment an image with a trained run")
    seg.add_argument("image", help="image file (any size)")
    seg.add_argument("--checkpoint", required=True, help="run folder written by `hpkit train` (or its checkpoint.pt)")
    seg.add_argument("--out", default=None, help="write photo | labels side by side with a legend here (PNG)")
    seg.add_argument("--labels-out", default=None, help="write the label map here (PNG of ids; 255 = unmatched)")
    seg.add_argument("--overlay-out", default=None, help="write the photo blended with the label colours here")
    seg.add_argument("--size", type=int, default=None,
                     help="shorter side the backbone sees (default: the run's data.val_size)")
    seg.add_argument("--crf", action="store_true", help="refine with the dense CRF")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] in (["pretrain"], ["align-attention"]):  # their own parsers: --set FIELD=VALUE per field
            return _backbone_command(argv)
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args) or 0
    except (ValueError, FileNotFoundError, ImportError, OSError, RuntimeError) as err:
        print(f"hpkit: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hpkit: interrupted", file=sys.stderr)
        return 130


def _backbone_command(argv: list[str]) -> int:
    if argv[0] == "pretrain" and any(arg == "--recipe" or arg.startswith("--recipe=") for arg in argv[1:]):
        from hpkit.backbones.recipe import main as command
    elif argv[0] == "pretrain":
        from hpkit.backbones.pretrain import main as command
    else:
        from hpkit.backbones.alignment import main as command
    command(argv[1:], prog=f"hpkit {argv[0]}")
    return 0


def _quickstart(args: argparse.Namespace) -> None:
    from hpkit.lessons.quickstart import run_quickstart

    run_quickstart(backbone=args.backbone, batch=args.batch, image_size=args.image_size, seed=args.seed)


def _train(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from hpkit.pipeline.config import get_config
    from hpkit.pipeline.train import train

    cfg = get_config(args.preset, args.overrides)
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only the first process reports
    said = {"ramp": False}

    def report(record: dict) -> None:
        if not said["ramp"] and record["lambda"] > 0:
            said["ramp"] = True
            tqdm.write(f"step {record['step']}: lambda starts to rise from 0 (loss.warmup={cfg.loss.warmup}), mixing "
                       "in the task-specific positives of S' (Eq. 11): the loss rises with it; that is expected")
        if "validation" in record:
            v = record["validation"]
            tqdm.write(f"step {v['step']}: validation cluster accuracy {100 * v['cluster_accuracy']:.1f} "
                       f"mIoU {100 * v['cluster_miou']:.1f} | linear accuracy {100 * v['linear_accuracy']:.1f} "
                       f"mIoU {100 * v['linear_miou']:.1f}")

    result = train(cfg, args.out, resume=args.resume, force=args.force, max_steps=args.max_steps, on_step=report)
    if main_process:
        last = result["history"][-1]["loss"] if result["history"] else float("nan")
        print(f"trained {result['steps']} steps, last loss {last:.4f}; checkpoint in {args.out}")
        print(f"next: hpkit eval {args.out} --plots")


def _eval(args: argparse.Namespace) -> None:
    from hpkit.pipeline.evaluate import evaluate

    result = evaluate(args.run_dir, crf=args.crf, max_images=args.max_images, progress=not args.no_progress)
    if args.plots:
        _write_plots(args.run_dir, result)
    if args.json:
        print(json.dumps(result))
    else:
        _print_eval(result)


def _prepare(args: argparse.Namespace) -> None:
    from hpkit.data.prepare import five_crop

    folder = five_crop(args.dataset, args.root, args.split, workers=args.workers)
    print(f"five-crop copies of {args.split} in {folder}; train with --set data.root={args.root}")


def _download(args: argparse.Namespace) -> int:
    from hpkit.data.prepare import check_layout, download

    if not args.check:
        download(args.dataset, args.root, url=args.url)
    problems = check_layout(args.dataset, args.root)
    print("\n".join(problems) if problems else f"{args.root} is ready for {args.dataset}")
    return 1 if problems else 0


def _sample_photos(args: argparse.Namespace) -> None:
    from hpkit.data.samples import write_sample_photos

    written = write_sample_photos(args.dir)
    print(f"{len(written)} photos written to {args.dir}: {', '.join(p.name for p in written)}")


def _segment(args: argparse.Namespace) -> None:
    import numpy as np

    from hpkit.pipeline.inference import save_label_png, segment

    for option in ("out", "labels_out", "overlay_out"):  # fail before the work, not after it
        target = getattr(args, option)
        if target and not os.path.isdir(os.path.dirname(os.path.abspath(target))):
            raise FileNotFoundError(f"--{option.replace('_', '-')} {target}: its folder does not exist")
    result = segment(args.image, args.checkpoint, crf=args.crf, size=args.size)
    ids, counts = np.unique(result.labels, return_counts=True)
    names = result.class_names
    parts = [f"{names[i] if 0 <= i < len(names) else 'unmatched'}: {100 * c / result.labels.size:.1f}%"
             for i, c in zip(ids.tolist(), counts.tolist())]
    print(f"{result.labels.shape[1]}x{result.labels.shape[0]} pixels; " + ", ".join(parts))
    if result.note:
        print(f"note: {result.note}")
    if args.out:
        from hpkit.lessons.plots import headless, plot_photo_segmentation

        headless()
        plot_photo_segmentation(result).savefig(args.out, dpi=110)
        print(f"photo and {result.named} written to {args.out}")
    if args.labels_out:
        save_label_png(result.labels, args.labels_out)
        print(f"label map (ids; 255 = unmatched) written to {args.labels_out}")
    if args.overlay_out:
        result.overlay.save(args.overlay_out)
        print(f"overlay written to {args.overlay_out}")


COMMANDS = {"quickstart": _quickstart, "train": _train, "eval": _eval, "prepare": _prepare, "download": _download,
            "sample-photos": _sample_photos, "segment": _segment}


def _print_eval(result: dict) -> None:
    for note in result.get("notes", []):
        print(f"note: {note}")
    where = "the training images (no val split)" if result.get("split") == "train" else "the val split"
    print(f"{result['images']} images of {where}, step {result.get('step')}")
    if result.get("labelled") is False:
        shares = ", ".join(f"cluster {k}: {100 * p:.1f}% of pixels in {100 * q:.0f}% of images"
                           for k, (p, q) in enumerate(zip(result["pixel_share"], result["image_share"])))
        print(f"{result['clusters']} clusters; {shares}")
        return
    for key in ("cluster", "linear", "kmeans_backbone", "cluster_crf", "linear_crf"):
        if key in result:
            print(f"{key:>16}: accuracy {100 * result[key]['pixel_accuracy']:.1f}  "
                  f"mIoU {100 * result[key]['mean_iou']:.1f}")
    names = result["classes"]
    print("cluster -> class: " + ", ".join(f"{k}->{names[c] if c >= 0 else '?'}"
                                           for k, c in enumerate(result["cluster"]["mapping"])))


def _write_plots(run_dir: str, result: dict) -> None:
    from hpkit.lessons.plots import headless, plot_cluster_gallery, plot_confusion, plot_history
    from hpkit.pipeline.checkpoint import run_folder

    headless()

    out = run_folder(run_dir)
    written = []
    if (out / "history.json").is_file():
        plot_history(out).savefig(out / "history.png", dpi=120)
        written.append("history.png")
    if result.get("labelled") is False:
        plot_cluster_gallery(out).savefig(out / "clusters.png", dpi=100)
        written.append("clusters.png")
    else:
        for key in ("cluster", "linear"):
            plot_confusion(result[key]["confusion"], result["classes"], title=f"{key} probe").savefig(
                out / f"confusion_{key}.png", dpi=120)
            written.append(f"confusion_{key}.png")
    print(f"plots written to {out}: {', '.join(written)}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
