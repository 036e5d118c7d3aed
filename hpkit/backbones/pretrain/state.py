"""What a pretraining run holds and updates (:class:`RunState`): the student, its EMA teacher, the
frozen starting backbone of the keep term, the optimizer, the teacher's centers, the step counters;
how it is built from the configuration (:func:`new_state`), saved (:func:`save_checkpoint`) and
loaded back to resume (:func:`resume_state`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from hpkit._util import atomic_write, sequence_generator
from hpkit.backbones.pretrain.config import _RUN_ONLY, PretrainConfig, Terms, _config_dict
from hpkit.backbones.pretrain.export import load_init_weights, read_backbone_metadata
from hpkit.backbones.pretrain.model import DINOHead, DINONet, build_vit, expander
from hpkit.backbones.pretrain.regions import region_masks

__all__ = ["RunState", "new_state", "save_checkpoint", "resume_state"]


@dataclass
class RunState:
    """Everything a run builds once and updates every step; a checkpoint saves it."""

    terms: Terms
    device: torch.device
    student: DINONet
    teacher: DINONet  # the EMA of the student (no gradients)
    init: DINONet | None  # the frozen starting backbone whose cosine structure the keep term holds
    optimizer: torch.optim.Optimizer
    last_layer: list[nn.Parameter]  # the prototypes, held fixed during cfg.freeze_last_layer epochs
    center: Tensor  # (1, out_dim) running mean of the teacher's logits
    patch_center: Tensor  # (1, dense_out_dim) the same for the dense DINO term's patch logits
    masks: Tensor | None  # (N, H/p, W/p) pseudo-regions of every image (objective "regions")
    init_sha256: str | None  # of cfg.init_weights
    init_meta: dict | None  # cfg.init_weights's own metadata
    step: int = 0
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    updating: bool = False  # parameters half-updated: an interrupt then keeps the previous checkpoint


def _heads(cfg: PretrainConfig, terms: Terms) -> tuple[DINOHead, nn.Module | None]:
    """The DINO head and the dense term's patch head (VICReg's expander, the region projector or a
    second DINO head; None without a dense term)."""
    head = DINOHead(cfg.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.norm_last_layer)
    if terms.dense == "vicreg":
        patch_head = expander(cfg.embed_dim, cfg.expander_dim)
    elif terms.dense == "regions":
        patch_head = expander(cfg.embed_dim, cfg.hidden_dim, cfg.bottleneck_dim)
    elif terms.dense == "dino":
        patch_head = DINOHead(cfg.embed_dim, cfg.dense_out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                              cfg.norm_last_layer)
    else:
        patch_head = None
    return head, patch_head


def _optimizer(student: nn.Module) -> torch.optim.AdamW:
    """AdamW with DINO's parameter groups: no weight decay on biases and norm parameters (1-d tensors).
    The loop sets the learning rate and the decay group's weight decay every step."""
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [{"params": [p for n, p in named if p.ndim > 1 and not n.endswith(".bias")], "decay": True},
         {"params": [p for n, p in named if p.ndim <= 1 or n.endswith(".bias")], "decay": False,
          "weight_decay": 0.0}], lr=0.0)


def new_state(cfg: PretrainConfig, data: Dataset, device: torch.device) -> RunState:
    """The networks, optimizer and centers of a new run, drawn from the global RNG (seeded by the
    caller) in a fixed order: student, teacher, keep term's reference (each built, then copied)."""
    terms = Terms.of(cfg)
    student = DINONet(build_vit(cfg), *_heads(cfg, terms)).to(device)
    init_sha256, init_meta = None, None
    if cfg.init_weights is not None:
        init_sha256 = load_init_weights(student.backbone, cfg.init_weights)
        init_meta = read_backbone_metadata(cfg.init_weights)
    teacher = DINONet(build_vit(cfg, drop_path_rate=0.0), *_heads(cfg, terms)).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False).eval()
    init = None
    if terms.keep:
        init = DINONet(build_vit(cfg, drop_path_rate=0.0), student.head).to(device)
        init.backbone.load_state_dict(student.backbone.state_dict())
        init.backbone.requires_grad_(False).eval()
    masks = None
    if terms.dense == "regions":  # from the seed's initialisation, before resuming: the same every time
        student.eval()
        masks = region_masks(student, data, cfg.region_clusters, sequence_generator(cfg.seed, 5))
        student.train()
    last_layer = list(student.head.last_layer.parameters())
    if terms.dense == "dino":
        last_layer += list(student.patch_head.last_layer.parameters())
    return RunState(terms=terms, device=device, student=student, teacher=teacher, init=init,
                    optimizer=_optimizer(student), last_layer=last_layer,
                    center=torch.zeros(1, cfg.out_dim, device=device),
                    patch_center=torch.zeros(1, cfg.dense_out_dim, device=device), masks=masks,
                    init_sha256=init_sha256, init_meta=init_meta)


def save_checkpoint(state: RunState, cfg: PretrainConfig, path: Path, steps_per_epoch: int) -> None:
    """Write ``path`` (the checkpoint) and ``history.json`` beside it, each atomically."""
    saved = {"student": state.student.state_dict(), "teacher": state.teacher.state_dict(),
             "optimizer": state.optimizer.state_dict(), "center": state.center, "patch_center": state.patch_center,
             "step": state.step, "history": state.history, "seconds": state.seconds,
             "steps_per_epoch": steps_per_epoch, "rng": torch.get_rng_state(), "config": _config_dict(cfg),
             "init_weights_sha256": state.init_sha256, "init_weights_metadata": state.init_meta}
    if state.init is not None:
        saved["init_backbone"] = state.init.backbone.state_dict()
    atomic_write(path, lambda tmp: torch.save(saved, tmp))
    atomic_write(path.parent / "history.json", lambda tmp: tmp.write_text(json.dumps(state.history)))


def resume_state(state: RunState, cfg: PretrainConfig, path: Path) -> None:
    """Load the checkpoint ``path`` into ``state`` and the global RNG.

    Raises:
        FileNotFoundError: no checkpoint.
        ValueError: it was written with other settings (except those in ``_RUN_ONLY``) or from an
            ``init_weights`` file whose content has changed since.
    """
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist")
    saved = torch.load(path, map_location=state.device, weights_only=True)
    # A setting the checkpoint does not record (added to hpkit later) had its default then.
    before = _config_dict(PretrainConfig()) | saved["config"]
    changed = {k: (v, before.get(k)) for k, v in _config_dict(cfg).items()
               if k not in _RUN_ONLY and before.get(k) != v}
    if changed:
        raise ValueError("cannot resume with a different configuration; changed (now, before): "
                         + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in changed.items()))
    if saved.get("init_weights_sha256") != state.init_sha256:
        raise ValueError(f"cannot resume: the content of init_weights={cfg.init_weights} has changed since "
                         "the run started (its sha256 differs); put the original file back or start a "
                         "new run in another folder")
    state.student.load_state_dict(saved["student"])
    state.teacher.load_state_dict(saved["teacher"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.center = saved["center"].to(state.device)
    state.patch_center = saved.get("patch_center", state.patch_center).to(state.device)
    if state.init is not None:
        state.init.backbone.load_state_dict(saved["init_backbone"])
    state.step, state.history, state.seconds = saved["step"], saved["history"], saved["seconds"]
    torch.set_rng_state(saved["rng"])
