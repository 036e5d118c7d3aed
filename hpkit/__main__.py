"""Command line: ``python -m hpkit <command>`` (also installed as ``hpkit``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hpkit", description="Hidden positives for unsupervised segmentation")
    sub = parser.add_subparsers(dest="command", required=True)
    quick = sub.add_parser("quickstart", help="run one HP step end to end and explain each stage")
    quick.add_argument("--backbone", default="auto", help="backbone name (default: auto)")
    quick.add_argument("--batch", type=int, default=4)
    quick.add_argument("--image-size", type=int, default=64, help="multiple of the patch size")
    quick.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "quickstart":
        from .quickstart import run_quickstart

        try:
            run_quickstart(backbone=args.backbone, batch=args.batch, image_size=args.image_size, seed=args.seed)
        except (ValueError, FileNotFoundError) as err:
            print(f"hpkit: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
