"""The notebooks' workspace: a run is trained once per configuration and backbone, then reused."""

import json
from pathlib import Path

import pytest

from hpkit.lessons.workspace import notebook_config, trained_run, workspace_dir

SMALL = {"model.backbone": "random_tiny", "data.image_size": 32, "data.val_size": 32, "data.num_train": 8,
         "data.num_val": 2, "data.batch_size": 4, "model.dim": 16, "loss.pool_size": 8, "train.epochs": 1,
         "train.val_every": 0, "train.cache_features": False}


def test_workspace_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HPKIT_WORKSPACE", str(tmp_path / "env"))
    assert workspace_dir() == tmp_path / "env" and (tmp_path / "env").is_dir()
    assert workspace_dir(tmp_path / "given") == tmp_path / "given"


def test_notebook_config_maps_the_parameters():
    cfg = notebook_config(backbone="random_tiny", seed=3, device="cpu", overrides={"loss.tau": 0.5})
    assert (cfg.model.backbone, cfg.train.seed, cfg.loss.tau, cfg.data.dataset) == ("random_tiny", 3, 0.5, "synthetic")
    cfg = notebook_config(preset="cocostuff27", dataset="cocostuff27", root="/data/coco", device="cuda")
    assert (cfg.data.root, cfg.train.device, cfg.model.backbone) == ("/data/coco", "cuda", "auto")


def test_trained_once_then_reused_and_keyed_by_config(tmp_path, monkeypatch):
    import hpkit.pipeline.train

    calls = []
    real = hpkit.pipeline.train.train

    def counting(cfg, out, **kwargs):
        calls.append((out, kwargs["resume"]))
        return real(cfg, out, **kwargs)

    monkeypatch.setattr(hpkit.pipeline.train, "train", counting)
    cfg = notebook_config(overrides=SMALL)
    run = trained_run(cfg, workspace=tmp_path)
    assert run.parent == tmp_path and run.name.startswith("synthetic-random_tiny-")
    assert (run / "checkpoint.pt").is_file() and json.loads((run / "done.json").read_text())["max_steps"] is None
    assert trained_run(cfg, workspace=tmp_path) == run and len(calls) == 1  # reused, not retrained
    other = trained_run(notebook_config(overrides={**SMALL, "loss.tau": 0.5}), workspace=tmp_path)
    assert other != run and len(calls) == 2
    # An interrupted run (checkpoint, no done.json) is resumed.
    (other / "done.json").unlink()
    assert trained_run(notebook_config(overrides={**SMALL, "loss.tau": 0.5}), workspace=tmp_path) == other
    assert calls[-1] == (other, True)


def test_bad_preset_is_named():
    with pytest.raises(ValueError, match="unknown preset"):
        notebook_config(preset="imagenet")


def test_new_weights_in_the_same_file_make_a_new_run(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    import hpkit.pipeline.train
    from hpkit import load_backbone

    calls = []
    real = hpkit.pipeline.train.train
    monkeypatch.setattr(hpkit.pipeline.train, "train", lambda cfg, out, **kw: calls.append(out) or real(cfg, out, **kw))
    state = {k: v.contiguous() for k, v in load_backbone("random_tiny").vit.state_dict().items()}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    cfg = notebook_config(overrides={**SMALL, "model.weights": str(path)})
    run = trained_run(cfg, workspace=tmp_path / "ws")
    assert trained_run(cfg, workspace=tmp_path / "ws") == run and len(calls) == 1
    save_file({**state, "pos_embed": state["pos_embed"] + torch.ones(())}, str(path))  # same name, new content
    other = trained_run(cfg, workspace=tmp_path / "ws")
    assert other != run and len(calls) == 2


def test_resolving_the_backbone_loads_nothing_and_keeps_the_notice():
    """Working out a run's key names what "auto" picks without building it, so the one-line notice is
    still printed (once) when training loads the backbone."""
    import subprocess
    import sys

    code = ("import sys; from hpkit.lessons import notebook_config, resolved_backbone; import hpkit\n"
            "cfg = notebook_config()\n"
            "name = resolved_backbone(cfg); name = resolved_backbone(cfg)\n"
            "print('BUILT', 'timm.models.vision_transformer' in sys.modules and "
            "any(type(o).__name__ == 'VisionTransformer' for o in __import__('gc').get_objects()))\n"
            "vit = hpkit.load_backbone('auto'); hpkit.load_backbone('auto')\n"
            "print('SAME', name == vit.name)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert "BUILT False" in result.stdout and "SAME True" in result.stdout, result.stdout + result.stderr
    notices = [line for line in result.stderr.splitlines() if line.startswith("hpkit: no DINO")]
    assert len(notices) == 1, result.stderr
