"""bf16 autocast against float32 for the pretraining recipe's stages 1 and 2, on the CPU.

Usage::

    python benchmarks/pretrain_amp.py                   # stages 1 and 2, 4 steps, 2 rounds, 2 threads
    python benchmarks/pretrain_amp.py --stages 1 --steps 6 --rounds 3 --threads 1

Each stage runs with the ``hp-tiny`` recipe's settings at the card's budget (:mod:`hpkit.backbones.recipe`:
batch 32 of 128 px synthetic scenes; 64 scenes are enough for a few steps), alternating float32 and
bf16 autocast (A B A B ...) so that a machine getting busier slows both alike. A step's time is
``pretrain``'s own per-step ``seconds``; the first step of every run is left out (warm-up). Prints a
markdown table of the median seconds per step, the speed-up and the largest relative difference of
the losses, with the 1-minute load average: a figure is only valid from an idle machine. Whether
bf16 helps depends on the CPU: ``hpkit.backbones.recipe.bf16_is_fast`` turns it on where the CPU has bf16
instructions.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpkit.backbones.pretrain import pretrain  # noqa: E402
from hpkit.backbones.recipe import RECIPES, make_plan, stage_configs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2], choices=[1, 2])
    parser.add_argument("--steps", type=int, default=4, help="steps per run (the first is left out)")
    parser.add_argument("--rounds", type=int, default=2, help="float32 / bf16 pairs per stage")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = RECIPES["hp-tiny"]
    plan = make_plan(recipe, sum(recipe.card_steps), recipe.num_images)
    configs = stage_configs(recipe, plan, dataset="synthetic", root=None, stage1_export="unused")
    print("| stage | float32 s/step | bf16 s/step | speed-up | largest loss difference |")
    print("|---|---|---|---|---|")
    for stage in args.stages:
        base = dataclasses.replace(configs[stage - 1], num_images=64, init_weights=None)
        seconds: dict[bool, list[float]] = {False: [], True: []}
        gap = 0.0
        for _ in range(args.rounds):
            losses = {}
            for amp in (False, True):
                with tempfile.TemporaryDirectory() as out:
                    result = pretrain(dataclasses.replace(base, amp=amp), out, max_steps=args.steps, progress=False)
                seconds[amp] += [h["seconds"] for h in result["history"][1:]]
                losses[amp] = [h["loss"] for h in result["history"]]
            gap = max([gap] + [abs(b - a) / abs(a) for a, b in zip(losses[False], losses[True])])
        fp32, bf16 = statistics.median(seconds[False]), statistics.median(seconds[True])
        print(f"| {stage} | {fp32:.2f} | {bf16:.2f} | {fp32 / bf16:.2f}x | {100 * gap:.2f} % |", flush=True)
    print(f"\n{args.steps} steps x {args.rounds} rounds per mode, {args.threads} threads; "
          f"1-minute load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
