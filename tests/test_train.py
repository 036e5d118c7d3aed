"""The training loop on tiny synthetic data: it learns, writes atomically, resumes exactly, stops on NaN."""

import json

import pytest
import torch

from hpkit.config import get_config
from hpkit.train import TrainingDiverged, train

TINY = ["model.backbone=random_tiny", "data.image_size=32", "data.val_size=32", "data.num_train=24",
        "data.batch_size=4", "model.dim=16", "loss.pool_size=16", "loss.renew_interval=2", "loss.warmup=1",
        "train.epochs=2", "train.val_every=0"]


def test_runs_writes_outputs_and_resumes_exactly(tmp_path):
    cfg = get_config("demo", TINY)
    full = train(cfg, tmp_path / "full", max_steps=8, progress=False)
    assert full["steps"] == 8 and len(full["history"]) == 8
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in full["history"])
    assert full["history"][0]["lambda"] == 0.0 and full["history"][-1]["lambda"] > 0  # warm-up, then ramp
    saved = json.loads((tmp_path / "full" / "config.json").read_text())
    assert saved["loss"]["pool_size"] == 16 and (tmp_path / "full" / "checkpoint.pt").is_file()

    train(cfg, tmp_path / "split", max_steps=5, progress=False)  # stops mid-epoch 1 (6 steps per epoch)
    resumed = train(cfg, tmp_path / "split", max_steps=8, progress=False, resume=True)
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in full["history"]], abs=1e-6)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["head"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["head"]
    for key in a:
        torch.testing.assert_close(a[key], b[key])


@pytest.mark.parametrize("extra", [["loss.style=official"], ["loss.propagation=loss"], ["loss.plain_contrastive=true"],
                                   ["loss.lhp=false", "loss.task_specific=false", "loss.symmetric=false"]])
def test_switches_run(tmp_path, extra):
    result = train(get_config("demo", TINY + extra), tmp_path, max_steps=2, progress=False)
    assert result["steps"] == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result["history"])


def test_bad_settings_and_divergence(tmp_path):
    with pytest.raises(ValueError, match="pool_size=64 is larger than the 24 training images"):
        train(get_config("demo", TINY + ["loss.pool_size=64"]), tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(get_config("demo", TINY), tmp_path / "new", resume=True, progress=False)
    with pytest.raises(TrainingDiverged, match="at step 0"):
        train(get_config("demo", TINY + ["loss.tau=1e-30"]), tmp_path / "nan", progress=False)
