"""The training loop around :func:`hpkit.pipeline.step.hp_step`: ``train(cfg, out_dir)``, on one device
or several (torchrun + DDP).

``train`` checks the data, loads the frozen backbone, builds the heads, optimisers and reference pools
(or restores them from ``checkpoint.pt``), then runs :func:`~hpkit.pipeline.step.hp_step` over the
epochs. Everything optional is a marked branch of the loop: the on-disk feature cache
(``train.cache_features``: after the first epoch f and the LHP weights are read from disk, docs/official-code-differences.md#h4), AMP
(``train.amp``), DDP, validation every ``train.val_every`` steps, the cluster-probe refit after the last
step (``train.probe_refit_epochs``) and ``on_step``, a callback called with each step's record.

With ``train.probe_refit_epochs > 0`` (the demo preset; 0 in the paper presets) the cluster probe is
re-initialised after the last planned step and trained alone on the final head
(:func:`refit_cluster_probe`): a probe trained alongside a head that is still moving settles early in
a poor k-means optimum and, with hard assignment, stays there.

Every ``train.val_every`` iterations the probes are scored on the validation split (no CRF) and a
checkpoint is written; the history (loss, lambda per step; metrics per validation) goes to
``history.json`` for plotting (:mod:`hpkit.lessons.plots`). No checkpoint is *selected* by validation
score: the validation split is the evaluation split, so the last checkpoint is the result.

Every random draw (batch order, augmentation, negatives, dropout) comes from seeded generators or a
saved RNG state, so a run resumed from a checkpoint continues exactly like an uninterrupted one.
Checkpoints are written atomically; a non-finite loss stops training with a message naming the step
and leaves the last good checkpoint in place; Ctrl-C and any other error save the last completed step.

Multi-GPU: launch with ``torchrun --nproc_per_node N -m hpkit train ...``. ``data.batch_size`` stays
the *global* batch; each rank takes an equal share of every batch, selects hidden positives within
its own share (per-rank selection: candidates are the rank's images plus the shared pools) and DDP
averages the gradients. The pools are identical on all ranks (same seed, same EMA head).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from hpkit._util import atomic_write, autocast, generator, resolve_device
from hpkit.backbones.vit import FrozenViT, file_sha256, load_backbone
from hpkit.data.folder import scan_folder
from hpkit.method.heads import MomentumHead
from hpkit.method.pools import ReferencePools, collect_patch_bank
from hpkit.pipeline.checkpoint import CHECKPOINT, load_checkpoint, prepare_run_folder, save_checkpoint
from hpkit.pipeline.config import Config, to_dict
from hpkit.pipeline.datasets import UNLABELLED_CLUSTERS, build_dataset
from hpkit.pipeline.evaluate import has_labels, score
from hpkit.pipeline.feature_cache import FeatureCache
from hpkit.pipeline.probes import ClusterProbe
from hpkit.pipeline.step import HPHeads, StepContext, TrainingDiverged, TrainState, clean_view, hp_step, photometric

__all__ = ["train", "prepare_data", "refit_cluster_probe", "photometric", "HPHeads", "TrainingDiverged"]

#: the head parts a checkpoint stores by name
PARTS = ("head", "proj", "cluster", "linear")


def refit_cluster_probe(model: HPHeads, features: Callable[[Tensor], Tensor], n_images: int, cfg: Config, *,
                        progress: bool = False) -> None:
    """Re-initialise the cluster probe and train it alone on the final head (``train.probe_refit_epochs``).

    Restart r of ``train.probe_refit_restarts`` (R) starts its centroids from ``randn(K, D)`` drawn from
    ``torch.Generator().manual_seed(train.seed + 1000 * r)``; each epoch e visits the ``n_images`` train
    images in the order ``randperm(n_images)`` of ``torch.Generator().manual_seed(train.seed + 1 + e)``,
    in batches of ``data.batch_size``; each batch's backbone features (``features(indices)`` ->
    (B, C, h, w)) go once through the head in eval mode, and each restart's own Adam
    (``optim.cluster_lr``) minimises its :meth:`ClusterProbe.loss`. With R > 1 one more pass scores
    every restart's loss over all train patches and the lowest is kept, as k-means keeps the restart
    with the lowest inertia (:func:`hpkit.pipeline.probes.fit_kmeans`).
    """
    probe, head = model.cluster, model.head
    was_training = head.training
    head.eval()
    k, dim = probe.centroids.shape
    restarts = [ClusterProbe(dim, k).to(probe.centroids) for _ in range(cfg.train.probe_refit_restarts)]
    with torch.no_grad():
        for r, candidate in enumerate(restarts):
            candidate.centroids.copy_(torch.randn(probe.centroids.shape, generator=torch.Generator().manual_seed(
                cfg.train.seed + 1000 * r)))
    optimizers = [torch.optim.Adam(c.parameters(), lr=cfg.optim.cluster_lr) for c in restarts]
    batches = math.ceil(n_images / cfg.data.batch_size)
    bar = tqdm(total=(cfg.train.probe_refit_epochs + (len(restarts) > 1)) * batches, disable=not progress,
               desc="cluster probe refit", leave=False)
    for epoch in range(cfg.train.probe_refit_epochs):
        order = torch.randperm(n_images, generator=torch.Generator().manual_seed(cfg.train.seed + 1 + epoch))
        for batch in order.split(cfg.data.batch_size):
            bar.update(1)
            with torch.no_grad():
                s = head(features(batch).float())
            for candidate, optimizer in zip(restarts, optimizers):
                loss = candidate.loss(s)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    best = restarts[0]
    if len(restarts) > 1:  # the loss over every train patch (batches weighted by their patch count)
        totals = torch.zeros(len(restarts), dtype=torch.float64)
        with torch.no_grad():
            for batch in torch.arange(n_images).split(cfg.data.batch_size):
                bar.update(1)
                s = head(features(batch).float())
                totals += torch.stack([c.loss(s).double().cpu() for c in restarts]) * len(batch)
        best = restarts[int(totals.argmin())]
    with torch.no_grad():
        probe.centroids.copy_(best.centroids)
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
          max_steps: int | None = None, progress: bool = True, on_step: Callable[[dict], None] | None = None) -> dict:
    """Train HP as configured and write ``checkpoint.pt``, ``config.json`` and ``history.json``.

    Args:
        cfg: the configuration (see :mod:`hpkit.pipeline.config`).
        out_dir: output folder.
        resume: continue from ``out_dir/checkpoint.pt``.
        force: delete a run already in ``out_dir`` and start over (without ``resume`` or ``force`` a
            folder holding a run is refused: runs are never replaced silently).
        max_steps: stop after this many iterations in total (quick runs, tests); the lambda
            schedule still spans the configured epochs.
        progress: show a tqdm progress bar.
        on_step: called after every step with its record (step, loss, lambda, probe_loss, seconds,
            ``total``, the steps this call runs to, and ``validation`` when the step was validated),
            on the main process.

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
        return _train(cfg, Path(out_dir), resume, force, max_steps, progress and rank == 0, device, rank, world,
                      on_step if rank == 0 else None)
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
    elif k < n_classes:
        raise ValueError(f"model.num_clusters={k} is below the {n_classes} classes: clusters are matched one-to-one "
                         f"to classes, so use model.num_clusters={n_classes} or more (or none)")
    return data, val_data, n_classes, k, notes


def _train(cfg: Config, out: Path, resume: bool, force: bool, max_steps: int | None, progress: bool,
           device: torch.device, rank: int, world: int, on_step: Callable[[dict], None] | None) -> dict:
    main = rank == 0
    torch.manual_seed(cfg.train.seed)
    data, val_data, n_classes, n_clusters, notes = prepare_data(cfg, validate=bool(cfg.train.val_every) and main)
    backbone = load_backbone(cfg.model.backbone, weights=cfg.model.weights, device=device)
    _check_sizes(cfg, backbone, len(data), world)
    if resume and not (out / CHECKPOINT).is_file():
        raise FileNotFoundError(f"nothing to resume: {out / CHECKPOINT} does not exist")
    if main:  # after every check: bad input never costs a run that --force was about to replace
        out.mkdir(parents=True, exist_ok=True)
        prepare_run_folder(out, resume=resume, force=force)
        for note in notes:
            print(f"note: {note}")
    amp, fp16 = autocast(cfg.train.amp, device, "train.amp")
    state = _new_state(cfg, backbone, max(n_classes, 1), n_clusters, device, fp16)
    if resume:
        _restore(state, out, device)
    else:
        state.pools = _new_pools(cfg, backbone, data, state.ema, device, progress, world)
    if main:
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    steps_per_epoch = len(data) // cfg.data.batch_size
    planned = steps_per_epoch * cfg.train.epochs  # the lambda schedule always spans the whole run
    total = planned if max_steps is None else min(planned, max_steps)
    net = DistributedDataParallel(state.model) if world > 1 else state.model
    ctx = StepContext(cfg, backbone, net, amp, planned, backbone.grid(cfg.data.image_size, cfg.data.image_size), world)
    cache = _feature_cache(ctx, data, out, main) if cfg.train.cache_features else None

    def save() -> None:
        if main:
            _save(state, cfg, out)

    def validate() -> None:
        if main and val_data is not None:
            state.validation.append(_validate(ctx, state, val_data, device, progress))
        save()

    bar = tqdm(total=total, initial=state.step, disable=not progress, desc="HP training")
    try:
        _run_steps(ctx, state, data, cache, total, steps_per_epoch, device, rank, validate, bar, on_step)
        bar.close()
        if cfg.train.probe_refit_epochs and state.step == planned and not state.refitted:
            _refit(ctx, state, data, cache, device, main, progress)
        if cfg.train.val_every and (not state.validation or state.validation[-1]["step"] != state.step):
            validate()
        else:
            save()
    except KeyboardInterrupt:
        bar.close()
        if not state.updating:
            save()
        if main:
            print(f"interrupted at step {state.step}; the checkpoint in {out} is kept: continue with resume=True "
                  "(`hpkit train ... --resume`)")
        raise
    except TrainingDiverged as err:
        bar.close()
        kept = out / CHECKPOINT if (out / CHECKPOINT).exists() else "none yet"
        raise TrainingDiverged(f"{err}; the last good checkpoint ({kept}) is kept. Try a lower optim.lr "
                               "or loss.tau closer to the preset") from None
    except Exception:  # keep the work done so far: the last completed step's state, if it is whole
        bar.close()
        if main and not state.updating and state.step > 0:
            try:
                save()
                print(f"training stopped by an error at step {state.step}; the checkpoint of step {state.step} is in "
                      f"{out}: fix the cause and continue with --resume (resume=True)")
            except Exception:  # the error that stopped training is the one to report
                pass
        raise
    if world > 1:
        _check_replicas(state.model, world)
    return {"history": state.history, "validation": state.validation, "steps": state.step}


def _run_steps(ctx: StepContext, state: TrainState, data: Dataset, cache: FeatureCache | None, total: int,
               steps_per_epoch: int, device: torch.device, rank: int, validate: Callable[[], None], bar,
               on_step: Callable[[dict], None] | None) -> None:
    """The loop: batches of each epoch in a seeded order (resuming mid-epoch), one ``hp_step`` each."""
    cfg = ctx.cfg
    share = cfg.data.batch_size // ctx.world
    while state.step < total:
        epoch, skip = divmod(state.step, steps_per_epoch)
        indices = _epoch_indices(len(data), cfg.data.batch_size, epoch, cfg.train.seed, rank, ctx.world)
        loader = DataLoader(_Indexed(data), batch_size=share, sampler=indices[skip:].flatten().tolist(),
                            num_workers=cfg.data.num_workers, generator=generator(cfg.train.seed, epoch, 7))
        for idx, images, labels in loader:
            if state.step >= total:
                break
            started = time.perf_counter()
            gen = generator(cfg.train.seed, 1_000_000 + state.step, rank)
            # The objective draws its random negatives where the features are: a CPU generator cannot
            # draw on a GPU. On the CPU it is the same generator, after the augmentation's draw.
            draws = gen if device.type == "cpu" else torch.Generator(device).manual_seed(gen.initial_seed())
            images, labels = images.to(device), labels.to(device)
            if cache is not None:  # feature cache: the backbone runs only for images not yet on disk
                clean = cache.lookup(idx, lambda missing: clean_view(ctx, images[missing.to(device)]), device)
            else:
                clean = clean_view(ctx, images)
            record = hp_step(ctx, state, images, labels, clean, gen, draws)
            state.history.append({**record, "seconds": time.perf_counter() - started})
            state.updating = False
            if cfg.train.val_every and state.step % cfg.train.val_every == 0:
                validate()
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lam=f"{record['lambda']:.2f}")
            if on_step is not None:
                validated = state.validation and state.validation[-1]["step"] == state.step
                on_step({**state.history[-1], "total": total, **({"validation": state.validation[-1]} if validated else {})})


def _new_state(cfg: Config, backbone: FrozenViT, n_classes: int, n_clusters: int, device: torch.device,
               fp16: bool) -> TrainState:
    """Fresh heads (S, Z, probes), S' as a copy of S, the optimisers and the fp16 scaler; no pools yet."""
    o = cfg.optim
    model = HPHeads(backbone.embed_dim, cfg.model.dim, n_classes, cfg.model.dropout, n_clusters).to(device)
    ema = MomentumHead(model.head, cfg.model.ema_momentum).eval()
    optimizers = {
        "head": torch.optim.AdamW(model.head.parameters(), lr=o.lr, weight_decay=o.weight_decay),
        "proj": torch.optim.Adam(model.proj.parameters(), lr=o.projection_lr),
        "cluster": torch.optim.Adam(model.cluster.parameters(), lr=o.cluster_lr),
        "linear": torch.optim.Adam(model.linear.parameters(), lr=o.linear_lr),
    }
    scaler = torch.amp.GradScaler(device.type, init_scale=2048, growth_interval=1000, enabled=fp16)
    return TrainState(model, ema, optimizers, scaler, pools=None)  # type: ignore[arg-type]


def _new_pools(cfg: Config, backbone: FrozenViT, data: Dataset, ema: MomentumHead, device: torch.device,
               progress: bool, world: int) -> ReferencePools:
    """Q^ag from a seeded bank of backbone patch features, Q^sp from S' on it (Eq. 2-4)."""
    loader = DataLoader(data, batch_size=min(cfg.data.batch_size // world, 64), shuffle=True,
                        generator=generator(cfg.train.seed, -1))
    bank = collect_patch_bank(backbone, loader, cfg.loss.pool_size, generator=generator(cfg.train.seed, -2),
                              device=device, progress=progress)
    pools = ReferencePools(bank, cfg.loss.pool_size, generator=generator(cfg.train.seed, -3))
    pools.agnostic = pools.agnostic.to(device)  # fixed for the run: moved once, not every step (Q^sp is there already)
    pools.refresh_specific(ema, generator=generator(cfg.train.seed, -4))
    return pools


def _save(state: TrainState, cfg: Config, out: Path) -> None:
    """Write ``checkpoint.pt`` and ``history.json`` atomically."""
    save_checkpoint({**{name: getattr(state.model, name).state_dict() for name in PARTS},
                     "ema": state.ema.state_dict(), "optim": {k: v.state_dict() for k, v in state.optimizers.items()},
                     "scaler": state.scaler.state_dict(), "rng": torch.get_rng_state(),
                     "pools": state.pools.state_dict(), "step": state.step, "history": state.history,
                     "validation": state.validation, "probe_refitted": state.refitted, "config": to_dict(cfg)},
                    out / CHECKPOINT)
    atomic_write(out / "history.json",
                 lambda tmp: tmp.write_text(json.dumps({"steps": state.history, "validation": state.validation})))


def _restore(state: TrainState, out: Path, device: torch.device) -> None:
    """Load everything :func:`_save` wrote (``--resume``)."""
    saved = load_checkpoint(out, device)
    for name in PARTS:
        getattr(state.model, name).load_state_dict(saved[name])
    state.ema.load_state_dict(saved["ema"])
    for name, opt in state.optimizers.items():
        opt.load_state_dict(saved["optim"][name])
    state.scaler.load_state_dict(saved.get("scaler", state.scaler.state_dict()))
    torch.set_rng_state(saved["rng"])
    state.pools = ReferencePools.from_state_dict(saved["pools"])
    state.step, state.history, state.validation = saved["step"], saved["history"], saved.get("validation", [])
    state.refitted = saved.get("probe_refitted", False)


def _validate(ctx: StepContext, state: TrainState, val_data: Dataset, device: torch.device, progress: bool) -> dict:
    """The probes' accuracy and mIoU on the validation split at this step."""
    m = state.model
    result = score(ctx.backbone, m.head, m.cluster, m.linear, val_data, kmeans=False,
                   max_images=ctx.cfg.train.val_images, device=device, seed=ctx.cfg.train.seed, progress=progress)
    return {"step": state.step, **{f"{k}_{metric}": result[k][key] for k in ("cluster", "linear")
                                   for metric, key in (("accuracy", "pixel_accuracy"), ("miou", "mean_iou"))}}


def _feature_cache(ctx: StepContext, data: Dataset, out: Path, main: bool) -> FeatureCache:
    """The on-disk cache of f (and the LHP weights), keyed on everything that changes them."""
    cfg, backbone = ctx.cfg, ctx.backbone
    folder = Path(cfg.train.cache_dir) if cfg.train.cache_dir else out / "feature_cache"
    key = {"backbone": backbone.name, "weights": cfg.model.weights,
           "weights_sha256": file_sha256(backbone.weights_path) if backbone.weights_path else None,
           "data": to_dict(cfg)["data"],
           "files": data.layout.fingerprint() if hasattr(data, "layout") else None,  # a folder's photos
           "seed": cfg.train.seed, "lhp": [cfg.loss.style, cfg.loss.sigma] if ctx.need_weights else None}
    shape = (backbone.embed_dim, *ctx.grid)
    cache = FeatureCache(folder, len(data), shape, with_weights=ctx.need_weights, key=key) if main else None
    if ctx.world > 1:
        dist.barrier()
    if not main:
        cache = FeatureCache(folder, len(data), shape, with_weights=ctx.need_weights, key=key, create=False)
    return cache


def _refit(ctx: StepContext, state: TrainState, data: Dataset, cache: FeatureCache | None, device: torch.device,
           main: bool, progress: bool) -> None:
    """Refit the cluster probe on the final head (``train.probe_refit_epochs``), from cached features."""
    def images(rows: Tensor) -> Tensor:
        return torch.stack([data[int(i)][0] for i in rows]).to(device)

    def features(idx: Tensor) -> Tensor:
        if cache is None:  # features only: the LHP weights would be thrown away
            with ctx.amp:
                return ctx.backbone(images(idx), attention=False).feats.float()
        # images are read only for rows not cached; the cache stores the weights with them
        return cache.lookup(idx, lambda missing: clean_view(ctx, images(idx[missing])), device)["feats"]

    if main:
        refit_cluster_probe(state.model, features, len(data), ctx.cfg, progress=progress)
    if ctx.world > 1:
        dist.broadcast(state.model.cluster.centroids.data, 0)
    state.refitted = True
    if state.validation and state.validation[-1]["step"] == state.step:
        state.validation.pop()  # scored with the probe before the refit


def _check_replicas(model: HPHeads, world: int) -> None:
    """DDP keeps the replicas equal; check it once, cheaply, before anyone uses the result."""
    total_sum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    sums = [torch.zeros_like(total_sum) for _ in range(world)]
    dist.all_gather(sums, total_sum)
    if any(not torch.equal(sums[0], x) for x in sums):
        raise RuntimeError(f"the {world} DDP replicas ended with different parameters: {sums}")
