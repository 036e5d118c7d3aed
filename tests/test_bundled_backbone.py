"""The bundled ``hp-tiny`` backbone (data/hp_tiny.safetensors) against a random ViT of the same shape.

Smaller than the model card's measurement (benchmarks/backbone_quality.py: 100 train / 50 val
scenes) so that it runs in about half a minute. On this smaller set the bundled file measured
linear-probe mIoU 36.5 vs 29.3 for random, k-means mIoU 22.9 vs 17.9, and attention premise 0.865
above vs 0.498 below (random: 0.795 vs 0.767). The margins below sit well inside those, so the test
fails when the bundled file regresses, not when a library detail moves a number by a point.
"""

import json

import pytest
import torch
from safetensors import safe_open

from hpkit import load_backbone
from hpkit.backbone import BUNDLED_WEIGHTS
from hpkit.data import SyntheticScenes
from hpkit.diagnostics import attention_agreement, extract, kmeans_miou, linear_probe_miou, patch_labels


@pytest.fixture(scope="module")
def scores():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    train = SyntheticScenes("train", num_images=64, image_size=128)
    val = SyntheticScenes("val", num_images=32, image_size=128)
    out = {}
    for name in ("hp-tiny", "random_tiny"):
        backbone = load_backbone(name)
        tr, va = extract(backbone, train), extract(backbone, val, attention=True)
        out[name] = {"linear": linear_probe_miou(tr, va, 9)["mean_iou"], "kmeans": kmeans_miou(va, 9)["mean_iou"],
                     **attention_agreement(va["attn"], patch_labels(va["labels"], va["feats"].shape[-2:]))}
    torch.set_num_threads(threads)
    return out


def test_bundled_file_is_small_loads_and_says_how_it_was_made():
    assert BUNDLED_WEIGHTS.is_file() and BUNDLED_WEIGHTS.stat().st_size <= 15 * 2**20
    backbone = load_backbone("hp-tiny")
    assert backbone.name == "hp-tiny" and backbone.patch_size == 8 and backbone.embed_dim == 192
    random = load_backbone("random_tiny")
    assert not torch.equal(backbone.vit.patch_embed.proj.weight, random.vit.patch_embed.proj.weight)
    with safe_open(str(BUNDLED_WEIGHTS), "pt") as f:
        meta = json.loads(f.metadata()["hpkit"])
    # The recipe recorded in the file is the one the model card gives, flag by flag.
    card = (BUNDLED_WEIGHTS.parent / "README.md").read_text()
    tokens = card.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ").split()
    assert tokens[:4] == ["python", "-m", "hpkit", "pretrain"]
    flags = {tokens[i]: tokens[i + 1] for i in range(len(tokens) - 1) if tokens[i].startswith("--")}
    assert flags["--export"] == "data/hp_tiny.safetensors" and len(flags) > 10
    config = meta["config"]
    for flag, value in flags.items():
        if flag == "--export":
            continue
        field = flag[2:].replace("-", "_")
        expected = config[field]
        given = [float(v) for v in value.split(",")] if isinstance(expected, list) else type(expected)(value)
        assert given == expected, (flag, value, expected)
    assert config["dino_weight"] == 0.0 and config["keep_weight"] > 0 and meta["network"] == "student"
    assert f"{meta['steps']} steps" in card


def test_bundled_backbone_is_far_above_random_on_a_linear_probe(scores):
    assert scores["hp-tiny"]["linear"] > scores["random_tiny"]["linear"] + 0.04  # measured +7.2 points


def test_bundled_backbone_keeps_the_random_features_clusters(scores):
    # k-means and GHP compare raw features: the bundled model must not lose what random features give.
    assert scores["hp-tiny"]["kmeans"] > scores["random_tiny"]["kmeans"]  # measured 22.9 vs 17.9


def test_attention_premise_holds_on_the_bundled_backbone(scores):
    # Fig. 1(c): neighbours with above-average attention share the anchor's class more often.
    hp, random = scores["hp-tiny"], scores["random_tiny"]
    assert hp["above"] > hp["below"] + 0.25  # measured 0.865 vs 0.498
    assert hp["above"] - hp["below"] > 5 * (random["above"] - random["below"])  # random: 0.795 vs 0.767
