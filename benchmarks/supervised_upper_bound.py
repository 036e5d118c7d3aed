"""The upper-bound check for issue 4: the ``random_tiny`` ViT trained *with labels* on the synthetic scenes.

Usage::

    python benchmarks/supervised_upper_bound.py 400 /tmp/supervised400.safetensors
    python benchmarks/backbone_quality.py /tmp/supervised400.safetensors

Trains the ViT plus a linear patch classifier with cross-entropy on the label at each patch's centre
(1000 train scenes at 128 px, batch 32, AdamW lr 5e-4, weight decay 0.05, seed 0) and writes the ViT
in the format ``load_backbone("random_tiny", weights=...)`` reads. This is not a backbone to use: it
shows what the architecture and the data can carry when the features are learned well, which a
self-supervised backbone should approach. 400 steps take about 7 minutes on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpkit.data import SyntheticScenes  # noqa: E402
from hpkit.lessons.diagnostics import patch_labels  # noqa: E402
from hpkit.backbones.pretrain import DINOHead, DINONet, PretrainConfig, build_vit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("steps", type=int)
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    torch.manual_seed(0)
    data = SyntheticScenes("train", num_images=1000, image_size=128)
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = patch_labels(torch.stack([data[i][1] for i in range(len(data))]), (16, 16))
    net = DINONet(build_vit(PretrainConfig()), DINOHead(192, 16))  # only its normalisation and tokens() are used
    classifier = torch.nn.Linear(192, len(data.class_names))
    optimizer = torch.optim.AdamW([*net.backbone.parameters(), *classifier.parameters()], lr=5e-4, weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    started = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, len(images), (32,), generator=gen)
        tokens = net.tokens(images[idx])[1]  # (32, 16, 16, 192)
        loss = F.cross_entropy(classifier(tokens).reshape(-1, classifier.out_features), labels[idx].reshape(-1),
                               ignore_index=-1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - started:.0f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.backbone.state_dict().items()}, str(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
