"""Eq. 2-4 on a hand-built example and against the dense reference (:mod:`hpkit.method.reference`)."""

import math

import torch

from hpkit import criterion, global_hidden_positives, positive_mask
from hpkit.method import reference
from hpkit.method.global_positives import has_positive

S60 = math.sin(math.radians(60))
# Three unit features: 0 at 0 deg, 1 at 60 deg, 2 at 180 deg; pool = one entry at 90 deg.
F3 = torch.tensor([[1.0, 0.0], [0.5, S60], [-1.0, 0.0]])
POOL = torch.tensor([[0.0, 1.0]])


def test_criterion_is_similarity_to_closest_pool_entry():
    # c_i = max_m <q_m, f_i>: <(0,1),(1,0)> = 0, <(0,1),(0.5, .866)> = .866, <(0,1),(-1,0)> = 0
    torch.testing.assert_close(criterion(F3, POOL), torch.tensor([0.0, S60, 0.0]))
    two = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # adding 180 deg makes patch 2 match exactly
    torch.testing.assert_close(criterion(F3, two), torch.tensor([0.0, S60, 1.0]))


def test_symmetric_rule_by_hand():
    # sim(0,1) = 0.5 > c_0 = 0 -> 1 in P_0. For anchor 1: 0.5 < c_1 = .866 but 0.5 > c_0 = 0 (symmetric).
    # sim(0,2) = -1 and sim(1,2) = -0.5 never exceed any criterion. Self is never a positive.
    expected = torch.tensor([[False, True, False], [True, False, False], [False, False, False]])
    assert torch.equal(global_hidden_positives(F3, POOL), expected)


def test_non_symmetric_rule_by_hand():
    # Table 4 (e): only sim(i, j) > c_i counts, so anchor 1 loses its positive.
    expected = torch.tensor([[False, True, False], [False, False, False], [False, False, False]])
    assert torch.equal(global_hidden_positives(F3, POOL, symmetric=False), expected)


def test_same_image_patches_can_be_positives_and_self_is_excluded():
    x = torch.nn.functional.normalize(torch.ones(4, 3), dim=1)  # identical patches, as in one flat region
    pool = torch.nn.functional.normalize(torch.tensor([[1.0, -1.0, 0.0]]), dim=1)
    mask = global_hidden_positives(x, pool)
    assert torch.equal(mask, ~torch.eye(4, dtype=torch.bool))


def test_masks_match_reference_and_blocks_agree(batch):
    for x, pool in ((batch["f"], batch["pool_ag"]), (batch["s_ema"], batch["pool_sp"])):
        torch.testing.assert_close(criterion(x, pool, chunk_size=7), reference.criterion(x, pool))
        for symmetric in (True, False):
            dense = global_hidden_positives(x, pool, symmetric=symmetric)
            assert torch.equal(dense, reference.global_positives(x, pool, symmetric=symmetric))
            c = criterion(x, pool)
            block = positive_mask(x[7:19], x, c[7:19], c, row_offset=7, symmetric=symmetric)
            assert torch.equal(block, dense[7:19])
    assert global_hidden_positives(batch["f"], batch["pool_ag"]).sum() > 0  # the example is not empty


def test_width_mismatch_is_a_clear_error():
    try:
        criterion(torch.ones(2, 3), torch.ones(2, 4))
    except ValueError as err:
        assert "task-agnostic pool" in str(err)
    else:
        raise AssertionError("expected ValueError")


def test_has_positive_equals_any_of_the_full_mask(batch):
    for symmetric in (True, False):
        x = batch["f"]
        near = torch.nn.functional.normalize(x[:30] + 1e-3 * torch.randn(30, x.shape[1], dtype=x.dtype,
                                             generator=torch.Generator().manual_seed(0)), dim=1)
        pool = torch.cat([batch["pool_ag"], near])  # anchors 0-29 have c_i ~ 1: few or no positives
        c = criterion(x, pool)
        expected = global_hidden_positives(x, pool, symmetric=symmetric).any(1)
        assert 0 < int(expected.sum()) < x.shape[0]  # some anchors have positives, some do not
        for chunk, block in ((7, 11), (60, 60), (13, 4)):
            got = has_positive(x, c, symmetric=symmetric, chunk_size=chunk, column_block=block)
            assert torch.equal(got, expected)
