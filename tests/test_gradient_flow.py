"""Gradient propagation (section 3.4, Fig. 3): which patches one anchor's loss reaches, by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from hpkit import ProjectionHead, SegmentationHead, local_weights
from hpkit.lessons.gradient_flow import anchor_contrastive_loss, anchor_gradient_flow, patch_gradient_norms

C_VEC = torch.tensor([3.0, 4.0], dtype=torch.float64)  # ||c|| = 5


def linear_loss(v: torch.Tensor) -> torch.Tensor:
    """L = <c, v>: dL/dv = c, so every patch's gradient norm is 5 x its total weight in v."""
    return (v.reshape(-1) * C_VEC).sum()


def logits_3x3(anchor: int, row: list[float]) -> torch.Tensor:
    t = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    t[0, 0, anchor] = torch.tensor(row, dtype=torch.float64)
    return t


# Anchor 4 (centre of a 3x3 grid) attends with logit log 6 to itself, log 3 to patch 1 (above), 0 to
# the 7 others: p = 6/16, 3/16, 1/16; the row mean is 1/9, so I^local = {4, 1}.
# paper: sigma = P = 9, divisor |I^local| = 2 -> w_44 = 9 * 6/16 / 2 = 27/16, w_41 = 27/32.
ROW = [0, math.log(3), 0, 0, math.log(6), 0, 0, 0, 0]


def test_without_lhp_only_the_anchor_patch_gets_gradient():
    s = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    norms = patch_gradient_norms(s, (1, 2, 0), linear_loss)
    expected = torch.zeros(2, 3, 3, dtype=torch.float64)
    expected[1, 2, 0] = 5.0
    torch.testing.assert_close(norms, expected)


def test_with_lhp_exactly_the_kept_neighbours_get_gradient_in_proportion_to_their_weights():
    s = torch.randn(1, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights = local_weights(logits_3x3(4, ROW), (3, 3))
    norms = patch_gradient_norms(s, (0, 1, 1), linear_loss, weights=weights, views="mix")[0]
    expected = torch.zeros(3, 3, dtype=torch.float64)
    expected[1, 1] = 5 * 27 / 16  # the anchor itself (kept: its attention is above the mean)
    expected[0, 1] = 5 * 27 / 32  # patch 1, the cell above
    torch.testing.assert_close(norms, expected)
    # Phi + Psi: the anchor gets both its own and its mixed share, the neighbour only the mixed one
    both = patch_gradient_norms(s, (0, 1, 1), linear_loss, weights=weights, views="both")[0]
    expected[1, 1] = 5 * (1 + 27 / 16)
    torch.testing.assert_close(both, expected)


def test_official_style_weights_give_the_official_gradient():
    s = torch.randn(1, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # logit log 4 to itself and to patch 7, 0 elsewhere: no clamping (q10 = 0, q90 = log 4); p = 4/15
    row = [0, 0, 0, 0, math.log(4), 0, 0, math.log(4), 0]
    weights = local_weights(logits_3x3(4, row), (3, 3), style="official")
    norms = patch_gradient_norms(s, (0, 1, 1), linear_loss, weights=weights, views="mix")[0]
    expected = torch.zeros(3, 3, dtype=torch.float64)
    expected[1, 1] = expected[2, 1] = 5 * 28 * (4 / 15) / 9  # sigma 28, divisor |I^surr| = 9
    torch.testing.assert_close(norms, expected)


def test_projection_is_applied_to_the_anchor_vector():
    s = torch.randn(1, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    norms = patch_gradient_norms(s, (0, 0, 0), linear_loss, proj=lambda v: 2 * v)
    assert norms[0, 0, 0].item() == pytest.approx(10.0)
    assert norms.sum().item() == pytest.approx(10.0)


def test_anchor_contrastive_loss_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    anchor = torch.tensor([1.0, 0.0])
    pos = torch.tensor([True, False, False, True])
    neg = torch.tensor([False, True, True, False])
    # logits / tau (tau = 0.5): 2, 0, -2, 1.2; Eq. 5 averages -log softmax over the two positives
    lse = math.log(math.exp(2) + 1 + math.exp(-2) + math.exp(1.2))
    expected = -((2 - lse) + (1.2 - lse)) / 2
    assert anchor_contrastive_loss(anchor, z, pos, neg, 0.5).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="no positive"):
        anchor_contrastive_loss(anchor, z, torch.zeros(4, dtype=torch.bool), neg, 0.5)


def test_anchor_gradient_flow_follows_the_chain_rule():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 8, 4, 5, generator=g)
    attn = torch.randn(2, 2, 20, 20, generator=g) * 2
    torch.manual_seed(0)
    head, proj = SegmentationHead(8, 6), ProjectionHead(6)
    pool = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    flow = anchor_gradient_flow(feats, attn, head, proj, (1, 2, 3), tau=0.5, rho=0.5, pool=pool,
                                generator=torch.Generator().manual_seed(1))
    assert flow.positives > 0 and flow.negatives > 0
    # without LHP: the anchor's patch only
    assert (flow.phi > 0).nonzero().tolist() == [[2, 3]]
    # with LHP: exactly the selected neighbours, ||dPsi/ds_k|| = w_k ||dPsi/ds_mix||
    rows = flow.neighbour_rows()
    assert len(rows) == 9
    for row in rows:
        assert (row["grad_norm"] > 0) == (row["weight"] > 0)
        assert row["grad_norm"] == pytest.approx(row["predicted"], rel=1e-4, abs=1e-9)
    kept = int((flow.weights > 0).sum())
    assert int((flow.psi > 0).sum()) == kept
    assert int((flow.total > 0).sum()) == kept + int(flow.weights[4] == 0)  # + the anchor if not kept
    assert flow.weights.tolist() == local_weights(attn, (4, 5))[1, :, 2, 3].tolist()


def test_errors_say_what_to_do():
    s = torch.zeros(1, 2, 3, 3)
    with pytest.raises(ValueError, match="needs weights"):
        patch_gradient_norms(s, (0, 1, 1), linear_loss, views="mix")
    with pytest.raises(ValueError, match="outside"):
        patch_gradient_norms(s, (0, 3, 0), linear_loss)
    with pytest.raises(ValueError, match="views must be"):
        patch_gradient_norms(s, (0, 0, 0), linear_loss, views="mixed")
