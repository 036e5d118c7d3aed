"""Your own photos: the folder layout, classes, crops, and every bad input named in one line."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpkit.data import ImageFolder, read_classes, scan_folder, write_scene_folder
from hpkit.data.synthetic import CLASS_COLORS, CLASS_NAMES

REPO = Path(__file__).parents[1]


def write(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def labelled_split(root, split, labels, size=(12, 8)):
    """Images of ``size`` (w, h) and their label maps, one per entry of ``labels`` ({stem: id array})."""
    for stem, ids in labels.items():
        write(root / split / "images" / f"{stem}.png", np.full((size[1], size[0], 3), 90, np.uint8))
        write(root / split / "labels" / f"{stem}.png", ids.astype(np.uint8))


def test_flat_folder_modes_and_sizes_become_rgb_squares(tmp_path):
    write(tmp_path / "img" / "a_rgb.png", np.full((40, 60, 3), 200, np.uint8))
    write(tmp_path / "img" / "b_gray.png", np.full((50, 30), 100, np.uint8))
    write(tmp_path / "img" / "c_rgba.png", np.full((16, 16, 4), 50, np.uint8))  # smaller than the crop
    write(tmp_path / "img" / "sub" / "d_16bit.png", np.full((32, 32), 65535, np.uint16))
    write(tmp_path / "img" / "e.jpg", np.full((33, 45, 3), 10, np.uint8))
    write(tmp_path / "img" / "labels" / "a_rgb.png", np.zeros((40, 60), np.uint8))  # never read as an image
    ds = ImageFolder(tmp_path / "img", image_size=24)
    assert len(ds) == 5 and ds.class_names == () and not ds.labelled
    for i in range(5):
        image, label = ds[i]
        assert image.shape == (3, 24, 24) and 0 <= image.min() and image.max() <= 1
        assert (label == -1).all()
    assert ds[0][0].mean().item() == pytest.approx(200 / 255)
    assert ds[1][0][:, 0, 0].tolist() == pytest.approx([100 / 255] * 3)  # gray -> equal channels
    sixteen = [p.name for p in ds.files].index("d_16bit.png")
    assert ds[sixteen][0].mean().item() == pytest.approx(1.0)  # 16-bit white stays white
    assert any("labels is not read" in note for note in ds.notes)


def test_labelled_layout_reads_classes_colours_void_and_whole_images(tmp_path):
    root = write_scene_folder(tmp_path / "ds", num_train=4, num_val=2)
    layout = scan_folder(root)
    assert layout.class_names == CLASS_NAMES and np.array_equal(layout.colors, CLASS_COLORS)
    assert {k: len(v.images) for k, v in layout.splits.items()} == {"train": 4, "val": 2} and not layout.notes
    # At the native size (shorter side 120, longer 160 = 20 patches) nothing is resized: labels are the PNG's.
    val = ImageFolder(root, "val", image_size=120, crop="whole", multiple=8, layout=layout)
    for i, (w, h) in enumerate([(160, 120), (120, 160)]):
        image, label = val[i]
        raw = np.asarray(Image.open(root / "val" / "labels" / f"{i:04d}.png")).astype(np.int64)
        assert image.shape == (3, h, w) and label.shape == (h, w)
        assert np.array_equal(label.numpy(), np.where(raw == 255, -1, raw))
        assert 0 < (label == -1).float().mean() < 0.2  # the boundaries are void
    # Whole image at val_size 64: shorter side 64, longer 160 * 64 / 120 = 85.3 -> 88 (a multiple of 8).
    assert ImageFolder(root, "val", image_size=64, crop="whole", multiple=8, layout=layout)[0][0].shape == (3, 64, 88)


def test_random_crops_are_fixed_per_image_and_seed(tmp_path):
    root = write_scene_folder(tmp_path / "ds", num_train=6, num_val=1, sizes=((160, 120),))
    full = [np.asarray(Image.open(p)).astype(np.float32) / 255 for p in sorted((root / "train/images").iterdir())]
    lefts = {}
    for seed in (0, 1):
        ds = ImageFolder(root, image_size=120, crop="random", seed=seed)
        for i in range(6):
            image = ds[i][0].permute(1, 2, 0).numpy()
            matches = [x for x in range(41) if np.allclose(full[i][:, x:x + 120], image, atol=1e-6)]
            assert len(matches) == 1  # a 120 px window of the 160 px photo
            assert torch.equal(ds[i][0], ImageFolder(root, image_size=120, crop="random", seed=seed)[i][0])
            lefts[seed, i] = matches[0]
    assert len({lefts[0, i] for i in range(6)}) > 1  # images get different offsets
    assert any(lefts[0, i] != lefts[1, i] for i in range(6))  # and another seed other ones


def test_without_classes_file_names_come_from_the_largest_id(tmp_path):
    labelled_split(tmp_path, "train", {"a": np.full((8, 12), 3), "b": np.where(np.eye(8, 12) > 0, 255, 1)})
    layout = scan_folder(tmp_path)
    assert layout.class_names == ("class 0", "class 1", "class 2", "class 3") and layout.colors.shape == (4, 3)
    assert any("no classes.txt" in n and "4 classes" in n for n in layout.notes)
    assert any("no val split" in n for n in layout.notes)
    val = ImageFolder(tmp_path, "val", image_size=8, crop="whole", multiple=4, layout=layout)
    assert val.split_used == "train" and len(val) == 2
    label = val[1][1]
    assert label.shape == (8, 12) and set(label.unique().tolist()) == {-1, 1}


@pytest.mark.parametrize("text, names, colors", [
    ("road\nsky\n\n", ("road", "sky"), None),
    ("road #808080\ntraffic light #FFaa00\n", ("road", "traffic light"), [[128, 128, 128], [255, 170, 0]]),
])
def test_classes_file_lines(tmp_path, text, names, colors):
    (tmp_path / "classes.txt").write_text(text)
    got_names, got_colors = read_classes(tmp_path / "classes.txt")
    assert got_names == names
    assert (got_colors is None) if colors is None else got_colors.tolist() == colors


def _case(root, kind):
    labelled_split(root, "train", {"a": np.zeros((8, 12)), "b": np.ones((8, 12))})
    if kind == "size":
        write(root / "train" / "labels" / "b.png", np.ones((8, 10), np.uint8))
    elif kind == "orphan label":
        write(root / "train" / "labels" / "c.png", np.ones((8, 12), np.uint8))
    elif kind == "missing label":
        write(root / "train" / "images" / "c.jpg", np.zeros((8, 12, 3), np.uint8))
    elif kind == "classes line":
        (root / "classes.txt").write_text("road\nsky #12345\n")
    elif kind == "id above classes":
        (root / "classes.txt").write_text("road\n")
    elif kind == "empty split":
        (root / "val" / "images").mkdir(parents=True)
    elif kind == "colour label":
        write(root / "train" / "labels" / "b.png", np.zeros((8, 12, 3), np.uint8))
    elif kind == "no images folder":
        (root / "val").mkdir()


BAD = {
    "size": "b.png is 10x8 but its image .* is 12x8",
    "orphan label": "1 label map\\(s\\) of train have no image, e.g. .*c.png",
    "missing label": "1 image\\(s\\) of train have no label map, e.g. c",
    "classes line": "classes.txt line 2 'sky #12345' does not parse",
    "id above classes": "b.png has class id 1 but .*classes.txt names 1 classes",
    "empty split": "the val split is empty",
    "colour label": "b.png has mode RGB",
    "no images folder": "has no images/ folder",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_is_one_clear_error(tmp_path, kind):
    _case(tmp_path, kind)
    with pytest.raises(ValueError, match=BAD[kind]):
        scan_folder(tmp_path)


@pytest.mark.parametrize("kind", ["size", "id above classes"])
def test_bad_input_stops_the_cli_before_training(tmp_path, kind):
    _case(tmp_path / "ds", kind)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_text("an earlier run")  # --force must not cost it on bad input
    cmd = [sys.executable, "-m", "hpkit", "train", "--preset", "demo", "--set", "data.dataset=folder", "--set",
           f"data.root={tmp_path / 'ds'}", "--out", str(tmp_path / "run"), "--force"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("hpkit: ") and "hp-tiny" not in line]
    assert len(errors) == 1 and "HP training" not in result.stderr and "reference pool" not in result.stderr
    assert (tmp_path / "run" / "checkpoint.pt").read_text() == "an earlier run"


def test_missing_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(tmp_path / "empty")
    write(tmp_path / "img" / "good.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "img" / "broken.jpg").write_bytes(b"not a jpeg")
    ds = ImageFolder(tmp_path / "img", image_size=8)
    with pytest.raises(OSError, match="broken.jpg"):
        ds[0]  # sorted: broken.jpg comes first
    with pytest.warns(UserWarning, match="skipping unreadable image.*broken.jpg"):
        checked = ImageFolder(tmp_path / "img", image_size=8, verify=True)
    assert len(checked) == 1


def test_fingerprint_notices_replaced_added_and_removed_photos(tmp_path):
    import os

    root = write_scene_folder(tmp_path / "ds", num_train=3, num_val=1)
    first = scan_folder(root).fingerprint()
    assert scan_folder(root).fingerprint() == first  # reading changes nothing
    photo = root / "train" / "images" / "0001.jpg"
    stat = photo.stat()
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # replaced (a newer file)
    second = scan_folder(root).fingerprint()
    (root / "train" / "labels" / "0002.png").unlink()
    (root / "train" / "images" / "0002.jpg").unlink()  # removed, with its label map
    third = scan_folder(root).fingerprint()
    assert len({first, second, third}) == 3


def test_centre_crop_is_the_floor_centre_for_odd_margins(tmp_path):
    """A 163x120 photo at 64 px: the shorter side becomes 64, the longer round(163 * 64 / 120) = 87, so
    23 columns are left and the centre crop starts at 23 // 2 = 11 (rounding 11.5 half-to-even would give 12)."""
    from hpkit.data.transforms import resize_crop

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (120, 163, 3), dtype=np.uint8))
    resized = np.asarray(photo.resize((87, 64), Image.BILINEAR))
    expected = resized[:, 11:75]
    assert np.array_equal(np.asarray(resize_crop(photo, 64, Image.BILINEAR)), expected)
    photo.save(tmp_path / "a.png")
    image, _ = ImageFolder(tmp_path, image_size=64, crop="center")[0]
    assert np.array_equal((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), expected)
