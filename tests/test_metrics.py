"""Confusion matrix, Hungarian matching and accuracy / IoU on hand-computed examples."""

import math

import pytest
import torch

from hpkit.pipeline.metrics import confusion_matrix, hungarian_match, segmentation_metrics


def test_confusion_ignores_invalid_labels():
    pred = torch.tensor([0, 1, 1, 2, 0, 1])
    target = torch.tensor([0, 1, -1, 255, 1, 7])  # -1, 255 and 7 (out of range) are ignored
    conf = confusion_matrix(pred, target, n_pred=3, n_classes=2)
    assert conf.tolist() == [[1, 1], [0, 1], [0, 0]]


def test_hungarian_recovers_a_permutation():
    # clusters 0, 1, 2 are classes 2, 0, 1 (with some noise)
    conf = torch.tensor([[1, 0, 9], [8, 2, 0], [0, 7, 1]])
    assert hungarian_match(conf).tolist() == [2, 0, 1]


def test_metrics_by_hand():
    # 2 classes, clusters swapped: cluster 0 ~ class 1, cluster 1 ~ class 0.
    conf = torch.tensor([[1, 6], [3, 0]])  # rows clusters, cols classes
    m = segmentation_metrics(conf)
    assert m["mapping"] == [1, 0]
    # matched: class 1 tp=6, predicted-as-1 = 7, actual 1 = 6 -> IoU 6/7; class 0 tp=3, pred 3, actual 4 -> 3/4
    assert m["pixel_accuracy"] == pytest.approx(9 / 10)
    assert m["iou"] == pytest.approx([3 / 4, 6 / 7])
    assert m["mean_iou"] == pytest.approx((3 / 4 + 6 / 7) / 2)
    assert m["confusion"].tolist() == [[3, 0], [1, 6]]


def test_extra_clusters_count_as_errors_and_absent_classes_are_skipped():
    # 3 clusters, 3 classes; class 2 never occurs and is never predicted after matching.
    conf = torch.tensor([[5, 0, 0], [0, 4, 0], [1, 0, 0]])
    m = segmentation_metrics(conf)
    # cluster 2 is matched to class 2 (its only option); its pixel of class 0 is an error.
    assert m["pixel_accuracy"] == pytest.approx(9 / 10)
    assert m["iou"][0] == pytest.approx(5 / 6) and m["iou"][1] == pytest.approx(1.0)
    assert m["iou"][2] == pytest.approx(0.0)  # predicted (1 pixel) but never true: IoU 0, not skipped
    conf4 = torch.tensor([[5, 0], [0, 4], [1, 0]])  # one extra cluster for 2 classes
    m4 = segmentation_metrics(conf4)
    assert m4["mapping"] == [0, 1, -1] and m4["pixel_accuracy"] == pytest.approx(9 / 10)
    empty = segmentation_metrics(torch.tensor([[3, 0, 0], [0, 2, 0], [0, 0, 0]]), match=False)
    assert math.isnan(empty["iou"][2]) and empty["mean_iou"] == pytest.approx(1.0)


def test_linear_probe_identity_and_errors():
    m = segmentation_metrics(torch.tensor([[2, 1], [0, 3]]), match=False, class_names=["a", "b"])
    assert m["pixel_accuracy"] == pytest.approx(5 / 6) and m["iou_by_class"]["a"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least as many clusters"):
        hungarian_match(torch.ones(2, 3))
    with pytest.raises(ValueError, match="shapes differ"):
        confusion_matrix(torch.zeros(3), torch.zeros(4), 2, 2)
