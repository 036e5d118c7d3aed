"""The real-photo path end to end, through the README's commands: a labelled folder, a flat folder
of real photos without labels, runs that are never replaced, and work kept when training fails."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpkit.pipeline.config import get_config
from hpkit.data import write_sample_photos, write_scene_folder

REPO = Path(__file__).parents[1]


def hpkit(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "hpkit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def folder_flags(root, *extra):
    flags = ["--preset", "demo", "--set", "data.dataset=folder", "--set", f"data.root={root}"]
    for item in extra:
        flags += ["--set", item]
    return flags


@pytest.mark.slow
def test_labelled_folder_trains_evaluates_on_val_and_segments_whole_photos(tmp_path):
    root = write_scene_folder(tmp_path / "scenes", num_train=16, num_val=4)
    run = tmp_path / "run"
    result = hpkit("train", *folder_flags(root, "data.image_size=64", "data.val_size=64", "loss.pool_size=16",
                                         "train.epochs=1", "train.val_every=1"), "--out", run)
    assert result.returncode == 0, result.stderr
    history = json.loads((run / "history.json").read_text())
    assert [v["step"] for v in history["validation"]] == [1, 2]  # validated on the val split during training
    result = hpkit("eval", run, "--json", "--no-progress")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["split"] == "val" and metrics["images"] == 4
    assert metrics["classes"] == ["sky", "grass", "water", "wall", "sand", "ball", "bush", "zebra", "crate"]
    for key in ("cluster", "linear", "kmeans_backbone"):
        assert 0 <= metrics[key]["mean_iou"] <= 1 and 0 < metrics[key]["pixel_accuracy"] <= 1
    # Scored on every valid pixel of the whole photos at val_size: 64 x 88 (160 x 120) and 88 x 64.
    valid = sum(int((np.asarray(Image.open(p).resize(s, Image.NEAREST)) != 255).sum())
                for p, s in zip(sorted((root / "val" / "labels").iterdir()), [(88, 64), (64, 88)] * 2))
    assert np.asarray(metrics["cluster"]["confusion"]).sum() == valid
    photo = sorted((root / "val" / "images").iterdir())[1]  # 120 x 160, portrait
    result = hpkit("segment", photo, "--checkpoint", run / "checkpoint.pt", "--labels-out", tmp_path / "ids.png",
                   "--out", tmp_path / "picture.png")
    assert result.returncode == 0, result.stderr
    assert "120x160 pixels" in result.stdout
    ids = np.asarray(Image.open(tmp_path / "ids.png"))
    assert ids.shape == (160, 120) and set(np.unique(ids)) <= set(range(9))
    assert any(name in result.stdout for name in ("sky", "grass", "water", "wall", "sand"))  # classes via eval.json


@pytest.mark.slow
def test_unlabelled_real_photos_train_segment_and_are_never_overwritten(tmp_path):
    photos = tmp_path / "photos"
    written = write_sample_photos(photos)
    assert len(written) >= 3  # scikit-learn's and matplotlib's at least
    n = len(written)
    run = tmp_path / "run"
    flags = folder_flags(photos, f"loss.pool_size={n}", f"data.batch_size={min(n, 8)}", "model.num_clusters=5")
    result = hpkit("train", *flags, "--out", run)  # the preset's validation settings
    assert result.returncode == 0, result.stderr
    assert "no labels: validation and the linear probe skipped" in result.stdout
    assert (run / "checkpoint.pt").is_file()
    result = hpkit("eval", run, "--plots", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "5 clusters" in result.stdout and "training images (no val split)" in result.stdout
    shares = json.loads((run / "eval.json").read_text())["pixel_share"]
    assert len(shares) == 5 and sum(shares) == pytest.approx(1.0)
    assert (run / "clusters.png").is_file() and (run / "history.png").is_file()
    china = next(p for p in written if p.name == "china.jpg")
    result = hpkit("segment", china, "--checkpoint", run, "--labels-out", tmp_path / "ids.png")
    assert result.returncode == 0, result.stderr
    ids = np.asarray(Image.open(tmp_path / "ids.png"))
    assert ids.shape == (427, 640) and ids.max() < 5 and len(np.unique(ids)) >= 2
    # A second train into the same folder is refused in one line; --force starts over and drops eval.json.
    again = hpkit("train", *flags, "--out", run)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--resume" in again.stderr
    forced = hpkit("train", *flags, "--out", run, "--force", "--max-steps", "1")
    assert forced.returncode == 0, forced.stderr
    assert not (run / "eval.json").exists() and not (run / "clusters.png").exists()
    assert json.loads((run / "history.json").read_text())["steps"][-1]["step"] == 1


def test_a_failure_after_training_started_keeps_the_last_step(tmp_path, monkeypatch):
    import hpkit.pipeline.train as train_module

    cfg = get_config("demo", ["model.backbone=random_tiny", "data.image_size=32", "data.val_size=32",
                              "data.num_train=16", "data.num_val=4", "data.batch_size=4", "model.dim=16",
                              "loss.pool_size=8", "train.epochs=2", "train.val_every=3", "train.cache_features=false"])
    calls = []

    def broken_score(*args, **kwargs):
        calls.append(1)
        raise OSError("disk gone")

    monkeypatch.setattr(train_module, "score", broken_score)
    with pytest.raises(OSError, match="disk gone"):
        train_module.train(cfg, tmp_path / "run", progress=False)
    import torch

    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert calls == [1] and state["step"] == 3  # the step that finished before the failing validation
    monkeypatch.undo()
    resumed = train_module.train(cfg, tmp_path / "run", resume=True, progress=False)
    full = train_module.train(cfg, tmp_path / "full", progress=False)
    assert resumed["steps"] == full["steps"] == 8
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in full["history"]], abs=1e-6)


def test_benchmarks_take_a_labelled_folder(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import backbone_quality

    root = write_scene_folder(tmp_path / "scenes", num_train=8, num_val=4)
    assert backbone_quality.main(["--train", "8", "--val", "4", "--pool", "8", "--set", "data.dataset=folder",
                                  "--set", f"data.root={root}", "--set", "data.image_size=64",
                                  "--set", "data.val_size=64"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| random_tiny"))
    values = [float(v.strip(" %")) for v in row.split("|")[2:-1]]
    assert len(values) == 7 and all(0 <= v <= 100 for v in values)
    assert f"folder ({root}): 8 train / 4 val images" in out and "9 classes" in out
