"""The real-dataset loaders on tiny fake copies of their layouts, the five-crop step and the download helper.

No test touches the network: the download tests replace ``urllib.request.urlopen``.
"""

import io
import urllib.error
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from hpkit.data import (DATASETS, FINE_TO_COARSE, Cityscapes27, CocoStuff27, Potsdam3, check_layout, download,
                        five_crop)
from hpkit.data import prepare

H, W = 24, 32  # every fake image: 24 rows, 32 columns -> crops of 12 x 16


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def quadrants(tl, tr, bl, br, h=H, w=W):
    """(h, w) uint8 label map with one id per quadrant."""
    lab = np.empty((h, w), np.uint8)
    lab[:h // 2, :w // 2], lab[:h // 2, w // 2:], lab[h // 2:, :w // 2], lab[h // 2:, w // 2:] = tl, tr, bl, br
    return lab


def picture(seed, h=H, w=W):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def coco(tmp_path):
    """Two train images (fine ids 0 / 255 / 170 / 200 and 1 / 120 / 181 / 105) and one listed val image."""
    root = tmp_path / "cocostuff"
    labels = {"train2017": {"a": quadrants(0, 255, 170, 200), "b": quadrants(1, 120, 181, 105)},
              "val2017": {"v": quadrants(156, 0, 255, 93), "unlisted": quadrants(0, 0, 0, 0)}}
    for folder, items in labels.items():
        for i, (name, lab) in enumerate(items.items()):
            save(root / "images" / folder / f"{name}.jpg", picture(i))
            save(root / "annotations" / folder / f"{name}.png", lab)
    (root / "curated" / "train2017").mkdir(parents=True)
    (root / "curated" / "val2017").mkdir(parents=True)
    (root / "curated" / "train2017" / "Coco164kFull_Stuff_Coarse.txt").write_text("a\nb\n")
    (root / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt").write_text("v\n\n")
    return root


@pytest.fixture
def cityscapes(tmp_path):
    root = tmp_path / "cityscapes"
    items = {"train": {"bonn/bonn_000001_000019": (7, 3, 33, 255), "aachen/aachen_000000_000019": (8, 26, 0, 34)},
             "val": {"lindau/lindau_000000_000019": (7, 24, 11, 6)}}
    for split, files in items.items():
        for i, (stem, ids) in enumerate(files.items()):
            save(root / "leftImg8bit" / split / f"{stem}_leftImg8bit.png", picture(i))
            save(root / "gtFine" / split / f"{stem}_gtFine_labelIds.png", quadrants(*ids))
    return root


def write_potsdam(root):
    """Tiles 7 (uint8 RGBIR), 3 (float in [0, 1]) labelled; tile 9 unlabelled."""
    for folder in ("imgs", "gt"):
        (root / folder).mkdir(parents=True)
    img = np.zeros((H, W, 4), np.uint8)
    img[..., 0], img[..., 3] = 200, 17  # red channel 200, IR ignored
    savemat(root / "imgs" / "7.mat", {"img": img})
    savemat(root / "gt" / "7.mat", {"gt": quadrants(4, 5, 3, 255).astype(np.int32)})
    savemat(root / "imgs" / "3.mat", {"img": np.full((H, W, 3), 0.5)})
    savemat(root / "gt" / "3.mat", {"gt": quadrants(0, 1, 2, 6).astype(np.int32)})
    savemat(root / "imgs" / "9.mat", {"img": np.full((H, W, 4), 9, np.uint8)})
    for name, ids in {"labelled_train.txt": "7\n", "labelled_test.txt": "3\n", "unlabelled_train.txt": "9\n",
                      "all.txt": "7\n3\n9\n"}.items():
        (root / name).write_text(ids)
    return root


def crop_files(base, split="train"):
    return sorted(p for p in base.rglob("*") if p.is_file() and f"/{split}/" in str(p))


# --- COCO-Stuff-27 ---------------------------------------------------------------------------------------------

def test_fine_to_coarse_table():
    assert FINE_TO_COARSE.shape == (256,) and FINE_TO_COARSE.dtype == np.int64
    assert FINE_TO_COARSE[0] == 9 and FINE_TO_COARSE[1] == 11 and FINE_TO_COARSE[170] == 18
    assert FINE_TO_COARSE[255] == -1 and (FINE_TO_COARSE[182:] == -1).all()
    assert sorted(set(FINE_TO_COARSE[:182].tolist())) == list(range(27))  # every fine id mapped, all 27 used
    assert len(set(CocoStuff27.class_names)) == 27 and CocoStuff27.colors.shape == (27, 3)


def test_coco_full_images_map_fine_ids(coco):
    with pytest.warns(UserWarning, match="prepare cocostuff27 --root"):
        train = CocoStuff27(coco, "train", image_size=16)
    assert len(train) == 2 and not train.cropped
    image, label = train.load_full(0)
    assert image.size == (W, H)
    assert label[0, 0] == 9 and label[0, -1] == -1 and label[-1, 0] == 18 and label[-1, -1] == -1
    assert set(np.unique(train.load_full(1)[1])) == {11, 14, 24, 23}
    x, y = train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.shape == (16, 16) and y.dtype == torch.int64 and set(y.unique().tolist()) == {9, -1, 18}
    val = CocoStuff27(coco, "val", image_size=H)  # only the listed image; no warning for val
    assert len(val) == 1
    y = val[0][1]  # shorter side already 24: a pure centre crop of columns 4..27
    assert y[0, 0] == 23 and y[0, -1] == 9 and y[-1, 0] == -1 and y[-1, -1] == 22


def test_five_crop_writes_resumes_and_is_read(coco):
    base = five_crop("cocostuff27", coco, progress=False)
    assert base == coco / "cropped" / "cocostuff27_five_crop_0.5"
    images, labels = sorted((base / "img" / "train").iterdir()), sorted((base / "label" / "train").iterdir())
    assert [p.name for p in images] == sorted(f"{k}.jpg" for k in range(10))
    assert [p.name for p in labels] == sorted(f"{k}.png" for k in range(10))
    for k in range(10):
        assert Image.open(base / "img" / "train" / f"{k}.jpg").size == (W // 2, H // 2)
    lab = [np.asarray(Image.open(base / "label" / "train" / f"{k}.png")) for k in range(5)]
    assert (lab[0] == 10).all() and (lab[1] == 0).all() and (lab[2] == 19).all() and (lab[3] == 0).all()
    assert lab[4][0, 0] == 10 and lab[4][-1, 0] == 19 and lab[4][0, -1] == 0  # centre crop spans all quadrants
    assert np.array_equal(lab[4], quadrants(10, 0, 19, 0)[6:18, 8:24])
    # a second run reads nothing and rewrites nothing; a deleted crop is restored
    stamps = {p: p.stat().st_mtime_ns for p in crop_files(base)}
    five_crop("cocostuff", coco, progress=False, workers=0)
    assert {p: p.stat().st_mtime_ns for p in crop_files(base)} == stamps
    (base / "img" / "train" / "7.jpg").unlink()
    five_crop("cocostuff27", coco, progress=False)
    assert (base / "img" / "train" / "7.jpg").is_file() and not list(base.rglob(".*.part"))
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.name != "7.jpg")
    # the train split now reads the crops, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train = CocoStuff27(coco, "train", image_size=8)
    assert train.cropped and len(train) == 10
    x, y = train[0]
    assert x.shape == (3, 8, 8) and (y == 9).all()
    assert (train[1][1] == -1).all() and (train[2][1] == 18).all()
    assert not CocoStuff27(coco, "train", cropped=False).cropped
    # an interrupted preparation is reported, not silently used
    (base / "label" / "train" / "9.png").unlink()
    (base / "img" / "train" / "9.jpg").unlink()
    with pytest.raises(RuntimeError, match="9 of 10 five-crop"):
        CocoStuff27(coco, "train")


def test_crop_sizes_floor_for_odd_images():
    boxes = prepare.crop_boxes(25, 33)
    assert all((h, w) == (12, 16) for _, _, h, w in boxes)
    assert [(t, l) for t, l, _, _ in boxes] == [(0, 0), (0, 17), (13, 0), (13, 17), (6, 8)]


def test_coco_errors_name_the_path_and_the_fix(coco, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist.*download\('cocostuff27'"):
        CocoStuff27(tmp_path / "nowhere", "val")
    (coco / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"Coco164kFull_Stuff_Coarse_7\.txt not found.*download"):
        CocoStuff27(coco, "val")
    with pytest.raises(FileNotFoundError, match="no five-crop copies.*prepare cocostuff27"):
        CocoStuff27(coco, "train", cropped=True)
    (coco / "annotations" / "train2017" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"annotations/train2017/a\.png not found"):
        CocoStuff27(coco, "train", cropped=False)
    with pytest.raises(ValueError, match="split must be one of"):
        CocoStuff27(coco, "test")


def test_check_layout(coco):
    problems = check_layout("cocostuff27", coco)
    assert len(problems) == 1 and "no five-crop copies" in problems[0] and "prepare cocostuff27" in problems[0]
    assert check_layout("cocostuff27", coco, crops=False) == []
    five_crop("cocostuff27", coco, progress=False)
    assert check_layout("cocostuff27", coco) == []
    (coco / "annotations" / "val2017" / "v.png").rename(coco / "v.png")
    assert any("annotations/val2017/v.png not found" in p for p in check_layout("cocostuff27", coco))
    for p in (coco / "annotations" / "val2017").iterdir():
        p.unlink()
    (coco / "annotations" / "val2017").rmdir()
    problems = check_layout("cocostuff27", coco)
    assert problems[0] == f"missing folder {coco / 'annotations' / 'val2017'}" and "download" in problems[-1]
    assert "does not exist" in check_layout("potsdam3", coco / "nope")[0]
    with pytest.raises(ValueError, match="unknown dataset 'pascal'"):
        check_layout("pascal", coco)


# --- Cityscapes-27 ---------------------------------------------------------------------------------------------

def test_cityscapes_ids_and_crops(cityscapes):
    with pytest.warns(UserWarning, match="prepare cityscapes27"):
        train = Cityscapes27(cityscapes, "train", image_size=12)
    assert [p[0].parent.name for p in train.pairs] == ["aachen", "bonn"]  # sorted by city
    assert len(Cityscapes27.class_names) == 27 and Cityscapes27.colors.shape == (27, 3)
    _, label = train.load_full(1)  # bonn: ids 7 / 3 / 33 / 255
    assert label[0, 0] == 0 and label[0, -1] == -1 and label[-1, 0] == 26 and label[-1, -1] == -1
    assert set(np.unique(train.load_full(0)[1])) == {1, 19, -1}  # ids 8, 26, 0, 34
    x, y = train[1]
    assert x.shape == (3, 12, 12) and y.shape == (12, 12) and set(y.unique().tolist()) == {0, -1, 26}
    val = Cityscapes27(cityscapes, "val")
    assert len(val) == 1 and set(val[0][1].unique().tolist()) == {0, 17, 4, -1}
    base = five_crop("cityscapes27", cityscapes, progress=False)
    assert base.name == "cityscapes_five_crop_0.5" and len(crop_files(base)) == 20
    assert (np.asarray(Image.open(base / "label" / "train" / "5.png")) == 1).all()  # bonn TL: class 0, stored 1
    crops = Cityscapes27(cityscapes, "train", image_size=8)
    assert crops.cropped and len(crops) == 10 and (crops[5][1] == 0).all() and (crops[6][1] == -1).all()
    assert check_layout("cityscapes", cityscapes) == []
    (cityscapes.parent / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/val not found.*download\('cityscapes27'"):
        Cityscapes27(cityscapes.parent / "empty", "val")


# --- Potsdam-3 -------------------------------------------------------------------------------------------------

def test_potsdam(tmp_path):
    root = write_potsdam(tmp_path / "potsdam")
    train = Potsdam3(root, "train", image_size=H)
    assert len(train) == 1 and train.class_names == ["roads and cars", "buildings and clutter",
                                                     "trees and vegetation"]
    image, label = train.load_full(0)
    assert np.asarray(image)[0, 0].tolist() == [200, 0, 0]  # first 3 channels, uint8 as is
    assert label[0, 0] == 0 and label[0, -1] == 1 and label[-1, 0] == 2 and label[-1, -1] == -1
    x, y = train[0]
    assert x.shape == (3, H, H) and x.dtype == torch.float32 and x[0].max() == pytest.approx(200 / 255)
    assert y.dtype == torch.int64 and set(y.unique().tolist()) == {0, 1, 2, -1}
    val = Potsdam3(root, "val", image_size=16)
    image, label = val.load_full(0)
    assert np.asarray(image)[0, 0].tolist() == [128, 128, 128]  # float 0.5 in [0, 1] -> 128
    assert label[0, 0] == 0 and label[0, -1] == 1 and label[-1, 0] == 2 and label[-1, -1] == -1  # 6 -> -1
    everything = Potsdam3(root, "all", image_size=16)
    assert len(everything) == 3 and (everything[2][1] == -1).all()  # tile 9 has no gt
    assert len(Potsdam3(root, "unlabelled_train")) == 1
    with pytest.raises(ValueError, match="needs no five-crop"):
        five_crop("potsdam", root)
    assert check_layout("potsdam3", root) == []
    (root / "gt" / "3.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"gt/3\.mat not found \(listed in labelled_test\.txt\)"):
        Potsdam3(root, "val")[0]
    (root / "labelled_train.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"labelled_train\.txt not found.*download\('potsdam3'"):
        Potsdam3(root, "train")
    assert any("missing file" in p and "labelled_train.txt" in p for p in check_layout("potsdam3", root))
    with pytest.raises(ValueError, match="split must be one of"):
        Potsdam3(root, "test")


# --- download (no network) -------------------------------------------------------------------------------------

class FakeResponse(io.BytesIO):
    def __init__(self, data, status):
        super().__init__(data)
        self.status, self.headers = status, {"Content-Length": str(len(data))}


def potsdam_zip(tmp_path):
    src = write_potsdam(tmp_path / "src" / "potsdam")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(src.rglob("*")):
            zf.write(path, path.relative_to(src.parent).as_posix())  # wrapped in potsdam/
    return buf.getvalue()


def test_download_resumes_with_a_range_request(tmp_path, monkeypatch, capsys):
    data, root = potsdam_zip(tmp_path), tmp_path / "data" / "potsdam"
    root.mkdir(parents=True)
    (root / "potsdam.zip.part").write_bytes(data[:100])
    seen = []

    def fake_urlopen(request, timeout):
        seen.append((request.full_url, request.get_header("Range"), timeout))
        return FakeResponse(data[100:], 206)

    monkeypatch.setattr(prepare.urllib.request, "urlopen", fake_urlopen)
    assert download("potsdam3", root, timeout=5) == root
    assert seen == [(DATASETS["potsdam3"].url, "bytes=100-", 5)]
    assert DATASETS["potsdam3"].url.endswith("/stego-public/pytorch_data/potsdam.zip")
    assert check_layout("potsdam3", root) == [] and not list(root.glob("*.zip*"))
    out = capsys.readouterr().out
    assert "isprs.org" in out and "potsdam3 is ready" in out
    download("potsdam3", root)  # complete: no second request
    assert len(seen) == 1


def test_download_offline_fails_clearly(tmp_path, monkeypatch):
    def offline(request, timeout):
        raise urllib.error.URLError(OSError("Temporary failure in name resolution"))

    monkeypatch.setattr(prepare.urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError, match=r"could not download .*cityscapes\.zip.*name resolution.*resume"):
        download("cityscapes27", tmp_path / "cityscapes")


def test_prepare_command_then_train_and_eval_a_real_preset(coco, tmp_path):
    """`hpkit prepare` + the cocostuff27 preset end to end on the fake layout (10 crops, 1 val image)."""
    from hpkit.__main__ import main
    from hpkit.pipeline.config import get_config
    from hpkit.pipeline.evaluate import evaluate
    from hpkit.pipeline.train import train

    assert main(["prepare", "cocostuff27", "--root", str(coco), "--workers", "0"]) == 0
    assert len(CocoStuff27(coco, "train")) == 10
    cfg = get_config("cocostuff27", [f"data.root={coco}", "model.backbone=random_tiny", "data.image_size=16",
                                     "data.val_size=16", "data.batch_size=5", "data.num_workers=0", "model.dim=8",
                                     "loss.pool_size=10", "train.epochs=1", "train.val_every=0"])
    assert train(cfg, tmp_path / "run", progress=False)["steps"] == 2
    result = evaluate(tmp_path / "run", max_images=1)
    assert len(result["classes"]) == 27 and result["images"] == 1 and len(result["colors"]) == 27
    assert "kmeans_backbone" not in result and "k-means baseline skipped" in result["notes"][0]  # 4 patches < 27
    assert main(["download", "potsdam3", "--root", str(tmp_path / "none"), "--check"]) == 1  # layout problems
