"""Your own images: formats, sizes, labels with 255 / out-of-range ids, and bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from hpkit.data import ImageFolder


def write(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_modes_and_sizes_become_rgb_squares(tmp_path):
    write(tmp_path / "img" / "a_rgb.png", np.full((40, 60, 3), 200, np.uint8))
    write(tmp_path / "img" / "b_gray.png", np.full((50, 30), 100, np.uint8))
    write(tmp_path / "img" / "c_rgba.png", np.full((16, 16, 4), 50, np.uint8))  # smaller than the crop
    write(tmp_path / "img" / "sub" / "d_16bit.png", np.full((32, 32), 65535, np.uint16))
    write(tmp_path / "img" / "e.jpg", np.full((33, 45, 3), 10, np.uint8))
    ds = ImageFolder(tmp_path / "img", image_size=24)
    assert len(ds) == 5
    for i in range(5):
        image, label = ds[i]
        assert image.shape == (3, 24, 24) and 0 <= image.min() and image.max() <= 1
        assert (label == -1).all()
    assert ds[0][0].mean().item() == pytest.approx(200 / 255)
    assert ds[1][0][:, 0, 0].tolist() == pytest.approx([100 / 255] * 3)  # gray -> equal channels
    sixteen = [p.name for p in ds.files].index("d_16bit.png")
    assert ds[sixteen][0].mean().item() == pytest.approx(1.0)  # 16-bit white stays white


def test_labels_follow_the_images_and_ignore_255_and_out_of_range(tmp_path):
    write(tmp_path / "img" / "x.png", np.zeros((8, 8, 3), np.uint8))
    lab = np.zeros((8, 8), np.uint8)
    lab[:, 4:] = 2
    lab[0, 0] = 255
    lab[7, 7] = 9
    write(tmp_path / "lab" / "x.png", lab)
    _, label = ImageFolder(tmp_path / "img", labels=tmp_path / "lab", image_size=8, num_classes=3)[0]
    assert label[0, 0] == -1 and label[7, 7] == -1
    assert label[1, 1] == 0 and label[1, 5] == 2 and label.dtype == torch.int64


def test_bad_input_messages(tmp_path):
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
    with pytest.raises(FileNotFoundError, match="no label map"):
        ImageFolder(tmp_path / "img", labels=tmp_path / "labels", image_size=8)
