"""``hpkit pretrain OUT_DIR [--set FIELD=VALUE ...] [--resume] [--max-steps N] [--export FILE]``: one
pretraining run from the command line (``hpkit pretrain --recipe NAME ...`` runs a whole recipe
instead: :func:`hpkit.backbones.recipe.main`, which ``hpkit.__main__`` dispatches to)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from hpkit.backbones.pretrain.config import PretrainConfig
from hpkit.backbones.pretrain.export import export_backbone
from hpkit.backbones.pretrain.flags import add_config_flags, config_from_flags
from hpkit.backbones.pretrain.loop import pretrain

__all__ = ["main"]

DESCRIPTION = "Pretrain hpkit's tiny ViT with DINO self-distillation (Caron et al., ICCV 2021), offline, on CPU."


def main(argv: Sequence[str] | None = None, prog: str = "python -m hpkit.backbones.pretrain") -> None:
    """``hpkit pretrain OUT_DIR [--set FIELD=VALUE ...] [--resume] [--max-steps N] [--export FILE]``
    (``--FIELD-NAME VALUE`` works too).

    Raises:
        ValueError: an unknown or malformed setting (one line, with the closest field), or ``--recipe``,
            which ``hpkit pretrain`` (:func:`hpkit.backbones.recipe.main`) handles, not this function.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg == "--recipe" or arg.startswith("--recipe=") for arg in argv):
        raise ValueError("--recipe runs a whole recipe: use `hpkit pretrain --recipe NAME ...` "
                         "(hpkit.backbones.recipe.main)")
    usage = "%(prog)s OUT_DIR [--set FIELD=VALUE ...] [--resume] [--max-steps N] [--export FILE.safetensors] [options]"
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, usage=usage)
    parser.add_argument("out_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--export", metavar="FILE.safetensors", help="export the teacher backbone at the end")
    parser.add_argument("--export-dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--export-network", default="auto", choices=("auto", "teacher", "student"),
                        help="auto: the teacher when a DINO term trained it, else the student")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--recipe", metavar="NAME", help="run a whole named recipe instead, e.g. hp-tiny: "
                        "--recipe hp-tiny OUT --root DIR --minutes 30 (--recipe hp-tiny --help lists its options)")
    add_config_flags(parser, PretrainConfig)
    args = parser.parse_args(argv)
    cfg = config_from_flags(args, PretrainConfig)
    result = pretrain(cfg, args.out_dir, resume=args.resume, max_steps=args.max_steps, progress=not args.no_progress)
    print(f"{result['steps']} steps in {result['seconds'] / 60:.1f} min; checkpoint {result['checkpoint']}")
    if args.export:
        written = export_backbone(args.out_dir, args.export, dtype=args.export_dtype, network=args.export_network)
        print(f"{json.loads(written.with_suffix('.json').read_text())['network']} backbone written to {written}")
