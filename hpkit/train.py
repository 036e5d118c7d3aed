"""One readable HP training loop (single process): ``train(cfg, out_dir)``.

Per iteration (section 1.0 of the reference notes, paper or official style from ``cfg.loss.style``):

1. frozen backbone on the clean batch -> f, attention logits; on a photometrically augmented copy
   (jitter, grayscale, blur on images in [0, 1], before normalisation; not the official clamp bug) -> f_aug;
2. s = S(f), z = Z(s), z_aug = Z(S(f_aug)), s' = S'(f), z_mix = Z(local_mix(s, attention));
3. loss = hp_objective(...) + alpha * consistency_regularizer(z, z_aug) (or Eq. 1 for Table 4 (g));
4. AdamW on S, Adam on Z, gradient clipping on S, EMA update of S', Q^sp refresh every
   ``renew_interval`` iterations (from the cached bank, no backbone pass);
5. the cluster and linear probes train on ``s.detach()``: they measure, they never shape the head.

Every random draw (batch order, augmentation, negatives) comes from generators seeded by
``(seed, epoch)`` or ``(seed, step)``, so a run resumed from a checkpoint continues exactly like an
uninterrupted one. Checkpoints are written atomically (temporary file, then rename); a non-finite
loss stops training with a message naming the step and leaves the last good checkpoint in place.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from .backbone import load_backbone
from .config import Config, from_dict, to_dict
from .data import ImageFolder, SyntheticScenes
from .heads import MomentumHead, ProjectionHead, SegmentationHead, to_rows
from .local_positives import local_weights, mix_neighbours
from .objective import consistency_regularizer, hp_objective, lambda_schedule, self_contrastive_loss
from .pools import ReferencePools, collect_patch_bank
from .probes import ClusterProbe, LinearProbe

__all__ = ["train", "build_dataset", "photometric", "save_checkpoint", "load_run", "TrainedRun", "TrainingDiverged"]

CHECKPOINT = "checkpoint.pt"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def build_dataset(cfg: Config, split: str = "train") -> Dataset:
    """The dataset named by ``cfg.data.dataset`` (``synthetic`` or ``folder``)."""
    d = cfg.data
    if d.dataset == "synthetic":
        count = d.num_train if split == "train" else d.num_val
        return SyntheticScenes(split, num_images=count or (1000 if split == "train" else 200),
                               image_size=d.image_size if split == "train" else d.val_size, seed=cfg.train.seed)
    if d.dataset == "folder":
        if d.root is None:
            raise ValueError("data.dataset=folder needs data.root=/path/to/images")
        return ImageFolder(d.root, image_size=d.image_size if split == "train" else d.val_size)
    raise ValueError(f"data.dataset={d.dataset!r} has no loader yet; use 'synthetic' or 'folder'")


def photometric(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The regulariser's view: per-image colour jitter, random grayscale and blur on [0, 1] images."""
    jitter = v2.ColorJitter(0.3, 0.3, 0.3, 0.1)
    blur = v2.GaussianBlur(5, (0.1, 2.0))
    out = []
    state = torch.get_rng_state()
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))  # v2 draws from torch RNG
    try:
        for img in images:
            img = jitter(img)
            if torch.rand(()) < 0.2:
                img = v2.functional.rgb_to_grayscale(img, num_output_channels=3)
            if torch.rand(()) < 0.5:
                img = blur(img)
            out.append(img.clamp(0, 1))
    finally:
        torch.set_rng_state(state)
    return torch.stack(out)


def save_checkpoint(state: dict, path: Path) -> None:
    """Write atomically: a crash mid-write never replaces the previous checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@dataclass
class TrainedRun:
    """What :func:`load_run` restores from a run folder (modules in eval mode, on ``device``)."""

    cfg: Config
    backbone: torch.nn.Module
    head: SegmentationHead
    cluster: ClusterProbe
    linear: LinearProbe


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> TrainedRun:
    """Rebuild the backbone, head and probes of a run written by :func:`train`."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train first (`hpkit train` or hpkit.train.train)")
    state = torch.load(path, map_location=device, weights_only=False)
    cfg = from_dict(state["config"])
    backbone = load_backbone(cfg.model.backbone, weights=cfg.model.weights, device=device)
    head = SegmentationHead(backbone.embed_dim, cfg.model.dim, cfg.model.dropout).to(device).eval()
    head.load_state_dict(state["head"])
    cluster = ClusterProbe(cfg.model.dim, state["cluster"]["centroids"].shape[0]).to(device)
    cluster.load_state_dict(state["cluster"])
    linear = LinearProbe(cfg.model.dim, state["linear"]["conv.weight"].shape[0]).to(device)
    linear.load_state_dict(state["linear"])
    return TrainedRun(cfg, backbone, head, cluster, linear)


def _generator(*seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(seed) % (2**62))


def train(cfg: Config, out_dir: str | Path, *, resume: bool = False, max_steps: int | None = None,
          progress: bool = True) -> dict:
    """Train HP as configured and write ``checkpoint.pt``, ``config.json`` and ``history.json``.

    Args:
        cfg: the configuration (see :mod:`hpkit.config`).
        out_dir: output folder.
        resume: continue from ``out_dir/checkpoint.pt``.
        max_steps: stop after this many iterations in total (for quick runs and tests).
        progress: show a tqdm progress bar.

    Returns:
        dict with ``history`` (one entry per iteration: step, loss, lambda) and ``steps``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if cfg.train.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.train.device == "auto" else cfg.train.device))
    torch.manual_seed(cfg.train.seed)
    data = build_dataset(cfg, "train")
    loss_cfg = cfg.loss
    if loss_cfg.pool_size > len(data):
        raise ValueError(f"loss.pool_size={loss_cfg.pool_size} is larger than the {len(data)} training images: "
                         "lower loss.pool_size or add images")
    backbone = load_backbone(cfg.model.backbone, weights=cfg.model.weights, device=device)
    c = backbone.embed_dim
    head = SegmentationHead(c, cfg.model.dim, cfg.model.dropout).to(device)
    proj = ProjectionHead(cfg.model.dim).to(device)
    ema = MomentumHead(head, cfg.model.ema_momentum)
    n_classes = len(getattr(data, "class_names", ())) or 1
    cluster, linear = ClusterProbe(cfg.model.dim, n_classes).to(device), LinearProbe(cfg.model.dim, n_classes).to(device)
    o = cfg.optim
    optimizers = {
        "head": torch.optim.AdamW(head.parameters(), lr=o.lr, weight_decay=o.weight_decay),
        "proj": torch.optim.Adam(proj.parameters(), lr=o.projection_lr),
        "cluster": torch.optim.Adam(cluster.parameters(), lr=o.cluster_lr),
        "linear": torch.optim.Adam(linear.parameters(), lr=o.linear_lr),
    }
    steps_per_epoch = len(data) // cfg.data.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data)} training images are fewer than one batch of {cfg.data.batch_size}")
    planned = steps_per_epoch * cfg.train.epochs  # the lambda schedule always spans the whole run
    total = planned if max_steps is None else min(planned, max_steps)

    ckpt_path = out / CHECKPOINT
    step, history = 0, []
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"nothing to resume: {ckpt_path} does not exist")
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        for name, module in (("head", head), ("proj", proj), ("ema", ema), ("cluster", cluster), ("linear", linear)):
            module.load_state_dict(state[name])
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optim"][name])
        pools = ReferencePools.from_state_dict(state["pools"])
        step, history = state["step"], state["history"]
    else:
        loader = DataLoader(data, batch_size=cfg.data.batch_size, shuffle=True,
                            generator=_generator(cfg.train.seed, -1))
        bank = collect_patch_bank(backbone, loader, loss_cfg.pool_size, generator=_generator(cfg.train.seed, -2),
                                  device=device)
        pools = ReferencePools(bank, loss_cfg.pool_size, generator=_generator(cfg.train.seed, -3))
        pools.refresh_specific(ema, generator=_generator(cfg.train.seed, -4))
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    def checkpoint() -> None:
        save_checkpoint({"head": head.state_dict(), "proj": proj.state_dict(), "ema": ema.state_dict(),
                         "cluster": cluster.state_dict(), "linear": linear.state_dict(),
                         "optim": {k: v.state_dict() for k, v in optimizers.items()},
                         "pools": pools.state_dict(), "step": step, "history": history,
                         "config": to_dict(cfg)}, ckpt_path)

    bar = tqdm(total=total, initial=step, disable=not progress, desc="HP training")
    mm_dtype = getattr(torch, loss_cfg.matmul_dtype) if loss_cfg.matmul_dtype else None
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        loader = DataLoader(data, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True,
                            generator=_generator(cfg.train.seed, epoch), num_workers=cfg.data.num_workers)
        for i, (images, labels) in enumerate(loader):
            if i < skip:
                continue
            if step >= total:
                break
            gen = _generator(cfg.train.seed, 1_000_000 + step)
            images, labels = images.to(device), labels.to(device)
            feats, attn = backbone(images, attention=loss_cfg.lhp)
            b, _, h, w = feats.shape
            s = head(feats)
            z = proj(to_rows(s))
            z_aug = proj(to_rows(head(backbone(photometric(images, gen), attention=False).feats)))
            lam = lambda_schedule(step, planned, loss_cfg.warmup)
            if loss_cfg.plain_contrastive:
                loss = self_contrastive_loss(z, z_aug, tau=loss_cfg.tau)
            else:
                z_mix = nb = None
                if loss_cfg.lhp:
                    weights = local_weights(attn, (h, w), sigma=loss_cfg.sigma, style=loss_cfg.style)
                    if loss_cfg.propagation == "loss":
                        nb = weights
                    else:
                        z_mix = proj(to_rows(mix_neighbours(s, weights)))
                loss = hp_objective(z, F.normalize(to_rows(feats), dim=1), F.normalize(to_rows(ema(feats)), dim=1),
                                    pools.agnostic.to(device), pools.specific.to(device), patches_per_image=h * w,
                                    lam=lam, tau=loss_cfg.tau, rho=loss_cfg.rho, z_mix=z_mix, style=loss_cfg.style,
                                    symmetric=loss_cfg.symmetric, task_specific=loss_cfg.task_specific,
                                    neighbour_weights=nb, generator=gen, matmul_dtype=mm_dtype)
                if loss_cfg.regularizer and loss_cfg.alpha:
                    loss = loss + loss_cfg.alpha * consistency_regularizer(z, z_aug)
            if not math.isfinite(loss.item()):
                raise TrainingDiverged(f"loss is {loss.item()} at step {step}; the last good checkpoint "
                                       f"({ckpt_path if ckpt_path.exists() else 'none yet'}) is kept. Try a lower "
                                       "optim.lr or loss.tau closer to the preset")
            probe_loss = cluster.loss(s) + linear.loss(s, labels)
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            (loss + probe_loss).backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), o.grad_clip)
            for opt in optimizers.values():
                opt.step()
            ema.update(head)
            step += 1
            if step % loss_cfg.renew_interval == 0:
                pools.refresh_specific(ema, generator=_generator(cfg.train.seed, 2_000_000 + step))
            history.append({"step": step, "loss": loss.item(), "lambda": lam, "probe_loss": probe_loss.item()})
            if cfg.train.val_every and step % cfg.train.val_every == 0:
                checkpoint()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lam=f"{lam:.2f}")
    bar.close()
    checkpoint()
    (out / "history.json").write_text(json.dumps(history))
    return {"history": history, "steps": step}
