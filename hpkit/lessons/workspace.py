"""The notebooks' shared workspace: expensive results computed once, kept on disk and reused.

A lesson that needs a trained HP model calls :func:`trained_run`; the first notebook that asks
trains it (minutes on a CPU with the demo preset), every later one, and every re-run, loads it.
Runs are keyed by their resolved configuration *and* the backbone that ``model.backbone``
resolves to on this machine (``auto`` means DINO ViT-S/8 where its weights are present, the
bundled tiny model otherwise), so changing a parameter trains a new run instead of reusing a
wrong one. A run that was interrupted resumes from its last checkpoint.

The workspace folder is ``$HPKIT_WORKSPACE`` if set, else ``runs/notebooks`` in the repository
(when writable), else ``~/.cache/hpkit/notebooks``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Mapping

from hpkit._util import atomic_write
from hpkit.pipeline.checkpoint import CHECKPOINT
from hpkit.pipeline.config import Config, dumps, get_config, override

__all__ = ["workspace_dir", "notebook_config", "photos_config", "resolved_backbone", "trained_run", "cached_run",
           "data_fingerprint"]

_DONE = "done.json"


def workspace_dir(path: str | Path | None = None) -> Path:
    """The workspace folder (created): ``path``, ``$HPKIT_WORKSPACE``, ``<repo>/runs/notebooks`` or ``~/.cache``."""
    if path is None and os.environ.get("HPKIT_WORKSPACE"):
        path = os.environ["HPKIT_WORKSPACE"]
    if path is None:
        repo = Path(__file__).resolve().parents[2]
        path = repo / "runs" / "notebooks" if os.access(repo, os.W_OK) else Path.home() / ".cache/hpkit/notebooks"
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def notebook_config(*, preset: str = "demo", backbone: str = "auto", dataset: str | None = None,
                    root: str | None = None, device: str = "cpu", seed: int = 0,
                    overrides: Mapping[str, object] | Iterable[str] = ()) -> Config:
    """The configuration of a notebook's parameters cell: a preset plus the usual knobs.

    ``dataset=None`` keeps the preset's dataset; ``overrides`` are ``"section.key=value"`` strings or
    a mapping, applied last (see :func:`hpkit.pipeline.config.override`).
    """
    changes: dict[str, object] = {"model.backbone": backbone, "train.device": device, "train.seed": seed}
    if dataset is not None:
        changes["data.dataset"] = dataset
    if root is not None:
        changes["data.root"] = root
    cfg = get_config(preset, changes)
    return override(cfg, overrides) if overrides else cfg


def photos_config(root: str | Path, *, backbone: str = "auto", device: str = "cpu", seed: int = 0,
                  min_steps: int = 64, overrides: Mapping[str, object] | Iterable[str] = ()) -> Config:
    """The demo preset on a folder of photos, sized for it: the reference pool and the batch at most
    the number of photos, and at least ``min_steps`` training steps (a handful of photos makes one
    step per epoch; the preset's 4 epochs would leave the head barely trained)."""
    from hpkit.data.folder import scan_folder

    n = len(scan_folder(root).splits["train"].images)
    batch = min(8, n)
    epochs = max(4, -(-min_steps // (n // batch)))
    cfg = notebook_config(preset="demo", backbone=backbone, dataset="folder", root=str(root), device=device, seed=seed,
                          overrides={"loss.pool_size": min(256, n), "data.batch_size": batch, "train.epochs": epochs})
    return override(cfg, overrides) if overrides else cfg


def resolved_backbone(cfg: Config) -> str:
    """What ``cfg.model.backbone`` loads on this machine (a name, plus the weights file if one is given)."""
    from hpkit.backbones.vit import auto_choice

    name = cfg.model.backbone
    if name == "auto" and cfg.model.weights is None:
        name = auto_choice()[0]  # what loading would pick, without loading (training prints the notice)
    return f"{name}:{cfg.model.weights}" if cfg.model.weights else name


def backbone_weights_sha256(cfg: Config) -> str | None:
    """The sha256 of the weights file ``cfg.model`` loads on this machine (None: random init or a hub
    download): new weights under the same name or path make a different run."""
    from hpkit.backbones.vit import file_sha256, weights_source

    source = weights_source(cfg.model.backbone, cfg.model.weights)
    return file_sha256(source) if source is not None and source.is_file() else None


def data_fingerprint(cfg: Config) -> str | None:
    """For a folder dataset, :meth:`FolderLayout.fingerprint` of its files (other photos, another
    run); None for datasets that a configuration fully determines."""
    if cfg.data.dataset != "folder" or cfg.data.root is None:
        return None
    from hpkit.data.folder import scan_folder

    return scan_folder(cfg.data.root).fingerprint()


def _run_folder(cfg: Config, workspace: str | Path | None, max_steps: int | None) -> tuple[Path, str]:
    """The workspace folder of ``cfg``'s run and the text of its key."""
    backbone = resolved_backbone(cfg)
    key_parts = {"config": dumps(cfg), "backbone": backbone, "max_steps": max_steps,
                 "weights_sha256": backbone_weights_sha256(cfg), "data": data_fingerprint(cfg)}
    text = json.dumps(key_parts, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:10]
    return workspace_dir(workspace) / f"{cfg.data.dataset}-{backbone.split(':')[0]}-{key}", text


def cached_run(cfg: Config, *, workspace: str | Path | None = None, max_steps: int | None = None) -> Path | None:
    """The finished workspace run of ``cfg`` if there is one (then :func:`trained_run` trains nothing)."""
    run, _ = _run_folder(cfg, workspace, max_steps)
    return run if (run / _DONE).is_file() else None


def trained_run(cfg: Config, *, workspace: str | Path | None = None, max_steps: int | None = None,
                progress: bool = True) -> Path:
    """Train ``cfg`` once and return its run folder (``checkpoint.pt``, ``config.json``, ``history.json``).

    Runs live in the notebooks' workspace, keyed by everything that changes them; a run made with
    ``hpkit train --out DIR`` lives in DIR, and a lesson can use it directly (``run = Path(DIR)``).

    Args:
        cfg: the configuration (e.g. :func:`notebook_config`).
        workspace: the workspace folder (default :func:`workspace_dir`).
        max_steps: stop after this many steps (part of the key: a shorter run is a different run).
        progress: say what is trained and show the training progress bar (with the time left).

    Returns:
        the run folder, ``<workspace>/<dataset>-<backbone>-<key>``; reused when it already holds a
        finished run of the same configuration (and, for a folder, the same files), resumed when it
        holds an interrupted one.
    """
    from hpkit.pipeline.train import train

    run, text = _run_folder(cfg, workspace, max_steps)
    if (run / _DONE).is_file():
        return run
    resume = (run / CHECKPOINT).is_file()  # else: a start that failed before its first checkpoint, redone
    if progress:
        print(f"{'resuming' if resume else 'training'} {run.name} (the {cfg.name} preset, {cfg.train.epochs} epochs "
              f"on {cfg.data.dataset}) once; later lessons reuse it. The bar shows the time left.", flush=True)
    train(cfg, run, resume=resume, force=not resume, max_steps=max_steps, progress=progress)
    atomic_write(run / _DONE, lambda tmp: tmp.write_text(text))
    return run
