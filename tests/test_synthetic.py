"""The embedded synthetic scenes: deterministic, disjoint splits, all classes, colour alone insufficient."""

import pytest
import torch

from hpkit.data import SyntheticScenes


def test_items_are_images_in_unit_range_with_class_labels():
    ds = SyntheticScenes(num_images=3, image_size=48)
    image, label = ds[1]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert label.shape == (48, 48) and label.dtype == torch.int64
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert 0 <= label.min() and label.max() < len(ds.class_names)
    assert len(ds.class_names) == 9 and ds.colors.shape == (9, 3)


def test_same_seed_same_images_other_seed_or_split_different():
    a = SyntheticScenes(num_images=4, image_size=32, seed=3, cache=False)
    b = SyntheticScenes(num_images=4, image_size=32, seed=3, cache=False)
    for i in range(4):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    other = SyntheticScenes(num_images=4, image_size=32, seed=4)
    val = SyntheticScenes("val", num_images=4, image_size=32, seed=3)
    for i in range(4):
        assert not torch.equal(a[i][0], other[i][0])
        assert all(not torch.equal(a[i][0], val[j][0]) for j in range(4))


def test_every_class_appears_and_images_mix_stuff_and_things():
    ds = SyntheticScenes(num_images=40, image_size=48)
    present = torch.zeros(9, dtype=torch.bool)
    for i in range(len(ds)):
        classes = ds[i][1].unique()
        present[classes] = True
        assert (classes < 5).sum() >= 1 and (classes >= 5).sum() >= 1  # stuff and at least one thing
    assert present.all()


def test_colour_alone_cannot_solve_it():
    """Best per-colour lookup (16^3 colour bins, majority class) fitted on train, scored on val."""
    def pixels(split):
        ds = SyntheticScenes(split, num_images=40, image_size=64)
        x = torch.cat([im.flatten(1).T for im, _ in ds])
        y = torch.cat([lab.flatten() for _, lab in ds])
        q = (x * 15.999).long()
        return q[:, 0] * 256 + q[:, 1] * 16 + q[:, 2], y

    bins, y = pixels("train")
    table = torch.zeros(4096, 9).index_put_((bins, y), torch.ones(len(y)), accumulate=True)
    vbins, vy = pixels("val")
    pred = table.argmax(1)[vbins]
    accuracy = (pred == vy).float().mean().item()
    confusion = torch.zeros(9, 9).index_put_((vy, pred), torch.ones(len(vy)), accumulate=True)
    miou = (confusion.diag() / (confusion.sum(0) + confusion.sum(1) - confusion.diag())).mean().item()
    assert accuracy < 0.6 and miou < 0.4, (accuracy, miou)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        SyntheticScenes("test")
    with pytest.raises(ValueError, match="image_size"):
        SyntheticScenes(image_size=8)
    with pytest.raises(IndexError):
        SyntheticScenes(num_images=2)[2]
