"""Eq. 7-9: attention-selected 3x3 neighbours, hand-computed weights, dense oracles, gradients."""

import math

import pytest
import torch
from dense_reference import official_lhp_dense

from hpkit import local_mix, local_weights, mix_neighbours
from hpkit.method import reference
from hpkit.method.local_positives import attention_scores, neighbour_index, row_quantiles


def logits_3x3(row_for_anchor: dict[int, list[float]]) -> torch.Tensor:
    """(1, 1, 9, 9) logits on a 3x3 grid; unspecified rows are zero."""
    t = torch.zeros(1, 1, 9, 9)
    for i, row in row_for_anchor.items():
        t[0, 0, i] = torch.tensor(row)
    return t


def test_neighbourhood_includes_anchor_and_respects_borders():
    index, valid = neighbour_index(3, 3)
    assert valid.sum(1).tolist() == [4, 6, 4, 6, 9, 6, 4, 6, 4]
    assert index[4].tolist() == list(range(9))  # centre: all 9 cells in row-major order
    assert index[0][valid[0]].tolist() == [0, 1, 3, 4]  # corner: itself, right, below, diagonal


def test_weights_by_hand_centre_anchor():
    # Anchor 4 attends with logit log(4) to itself and to patch 7, logit 0 elsewhere:
    # p = 4/15 for {4, 7}, 1/15 for the 7 others; the row mean is 1/9, so I^local = {4, 7}.
    l4 = math.log(4.0)
    logits = logits_3x3({4: [0, 0, 0, 0, l4, 0, 0, l4, 0]})
    paper = local_weights(logits, (3, 3))[0, :, 1, 1]  # weights of anchor (1, 1) = row 4
    # paper: sigma = P = 9, divisor |I^local| = 2 -> 9 * (4/15) / 2 = 1.2 for k = 4 (self) and k = 7 (below)
    expected = torch.zeros(9)
    expected[4] = expected[7] = 1.2
    torch.testing.assert_close(paper, expected)
    official = local_weights(logits, (3, 3), style="official")[0, :, 1, 1]
    # official: quantiles of [0 x7, l4 x2] are 0 and l4 (no clamping); sigma 28, divisor |I^surr| = 9
    expected[4] = expected[7] = 28 * (4 / 15) / 9
    torch.testing.assert_close(official, expected)


def test_official_quantile_clamp_and_corner_divisor_by_hand():
    # Corner anchor 0 with an outlier logit 10 on its right neighbour (patch 1).
    logits = logits_3x3({0: [0, 10, 0, 0, 0, 0, 0, 0, 0]})
    official = local_weights(logits, (3, 3), style="official")[0, :, 0, 0]
    # q90 of [0 x8, 10] = 0 + 0.2 * 10 = 2 -> the outlier is clamped to 2; p = e^2 / (8 + e^2).
    p_out = math.exp(2) / (8 + math.exp(2))
    expected = torch.zeros(9)
    expected[5] = 28 * p_out / 4  # neighbour k = 5 is (dy, dx) = (0, +1); corner divisor |I^surr| = 4
    torch.testing.assert_close(official, expected)
    paper = local_weights(logits, (3, 3))[0, :, 0, 0]
    expected[5] = 9 * math.exp(10) / (8 + math.exp(10)) / 1  # no clamp; only the outlier is above 1/9
    torch.testing.assert_close(paper, expected)


def test_row_quantiles_match_torch_quantile():
    x = torch.randn(3, 7, 50, generator=torch.Generator().manual_seed(1))
    lo, hi = row_quantiles(x, (0.1, 0.9))
    ref = torch.quantile(x, torch.tensor([0.1, 0.9]), dim=-1)
    torch.testing.assert_close(lo, ref[0])
    torch.testing.assert_close(hi, ref[1])


@pytest.mark.parametrize("h,w", [(4, 5), (6, 6)])
def test_official_mix_equals_dense_official_formulation(h, w):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 8, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    logits = 3 * torch.randn(2, 3, h * w, h * w, generator=g)
    ours = local_mix(s, logits, style="official")
    ref = official_lhp_dense(s, logits)
    # attention weights are float32 in both (as in the official code): float32 tolerance
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    g_out = torch.randn_like(ours)
    (grad_ours,) = torch.autograd.grad(ours, s, g_out)
    (grad_ref,) = torch.autograd.grad(ref, s, g_out)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style,sigma", [("paper", None), ("official", None), ("paper", 2.0), ("official", 50.0)])
@pytest.mark.parametrize("h,w", [(4, 4), (3, 5), (1, 4)])
def test_mix_equals_dense_reference(style, sigma, h, w):
    """9 shifted views (the fast path) against the dense (P, P) product of Eq. 7-9 in hpkit.method.reference."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 5, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    logits = 2 * torch.randn(2, 2, h * w, h * w, generator=g)
    ours = mix_neighbours(s, local_weights(logits, (h, w), sigma=sigma, style=style))
    ref = reference.local_mix(s, logits, sigma=sigma, style=style)
    torch.testing.assert_close(ours, ref)
    g_out = torch.randn_like(ours)
    torch.testing.assert_close(torch.autograd.grad(ours, s, g_out)[0], torch.autograd.grad(ref, s, g_out)[0])


def test_attention_scores_by_hand():
    # Row [0, log 3, 0, 0]: p = [1, 3, 1, 1] / 6, paper sigma = P = 4. Official: sorted [0, 0, 0, log 3], the
    # 10 % quantile is 0 and the 90 % one 0.7 log 3 (position 2.7, linear), so log 3 is clamped to it; sigma 28.
    row = torch.tensor([0.0, math.log(3), 0.0, 0.0])
    torch.testing.assert_close(attention_scores(row), 4 * torch.tensor([1.0, 3.0, 1.0, 1.0]) / 6)
    e = 3 ** 0.7
    torch.testing.assert_close(attention_scores(row, style="official"),
                               28 * torch.tensor([1.0, e, 1.0, 1.0]) / (3 + e))
    torch.testing.assert_close(attention_scores(row, sigma=2.0), 2 * torch.tensor([1.0, 3.0, 1.0, 1.0]) / 6)


def test_gradient_reaches_exactly_the_local_hidden_positives_in_proportion():
    g = torch.Generator().manual_seed(4)
    h, w, d = 5, 5, 6
    s = torch.randn(1, d, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    logits = 3 * torch.randn(1, 2, h * w, h * w, generator=g)
    weights = local_weights(logits, (h, w))
    z_mix = torch.nn.functional.normalize(local_mix(s, logits).flatten(2)[0].T, dim=1)  # (P, D)
    anchor = 2 * w + 2  # centre patch (2, 2)
    loss = -(z_mix[anchor] @ torch.randn(d, generator=g, dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss, s)
    grad = grad[0].flatten(1).T  # (P, D)
    index, valid = neighbour_index(h, w)
    w_anchor = weights[0].flatten(1)[:, anchor]  # (9,)
    selected = {int(index[anchor, k]) for k in range(9) if w_anchor[k] > 0}
    assert 1 <= len(selected) < 9  # the example selects some but not all neighbours
    nonzero = {j for j in range(h * w) if grad[j].abs().sum() > 0}
    assert nonzero == selected
    ref_k = int(w_anchor.argmax())
    ref = grad[index[anchor, ref_k]] / w_anchor[ref_k]
    for k in range(9):  # every selected neighbour gets the same direction scaled by its weight
        if w_anchor[k] > 0:
            torch.testing.assert_close(grad[index[anchor, k]], w_anchor[k].double() * ref)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="grid"):
        local_weights(torch.zeros(1, 1, 9, 9), (4, 4))
    with pytest.raises(ValueError, match="style"):
        local_weights(torch.zeros(1, 1, 9, 9), (3, 3), style="fast")
