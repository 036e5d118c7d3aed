"""What the notebooks use besides ``hpkit`` itself: figures, the GHP explorer, attention pictures,
comparisons, the ablation runner and the workspace that trains each lesson's run once.

The only layer that imports matplotlib and ipywidgets. Modules, by lesson:

- :mod:`~hpkit.lessons.workspace`: ``notebook_config``, ``trained_run`` (train once, reuse), ``photos_config``
- :mod:`~hpkit.lessons.positives`: GHP statistics (precision, positives per anchor, pools that remember patches)
- :mod:`~hpkit.lessons.explorer`: pictures of the reference pool and the GHP explorer widget (01, 02)
- :mod:`~hpkit.lessons.attention`, :mod:`~hpkit.lessons.gradient_flow`: local hidden positives (03)
- :mod:`~hpkit.lessons.plots`, :mod:`~hpkit.lessons.compare`: training curves, confusion, HP vs k-means (00, 04)
- :mod:`~hpkit.lessons.ablation`: Table 4 / Table 5 runs and their pictures (05)
- :mod:`~hpkit.lessons.diagnostics`: backbone checks (linear probe, k-means, attention agreement, GHP precision)

Names are loaded on first use.
"""

from __future__ import annotations

from hpkit._lazy import lazy_names

_MODULES = ("workspace", "positives", "explorer", "attention", "gradient_flow", "plots", "compare", "ablation",
            "diagnostics", "quickstart")

#: public name -> the module of this package that defines it
_API = {
    **dict.fromkeys(["notebook_config", "trained_run", "cached_run", "photos_config", "workspace_dir", "resolved_backbone",
                     "data_fingerprint"], "workspace"),
    **dict.fromkeys(["plot_history", "plot_confusion", "plot_segmentation", "plot_photo_segmentation",
                     "plot_cluster_gallery", "plot_patch_maps", "colorize", "legend_handles", "default_colors"], "plots"),
    **dict.fromkeys(["example_segmentations", "metrics_table", "format_table", "plot_runs", "KMEANS", "HP",
                     "HP_CRF"], "compare"),
    **dict.fromkeys(["patch_labels", "positive_precision", "positive_stats", "positives_vs_pool_size",
                     "label_base_rate", "find_symmetric_pair", "sample_pool", "PatchPool", "run_positive_diagnostics"],
                    "positives"),
    **dict.fromkeys(["extract", "linear_probe_miou", "kmeans_miou", "attention_agreement", "ghp_precision"],
                    "diagnostics"),
    **dict.fromkeys(["anchor_gradient_flow", "anchor_contrastive_loss", "patch_gradient_norms"], "gradient_flow"),
    "GHPExplorer": "explorer",
}

__all__ = sorted([*_API, *_MODULES])


__getattr__, __dir__ = lazy_names(__name__, globals(), _API, {name: name for name in _MODULES})
