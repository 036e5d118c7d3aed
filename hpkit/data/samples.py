"""Real photos that installed packages ship, as a folder: the offline stand-in for your own photos.

scikit-learn ships two (``china.jpg``, ``flower.jpg``), matplotlib one (``grace_hopper.jpg``) and
scikit-image a handful (``astronaut``, ``chelsea``, ``coffee``, ``rocket``, ``motorcycle_left``,
``motorcycle_right``). :func:`write_sample_photos` copies the ones whose package is installed into a
flat folder (no labels), so every command of the real-photo path can run without a download.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

__all__ = ["SAMPLE_PHOTOS", "sample_photo_paths", "write_sample_photos"]

#: (package, path inside the installed package) of each sample photo, in a fixed order
SAMPLE_PHOTOS: tuple[tuple[str, str], ...] = (
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/motorcycle_left.png"),
)


def sample_photo_paths() -> list[Path]:
    """The sample photos present on this machine (packages not installed are skipped)."""
    found = []
    for package, relative in SAMPLE_PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(list(spec.submodule_search_locations)[0]) / relative
        if path.is_file():
            found.append(path)
    return found


def write_sample_photos(root: str | Path, *, limit: int | None = None) -> list[Path]:
    """Copy the sample photos into ``root`` (created) and return the copies' paths.

    Raises:
        FileNotFoundError: none of scikit-learn, matplotlib or scikit-image ships its photos here.
    """
    paths = sample_photo_paths()[:limit]
    if not paths:
        raise FileNotFoundError("no sample photos found: install scikit-learn or scikit-image "
                                "(pip install -e '.[dev]' does), or use a folder of your own photos")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copyfile(path, root / path.name)) for path in paths]
