"""DINO's per-step schedules (learning rate, weight decay, teacher momentum and temperature) and the
teacher's running averages (EMA of the weights, center of the logits)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hpkit.backbones.pretrain.config import PretrainConfig

__all__ = ["cosine_schedule", "teacher_temperature", "update_center", "ema_update"]


@torch.no_grad()
def update_center(center: Tensor, teacher_out: Tensor, momentum: float) -> Tensor:
    """New center (1, K): ``momentum * center + (1 - momentum) * mean of teacher_out (N, K)``."""
    return center * momentum + teacher_out.mean(dim=0, keepdim=True) * (1 - momentum)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place, for every parameter: ``teacher = momentum * teacher + (1 - momentum) * student``."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)


def cosine_schedule(step: int, total: int, base: float, final: float, warmup: int = 0,
                    start: float = 0.0) -> float:
    """DINO's scheduler at ``step``: linear ``start -> base`` over ``warmup`` steps, then cosine to ``final``."""
    if step < warmup:
        return start + (base - start) * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t))


def teacher_temperature(step: int, steps_per_epoch: int, cfg: PretrainConfig) -> float:
    """Teacher temperature: linear warm-up over ``warmup_teacher_temp_epochs``, then constant."""
    warm = cfg.warmup_teacher_temp_epochs * steps_per_epoch
    if step >= warm:
        return cfg.teacher_temp
    return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * step / warm
