"""The pretraining loop, :func:`pretrain`: epochs of batches, one step each (schedules, crops,
:func:`~hpkit.backbones.pretrain.objectives.forward` and
:func:`~hpkit.backbones.pretrain.objectives.step_loss`, the AdamW update, the teacher's EMA and
centers), checkpoints, resumption and Ctrl-C.

Determinism: the image order is drawn from a generator keyed on ``(seed, epoch)``, the crops from
one keyed on ``(seed, step)``, and the global RNG (stochastic depth) is re-seeded from
``(seed, step)`` every step, so a run resumed from a checkpoint reproduces the losses of an
uninterrupted one exactly. Checkpoints are written atomically (temporary file + ``os.replace``);
a non-finite loss stops with an error naming the step and keeps the last good checkpoint; Ctrl-C
finishes the step in flight, saves it and stops (a second Ctrl-C stops at once).

Monitoring: ``loss`` and ``teacher_entropy`` both near ln(out_dim) (8.3 for 4096) mean a uniform
teacher (no learning signal); ``teacher_entropy`` near 0 means a one-hot collapse. Short CPU runs
learn slowly: check the exported backbone with a patch-level probe before relying on it.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from hpkit._util import autocast, deferred_sigint, resolve_device, sequence_generator
from hpkit.backbones.pretrain.augment import MultiCrop
from hpkit.backbones.pretrain.config import CHECKPOINT, PretrainConfig, _config_dict
from hpkit.backbones.pretrain.images import _dataset
from hpkit.backbones.pretrain.objectives import Outputs, forward, step_loss
from hpkit.backbones.pretrain.schedules import cosine_schedule, ema_update, teacher_temperature, update_center
from hpkit.backbones.pretrain.state import RunState, new_state, resume_state, save_checkpoint

__all__ = ["pretrain", "PretrainingDiverged"]


class PretrainingDiverged(RuntimeError):
    """The DINO loss became NaN or infinite."""


class _Plan(NamedTuple):
    """A run's length: the schedules span ``total`` steps, the run stops after ``stop``."""

    steps_per_epoch: int
    total: int
    stop: int


def pretrain(cfg: PretrainConfig, out_dir: str | Path, *, resume: bool = False, max_steps: int | None = None,
             progress: bool = True) -> dict:
    """Pretrain a ViT with DINO and write ``checkpoint.pt``, ``config.json`` and ``history.json``.

    Args:
        cfg: the configuration.
        out_dir: output folder.
        resume: continue from ``out_dir/checkpoint.pt`` (same configuration, except ``device``,
            ``num_workers``, ``checkpoint_every`` and ``amp``).
        max_steps: stop after this many steps in total; the schedules still span ``cfg.epochs``.
        progress: show a tqdm progress bar.

    Returns:
        dict with ``history`` (one entry per step: step, epoch, loss, lr, weight_decay, teacher_temp,
        momentum, teacher_entropy, dense_loss, keep_loss, grad_norm, seconds), ``steps``, ``seconds``
        (time spent in steps since the start of the run, image loading and checkpoints excluded) and
        ``checkpoint`` (its path).

    Raises:
        PretrainingDiverged: the loss became NaN or infinite (the last good checkpoint is kept).
        KeyboardInterrupt: after Ctrl-C, once the checkpoint of the last completed step is written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    device = resolve_device(cfg.device)
    data = _dataset(cfg)
    steps_per_epoch = len(data) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the {len(data)} images")
    total = steps_per_epoch * cfg.epochs  # the schedules span the whole configured run
    plan = _Plan(steps_per_epoch, total, total if max_steps is None else min(total, max_steps))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's RNG stays as it was
        torch.manual_seed(cfg.seed)
        state = new_state(cfg, data, device)
        if resume:
            resume_state(state, cfg, ckpt_path)
        (out / "config.json").write_text(json.dumps(_config_dict(cfg), indent=2))
        _run(state, cfg, data, plan, ckpt_path, progress)
        save_checkpoint(state, cfg, ckpt_path, steps_per_epoch)
    return {"history": state.history, "steps": state.step, "seconds": state.seconds, "checkpoint": ckpt_path}


def _run(state: RunState, cfg: PretrainConfig, data: Dataset, plan: _Plan, ckpt_path: Path, progress: bool) -> None:
    """The steps from ``state.step`` to ``plan.stop``, with regular checkpoints; Ctrl-C saves the last
    completed step (unless it interrupted the update) and raises ``KeyboardInterrupt``."""
    crop = MultiCrop(cfg)
    amp, _ = autocast("bf16" if cfg.amp else "off", state.device)
    bar = tqdm(total=plan.stop, initial=state.step, disable=not progress, desc="DINO pretraining")
    try:
        with deferred_sigint("hpkit.pretrain") as sigint:
            for epoch, images, indices in _batches(cfg, data, plan, state):
                value, lr, momentum = _step(state, cfg, plan, crop, amp, epoch, images, indices, ckpt_path)
                if state.step % cfg.checkpoint_every == 0 and state.step < plan.stop:
                    save_checkpoint(state, cfg, ckpt_path, plan.steps_per_epoch)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2e}", mom=f"{momentum:.4f}")
                if sigint["stop"]:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        if not state.updating:
            save_checkpoint(state, cfg, ckpt_path, plan.steps_per_epoch)
        print(f"hpkit.pretrain: interrupted at step {state.step}; {ckpt_path} "
              f"{'holds it' if not state.updating else 'holds the last regular checkpoint'}: continue with "
              "resume=True (--resume)", file=sys.stderr, flush=True)
        raise
    finally:
        bar.close()


def _batches(cfg: PretrainConfig, data: Dataset, plan: _Plan, state: RunState) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(epoch, images, image indices) for every step from ``state.step`` (advanced by the caller) to
    ``plan.stop``. Each epoch's order is drawn from a generator keyed on ``(seed, epoch)``; a
    resumed run skips the epoch's batches it has done."""
    while state.step < plan.stop:
        epoch, skip = divmod(state.step, plan.steps_per_epoch)
        order = torch.randperm(len(data), generator=sequence_generator(cfg.seed, 0, epoch))
        batches = order[: plan.steps_per_epoch * cfg.batch_size].view(plan.steps_per_epoch, cfg.batch_size)
        loader = DataLoader(data, batch_sampler=batches[skip:].tolist(), num_workers=cfg.num_workers)
        for (images, _), indices in zip(loader, batches[skip:]):
            if state.step >= plan.stop:
                return
            yield epoch, images, indices


def _schedules(cfg: PretrainConfig, step: int, plan: _Plan) -> tuple[float, float, float, float]:
    """DINO's per-step learning rate, weight decay, teacher momentum and teacher temperature."""
    lr = cosine_schedule(step, plan.total, cfg.lr * cfg.batch_size / 256, cfg.min_lr,
                         warmup=cfg.warmup_epochs * plan.steps_per_epoch)
    wd = cosine_schedule(step, plan.total, cfg.weight_decay, cfg.weight_decay_end)
    momentum = cosine_schedule(step, plan.total, cfg.momentum_teacher, 1.0)
    return lr, wd, momentum, teacher_temperature(step, plan.steps_per_epoch, cfg)


def _step(state: RunState, cfg: PretrainConfig, plan: _Plan, crop: MultiCrop, amp: contextlib.AbstractContextManager,
          epoch: int, images: Tensor, indices: Tensor, ckpt_path: Path) -> tuple[float, float, float]:
    """One training step on a batch; appends its record to ``state.history``. Returns the loss, lr and momentum."""
    started = time.perf_counter()
    step = state.step
    lr, wd, momentum, t_temp = _schedules(cfg, step, plan)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
        if group["decay"]:
            group["weight_decay"] = wd
    torch.manual_seed(sequence_generator(cfg.seed, 2, step).initial_seed())  # stochastic depth, if any
    crops, boxes = crop(images, sequence_generator(cfg.seed, 1, step), boxes=True)
    crops = [c.to(state.device, non_blocking=True) for c in crops]
    with amp:
        out = forward(state, crops)
    loss, dense_value, keep_value = step_loss(cfg, state, out, boxes, indices, t_temp, step)
    value = loss.item()
    if not math.isfinite(value):
        raise PretrainingDiverged(
            f"the DINO loss is {value} at step {step} (epoch {epoch}); the last good checkpoint "
            f"({ckpt_path if ckpt_path.exists() else 'none yet'}) is kept. Try a lower lr, a lower clip_grad or a "
            "higher teacher temperature")
    grad_norm = _update(state, cfg, loss, epoch, momentum)
    entropy = _update_centers(state, cfg, out, t_temp)
    state.step += 1
    took = time.perf_counter() - started
    state.seconds += took
    state.history.append({"step": state.step, "epoch": epoch, "loss": value, "lr": lr, "weight_decay": wd,
                          "teacher_temp": t_temp, "momentum": momentum, "teacher_entropy": entropy,
                          "dense_loss": dense_value.item() if dense_value is not None else None,
                          "keep_loss": keep_value.item() if keep_value is not None else None,
                          "grad_norm": float(grad_norm), "seconds": took})
    state.updating = False
    return value, lr, momentum


def _update(state: RunState, cfg: PretrainConfig, loss: Tensor, epoch: int, momentum: float) -> Tensor:
    """Backward and update: the student by AdamW (gradients clipped by their total norm), the teacher
    by EMA. Sets ``state.updating`` (the caller clears it once the step is recorded). Returns the
    gradient norm before clipping."""
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.updating = True
    if epoch < cfg.freeze_last_layer:
        for p in state.last_layer:
            p.grad = None  # the prototypes stay fixed while the rest settles
    params = [p for p in state.student.parameters() if p.grad is not None]
    grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad) if cfg.clip_grad > 0
                 else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    state.optimizer.step()
    ema_update(state.teacher, state.student, momentum)
    return grad_norm


def _update_centers(state: RunState, cfg: PretrainConfig, out: Outputs, teacher_temp: float) -> float | None:
    """Move the DINO terms' centers towards this step's teacher outputs. Returns the entropy of the
    centred, sharpened teacher distribution before the move (None without the image-level term)."""
    entropy = None
    if state.terms.dino:
        with torch.no_grad():
            probs = F.softmax((out.t_out - state.center) / teacher_temp, dim=-1)
            entropy = float(-(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean())
        state.center = update_center(state.center, out.t_out, cfg.center_momentum)
    if state.terms.dense == "dino":
        state.patch_center = update_center(state.patch_center, torch.cat([p.flatten(0, 2) for p in out.t_dense]),
                                           cfg.center_momentum)
    return entropy
