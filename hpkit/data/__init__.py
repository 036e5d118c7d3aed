"""Datasets: the embedded synthetic scenes and folders of your own images (real datasets follow)."""

from .folder import IMAGE_EXTENSIONS, ImageFolder, load_rgb
from .synthetic import CLASS_COLORS, CLASS_NAMES, SyntheticScenes, render_scene

__all__ = ["SyntheticScenes", "render_scene", "CLASS_NAMES", "CLASS_COLORS", "ImageFolder", "load_rgb",
           "IMAGE_EXTENSIONS"]
