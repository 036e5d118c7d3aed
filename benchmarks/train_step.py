"""Time and peak memory of one HP training step, with and without the feature cache, and of the dense CRF.

Usage::

    python benchmarks/train_step.py                       # all cases, CPU, ViT-S/8 at batch 8
    python benchmarks/train_step.py --cases vits8 vits8+cache --batch 64 --device cuda --steps 8
    python benchmarks/train_step.py --cases demo demo+cache crf224 --json /tmp/train_step.json

Training cases (each in a fresh subprocess, so its peak memory is its own), on synthetic scenes:

- ``demo`` / ``demo+cache``: the ``demo`` preset (128 px, ``random_tiny`` = ViT patch 8, width 192,
  depth 6; batch 8, D = 64);
- ``vits8`` / ``vits8+cache``: the ``cocostuff27`` preset (ViT-S/8, D = 512, tau 0.8) at 224 px,
  batch ``--batch``, with *randomly initialised* ViT-S/8 weights (timm ``vit_small_patch8_224``,
  seed 0, saved to a temporary ``.pt`` file and passed as ``model.weights``: the DINO weights are not
  needed to time the step, only the architecture);

``+cache`` sets ``train.cache_features=true``. Every case runs :func:`hpkit.pipeline.train.train` with
``data.num_train = 2 * batch`` (two steps per epoch), ``loss.pool_size = num_train`` (the paper's
M = 2048 would need 2048 training images; M only enters the objective's (N, M) products),
``loss.warmup=0``, ``train.val_every=0``, ``data.num_workers=0`` and ``--steps`` steps. The first
epoch fills the cache; the reported time is the **median over the steps of epochs 2 and later**
(``--steps 6``: steps 3-6). ``train.amp`` stays ``auto`` (bf16 on CUDA, off on CPU). The Q^sp refresh
(every 20 / 100 steps) does not fall into so few steps.

What a step's time covers (``history[i]["seconds"]``, timed inside ``train``): from the moment the
batch has been loaded (synthetic rendering and collation are *not* included) to the end of the update:
copy to the device, clean-view backbone pass + LHP weights (or the cache lookup), photometric
augmentation (per image, on the CPU) and the augmented view's backbone pass (the cache cannot skip
it: the regulariser is on in both presets), heads, HP objective, regulariser, backward, clipping,
optimiser steps and the EMA update. On CUDA it ends with ``.item()`` reads queued after the EMA
update, so the time includes the GPU work. Validation, checkpoints and the initial patch bank are
outside it.

Peak memory: the process's peak resident set (CPU: VmHWM, reset through ``/proc/self/clear_refs``) or
``torch.cuda.max_memory_allocated`` (CUDA), **absolute** (backbone, heads, pools and PyTorch itself
included), over the timed steps only: the mark is reset after the last step of epoch 1 and read after
the last step, through a stand-in for ``hpkit.pipeline.train``'s progress bar (``update`` runs after every
step). Should ``train`` stop calling it, the peak covers the whole run instead and the table says so.
``--json`` also records the memory held when the window opened (``start_gb``) and the epoch-1 step
times (``first_epoch_s``: with the cache on, the steps that fill it).

CRF cases ``crf224`` / ``crf320``: :func:`hpkit.pipeline.crf.dense_crf` on a synthetic scene of that size with
random 27-class logits on the 8-pixel patch grid (resized inside, as in evaluation); the median of
``--crf-images`` images after one warm-up image, one process, one image at a time; its peak memory is
the growth of the peak resident set over the calls (as in ``objective.py``), not the absolute value.

The machine's 1-minute load average after each case is printed last: on a shared machine, a load
well above the CPU count means other processes slowed the case down (several-fold on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TRAIN_CASES = ["demo", "demo+cache", "vits8", "vits8+cache"]
CASES = TRAIN_CASES + ["crf224", "crf320"]
STEPS_PER_EPOCH = 2
CRF_CLASSES = 27


def _train_config(case: str, batch: int, steps: int, device: str, tmp: Path):
    from hpkit.pipeline.config import get_config

    num_train = STEPS_PER_EPOCH * batch
    common = {"data.dataset": "synthetic", "data.num_train": num_train, "data.num_val": 8,
              "data.batch_size": batch, "data.num_workers": 0, "loss.pool_size": num_train, "loss.warmup": 0,
              "train.epochs": -(-steps // STEPS_PER_EPOCH), "train.val_every": 0, "train.device": device,
              "train.cache_features": case.endswith("+cache")}
    if case.startswith("demo"):
        return get_config("demo", {**common, "model.backbone": "random_tiny"})
    import timm
    import torch

    weights = tmp / "vit_small_patch8_224_random.pt"
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0).state_dict(), weights)
    return get_config("cocostuff27", {**common, "data.image_size": 224, "data.val_size": 224,
                                      "model.backbone": "dino_vits8", "model.weights": str(weights)})


def _run_train_case(case: str, batch: int, steps: int, device: str) -> dict:

    from hpkit.pipeline.train import train
    from objective import _gb

    from hpkit._util import memory_in_use_mb, peak_memory_mb, reset_peak_memory

    window = {}

    def on_step(record: dict) -> None:  # window = the steps of epochs >= 2
        step = record["step"]
        if step == STEPS_PER_EPOCH:
            reset_peak_memory(device)
            window["start"] = step
            window["start_gb"] = _gb(memory_in_use_mb(device))
        elif step == steps and "start" in window:
            window["peak_gb"] = _gb(peak_memory_mb(device))

    with tempfile.TemporaryDirectory(prefix="hpkit_bench_") as tmp:
        cfg = _train_config(case, batch, steps, device, Path(tmp))
        reset_peak_memory(device)
        result = train(cfg, Path(tmp) / "run", max_steps=steps, progress=False,
                                    on_step=on_step)
        if "peak_gb" in window:
            peak, scope = window["peak_gb"], "timed steps"
        else:
            peak, scope = _gb(peak_memory_mb(device)), "whole run"
    seconds = [h["seconds"] for h in result["history"]]
    timed = seconds[STEPS_PER_EPOCH:]
    return {"step_s": statistics.median(timed), "steps_s": timed, "first_epoch_s": seconds[:STEPS_PER_EPOCH],
            "peak_gb": peak, "peak_scope": scope, "start_gb": window.get("start_gb"), "backbone": cfg.model.backbone,
            "image_px": cfg.data.image_size, "batch": cfg.data.batch_size, "dim": cfg.model.dim,
            "cache": cfg.train.cache_features}


def _run_crf_case(case: str, images: int) -> dict:
    import torch

    from hpkit.pipeline.crf import dense_crf
    from hpkit.data.synthetic import SyntheticScenes
    from objective import _gb

    from hpkit._util import memory_in_use_mb, peak_memory_mb, reset_peak_memory

    px = int(case[len("crf"):])
    data = SyntheticScenes("val", num_images=images + 1, image_size=px, seed=0, cache=False)
    gen = torch.Generator().manual_seed(0)
    jobs = [(data[i][0], 3 * torch.randn(CRF_CLASSES, px // 8, px // 8, generator=gen)) for i in range(images + 1)]
    reset_peak_memory("cpu")
    base = memory_in_use_mb("cpu")
    dense_crf(*jobs[0])  # warm-up
    times = []
    for image, logits in jobs[1:]:
        start = time.perf_counter()
        dense_crf(image, logits)
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "steps_s": times, "peak_gb": max(_gb(peak_memory_mb("cpu") - base), 0.0),
            "peak_scope": "CRF calls", "image_px": px, "batch": 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=CASES, choices=CASES)
    parser.add_argument("--steps", type=int, default=6,
                        help=f"training steps per case ({STEPS_PER_EPOCH} per epoch; the first epoch is not timed)")
    parser.add_argument("--batch", type=int, default=8, help="ViT-S/8 batch (the paper uses 64 on a GPU)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (the CRF always runs on the CPU)")
    parser.add_argument("--crf-images", type=int, default=5, help="images timed per CRF case")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args(argv)
    if args.steps <= STEPS_PER_EPOCH:
        parser.error(f"--steps must exceed {STEPS_PER_EPOCH}: the first epoch (which fills the cache) is not timed")

    if args.one:
        out = _run_crf_case(args.one, args.crf_images) if args.one.startswith("crf") else \
            _run_train_case(args.one, args.batch, args.steps, args.device)
        print(json.dumps(out))
        return 0

    rows = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--one", case, "--steps", str(args.steps), "--batch", str(args.batch),
               "--device", args.device, "--crf-images", str(args.crf_images)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or ["no output"]
            rows.append(dict(case=case, step_s=None, peak_gb=None, note=f"failed: {lines[-1][:80]}"))
        else:
            rows.append(dict(case=case, **json.loads(proc.stdout.strip().splitlines()[-1]), note=""))
        r = rows[-1]
        r["wall_s"] = time.perf_counter() - start
        r["load_1min"] = os.getloadavg()[0]  # other processes on the machine inflate the timings
        print(f"  {case:<12} {r['step_s'] if r['step_s'] is None else round(r['step_s'], 3)} s "
              f"{r['peak_gb'] if r['peak_gb'] is None else round(r['peak_gb'], 3)} GB "
              f"({r['wall_s']:.0f} s in all, load {r['load_1min']:.1f}) {r['note']}", file=sys.stderr, flush=True)

    train_rows = [r for r in rows if r["case"] in TRAIN_CASES]
    if train_rows:
        scopes = sorted({r["peak_scope"] for r in train_rows if r.get("peak_scope")})
        what = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "the process's peak RSS (VmHWM)"
        print(f"\nOne HP training step ({args.device}; median of steps {STEPS_PER_EPOCH + 1}-{args.steps}, "
              f"i.e. epochs >= 2, {STEPS_PER_EPOCH} steps per epoch; peak GB: {what}, absolute, over the "
              f"{', '.join(scopes) or '-'})\n")
        print("| case | backbone | image px | batch | cache | median s/step | steps/s | peak GB |")
        print("|---|---|---|---|---|---|---|---|")
        for r in train_rows:
            if r["step_s"] is None:
                print(f"| {r['case']} | - | - | - | - | - | - | - | {r['note']}")
                continue
            print(f"| {r['case']} | {r['backbone']} | {r['image_px']} | {r['batch']} | "
                  f"{'on' if r['cache'] else 'off'} | {r['step_s']:.3f} | {1 / r['step_s']:.2f} | "
                  f"{r['peak_gb']:.2f} |")
        print()
        for name in ("demo", "vits8"):
            off = next((r for r in train_rows if r["case"] == name and r["step_s"]), None)
            on = next((r for r in train_rows if r["case"] == name + "+cache" and r["step_s"]), None)
            if off and on:
                print(f"- feature cache speed-up, {off['backbone']} at {off['image_px']} px, batch {off['batch']}: "
                      f"{off['step_s'] / on['step_s']:.2f}x ({off['step_s']:.3f} -> {on['step_s']:.3f} s/step)")
    crf_rows = [r for r in rows if r["case"].startswith("crf")]
    if crf_rows:
        print(f"\nDense CRF (hpkit.pipeline.crf.dense_crf, {CRF_CLASSES} classes, one image, CPU; median of "
              f"{args.crf_images} images after a warm-up; peak GB: growth of the peak resident set over the calls)\n")
        print("| case | image px | median s/image | images/s | peak GB |")
        print("|---|---|---|---|---|")
        for r in crf_rows:
            if r["step_s"] is None:
                print(f"| {r['case']} | - | - | - | - | {r['note']}")
                continue
            print(f"| {r['case']} | {r['image_px']} | {r['step_s']:.3f} | {1 / r['step_s']:.2f} | {r['peak_gb']:.2f} |")
    loads = ", ".join(f"{r['case']} {r['load_1min']:.1f}" for r in rows)
    print(f"\n1-min load average after each case ({os.cpu_count()} CPUs; far above that, other processes "
          f"inflated the times): {loads}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
