"""``python -m hpkit.backbones.pretrain OUT_DIR ...``: the same as ``hpkit pretrain OUT_DIR ...``."""

from hpkit.backbones.pretrain.cli import main

main()
