"""Backbone: shapes, attention logits against timm's own attention maps, checkpoint formats, errors."""

import os
from pathlib import Path
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.utils import AttentionExtract

from hpkit import BackboneWeightsError, load_backbone


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_backbone("random_tiny")


def test_shapes_and_frozen(tiny):
    images = torch.rand(2, 3, 40, 56)
    feats, logits = tiny(images)
    assert feats.shape == (2, 192, 5, 7)
    assert logits.shape == (2, 3, 35, 35)
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not tiny.vit.training
    assert tiny(images, attention=False).attn_logits is None


def test_features_match_timm_forward_features(tiny):
    images = torch.rand(2, 3, 32, 32)
    feats, _ = tiny(images)
    normed = (images - tiny.mean) / tiny.std
    with torch.no_grad():
        tokens = tiny.vit.forward_features(normed)[:, 1:]  # drop CLS
    torch.testing.assert_close(feats, tokens.transpose(1, 2).reshape(2, 192, 4, 4))


def test_attention_logits_match_timm_attention_maps(tiny):
    """softmax over patch keys of our logits == timm's (non-fused) attention restricted to patches."""
    last = tiny.vit.blocks[-1].attn
    fused = last.fused_attn
    last.fused_attn = False
    try:
        extractor = AttentionExtract(tiny.vit, names=[f"blocks.{len(tiny.vit.blocks) - 1}.attn.attn_drop"],
                                     method="hook")
        images = torch.rand(2, 3, 32, 40)
        normed = (images - tiny.mean) / tiny.std
        with torch.no_grad():
            maps = next(iter(extractor(normed).values()))  # (B, heads, T, T) post-softmax, CLS first
    finally:
        last.fused_attn = fused
    patch = maps[:, :, 1:, 1:]
    expected = patch / patch.sum(-1, keepdim=True)
    _, logits = tiny(images)
    torch.testing.assert_close(logits.softmax(-1), expected, rtol=1e-4, atol=1e-6)


def test_patch_size_and_range_errors(tiny):
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        tiny(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiny(torch.randn(1, 3, 32, 32) * 3)
    with pytest.raises(ValueError, match="RGB"):
        tiny(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="unknown backbone"):
        load_backbone("dino_vits9")


@pytest.fixture(scope="module")
def vits8_state():
    torch.manual_seed(1)
    vit = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0)
    return vit.state_dict()


def test_loads_official_dino_checkpoint_formats(tmp_path, vits8_state):
    # The official full checkpoint: {'teacher': {'module.backbone.*', 'module.head.*'}, 'student': ...}
    wrapped = {f"module.backbone.{k}": v for k, v in vits8_state.items()}
    wrapped["module.head.last_layer.weight_g"] = torch.ones(1, 3)
    torch.save({"teacher": wrapped, "student": {}, "epoch": 100}, tmp_path / "full.pth")
    torch.save(vits8_state, tmp_path / "plain.pth")  # the released backbone-only file
    save_file(vits8_state, str(tmp_path / "timm.safetensors"))
    images = torch.rand(1, 3, 32, 32)
    outputs = []
    for name in ("full.pth", "plain.pth", "timm.safetensors"):
        bb = load_backbone("dino_vits8", weights=tmp_path / name)
        torch.testing.assert_close(bb.vit.blocks[3].attn.qkv.weight, vits8_state["blocks.3.attn.qkv.weight"])
        outputs.append(bb(images))
    assert outputs[0].feats.shape == (1, 384, 4, 4) and outputs[0].attn_logits.shape == (1, 6, 16, 16)
    for other in outputs[1:]:
        torch.testing.assert_close(other.feats, outputs[0].feats)


def test_wrong_architecture_checkpoint_is_a_clear_error(tmp_path, tiny):
    torch.save(tiny.vit.state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(BackboneWeightsError, match="does not fit backbone 'dino_vitb8'"):
        load_backbone("dino_vitb8", weights=tmp_path / "tiny.pth")
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        load_backbone("dino_vits8", weights=tmp_path / "missing.pth")


def _run_offline(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HPKIT_WEIGHTS": str(tmp_path / "weights")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_offline_without_weights_says_where_to_put_them(tmp_path):
    result = _run_offline(
        "import hpkit\n"
        "try:\n    hpkit.load_backbone('dino_vits8')\n"
        "except hpkit.BackboneWeightsError as e:\n    print('ERR', e)\n", tmp_path)
    assert "ERR" in result.stdout, result.stderr
    assert "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth" in result.stdout
    assert str(tmp_path / "weights" / "dino_deitsmall8_pretrain.pth") in result.stdout


@pytest.mark.slow
def test_auto_uses_local_dino_weights_else_falls_back(tmp_path, vits8_state):
    code = "import hpkit; hpkit.load_backbone('auto'); print('NAME', hpkit.load_backbone('auto').name)"
    result = _run_offline(code, tmp_path)  # loaded twice, said once
    assert "NAME hp-tiny" in result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("hpkit:")]
    assert len(lines) == 1 and "no DINO ViT-S/8 weights" in lines[0] and "bundled 'hp-tiny'" in lines[0]
    # Without the bundled file (an install without data/): the random backbone, said in one line.
    missing = ("import hpkit, hpkit.backbones.vit as b, pathlib; b.BUNDLED_WEIGHTS = pathlib.Path('/no/such.safetensors'); "
               "print('NAME', hpkit.load_backbone('auto').name)\n"
               "try:\n    hpkit.load_backbone('hp-tiny')\nexcept hpkit.BackboneWeightsError as e:\n    print('ERR', e)")
    result = _run_offline(missing, tmp_path)
    assert "NAME random_tiny" in result.stdout and "no bundled 'hp-tiny'" in result.stderr, result.stderr
    assert "ERR the bundled hp-tiny weights" in result.stdout and "data/README.md" in result.stdout
    (tmp_path / "weights").mkdir()
    torch.save(vits8_state, tmp_path / "weights" / "dino_deitsmall8_pretrain.pth")
    result = _run_offline(code, tmp_path)
    assert "NAME dino_vits8" in result.stdout, result.stderr


def test_unreachable_hub_fails_fast_with_advice(tmp_path, monkeypatch):
    import socket

    import hpkit.backbones.vit as backbone

    def refuse(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setenv("HPKIT_WEIGHTS", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(backbone, "_local_weights", lambda spec: None)  # ignore any real local cache
    with pytest.raises(BackboneWeightsError, match="cannot be reached") as err:
        load_backbone("dino_vitb16")
    assert "dino_vitbase16_pretrain.pth" in str(err.value)


def test_random_tiny_is_the_same_in_every_run():
    torch.manual_seed(123)
    a = load_backbone("random_tiny")
    torch.manual_seed(456)
    b = load_backbone("random_tiny")
    torch.testing.assert_close(a.vit.blocks[0].attn.qkv.weight, b.vit.blocks[0].attn.qkv.weight)


def test_weights_source_and_digest_follow_the_file(tmp_path, tiny):
    import hashlib

    from hpkit.backbones.vit import BUNDLED_WEIGHTS, file_sha256, weights_source

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.vit.state_dict().items()}, str(path))
    assert weights_source("random_tiny") is None and weights_source("hp-tiny") == BUNDLED_WEIGHTS
    assert weights_source("random_tiny", path) == path
    assert load_backbone("random_tiny", weights=path).weights_path == path
    assert load_backbone("hp-tiny").weights_path == BUNDLED_WEIGHTS and tiny.weights_path is None
    first = file_sha256(path)
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    state = {k: v.contiguous() for k, v in tiny.vit.state_dict().items()}
    state["cls_token"] = state["cls_token"] + 1.0
    save_file(state, str(path))
    os.utime(path, ns=(1, 1))  # even with an old modification time, the size/mtime key changes
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest() != first


def test_auto_with_an_exported_file_loads_the_architecture_the_file_names():
    # hpkit's exports record "loads_as" (here random_tiny): auto must not read them as DINO ViT-S/8.
    backbone = load_backbone("auto", weights=Path(__file__).parents[1] / "data" / "hp_tiny.safetensors")
    reference = load_backbone("hp-tiny")
    assert backbone.name == "random_tiny" and backbone.patch_size == 8
    assert all(torch.equal(a, b) for a, b in zip(backbone.state_dict().values(), reference.state_dict().values()))
