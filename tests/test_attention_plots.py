"""LHP figures: attention maps, the Eq. 7 row, neighbourhood tables and anchors, checked on numbers."""

import math

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from hpkit import local_weights  # noqa: E402
from hpkit.lessons.attention import (anchor_neighbourhood, attention_maps, attention_row, choose_anchors,  # noqa: E402
                                   plot_agreement, plot_attention_heads, plot_gradient_flow,
                                   plot_local_positives, plot_row_threshold)


def test_attention_maps_per_head_and_head_average_by_hand():
    # 1x3 grid, anchor (0, 1); head 1 row [0, log 2, 0], head 2 row [log 2, 0, 0]
    attn = torch.zeros(2, 3, 3)
    attn[0, 1] = torch.tensor([0.0, math.log(2), 0.0])
    attn[1, 1] = torch.tensor([math.log(2), 0.0, 0.0])
    maps = attention_maps(attn, (0, 1), (1, 3))
    assert maps.shape == (3, 1, 3)
    torch.testing.assert_close(maps[0, 0], torch.tensor([0.25, 0.5, 0.25]))
    torch.testing.assert_close(maps[1, 0], torch.tensor([0.5, 0.25, 0.25]))
    r = math.sqrt(2)  # mean logits [log2/2, log2/2, 0] -> [sqrt2, sqrt2, 1] / (2 sqrt2 + 1)
    torch.testing.assert_close(maps[2, 0], torch.tensor([r, r, 1.0]) / (2 * r + 1))
    with pytest.raises(ValueError, match=r"\(heads, P, P\)"):
        attention_maps(attn[None], (0, 1), (1, 3))


@pytest.mark.parametrize("style", ["paper", "official"])
def test_attention_row_selects_what_local_weights_selects(style):
    g = torch.Generator().manual_seed(0)
    attn = torch.randn(1, 3, 20, 20, generator=g) * 2
    weights = local_weights(attn, (4, 5), style=style)
    for y, x in [(0, 0), (1, 2), (3, 4), (2, 0)]:
        t = attention_row(attn[0], (y, x), (4, 5), style=style)
        sigma = 20.0 if style == "paper" else 28.0
        assert t.mean().item() == pytest.approx(sigma / 20)  # the Eq. 7 threshold is sigma / P
        table = anchor_neighbourhood(weights, (0, y, x))
        for k, (dy, dx) in enumerate([(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)]):
            if not (0 <= y + dy < 4 and 0 <= x + dx < 5):
                assert np.isnan(table.flat[k])
                continue
            v = t[(y + dy) * 5 + x + dx]
            kept = bool(v > t.mean()) if style == "paper" else bool(v >= t.mean())
            assert (table.flat[k] > 0) == kept


def test_anchor_neighbourhood_marks_cells_outside_the_grid():
    weights = torch.arange(9, dtype=torch.float32).reshape(1, 9, 1, 1).expand(1, 9, 2, 2).clone()
    table = anchor_neighbourhood(weights, (0, 0, 0))  # top-left corner of a 2x2 grid
    assert np.isnan(table[0]).all() and np.isnan(table[:, 0]).all()
    np.testing.assert_array_equal(table[1:, 1:], [[4, 5], [7, 8]])


def test_choose_anchors_interior_and_boundary():
    labels = torch.zeros(6, 6, dtype=torch.long)
    labels[:, 3:] = 1
    anchors = choose_anchors(labels, seed=0)
    (iy, ix), (by, bx) = anchors["interior"], anchors["boundary"]
    assert 1 <= iy <= 4 and ix in (1, 4)  # all 8 neighbours share the class
    assert 1 <= by <= 4 and bx in (2, 3)  # a neighbour across the x = 2.5 border
    assert choose_anchors(torch.zeros(6, 6, dtype=torch.long)).keys() == {"interior"}


def test_figures_show_the_numbers():
    result = {"above": 0.8, "below": 0.5, "pairs_above": 10, "pairs_below": 30}
    bars = plot_agreement(result).axes[0].patches
    assert [b.get_height() for b in bars] == pytest.approx([80.0, 50.0])
    maps = {"a": torch.tensor([[0.0, 1.0], [0.0, 0.0]]), "b": torch.tensor([[2.0, 1.0], [0.0, 3.0]])}
    fig = plot_gradient_flow(np.zeros((16, 16, 3)), maps, (0, 1))
    assert [ax.get_title().split("\n")[1] for ax in fig.axes[:2]] == ["1 patch(es) get gradient",
                                                                      "3 patch(es) get gradient"]
    attn = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    weights = {"paper": local_weights(attn, (4, 4))}
    fig = plot_local_positives(np.zeros((32, 32, 3)), torch.zeros(4, 4, dtype=torch.long), weights,
                               {"a": (1, 1)}, np.array([[255, 0, 0]], np.uint8))
    texts = [t.get_text() for t in fig.axes[2].texts]
    expected = [f"{v:.3g}" if v > 0 else "-" for v in weights["paper"][0, :, 1, 1].tolist()]
    assert texts == expected
    assert len(plot_attention_heads(np.zeros((32, 32, 3)), attn[0], (1, 1), (4, 4)).axes) >= 5
    assert len(plot_row_threshold(attn[0], (0, 0), (4, 4)).axes) == 3


def test_heads_that_attend_alike_are_drawn_once():
    """Two heads with the same logits correlate exactly (agreement 1): one average panel, said in the
    title; heads with independent random logits are drawn one by one."""
    from hpkit.lessons.attention import SAME_HEADS, head_agreement

    g = torch.Generator().manual_seed(0)
    one = torch.randn(1, 16, 16, generator=g)
    alike = torch.cat([one, one, 2.0 + one])  # a constant shift of the logits leaves the softmax row unchanged
    differ = torch.randn(3, 16, 16, generator=g)
    assert head_agreement(alike, (1, 2), (4, 4)) == pytest.approx(1.0)
    rows = torch.softmax(differ[:, 6], dim=-1).double()  # anchor (1, 2) is row 6 of a 4x4 grid
    assert head_agreement(differ, (1, 2), (4, 4)) == pytest.approx(float(torch.corrcoef(rows).min()))
    assert head_agreement(differ, (1, 2), (4, 4)) < SAME_HEADS
    fig = plot_attention_heads(np.zeros((32, 32, 3)), alike, (1, 2), (4, 4))
    titles = [ax.get_title() for ax in fig.axes]
    assert not any(t.startswith("head ") for t in titles) and "average of the 3 heads (LHP)" in titles
    assert "attend alike" in fig._suptitle.get_text()
    fig = plot_attention_heads(np.zeros((32, 32, 3)), differ, (1, 2), (4, 4))
    assert [t for t in (ax.get_title() for ax in fig.axes) if t.startswith("head ")] == ["head 1", "head 2", "head 3"]
