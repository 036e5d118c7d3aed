"""One HP training step, top to bottom: :func:`hp_step`.

What trains is :class:`HPHeads` (S, Z and the two probes); S' (the EMA head), the reference pools
and the optimisers are carried between steps in :class:`TrainState`. The loop around the step
(data, resume, checkpoints, validation, DDP, feature cache) is :func:`hpkit.pipeline.train.train`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2

from hpkit._util import generator
from hpkit.backbones.vit import FrozenViT
from hpkit.method.heads import MomentumHead, ProjectionHead, SegmentationHead, to_rows
from hpkit.method.local_positives import local_weights, mix_neighbours
from hpkit.method.objective import consistency_regularizer, hp_objective, lambda_schedule, self_contrastive_loss
from hpkit.method.pools import ReferencePools
from hpkit.pipeline.config import Config
from hpkit.pipeline.probes import ClusterProbe, LinearProbe

__all__ = ["hp_step", "HPHeads", "TrainState", "StepContext", "clean_view", "photometric", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class HPHeads(nn.Module):
    """Everything that trains: S, Z and the two probes, with one forward per step (what DDP wraps).

    ``forward(f, f_aug, mix_weights, labels)`` returns ``s`` (B, D, h, w), ``z`` (B*P, D'),
    ``z_aug`` (or None), ``z_mix`` (or None) and ``probe_loss`` (the probes see ``s.detach()`` only).
    """

    def __init__(self, in_dim: int, dim: int, n_classes: int, dropout: float = 0.0, n_clusters: int | None = None):
        super().__init__()
        self.head = SegmentationHead(in_dim, dim, dropout)
        self.proj = ProjectionHead(dim)
        self.cluster = ClusterProbe(dim, n_clusters or n_classes)
        self.linear = LinearProbe(dim, n_classes)

    def forward(self, f: Tensor, f_aug: Tensor | None, mix_weights: Tensor | None, labels: Tensor) -> dict:
        b = f.shape[0]
        s_all = self.head(f if f_aug is None else torch.cat([f, f_aug]))  # S on both views in one pass
        s = s_all[:b]
        views = [to_rows(s_all)] + ([to_rows(mix_neighbours(s, mix_weights))] if mix_weights is not None else [])
        z_all = self.proj(torch.cat(views))  # Z on s, s_aug and s_mix in one pass
        n = s.shape[0] * s.shape[2] * s.shape[3]
        probe_loss = self.cluster.loss(s)
        if bool(((labels >= 0) & (labels < self.linear.n_classes)).any()):  # unlabelled folders: no linear probe
            probe_loss = probe_loss + self.linear.loss(s, labels)
        else:
            probe_loss = probe_loss + 0.0 * self.linear.conv.weight.sum()  # keeps DDP's gradient buckets complete
        return {"s": s, "z": z_all[:n], "z_aug": z_all[n:2 * n] if f_aug is not None else None,
                "z_mix": z_all[-n:] if mix_weights is not None else None, "probe_loss": probe_loss}


@dataclass
class TrainState:
    """What a step changes and a checkpoint saves (besides the RNG state)."""

    model: HPHeads
    ema: MomentumHead  # S'
    optimizers: dict[str, torch.optim.Optimizer]  # head (AdamW), proj, cluster, linear (Adam)
    scaler: torch.amp.GradScaler  # active only with fp16
    pools: ReferencePools  # Q^ag, Q^sp
    step: int = 0
    history: list[dict] = field(default_factory=list)  # one record per step
    validation: list[dict] = field(default_factory=list)  # one record per validation
    refitted: bool = False  # the cluster probe was refitted on the final head
    updating: bool = False  # parameters are half-updated: an interrupt now keeps the previous checkpoint


@dataclass
class StepContext:
    """What a step reads but never changes."""

    cfg: Config
    backbone: FrozenViT
    net: nn.Module  # the HPHeads, or their DDP wrapper
    amp: contextlib.AbstractContextManager  # autocast (or a null context)
    planned: int  # the lambda schedule's length in steps
    grid: tuple[int, int]  # (h, w) patches per image
    world: int = 1  # DDP processes

    @property
    def need_aug(self) -> bool:
        """The photometric view is needed: the regulariser, or Table 4 (g)'s plain contrastive loss."""
        loss = self.cfg.loss
        return loss.plain_contrastive or (loss.regularizer and loss.alpha > 0)

    @property
    def need_weights(self) -> bool:
        """LHP neighbour weights are needed (from the backbone's attention)."""
        return self.cfg.loss.lhp and not self.cfg.loss.plain_contrastive


def clean_view(ctx: StepContext, images: Tensor) -> dict[str, Tensor]:
    """The frozen backbone on the clean images: ``feats`` f (B, C, h, w) and, with LHP, ``weights``
    (B, P, P), the neighbour weights from the last block's attention (Eq. 8-9)."""
    with ctx.amp:
        feats, attn = ctx.backbone(images, attention=ctx.need_weights)
    out = {"feats": feats.float()}
    if ctx.need_weights:
        out["weights"] = local_weights(attn, ctx.grid, sigma=ctx.cfg.loss.sigma, style=ctx.cfg.loss.style)
    return out


def hp_step(ctx: StepContext, state: TrainState, images: Tensor, labels: Tensor, clean: dict[str, Tensor],
            gen: torch.Generator, draws: torch.Generator) -> dict:
    """One HP training step (Eq. 11); advances ``state`` and returns the step's record.

    Args:
        images: (B, 3, H, W) in [0, 1]; labels: (B, H, W), used only by the linear probe.
        clean: :func:`clean_view` of ``images`` (or the same read from the feature cache).
        gen: the step's CPU generator (augmentation); draws: the same on the features' device (negatives).
    """
    loss_cfg, model = ctx.cfg.loss, state.model
    f, weights = clean["feats"], clean.get("weights")
    with ctx.amp:
        # 1. a photometric view for the regulariser: f_aug = backbone(augment(images))
        f_aug = None
        if ctx.need_aug:
            official = loss_cfg.style == "official"
            aug = photometric(images, gen, official=official, mean=ctx.backbone.mean.flatten(),
                              std=ctx.backbone.std.flatten())
            f_aug = ctx.backbone(aug, attention=False, normalized=official).feats
        # 2. heads: s = S(f), z = Z(s), z_aug = Z(S(f_aug)), z_mix = Z(mix(s, weights)) (Eq. 10), s' = S'(f)
        mix = weights if loss_cfg.propagation == "gradient" else None
        outs = ctx.net(f, f_aug, mix, labels)
        s_ema = state.ema(f)
    z, probe_loss = outs["z"].float(), outs["probe_loss"].float()
    # 3. the objective: contrast each patch with its global hidden positives (Eq. 3-7), lambda-mixed
    #    between the task-agnostic and task-specific sets (Eq. 7, 11), plus the regulariser
    lam = lambda_schedule(state.step, ctx.planned, loss_cfg.warmup)
    if loss_cfg.plain_contrastive:  # Table 4 (g): Eq. 1 between the two views instead of HP
        loss = self_contrastive_loss(z, outs["z_aug"].float(), tau=loss_cfg.tau)
    else:
        z_mix = outs["z_mix"].float() if outs["z_mix"] is not None else None
        neighbours = weights if loss_cfg.lhp and loss_cfg.propagation == "loss" else None
        loss = hp_objective(z, F.normalize(to_rows(f), dim=1), F.normalize(to_rows(s_ema.float()), dim=1),
                            state.pools.agnostic, state.pools.specific,
                            patches_per_image=ctx.grid[0] * ctx.grid[1], lam=lam, tau=loss_cfg.tau,
                            rho=loss_cfg.rho, z_mix=z_mix, style=loss_cfg.style, symmetric=loss_cfg.symmetric,
                            task_specific=loss_cfg.task_specific, neighbour_weights=neighbours, generator=draws,
                            matmul_dtype=getattr(torch, loss_cfg.matmul_dtype) if loss_cfg.matmul_dtype else None)
        if ctx.need_aug:
            loss = loss + loss_cfg.alpha * consistency_regularizer(z, outs["z_aug"].float())
    value = _mean_over_processes(loss.detach(), ctx.world)
    if not math.isfinite(value):
        raise TrainingDiverged(f"loss is {value} at step {state.step}")
    # 4. update S and Z (and the probes, on s.detach()), then S' by EMA, and Q^sp every renew_interval
    for opt in state.optimizers.values():
        opt.zero_grad(set_to_none=True)
    state.scaler.scale(loss + probe_loss).backward()
    state.updating = True
    state.scaler.unscale_(state.optimizers["head"])
    torch.nn.utils.clip_grad_norm_(model.head.parameters(), ctx.cfg.optim.grad_clip)
    for opt in state.optimizers.values():
        state.scaler.step(opt)
    state.scaler.update()
    state.ema.update(model.head)
    state.step += 1
    if state.step % loss_cfg.renew_interval == 0:
        state.pools.refresh_specific(state.ema, generator=generator(ctx.cfg.train.seed, 2_000_000 + state.step))
    return {"step": state.step, "loss": value, "lambda": lam, "probe_loss": probe_loss.item()}


def _mean_over_processes(value: Tensor, world: int) -> float:
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return value.item()


def photometric(images: Tensor, generator: torch.Generator, *, official: bool = False,
                mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
    """The regulariser's view: per-image colour jitter, random grayscale (p 0.2) and blur (p 0.5).

    Args:
        images: (B, 3, H, W) in [0, 1].
        official: jitter the normalised image as the official code does (torchvision clamps it to
            [0, 1], docs/official-code-differences.md#d12); needs ``mean``/``std`` (3,). The result is then a *normalised* input.

    Returns:
        (B, 3, H, W): in [0, 1], or normalised-and-clamped with ``official=True``.
    """
    if official:
        images = (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    jitter = v2.ColorJitter(0.3, 0.3, 0.3, 0.1)
    blur = v2.GaussianBlur(5, (0.1, 2.0))
    out = []
    state = torch.get_rng_state()
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))  # v2 draws from torch RNG
    try:
        for img in images:  # on the images' device: no round trip through the CPU on a GPU
            img = jitter(img)
            if official:  # hue on out-of-range values divides 0 by 0 where a pixel's max channel is exactly 0
                img = torch.nan_to_num(img, nan=0.0)
            if torch.rand(()) < 0.2:
                img = v2.functional.rgb_to_grayscale(img, num_output_channels=3)
            if torch.rand(()) < 0.5:
                img = blur(img)
            out.append(img if official else img.clamp(0, 1))
    finally:
        torch.set_rng_state(state)
    return torch.stack(out)
