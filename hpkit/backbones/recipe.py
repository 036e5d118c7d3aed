"""One command that makes your own backbone from your own photos: a named pretraining recipe.

    python -m hpkit pretrain --recipe hp-tiny OUT --dataset folder --root DIR --minutes 30
    python -m hpkit pretrain --recipe hp-tiny OUT --dataset folder --root DIR --steps 200

The recipe ``hp-tiny`` is the three commands that made the bundled backbone (data/README.md,
*Commands*), with exactly the card's settings, run one after the other on your images:

1. **region contrast** (``hpkit pretrain --dense-objective regions``): each image is split once into
   4 pseudo-regions by k-means of the random ViT's patch tokens; a region's mean token in one crop
   must pick out the same region in another crop. This gives the patch features good cosine
   neighbours, which GHP and k-means depend on.
2. **dense VICReg + keep term** (``--dense-objective vicreg``, started from stage 1's export): every
   patch is pulled towards its neighbour in the other crop while features must vary within each
   image; the keep term holds stage 1's cosine structure. This raised the linear probe on the card.
3. **attention alignment** (``hpkit align-attention``): only the last block's queries and keys
   train, so that attention follows the network's own feature affinity, which LHP reads.

**Budget.** ``--steps N`` is the total number of steps, split in the card's proportions 620 : 248 :
100 (largest remainders, at least one step per stage; ``--steps 968`` is the card's run).
``--minutes M`` first times 3 steps of each stage on one batch of your images (15-30 s here), then
takes the largest step budget whose predicted time (steps x seconds per step, plus each stage's
set-up and the image cache) fits in 90 % of what is left of M; the rest covers data loading,
checkpoints and exports (docs/experiments/hp-tiny.md#recipe).
The step counts are fixed once and written to ``OUT/recipe.json``: a resumed run reads them from
there and never times again, so it is deterministic.

**Schedules.** :class:`~hpkit.backbones.pretrain.PretrainConfig` gives its warm-up and cosine schedules in
epochs. On the card, stage 1 is 20 epochs and stage 2 is 8 epochs of the same length (31 steps: 1000
images in batches of 32), each with 1 warm-up epoch. The recipe keeps that shape: an epoch is
``L = round(stage-1 steps / 20)`` steps, each stage gets ``ceil(steps / L)`` epochs (so its schedule
spans at least its steps) and ``pretrain(max_steps=steps)`` stops it on budget, less than one epoch
before the end of the cosine (the learning rate is then below 4 % of its peak); the warm-up stays
1/20 and 1/8 of the stage. An epoch of L steps needs ``L x batch`` images: a larger folder
contributes its first ``L x batch`` images (sorted by path; each is seen about as often as on the
card, 28 times), a smaller one all of its images, with more epochs. Batches hold the card's 32
images, or all images when the folder has fewer.

**Speed.** Your photos are decoded and resized once (``ImageFolder``'s resize and centre crop) into
``OUT/images/`` as lossless PNGs of ``--image-size`` pixels, the same pixels, which every stage then
reads: decoding a 12-megapixel JPEG costs ~0.1 s, 3 s per batch of 32, as much as a training step.
On a CPU with bfloat16 instructions (``avx512_bf16``/``amx_bf16``) stages 1 and 2 run under bf16
autocast (``PretrainConfig.amp``; the losses stay float32); ``benchmarks/pretrain_amp.py`` measures
the gain. On a GPU it stays off (no gain: the steps wait for the CPU's crops). Measurements, and the
recipe's reproduction of the bundled file: docs/experiments/hp-tiny.md#recipe.
``--amp on|off`` overrides. Neither stage computes DINO's head: with ``dino_weight=0``, ``pretrain``
runs no head and no teacher forward (the teacher is only an EMA copy, 3 ms a step; the student is
exported).

**Resume.** Rerun the same command after Ctrl-C or a crash: a stage whose export is complete (its
``.json`` holds the file's sha256 and the planned steps) is skipped, an interrupted stage 1 or 2
continues from ``OUT/stageK/checkpoint.pt`` (``pretrain(resume=True)``: bit-identical to an
uninterrupted run), and stage 3 (a minute or so) starts over. Another budget, dataset, image size
or batch size on an existing OUT is refused; ``--force`` starts over.

The result, ``OUT/backbone.safetensors`` (or ``--export FILE``), loads with
``hpkit.load_backbone("random_tiny", weights=FILE)``; HP training uses it with
``--set model.weights=FILE`` (the file records the architecture it loads as, so the default
``model.backbone=auto`` takes it as the tiny ViT; ``model.backbone=random_tiny`` says the same).
Its metadata holds the stages' settings and step counts (the same chain as the bundled file) and,
under ``recipe``, the contents of ``recipe.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from hpkit._util import atomic_write
from hpkit.backbones.alignment import AlignConfig, align_attention, align_file
from hpkit.backbones.pretrain import CHECKPOINT, PretrainConfig, export_backbone, pretrain, pretraining_images
from hpkit.backbones.vit import file_sha256, load_backbone

__all__ = ["Recipe", "Plan", "RECIPES", "split_budget", "make_plan", "stage_configs", "steps_for_minutes",
           "cache_images", "time_stages", "bf16_is_fast", "run_recipe", "main"]

# Share of the time left after timing that the steps are planned to fill: whole runs took 5-20 % longer than
# timed (data loading, checkpoints, exports and a busy machine are not in the 3 timed steps).
_FILL = 0.9


@dataclass(frozen=True)
class Recipe:
    """A three-stage recipe as its model card gives it: the two ``hpkit pretrain`` commands' flags,
    the ``hpkit align-attention`` settings, and the card's step counts, epochs and data sizes."""

    name: str
    regions: dict  # stage 1: PretrainConfig fields set by the card's first command
    vicreg: dict  # stage 2: those of the second command (init_weights: stage 1's export)
    align: dict  # stage 3: AlignConfig fields (the card uses the defaults)
    card_steps: tuple[int, int, int]
    batch_size: int
    image_size: int
    num_images: int  # synthetic scenes on the card
    stage_names: tuple[str, str, str] = ("region contrast", "dense VICReg + keep term", "attention alignment")

    @property
    def card_epochs(self) -> tuple[int, int]:
        """Stages 1 and 2's epochs on the card (their epochs have the same length, 31 steps there)."""
        return self.regions["epochs"], self.vicreg["epochs"]


_CARD_COMMON = dict(dino_weight=0.0, dense_weight=1.0, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2,
                    lr=4e-3, weight_decay=0.05, weight_decay_end=0.05, warmup_epochs=1, seed=0)

RECIPES: dict[str, Recipe] = {
    # data/README.md, "Commands" (tests/test_recipe.py checks these against data/hp_tiny.safetensors).
    "hp-tiny": Recipe(
        name="hp-tiny",
        regions=_CARD_COMMON | dict(dense_objective="regions", num_local_crops=4, local_crop_size=32,
                                    local_crop_scale=(0.04, 0.12), epochs=20),
        vicreg=_CARD_COMMON | dict(dense_objective="vicreg", dense_radius=(1.0, 1.0), keep_weight=50.0,
                                   num_local_crops=0, epochs=8),
        align={}, card_steps=(620, 248, 100), batch_size=32, image_size=128,
        num_images=1000),
}


@dataclass(frozen=True)
class Plan:
    """The step counts and data sizes of one run, fixed before stage 1 starts (``OUT/recipe.json``)."""

    steps: tuple[int, int, int]  # stages 1, 2, 3
    epochs: tuple[int, int]  # the schedules of stages 1 and 2 span epochs * steps_per_epoch >= steps
    warmup_epochs: tuple[int, int]
    steps_per_epoch: int
    num_images: int  # images used: the first num_images of the folder (sorted by path)
    images_found: int
    batch_size: int
    image_size: int
    amp: bool

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def split_budget(total: int, card: Sequence[int]) -> tuple[int, ...]:
    """``total`` steps in the card's proportions: largest remainders, at least 1 step per stage."""
    if total < len(card):
        raise ValueError(f"a budget of {total} steps is too small: the recipe has {len(card)} stages, give at "
                         f"least {len(card)} steps")
    quotas = [total * c / sum(card) for c in card]
    steps = [max(1, math.floor(q)) for q in quotas]
    while sum(steps) < total:  # hand the missing steps to the largest remainders
        steps[max(range(len(card)), key=lambda i: quotas[i] - steps[i])] += 1
    while sum(steps) > total:  # only when a stage was raised to 1 step
        steps[max((i for i in range(len(card)) if steps[i] > 1), key=lambda i: steps[i] - quotas[i])] -= 1
    return tuple(steps)


def make_plan(recipe: Recipe, total_steps: int, images_found: int, *, batch_size: int | None = None,
              image_size: int | None = None, amp: bool = False) -> Plan:
    """Scale the recipe to ``total_steps`` on ``images_found`` images (see the module docstring).

    With the card's budget and data (968 steps, 1000 images, batch 32) this is the card: 620 / 248 /
    100 steps, 20 and 8 epochs of 31 steps with 1 warm-up epoch each."""
    steps = split_budget(total_steps, recipe.card_steps)
    batch = min(batch_size or recipe.batch_size, images_found)
    epoch = min(images_found // batch, max(1, round(steps[0] / recipe.card_epochs[0])))  # steps per epoch
    num_images = images_found if epoch == images_found // batch else epoch * batch
    epochs = tuple(math.ceil(s / epoch) for s in steps[:2])
    warmup = tuple(max(1, round(e * w / c)) for e, w, c in zip(
        epochs, (recipe.regions["warmup_epochs"], recipe.vicreg["warmup_epochs"]), recipe.card_epochs))
    return Plan(steps=steps, epochs=epochs, warmup_epochs=warmup, steps_per_epoch=epoch, num_images=num_images,
                images_found=images_found, batch_size=batch, image_size=image_size or recipe.image_size, amp=amp)


def _crop(size: int, plan: Plan, recipe: Recipe, patch: int = 8) -> int:
    """A card crop size scaled to the plan's image size (a multiple of the patch, at least one patch)."""
    return max(patch, round(size * plan.image_size / recipe.image_size / patch) * patch)


def stage_configs(recipe: Recipe, plan: Plan, *, dataset: str, root: str | None, stage1_export: str | Path,
                  device: str = "cpu") -> tuple[PretrainConfig, PretrainConfig, AlignConfig]:
    """The three stages' settings: the card's, with the plan's data sizes, epochs and amp."""
    data = dict(dataset=dataset, root=root, num_images=plan.num_images, image_size=plan.image_size)
    run = dict(batch_size=plan.batch_size, amp=plan.amp, device=device)
    # Crops keep their share of the image (card: 96 and 32 px of 128 px); at the card's size they are the card's.
    crops = dict(global_crop_size=_crop(PretrainConfig().global_crop_size, plan, recipe))
    regions = PretrainConfig(**recipe.regions | data | run | crops | dict(
        epochs=plan.epochs[0], warmup_epochs=plan.warmup_epochs[0],
        local_crop_size=_crop(recipe.regions["local_crop_size"], plan, recipe)))
    vicreg = PretrainConfig(**recipe.vicreg | data | run | crops | dict(
        epochs=plan.epochs[1], warmup_epochs=plan.warmup_epochs[1], init_weights=str(stage1_export)))
    align = AlignConfig(**recipe.align | data | dict(steps=plan.steps[2], batch_size=plan.batch_size))
    return regions, vicreg, align


# ------------------------------------------------------------------------------- images and timing

def cache_images(images: Dataset, folder: Path, count: int) -> float:
    """Write ``images[i]`` for i < count as lossless PNGs ``folder/000000.png``... (kept ones are
    skipped, so an interrupted cache continues). Returns the seconds per newly written image."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(count)))
    started, written = time.perf_counter(), 0
    for i in range(count):
        path = folder / f"{i:0{width}d}.png"
        if path.exists():
            continue
        pixels = (images[i][0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG", compress_level=1))
        written += 1
    return (time.perf_counter() - started) / max(written, 1)


def time_stages(configs: tuple[PretrainConfig, PretrainConfig, AlignConfig], scratch: Path, *, steps: int = 3
                ) -> dict:
    """Run ``steps`` steps of each stage on one batch of images in ``scratch`` (deleted afterwards).

    Returns per stage the seconds per step (mean after the first, warm-up step) and the set-up seconds
    (the rest of the stage's time: building the networks, pseudo-regions, checkpoint)."""
    regions, vicreg, align = configs
    few = regions.batch_size
    out = {"seconds_per_step": [], "setup_seconds": []}
    try:
        for k, cfg in enumerate((regions, vicreg)):
            cfg = dataclasses.replace(cfg, num_images=few, epochs=steps, init_weights=None)
            started = time.perf_counter()
            result = pretrain(cfg, scratch / f"stage{k + 1}", max_steps=steps, progress=False)
            _add_timing(out, [h["seconds"] for h in result["history"]], time.perf_counter() - started)
        started = time.perf_counter()
        result = align_attention(load_backbone("random_tiny"), dataclasses.replace(align, steps=steps, num_images=few),
                                 progress=False)
        _add_timing(out, [h["seconds"] for h in result["history"]], time.perf_counter() - started)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _add_timing(out: dict, seconds: list[float], wall: float) -> None:
    per_step = sum(seconds[1:]) / max(1, len(seconds) - 1)
    out["seconds_per_step"].append(round(per_step, 4))
    out["setup_seconds"].append(round(max(0.0, wall - per_step * len(seconds)), 2))


def steps_for_minutes(recipe: Recipe, seconds: float, timing: dict, images_found: int, *, cached: int = 0,
                      seconds_per_image: float = 0.0, **plan_options) -> int:
    """The largest total step budget whose predicted time fits in ``seconds``: the stages' steps
    times their seconds per step, their set-up, and caching the images not yet ``cached``.

    Raises:
        ValueError: not even one step per stage fits.
    """
    def predicted(total: int) -> float:
        plan = make_plan(recipe, total, images_found, **plan_options)
        return (sum(s * t for s, t in zip(plan.steps, timing["seconds_per_step"])) + sum(timing["setup_seconds"])
                + max(0, plan.num_images - cached) * seconds_per_image)

    low = len(recipe.card_steps)
    if predicted(low) > seconds:
        raise ValueError(f"the time budget is too short: {max(seconds, 0) / 60:.1f} min are left for training, but "
                         f"one step of each stage with its set-up takes {predicted(low) / 60:.1f} min on this "
                         "machine; give a larger --minutes or a --steps budget")
    high = low + int(seconds / max(min(timing["seconds_per_step"]), 1e-6)) + 1  # predicted(high) > seconds
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if predicted(mid) <= seconds else (low, mid)
    return low


def bf16_is_fast(device: str) -> bool:
    """Whether bfloat16 autocast pays off: on a CPU with bf16 instructions. Not on a GPU: there the tiny
    ViT's steps wait for the CPU's crops (docs/experiments/hp-tiny.md#recipe)."""
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---------------------------------------------------------------------------------------- running

def _complete(path: Path, steps: int | None = None, plan: dict | None = None) -> bool:
    """Whether ``path`` is a finished export: its .json holds this file's sha256 (written last) and,
    when given, the planned steps or the plan."""
    meta_path = path.with_suffix(".json")
    if not (path.is_file() and meta_path.is_file()):
        return False
    meta = json.loads(meta_path.read_text())
    if meta.get("sha256") != file_sha256(path):
        return False
    if steps is not None and meta.get("steps") != steps:
        return False
    return plan is None or meta.get("recipe", {}).get("plan") == plan


def _forget(out: Path) -> None:
    """``--force``: delete what an earlier recipe run wrote into ``out`` (nothing else)."""
    for name in ("recipe.json", "images", "probe", "stage1", "stage2", "stage1.safetensors", "stage1.json",
                 "stage2.safetensors", "stage2.json", "backbone.safetensors", "backbone.json"):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _find_images(recipe: Recipe, dataset: str, root: str | None, image_size: int
                 ) -> tuple[str | None, Dataset | None, int]:
    """The absolute ``root``, the images (None for the synthetic scenes, which need no cache) and
    their number; a missing folder or fewer than 2 images is an error. Only lists the folder."""
    if dataset == "synthetic":
        return None, None, recipe.num_images
    if dataset != "folder":
        raise ValueError(f"--dataset must be 'folder' or 'synthetic', got {dataset!r}")
    if not root:
        raise ValueError("--dataset folder needs --root DIR, the folder of your images")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"--root {root} does not exist: give the folder that holds your images")
    root = str(Path(root).resolve())
    images = pretraining_images("folder", root, None, image_size, 0)
    if len(images) < 2:
        raise ValueError(f"found {len(images)} image below {root}: the recipe needs at least 2 (its contrastive "
                         "batches compare images); add images or point --root elsewhere")
    return root, images, len(images)


def _plan_new_run(recipe: Recipe, request: dict, source: Dataset | None, found: int, out: Path, data_root: str | None,
                  device: str, started: float) -> dict:
    """Fix the plan of a new run (timing the stages first for a --minutes budget): recipe.json's content."""
    amp = request["amp"] == "on" or (request["amp"] == "auto" and bf16_is_fast(device))
    batch = min(request["batch_size"], found)
    if batch < request["batch_size"]:
        print(f"hpkit: {found} images, fewer than the recipe's {request['batch_size']} per batch: using batches "
              f"of {batch}")
    options = dict(batch_size=batch, image_size=request["image_size"], amp=amp)
    timing, total = None, request["steps"]
    if request["minutes"] is not None:
        per_image = cache_images(source, out / "images", batch) if source is not None else 0.0
        print(f"hpkit: timing 3 steps of each stage on {batch} images (budget {request['minutes']:g} min) ...",
              flush=True)
        probe = make_plan(recipe, len(recipe.card_steps), found, **options)
        timing = time_stages(stage_configs(recipe, probe, dataset=request["dataset"], root=data_root,
                                           stage1_export="unused", device=device), out / "probe")
        left = (request["minutes"] * 60 - (time.perf_counter() - started)) * _FILL
        total = steps_for_minutes(recipe, left, timing, found, cached=batch if source is not None else found,
                                  seconds_per_image=per_image, **options)
        timing["seconds_per_image"] = round(per_image, 4)
    plan = make_plan(recipe, total, found, **options)
    return json.loads(json.dumps(dict(request=request, plan=dataclasses.asdict(plan), timing=timing)))


def _check_options(recipe: str, minutes: float | None, steps: int | None, image_size: int | None,
                   batch_size: int | None, amp: str) -> Recipe:
    """The named recipe, once the budget and sizes are valid (:func:`run_recipe`'s options)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; the recipes are: {', '.join(sorted(RECIPES))}")
    spec = RECIPES[recipe]
    if (minutes is None) == (steps is None):
        raise ValueError("give exactly one budget: --minutes M (wall-clock time) or --steps N (total steps of the "
                         "three stages)")
    if (minutes is not None and not minutes > 0) or (steps is not None and steps <= 0):
        given = f"--minutes {minutes:g}" if steps is None else f"--steps {steps}"
        raise ValueError(f"the budget must be positive, got {given}")
    if steps is not None:
        split_budget(steps, spec.card_steps)  # at least one step per stage
    if image_size is not None and (image_size < 8 or image_size % 8):
        raise ValueError(f"--image-size must be a positive multiple of the patch size 8, got {image_size}")
    if batch_size is not None and batch_size < 2:
        raise ValueError(f"--batch-size must be at least 2, got {batch_size}")
    if amp not in ("auto", "on", "off"):
        raise ValueError(f"--amp must be auto, on or off, got {amp!r}")
    return spec


def _earlier_record(record_path: Path, request: dict, found: int) -> dict | None:
    """The ``recipe.json`` of an earlier run in the same folder (None: a new run), which must have
    been started with the same request on as many images."""
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    if record is not None:
        before = record["request"] | {"images_found": record["plan"]["images_found"]}
        changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in (request | {"images_found": found}).items()
                   if before.get(k) != v]
        if changed:
            raise ValueError(f"{record_path.parent} holds a run started with other options ({'; '.join(changed)}): "
                             "rerun it with the same options to continue, or add --force to start over")
    return record


def run_recipe(out: str | Path, *, recipe: str = "hp-tiny", dataset: str = "folder", root: str | None = None,
               minutes: float | None = None, steps: int | None = None, image_size: int | None = None,
               batch_size: int | None = None, amp: str = "auto", device: str = "auto", export: str | Path | None = None,
               force: bool = False, progress: bool = True) -> Path:
    """Run a recipe on a folder of images (or the synthetic scenes) and return the backbone file.

    Raises:
        ValueError, FileNotFoundError: bad input (checked before any work), or an ``out`` that holds
            a run started with other options.
        KeyboardInterrupt: after Ctrl-C, once the stage's checkpoint is written (rerun to continue).
    """
    started = time.perf_counter()
    # 1. Check the input: cheap, the folder is only listed.
    spec = _check_options(recipe, minutes, steps, image_size, batch_size, amp)
    out = Path(out).resolve()
    export = Path(export).resolve() if export is not None else out / "backbone.safetensors"
    if export.suffix != ".safetensors":
        raise ValueError(f"--export must end in .safetensors, got {export}")
    size = image_size or spec.image_size
    root, source, found = _find_images(spec, dataset, root, size)
    request = dict(recipe=recipe, dataset=dataset, root=root, minutes=minutes, steps=steps, image_size=size,
                   batch_size=batch_size or spec.batch_size, amp=amp)

    # 2. An existing run must be the same run.
    record_path = out / "recipe.json"
    if force:
        _forget(out)
    record = _earlier_record(record_path, request, found)
    out.mkdir(parents=True, exist_ok=True)
    images = out / "images"  # the cache of a folder's images, which the stages read
    data_root = str(images) if source is not None else None
    stage1_export, stage2_export = out / "stage1.safetensors", out / "stage2.safetensors"
    try:
        # 3. The plan: from recipe.json when resuming, else from the budget.
        if record is None:
            record = _plan_new_run(spec, request, source, found, out, data_root, device, started)
            atomic_write(record_path, lambda tmp: tmp.write_text(json.dumps(record, indent=2)))
        plan = Plan.from_dict(record["plan"])
        (s1, s2, s3), names = plan.steps, spec.stage_names
        print(f"hpkit: recipe {recipe}: {sum(plan.steps)} steps = {s1} {names[0]} + {s2} {names[1]} + {s3} "
              f"{names[2]} (card: {' + '.join(map(str, spec.card_steps))}); {plan.num_images} of {found} images at "
              f"{plan.image_size} px, batches of {plan.batch_size}, epochs of {plan.steps_per_epoch} steps, bf16 "
              f"autocast {'on' if plan.amp else 'off'}", flush=True)
        if plan.num_images < found:
            print(f"hpkit: using the first {plan.num_images} images (sorted by path): each is seen about as often "
                  "as on the card; a larger budget uses more of them")
        if source is not None:
            cache_images(source, images, plan.num_images)

        # 4. The stages: a complete export is kept, an interrupted stage resumes from its checkpoint.
        c1, c2, c3 = stage_configs(spec, plan, dataset=dataset, root=data_root, stage1_export=stage1_export,
                                   device=device)
        for k, (cfg, n, path) in enumerate(((c1, s1, stage1_export), (c2, s2, stage2_export)), start=1):
            stage = f"stage {k}/3 ({names[k - 1]}, {n} steps)"
            if _complete(path, steps=n):
                print(f"hpkit: {stage}: done before, {path.name} kept")
                continue
            folder = out / f"stage{k}"
            resume = (folder / CHECKPOINT).is_file()
            print(f"hpkit: {stage}{': resuming' if resume else ''}", flush=True)
            stage_started = time.perf_counter()
            pretrain(cfg, folder, resume=resume, max_steps=n, progress=progress)
            export_backbone(folder, path)
            print(f"hpkit: {stage} finished in {(time.perf_counter() - stage_started) / 60:.1f} min", flush=True)
        if _complete(export, plan=record["plan"]):
            print(f"hpkit: stage 3/3 ({names[2]}): done before, {export} kept")
        else:
            print(f"hpkit: stage 3/3 ({names[2]}, {s3} steps)", flush=True)
            # The file's metadata: the chain of the three stages (as the bundled file's) plus recipe.json.
            align_file(stage2_export, export, c3, progress=progress, extra_meta={"recipe": record})
    except KeyboardInterrupt:
        print("hpkit: interrupted; rerun the same command to continue where it stopped", file=sys.stderr, flush=True)
        raise
    print(f"hpkit: backbone written to {export} ({(time.perf_counter() - started) / 60:.1f} min in this run)")
    print(f"hpkit: load it with hpkit.load_backbone('auto', weights='{export}'); for HP training pass\n"
          f"    --set model.weights={export}")
    return export


def main(argv: Sequence[str] | None = None, prog: str = "python -m hpkit pretrain") -> None:
    """``hpkit pretrain --recipe NAME OUT (--minutes M | --steps N) [--dataset folder --root DIR] ...``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="output folder (recipe.json, image cache, stage folders, backbone)")
    parser.add_argument("--recipe", required=True, metavar="NAME", help=f"recipe name: {', '.join(sorted(RECIPES))}")
    parser.add_argument("--dataset", default="folder", help="folder (your images, --root) or synthetic")
    parser.add_argument("--root", metavar="DIR", help="folder of your images (searched recursively)")
    parser.add_argument("--minutes", type=float, metavar="M", help="time budget for the whole recipe")
    parser.add_argument("--steps", type=int, metavar="N", help="total steps of the three stages (card: 968)")
    parser.add_argument("--image-size", type=int, metavar="PX", help="side of the training images (card: 128)")
    parser.add_argument("--batch-size", type=int, metavar="B", help="images per batch (card: 32)")
    parser.add_argument("--amp", default="auto", help="bf16 autocast in stages 1-2: auto (where bf16 is fast), on, off")
    parser.add_argument("--device", default="auto", help="cpu, cuda, auto (stage 3 runs on the CPU)")
    parser.add_argument("--export", metavar="FILE.safetensors", help="where to write the backbone "
                        "(default OUT/backbone.safetensors)")
    parser.add_argument("--force", action="store_true", help="delete an earlier run in OUT and start over")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    run_recipe(args.out_dir, recipe=args.recipe, dataset=args.dataset, root=args.root, minutes=args.minutes,
               steps=args.steps, image_size=args.image_size, batch_size=args.batch_size, amp=args.amp,
               device=args.device, export=args.export, force=args.force, progress=not args.no_progress)
