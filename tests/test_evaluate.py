"""Evaluation of a trained run: the metrics equal an independent recomputation from the checkpoint."""

import json

import pytest
import torch
import torch.nn.functional as F

from hpkit import SegmentationHead, load_backbone
from hpkit.pipeline.config import get_config
from hpkit.pipeline.evaluate import evaluate
from hpkit.pipeline.probes import LinearProbe
from hpkit.pipeline.datasets import build_dataset
from hpkit.pipeline.train import train

TINY = ["model.backbone=random_tiny", "data.image_size=32", "data.val_size=32", "data.num_train=24",
        "data.num_val=6", "data.batch_size=4", "model.dim=16", "loss.pool_size=16", "train.epochs=1"]


def test_evaluate_matches_a_recomputation(tmp_path):
    cfg = get_config("demo", TINY)
    train(cfg, tmp_path, progress=False)
    result = evaluate(tmp_path, crf=True, batch_size=4)
    for key in ("cluster", "linear", "kmeans_backbone", "cluster_crf", "linear_crf"):
        assert 0.0 <= result[key]["pixel_accuracy"] <= 1.0 and 0.0 <= result[key]["mean_iou"] <= 1.0
    assert result["images"] == 6 and json.loads((tmp_path / "eval.json").read_text())["images"] == 6

    # Linear-probe accuracy recomputed with plain torch from the checkpoint.
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    backbone = load_backbone("random_tiny")
    head = SegmentationHead(backbone.embed_dim, 16).eval()
    head.load_state_dict(state["head"])
    probe = LinearProbe(16, 9)
    probe.load_state_dict(state["linear"])
    correct = total = 0
    for image, label in build_dataset(cfg, "val"):
        with torch.no_grad():
            s = F.interpolate(head(backbone(image[None], attention=False).feats), size=(32, 32), mode="bilinear",
                              align_corners=False)
            pred = probe.conv(s).argmax(1)[0]
        valid = label >= 0
        correct += int((pred[valid] == label[valid]).sum())
        total += int(valid.sum())
    assert result["linear"]["pixel_accuracy"] == pytest.approx(correct / total)


def test_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        evaluate(tmp_path)


def test_missing_crf_package_is_a_note_not_a_crash(tmp_path, monkeypatch):
    train(get_config("demo", TINY), tmp_path, max_steps=2, progress=False)
    monkeypatch.setattr("hpkit.pipeline.evaluate.crf_available", lambda: False)
    with pytest.warns(UserWarning, match="CRF skipped: dense CRF needs the pydensecrf module"):
        result = evaluate(tmp_path, crf=True, batch_size=4)
    assert "cluster_crf" not in result and "cluster" in result and result["notes"][0].startswith("CRF skipped")
