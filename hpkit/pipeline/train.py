"""One readable HP training loop: ``train(cfg, out_dir)``, on one device or several (torchrun + DDP).

Per iteration (section 1.0 of the reference notes, paper or official style from ``cfg.loss.style``):

1. frozen backbone on the clean batch -> f and the LHP neighbour weights from its last-block attention
   (read from the on-disk feature cache after the first epoch with ``train.cache_features``, H4); on a
   photometrically augmented copy -> f_aug. The augmentation (colour jitter, grayscale, blur) works on
   images in [0, 1] before normalisation; ``loss.style=official`` reproduces the official code, which
   jitters the *normalised* image and so clamps it to [0, 1] (D12);
2. s = S(f), z = Z(s), z_aug = Z(S(f_aug)), s' = S'(f), z_mix = Z(mix of s by the LHP weights);
3. loss = hp_objective(...) + alpha * consistency_regularizer(z, z_aug) (or Eq. 1 for Table 4 (g));
4. AdamW on S, Adam on Z, gradient clipping on S, EMA update of S', Q^sp refresh every
   ``renew_interval`` iterations (from the cached patch bank, no backbone pass);
5. the cluster and linear probes train on ``s.detach()``: they measure, they never shape the head.

With ``train.probe_refit_epochs > 0`` (the demo preset; 0 in the paper presets) the cluster probe is
re-initialised after the last planned step and trained alone on the final head
(:func:`refit_cluster_probe`): a probe trained alongside a head that is still moving settles early in
a poor k-means optimum and, with hard assignment, stays there.

Every ``train.val_every`` iterations the probes are scored on the validation split (no CRF) and a
checkpoint is written; the history (loss, lambda per step; metrics per validation) goes to
``history.json`` for plotting (:mod:`hpkit.plots`). Unlike the official code, no checkpoint is
*selected* by validation score: the validation split is the evaluation split, so the last checkpoint
is the result.

Every random draw (batch order, augmentation, negatives, dropout) comes from seeded generators or a
saved RNG state, so a run resumed from a checkpoint continues exactly like an uninterrupted one.
Checkpoints are written atomically; a non-finite loss stops training with a message naming the step
and leaves the last good checkpoint in place; Ctrl-C saves the last completed step first.

Multi-GPU: launch with ``torchrun --nproc_per_node N -m hpkit train ...``. ``data.batch_size`` stays
the *global* batch; each rank takes an equal share of every batch, selects hidden positives within
its own share (per-rank selection: candidates are the rank's images plus the shared pools) and DDP
averages the gradients. The pools are identical on all ranks (same seed, same EMA head).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from hpkit._util import autocast, generator, resolve_device
from hpkit.backbones.vit import FrozenViT, file_sha256, load_backbone
from hpkit._util import atomic_write
from hpkit.pipeline.checkpoint import CHECKPOINT, load_checkpoint, prepare_run_folder, save_checkpoint
from hpkit.pipeline.config import Config, to_dict
from hpkit.pipeline.datasets import UNLABELLED_CLUSTERS, build_dataset
from hpkit.data.folder import scan_folder
from hpkit.pipeline.evaluate import has_labels, score
from hpkit.pipeline.feature_cache import FeatureCache
from hpkit.method.heads import MomentumHead, ProjectionHead, SegmentationHead, to_rows
from hpkit.method.local_positives import local_weights, mix_neighbours
from hpkit.method.objective import consistency_regularizer, hp_objective, lambda_schedule, self_contrastive_loss
from hpkit.method.pools import ReferencePools, collect_patch_bank
from hpkit.pipeline.probes import ClusterProbe, LinearProbe

__all__ = ["train", "photometric", "HPHeads", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def photometric(images: Tensor, generator: torch.Generator, *, official: bool = False,
                mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
    """The regulariser's view: per-image colour jitter, random grayscale (p 0.2) and blur (p 0.5).

    Args:
        images: (B, 3, H, W) in [0, 1].
        official: jitter the normalised image as the official code does (torchvision clamps it to
            [0, 1], D12); needs ``mean``/``std`` (3,). The result is then a *normalised* input.

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
        s_all = self.head(f if f_aug is None else torch.cat([f, f_aug]))
        s = s_all[:b]
        views = [to_rows(s_all)] + ([to_rows(mix_neighbours(s, mix_weights))] if mix_weights is not None else [])
        z_all = self.proj(torch.cat(views))
        n = s.shape[0] * s.shape[2] * s.shape[3]
        probe_loss = self.cluster.loss(s)
        if bool(((labels >= 0) & (labels < self.linear.n_classes)).any()):  # unlabelled folders: no linear probe
            probe_loss = probe_loss + self.linear.loss(s, labels)
        else:
            probe_loss = probe_loss + 0.0 * self.linear.conv.weight.sum()  # keeps DDP's gradient buckets complete
        return {"s": s, "z": z_all[:n], "z_aug": z_all[n:2 * n] if f_aug is not None else None,
                "z_mix": z_all[-n:] if mix_weights is not None else None, "probe_loss": probe_loss}


def refit_cluster_probe(model: HPHeads, features: Callable[[Tensor], Tensor], n_images: int, cfg: Config, *,
                        progress: bool = False) -> None:
    """Re-initialise the cluster probe and train it alone on the final head (``train.probe_refit_epochs``).

    The centroids restart from ``randn(K, D)`` drawn from ``torch.Generator().manual_seed(train.seed)``;
    each epoch e visits the ``n_images`` train images in the order ``randperm(n_images)`` of
    ``torch.Generator().manual_seed(train.seed + 1 + e)``, in batches of ``data.batch_size``; each
    batch's backbone features (``features(indices)`` -> (B, C, h, w)) go through the head in eval
    mode, and a fresh Adam (``optim.cluster_lr``) minimises :meth:`ClusterProbe.loss`.
    """
    probe, head = model.cluster, model.head
    was_training = head.training
    head.eval()
    with torch.no_grad():
        probe.centroids.copy_(torch.randn(probe.centroids.shape, generator=torch.Generator().manual_seed(
            cfg.train.seed)).to(probe.centroids))
    optimizer = torch.optim.Adam(probe.parameters(), lr=cfg.optim.cluster_lr)
    bar = tqdm(total=cfg.train.probe_refit_epochs * math.ceil(n_images / cfg.data.batch_size), disable=not progress,
               desc="cluster probe refit", leave=False)
    for epoch in range(cfg.train.probe_refit_epochs):
        order = torch.randperm(n_images, generator=torch.Generator().manual_seed(cfg.train.seed + 1 + epoch))
        for batch in order.split(cfg.data.batch_size):
            bar.update(1)
            with torch.no_grad():
                s = head(features(batch).float())
            loss = probe.loss(s)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    bar.close()
    head.train(was_training)


class _Indexed(Dataset):
    """``(index, image, label)``: the feature cache needs to know which image it is serving."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        image, label = self.data[i]
        return i, image, label


def _epoch_indices(n: int, batch: int, epoch: int, seed: int, rank: int, world: int) -> Tensor:
    """(steps, batch // world): this rank's share of every (drop-last) batch of the epoch."""
    steps = n // batch
    order = torch.randperm(n, generator=generator(seed, epoch))[: steps * batch].view(steps, batch)
    share = batch // world
    return order[:, rank * share:(rank + 1) * share]


def _check_sizes(cfg: Config, backbone: FrozenViT, n_train: int, world: int) -> None:
    d, p = cfg.data, backbone.patch_size
    for key, size in (("data.image_size", d.image_size), ("data.val_size", d.val_size)):
        if size % p:
            raise ValueError(f"{key}={size} is not a multiple of the patch size {p}: use e.g. "
                             f"{key}={max(p, size // p * p)} (images are resized and centre-cropped to it)")
    if cfg.loss.pool_size > n_train:
        raise ValueError(f"loss.pool_size={cfg.loss.pool_size} is larger than the {n_train} training images: "
                         "lower loss.pool_size or add images")
    if d.batch_size % world:
        raise ValueError(f"data.batch_size={d.batch_size} (the global batch) must be divisible by the "
                         f"{world} processes")
    if n_train < d.batch_size:
        raise ValueError(f"{n_train} training images are fewer than one batch of {d.batch_size}")


def train(cfg: Config, out_dir: str | Path, *, resume: bool = False, force: bool = False,
          max_steps: int | None = None, progress: bool = True) -> dict:
    """Train HP as configured and write ``checkpoint.pt``, ``config.json`` and ``history.json``.

    Args:
        cfg: the configuration (see :mod:`hpkit.config`).
        out_dir: output folder.
        resume: continue from ``out_dir/checkpoint.pt``.
        force: delete a run already in ``out_dir`` and start over (without ``resume`` or ``force`` a
            folder holding a run is refused: runs are never replaced silently).
        max_steps: stop after this many iterations in total (quick runs, tests); the lambda
            schedule still spans the configured epochs.
        progress: show a tqdm progress bar.

    Returns:
        dict with ``history`` (one entry per iteration: step, loss, lambda, probe_loss, seconds),
        ``validation`` (one entry per validation: step, cluster/linear accuracy and mIoU) and ``steps``.
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(cfg, Path(out_dir), resume, force, max_steps, progress and rank == 0, device, rank, world)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def prepare_data(cfg: Config, *, validate: bool = True) -> tuple[Dataset, Dataset | None, int, int, list[str]]:
    """Build and check everything a run reads, before any expensive work.

    Returns:
        ``(train data, validation data or None, number of classes (0: no labels), the cluster
        probe's K, notes)``. Validation is None when ``validate`` is False or the validation split
        has no labels; the notes are lines to show the user (generated class names, no val split,
        no labels, the default K).
    """
    layout = scan_folder(cfg.data.root) if cfg.data.dataset == "folder" and cfg.data.root else None
    data = build_dataset(cfg, "train", layout=layout)
    val_data = build_dataset(cfg, "val", layout=layout) if validate else None
    notes = list(getattr(data, "notes", []))
    n_classes = len(getattr(data, "class_names", ()))
    if not has_labels(data) or (val_data is not None and not has_labels(val_data)):
        skipped = [part for part, missing in (("validation", val_data is not None and not has_labels(val_data)),
                                              ("the linear probe", not has_labels(data))) if missing]
        notes.append(f"no labels: {' and '.join(skipped)} skipped; training saves its checkpoint as usual")
        val_data = val_data if val_data is not None and has_labels(val_data) else None
    k = cfg.model.num_clusters
    if k is None:
        k = n_classes or UNLABELLED_CLUSTERS
        if not n_classes:
            notes.append(f"no labels: the cluster probe finds {k} clusters (set model.num_clusters=K for another K)")
    elif k < 2:
        raise ValueError(f"model.num_clusters={k}: use 2 or more clusters")
    elif k < n_classes:
        raise ValueError(f"model.num_clusters={k} is below the {n_classes} classes: clusters are matched one-to-one "
                         f"to classes, so use model.num_clusters={n_classes} or more (or none)")
    return data, val_data, n_classes, k, notes


def _train(cfg: Config, out: Path, resume: bool, force: bool, max_steps: int | None, progress: bool,
           device: torch.device, rank: int, world: int) -> dict:
    main = rank == 0
    torch.manual_seed(cfg.train.seed)
    data, val_data, n_classes, n_clusters, notes = prepare_data(cfg, validate=bool(cfg.train.val_every) and main)
    if main:  # after the data checks: bad input never costs a run that --force was about to replace
        out.mkdir(parents=True, exist_ok=True)
        prepare_run_folder(out, resume=resume, force=force)
        for note in notes:
            print(f"note: {note}")
    backbone = load_backbone(cfg.model.backbone, weights=cfg.model.weights, device=device)
    _check_sizes(cfg, backbone, len(data), world)
    loss_cfg, o = cfg.loss, cfg.optim
    model = HPHeads(backbone.embed_dim, cfg.model.dim, max(n_classes, 1), cfg.model.dropout, n_clusters).to(device)
    ema = MomentumHead(model.head, cfg.model.ema_momentum).eval()
    optimizers = {
        "head": torch.optim.AdamW(model.head.parameters(), lr=o.lr, weight_decay=o.weight_decay),
        "proj": torch.optim.Adam(model.proj.parameters(), lr=o.projection_lr),
        "cluster": torch.optim.Adam(model.cluster.parameters(), lr=o.cluster_lr),
        "linear": torch.optim.Adam(model.linear.parameters(), lr=o.linear_lr),
    }
    amp, fp16 = autocast(cfg.train.amp, device, "train.amp")
    scaler = torch.amp.GradScaler(device.type, init_scale=2048, growth_interval=1000, enabled=fp16)
    steps_per_epoch = len(data) // cfg.data.batch_size
    planned = steps_per_epoch * cfg.train.epochs  # the lambda schedule always spans the whole run
    total = planned if max_steps is None else min(planned, max_steps)
    share = cfg.data.batch_size // world

    ckpt_path = out / CHECKPOINT
    step, history, validation = 0, [], []
    refitted = False  # the cluster probe has been refitted on the final head (train.probe_refit_epochs)
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"nothing to resume: {ckpt_path} does not exist")
        state = load_checkpoint(out, device)
        for name in ("head", "proj", "cluster", "linear"):
            getattr(model, name).load_state_dict(state[name])
        ema.load_state_dict(state["ema"])
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optim"][name])
        scaler.load_state_dict(state.get("scaler", scaler.state_dict()))
        torch.set_rng_state(state["rng"])
        pools = ReferencePools.from_state_dict(state["pools"])
        step, history, validation = state["step"], state["history"], state.get("validation", [])
        refitted = state.get("probe_refitted", False)
    else:
        loader = DataLoader(data, batch_size=min(share, 64), shuffle=True, generator=generator(cfg.train.seed, -1))
        bank = collect_patch_bank(backbone, loader, loss_cfg.pool_size, generator=generator(cfg.train.seed, -2),
                                  device=device, progress=progress)
        pools = ReferencePools(bank, loss_cfg.pool_size, generator=generator(cfg.train.seed, -3))
        pools.refresh_specific(ema, generator=generator(cfg.train.seed, -4))
    if main:
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    net: nn.Module = DistributedDataParallel(model) if world > 1 else model
    need_aug = loss_cfg.plain_contrastive or (loss_cfg.regularizer and loss_cfg.alpha > 0)
    need_weights = loss_cfg.lhp and not loss_cfg.plain_contrastive
    h, w = backbone.grid(cfg.data.image_size, cfg.data.image_size)
    cache = None
    if cfg.train.cache_features:
        folder = Path(cfg.train.cache_dir) if cfg.train.cache_dir else out / "feature_cache"
        key = {"backbone": backbone.name, "weights": cfg.model.weights,
               "weights_sha256": file_sha256(backbone.weights_path) if backbone.weights_path else None,
               "data": to_dict(cfg)["data"],
               "files": data.layout.fingerprint() if hasattr(data, "layout") else None,  # a folder's photos
               "seed": cfg.train.seed, "lhp": [loss_cfg.style, loss_cfg.sigma] if need_weights else None}
        if main:
            cache = FeatureCache(folder, len(data), (backbone.embed_dim, h, w), with_weights=need_weights, key=key)
        if world > 1:
            dist.barrier()
        if not main:
            cache = FeatureCache(folder, len(data), (backbone.embed_dim, h, w), with_weights=need_weights,
                                 key=key, create=False)
    mean, std = backbone.mean.flatten(), backbone.std.flatten()

    def clean_view(images: Tensor) -> dict[str, Tensor]:
        with amp:
            feats, attn = backbone(images, attention=need_weights)
        out_ = {"feats": feats.float()}
        if need_weights:
            out_["weights"] = local_weights(attn, (h, w), sigma=loss_cfg.sigma, style=loss_cfg.style)
        return out_

    def checkpoint() -> None:
        if main:
            save_checkpoint({**{name: getattr(model, name).state_dict() for name in ("head", "proj", "cluster",
                                                                                      "linear")},
                             "ema": ema.state_dict(), "optim": {k: v.state_dict() for k, v in optimizers.items()},
                             "scaler": scaler.state_dict(), "rng": torch.get_rng_state(),
                             "pools": pools.state_dict(), "step": step, "history": history,
                             "validation": validation, "probe_refitted": refitted, "config": to_dict(cfg)},
                            ckpt_path)
            atomic_write(out / "history.json",
                         lambda tmp: tmp.write_text(json.dumps({"steps": history, "validation": validation})))

    def validate() -> None:
        if main and val_data is not None:
            m = score(backbone, model.head, model.cluster, model.linear, val_data, kmeans=False,
                      max_images=cfg.train.val_images, device=device, seed=cfg.train.seed, progress=progress)
            validation.append({"step": step, **{f"{k}_{metric}": m[k][key] for k in ("cluster", "linear")
                                                 for metric, key in (("accuracy", "pixel_accuracy"),
                                                                     ("miou", "mean_iou"))}})
        checkpoint()

    bar = tqdm(total=total, initial=step, disable=not progress, desc="HP training")
    mm_dtype = getattr(torch, loss_cfg.matmul_dtype) if loss_cfg.matmul_dtype else None
    updating = False  # True while parameters are half-updated: an interrupt then keeps the old checkpoint
    try:
        while step < total:
            epoch, skip = divmod(step, steps_per_epoch)
            indices = _epoch_indices(len(data), cfg.data.batch_size, epoch, cfg.train.seed, rank, world)
            loader = DataLoader(_Indexed(data), batch_size=share, sampler=indices[skip:].flatten().tolist(),
                                num_workers=cfg.data.num_workers, generator=generator(cfg.train.seed, epoch, 7))
            for idx, images, labels in loader:
                if step >= total:
                    break
                started = time.perf_counter()
                gen = generator(cfg.train.seed, 1_000_000 + step, rank)
                # The objective draws its random negatives where the features are: a CPU generator cannot
                # draw on a GPU. On the CPU it is the same generator, after the augmentation's draw.
                draws = gen if device.type == "cpu" else torch.Generator(device).manual_seed(gen.initial_seed())
                images, labels = images.to(device), labels.to(device)
                if cache is not None:
                    clean = cache.lookup(idx, lambda missing: clean_view(images[missing.to(device)]), device)
                else:
                    clean = clean_view(images)
                feats, weights = clean["feats"], clean.get("weights")
                with amp:
                    f_aug = None
                    if need_aug:
                        official = loss_cfg.style == "official"
                        aug = photometric(images, gen, official=official, mean=mean, std=std)
                        f_aug = backbone(aug, attention=False, normalized=official).feats
                    outs = net(feats, f_aug, weights if loss_cfg.propagation == "gradient" else None, labels)
                    s_ema = ema(feats)
                z, z_aug, probe_loss = outs["z"].float(), outs["z_aug"], outs["probe_loss"].float()
                lam = lambda_schedule(step, planned, loss_cfg.warmup)
                if loss_cfg.plain_contrastive:
                    loss = self_contrastive_loss(z, z_aug.float(), tau=loss_cfg.tau)
                else:
                    z_mix = outs["z_mix"].float() if outs["z_mix"] is not None else None
                    nb = weights if loss_cfg.lhp and loss_cfg.propagation == "loss" else None
                    loss = hp_objective(z, F.normalize(to_rows(feats), dim=1), F.normalize(to_rows(s_ema.float()), dim=1),
                                        pools.agnostic.to(device), pools.specific.to(device),
                                        patches_per_image=h * w, lam=lam, tau=loss_cfg.tau, rho=loss_cfg.rho,
                                        z_mix=z_mix, style=loss_cfg.style, symmetric=loss_cfg.symmetric,
                                        task_specific=loss_cfg.task_specific, neighbour_weights=nb, generator=draws,
                                        matmul_dtype=mm_dtype)
                    if need_aug:
                        loss = loss + loss_cfg.alpha * consistency_regularizer(z, z_aug.float())
                value = loss.detach()
                if world > 1:
                    dist.all_reduce(value)
                    value /= world
                if not math.isfinite(value.item()):
                    raise TrainingDiverged(
                        f"loss is {value.item()} at step {step}; the last good checkpoint "
                        f"({ckpt_path if ckpt_path.exists() else 'none yet'}) is kept. Try a lower optim.lr "
                        "or loss.tau closer to the preset")
                for opt in optimizers.values():
                    opt.zero_grad(set_to_none=True)
                scaler.scale(loss + probe_loss).backward()
                updating = True
                scaler.unscale_(optimizers["head"])
                torch.nn.utils.clip_grad_norm_(model.head.parameters(), o.grad_clip)
                for opt in optimizers.values():
                    scaler.step(opt)
                scaler.update()
                ema.update(model.head)
                step += 1
                if step % loss_cfg.renew_interval == 0:
                    pools.refresh_specific(ema, generator=generator(cfg.train.seed, 2_000_000 + step))
                history.append({"step": step, "loss": value.item(), "lambda": lam, "probe_loss": probe_loss.item(),
                                "seconds": time.perf_counter() - started})
                updating = False
                if cfg.train.val_every and step % cfg.train.val_every == 0:
                    validate()
                bar.update(1)
                bar.set_postfix(loss=f"{value.item():.3f}", lam=f"{lam:.2f}")
        bar.close()
        if cfg.train.probe_refit_epochs and step == planned and not refitted:
            def features(idx: Tensor) -> Tensor:
                def compute(missing: Tensor) -> dict[str, Tensor]:  # images are read only for rows not cached
                    return clean_view(torch.stack([data[int(i)][0] for i in idx[missing]]).to(device))

                if cache is None:
                    return compute(torch.arange(len(idx)))["feats"]
                return cache.lookup(idx, compute, device)["feats"]

            if main:
                refit_cluster_probe(model, features, len(data), cfg, progress=progress)
            if world > 1:
                dist.broadcast(model.cluster.centroids.data, 0)
            refitted = True
            if validation and validation[-1]["step"] == step:
                validation.pop()  # scored with the probe before the refit
        if cfg.train.val_every and (not validation or validation[-1]["step"] != step):
            validate()
        else:
            checkpoint()
    except KeyboardInterrupt:
        if not updating:
            checkpoint()
        bar.close()
        if main:
            print(f"interrupted at step {step}; the checkpoint in {out} is kept: continue with resume=True "
                  "(`hpkit train ... --resume`)")
        raise
    except TrainingDiverged:
        bar.close()
        raise
    except Exception:  # keep the work done so far: the last completed step's state, if it is whole
        bar.close()
        if main and not updating and step > 0:
            try:
                checkpoint()
                print(f"training stopped by an error at step {step}; the checkpoint of step {step} is in {out}: "
                      "fix the cause and continue with --resume (resume=True)")
            except Exception:  # the error that stopped training is the one to report
                pass
        raise
    if world > 1:  # DDP keeps the replicas equal; check it once, cheaply, before anyone uses the result
        total_sum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
        sums = [torch.zeros_like(total_sum) for _ in range(world)]
        dist.all_gather(sums, total_sum)
        if any(not torch.equal(sums[0], x) for x in sums):
            raise RuntimeError(f"the {world} DDP replicas ended with different parameters: {sums}")
    return {"history": history, "validation": validation, "steps": step}
