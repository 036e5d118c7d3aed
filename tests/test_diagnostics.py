"""Backbone diagnostics on inputs whose answers are known by construction."""

import pytest
import torch

from hpkit.lessons.diagnostics import attention_agreement, ghp_precision, kmeans_miou, linear_probe_miou, patch_labels


def test_patch_labels_take_the_centre_pixel():
    labels = torch.arange(16).reshape(1, 4, 4)
    assert patch_labels(labels, (2, 2)).tolist() == [[[5, 7], [13, 15]]]


def test_attention_agreement_by_hand():
    # 2 x 2 grid: every patch's 8-neighbourhood holds the other 3 patches. Classes: [[0, 0], [1, 1]].
    labels = torch.tensor([[[0, 0], [1, 1]]])
    logits = torch.zeros(1, 1, 4, 4)
    logits[0, 0, 0, 1] = 5.0  # patch 0 attends to patch 1 (same class): above its row mean
    logits[0, 0, 2, 0] = 5.0  # patch 2 attends to patch 0 (other class): above
    # patches 1 and 3 attend uniformly: nothing is above their mean (all equal), everything below
    result = attention_agreement(logits, labels)
    # above: (0 -> 1 same), (2 -> 0 different) -> 1/2. below: 0 -> {2, 3} both different; 2 -> {1 diff, 3 same};
    # 1 -> {0 same, 2 diff, 3 diff}; 3 -> {0 diff, 1 diff, 2 same} -> 3 same of 10
    assert result["pairs_above"] == 2 and result["pairs_below"] == 10
    assert result["above"] == pytest.approx(0.5) and result["below"] == pytest.approx(0.3)


def test_probes_on_separable_features_are_perfect():
    # features = one-hot class of the centre pixel (plus a constant), 2 classes on a 2 x 2 grid
    labels = torch.tensor([[[0, 0, 1, 1]] * 4, [[1, 1, 0, 0]] * 4])  # (2, 4, 4) -> patch grid 2 x 2
    grid = patch_labels(labels, (2, 2))
    feats = torch.stack([(grid == 0).float(), (grid == 1).float(), torch.ones_like(grid, dtype=torch.float)], 1)
    data = {"feats": feats, "labels": labels}
    assert linear_probe_miou(data, data, 2)["mean_iou"] == pytest.approx(1.0)
    assert kmeans_miou(data, 2)["pixel_accuracy"] == pytest.approx(1.0)


def test_ghp_precision_matches_an_explicit_count():
    # Independent count of Eq. 2-3: c_i = max cosine to the pool; j is a positive of i (j != i) when
    # cos(i, j) > c_i or cos(i, j) > c_j; precision = positives of the anchor's class / all positives.
    g = torch.Generator().manual_seed(4)
    pool_feats = torch.randn(6, 5, 3, 3, generator=g)
    val_feats = torch.randn(2, 5, 3, 4, generator=g)
    labels = torch.randint(0, 3, (2, 3, 4), generator=g)
    labels[0, 0, 0] = -1  # unlabelled anchors and positives are not counted
    got = ghp_precision(pool_feats, val_feats, labels, seed=7)
    pick = torch.randint(0, 9, (6,), generator=torch.Generator().manual_seed(7))
    pool = [torch.nn.functional.normalize(pool_feats[m].flatten(1)[:, int(pick[m])], dim=0) for m in range(6)]
    x = torch.nn.functional.normalize(val_feats.flatten(2).transpose(1, 2).reshape(-1, 5), dim=1)
    y = labels.reshape(-1)
    c = [max(float(x[i] @ p) for p in pool) for i in range(len(x))]
    right = total = 0
    for i in range(len(x)):
        for j in range(len(x)):
            s = float(x[i] @ x[j])
            if i != j and (s > c[i] or s > c[j]) and y[i] >= 0 and y[j] >= 0:
                total += 1
                right += int(y[i] == y[j])
    assert total > 10 and got == pytest.approx(right / total, abs=1e-6)
