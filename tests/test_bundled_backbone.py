"""The bundled ``hp-tiny`` backbone (data/hp_tiny.safetensors) against a random ViT of the same shape.

Smaller than the model card's measurement (benchmarks/backbone_quality.py: 100 train / 50 val
scenes) so that it runs in about half a minute. On this smaller set the bundled file measured
linear-probe mIoU 52.6 vs 29.3 for random, k-means mIoU 30.3 vs 21.5, GHP precision 52.6 % vs
46.3 % (pool: one patch of each of the 64 train scenes), and attention premise 0.860 above vs 0.521
below (random: 0.795 vs 0.767). The margins below sit well inside those, so the test fails when
the bundled file regresses, not when a library detail moves a number by a point.
"""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from hpkit import load_backbone
from hpkit.backbones.alignment import AlignConfig
from hpkit.backbones.vit import BUNDLED_WEIGHTS
from hpkit.data import SyntheticScenes
from hpkit.lessons.diagnostics import (attention_agreement, extract, ghp_precision, kmeans_miou, linear_probe_miou,
                               patch_labels)
from hpkit.backbones.pretrain import _RUN_ONLY as RUN_ONLY  # settings that may differ between runs of one recipe
from hpkit.backbones.pretrain import PretrainConfig


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
        labels = patch_labels(va["labels"], va["feats"].shape[-2:])
        out[name] = {"linear": linear_probe_miou(tr, va, 9)["mean_iou"], "kmeans": kmeans_miou(va, 9)["mean_iou"],
                     "ghp": ghp_precision(tr["feats"], va["feats"], labels), **attention_agreement(va["attn"], labels)}
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
    # The recipe recorded in the file is the one the model card gives, command by command and flag by
    # flag: the file is stage 3 (attention alignment) of stage 2 (dense VICReg + keep term, started
    # from stage 1's export) of stage 1 (region-level contrast from the random initialisation).
    card = (BUNDLED_WEIGHTS.parent / "README.md").read_text()
    block = card.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = [line.split() for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert [c[:4] for c in commands] == [["python", "-m", "hpkit", "pretrain"]] * 2 + [
        ["python", "-m", "hpkit", "align-attention"]]
    regions, vicreg, align = commands
    stage2 = meta["source"]
    stage1 = stage2["init_weights"]["metadata"]
    check_flags(regions, stage1["config"], PretrainConfig())
    check_flags(vicreg, stage2["config"], PretrainConfig(), paths=("--init-weights",))
    check_flags(align, meta["alignment"], AlignConfig())
    # The chain: stage 2 starts from stage 1's export, stage 3 from stage 2's.
    assert flag(regions, "--export") == flag(vicreg, "--init-weights") and flag(vicreg, "--export") == align[4]
    assert align[5] == "data/hp_tiny.safetensors" and meta["loads_as"] == "random_tiny"
    assert stage1["config"]["dense_objective"] == "regions" and stage1["network"] == "student"
    assert stage2["config"]["dense_objective"] == "vicreg" and stage2["config"]["keep_weight"] > 0
    assert stage2["network"] == "student"
    for stage in (stage1, stage2):
        assert f"{stage['steps']} steps" in card
    assert f"{meta['alignment']['steps']} steps" in card


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def check_flags(command: list[str], config: dict, defaults, paths: tuple[str, ...] = ()) -> None:
    """Every --flag of the command equals the recorded setting (a path flag only needs to be set),
    and every setting the command leaves out has its default."""
    flags = {command[i]: command[i + 1] for i in range(len(command) - 1) if command[i].startswith("--")}
    recorded = dataclasses.asdict(defaults) | config
    for name, value in flags.items():
        field = name[2:].replace("-", "_")
        if name == "--export" or name in paths:
            assert recorded.get(field, "set") is not None, name
            continue
        expected = recorded[field]
        if isinstance(expected, (list, tuple)):
            given, expected = [float(v) for v in value.split(",")], [float(v) for v in expected]
        else:
            given = type(expected)(value)
        assert given == expected, (name, value, expected)
    named = {n[2:].replace("-", "_") for n in flags}
    for field, default in dataclasses.asdict(defaults).items():
        if field not in named and field in config and field not in RUN_ONLY:
            value = list(default) if isinstance(default, tuple) else default
            assert config[field] == value, (field, config[field], default)


def test_bundled_backbone_is_far_above_random_on_a_linear_probe(scores):
    assert scores["hp-tiny"]["linear"] > scores["random_tiny"]["linear"] + 0.12  # measured +23.3 points


def test_bundled_backbone_has_better_neighbours_than_random(scores):
    # k-means and GHP compare raw features: HP can only beat k-means when these are good.
    hp, random = scores["hp-tiny"], scores["random_tiny"]
    assert hp["kmeans"] > random["kmeans"] + 0.04  # measured 30.3 vs 21.5
    assert hp["ghp"] > random["ghp"] + 0.03  # measured 52.6 % vs 46.3 %


def test_attention_premise_holds_on_the_bundled_backbone(scores):
    # Fig. 1(c): neighbours with above-average attention share the anchor's class more often.
    hp, random = scores["hp-tiny"], scores["random_tiny"]
    assert hp["above"] > hp["below"] + 0.25  # measured 0.860 vs 0.521
    assert hp["above"] - hp["below"] > 5 * (random["above"] - random["below"])  # random: 0.795 vs 0.767
