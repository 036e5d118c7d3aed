"""The training loop on tiny synthetic data: it learns, writes atomically, resumes exactly, stops on NaN."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import hpkit.pipeline.step
from hpkit.pipeline.config import get_config
from hpkit.pipeline.evaluate import evaluate
from hpkit.pipeline.feature_cache import FeatureCache
from hpkit.pipeline.train import TrainingDiverged, photometric, train

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
        train(get_config("demo", TINY + ["loss.pool_size=64"]), tmp_path / "big_pool", progress=False)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(get_config("demo", TINY), tmp_path / "new", resume=True, progress=False)
    earlier = tmp_path / "earlier"  # checks that need the backbone also run before force deletes a run
    earlier.mkdir()
    (earlier / "checkpoint.pt").write_text("an earlier run")
    (earlier / "eval.json").write_text("{}")
    with pytest.raises(ValueError, match="larger than the 24 training images"):
        train(get_config("demo", TINY + ["loss.pool_size=64"]), earlier, force=True, progress=False)
    assert (earlier / "checkpoint.pt").read_text() == "an earlier run" and (earlier / "eval.json").is_file()
    with pytest.raises(TrainingDiverged, match="at step 0"):
        train(get_config("demo", TINY + ["loss.tau=1e-30"]), tmp_path / "nan", progress=False)


def test_feature_cache_fills_once_and_resumes_exactly(tmp_path):
    cfg = get_config("demo", TINY + ["train.cache_features=true"])
    full = train(cfg, tmp_path / "full", max_steps=8, progress=False)
    cache = FeatureCache(tmp_path / "full" / "feature_cache", 24, (192, 4, 4), with_weights=True,
                         key=json.loads((tmp_path / "full" / "feature_cache" / "key.json").read_text()) | {})
    assert len(cache) == 24  # one epoch (6 steps x 4 images) filled every entry
    train(cfg, tmp_path / "split", max_steps=5, progress=False)
    resumed = train(cfg, tmp_path / "split", max_steps=8, progress=False, resume=True)
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in full["history"]], abs=1e-6)
    plain = train(get_config("demo", TINY), tmp_path / "plain", max_steps=1, progress=False)
    assert full["history"][0]["loss"] == pytest.approx(plain["history"][0]["loss"], rel=1e-3)  # fp16 cache ~ fp32


def test_feature_cache_is_rebuilt_when_the_weights_file_changes(tmp_path):
    from safetensors.torch import save_file

    from hpkit import load_backbone
    from hpkit.backbones.vit import file_sha256

    state = {k: v.contiguous() for k, v in load_backbone("random_tiny").vit.state_dict().items()}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    shared = ["train.cache_features=true", f"train.cache_dir={tmp_path / 'cache'}", f"model.weights={path}"]
    first = train(get_config("demo", TINY + shared), tmp_path / "a", max_steps=1, progress=False)
    key = json.loads((tmp_path / "cache" / "key.json").read_text())
    assert key["weights_sha256"] == file_sha256(path) and key["backbone"] == "random_tiny"
    save_file({**state, "patch_embed.proj.weight": 2 * state["patch_embed.proj.weight"]}, str(path))
    second = train(get_config("demo", TINY + shared), tmp_path / "b", max_steps=1, progress=False)
    assert json.loads((tmp_path / "cache" / "key.json").read_text())["weights_sha256"] == file_sha256(path)
    assert second["history"][0]["loss"] != pytest.approx(first["history"][0]["loss"], rel=1e-4)  # new features


def test_feature_cache_computes_only_missing_rows(tmp_path):
    calls = []

    def compute(missing):
        calls.append(missing.tolist())
        return {"feats": torch.arange(len(missing) * 8.0).view(-1, 2, 2, 2) + 1 / 3}

    key = {"what": "test"}
    cache = FeatureCache(tmp_path, 5, (2, 2, 2), with_weights=False, key=key)
    first = cache.lookup(torch.tensor([3, 1]), compute)["feats"]
    second = cache.lookup(torch.tensor([1, 4, 3]), compute)["feats"]
    assert calls == [[0, 1], [1]]  # positions (within each request) of the entries not cached yet
    torch.testing.assert_close(second[0], first[1]) and torch.testing.assert_close(second[2], first[0])
    assert first[0, 0, 0, 0].item() == float(torch.tensor(1 / 3).half())  # values come back float16-rounded
    assert len(FeatureCache(tmp_path, 5, (2, 2, 2), with_weights=False, key=key)) == 3  # reopened, kept
    assert len(FeatureCache(tmp_path, 5, (2, 2, 2), with_weights=False, key={"what": "else"})) == 0  # rebuilt


def test_validation_history_matches_evaluation(tmp_path):
    cfg = get_config("demo", TINY + ["data.num_val=4", "train.val_every=3"])
    result = train(cfg, tmp_path, max_steps=7, progress=False)
    assert [v["step"] for v in result["validation"]] == [3, 6, 7]
    saved = json.loads((tmp_path / "history.json").read_text())
    assert len(saved["steps"]) == 7 and saved["validation"] == result["validation"]
    final = evaluate(tmp_path, batch_size=4)
    assert result["validation"][-1]["cluster_accuracy"] == pytest.approx(final["cluster"]["pixel_accuracy"])
    assert result["validation"][-1]["linear_miou"] == pytest.approx(final["linear"]["mean_iou"])


def test_interrupt_keeps_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch):
    cfg = get_config("demo", TINY)
    full = train(cfg, tmp_path / "full", max_steps=6, progress=False)
    real = hpkit.pipeline.step.lambda_schedule

    def interrupt_at_4(step, *args, **kwargs):
        if step == 4:
            raise KeyboardInterrupt
        return real(step, *args, **kwargs)

    monkeypatch.setattr(hpkit.pipeline.step, "lambda_schedule", interrupt_at_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["step"] == 4
    monkeypatch.setattr(hpkit.pipeline.step, "lambda_schedule", real)
    resumed = train(cfg, tmp_path / "cut", max_steps=6, progress=False, resume=True)
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in full["history"]], abs=1e-6)


def test_bf16_autocast_runs_close_to_fp32(tmp_path):
    fp32 = train(get_config("demo", TINY), tmp_path / "a", max_steps=2, progress=False)
    bf16 = train(get_config("demo", TINY + ["train.amp=bf16"]), tmp_path / "b", max_steps=2, progress=False)
    assert bf16["history"][0]["loss"] == pytest.approx(fp32["history"][0]["loss"], rel=0.05)
    with pytest.raises(ValueError, match="train.amp=fp16 needs CUDA"):
        train(get_config("demo", TINY + ["train.amp=fp16"]), tmp_path / "c", progress=False)


def test_official_augmentation_reproduces_the_clamp():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    ours = photometric(images, torch.Generator().manual_seed(1))
    official = photometric(images, torch.Generator().manual_seed(1), official=True, mean=mean, std=std)
    assert 0 <= ours.min() and ours.max() <= 1
    # the normalised input spans about [-2.1, 2.6]; the jitter clamps it to [0, 1] (D12): many exact zeros
    assert 0 <= official.min() and official.max() <= 1 and (official == 0).float().mean() > 0.15
    assert (ours == 0).float().mean() < 0.01
    # A pixel whose largest normalised channel is exactly 0 made torchvision's hue step divide 0 by 0
    # (NaN, then spread by the blur): the official view must stay finite for every draw.
    dark = torch.zeros(1, 3, 8, 8)
    dark[:, 0], dark[:, 1], dark[:, 2] = 0.485, 0.3, 0.2  # red normalises to exactly 0, the others below
    for seed in range(24):  # the jitter's op order is random: hue comes first in about a quarter of draws
        view = photometric(dark, torch.Generator().manual_seed(seed), official=True, mean=mean, std=std)
        assert torch.isfinite(view).all(), seed


def test_unlabelled_folder_trains_and_sizes_are_checked(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    folder = TINY + ["data.dataset=folder", f"data.root={tmp_path}", "loss.pool_size=8", "train.val_every=0"]
    result = train(get_config("demo", folder), tmp_path / "run", max_steps=2, progress=False)
    assert result["steps"] == 2 and all(math.isfinite(h["probe_loss"]) for h in result["history"])
    with pytest.raises(ValueError, match="data.image_size=36 is not a multiple of the patch size 8"):
        train(get_config("demo", TINY + ["data.image_size=36"]), tmp_path / "bad", progress=False)


def test_probe_refit_retrains_only_the_cluster_probe_on_the_final_head(tmp_path):
    from hpkit.pipeline.checkpoint import load_run
    from hpkit.pipeline.datasets import build_dataset

    base = TINY + ["train.cache_features=false"]  # features straight from the backbone, as the reference below
    plain = get_config("demo", base + ["train.probe_refit_epochs=0"])
    cfg = get_config("demo", base + ["train.probe_refit_epochs=2", "train.probe_refit_restarts=3"])
    train(plain, tmp_path / "plain", progress=False)  # 24 images / 4 x 2 epochs = 12 steps
    train(cfg, tmp_path / "refit", progress=False)
    a = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "refit" / "checkpoint.pt", weights_only=False)
    assert b["probe_refitted"] and not a["probe_refitted"] and a["step"] == b["step"] == 12
    for name in ("head", "proj", "linear"):  # the refit touches nothing but the cluster probe
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name])
    assert not torch.equal(a["cluster"]["centroids"], b["cluster"]["centroids"])

    # Reference, written out: 3 random-normal restarts, each 2 epochs of Adam on -mean max cosine to
    # its centroids over the final head's features of the train images in the documented order; the
    # restart with the lowest loss over all 24 train images is kept.
    run = load_run(tmp_path / "refit")
    data = build_dataset(cfg, "train")
    with torch.no_grad():
        rows = torch.nn.functional.normalize(run.head(run.backbone(torch.stack(
            [data[i][0] for i in range(24)])).feats).permute(0, 2, 3, 1).reshape(24, -1, 16), dim=2)

    def loss(centroids, images):
        return -(rows[images].reshape(-1, 16) @ torch.nn.functional.normalize(centroids, dim=1).T).max(dim=1).values.mean()

    ends, losses = [], []
    for restart in range(3):
        centroids = torch.randn(9, 16, generator=torch.Generator().manual_seed(1000 * restart)).requires_grad_()
        adam = torch.optim.Adam([centroids], lr=cfg.optim.cluster_lr)
        for epoch in range(2):
            for batch in torch.randperm(24, generator=torch.Generator().manual_seed(1 + epoch)).split(4):
                adam.zero_grad()
                loss(centroids, batch).backward()
                adam.step()
        ends.append(centroids.detach())
        losses.append(loss(centroids, torch.arange(24)).item())
    assert max(losses) - min(losses) > 1e-3  # the restarts end apart, so which one is kept matters
    torch.testing.assert_close(b["cluster"]["centroids"], ends[losses.index(min(losses))], atol=1e-5, rtol=1e-5)

    # A run stopped early is not refitted; resumed to its end, it is, exactly as the one that ran through.
    train(cfg, tmp_path / "split", max_steps=11, progress=False)
    assert not torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["probe_refitted"]
    train(cfg, tmp_path / "split", progress=False, resume=True)
    c = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert c["probe_refitted"]
    torch.testing.assert_close(c["cluster"]["centroids"], b["cluster"]["centroids"], atol=1e-6, rtol=0)
