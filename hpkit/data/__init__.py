"""Datasets: synthetic scenes, your own image folders and the three benchmarks of the paper.

Every dataset yields ``(image (3, S, S) float32 in [0, 1], label (S, S) int64, -1 = ignore)`` and has
``class_names`` and ``colors`` ((n, 3) uint8).

- :class:`SyntheticScenes`: deterministic offline scenes with exact labels (tests, lessons).
- :class:`ImageFolder`, :func:`scan_folder`: a folder of your photos (``train/`` and ``val/`` splits,
  label maps and ``classes.txt`` optional), checked before use; :func:`write_scene_folder` writes
  synthetic scenes in that layout.
- :class:`CocoStuff27`, :class:`Cityscapes27`, :class:`Potsdam3`: the official layouts (see each
  module's docstring); COCO-Stuff and Cityscapes train on five-crop copies made by :func:`five_crop`.
- :func:`download`, :func:`check_layout`, :data:`DATASETS`: sources, a resumable download and a check
  that a dataset folder is complete.
"""

from hpkit.data.cityscapes import CITYSCAPES_CLASS_NAMES, CITYSCAPES_COLORS, Cityscapes27
from hpkit.data.cocostuff import COCO_CLASS_NAMES, COCO_COLORS, FINE_TO_COARSE, CocoStuff27
from hpkit.data.folder import IMAGE_EXTENSIONS, FolderLayout, ImageFolder, load_rgb, read_classes, scan_folder
from hpkit.data.potsdam import POTSDAM_CLASS_NAMES, POTSDAM_COLORS, Potsdam3
from hpkit.data.prepare import DATASETS, DatasetInfo, check_layout, dataset_info, download, five_crop
from hpkit.data.samples import sample_photo_paths, write_sample_photos
from hpkit.data.synthetic import CLASS_COLORS, CLASS_NAMES, SyntheticScenes, render_scene, write_scene_folder

__all__ = ["SyntheticScenes", "render_scene", "write_scene_folder", "scan_folder", "write_sample_photos", "sample_photo_paths", "FolderLayout", "read_classes", "CLASS_NAMES", "CLASS_COLORS", "ImageFolder", "load_rgb",
           "IMAGE_EXTENSIONS", "CocoStuff27", "FINE_TO_COARSE", "COCO_CLASS_NAMES", "COCO_COLORS", "Cityscapes27",
           "CITYSCAPES_CLASS_NAMES", "CITYSCAPES_COLORS", "Potsdam3", "POTSDAM_CLASS_NAMES", "POTSDAM_COLORS",
           "five_crop", "check_layout", "download", "DATASETS", "DatasetInfo", "dataset_info"]
