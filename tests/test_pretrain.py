"""DINO pretraining: the loss, center, EMA and schedules by hand; tiny runs that write atomically,
resume exactly (also after Ctrl-C), stop on NaN; the exported backbone loads as ``random_tiny``."""

import hashlib
import json
import math
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

import hpkit.backbones.pretrain
from hpkit import BACKBONES, FrozenViT, load_backbone
from hpkit.backbones.pretrain import (CHECKPOINT, MultiCrop, PretrainConfig, PretrainingDiverged, build_vit, correspondence,
                            cosine_schedule, dense_dino_loss, dense_vicreg_loss, dino_loss, ema_update, export_backbone,
                            neighbour_points, pretrain, region_contrast_loss, region_ids, region_masks,
                            similarity_keep_loss, teacher_temperature, update_center, vicreg_terms)

# 8 scenes of 32 px, 2 steps per epoch, 2 epochs: covers the frozen last layer (epoch 0), warm-ups and an epoch change.
TINY = dict(num_images=8, image_size=32, global_crop_size=32, local_crop_size=16, num_local_crops=2, depth=2,
            embed_dim=48, num_heads=3, out_dim=64, hidden_dim=32, bottleneck_dim=16, batch_size=4, epochs=2,
            warmup_epochs=1, warmup_teacher_temp_epochs=1, checkpoint_every=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def losses(result):
    return [h["loss"] for h in result["history"]]


def load(path):
    return torch.load(path, weights_only=True)


def test_dino_loss_matches_hand_computation():
    # Closed form: teacher softmax([ln 3, 0]) = (3/4, 1/4); the same student -> CE = H(3/4, 1/4).
    tt, ts = 0.04, 0.1
    teacher = torch.tensor([[tt * math.log(3), 0.0]] * 2)  # 2 global crops, B = 1, K = 2
    student = torch.tensor([[ts * math.log(3), 0.0]] * 3)  # 2 global + 1 local crop
    zero = torch.zeros(1, 2)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert dino_loss(student, teacher, zero, ts, tt).item() == pytest.approx(entropy, abs=1e-6)
    # Centering with the teacher's own logits makes it uniform: CE = -(ln(3/4) + ln(1/4)) / 2.
    center = torch.tensor([[tt * math.log(3), 0.0]])
    assert dino_loss(student, teacher, center, ts, tt).item() == pytest.approx(
        -(math.log(0.75) + math.log(0.25)) / 2, abs=1e-6)

    # General case against plain torch ops: B = 2, K = 5, 2 global + 2 local crops.
    g = torch.Generator().manual_seed(0)
    b, k, n_crops = 2, 5, 4
    s_out, t_out = torch.randn(n_crops * b, k, generator=g), torch.randn(2 * b, k, generator=g)
    center = torch.randn(1, k, generator=g)
    pairs = []
    for i in range(2):
        t = torch.exp((t_out[i * b:(i + 1) * b] - center) / tt)
        t = t / t.sum(dim=1, keepdim=True)
        for v in range(n_crops):
            if v != i:
                s = s_out[v * b:(v + 1) * b] / ts
                log_p = s - torch.log(torch.exp(s).sum(dim=1, keepdim=True))
                pairs.append((-(t * log_p).sum(dim=1)).mean())
    expected = torch.stack(pairs).mean()
    assert len(pairs) == 6
    torch.testing.assert_close(dino_loss(s_out, t_out, center, ts, tt), expected, atol=1e-6, rtol=1e-6)


def test_center_ema_and_schedules():
    new = update_center(torch.zeros(1, 2), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 0.9)
    torch.testing.assert_close(new, torch.tensor([[0.2, 0.3]]))

    torch.manual_seed(0)
    teacher, student = nn.Linear(3, 2), nn.Linear(3, 2)
    expected = [0.9 * t.detach().clone() + 0.1 * s.detach() for t, s in zip(teacher.parameters(), student.parameters())]
    ema_update(teacher, student, 0.9)
    for t, e in zip(teacher.parameters(), expected):
        torch.testing.assert_close(t.detach(), e)

    assert cosine_schedule(0, 100, 1e-3, 1e-6, warmup=10) == 0.0
    assert cosine_schedule(5, 100, 1e-3, 1e-6, warmup=10) == pytest.approx(5e-4)
    assert cosine_schedule(10, 100, 1e-3, 1e-6, warmup=10) == pytest.approx(1e-3)
    assert cosine_schedule(100, 100, 1e-3, 1e-6, warmup=10) == pytest.approx(1e-6)
    assert cosine_schedule(0, 100, 0.996, 1.0) == 0.996 and cosine_schedule(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    cfg = PretrainConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2)
    temps = [teacher_temperature(s, 10, cfg) for s in (0, 10, 20, 30)]
    assert temps == pytest.approx([0.04, 0.055, 0.07, 0.07])


def test_defaults_are_random_tiny_and_crops_are_valid():
    cfg = PretrainConfig()
    assert cfg.matches_random_tiny
    vit = build_vit(cfg)
    assert vit.pos_embed.shape == (1, 1 + 28 * 28, 192)
    assert sum(p.numel() for p in vit.parameters()) < 3_000_000
    with pytest.raises(ValueError, match="multiple of patch_size"):
        PretrainConfig(local_crop_size=50)

    images = torch.rand(3, 3, 64, 64)
    crop = MultiCrop(cfg)
    crops = crop(images, torch.Generator().manual_seed(1))
    assert [tuple(c.shape) for c in crops] == [(3, 3, 96, 96)] * 2 + [(3, 3, 48, 48)] * 4
    assert all(c.min() >= 0 and c.max() <= 1 for c in crops)
    again = crop(images, torch.Generator().manual_seed(1))
    other = crop(images, torch.Generator().manual_seed(2))
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    assert not torch.equal(crops[0], other[0])


def test_correspondence_by_hand_and_on_real_crops():
    # Student = left half of the image, teacher = the whole image flipped: 2 x 2 student patches.
    points, inside = correspondence(torch.tensor([[0.0, 0.0, 1.0, 0.5, 0.0]]),
                                    torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]]), 2)
    # Student patch centres at x = 0.125, 0.375 of the image -> flipped teacher x = 0.875, 0.625 -> 0.75, 0.25.
    assert torch.allclose(points[0, 0], torch.tensor([[0.75, -0.5], [0.25, -0.5]]))
    assert torch.allclose(points[0, 1], torch.tensor([[0.75, 0.5], [0.25, 0.5]]))
    assert inside.all()
    # A student box sticking out of the teacher box: only the overlapping half is inside.
    _, inside = correspondence(torch.tensor([[0.0, 0.5, 0.5, 0.5, 0.0]]), torch.tensor([[0.0, 0.0, 0.5, 0.75, 0.0]]), 4)
    assert inside[0].tolist() == [[True, True, False, False]] * 4

    # Real crops (no photometric change): sampling the teacher crop at the student's pixel centres
    # reproduces the student crop wherever they overlap.
    cfg = PretrainConfig(jitter_p=0, grayscale_p=0, blur_p=(0, 0, 0), solarize_p=0)
    image = torch.nn.functional.interpolate(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
                                            size=64, mode="bilinear")
    crops, boxes = MultiCrop(cfg)(image, torch.Generator().manual_seed(3), boxes=True)
    assert boxes.shape == (6, 2, 5) and all(torch.equal(a, b) for a, b in
                                            zip(crops, MultiCrop(cfg)(image, torch.Generator().manual_seed(3))))
    points, inside = correspondence(boxes[2], boxes[0], 48)
    sampled = torch.nn.functional.grid_sample(crops[0], points, mode="bilinear", align_corners=False)
    assert inside.float().mean() > 0.3
    assert (sampled - crops[2]).abs().mean(1)[inside].mean() < 0.01 < (crops[0][:, :, :48, :48] - crops[2]).abs().mean()


def test_dense_dino_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(1, 2, 2, 5, generator=g) for _ in range(2)]
    teacher = [torch.randn(1, 2, 2, 5, generator=g) for _ in range(2)]
    center = torch.randn(1, 5, generator=g)
    # Crop 0 = the whole image; crop 1 = its left 60 % (flipped): the centres of crop 1's patches lie
    # at image x = 0.45 and 0.15 -> column 0 of crop 0; crop 0's centres at x = 0.25 (crop 1 x = 0.42,
    # flipped 0.58 -> column 1) and 0.75 (outside crop 1).
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0, 0.0]], [[0.0, 0.0, 1.0, 0.6, 1.0]]])
    loss = dense_dino_loss(student, teacher, boxes, center, 0.1, 0.04)

    def ce(t, s):
        return -(torch.softmax((t - center[0]) / 0.04, -1) * torch.log_softmax(s / 0.1, -1)).sum()
    # teacher 0 -> student 1: all 4 student patches inside, each maps to (i, 0) of teacher 0.
    a = sum(ce(teacher[0][0, i, 0], student[1][0, i, j]) for i in range(2) for j in range(2)) / 4
    # teacher 1 -> student 0: student patches (i, 0) map to teacher 1 column 1; (i, 1) are outside.
    b = sum(ce(teacher[1][0, i, 1], student[0][0, i, 0]) for i in range(2)) / 2
    assert torch.allclose(loss, (a + b) / 2, atol=1e-5)


def test_vicreg_terms_match_hand_computation():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 2.0], [1.0, 1.0]])
    inv, var, cov = vicreg_terms(a, b)
    # Mean squared difference: (0 + 1 + 0 + 0 + 4 + 0) / 6.
    assert inv.item() == pytest.approx(5 / 6)
    # Unbiased variances: a (7/3, 1), b (1/3, 1/3); relu(1 - sqrt(v + 1e-4)) per dimension, mean per tensor.
    hinge = [max(0.0, 1 - math.sqrt(v + 1e-4)) for v in (7 / 3, 1.0, 1 / 3, 1 / 3)]
    assert var.item() == pytest.approx((hinge[0] + hinge[1]) / 2 + (hinge[2] + hinge[3]) / 2, abs=1e-6)
    # Covariances: a: sum((x - 4/3)(y - 1)) / 2 = -1/2; b: sum((x - 2/3)(y - 4/3)) / 2 = -1/3.
    # Each tensor adds its 2 off-diagonal entries squared, divided by D = 2.
    assert cov.item() == pytest.approx(2 * (1 / 4) / 2 + 2 * (1 / 9) / 2, abs=1e-6)


def test_neighbour_points_stay_in_the_ring():
    points = torch.zeros(2, 4, 4, 2)  # every point at the crop centre; the crop has 4 patches a side
    moved, inside = neighbour_points(points, 4, (1.0, 3.0), torch.Generator().manual_seed(0))
    dist = moved.norm(dim=-1) * 4 / 2  # grid_sample units -> patches
    assert dist.min() >= 1 - 1e-5 and dist.max() <= 3 + 1e-5
    assert torch.equal(inside, (moved.abs() < 1).all(-1)) and 0 < inside.float().mean() < 1
    same, _ = neighbour_points(points, 4, (0.0, 0.0), torch.Generator().manual_seed(0))
    assert torch.equal(same, points)


def test_dense_vicreg_loss_matches_an_explicit_pairing():
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(2, 3, 3, 4, generator=g) for _ in range(2)]
    # The same box, the second crop flipped: patch (i, j) of one crop is patch (i, 2 - j) of the other.
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0, 0.0]] * 2, [[0.0, 0.0, 1.0, 1.0, 1.0]] * 2])
    loss = dense_vicreg_loss(z, boxes, (0.0, 0.0), (25.0, 25.0, 1.0), torch.Generator().manual_seed(1))
    mirror = [zi.flip(2) for zi in z]
    within = sum(torch.relu(1 - torch.sqrt(zi.reshape(2, 9, 4).var(1) + 1e-4)).mean() for zi in z) / 2
    expected = 25 * within
    for v, t in ((0, 1), (1, 0)):
        inv, var, cov = vicreg_terms(z[v].reshape(-1, 4), mirror[t].reshape(-1, 4))
        expected = expected + (25 * inv + 25 * var + cov) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # Features that are one code per image pay the within-image variance term in full.
    flat = [zi.mean((1, 2), keepdim=True).expand_as(zi).contiguous() for zi in z]
    worse = dense_vicreg_loss(flat, boxes, (0.0, 0.0), (0.0, 1.0, 0.0), torch.Generator().manual_seed(1))
    assert worse.item() >= 1.0 - 1e-2


def test_vicreg_dense_objective_trains_and_resumes(tmp_path):
    cfg = PretrainConfig(**TINY | dict(dense_weight=1.0, dense_objective="vicreg", expander_dim=32))
    full = pretrain(cfg, tmp_path / "full", max_steps=3, progress=False)
    assert all(math.isfinite(h["dense_loss"]) and h["dense_loss"] > 0 for h in full["history"])
    pretrain(cfg, tmp_path / "split", max_steps=1, progress=False)
    resumed = pretrain(cfg, tmp_path / "split", max_steps=3, progress=False, resume=True)
    assert losses(resumed) == pytest.approx(losses(full), abs=1e-6)
    with pytest.raises(ValueError, match="dense_objective must be"):
        PretrainConfig(dense_objective="mae")


def test_dino_weight_zero_leaves_the_dense_vicreg_term_alone(tmp_path):
    vic = TINY | dict(dense_weight=1.0, dense_objective="vicreg", expander_dim=32)
    both = pretrain(PretrainConfig(**vic), tmp_path / "both", max_steps=2, progress=False)
    alone = pretrain(PretrainConfig(**vic | dict(dino_weight=0.0)), tmp_path / "alone", max_steps=2, progress=False)
    first, only = both["history"][0], alone["history"][0]
    # Same seed, same crops, same initial weights: the step-0 dense term is identical, and without
    # the DINO term the loss is exactly that term (the image-level term added about ln(64) on top).
    assert only["dense_loss"] == pytest.approx(first["dense_loss"], rel=1e-6)
    assert only["loss"] == pytest.approx(only["dense_loss"], rel=1e-6)
    assert first["loss"] - first["dense_loss"] > 1.0
    assert only["teacher_entropy"] is None and first["teacher_entropy"] > 0
    # The DINO head gets no gradient (AdamW skips it), so the teacher's EMA copy stays equal to it.
    for run, frozen in (("alone", True), ("both", False)):
        state = load(tmp_path / run / "checkpoint.pt")
        same = all(torch.allclose(state["student"][k], state["teacher"][k], atol=1e-6)
                   for k in state["student"] if k.startswith("head."))
        assert same is frozen
    with pytest.raises(ValueError, match="nothing to learn"):
        PretrainConfig(dino_weight=0.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        PretrainConfig(dino_weight=-1.0)


class _Tokens(nn.Module):
    """A stand-in network whose patch tokens are the images' 2 x 2 pixel blocks' mean colours."""

    def tokens(self, images):
        t = nn.functional.avg_pool2d(images, 2).permute(0, 2, 3, 1)
        return t[:, 0, 0], t


def test_region_masks_split_an_image_into_its_colour_regions():
    images = torch.zeros(3, 3, 8, 8)
    images[:, 0] = 1.0  # red everywhere ...
    images[:, :, :, 4:] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]  # ... except a blue right half
    images[1] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    images[1, :, 4:] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]  # image 1: red top, green bottom
    data = [(img, 0) for img in images]
    masks = region_masks(_Tokens(), data, 2, torch.Generator().manual_seed(0), batch_size=2)
    assert masks.shape == (3, 4, 4) and masks.dtype == torch.uint8
    for m, expected in zip(masks.long(), (lambda y, x: x >= 2, lambda y, x: y >= 2, lambda y, x: x >= 2)):
        y, x = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
        truth = expected(y, x)
        assert len(m[truth].unique()) == 1 and len(m[~truth].unique()) == 1 and m[truth][0] != m[~truth][0]
    # K = 3 on a 2-colour image: every token still lands with its own colour's centre(s).
    three = region_masks(_Tokens(), data[:1], 3, torch.Generator().manual_seed(1))[0].long()
    assert not set(three[:, :2].flatten().tolist()) & set(three[:, 2:].flatten().tolist())


def test_region_ids_read_the_mask_under_each_patch_centre():
    masks = torch.arange(2 * 64).view(2, 8, 8) % 251
    box = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.0], [0.5, 0.5, 0.5, 0.5, 1.0]])  # bottom-right quarter, 2nd flipped
    ids = region_ids(box, masks, 4)
    assert torch.equal(ids[0], masks[0, 4:, 4:]) and torch.equal(ids[1], masks[1, 4:, 4:].flip(-1))
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]] * 2)
    assert torch.equal(region_ids(whole, masks, 8), masks)
    assert region_ids(box, masks, 1)[:, 0, 0].tolist() == [masks[0, 6, 6], masks[1, 6, 6]]  # the crop centre


def test_region_contrast_loss_matches_an_explicit_computation():
    g = torch.Generator().manual_seed(0)
    b, k, tau = 3, 3, 0.5
    crops = [torch.randn(b, 4, 4, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    ids = [torch.randint(0, k, (b, 4, 4), generator=g) for _ in range(2)]
    ids[0][0] = 0  # image 0 is one region in crop 0 ...
    ids[1][1, :, :] = 2
    ids[1][1, 0, 0] = 1  # ... region 1 of image 1 has a single patch in crop 1 (no pair, but a negative)
    locals_ = [torch.randn(b, 2, 2, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    local_ids = torch.tensor([[0, 1, 2], [1, 0, 0]])
    got = region_contrast_loss(crops, ids, locals_, local_ids, k, nn.Identity(), tau)

    def emb(v):  # {(image, region): (normalised mean token, count)}
        out = {}
        for i in range(b):
            for r in range(k):
                sel = crops[v][i][ids[v][i] == r]
                if len(sel):
                    out[(i, r)] = (sel.mean(0) / sel.mean(0).norm(), len(sel))
        return out

    e = [emb(0), emb(1)]
    pairs = [key for key in e[0] if key in e[1] and e[0][key][1] >= 2 and e[1][key][1] >= 2]
    rows = [e[0][key][0] for key in pairs] + [e[1][key][0] for key in pairs]
    n, gg = len(pairs), 0.0
    for a in range(2 * n):
        positive = (a + n) % (2 * n)
        others = [math.exp(float(rows[a] @ rows[c]) / tau) for c in range(2 * n) if c != a]
        gg += -float(rows[a] @ rows[positive]) / tau + math.log(sum(others))
    gg /= 2 * n
    terms = []
    for v in range(2):
        for crop, rid in zip(locals_, local_ids):
            ce = []
            for i in range(b):
                key = (i, int(rid[i]))
                if key not in e[v] or e[v][key][1] < 2:
                    continue
                z = crop[i].mean((0, 1))
                z = z / z.norm()
                scores = {other: float(z @ vec) / tau for other, (vec, _) in e[v].items()}
                ce.append(-scores[key] + math.log(sum(math.exp(x) for x in scores.values())))
            if ce:
                terms.append(sum(ce) / len(ce))
    assert n >= 3 and len(terms) == 4
    assert float(got) == pytest.approx(gg + sum(terms) / len(terms), rel=1e-9)


def test_region_contrast_loss_with_no_shared_region():
    # Crop 0 sees only region 0 of each image, crop 1 only region 1: no region is in both, so the
    # global-global term is 0 (not NaN) and the loss is the local term alone, written out here.
    g = torch.Generator().manual_seed(1)
    b, k, tau = 2, 3, 0.5
    crops = [torch.randn(b, 2, 2, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    ids = [torch.zeros(b, 2, 2, dtype=torch.long), torch.ones(b, 2, 2, dtype=torch.long)]
    local = torch.randn(b, 2, 2, 4, generator=g, dtype=torch.float64)
    got = region_contrast_loss(crops, ids, [local], torch.tensor([[0, 0]]), k, nn.Identity(), tau)
    regions = [crops[0][i].detach().mean((0, 1)) for i in range(b)]  # crop 0's regions (image i, region 0)
    ce = []
    for i in range(b):  # only crop 0 holds the local crops' region 0; crop 1 gives no term
        z = local[i].mean((0, 1))
        scores = [float(z @ r) / float(z.norm() * r.norm()) / tau for r in regions]
        ce.append(-scores[i] + math.log(sum(math.exp(x) for x in scores)))
    assert got.item() == pytest.approx(sum(ce) / b, rel=1e-9)
    got.backward()
    assert crops[0].grad.abs().sum() > 0 and torch.isfinite(crops[1].grad).all()
    # Without local crops nothing is left to compare: a clear error, not a NaN loss.
    with pytest.raises(ValueError, match="crops are too small for region_clusters=3"):
        region_contrast_loss(crops, ids, [], torch.zeros(0, b, dtype=torch.long), k, nn.Identity(), tau)


def test_regions_objective_trains_and_resumes(tmp_path):
    cfg = PretrainConfig(**TINY | dict(dino_weight=0.0, dense_weight=1.0, dense_objective="regions",
                                       region_clusters=3, local_crop_size=8))
    full = pretrain(cfg, tmp_path / "full", max_steps=3, progress=False)
    assert all(math.isfinite(h["dense_loss"]) and h["loss"] == pytest.approx(h["dense_loss"]) for h in full["history"])
    pretrain(cfg, tmp_path / "split", max_steps=1, progress=False)
    resumed = pretrain(cfg, tmp_path / "split", max_steps=3, progress=False, resume=True)
    assert losses(resumed) == pytest.approx(losses(full), abs=1e-6)  # the masks come from the seed's init
    assert not hpkit.backbones.pretrain.trains_teacher(cfg)
    with pytest.raises(ValueError, match="region_clusters must be"):
        PretrainConfig(region_clusters=1)


def test_similarity_keep_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    z, r = torch.randn(2, 2, 3, 5, generator=g), torch.randn(2, 2, 3, 7, generator=g)  # 12 tokens, C != C'
    loss = similarity_keep_loss([z, 2 * z], [r, r], samples=100, generator=torch.Generator().manual_seed(1))
    # All 12 tokens are drawn; the mean over pairs does not depend on their order. Cosines by hand:
    zs, rs = z.reshape(12, 5).double(), r.reshape(12, 7).double()
    cos = lambda a, i, j: float(a[i] @ a[j] / (a[i].norm() * a[j].norm()))  # noqa: E731
    by_hand = sum((cos(zs, i, j) - cos(rs, i, j)) ** 2 for i in range(12) for j in range(12)) / 144
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)  # 2 * z has the same cosines, so both crops agree
    assert similarity_keep_loss([z], [3 * z], 100, torch.Generator()).item() == pytest.approx(0.0, abs=1e-6)
    # With fewer samples, a random subset of tokens: still 0 for identical structure, > 0 otherwise.
    assert 0 < similarity_keep_loss([z], [r], 4, torch.Generator().manual_seed(2)).item() < 4


def test_keep_term_holds_the_random_init_and_resumes(tmp_path):
    vic = TINY | dict(dense_weight=1.0, dense_objective="vicreg", expander_dim=32, dino_weight=0.0, lr=0.5,
                      num_local_crops=0, epochs=4, keep_samples=64)  # 8 steps
    free = pretrain(PretrainConfig(**vic | dict(keep_weight=1e-9)), tmp_path / "free", progress=False)
    cfg = PretrainConfig(**vic | dict(keep_weight=100.0))
    kept = pretrain(cfg, tmp_path / "kept", progress=False)
    # Step 0: the student is the initialisation, so the term is 0 and the loss is the dense term.
    first = kept["history"][0]
    assert first["keep_loss"] == pytest.approx(0.0, abs=1e-10) and first["loss"] == pytest.approx(first["dense_loss"])
    for h in kept["history"]:
        assert h["loss"] == pytest.approx(h["dense_loss"] + 100.0 * h["keep_loss"], rel=1e-5)
    # The term does its job: the structure moves less from the init with it than without it
    # (0.026 vs 0.098 after 8 steps).
    assert kept["history"][-1]["keep_loss"] < 0.5 * free["history"][-1]["keep_loss"]
    assert free["history"][-1]["keep_loss"] > 0
    # The checkpoint holds the initial ViT (the one build_vit makes from the seed), and a resumed
    # run reproduces the losses.
    torch.manual_seed(cfg.seed)
    init = build_vit(cfg).state_dict()
    state = load(tmp_path / "kept" / CHECKPOINT)
    assert all(torch.equal(state["init_backbone"][k], v) for k, v in init.items())
    assert not torch.equal(state["student"]["backbone.blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])
    pretrain(cfg, tmp_path / "split", max_steps=3, progress=False)
    resumed = pretrain(cfg, tmp_path / "split", progress=False, resume=True)
    assert losses(resumed) == pytest.approx(losses(kept), abs=1e-6)
    with pytest.raises(ValueError, match="keep_weight must be >= 0"):
        PretrainConfig(keep_weight=-1.0)
    # No DINO term: the teacher is a lagging EMA copy nothing trains against, so export writes the student.
    from safetensors.torch import load_file
    for network, expected in (("auto", "student"), ("teacher", "teacher"), ("student", "student")):
        path = export_backbone(tmp_path / "kept", tmp_path / f"{network}.safetensors", network=network)
        assert json.loads(path.with_suffix(".json").read_text())["network"] == expected
        saved = load_file(str(path))
        assert all(torch.equal(v, state[expected][f"backbone.{k}"]) for k, v in saved.items())
    assert not torch.equal(state["student"]["backbone.pos_embed"], state["teacher"]["backbone.pos_embed"])
    with pytest.raises(ValueError, match="network must be"):
        export_backbone(tmp_path / "kept", tmp_path / "x.safetensors", network="ema")


def test_init_weights_start_the_run_and_anchor_the_keep_term(tmp_path):
    from safetensors.torch import load_file, save_file
    vic = TINY | dict(dense_weight=1.0, dense_objective="vicreg", expander_dim=32, dino_weight=0.0, lr=0.5,
                      num_local_crops=0, epochs=2, keep_samples=64, keep_weight=10.0)  # 4 steps
    first = PretrainConfig(**vic)
    pretrain(first, tmp_path / "first", progress=False)
    start = export_backbone(tmp_path / "first", tmp_path / "start.safetensors")
    weights = load_file(str(start))
    torch.manual_seed(first.seed)
    assert not torch.equal(weights["blocks.0.attn.qkv.weight"], build_vit(first).state_dict()["blocks.0.attn.qkv.weight"])
    # Zero steps: the student, the teacher and the keep term's reference are the file, not the seed's init.
    cfg = PretrainConfig(**vic | dict(init_weights=str(start), seed=1))
    pretrain(cfg, tmp_path / "zero", max_steps=0, progress=False)
    state = load(tmp_path / "zero" / CHECKPOINT)
    for k, v in weights.items():
        assert torch.equal(state["student"][f"backbone.{k}"], v) and torch.equal(state["teacher"][f"backbone.{k}"], v)
        assert torch.equal(state["init_backbone"][k], v)
    digest = hashlib.sha256(start.read_bytes()).hexdigest()
    assert state["init_weights_sha256"] == digest
    # A run from the file: the keep term is 0 at step 0 (the reference is the file), it resumes exactly,
    # and the export records the starting file's digest.
    full = pretrain(cfg, tmp_path / "run", progress=False)
    assert full["history"][0]["keep_loss"] == pytest.approx(0.0, abs=1e-10)
    pretrain(cfg, tmp_path / "split", max_steps=2, progress=False)
    assert losses(pretrain(cfg, tmp_path / "split", progress=False, resume=True)) == pytest.approx(losses(full), abs=1e-6)
    exported = export_backbone(tmp_path / "run", tmp_path / "next.safetensors")
    recorded = json.loads(exported.with_suffix(".json").read_text())["init_weights"]
    assert recorded["sha256"] == digest  # the starting file, and how it was made, travel with the export
    made = json.loads(start.with_suffix(".json").read_text())
    assert made.pop("sha256") == digest and recorded["metadata"] == made
    # Other content in the same file: resuming is refused, with the reason.
    save_file({k: v + 1 for k, v in weights.items()}, str(start))
    with pytest.raises(ValueError, match="init_weights=.*has changed"):
        pretrain(cfg, tmp_path / "split", progress=False, resume=True)
    # A missing file and a file of another architecture get clear errors.
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrain(PretrainConfig(**vic | dict(init_weights=str(tmp_path / "none.safetensors"))), tmp_path / "x",
                 progress=False)
    with pytest.raises(ValueError, match="does not fit the configured ViT"):
        pretrain(PretrainConfig(**vic | dict(init_weights=str(start), depth=3)), tmp_path / "y", progress=False)


def test_tiny_run_resumes_exactly_also_after_ctrl_c(tmp_path, monkeypatch):
    cfg = PretrainConfig(**TINY)
    full = pretrain(cfg, tmp_path / "full", max_steps=4, progress=False)
    assert full["steps"] == 4 and all(math.isfinite(x) for x in losses(full))
    assert [h["step"] for h in full["history"]] == [1, 2, 3, 4]
    assert {"loss", "lr", "teacher_temp", "momentum", "seconds"} <= set(full["history"][0])
    assert json.loads((tmp_path / "full" / "history.json").read_text())[-1]["step"] == 4
    assert json.loads((tmp_path / "full" / "config.json").read_text())["out_dim"] == 64
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == [CHECKPOINT, "config.json", "history.json"]
    final = load(tmp_path / "full" / CHECKPOINT)

    pretrain(cfg, tmp_path / "split", max_steps=3, progress=False)
    resumed = pretrain(cfg, tmp_path / "split", progress=False, resume=True)
    assert losses(resumed) == pytest.approx(losses(full), abs=1e-6)
    teacher = load(tmp_path / "split" / CHECKPOINT)["teacher"]
    for key, value in final["teacher"].items():
        torch.testing.assert_close(teacher[key], value, atol=1e-6, rtol=0)

    # Ctrl-C during step 2: that step finishes, is saved, and the resumed run continues identically.
    real, calls = hpkit.backbones.pretrain.dino_loss, []

    def interrupted_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(hpkit.backbones.pretrain.objectives, "dino_loss", interrupted_loss)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tmp_path / "ctrl_c", max_steps=4, progress=False)
    monkeypatch.undo()
    assert load(tmp_path / "ctrl_c" / CHECKPOINT)["step"] == 2
    resumed = pretrain(cfg, tmp_path / "ctrl_c", max_steps=4, progress=False, resume=True)
    assert losses(resumed) == pytest.approx(losses(full), abs=1e-6)

    # A checkpoint from before a setting existed resumes when that setting has its default.
    state = load(tmp_path / "full" / CHECKPOINT)
    del state["config"]["dense_objective"]
    torch.save(state, tmp_path / "full" / CHECKPOINT)
    assert pretrain(cfg, tmp_path / "full", max_steps=4, progress=False, resume=True)["steps"] == 4
    with pytest.raises(ValueError, match="different configuration.*out_dim"):
        pretrain(PretrainConfig(**TINY | {"out_dim": 32}), tmp_path / "full", resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        pretrain(cfg, tmp_path / "none", resume=True, progress=False)


def test_checkpoints_are_atomic_and_nan_stops_at_the_step(tmp_path, monkeypatch):
    cfg = PretrainConfig(**TINY)
    pretrain(cfg, tmp_path, max_steps=2, progress=False)
    good = (tmp_path / CHECKPOINT).read_bytes()

    def broken_save(obj, path, *args, **kwargs):  # a crash half-way through writing the next checkpoint
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        pretrain(cfg, tmp_path, max_steps=4, progress=False, resume=True)
    monkeypatch.undo()
    assert (tmp_path / CHECKPOINT).read_bytes() == good  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT, "config.json", "history.json"]

    real, calls = hpkit.backbones.pretrain.dino_loss, []

    def nan_at_step_3(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 1 else loss

    monkeypatch.setattr(hpkit.backbones.pretrain.objectives, "dino_loss", nan_at_step_3)
    with pytest.raises(PretrainingDiverged, match="at step 2 "):
        pretrain(cfg, tmp_path, max_steps=4, progress=False, resume=True)
    assert (tmp_path / CHECKPOINT).read_bytes() == good


def test_export_loads_with_load_backbone(tmp_path):
    # The random_tiny architecture (depth 6, width 192) on 32 px scenes, one step: export must load as random_tiny.
    cfg = PretrainConfig(**TINY | dict(depth=6, embed_dim=192, num_heads=3, epochs=1))
    pretrain(cfg, tmp_path / "run", max_steps=1, progress=False)
    path = export_backbone(tmp_path / "run", tmp_path / "out" / "dino_tiny.safetensors")
    assert path.stat().st_size < 15e6
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["steps"] == 1 and meta["loads_as"] == "random_tiny" and meta["config"]["depth"] == 6
    assert meta["network"] == "teacher"  # DINO trains against its teacher: that one is exported

    from safetensors.torch import load_file
    saved = load_file(str(path))
    teacher = load(tmp_path / "run" / CHECKPOINT)["teacher"]
    assert not any(k.startswith(("head.", "backbone.")) for k in saved) and saved["pos_embed"].shape == (1, 785, 192)
    assert set(saved) == {k[len("backbone."):] for k in teacher if k.startswith("backbone.")}

    loaded = load_backbone("random_tiny", weights=path)
    reference = build_vit(cfg)
    reference.load_state_dict({k[len("backbone."):]: v for k, v in teacher.items() if k.startswith("backbone.")})
    reference = FrozenViT(reference, "random_tiny", 8)
    assert not torch.equal(loaded.vit.pos_embed, load_backbone("random_tiny").vit.pos_embed)
    images = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))  # any multiple of 8
    a, b = loaded(images), reference(images)
    torch.testing.assert_close(a.feats, b.feats, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.attn_logits, b.attn_logits, atol=1e-5, rtol=0)

    half = export_backbone(tmp_path / "run" / CHECKPOINT, tmp_path / "half.safetensors", dtype="float16")
    assert half.stat().st_size < path.stat().st_size * 0.6
    torch.testing.assert_close(load_backbone("random_tiny", weights=half)(images).feats, a.feats, atol=0.05, rtol=0)
    assert BACKBONES["random_tiny"].timm_kwargs["img_size"] == cfg.img_size


def test_command_line(tmp_path, capsys):
    args = [str(tmp_path / "run"), "--num-images", "8", "--image-size", "32", "--global-crop-size", "32",
            "--local-crop-size", "16", "--num-local-crops", "1", "--global-crop-scale", "0.5,1", "--depth", "1",
            "--out-dim", "32", "--hidden-dim", "16", "--bottleneck-dim", "8", "--batch-size", "4", "--amp", "false",
            "--max-steps", "1", "--no-progress", "--export", str(tmp_path / "w.safetensors")]
    hpkit.backbones.pretrain.main(args)
    assert "1 steps" in capsys.readouterr().out and (tmp_path / "w.safetensors").is_file()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["global_crop_scale"] == [0.5, 1.0] and saved["depth"] == 1 and saved["amp"] is False


def test_cli_pretrain_runs_and_exports(tmp_path, capsys):
    from hpkit.__main__ import main

    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "usage: hpkit pretrain" in capsys.readouterr().out
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    out = tmp_path / "w.safetensors"
    assert main(["pretrain", str(tmp_path / "run"), *args, "--max-steps=1", "--no-progress", f"--export={out}"]) == 0
    assert out.is_file() and "1 steps" in capsys.readouterr().out
    assert main(["pretrain", str(tmp_path / "bad"), "--num-images=8", "--batch-size=16", "--no-progress"]) == 2


def test_cli_pretrain_takes_set_like_hpkit_train(tmp_path, capsys):
    from hpkit.__main__ import main

    args = [a for k, v in (TINY | {"global_crop_scale": "0.5,1", "amp": "off"}).items() for a in ("--set", f"{k}={v}")]
    assert main(["pretrain", str(tmp_path / "run"), *args, "--depth", "3", "--set", "depth=1", "--max-steps=2",
                 "--no-progress"]) == 0
    assert "2 steps" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["global_crop_scale"] == [0.5, 1.0] and saved["amp"] is False and saved["out_dim"] == 64
    assert saved["depth"] == 1  # --set wins over the older --depth
    # An unknown key: exit status 2, one line with the closest field, nothing written (the real command).
    done = subprocess.run([sys.executable, "-m", "hpkit", "pretrain", str(tmp_path / "bad"), "--set",
                           "dense_objectiv=vicreg"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("hpkit: ") and "did you mean 'dense_objective'?" in done.stderr
    assert not (tmp_path / "bad").exists()
    # Values are parsed to the field's type, or rejected in one line.
    for setting, message in (("lr=fast", "bad value 'fast' for lr"), ("amp=maybe", "expected true or false"),
                             ("jitter=0.1,0.2", "expected 4 comma-separated numbers"), ("lr", "must look like"),
                             ("init_weights=none", "batch_size=16 is larger than the 8 images")):  # none: None
        code = main(["pretrain", str(tmp_path / "bad"), "--set", setting, "--set", "num_images=8", "--set",
                     "batch_size=16", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, (setting, err)


def test_pretraining_on_a_labelled_folder_never_reads_its_label_maps(tmp_path, capsys):
    """Labels are not used for pretraining, so a broken label map neither stops it nor is opened."""
    from hpkit.__main__ import main
    from hpkit.backbones.pretrain import pretraining_images
    from hpkit.data import scan_folder, write_scene_folder

    root = tmp_path / "photos"
    write_scene_folder(root, num_train=8, num_val=2)
    broken = sorted((root / "train" / "labels").glob("*.png"))[0]
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot identify image file"):
        scan_folder(root)  # training HP on it would stop: the labels are checked
    data = pretraining_images("folder", str(root), None, 32, 0)
    image, label = data[0]
    assert image.shape == (3, 32, 32) and bool((label == -1).all())
    args = [a for k, v in (TINY | {"dataset": "folder", "root": str(root), "num_images": 8, "amp": "off"}).items()
            for a in ("--set", f"{k}={v}")]
    assert main(["pretrain", str(tmp_path / "run"), *args, "--max-steps=1", "--no-progress"]) == 0, \
        capsys.readouterr().err
