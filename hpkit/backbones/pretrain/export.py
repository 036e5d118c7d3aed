"""Backbone files: :func:`export_backbone` writes a run's ViT as ``.safetensors`` (timm keys, no
head) with JSON metadata, :func:`save_backbone_file` / :func:`read_backbone_metadata` write and read
such files, and :func:`load_init_weights` starts a run from one (``PretrainConfig.init_weights``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from hpkit._util import atomic_write
from hpkit.backbones.pretrain.config import _TINY, CHECKPOINT, PretrainConfig, _config_dict, trains_teacher
from hpkit.backbones.vit import file_sha256, read_backbone_metadata  # noqa: F401 - part of this module's API

__all__ = ["export_backbone", "save_backbone_file", "read_backbone_metadata", "load_init_weights"]


def load_init_weights(backbone: nn.Module, path: str | Path) -> str:
    """Load a ``.safetensors`` backbone file into ``backbone`` (``PretrainConfig.init_weights``).

    Returns:
        the file's sha256 (hex), which the run records.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file's tensors do not fit the configured architecture.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_weights={path} does not exist: give a .safetensors backbone file, for "
                                "example one written by `hpkit pretrain ... --export FILE`")
    try:
        backbone.load_state_dict(load_file(str(path)))
    except RuntimeError as err:
        raise ValueError(f"init_weights={path} does not fit the configured ViT (patch_size, embed_dim, depth, "
                         f"num_heads, img_size must match the run that wrote it): {err}") from None
    return file_sha256(path)


def export_backbone(source: str | Path, path: str | Path, *, dtype: str = "float32", network: str = "auto"
                    ) -> Path:
    """Write a pretrained ViT (timm state-dict keys, no DINO head) as ``.safetensors``.

    Args:
        source: a pretraining folder (with ``checkpoint.pt``) or a checkpoint file.
        path: the ``.safetensors`` file to write; ``path`` with suffix ``.json`` gets the metadata
            (configuration, steps, epochs, training time, last loss, parameter count, sha256).
        dtype: ``"float32"`` (~11 MB for the default model) or ``"float16"`` (half of that).
        network: ``"teacher"``, ``"student"`` or ``"auto"``: the teacher when the loss used it
            (:func:`trains_teacher`: DINO, as in DINO's own releases), else the student.

    Returns:
        ``path``. Load it with ``hpkit.load_backbone("random_tiny", weights=path)`` when the
        architecture is the default one (``PretrainConfig().matches_random_tiny``).
    """
    source, path = Path(source), Path(path)
    ckpt = source / CHECKPOINT if source.is_dir() else source
    if not ckpt.is_file():
        raise FileNotFoundError(f"no pretraining checkpoint at {ckpt}: run hpkit.backbones.pretrain.pretrain first")
    if path.suffix != ".safetensors":
        raise ValueError(f"export path must end in .safetensors, got {path}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    if network not in ("auto", "teacher", "student"):
        raise ValueError(f"network must be 'auto', 'teacher' or 'student', got {network!r}")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    # A setting the checkpoint does not record (added to hpkit later) had its default then.
    cfg = PretrainConfig(**_config_dict(PretrainConfig()) | state["config"])
    if network == "auto":
        network = "teacher" if trains_teacher(cfg) else "student"
    weights = {k[len("backbone."):]: v.to(getattr(torch, dtype)).contiguous()
               for k, v in state[network].items() if k.startswith("backbone.")}
    history = state["history"]
    meta = {"format": f"hpkit-pretrained ViT ({network} backbone, timm keys)", "network": network,
            "timm_name": _TINY.timm_name,
            "loads_as": "random_tiny" if cfg.matches_random_tiny else None, "dtype": dtype,
            "parameters": sum(v.numel() for v in weights.values()), "steps": state["step"],
            "epochs": round(state["step"] / state["steps_per_epoch"], 2),
            "training_seconds": round(state["seconds"], 1), "final_loss": history[-1]["loss"] if history else None,
            "config": state["config"]}
    if state.get("init_weights_sha256"):  # where the run started: the file's digest and its own metadata
        meta["init_weights"] = {"sha256": state["init_weights_sha256"],
                                "metadata": state.get("init_weights_metadata")}

    return save_backbone_file(weights, path, meta)


def save_backbone_file(weights: dict[str, Tensor], path: str | Path, meta: dict) -> Path:
    """Write timm-keyed backbone ``weights`` to ``path`` (.safetensors, ``meta`` as JSON under the
    metadata key ``hpkit``) and ``meta`` plus the file's ``sha256`` beside it as ``.json``, both atomically.
    Returns ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp), metadata={"hpkit": json.dumps(meta)})
        os.chmod(tmp, 0o644)  # safetensors creates the file owner-only; the weights are meant to be shipped

    atomic_write(path, write)
    meta = meta | {"sha256": file_sha256(path)}
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return path
