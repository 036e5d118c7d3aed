"""Attention alignment: the target and loss by hand, what trains and what does not, the file it writes."""

import hashlib
import json
import math

import pytest
import torch

from hpkit import load_backbone
from hpkit.__main__ import main as cli
from hpkit.backbones.alignment import AlignConfig, affinity_targets, align_attention, align_file, attention_alignment_loss

SMALL = dict(steps=4, batch_size=4, num_images=8, image_size=32, lr=1e-2)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_affinity_targets_by_hand():
    # Three tokens: a, 2a (cosine 1 with a) and b orthogonal to a.
    tokens = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]])
    t = affinity_targets(tokens, temperature=0.5)
    e2 = math.exp(2.0)  # cos 1 / 0.5
    row0 = torch.tensor([e2, e2, 1.0]) / (2 * e2 + 1)
    row2 = torch.tensor([1.0, 1.0, e2]) / (2 + e2)
    torch.testing.assert_close(t[0, 0], row0)
    torch.testing.assert_close(t[0, 1], row0)
    torch.testing.assert_close(t[0, 2], row2)


def test_alignment_loss_matches_an_explicit_sum():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)
    targets = torch.rand(2, 5, 5, generator=g, dtype=torch.float64)
    targets = targets / targets.sum(-1, keepdim=True)
    total, count = 0.0, 0
    for b in range(2):
        for h in range(3):
            for i in range(5):
                z = [float(v) for v in logits[b, h, i]]
                lse = math.log(sum(math.exp(v) for v in z))
                total += -sum(float(targets[b, i, j]) * (z[j] - lse) for j in range(5))
                count += 1
    assert float(attention_alignment_loss(logits, targets)) == pytest.approx(total / count, rel=1e-6)
    # Minimised (to the target's entropy) when the attention rows equal the targets.
    entropy = float(-(targets * targets.log()).sum(-1).mean())
    assert float(attention_alignment_loss(targets.log()[:, None].expand(-1, 3, -1, -1), targets)) == pytest.approx(
        entropy, rel=1e-6)


def test_only_queries_and_keys_train_and_the_loss_falls():
    net = load_backbone("random_tiny")
    before = {k: v.clone() for k, v in net.vit.state_dict().items()}
    result = align_attention(net, AlignConfig(**SMALL), progress=False)
    after = net.vit.state_dict()
    dim = net.embed_dim
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"blocks.5.attn.qkv.weight", "blocks.5.attn.qkv.bias"}
    for k in changed:  # query and key rows move, value rows do not
        assert not torch.equal(before[k][: 2 * dim], after[k][: 2 * dim])
        assert torch.equal(before[k][2 * dim:], after[k][2 * dim:])
    assert not any(p.requires_grad for p in net.parameters())  # frozen again afterwards
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 4 and losses[-1] < losses[0]
    # Deterministic: the same settings give the same losses and weights.
    again = load_backbone("random_tiny")
    assert [h["loss"] for h in align_attention(again, AlignConfig(**SMALL), progress=False)["history"]] == losses
    assert torch.equal(again.vit.blocks[5].attn.qkv.weight, net.vit.blocks[5].attn.qkv.weight)


def test_align_file_records_its_source_and_loads(tmp_path, capsys):
    from safetensors.torch import save_file

    source = tmp_path / "source.safetensors"
    save_file(load_backbone("random_tiny").vit.state_dict(), str(source), metadata={"hpkit": json.dumps({"steps": 7})})
    out = align_file(source, tmp_path / "aligned.safetensors", AlignConfig(**SMALL), progress=False)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert meta["source"] == {"steps": 7} and meta["alignment"]["steps"] == 4 and meta["loads_as"] == "random_tiny"
    assert meta["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    aligned = load_backbone("random_tiny", weights=out)
    reference = load_backbone("random_tiny")
    align_attention(reference, AlignConfig(**SMALL), progress=False)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(aligned(images).attn_logits, reference(images).attn_logits, atol=1e-6, rtol=0)
    # The command line does the same, and bad input gets a clear message.
    assert cli(["align-attention", str(source), str(tmp_path / "cli.safetensors"), "--steps", "4", "--batch-size",
                "4", "--num-images", "8", "--image-size", "32", "--lr", "1e-2", "--no-progress"]) == 0
    assert "attention aligned in 4 steps" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli.json").read_text())["final_loss"] == pytest.approx(meta["final_loss"], abs=1e-6)
    # The --set dialect of `hpkit train` gives the same file; an unknown key is one line with a suggestion.
    assert cli(["align-attention", str(source), str(tmp_path / "set.safetensors"), "--set", "steps=4", "--set",
                "batch_size=4", "--set", "num_images=8", "--set", "image_size=32", "--set", "lr=1e-2",
                "--no-progress"]) == 0
    assert json.loads((tmp_path / "set.json").read_text())["final_loss"] == pytest.approx(meta["final_loss"], abs=1e-6)
    capsys.readouterr()
    assert cli(["align-attention", str(source), str(tmp_path / "typo.safetensors"), "--set", "temprature=0.2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'temperature'?" in err and not (tmp_path / "typo.json").exists()
    assert cli(["align-attention", str(tmp_path / "missing.safetensors"), str(tmp_path / "x.safetensors")]) == 2
    assert "is not a .safetensors backbone file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="temperature and lr must be > 0"):
        AlignConfig(temperature=0)
