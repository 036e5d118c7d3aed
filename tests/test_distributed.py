"""Multi-process training with torchrun + DDP on CPU (gloo backend, 2 processes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.backbone=random_tiny", "data.image_size=32", "data.val_size=32", "data.num_train=24",
        "data.num_val=4", "data.batch_size=4", "model.dim=16", "loss.pool_size=16", "loss.renew_interval=2",
        "loss.warmup=1", "train.epochs=1", "train.val_every=2", "train.cache_features=true"]


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    sets = [x for item in TINY for x in ("--set", item)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hpkit", "train", "--preset", "demo", *sets, "--out", str(tmp_path), "--max-steps", "4"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("trained 4 steps") == 1  # only rank 0 reports
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    # train() checks at the end that both replicas hold identical parameters (it raises otherwise)
    assert state["step"] == 4 and [v["step"] for v in state["validation"]] == [2, 4]
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["steps"]) == 4 and all(h["loss"] == h["loss"] for h in history["steps"])
    # each rank cached its own half of each batch: 4 steps x 4 images = 16 of the 24 entries
    assert int(sum(__import__("numpy").load(tmp_path / "feature_cache" / "filled.npy"))) == 16
