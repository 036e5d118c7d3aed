"""One training step's forward pass and loss, one function per objective.

:func:`forward` runs the networks each term needs on the crops (the teacher only for the DINO
terms, the student on the two global crops only when dense VICReg trains alone); :func:`step_loss`
adds the terms: :func:`dino_term` (image-level DINO), :func:`dense_term` (one branch per
``dense_objective``: :func:`dense_dino_term`, :func:`vicreg_term`, :func:`regions_term`) and
:func:`keep_term` (structure keeping), each times its weight."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hpkit._util import sequence_generator
from hpkit.backbones.pretrain.config import PretrainConfig
from hpkit.backbones.pretrain.losses import (
    dense_dino_loss,
    dense_vicreg_loss,
    dino_loss,
    region_contrast_loss,
    similarity_keep_loss,
)
from hpkit.backbones.pretrain.model import _apply_rows
from hpkit.backbones.pretrain.regions import region_ids
from hpkit.backbones.pretrain.state import RunState

__all__ = ["Outputs", "forward", "step_loss", "dino_term", "dense_term", "dense_dino_term", "vicreg_term",
           "regions_term", "keep_term"]


@dataclass
class Outputs:
    """The networks' outputs of one step (None where no term needs them)."""

    s_patches: list[Tensor]  # per crop the student's patch tokens (B, g, g, C)
    s_out: Tensor | None = None  # student DINO logits of all crops (n_crops * B, K), crop-major
    t_out: Tensor | None = None  # teacher DINO logits of the 2 global crops
    t_patches: list[Tensor] | None = None  # teacher patch tokens of the 2 global crops
    s_dense: list[Tensor] | None = None  # student patch head outputs (vicreg: global crops only; dense DINO: all)
    t_dense: list[Tensor] | None = None  # teacher patch head outputs (dense DINO)
    i_patches: list[Tensor] | None = None  # the keep term's reference: patch tokens of the 2 global crops


def forward(state: RunState, crops: list[Tensor]) -> Outputs:
    """Run the teacher on the 2 global crops, the student on all crops (only the global ones when
    dense VICReg trains alone) and the keep term's reference on the global crops, as the terms need."""
    terms, student, teacher = state.terms, state.student, state.teacher
    t_out = t_patches = None
    if terms.teacher:
        with torch.no_grad():
            t_cls, t_patches = teacher.encode(crops[:2])
            t_out = teacher.head(t_cls).float() if terms.dino else None
    only_global = terms.dense == "vicreg" and not terms.dino
    s_cls, s_patches = student.encode(crops[:2] if only_global else crops)
    out = Outputs(s_patches=s_patches, s_out=student.head(s_cls).float() if terms.dino else None, t_out=t_out,
                  t_patches=t_patches)
    if terms.dense == "vicreg":
        out.s_dense = [_apply_rows(student.patch_head, p).float() for p in s_patches[:2]]
    elif terms.dense == "dino":
        with torch.no_grad():
            out.t_dense = [teacher.patch_head(p).float() for p in t_patches]
        out.s_dense = [student.patch_head(p).float() for p in s_patches]
    if terms.keep:
        with torch.no_grad():
            _, out.i_patches = state.init.encode(crops[:2])
    return out


def dino_term(cfg: PretrainConfig, state: RunState, out: Outputs, teacher_temp: float) -> Tensor:
    """Image-level DINO: the student's class tokens of every crop predict the teacher's of the other global crops."""
    return dino_loss(out.s_out, out.t_out, state.center, cfg.student_temp, teacher_temp)


def dense_dino_term(cfg: PretrainConfig, state: RunState, out: Outputs, boxes: Tensor, teacher_temp: float
                    ) -> Tensor:
    """Patch-level DINO: each student patch predicts the teacher's patch at the same image point."""
    return dense_dino_loss(out.s_dense, out.t_dense, boxes.to(state.device), state.patch_center, cfg.student_temp,
                           teacher_temp)


def vicreg_term(cfg: PretrainConfig, state: RunState, out: Outputs, boxes: Tensor, step: int) -> Tensor:
    """Within-image dense VICReg between the two global crops (pairs drawn from a generator keyed on the step)."""
    return dense_vicreg_loss(out.s_dense, boxes[:2].to(state.device), cfg.dense_radius, cfg.vicreg_weights,
                             sequence_generator(cfg.seed, 3, step))


def regions_term(cfg: PretrainConfig, state: RunState, out: Outputs, boxes: Tensor, indices: Tensor) -> Tensor:
    """Region contrast: the batch images' pseudo-regions, read under each global crop's patches and
    under each local crop's centre, matched between crops."""
    device, patches = state.device, out.s_patches
    image_masks = state.masks[indices].to(device)
    global_ids = [region_ids(boxes[v].to(device), image_masks, patches[v].shape[1]) for v in (0, 1)]
    if len(boxes) > 2:
        local_ids = torch.stack([region_ids(b.to(device), image_masks, 1)[:, 0, 0] for b in boxes[2:]])
    else:
        local_ids = torch.zeros(0, len(indices), dtype=torch.long)
    return region_contrast_loss([p.float() for p in patches[:2]], global_ids, [p.float() for p in patches[2:]],
                                local_ids, cfg.region_clusters, state.student.patch_head, cfg.region_temperature)


def dense_term(cfg: PretrainConfig, state: RunState, out: Outputs, boxes: Tensor, indices: Tensor,
               teacher_temp: float, step: int) -> Tensor:
    """The dense term of ``cfg.dense_objective``."""
    if state.terms.dense == "vicreg":
        return vicreg_term(cfg, state, out, boxes, step)
    if state.terms.dense == "regions":
        return regions_term(cfg, state, out, boxes, indices)
    return dense_dino_term(cfg, state, out, boxes, teacher_temp)


def keep_term(cfg: PretrainConfig, out: Outputs, step: int) -> Tensor:
    """How far the global crops' patch-token cosine structure moved from the reference's."""
    return similarity_keep_loss([p.float() for p in out.s_patches[:2]], [p.float() for p in out.i_patches],
                                cfg.keep_samples, sequence_generator(cfg.seed, 4, step))


def step_loss(cfg: PretrainConfig, state: RunState, out: Outputs, boxes: Tensor, indices: Tensor,
              teacher_temp: float, step: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The step's loss ``dino_weight * DINO + dense_weight * dense + keep_weight * keep`` (terms
    switched off are left out), and the dense and keep terms alone (None when off)."""
    terms = state.terms
    loss = torch.zeros((), device=state.device)
    if terms.dino:
        loss = loss + cfg.dino_weight * dino_term(cfg, state, out, teacher_temp)
    dense_value = keep_value = None
    if terms.dense:
        dense_value = dense_term(cfg, state, out, boxes, indices, teacher_temp, step)
        loss = loss + cfg.dense_weight * dense_value
    if terms.keep:
        keep_value = keep_term(cfg, out, step)
        loss = loss + cfg.keep_weight * keep_value
    return loss, dense_value, keep_value
