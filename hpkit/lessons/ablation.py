"""The paper's ablations (Table 4, Table 5, Fig. 6) as named config overrides, run and summarised.

- :data:`TABLE4` maps the rows (a)-(g) of Table 4 onto hpkit's switches in :class:`hpkit.pipeline.config.LossConfig`
  (``task_specific``, ``lhp``, ``symmetric``, ``regularizer``, ``plain_contrastive``); :data:`TABLE5`
  does the same for gradient vs loss propagation (``loss.propagation``). Each row carries the paper's
  COCO-Stuff numbers (DINO ViT-S/8 for Table 4, ViT-S/16 for Table 5) for side-by-side display.
- :func:`table4_specs`, :func:`table5_specs` and :func:`sweep_specs` turn them into run specifications
  ``(name, overrides, seed)``; :func:`run_ablation` trains each one through
  :func:`hpkit.lessons.workspace.trained_run` (cached on disk: a re-run only reads files) and evaluates it
  once (also cached, ``ablation_eval.json`` in the run folder), returning one plain dict per run.
- :func:`summarize` gives the mean and the spread over seeds per name; :func:`markdown_table`,
  :func:`plot_table4`, :func:`plot_sweep` and :func:`plot_costs` show them.
- :func:`step_cost` measures the time and peak memory of training steps in a fresh subprocess (so the
  peak belongs to that one run): on CUDA ``torch.cuda.max_memory_allocated`` over the run, on the CPU
  the growth of the process's peak resident set size during training.

Row (g) of Table 4 ("Eq. 1 with PiCIE's photometric perturbations") is hpkit's ``plain_contrastive``:
Eq. 1 between the clean view and the photometric view that the regulariser uses (no GHP, no LHP,
no regulariser). Every row of Table 4 keeps the task-agnostic GHP set except (g): the paper has no
row without it, and hpkit has no switch for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from hpkit._util import memory_in_use_mb, peak_memory_mb, reset_peak_memory, resolve_device
from hpkit.lessons.workspace import resolved_backbone, trained_run, workspace_dir
from hpkit.pipeline.config import Config, dumps, from_dict, override, to_dict

__all__ = ["AblationRow", "TABLE4", "TABLE5", "PAPER_COST_RATIO", "PAPER_CLAIMS", "METRICS", "table4_specs",
           "table5_specs", "sweep_specs", "size_overrides", "run_ablation", "summarize", "compare_claims",
           "markdown_table", "step_cost", "plot_table4", "plot_sweep", "plot_costs"]

#: The metrics of every result row (fractions in [0, 1]).
METRICS = ("cluster_accuracy", "cluster_miou", "linear_accuracy", "linear_miou")

_EVAL = "ablation_eval.json"


@dataclass(frozen=True)
class AblationRow:
    """One row of a paper table: its label, hpkit's overrides, and the paper's numbers (percent)."""

    key: str  # "a" ... "g", or "gradient" / "loss"
    label: str
    overrides: Mapping[str, Any]
    paper: Mapping[str, float]  # e.g. {"cluster_accuracy": 57.2, "cluster_miou": 24.6}
    components: Mapping[str, bool] = field(default_factory=dict)  # Table 4's check marks

    @property
    def name(self) -> str:
        return f"({self.key}) {self.label}" if len(self.key) == 1 else self.label


def _t4(key: str, label: str, overrides: dict, acc: float, miou: float, ta: bool, ts: bool, lhp: bool, sa: bool,
        reg: bool) -> AblationRow:
    return AblationRow(key, label, overrides, {"cluster_accuracy": acc, "cluster_miou": miou},
                       {"TA": ta, "TS": ts, "LHP": lhp, "SA": sa, "Reg": reg})


#: Table 4 (COCO-Stuff, DINO ViT-S/8, unsupervised = cluster probe Acc / mIoU in percent).
TABLE4: dict[str, AblationRow] = {r.key: r for r in [
    _t4("a", "full HP", {}, 57.2, 24.6, True, True, True, True, True),
    _t4("b", "no LHP", {"loss.lhp": False}, 52.5, 23.1, True, True, False, True, True),
    _t4("c", "no TS-GHP", {"loss.task_specific": False}, 55.0, 19.1, True, False, True, True, True),
    _t4("d", "no TS-GHP, no LHP", {"loss.task_specific": False, "loss.lhp": False}, 49.3, 20.1,
        True, False, False, True, True),
    _t4("e", "no symmetric selection", {"loss.symmetric": False}, 54.0, 23.6, True, True, True, False, True),
    _t4("f", "no regulariser", {"loss.regularizer": False}, 55.8, 24.5, True, True, True, True, False),
    _t4("g", "plain contrastive (Eq. 1)", {"loss.plain_contrastive": True}, 37.8, 10.4,
        False, False, False, False, False),
]}

#: Table 5 (COCO-Stuff, DINO ViT-S/16; cluster and linear probe, percent).
TABLE5: dict[str, AblationRow] = {
    "gradient": AblationRow("gradient", "gradient propagation", {"loss.propagation": "gradient"},
                            {"cluster_accuracy": 54.5, "cluster_miou": 24.3, "linear_accuracy": 74.1,
                             "linear_miou": 39.1}),
    "loss": AblationRow("loss", "loss propagation", {"loss.propagation": "loss"},
                        {"cluster_accuracy": 54.7, "cluster_miou": 23.2, "linear_accuracy": 74.3,
                         "linear_miou": 40.5}),
}

#: Section 5.2: loss propagation costs "1.2x memory and 3x time" of gradient propagation.
PAPER_COST_RATIO = {"memory": 1.2, "seconds": 3.0}

Spec = tuple[str, Mapping[str, Any], int]


def table4_specs(seeds: Sequence[int], rows: str | Iterable[str] = "abcdefg") -> list[Spec]:
    """``(name, overrides, seed)`` for the chosen rows of Table 4, every row once per seed."""
    unknown = [r for r in rows if r not in TABLE4]
    if unknown:
        raise ValueError(f"unknown Table 4 rows {unknown}; choose from {''.join(TABLE4)}")
    return [(TABLE4[r].name, dict(TABLE4[r].overrides), s) for r in rows for s in seeds]


def table5_specs(seeds: Sequence[int]) -> list[Spec]:
    """``(name, overrides, seed)`` for gradient and loss propagation, once per seed."""
    return [(row.name, dict(row.overrides), s) for row in TABLE5.values() for s in seeds]


def sweep_specs(key: str, values: Sequence[Any], seeds: Sequence[int]) -> list[Spec]:
    """``(f"{key}={value}", {key: value}, seed)`` for every value and seed (Fig. 6 style sweeps)."""
    return [(f"{key}={v}", {key: v}, s) for v in values for s in seeds]


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def _evaluate(run: Path, max_images: int | None, device: str) -> dict:
    """Cluster and linear probe scores of a run on its validation split (cached in the run folder)."""
    path = run / _EVAL
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("max_images") == max_images:
            return cached
    from hpkit.pipeline.checkpoint import load_run
    from hpkit.pipeline.datasets import build_dataset
    from hpkit.pipeline.evaluate import score

    trained = load_run(run, device)
    m = score(trained.backbone, trained.head, trained.cluster, trained.linear, build_dataset(trained.cfg, "val"),
              kmeans=False, max_images=max_images, device=device, seed=trained.cfg.train.seed)
    out = {"max_images": max_images, "images": m["images"],
           **{f"{k}_{name}": m[k][key] for k in ("cluster", "linear")
              for name, key in (("accuracy", "pixel_accuracy"), ("miou", "mean_iou"))}}
    path.write_text(json.dumps(out))
    return out


def size_overrides(*, steps: int | None = None, num_train: int | None = None, image_size: int | None = None,
                   batch_size: int | None = None, num_val: int | None = None, pool_size: int | None = None
                   ) -> dict[str, Any]:
    """Config overrides for small, quick ablation runs (None leaves the preset's value).

    With ``steps`` and ``num_train`` (synthetic data) the epochs are chosen so that the run is about
    ``steps`` long and the lambda schedule spans it, with a warm-up of ``steps // 4`` and a Q^sp refresh
    every ``steps // 8`` steps. Validation during training and the feature cache are switched off
    (each run is short; :func:`run_ablation` evaluates once at the end).
    """
    out: dict[str, Any] = {"train.val_every": 0, "train.cache_features": False}
    if image_size is not None:
        out["data.image_size"] = out["data.val_size"] = image_size
    if batch_size is not None:
        out["data.batch_size"] = batch_size
    if num_val is not None:
        out["data.num_val"] = num_val
    if pool_size is not None:
        out["loss.pool_size"] = pool_size
    if num_train is not None:
        out["data.num_train"] = num_train
        if pool_size is not None and pool_size > num_train:
            raise ValueError(f"pool_size={pool_size} is larger than num_train={num_train}: the pool holds one "
                             "patch per training image, so lower pool_size or raise num_train")
        if steps is not None:
            if batch_size is None:
                raise ValueError("size_overrides needs batch_size together with steps and num_train")
            per_epoch = num_train // batch_size
            if per_epoch < 1:
                raise ValueError(f"num_train={num_train} is fewer than one batch of {batch_size}")
            out["train.epochs"] = max(1, math.ceil(steps / per_epoch))
            out["loss.warmup"] = steps // 4
            out["loss.renew_interval"] = max(1, steps // 8)
    return out


def run_ablation(base: Config, specs: Iterable[Spec], *, max_steps: int | None = None,
                 max_images: int | None = None, workspace: str | Path | None = None,
                 verbose: bool = True) -> list[dict]:
    """Train (once, cached) and evaluate every ``(name, overrides, seed)`` on top of ``base``.

    Args:
        base: the shared configuration (e.g. :func:`hpkit.lessons.workspace.notebook_config` plus size knobs).
        specs: ``(name, overrides, seed)``; the run is ``override(base, {**overrides, "train.seed": seed})``.
            Specs that resolve to the same configuration share one run (e.g. Table 4 (a) and Fig. 6's
            default value).
        max_steps: training steps per run (passed to :func:`trained_run`; part of its cache key).
        max_images: evaluate on the first images of the validation split (None: all).
        workspace: the workspace folder (default :func:`hpkit.lessons.workspace.workspace_dir`).
        verbose: print one line per run; the backbone notice training prints is shown once.

    Returns:
        one dict per spec: ``name``, ``seed``, ``run`` (folder), ``cached`` (no training was needed),
        ``backbone`` (what ``model.backbone`` resolved to), ``steps``, ``seconds_per_step`` (median of
        ``history.json``'s per-step ``seconds``, the first step left out), the :data:`METRICS` (fractions)
        and ``images`` (validation images scored).
    """
    results, notices = [], []
    device = base.train.device if base.train.device != "auto" else None
    for name, changes, seed in specs:
        cfg = override(base, {**dict(changes), "train.seed": int(seed)})
        dev = device or ("cuda" if _cuda() else "cpu")
        buffer, started = io.StringIO(), time.time()
        try:
            with contextlib.redirect_stderr(buffer):
                run = trained_run(cfg, workspace=workspace, max_steps=max_steps, progress=False)
        except Exception:
            print(buffer.getvalue(), end="", file=sys.stderr)  # what training said before it failed
            raise
        cached = (run / "done.json").stat().st_mtime < started  # finished before this call: nothing trained
        notices += [line for line in buffer.getvalue().splitlines() if line.strip() and line not in notices]
        steps = json.loads((run / "history.json").read_text())["steps"]
        backbone = json.loads((run / "done.json").read_text()).get("backbone", cfg.model.backbone)
        row = {"name": name, "seed": int(seed), "run": str(run), "cached": cached, "backbone": backbone,
               "steps": len(steps),
               "seconds_per_step": _median([s["seconds"] for s in steps[1:]] or [s["seconds"] for s in steps]),
               **_evaluate(run, max_images, dev)}
        row.pop("max_images")
        results.append(row)
        if verbose:
            print(f"{name:34s} seed {seed}: {'cached' if cached else 'trained'}, cluster acc "
                  f"{100 * row['cluster_accuracy']:.1f} %, mIoU {100 * row['cluster_miou']:.1f} %", flush=True)
    for line in notices:
        print(line, file=sys.stderr)
    return results


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def summarize(results: Iterable[Mapping[str, Any]], keys: Sequence[str] = METRICS + ("seconds_per_step",)
              ) -> list[dict]:
    """Mean and spread over seeds per ``name``, in first-seen order.

    Returns:
        one dict per name: ``name``, ``n`` (runs), ``seeds``, and for each key ``k``: ``k`` (mean),
        ``k_std`` (sample standard deviation, ddof = 1; 0 for a single run), ``k_min``, ``k_max``.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["name"], []).append(r)
    out = []
    for name, rows in groups.items():
        entry: dict[str, Any] = {"name": name, "n": len(rows), "seeds": [r["seed"] for r in rows]}
        for k in keys:
            values = [float(r[k]) for r in rows if r.get(k) is not None]
            if not values:
                continue
            entry[k] = statistics.fmean(values)
            entry[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            entry[f"{k}_min"], entry[f"{k}_max"] = min(values), max(values)
        out.append(entry)
    return out


#: Section 5.1's comparisons, (better row, worse row): the paper states them as relative cluster-Acc gains.
PAPER_CLAIMS: tuple[tuple[str, str], ...] = (("b", "d"), ("c", "d"), ("a", "d"), ("a", "e"), ("a", "f"), ("a", "g"))


def compare_claims(summary: Sequence[Mapping[str, Any]], metric: str = "cluster_accuracy") -> list[dict]:
    """Each of the paper's Table 4 comparisons next to ours.

    Returns:
        one dict per claim in :data:`PAPER_CLAIMS` whose rows are both in ``summary``: ``claim`` ("(a) vs
        (d)"), ``paper_gain`` (relative, percent, from the paper's table), ``ours_gain`` (relative, percent,
        of the means), ``difference`` (percentage points of the means), ``spread`` (percentage points,
        sqrt(std_x^2 + std_y^2)) and ``verdict``: ``agrees`` / ``disagrees`` when the difference of the
        means is larger than the spread, else ``within the spread`` (a single seed has no spread: the sign decides).
    """
    by_name = {r["name"]: r for r in summary}
    out = []
    for better, worse in PAPER_CLAIMS:
        x, y = by_name.get(TABLE4[better].name), by_name.get(TABLE4[worse].name)
        if x is None or y is None or metric not in x or metric not in y:
            continue
        px, py = TABLE4[better].paper[metric], TABLE4[worse].paper[metric]
        diff = 100 * (x[metric] - y[metric])
        spread = 100 * math.hypot(x.get(f"{metric}_std", 0.0), y.get(f"{metric}_std", 0.0))
        if abs(diff) <= spread:
            verdict = "within the spread"
        else:
            verdict = "agrees" if (diff > 0) == (px > py) else "disagrees"
        out.append({"claim": f"({better}) vs ({worse})", "paper_gain": 100 * (px / py - 1),
                    "ours_gain": 100 * (x[metric] / y[metric] - 1) if y[metric] else math.nan,
                    "difference": diff, "spread": spread, "verdict": verdict})
    return out


def _cell(row: Mapping[str, Any], key: str, percent: bool, digits: int) -> str:
    if row.get(key) is None:
        return "-"
    if not isinstance(row[key], (int, float)) or isinstance(row[key], bool):
        return str(row[key])
    scale = 100.0 if percent else 1.0
    text = f"{scale * row[key]:.{digits}f}"
    if f"{key}_std" in row and row.get("n", 1) > 1:
        text += f" ± {scale * row[f'{key}_std']:.{digits}f}"
    return text


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Mapping[str, str], *, percent: Iterable[str] = (),
                   digits: int = 1, paper: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """A markdown table of summary rows (``mean ± std`` where a ``_std`` is present and n > 1).

    Args:
        rows: dicts, e.g. from :func:`summarize`.
        columns: ``{key: header}`` in order; ``name`` and ``n`` are plain columns.
        percent: keys shown as percentages (values are fractions).
        paper: ``{name: {key: value}}``; adds a "paper KEY" column (already in percent) for each key
            that any entry has.
    """
    percent = set(percent)
    paper = paper or {}
    paper_keys = [k for k in columns if any(k in p for p in paper.values())]
    header = list(columns.values()) + [f"paper {columns[k]}" for k in paper_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row.get(k, "-")) if k in ("name", "n", "seeds") else _cell(row, k, k in percent, digits)
                 for k in columns]
        p = paper.get(row.get("name", ""), {})
        cells += [f"{p[k]:.1f}" if k in p else "-" for k in paper_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _measure_cost() -> None:
    """Run in a fresh process by :func:`step_cost`: read ``{"config", "steps"}`` from stdin, train, and print
    one ``HPKIT_COST {json}`` line with the per-step seconds and the memory before and at peak (MiB)."""
    from hpkit.pipeline.train import train  # only in the measuring process: importing ablation stays light

    job = json.loads(sys.stdin.read())
    cfg = from_dict(job["config"])
    device = resolve_device(cfg.train.device)
    reset_peak_memory(device)
    before = memory_in_use_mb(device)
    with tempfile.TemporaryDirectory() as out:
        result = train(cfg, out, max_steps=job["steps"], progress=False)
    report = {"seconds": [h["seconds"] for h in result["history"]], "before_mb": before,
              "peak_mb": peak_memory_mb(device), "device": device.type}
    print("HPKIT_COST " + json.dumps(report))




def step_cost(cfg: Config, *, steps: int = 8, workspace: str | Path | None = None, timeout: float = 900) -> dict:
    """Time and peak memory of ``steps`` training steps of ``cfg``, measured in a fresh Python process.

    What is measured:

    - ``seconds_per_step``: median of the per-step ``seconds`` (the first step left out: warm-up);
    - on CUDA, ``memory_mb`` = ``torch.cuda.max_memory_allocated`` during training minus what was
      allocated before (backbone, heads, pools, activations, optimiser states; not the allocator's
      cache), ``memory_kind = "cuda_max_allocated"``;
    - on the CPU, ``memory_mb`` = the kernel's peak resident set during training (VmHWM, reset just
      before) minus the resident set just before (after importing torch): everything training touched,
      backbone, data and patch bank included, ``memory_kind = "cpu_peak_rss_growth"``. A coarse measure:
      the allocator may keep freed memory, and the fixed part dilutes a ratio between two objectives.

    Validation is switched off (``train.val_every=0``). The result is cached as JSON in
    ``<workspace>/costs/`` keyed by the configuration, backbone and ``steps``.
    """
    if steps < 2:
        raise ValueError(f"steps={steps}: need at least 2 (the first step is left out as warm-up)")
    cfg = override(cfg, {"train.val_every": 0})
    text = json.dumps({"config": dumps(cfg), "backbone": resolved_backbone(cfg), "steps": steps}, sort_keys=True)
    path = workspace_dir(workspace) / "costs" / f"{hashlib.sha256(text.encode()).hexdigest()[:10]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", "from hpkit.lessons.ablation import _measure_cost; _measure_cost()"], input=json.dumps({"config": to_dict(cfg),
                          "steps": steps}), capture_output=True, text=True, timeout=timeout, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("HPKIT_COST ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"the cost measurement failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    raw = json.loads(line.split(" ", 1)[1])
    cuda = raw["device"] == "cuda"
    out = {"steps": steps, "seconds_per_step": _median(raw["seconds"][1:]), "memory_mb": raw["peak_mb"] - raw["before_mb"],
           "memory_kind": "cuda_max_allocated" if cuda else "cpu_peak_rss_growth",
           "peak_mb": raw["peak_mb"], "device": raw["device"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return out


def plot_table4(summary: Sequence[Mapping[str, Any]], *, metric: str = "cluster_accuracy",
                title: str | None = None) -> Figure:
    """Two panels: our Table 4 rows (mean, error bar = std, dots = seeds) and the paper's numbers.

    Args:
        summary: :func:`summarize` rows whose names are Table 4 row names (``TABLE4[k].name``).
        metric: ``cluster_accuracy`` or ``cluster_miou`` (the paper reports only these two).
    """
    by_name = {r["name"]: r for r in summary}
    rows = [r for r in TABLE4.values() if r.name in by_name]
    if not rows:
        raise ValueError("no Table 4 rows in the summary: build the specs with table4_specs()")
    label = metric.replace("_", " ").replace("miou", "mIoU")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
    x = np.arange(len(rows))
    means = [100 * by_name[r.name][metric] for r in rows]
    stds = [100 * by_name[r.name].get(f"{metric}_std", 0.0) for r in rows]
    axes[0].bar(x, means, yerr=stds, color="tab:blue", alpha=0.7, capsize=3)
    for i, r in enumerate(rows):
        lo, hi = by_name[r.name].get(f"{metric}_min"), by_name[r.name].get(f"{metric}_max")
        if lo is not None:
            axes[0].plot([i, i], [100 * lo, 100 * hi], "k.", ms=5)
    n = sorted({by_name[r.name]["n"] for r in rows})
    axes[0].set_title(f"ours: mean ± std over {'/'.join(map(str, n))} seeds (dots: min / max)")
    axes[1].bar(x, [r.paper.get(metric, np.nan) for r in rows], color="tab:gray", alpha=0.7)
    axes[1].set_title("paper (COCO-Stuff, DINO ViT-S/8)")
    for ax in axes:
        ax.set_xticks(x, [f"({r.key})" for r in rows])
        ax.set_ylabel(f"{label} (%)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title or f"Table 4 ablation: {label}")
    return fig


def plot_sweep(summary: Sequence[Mapping[str, Any]], key: str, *, metrics: Sequence[str] = ("cluster_accuracy",
               "cluster_miou"), default: Any = None, title: str | None = None, log_x: bool = False) -> Figure:
    """A Fig. 6 style sweep: mean ± std over seeds against the swept value.

    Args:
        summary: :func:`summarize` rows named ``f"{key}={value}"`` (as :func:`sweep_specs` names them).
        default: the value of the base configuration, marked with a dashed line.
    """
    points = sorted((float(r["name"].split("=", 1)[1]), r) for r in summary if r["name"].startswith(f"{key}="))
    if not points:
        raise ValueError(f"no rows named {key}=VALUE in the summary: build the specs with sweep_specs({key!r}, ...)")
    xs = [p[0] for p in points]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    for metric in metrics:
        ys = [100 * p[1][metric] for p in points]
        es = [100 * p[1].get(f"{metric}_std", 0.0) for p in points]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=metric.replace("_", " ").replace("miou", "mIoU"))
    if default is not None:
        ax.axvline(float(default), color="gray", ls="--", lw=1, label=f"base value {default}")
    if log_x:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
    ax.set_xlabel(key)
    ax.set_ylabel("%")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    n = sorted({p[1]["n"] for p in points})
    ax.set_title(title or f"Sweep over {key} (mean ± std, {'/'.join(map(str, n))} seeds)")
    return fig


def plot_costs(ours: Mapping[str, float], paper: Mapping[str, float] = PAPER_COST_RATIO, *,
               title: str = "Loss / gradient propagation cost ratio") -> Figure:
    """Bars of the cost ratios (loss propagation over gradient propagation), ours next to the paper's.

    Args:
        ours: ``{"seconds": ratio, "memory": ratio}``.
    """
    keys = [k for k in ("seconds", "memory") if k in ours or k in paper]
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(5.5, 3.4), layout="constrained")
    ax.bar(x - 0.2, [ours.get(k, np.nan) for k in keys], 0.4, label="ours", color="tab:blue", alpha=0.7)
    ax.bar(x + 0.2, [paper.get(k, np.nan) for k in keys], 0.4, label="paper (COCO, ViT-S/16)", color="tab:gray",
           alpha=0.7)
    ax.axhline(1.0, color="k", lw=1)
    ax.set_xticks(x, ["time per step" if k == "seconds" else "peak memory" for k in keys])
    ax.set_ylabel("loss prop. / gradient prop.")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return fig
