"""Datasets: the embedded synthetic scenes (more loaders follow with the pipeline milestone)."""

from .synthetic import CLASS_COLORS, CLASS_NAMES, SyntheticScenes, render_scene

__all__ = ["SyntheticScenes", "render_scene", "CLASS_NAMES", "CLASS_COLORS"]
