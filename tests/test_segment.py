"""Segmenting a new image of any size with a trained run (and through the CLI)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpkit.pipeline.evaluate import evaluate
from hpkit.pipeline.inference import segment

@pytest.fixture
def run(tiny_run):
    return tiny_run


def test_any_size_and_mode_gives_a_full_size_label_map(run, tmp_path):
    image = (np.random.default_rng(0).random((37, 50, 3)) * 255).astype(np.uint8)  # not a multiple of 8
    result = segment(image, run)
    assert result.labels.shape == (37, 50) and result.overlay.size == (50, 37)
    assert result.labels.min() >= 0 and result.labels.max() < 9
    Image.fromarray(image[:, :, 0]).save(tmp_path / "gray.png")
    assert segment(tmp_path / "gray.png", run, crf=True, flip=False).labels.shape == (37, 50)
    tiny = segment(image[:5, :6], run)  # smaller than one patch: resized up to one patch
    assert tiny.labels.shape == (5, 6)


def test_evaluation_mapping_names_the_clusters(run):
    image = (np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)
    before = segment(image, run).labels
    mapping = evaluate(run)["cluster"]["mapping"]
    after = segment(image, run).labels
    assert np.array_equal(after, np.asarray(mapping)[before])


@pytest.mark.slow
def test_cli_segment_writes_overlay(run, tmp_path):
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "in.png")
    cmd = [sys.executable, "-m", "hpkit", "segment", str(tmp_path / "in.png"), "--checkpoint", str(run / "checkpoint.pt"),
           "--out", str(tmp_path / "out.png"), "--labels-out", str(tmp_path / "ids.png"),
           "--overlay-out", str(tmp_path / "overlay.png")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    assert "30x20 pixels" in result.stdout and Image.open(tmp_path / "overlay.png").size == (30, 20)
    ids = np.asarray(Image.open(tmp_path / "ids.png"))
    assert ids.shape == (20, 30) and ids.max() < 9  # cluster ids of the 9-cluster demo run
    assert "synthetic scenes" in result.stdout  # the names are said to be the demo's
    assert Image.open(tmp_path / "out.png").width > 2 * 30  # photo | labels and a legend
    bad = subprocess.run([sys.executable, "-m", "hpkit", "segment", str(tmp_path / "nope.png"), "--checkpoint",
                          str(run)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "cannot read image" in bad.stderr


def test_a_large_photo_is_segmented_in_bounded_memory(run, monkeypatch):
    from hpkit.backbones.vit import FrozenViT

    photo = np.zeros((3000, 4000, 3), np.uint8)
    photo[:1500] = (90, 140, 220)  # sky above, ground below
    photo[1500:] = (90, 70, 40)
    seen, forward = [], FrozenViT.forward

    def spy(self, images, **kwargs):
        seen.append(tuple(images.shape[-2:]))
        return forward(self, images, **kwargs)

    monkeypatch.setattr(FrozenViT, "forward", spy)
    result = segment(photo, run)
    assert seen == [(32, 40), (32, 40)]  # shorter side at the run's val_size (32), 4:3 kept; plain and flipped
    assert result.labels.shape == (3000, 4000)
    # The same photo at 400 x 300 gives the same backbone input, so the same labels at a tenth of the size.
    small = segment(np.asarray(Image.fromarray(photo).resize((400, 300), Image.BILINEAR)), run).labels
    enlarged = np.asarray(Image.fromarray(small.astype(np.int32)).resize((4000, 3000), Image.NEAREST))
    assert (enlarged == result.labels).mean() > 0.97


def test_a_loaded_run_segments_like_its_folder(run):
    from hpkit.pipeline.checkpoint import load_run

    image = (np.random.default_rng(2).random((24, 40, 3)) * 255).astype(np.uint8)
    evaluate(run)  # eval.json names the clusters: a loaded run must find it too
    by_path, by_run = segment(image, run), segment(image, load_run(run / "checkpoint.pt"))
    assert np.array_equal(by_path.labels, by_run.labels) and by_path.class_names == by_run.class_names
    assert by_run.named == "classes"
