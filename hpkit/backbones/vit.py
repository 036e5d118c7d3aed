"""The frozen self-supervised ViT: patch features and last-block attention logits.

``load_backbone(name)`` builds a timm ViT, loads weights, freezes it and wraps it in
:class:`FrozenViT`, whose forward returns for images (B, 3, H, W) in [0, 1]:

- ``feats`` (B, C, h, w): last-block tokens after the final LayerNorm, CLS dropped (the ``f`` of
  the paper; docs/official-code-differences.md#backbone-features);
- ``attn_logits`` (B, heads, P, P): the last block's *pre-softmax* patch-to-patch logits
  ``q_i . k_j / sqrt(d_head)`` (CLS row and column dropped), recomputed from q and k because timm's
  fused attention never materialises them (as DINO's ``get_last_selfattention``, before softmax).

Names: ``dino_vits8``, ``dino_vits16``, ``dino_vitb8``, ``dino_vitb16`` (timm's ``*.dino`` configs),
``random_tiny`` (a randomly initialised ViT with patch 8, width 192, depth 6, 3 heads, always from
seed 0: shapes right, features meaningless; for tests), ``hp-tiny`` (the same ViT, pretrained
self-supervised by ``hpkit.backbones.pretrain`` and ``hpkit.backbones.alignment`` on the synthetic scenes, bundled as
``data/hp_tiny.safetensors``; model card in ``data/README.md``) and ``auto`` (DINO ViT-S/8 when its
weights are on this machine, else ``hp-tiny``). Weights come from ``weights=PATH`` (official DINO
``.pth`` files, with or without ``teacher``/``student``, ``module.`` and ``backbone.``; timm
``.pth``/``.safetensors`` files), from the local weights folder (``$HPKIT_WEIGHTS`` or
``~/.cache/hpkit/weights``), from the Hugging Face cache, or from the hub when online.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from torch import Tensor, nn

__all__ = ["BackboneSpec", "BACKBONES", "BackboneOutput", "FrozenViT", "load_backbone", "auto_choice", "weights_dir",
           "load_state_dict_file", "BackboneWeightsError", "weights_source", "file_sha256",
           "read_backbone_metadata"]

_DINO_URL = "https://dl.fbaipublicfiles.com/dino/{0}/{0}.pth"


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one named backbone."""

    timm_name: str
    patch_size: int
    dino_file: str | None = None  # official DINO checkpoint name (without .pth)
    timm_kwargs: dict = field(default_factory=dict)
    pretrained: bool = True

    @property
    def url(self) -> str | None:
        return _DINO_URL.format(self.dino_file) if self.dino_file else None

    @property
    def hub_id(self) -> str | None:
        return f"timm/{self.timm_name}" if self.pretrained else None


BACKBONES: dict[str, BackboneSpec] = {
    "dino_vits8": BackboneSpec("vit_small_patch8_224.dino", 8, "dino_deitsmall8_pretrain"),
    "dino_vits16": BackboneSpec("vit_small_patch16_224.dino", 16, "dino_deitsmall16_pretrain"),
    "dino_vitb8": BackboneSpec("vit_base_patch8_224.dino", 8, "dino_vitbase8_pretrain"),
    "dino_vitb16": BackboneSpec("vit_base_patch16_224.dino", 16, "dino_vitbase16_pretrain"),
    "random_tiny": BackboneSpec("vit_tiny_patch16_224", 8, None,
                                dict(patch_size=8, embed_dim=192, depth=6, num_heads=3, img_size=224),
                                pretrained=False),
    # hpkit's own self-supervised tiny ViT (same shape as random_tiny), bundled under data/ (data/README.md)
    "hp-tiny": BackboneSpec("vit_tiny_patch16_224", 8, None,
                            dict(patch_size=8, embed_dim=192, depth=6, num_heads=3, img_size=224),
                            pretrained=False),
}

#: the bundled weights of ``hp-tiny`` (see data/README.md for the model card and how to reproduce them)
BUNDLED_WEIGHTS = Path(__file__).resolve().parents[2] / "data" / "hp_tiny.safetensors"


class BackboneWeightsError(FileNotFoundError):
    """Raised when pretrained weights are neither on disk nor downloadable."""


class BackboneOutput(NamedTuple):
    feats: Tensor  # (B, C, h, w)
    attn_logits: Tensor | None  # (B, heads, P, P), P = h * w


def weights_dir() -> Path:
    """Folder searched for backbone weights: ``$HPKIT_WEIGHTS`` or ``~/.cache/hpkit/weights``."""
    return Path(os.environ.get("HPKIT_WEIGHTS", Path.home() / ".cache" / "hpkit" / "weights"))


class FrozenViT(nn.Module):
    """A frozen timm ViT that returns patch features and last-block attention logits.

    Attributes: ``name``, ``patch_size``, ``embed_dim`` (C), ``num_heads``, ``mean``/``std`` (the
    normalisation applied inside ``forward``), ``weights_path`` (the file the weights came from, or
    None for a random initialisation or a hub download).
    """

    def __init__(self, vit: nn.Module, name: str, patch_size: int, weights_path: Path | None = None):
        super().__init__()
        self.vit = vit
        self.name = name
        self.weights_path = weights_path
        self.patch_size = patch_size
        self.embed_dim = vit.embed_dim
        self.num_heads = vit.blocks[-1].attn.num_heads
        cfg = getattr(vit, "pretrained_cfg", {}) or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenViT":
        """The backbone stays in eval mode (frozen, no dropout); ``train()`` is a no-op."""
        return super().train(False)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of an image of the given size (must be multiples of the patch)."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {p}: resize or crop it "
                f"to e.g. {max(p, height // p * p)}x{max(p, width // p * p)} first")
        return height // p, width // p

    @torch.no_grad()
    def forward(self, images: Tensor, *, attention: bool = True, normalized: bool = False) -> BackboneOutput:
        """Features and attention logits of images.

        Args:
            images: (B, 3, H, W) RGB in [0, 1], H and W multiples of ``patch_size`` (normalised inside).
            attention: also return the last block's attention logits (costs B * heads * P^2 floats).
            normalized: the images are already normalised with ``mean``/``std`` (no range check; used
                to reproduce the official augmentation, docs/official-code-differences.md#d12).

        Returns:
            ``BackboneOutput(feats (B, C, h, w), attn_logits (B, heads, P, P) or None)``.
        """
        x, (h, w) = self.last_block_input(images, normalized=normalized)
        vit, last = self.vit, self.vit.blocks[-1]
        logits = self.last_attention_logits(x) if attention else None
        x = vit.norm(last(x))
        feats = x[:, vit.num_prefix_tokens:].transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return BackboneOutput(feats, logits)

    @torch.no_grad()
    def last_block_input(self, images: Tensor, *, normalized: bool = False) -> tuple[Tensor, tuple[int, int]]:
        """The tokens entering the last block: (B, T, C) with the prefix (class) token first, and the
        patch grid ``(h, w)``; ``images`` as in :meth:`forward`."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) RGB, got shape {tuple(images.shape)}")
        h, w = self.grid(images.shape[2], images.shape[3])
        if not normalized:
            lo, hi = float(images.min()), float(images.max())
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise ValueError(f"images must be un-normalised RGB in [0, 1], got values in [{lo:.2f}, {hi:.2f}]; "
                                 "hpkit applies the backbone's mean/std itself")
        vit = self.vit
        x = images if normalized else (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.norm_pre(x)
        for blk in vit.blocks[:-1]:
            x = blk(x)
        return x, (h, w)

    def last_attention_logits(self, x: Tensor) -> Tensor:
        """(B, heads, P, P) pre-softmax patch-to-patch logits of the last block for its input tokens
        ``x`` (B, T, C) (:meth:`last_block_input`); differentiable in the block's parameters."""
        block = self.vit.blocks[-1]
        attn = block.attn
        b, t, _ = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        start = self.vit.num_prefix_tokens
        q, k = q[:, :, start:], k[:, :, start:]
        return (q * attn.scale) @ k.transpose(-2, -1)


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a ViT state dict from an official DINO ``.pth``, a timm ``.pth`` or a ``.safetensors`` file.

    Unwraps ``teacher`` (preferred) / ``student`` / ``model`` / ``state_dict`` entries, strips the
    ``module.`` and ``backbone.`` prefixes and drops the DINO projection head (``head.*``).
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - report the file, not the unpickler
            raise BackboneWeightsError(f"could not read {path} as a PyTorch checkpoint: {err}") from err
    for key in ("teacher", "student", "model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("head."):
            continue
        out[k] = v
    return out


def _local_weights(spec: BackboneSpec) -> Path | None:
    """A weights file for ``spec`` already on this machine, or None (never touches the network)."""
    folder = weights_dir()
    names = [f"{spec.dino_file}.pth"] if spec.dino_file else []
    for name in names + [f"{spec.timm_name}.safetensors", f"{spec.timm_name}.pth"]:
        if (folder / name).is_file():
            return folder / name
    if spec.hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec.hub_id, "model.safetensors")
            if isinstance(cached, str) and Path(cached).is_file():
                return Path(cached)
        except Exception:  # noqa: BLE001 - an unreadable cache just means "not cached"
            return None
    return None


def weights_source(name: str, weights: str | Path | None = None) -> Path | None:
    """The weights file that ``load_backbone(name, weights=weights)`` reads on this machine, without
    building the model: ``weights`` itself, the bundled file for ``hp-tiny``, a local DINO file, or
    None (random initialisation, or a download from the hub)."""
    if weights is not None:
        return Path(weights)
    if name == "auto":
        found = _local_weights(BACKBONES["dino_vits8"])
        if found is not None:
            return found
        return BUNDLED_WEIGHTS if BUNDLED_WEIGHTS.is_file() else None
    if name == "hp-tiny":
        return BUNDLED_WEIGHTS
    spec = BACKBONES.get(name)
    return _local_weights(spec) if spec is not None and spec.pretrained else None


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """The sha256 hex digest of a file's content (remembered per path, size and modification time),
    so that caches keyed on a weights file notice when its content changes."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the model hub answers at all (avoids a minute of retries on an offline machine)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _build_vit(spec: BackboneSpec, pretrained: bool = False) -> nn.Module:
    """The timm ViT of ``spec`` without classifier, accepting any multiple of the patch size."""
    return timm.create_model(spec.timm_name, pretrained=pretrained, num_classes=0, dynamic_img_size=True,
                             **spec.timm_kwargs)


def _load_into(vit: nn.Module, path: Path, name: str) -> None:
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = load_state_dict_file(path)
    try:
        result = vit.load_state_dict(checkpoint_filter_fn(state, vit), strict=False)
    except RuntimeError as err:  # shape mismatches
        first = str(err).split("\n")[1].strip() if "\n" in str(err) else str(err)
        raise BackboneWeightsError(f"{path} does not fit backbone {name!r} ({first}); check that the file "
                                   "is for this architecture") from None
    if result.missing_keys or result.unexpected_keys:
        raise BackboneWeightsError(
            f"{path} does not fit backbone {name!r}: missing {result.missing_keys[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}; check that the file is for this architecture")


def read_backbone_metadata(path: str | Path) -> dict | None:
    """The ``hpkit`` metadata of a ``.safetensors`` backbone file that hpkit wrote, or None."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("hpkit")
    return json.loads(raw) if raw else None


def _exported_architecture(path: str | Path) -> str | None:
    """The backbone name an hpkit-exported ``.safetensors`` file loads as (its ``loads_as``), else None."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        meta = read_backbone_metadata(path) or {}
    except (OSError, ValueError):
        return None
    return meta.get("loads_as") if meta.get("loads_as") in BACKBONES else None


_NOTICES_SHOWN: set[str] = set()


def _notice(text: str) -> None:
    """Print a notice on stderr once per process (a notebook loads the backbone many times)."""
    if text not in _NOTICES_SHOWN:
        _NOTICES_SHOWN.add(text)
        print(text, file=sys.stderr, flush=True)


def auto_choice(weights: str | Path | None = None) -> tuple[str, str | Path | None, str | None]:
    """What ``load_backbone("auto", weights=weights)`` loads on this machine, without building anything:
    ``(backbone name, weights, the one-line notice it prints or None)``.

    A file hpkit exported names the architecture it fits; any other file is DINO ViT-S/8 weights. Without a
    file: DINO ViT-S/8 when its weights are here, else the bundled ``hp-tiny``, else ``random_tiny``.
    """
    if weights is not None:
        exported = _exported_architecture(weights)
        return (exported, weights, None) if exported else ("dino_vits8", Path(weights), None)
    found = _local_weights(BACKBONES["dino_vits8"])
    if found is not None:
        return "dino_vits8", found, None
    if BUNDLED_WEIGHTS.is_file():
        return "hp-tiny", None, ("hpkit: no DINO ViT-S/8 weights on this machine; using the bundled 'hp-tiny' "
                                 "backbone (a tiny ViT that hpkit pretrained self-supervised on its synthetic scenes "
                                 "only; data/README.md). See README 'Backbones'.")
    return "random_tiny", None, ("hpkit: no DINO ViT-S/8 weights and no bundled 'hp-tiny' file on this machine; "
                                 "using the randomly initialised 'random_tiny' backbone (features are meaningless). "
                                 "See README 'Backbones'.")


def load_backbone(name: str = "auto", *, weights: str | Path | None = None,
                  device: str | torch.device = "cpu") -> FrozenViT:
    """Build a frozen ViT backbone.

    Args:
        name: a key of ``BACKBONES`` or ``"auto"`` (DINO ViT-S/8 when its weights are on this
            machine, otherwise the bundled ``hp-tiny``, saying so in one line; ``random_tiny`` only
            when the bundled file is missing too).
        weights: optional path to a checkpoint (official DINO ``.pth``, timm ``.pth`` or
            ``.safetensors``); overrides every other source.
        device: where to put the model.

    Returns:
        a :class:`FrozenViT` in eval mode with ``requires_grad=False``.

    Raises:
        BackboneWeightsError: pretrained weights were requested but are neither local nor downloadable.
        ValueError: unknown name.
    """
    if name == "auto":
        name, weights, notice = auto_choice(weights)
        if notice:
            _notice(notice)
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)} or 'auto'")
    spec = BACKBONES[name]
    if name == "hp-tiny" and weights is None:
        if not BUNDLED_WEIGHTS.is_file():
            raise BackboneWeightsError(
                f"the bundled hp-tiny weights {BUNDLED_WEIGHTS} are missing (hpkit installed without its data/ "
                "folder?); reinstall from a clone with `pip install -e .`, or recreate them with the command in "
                "data/README.md")
        weights = BUNDLED_WEIGHTS
    source = weights_source(name, weights)
    if source is not None:
        vit = _build_vit(spec)
        _load_into(vit, source, name)
    elif not spec.pretrained:
        with torch.random.fork_rng(devices=[]):  # the same random backbone in every run and process
            torch.manual_seed(0)
            vit = _build_vit(spec)
    else:
        advice = (f"Fetch {spec.url} on a machine with internet and either save it as "
                  f"{weights_dir() / (spec.dino_file + '.pth')} or pass weights=PATH (the timm hub copy "
                  f"'{spec.hub_id}' works too).")
        if not _hub_reachable():
            raise BackboneWeightsError(f"no weights for {name!r} on this machine and the model hub cannot be "
                                       f"reached (offline?).\n{advice}")
        try:
            vit = _build_vit(spec, pretrained=True)
        except Exception as err:  # noqa: BLE001 - any hub failure means "not available here"
            raise BackboneWeightsError(f"no weights for {name!r} on this machine and the download failed "
                                       f"({type(err).__name__}: {str(err)[:200]}).\n{advice}") from err
    return FrozenViT(vit, name, spec.patch_size, weights_path=source).to(device)
