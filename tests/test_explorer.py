"""hpkit.lessons.explorer: GHP statistics against hand-computed values, and the explorer's state on tiny data."""

import math

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

import hpkit  # noqa: E402
from hpkit.lessons import explorer as hx  # noqa: E402
from hpkit.data.synthetic import SyntheticScenes  # noqa: E402


def angles(*degrees):
    """2-d unit vectors at the given angles (float64)."""
    r = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([r.cos(), r.sin()], dim=1)


def test_positive_precision_by_hand():
    labels = torch.tensor([0, 0, 1, -1, 1])
    mask = torch.tensor([[0, 1, 1, 1, 0],   # anchor 0: positives labelled 0, 1 (and one ignored) -> 1/2
                         [1, 0, 1, 0, 1],   # anchor labelled 1: positives 0, 1, 1 -> 2/3
                         [0, 0, 0, 0, 0],   # no positive -> nan
                         [1, 1, 0, 0, 0]], dtype=torch.bool)  # ignored anchor -> nan
    out = hx.positive_precision(mask, torch.tensor([0, 1, 0, -1]), labels)
    assert out[0].item() == pytest.approx(0.5)
    assert out[1].item() == pytest.approx(2 / 3)
    assert math.isnan(out[2].item()) and math.isnan(out[3].item())
    with pytest.raises(ValueError, match="mask must be"):
        hx.positive_precision(mask[:, :4], torch.tensor([0, 1, 0, -1]), labels)


def test_label_base_rate():
    # valid labels 0, 0, 1: ordered pairs (i != j) = 6, same label = 2
    assert hx.label_base_rate(torch.tensor([0, 0, 1, -1])) == pytest.approx(1 / 3)
    assert math.isnan(hx.label_base_rate(torch.tensor([2, -1])))


# Anchors at 0, 10, 60 and 90 degrees (labels 0, 0, 1, 1); the pool grows 200 -> +5 -> +75 degrees.
ANCHORS, LABELS, BANK = angles(0, 10, 60, 90), torch.tensor([0, 0, 1, 1]), angles(200, 5, 75)


def test_positives_vs_pool_size_by_hand():
    cos = lambda d: math.cos(math.radians(d))  # noqa: E731
    non = hx.positives_vs_pool_size(ANCHORS, BANK, [1, 2, 3], LABELS, symmetric=False)
    sym = hx.positives_vs_pool_size(ANCHORS, BANK, [1, 2, 3], LABELS, symmetric=True)
    assert non["size"] == [1, 2, 3]
    # M=1: every criterion is negative, all pairs have sim >= 0 -> 3 positives each, 1 of 3 correct
    # M=2: c = cos5, cos5, cos55, cos85 -> 60 keeps {10, 90}, 90 keeps {10, 60}; 0 and 10 keep nothing
    # M=3: c = cos5, cos5, cos15, cos15 -> nothing passes
    assert non["criterion"] == pytest.approx([(cos(200) + cos(190) + cos(140) + cos(110)) / 4,
                                              (2 * cos(5) + cos(55) + cos(85)) / 4,
                                              (2 * cos(5) + 2 * cos(15)) / 4])
    assert non["positives_per_anchor"] == pytest.approx([3.0, 1.0, 0.0])
    assert non["precision"][:2] == pytest.approx([1 / 3, 1 / 2]) and math.isnan(non["precision"][2])
    assert non["with_positive"] == pytest.approx([1.0, 0.5, 0.0])
    # symmetric at M=2: pairs {10,60} (0.643 > c_60), {10,90} (0.174 > c_90), {60,90} -> 6 memberships, 2 correct
    assert sym["positives_per_anchor"] == pytest.approx([3.0, 1.5, 0.0])
    assert sym["precision"][:2] == pytest.approx([1 / 3, 1 / 3])
    assert sym["anchor_precision"][1] == pytest.approx((0 / 2 + 1 / 2 + 1 / 2) / 3)
    with pytest.raises(ValueError, match="exceeds"):
        hx.positives_vs_pool_size(ANCHORS, BANK, [4], LABELS)


def test_symmetric_pairs_by_hand():
    c = hpkit.criterion(ANCHORS, torch.nn.functional.normalize(BANK[:2], dim=1))
    pairs = {tuple(p) for p in hx.symmetric_only_pairs(ANCHORS, c).tolist()}
    assert pairs == {(1, 2), (1, 3)}  # anchor 10 degrees rejects 60 and 90; their own criteria accept it
    pair = hx.find_symmetric_pair(ANCHORS, c, LABELS)
    assert (pair["i"], pair["j"]) == (1, 3)  # largest margin: 0.174 - cos85 > 0.643 - cos55
    assert pair["same_label"] is False
    assert pair["sim"] == pytest.approx(math.cos(math.radians(80)))
    assert hx.find_symmetric_pair(ANCHORS, torch.full((4,), -2.0, dtype=torch.float64)) is None


def test_positive_stats_matches_dense_mask():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(23, 5, generator=g), dim=1)
    pool = torch.nn.functional.normalize(torch.randn(4, 5, generator=g), dim=1)
    labels = torch.randint(-1, 3, (23,), generator=g)
    c = hpkit.criterion(x, pool)
    for symmetric in (True, False):
        dense = hpkit.global_hidden_positives(x, pool, symmetric=symmetric)
        stats = hx.positive_stats(x, c, labels, symmetric=symmetric, chunk_size=7)
        assert torch.equal(stats["count"], dense.sum(1))
        valid = labels >= 0
        prec = hx.positive_precision(dense, labels, labels)
        keep = valid & (stats["counted"] > 0)
        assert torch.allclose(stats["correct"][keep] / stats["counted"][keep], prec[keep].float())


def test_locate_patches_and_crop():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 4, 2, 3, generator=g)
    pos = torch.tensor([5, 0, 2])
    rows = feats.flatten(2)[torch.arange(3), :, pos]
    assert torch.equal(hx.locate_patches(feats, rows), pos)
    image = torch.arange(3 * 16 * 16, dtype=torch.float32).reshape(3, 16, 16) / (3 * 256)
    crop = hx.patch_crop(image, 1, 1, 8, context=2)
    assert crop.shape == (12, 12, 3)
    assert np.allclose(crop[2:10, 2:10], image[:, 8:16, 8:16].permute(1, 2, 0).numpy())
    assert np.all(crop[10:, :] == 0.5) and np.all(crop[:, 10:] == 0.5)  # outside the image


def test_load_run_restores_the_momentum_head(tiny_run):
    """S' comes back from the checkpoint: the same weights, the same output as a head built by hand."""
    run = hpkit.load_run(tiny_run)
    saved = run.state["ema"]
    assert run.ema is not None and not run.ema.training
    for name, value in run.ema.state_dict().items():
        assert torch.equal(value, saved[name]), name
    by_hand = hpkit.MomentumHead(hpkit.SegmentationHead(run.backbone.embed_dim, run.cfg.model.dim), 0.0)
    by_hand.load_state_dict(saved)
    f = torch.randn(2, run.backbone.embed_dim, 3, 3)
    assert torch.allclose(run.ema(f), by_hand.eval()(f))
    assert not torch.allclose(run.ema(f), run.head(f))  # S' is not S: the EMA lags the head


@pytest.fixture(scope="module")
def explorer():
    data = SyntheticScenes("val", num_images=4, image_size=32, seed=0)
    vit = hpkit.load_backbone("random_tiny")
    pool = hx.sample_pool(vit, data, 4, generator=torch.Generator().manual_seed(0), context=4)
    batch = hx.batch_features(vit, data, 3)
    torch.manual_seed(0)
    ema = hpkit.MomentumHead(hpkit.SegmentationHead(vit.embed_dim, 8), 0.99)
    return hx.GHPExplorer(batch["images"], batch["labels"], batch["feats"], pool, ema_head=ema,
                          class_names=data.class_names, colors=data.colors)


def test_sample_pool_is_one_patch_per_image(explorer):
    pool = explorer.pool
    assert pool.bank.shape == (4, 192) and pool.crops.shape == (4, 16, 16, 3) and pool.grid == (4, 4)
    assert torch.allclose(pool.agnostic.norm(dim=1), torch.ones(4))
    assert ((pool.position >= 0) & (pool.position < 16)).all()


def test_explorer_state_follows_the_anchor(explorer):
    res = explorer.select(1, (2, 3))
    assert explorer.row == 1 * 16 + 2 * 4 + 3
    s = explorer.sets["task-agnostic"]
    mask = hpkit.positive_mask(s["x"][27:28], s["x"], s["c"][27:28], s["c"], row_offset=27)[0]
    assert res["task-agnostic"]["count"] == int(mask.sum())
    assert torch.equal(res["task-agnostic"]["mask"], mask)
    assert set(res) == {"task-agnostic", "task-specific"}
    # every anchor: find one whose displayed state differs from anchor (0, 0) of image 0
    first = explorer.select(0, (0, 0))
    text0 = explorer.status_text
    other = next((b, (y, x)) for b in range(3) for y in range(4) for x in range(4)
                 if explorer.anchor_result(b, (y, x))["task-agnostic"]["count"] != first["task-agnostic"]["count"])
    explorer.select(*other)
    assert explorer.status_text != text0 and (explorer.image_index, explorer.anchor) == other
    with pytest.raises(ValueError, match="patch grid"):
        explorer.select(0, (4, 0))


def test_explorer_widget(explorer):
    pytest.importorskip("ipywidgets")
    box = explorer.widget(draw=False)
    w = explorer._widgets
    assert "hp-anchor-row" in w["row"]._dom_classes and "hp-status" in w["status"]._dom_classes
    assert w["row"].description == "anchor row" and w["col"].description == "anchor col"
    explorer.select(0, (0, 0))
    before = w["status"].value
    w["image"].value = 2          # as a user moving the sliders
    w["row"].value = 3
    assert explorer.image_index == 2 and explorer.anchor == (3, 0)
    assert w["status"].value == explorer.status_text != before
    explorer.select(1, (1, 2))    # code moves the sliders too
    assert (w["image"].value, w["row"].value, w["col"].value) == (1, 1, 2)
    w["draw"] = True
    explorer.select(0, (1, 1))
    assert w["figure"].value[:2] == b"\xff\xd8"  # a JPEG of the figure
    assert box.children


def test_summary_and_figures(explorer):
    summary = explorer.summary()
    assert set(summary) == {"task-agnostic", "task-specific"}
    assert 0 <= summary["task-agnostic"]["precision"] <= 1
    anchors = explorer.example_anchors(2, seed=0)
    assert len(anchors) >= 1
    for fig in (explorer.figure(*anchors[0]), hx.plot_pool_patches(explorer.pool, count=4),
                hx.plot_set_summary(summary, chance=0.3)):
        assert fig.axes
        matplotlib.pyplot.close(fig)


def test_a_click_on_the_picture_chooses_the_anchor(explorer):
    """The picker is PICKER_SIZE px wide over a 4x4 patch grid (80 px per patch): a click at pixel
    (x=250, y=90) lies in column 250 // 80 = 3, row 90 // 80 = 1. The picture boxes the new anchor."""
    from io import BytesIO

    from PIL import Image

    pytest.importorskip("ipyevents")
    explorer.widget(draw=False)
    w = explorer._widgets
    assert hx.PICKER_SIZE == 320 and explorer.grid == (4, 4)
    assert explorer._clicks is not None and explorer._clicks.watched_events == ["click"]
    explorer.select(0, (0, 0))
    before = w["pick"].value
    explorer.click({"type": "click", "dataX": 250.0, "dataY": 90.0})  # what ipyevents sends on a click
    assert explorer.anchor == (1, 3) and (w["row"].value, w["col"].value) == (1, 3)
    assert w["status"].value == explorer.status_text and w["pick"].value != before
    picture = np.asarray(Image.open(BytesIO(w["pick"].value)).convert("RGB")).astype(int)
    assert picture.shape == (320, 320, 3)
    assert (picture[81, 240:320] == [255, 230, 0]).all(axis=1).sum() > 60  # the yellow box's top edge, row 1
    assert explorer.anchor_at(0, 0, 320, 320) == (0, 0) and explorer.anchor_at(319.9, 319.9, 320, 320) == (3, 3)
    assert explorer.anchor_at(400, -5, 320, 320) == (0, 3)  # outside the picture: the nearest patch
    explorer.click({"type": "click"})  # an event without coordinates changes nothing
    assert explorer.anchor == (1, 3)


def test_run_positive_diagnostics_match_a_recomputation(tiny_run):
    """Every figure recomputed another way: the positive sets with hpkit.reference, the neighbours by loops."""
    from hpkit.lessons import run_positive_diagnostics
    from hpkit.method import reference as ref

    got = run_positive_diagnostics(tiny_run, max_images=3)
    run = hpkit.load_run(tiny_run)
    data = hpkit.build_dataset(run.cfg, "val")
    images = torch.stack([data[i][0] for i in range(3)])
    labels = torch.stack([data[i][1] for i in range(3)])
    feats, attn = run.backbone(images, attention=True)
    h, w = feats.shape[-2:]
    lab = hx.patch_labels(labels, (h, w))
    flat = lab.reshape(-1)
    for name, x, pool in (("ag", feats, run.pools.agnostic), ("sp", run.ema(feats), run.pools.specific)):
        mask = ref.global_positives(torch.nn.functional.normalize(hpkit.to_rows(x), dim=1), pool,
                                    symmetric=run.cfg.loss.symmetric)
        rows = []
        for i in range(len(flat)):  # unlabelled patches (-1) count neither as anchors nor as positives
            theirs = flat[mask[i] & (flat >= 0)]
            if flat[i] >= 0 and len(theirs):
                rows.append((theirs == flat[i]).double().mean())
        assert got[f"{name}_precision"] == pytest.approx(float(torch.stack(rows).mean()), abs=1e-6)
        assert got[f"{name}_positives"] == pytest.approx(float(mask.sum(1).double().mean()), abs=1e-6)
    weights = hpkit.local_weights(attn, (h, w), sigma=run.cfg.loss.sigma, style=run.cfg.loss.style)
    kept_same = kept = all_same = every = 0
    for b in range(3):
        for y in range(h):
            for x in range(w):
                for k, (dy, dx) in enumerate((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                    if (dy, dx) == (0, 0) or not (0 <= y + dy < h and 0 <= x + dx < w) or lab[b, y, x] < 0 \
                            or lab[b, y + dy, x + dx] < 0:
                        continue
                    same = int(lab[b, y + dy, x + dx] == lab[b, y, x])
                    every, all_same = every + 1, all_same + same
                    if weights[b, k, y, x] > 0:
                        kept, kept_same = kept + 1, kept_same + same
    assert got["neighbour_base_rate"] == pytest.approx(all_same / every)
    assert got["lhp_precision"] == pytest.approx(kept_same / kept)
    assert 0 < got["label_base_rate"] < 1
