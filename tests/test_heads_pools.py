"""Heads (S, Z, S') and reference pools (Q^ag, Q^sp) with hand-checked EMA and pointwise refresh."""

import pytest
import torch

from hpkit import (MomentumHead, ProjectionHead, ReferencePools, SegmentationHead, collect_patch_bank,
                   from_rows, sample_patches, to_rows)


def test_segmentation_head_is_linear_plus_mlp_and_pointwise():
    torch.manual_seed(0)
    head = SegmentationHead(6, 4)
    f = torch.randn(2, 6, 3, 5)
    s = head(f)
    assert s.shape == (2, 4, 3, 5)
    # s = L f + W2 relu(W1 f + b1) + b2 at every patch, written out with matrices.
    lin, (c1, _, c2) = head.linear, head.nonlinear
    rows = to_rows(f)
    expected = rows @ lin.weight[:, :, 0, 0].T + lin.bias + \
        torch.relu(rows @ c1.weight[:, :, 0, 0].T + c1.bias) @ c2.weight[:, :, 0, 0].T + c2.bias
    torch.testing.assert_close(to_rows(s), expected)
    torch.testing.assert_close(head.rows(rows), expected)


def test_rows_round_trip_is_image_major():
    x = torch.arange(2 * 3 * 2 * 2).float().reshape(2, 3, 2, 2)
    rows = to_rows(x)
    assert rows[1 * 4 + 1 * 2 + 0].tolist() == x[1, :, 1, 0].tolist()  # row b*P + y*w + x
    assert torch.equal(from_rows(rows, 2, 2, 2), x)


def test_projection_is_unit_norm():
    z = ProjectionHead(4)(torch.randn(10, 4))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(10))


def test_momentum_head_follows_the_ema_rule():
    torch.manual_seed(0)
    head = SegmentationHead(3, 2)
    ema = MomentumHead(head, momentum=0.9)
    assert not any(p.requires_grad for p in ema.parameters())
    start = head.linear.weight.detach().clone()
    ema.update(head)  # first update: theta' = 0.9 theta + 0.1 theta = theta
    torch.testing.assert_close(ema.module.linear.weight, start)
    with torch.no_grad():
        head.linear.weight.add_(1.0)
    ema.update(head)  # theta' = 0.9 * start + 0.1 * (start + 1) = start + 0.1
    torch.testing.assert_close(ema.module.linear.weight, start + 0.1)
    f = torch.randn(1, 3, 2, 2, requires_grad=True)
    assert not ema(f).requires_grad


def test_sample_patches_one_distinct_patch_per_image():
    feats = torch.arange(2 * 1 * 3 * 3).float().reshape(2, 1, 3, 3)  # value = b*9 + patch
    rows = sample_patches(feats, per_image=3, generator=torch.Generator().manual_seed(0))
    values = rows.flatten().tolist()
    assert all(0 <= v < 9 for v in values[:3]) and all(9 <= v < 18 for v in values[3:])
    assert len(set(values)) == 6


def test_specific_pool_refresh_equals_momentum_head_on_the_image_patches():
    """Refreshing from cached backbone rows gives exactly S'(f) at those patches (no backbone pass)."""
    torch.manual_seed(0)
    feats = torch.randn(8, 6, 4, 4)
    bank = sample_patches(feats, generator=torch.Generator().manual_seed(1))  # (8, 6)
    pools = ReferencePools(bank, size=5, generator=torch.Generator().manual_seed(2))
    assert pools.agnostic.shape == (5, 6)
    torch.testing.assert_close(pools.agnostic.norm(dim=1), torch.ones(5))
    head = SegmentationHead(6, 3)
    ema = MomentumHead(head, 0.99)
    new = pools.refresh_specific(ema, generator=torch.Generator().manual_seed(3))
    idx = torch.randperm(8, generator=torch.Generator().manual_seed(3))[:5]
    full_maps = ema(feats)  # run the momentum head on the full feature maps ...
    per_image = to_rows(full_maps).reshape(8, 16, 3)
    # ... and pick the patch each bank row came from: the pointwise head makes both routes equal.
    patch_of = [int((to_rows(feats).reshape(8, 16, 6)[b] == bank[b]).all(1).nonzero()) for b in range(8)]
    expected = torch.nn.functional.normalize(torch.stack([per_image[b, patch_of[b]] for b in idx.tolist()]), dim=1)
    torch.testing.assert_close(new, expected)
    restored = ReferencePools.from_state_dict(pools.state_dict())
    assert torch.equal(restored.specific, pools.specific) and restored.size == 5


def test_pool_larger_than_bank_is_a_clear_error():
    with pytest.raises(ValueError, match="pool size M=10 is larger than the 4 patches"):
        ReferencePools(torch.randn(4, 3), size=10)


def test_collect_patch_bank_counts_images_and_reports_shortage():
    class Backbone:
        def __call__(self, images, attention=True):
            return (images[:, :, ::8, ::8].repeat(1, 2, 1, 1), None)  # (B, 6, h, w) fake features

    batches = [(torch.rand(4, 3, 16, 16), torch.zeros(4)) for _ in range(3)]
    bank = collect_patch_bank(Backbone(), batches, 10, generator=torch.Generator().manual_seed(0))
    assert bank.shape == (10, 6)
    with pytest.raises(ValueError, match="only 12 images available but the reference pool needs 20"):
        collect_patch_bank(Backbone(), batches, 20)
