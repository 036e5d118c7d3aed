"""``hpkit pretrain --recipe hp-tiny``: the card's settings, the budget split, a run end to end on a
folder of photos, resume after Ctrl-C (bit-identical weights), and one-line errors for bad input."""

import dataclasses
import json
import re
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import hpkit.backbones.pretrain
import hpkit.backbones.pretrain.objectives
import hpkit.backbones.recipe
from hpkit import load_backbone
from hpkit.__main__ import main as cli
from hpkit.backbones.vit import BUNDLED_WEIGHTS
from hpkit.backbones.pretrain import _RUN_ONLY, _config_dict, read_backbone_metadata
from hpkit.backbones.recipe import RECIPES, make_plan, split_budget, stage_configs, steps_for_minutes, time_stages

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
HP_TINY = RECIPES["hp-tiny"]
# 10 steps of 64 px images: 6 region contrast + 3 dense VICReg + 1 attention alignment, batches of 6.
SMALL = ["--steps", "10", "--image-size", "64", "--amp", "off", "--no-progress"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Six 160 x 120 photos (stripes of two colours, noise), half PNG, half JPEG."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:120, 0:160]
    for i in range(6):
        f = rng.uniform(0.05, 0.4, 3)
        img = np.stack([np.sin(x * f[0] + y * f[1] * (c - 1) + c) for c in range(3)], -1) * 0.4 + 0.5
        img[: 40 + 10 * i] = img[: 40 + 10 * i][..., ::-1]
        img = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(root / f"photo{i}.{'png' if i % 2 else 'jpg'}")
    return root


def recipe(out, photos, *extra):
    return cli(["pretrain", "--recipe", "hp-tiny", str(out), "--dataset", "folder", "--root", str(photos), *SMALL,
                *extra])


def test_hp_tiny_recipe_at_the_card_budget_is_the_card():
    # 968 steps on 1000 synthetic scenes: every setting equals the bundled file's record, stage by stage.
    plan = make_plan(HP_TINY, 968, 1000)
    assert plan.steps == (620, 248, 100) and plan.epochs == (20, 8) and plan.warmup_epochs == (1, 1)
    assert (plan.steps_per_epoch, plan.num_images, plan.batch_size, plan.image_size) == (31, 1000, 32, 128)
    regions, vicreg, align = stage_configs(HP_TINY, plan, dataset="synthetic", root=None, stage1_export="s1")
    meta = read_backbone_metadata(BUNDLED_WEIGHTS)
    stage2 = meta["source"]["config"]
    stage1 = meta["source"]["init_weights"]["metadata"]["config"]
    for cfg, card in ((regions, stage1), (vicreg, stage2)):
        mine = _config_dict(cfg)
        differ = {k for k in mine if mine[k] != card.get(k, mine[k]) and k not in _RUN_ONLY}
        assert differ == ({"init_weights"} if cfg is vicreg else set()), differ
    assert vicreg.init_weights == "s1" and regions.init_weights is None
    assert dataclasses.asdict(align) == meta["alignment"]
    assert meta["source"]["steps"] == 248 and meta["source"]["init_weights"]["metadata"]["steps"] == 620


def test_budget_split_and_plan():
    for total in (3, 4, 10, 97, 200, 968, 5001):
        steps = split_budget(total, HP_TINY.card_steps)
        assert sum(steps) == total and min(steps) >= 1
        for s, c in zip(steps, HP_TINY.card_steps):
            assert abs(s - total * c / 968) < 1  # the card's proportions, rounded
    assert split_budget(200, (620, 248, 100)) == (128, 51, 21)
    with pytest.raises(ValueError, match="at least 3 steps"):
        split_budget(2, HP_TINY.card_steps)
    # A large folder: epochs as on the card (20 and 8 of L steps), using the first L * 32 images.
    plan = make_plan(HP_TINY, 200, 5000)
    assert plan.steps_per_epoch == 6 and plan.num_images == 192 and plan.epochs == (22, 9)
    assert all(e * plan.steps_per_epoch >= s for e, s in zip(plan.epochs, plan.steps))  # schedules cover the steps
    assert plan.warmup_epochs == (1, 1)
    # A small folder: all images, one batch, more epochs and a warm-up kept at 1/20 and 1/8 of the stage.
    plan = make_plan(HP_TINY, 200, 6)
    assert (plan.batch_size, plan.num_images, plan.steps_per_epoch, plan.epochs) == (6, 6, 1, (128, 51))
    assert plan.warmup_epochs == (6, 6)
    # Crops keep their share of the image.
    regions, vicreg, _ = stage_configs(HP_TINY, make_plan(HP_TINY, 10, 6, image_size=64), dataset="folder",
                                       root="x", stage1_export="s1")
    assert (regions.global_crop_size, regions.local_crop_size, vicreg.global_crop_size) == (48, 16, 48)


def test_minutes_budget_takes_the_largest_step_count_that_fits():
    timing = {"seconds_per_step": [2.0, 4.0, 0.5], "setup_seconds": [10.0, 10.0, 2.0]}
    total = steps_for_minutes(HP_TINY, 600, timing, 1000)

    def cost(n):
        plan = make_plan(HP_TINY, n, 1000)
        return sum(s * t for s, t in zip(plan.steps, timing["seconds_per_step"])) + 22

    assert cost(total) <= 600 < cost(total + 1) and 200 < total < 300
    # Caching images costs time too: fewer steps when nothing is cached yet.
    assert steps_for_minutes(HP_TINY, 600, timing, 1000, seconds_per_image=0.1) < total
    with pytest.raises(ValueError, match="too short: 0.4 min are left.*takes 0.5 min"):
        steps_for_minutes(HP_TINY, 25, timing, 1000)


@pytest.mark.slow
def test_recipe_runs_end_to_end_and_resumes_to_the_same_weights(photos, tmp_path, monkeypatch, capsys):
    heads = []
    real_head = hpkit.backbones.pretrain.DINOHead.forward
    monkeypatch.setattr(hpkit.backbones.pretrain.DINOHead, "forward", lambda self, x: heads.append(1) or real_head(self, x))
    full = tmp_path / "full"
    assert recipe(full, photos) == 0
    out = capsys.readouterr().out
    assert "using batches of 6" in out and "10 steps = 6 region contrast + 3 dense VICReg" in out
    file = full / "backbone.safetensors"
    assert f"    --set model.weights={file}" in out
    assert heads == []  # neither stage computes the DINO head
    # The export loads as random_tiny, is trained, and gives finite features.
    backbone = load_backbone("random_tiny", weights=file)
    assert load_backbone("auto", weights=file).name == "random_tiny"  # the file names its architecture
    random = load_backbone("random_tiny")
    assert not torch.equal(backbone.vit.blocks[5].attn.qkv.weight, random.vit.blocks[5].attn.qkv.weight)
    assert not torch.equal(backbone.vit.patch_embed.proj.weight, random.vit.patch_embed.proj.weight)
    feats = backbone(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))).feats
    assert feats.shape == (2, 192, 8, 8) and torch.isfinite(feats).all()
    # Its metadata records the chain of stages and the plan.
    meta = read_backbone_metadata(file)
    assert meta["alignment"]["steps"] == 1 and meta["source"]["steps"] == 3
    stage1 = meta["source"]["init_weights"]["metadata"]
    assert stage1["steps"] == 6 and stage1["config"]["dense_objective"] == "regions"
    assert meta["source"]["config"]["keep_weight"] == 50 and meta["source"]["config"]["init_weights"].endswith(
        "stage1.safetensors")
    assert meta["recipe"]["plan"]["steps"] == [6, 3, 1] and meta["recipe"]["request"]["root"] == str(photos)
    assert json.loads((full / "recipe.json").read_text()) == meta["recipe"]
    assert len(list((full / "images").glob("*.png"))) == 6
    # The cache holds exactly the pixels ImageFolder reads from the photos.
    source = hpkit.backbones.pretrain.pretraining_images("folder", str(photos), None, 64, 0)
    cached = hpkit.backbones.pretrain.pretraining_images("folder", str(full / "images"), None, 64, 0)
    assert all(torch.equal(source[i][0], cached[i][0]) for i in range(6))

    # Ctrl-C in stage 1's third step, then in stage 2's first: each rerun continues where it stopped.
    def watch(name, interrupt_at=None):
        real, calls = getattr(hpkit.backbones.pretrain.objectives, name), []  # where the step looks it up

        def wrapped(*args, **kwargs):
            calls.append(1)
            if len(calls) == interrupt_at:
                signal.raise_signal(signal.SIGINT)  # the step finishes and is saved
            return real(*args, **kwargs)

        monkeypatch.setattr(hpkit.backbones.pretrain.objectives, name, wrapped)
        return calls

    split = tmp_path / "split"
    watch("region_contrast_loss", interrupt_at=3)
    assert recipe(split, photos) == 130
    assert torch.load(split / "stage1" / "checkpoint.pt", weights_only=True)["step"] == 3
    assert not (split / "stage1.safetensors").exists()
    monkeypatch.undo()
    regions, vicreg = watch("region_contrast_loss"), watch("dense_vicreg_loss", interrupt_at=1)
    assert recipe(split, photos) == 130
    assert "rerun the same command" in capsys.readouterr().err
    assert len(regions) == 3 and len(vicreg) == 1  # stage 1 ran its steps 4-6 only
    assert (split / "stage1.safetensors").exists() and not (split / "stage2.safetensors").exists()
    monkeypatch.undo()
    regions, vicreg = watch("region_contrast_loss"), watch("dense_vicreg_loss")
    assert recipe(split, photos) == 0
    out = capsys.readouterr().out
    assert "stage 1/3 (region contrast, 6 steps): done before" in out and "resuming" in out
    assert len(regions) == 0 and len(vicreg) == 2  # stage 1 kept, stage 2 ran its steps 2-3 only
    for name in ("stage1.safetensors", "stage2.safetensors", "backbone.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(split / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    # A finished run is left as it is; another budget on the same folder is refused.
    before = file.read_bytes()
    assert recipe(full, photos) == 0 and file.read_bytes() == before
    assert "stage 3/3 (attention alignment): done before" in capsys.readouterr().out
    assert recipe(full, photos, "--steps", "12") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "steps 10 -> 12" in err and "--force" in err
    assert file.read_bytes() == before
    assert recipe(full, photos, "--steps", "3", "--force") == 0  # --force starts over
    assert json.loads((full / "recipe.json").read_text())["plan"]["steps"] == [1, 1, 1]
    assert read_backbone_metadata(file)["source"]["init_weights"]["metadata"]["steps"] == 1


@pytest.mark.parametrize("args, message", [
    (["--recipe", "hp-huge", "{out}", "--root", "{photos}", "--steps", "5"], "unknown recipe 'hp-huge'.*hp-tiny"),
    (["--recipe", "hp-tiny", "{out}", "--root", "{photos}", "--steps", "5", "--minutes", "3"], "exactly one budget"),
    (["--recipe", "hp-tiny", "{out}", "--root", "{photos}"], "exactly one budget"),
    (["--recipe", "hp-tiny", "{out}", "--root", "{photos}", "--steps", "0"], "must be positive.*--steps 0"),
    (["--recipe", "hp-tiny", "{out}", "--root", "{photos}", "--minutes", "-1"], "must be positive.*--minutes -1"),
    (["--recipe", "hp-tiny", "{out}", "--root", "{photos}", "--steps", "2"], "at least 3 steps"),
    (["--recipe", "hp-tiny", "{out}", "--root", "{out}/none", "--steps", "5"], "--root .*none does not exist"),
    (["--recipe", "hp-tiny", "{out}", "--steps", "5"], "needs --root DIR"),
    (["--recipe", "hp-tiny", "{out}", "--root", "{one}", "--steps", "5"], "found 1 image.*at least 2"),
    (["--recipe", "hp-tiny", "{out}", "--root", "{photos}", "--steps", "5", "--export", "x.pt"], "must end in"),
])
def test_bad_input_exits_2_with_one_line_before_any_work(args, message, photos, tmp_path, capsys):
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (40, 30)).save(one / "only.png")
    out = tmp_path / "out"
    argv = [a.format(out=out, photos=photos, one=one) for a in args]
    assert cli(["pretrain", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hpkit: ")
    assert re.search(message, err), err
    assert not (out / "recipe.json").exists() and not (out / "images").exists()


def test_minutes_plan_is_timed_once_and_kept(photos, tmp_path, monkeypatch, capsys):
    timings = iter([{"seconds_per_step": [0.5, 1.0, 0.1], "setup_seconds": [1.0, 1.0, 1.0]},
                    {"seconds_per_step": [5.0, 9.0, 1.0], "setup_seconds": [1.0, 1.0, 1.0]}])
    monkeypatch.setattr(hpkit.backbones.recipe, "time_stages", lambda *a, **k: next(timings))

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hpkit.backbones.recipe, "pretrain", stop)
    argv = ["pretrain", "--recipe", "hp-tiny", str(tmp_path / "out"), "--root", str(photos), "--minutes", "1",
            "--image-size", "64", "--amp", "off", "--no-progress"]
    assert cli(argv) == 130
    plan = json.loads((tmp_path / "out" / "recipe.json").read_text())["plan"]
    assert 50 < sum(plan["steps"]) < 120  # about 60 s / (0.64 * 0.5 + 0.26 * 1.0 + 0.1 * 0.1) s per step
    assert cli(argv) == 130  # the rerun does not time again (the second timing would give far fewer steps)
    assert json.loads((tmp_path / "out" / "recipe.json").read_text())["plan"] == plan
    capsys.readouterr()


def test_timing_runs_each_stage_and_cleans_up(tmp_path):
    plan = make_plan(HP_TINY, 3, 4, image_size=32, batch_size=2)
    configs = stage_configs(HP_TINY, plan, dataset="synthetic", root=None, stage1_export="unused")
    configs = (dataclasses.replace(configs[0], region_clusters=2), configs[1],
               dataclasses.replace(configs[2], num_images=4))
    timing = time_stages(configs, tmp_path / "probe", steps=2)
    assert len(timing["seconds_per_step"]) == 3 and all(t > 0 for t in timing["seconds_per_step"])
    assert not (tmp_path / "probe").exists()
