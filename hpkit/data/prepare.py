"""Getting the real datasets ready: sources, a resumable download, a layout check and the five-crop copies.

- :data:`DATASETS`: for ``cocostuff27``, ``cityscapes27`` and ``potsdam3``, where the data comes from
  (STEGO's pre-packaged zips, which the official HP code downloads too, and the original sources).
- :func:`download`: fetches a pre-packaged zip with ``urllib`` into ``<root>/<name>.zip.part``, resuming
  an interrupted download with an HTTP Range request, renames it, extracts it into ``root`` and checks
  the layout. A stalled or missing connection fails after ``timeout`` seconds with a message.
- :func:`check_layout`: a list of human-readable problems with a dataset folder (empty = ready).
- :func:`five_crop`: the official training copies: the 4 corners and the centre of every image, each
  ``floor(0.5 H) x floor(0.5 W)`` of the original-resolution image and label, numbered
  ``k = 5 * image_index + crop_index`` (top-left, top-right, bottom-left, bottom-right, centre), images
  as JPEG (Pillow's default quality 75, like the official script), labels as PNG storing class + 1
  (0 = ignore). Every file is written under a temporary name and renamed, files already present are
  skipped, so an interrupted run resumes and a second run changes nothing.
"""

from __future__ import annotations

import http.client
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from hpkit.data.cityscapes import Cityscapes27
from hpkit.data.cocostuff import CocoStuff27
from hpkit.data.potsdam import Potsdam3
from hpkit.data.transforms import CROP_RATIO, count_crops, crop_dirs, fix_hint

__all__ = ["DatasetInfo", "DATASETS", "dataset_info", "five_crop", "crop_boxes", "check_layout", "download"]

STEGO_URL = "https://marhamilresearch4.blob.core.windows.net/stego-public/pytorch_data/{}.zip"


@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset comes from and what its folder must hold.

    ``required``: paths relative to the dataset folder that must exist; ``top_level``: the entries of
    the folder itself (used to tell whether a zip wraps everything in one extra folder).
    """

    name: str
    loader: type
    archive: str
    url: str
    crop_folder: str | None
    splits: tuple[str, ...]
    required: tuple[str, ...]
    top_level: tuple[str, ...]
    sources: tuple[str, ...]


DATASETS: dict[str, DatasetInfo] = {
    "cocostuff27": DatasetInfo(
        "cocostuff27", CocoStuff27, "cocostuff", STEGO_URL.format("cocostuff"), CocoStuff27.crop_folder,
        ("train", "val"),
        ("images/train2017", "images/val2017", "annotations/train2017", "annotations/val2017",
         "curated/train2017/Coco164kFull_Stuff_Coarse.txt", "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt"),
        ("images", "annotations", "curated", "cropped"),
        ("STEGO's pre-packaged copy (images, fine annotations, curated lists): " + STEGO_URL.format("cocostuff"),
         "COCO 2017 images (train2017.zip, val2017.zip): https://cocodataset.org/#download",
         "COCO-Stuff pixel maps (stuffthingmaps_trainval2017.zip): https://github.com/nightrome/cocostuff",
         "curated image lists (curated/*/Coco164kFull_Stuff_Coarse*.txt): https://github.com/xu-ji/IIC "
         "(datasets folder)")),
    "cityscapes27": DatasetInfo(
        "cityscapes27", Cityscapes27, "cityscapes", STEGO_URL.format("cityscapes"), Cityscapes27.crop_folder,
        ("train", "val"),
        ("leftImg8bit/train", "leftImg8bit/val", "gtFine/train", "gtFine/val"),
        ("leftImg8bit", "gtFine", "cropped"),
        ("STEGO's pre-packaged copy: " + STEGO_URL.format("cityscapes"),
         "official (free account and login needed): https://www.cityscapes-dataset.com/downloads/ "
         "(leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip)")),
    "potsdam3": DatasetInfo(
        "potsdam3", Potsdam3, "potsdam", STEGO_URL.format("potsdam"), None,
        ("train", "val"),
        ("imgs", "gt", "labelled_train.txt", "labelled_test.txt"),
        ("imgs", "gt", "labelled_train.txt", "labelled_test.txt", "unlabelled_train.txt", "all.txt"),
        ("STEGO's pre-packaged copy (IIC's 200 px tiles as .mat files): " + STEGO_URL.format("potsdam"),
         "original orthophotos and labels: ISPRS 2D Semantic Labeling Potsdam, "
         "https://www.isprs.org/education/benchmarks/UrbanSemLab/2d-sem-label-potsdam.aspx",
         "tiling script (6000 px tiles -> 15 x 15 tiles of 200 px, split lists): https://github.com/xu-ji/IIC")),
}

_ALIASES = {"cocostuff": "cocostuff27", "coco": "cocostuff27", "cityscapes": "cityscapes27", "potsdam": "potsdam3"}


def dataset_info(dataset: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``dataset`` (also accepts ``cocostuff``, ``cityscapes``, ``potsdam``)."""
    key = _ALIASES.get(str(dataset).lower(), str(dataset).lower())
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[key]


def crop_boxes(height: int, width: int, ratio: float = CROP_RATIO) -> list[tuple[int, int, int, int]]:
    """The five crops ``(top, left, crop_h, crop_w)``: TL, TR, BL, BR, centre (torchvision's five_crop order)."""
    ch, cw = int(height * ratio), int(width * ratio)
    if ch < 1 or cw < 1:
        raise ValueError(f"a {width}x{height} image is too small for {ratio} crops")
    centre = (int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0)))
    corners = [(0, 0), (0, width - cw), (height - ch, 0), (height - ch, width - cw), centre]
    return [(top, left, ch, cw) for top, left in corners]


def _save_atomic(img: Image.Image, path: Path, fmt: str) -> None:
    tmp = path.with_name(f".{path.name}.part")
    img.save(tmp, format=fmt)
    os.replace(tmp, path)


def five_crop(dataset: str, root: str | Path, split: str = "train", *, progress: bool = True,
              workers: int = 4) -> Path:
    """Write the five-crop copies of ``split`` below ``<root>/cropped/<name>_five_crop_0.5``; returns that folder.

    Resumable and idempotent: images whose five crops are already on disk are not read again.
    ``workers`` threads read and write images in parallel (0 or 1: in this thread).
    """
    info = dataset_info(dataset)
    if info.crop_folder is None:
        raise ValueError(f"{info.name} needs no five-crop copies: the official code trains on its tiles as they "
                         f"are; use {info.loader.__name__}(root) directly")
    ds = info.loader(root, split, cropped=False)
    img_dir, label_dir = crop_dirs(ds.root, info.crop_folder, split)
    for folder in (img_dir, label_dir):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".*.part"):  # left by an interrupted run
            stale.unlink()

    def crop_one(i: int) -> None:
        files = [(label_dir / f"{k}.png", img_dir / f"{k}.jpg") for k in range(5 * i, 5 * i + 5)]
        if all(path.is_file() for pair in files for path in pair):
            return
        image, label = ds.load_full(i)
        pixels, stored = np.asarray(image), (label + 1).astype(np.uint8)  # -1 (ignore) -> 0
        for (label_path, image_path), (top, left, ch, cw) in zip(files, crop_boxes(*label.shape)):
            for array, path, fmt in ((stored, label_path, "PNG"), (pixels, image_path, "JPEG")):
                if not path.is_file():
                    _save_atomic(Image.fromarray(array[top:top + ch, left:left + cw]), path, fmt)

    bar = tqdm(total=len(ds), desc=f"five-crop {info.name} {split}", unit="img", disable=not progress)
    with bar:
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                for _ in pool.map(crop_one, range(len(ds))):
                    bar.update()
        else:
            for i in range(len(ds)):
                crop_one(i)
                bar.update()
    count_crops(img_dir, label_dir, "delete the folder and prepare again")  # raises if something is inconsistent
    return img_dir.parent.parent


def check_layout(dataset: str, root: str | Path, *, crops: bool = True) -> list[str]:
    """Problems with the folder of ``dataset`` as readable sentences; an empty list means it is ready.

    Checks the required folders and split lists, that the first item of every split is there and,
    with ``crops`` (COCO-Stuff, Cityscapes), that the five-crop training copies are complete.
    """
    info = dataset_info(dataset)
    root = Path(root)
    if not root.is_dir():
        return [f"dataset folder {root} does not exist; {fix_hint(info.name, root)}"]
    problems = [f"missing {'folder' if '.' not in Path(rel).name else 'file'} {root / rel}"
                for rel in info.required if not (root / rel).exists()]
    if problems:
        return problems + [f"to fix: {fix_hint(info.name, root)}"]
    opened = {}
    for split in info.splits:
        try:
            opened[split] = (info.loader(root, split) if info.crop_folder is None
                             else info.loader(root, split, cropped=False))
        except (OSError, ValueError, RuntimeError) as err:
            problems.append(str(err))
    if crops and info.crop_folder is not None and "train" in opened:
        try:
            info.loader(root, "train", cropped=True)
        except (OSError, RuntimeError) as err:
            problems.append(f"{err} (until then training uses the full images)")
    return problems


def _fetch(url: str, dest: Path, timeout: float) -> None:
    """Download ``url`` to ``dest`` via ``dest.part``, resuming a partial file with a Range request."""
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    total = None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            if have and resp.status != 206:  # the server ignored the range: start again
                have = 0
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length else None
            with open(part, "ab" if have else "wb") as out, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                                 desc=dest.name) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        if not (err.code == 416 and have):  # 416 after a full .part: nothing left to fetch
            raise ConnectionError(f"downloading {url} failed: HTTP {err.code} {err.reason}; check the address, or "
                                  f"fetch the file another way (sources above) and save it as {dest}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        size = part.stat().st_size if part.is_file() else 0
        kept = f"{size} bytes are kept in {part}; " if size else ""
        raise ConnectionError(
            f"could not download {url} ({reason}): offline, blocked, or no data for {timeout:g} s. {kept}run "
            f"download again to resume, or fetch the file another way and save it as {dest}") from None
    size = part.stat().st_size
    if total is not None and size < total:
        raise ConnectionError(f"download of {url} stopped at {size} of {total} bytes; run download again to resume")
    os.replace(part, dest)


def _extract(archive: Path, root: Path, top_level: tuple[str, ...]) -> None:
    """Extract ``archive`` into ``root``, dropping one wrapping folder; files already complete are skipped.

    Each member's CRC-32 is checked as it is read, so a damaged download is caught here.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise OSError(f"{archive} is not a complete zip file; delete it and run download again") from None
    with zf:
        members = [m for m in zf.infolist() if not m.filename.startswith("__MACOSX")]
        firsts = {m.filename.split("/", 1)[0] for m in members}
        prefix = f"{firsts.pop()}/" if len(firsts) == 1 and not firsts & set(top_level) else ""
        base = root.resolve()
        for member in tqdm(members, desc=f"extract {archive.name}", unit="file"):
            rel = member.filename[len(prefix):] if member.filename.startswith(prefix) else member.filename
            target = (root / rel).resolve()
            if not rel or target == base:
                continue
            if base not in target.parents:
                raise ValueError(f"{archive} contains {member.filename!r}, which points outside {root}; not extracting")
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if target.is_file() and target.stat().st_size == member.file_size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            try:
                with zf.open(member) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)  # checks the member's CRC
            except zipfile.BadZipFile as err:
                raise OSError(f"{archive} is damaged ({err}); delete it and run download again") from None
            os.replace(tmp, target)


def download(dataset: str, root: str | Path, *, url: str | None = None, timeout: float = 30.0,
             keep_zip: bool = False) -> Path:
    """Download and extract ``dataset`` into ``root`` (the dataset folder itself); returns ``root``.

    Prints the sources, skips the download when the folder is already complete, resumes a partial
    ``<root>/<name>.zip.part``, extracts (dropping a wrapping ``<name>/`` folder), deletes the zip
    unless ``keep_zip`` and prints what :func:`check_layout` still finds (e.g. the five-crop step).
    Raises ConnectionError with instructions when offline or when the server stalls for ``timeout`` s.
    """
    info = dataset_info(dataset)
    root = Path(root)
    url = url or info.url
    print(f"{info.name} sources:\n  " + "\n  ".join(info.sources))
    if not check_layout(info.name, root, crops=False):
        print(f"{root} already holds {info.name}; nothing to download")
    else:
        root.mkdir(parents=True, exist_ok=True)
        archive = root / f"{info.archive}.zip"
        if not archive.is_file():
            print(f"downloading {url} -> {archive}")
            _fetch(url, archive, timeout)
        _extract(archive, root, info.top_level)
        if not keep_zip:
            archive.unlink()
    problems = check_layout(info.name, root)
    print("\n".join(["still to do:", *(f"  - {p}" for p in problems)]) if problems else f"{root}: {info.name} is ready")
    return root
