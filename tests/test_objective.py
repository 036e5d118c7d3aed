"""Eq. 1, 5, 6, 10, 11 and the official SupConLoss on the fast path: hand values, chunking against the
readable reference (:mod:`hpkit.method.reference`) and the official code's formulation, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from dense_reference import official_objective

from hpkit import consistency_regularizer, hp_objective, lambda_schedule, local_weights, self_contrastive_loss
from hpkit.method import reference

S60 = math.sin(math.radians(60))
F3 = torch.tensor([[1.0, 0.0], [0.5, S60], [-1.0, 0.0]])  # positives: 0 <-> 1 (symmetric), see GHP tests
POOL = torch.tensor([[0.0, 1.0]])
Z3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
ALL = torch.ones(3, 3, dtype=torch.bool)


def hand(**kw):
    args = dict(patches_per_image=3, lam=0.0, tau=0.5, rho=1.0, negatives=ALL, task_specific=False)
    args.update(kw)
    return hp_objective(Z3, F3, None, POOL, None, **args).item()


def test_eq5_by_hand():
    # Anchor 0: P={1}, N={2}; x = <z0,z1>/tau = 0, <z0,z2>/tau = -2 -> log(1 + e^-2).
    # Anchor 1: P={0}, N={2}; both logits 0 -> log 2. Anchor 2 has no positive and is excluded.
    expected = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    assert hand() == pytest.approx(expected, rel=1e-6)
    assert hand(symmetric=False) == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)  # anchor 1 loses P


def test_random_negatives_restrict_the_denominator_by_hand():
    # Without negatives the denominator holds only the positive: every term is -log(1) = 0.
    assert hand(negatives=torch.zeros(3, 3, dtype=torch.bool)) == pytest.approx(0.0, abs=1e-7)


def test_psi_contrasts_mixed_anchor_against_clean_vectors_by_hand():
    z_mix = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    # Psi_0: <zm0,z1>/tau = 2 (positive), <zm0,z2>/tau = 0 -> log(1 + e^-2); Psi_1 = Phi_1 = log 2.
    value = hp_objective(Z3, F3, None, POOL, None, patches_per_image=3, lam=0.0, tau=0.5, rho=1.0,
                         negatives=ALL, task_specific=False, z_mix=z_mix).item()
    expected = (2 * math.log(1 + math.exp(-2)) + 2 * math.log(2)) / 2
    assert value == pytest.approx(expected, rel=1e-6)


def test_task_specific_term_weighted_by_lambda_by_hand():
    # Task-specific features make 1 <-> 2 positives: s'_1 = s'_2 = (0,1)-ish, pool far from both.
    s_ema = F.normalize(torch.tensor([[1.0, 0.0], [0.1, 1.0], [-0.1, 1.0]]), dim=1)
    pool_sp = torch.tensor([[1.0, 0.0]])  # c' = [1, .0995, -.0995]; sim(1,2) = .98 > both -> P^sp = {1<->2}
    value = hp_objective(Z3, F3, s_ema, POOL, pool_sp, patches_per_image=3, lam=0.25, tau=0.5, rho=1.0,
                         negatives=ALL).item()
    phi_ag = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    # Anchor 1: P^sp={2}, N={0}: both logits 0 -> log 2. Anchor 2: P^sp={1}, x=0; N={0}: x=-2 -> log(1+e^-2).
    phi_sp = (math.log(2) + math.log(1 + math.exp(-2))) / 2
    assert value == pytest.approx(phi_ag + 0.25 * phi_sp, rel=1e-6)


def test_official_style_by_hand():
    # Same positives; official = (tau / 0.07) * mean over images of the pair-average (one pair each here).
    value = hand(style="official")
    expected = (0.5 / 0.07) * (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    assert value == pytest.approx(expected, rel=1e-6)


def _paper_case(batch, **kw):
    z = batch["z"].clone().requires_grad_()
    z_mix = batch["z_mix"].clone().requires_grad_()
    return z, z_mix, dict(lam=0.7, tau=0.6, **kw)


@pytest.mark.parametrize("chunk", [1, 7, 25, 60, None])
@pytest.mark.parametrize("symmetric,task_specific", [(True, True), (False, True), (True, False)])
def test_paper_chunked_equals_reference(batch, chunk, symmetric, task_specific):
    z, z_mix, kw = _paper_case(batch, symmetric=symmetric, task_specific=task_specific)
    ours = hp_objective(z, batch["f"], batch["s_ema"], batch["pool_ag"], batch["pool_sp"],
                        patches_per_image=batch["p"], rho=0.3, z_mix=z_mix, negatives=batch["rand"],
                        chunk_size=chunk, **kw)
    gz, gm = torch.autograd.grad(ours, (z, z_mix))
    z2, m2 = batch["z"].clone().requires_grad_(), batch["z_mix"].clone().requires_grad_()
    ref = reference.paper_objective(z2, batch["f"], batch["s_ema"], batch["pool_ag"], batch["pool_sp"],
                                    random=batch["rand"], z_mix=m2, **kw)
    rz, rm = torch.autograd.grad(ref, (z2, m2))
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(gz, rz)
    torch.testing.assert_close(gm, rm)


@pytest.mark.parametrize("chunk", [5, 20, 40, 60, None])  # 5 rows rounds up to one image, 40 -> 2 of 3 images
@pytest.mark.parametrize("with_mix,task_specific,symmetric", [(True, True, True), (False, True, True),
                                                             (True, False, True), (True, True, False)])
def test_official_equals_the_official_code_formulation(batch, chunk, with_mix, task_specific, symmetric):
    kw = dict(lam=0.4, tau=0.8, symmetric=symmetric, task_specific=task_specific)
    z = batch["z"].clone().requires_grad_()
    z_mix = batch["z_mix"].clone().requires_grad_() if with_mix else None
    ours = hp_objective(z, batch["f"], batch["s_ema"], batch["pool_ag"], batch["pool_sp"],
                        patches_per_image=batch["p"], rho=0.3, z_mix=z_mix, style="official",
                        negatives=batch["rand_shared"], chunk_size=chunk, **kw)
    inputs = (z, z_mix) if with_mix else (z,)
    grads = torch.autograd.grad(ours, inputs)
    z2 = batch["z"].clone().requires_grad_()
    m2 = batch["z_mix"].clone().requires_grad_() if with_mix else None
    ref = official_objective(z2, batch["f"], batch["s_ema"], batch["pool_ag"], batch["pool_sp"],
                             batch["rand_shared"], patches_per_image=batch["p"], z_mix=m2, **kw)
    ref_grads = torch.autograd.grad(ref, (z2, m2) if with_mix else (z2,))
    torch.testing.assert_close(ours, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_shared_negative_mask_equals_its_expanded_form(batch):
    args = (batch["z"], batch["f"], batch["s_ema"], batch["pool_ag"], batch["pool_sp"])
    kw = dict(patches_per_image=batch["p"], lam=0.5, tau=0.5, rho=0.3, z_mix=batch["z_mix"])
    shared = hp_objective(*args, negatives=batch["rand_shared"], **kw)
    full = hp_objective(*args, negatives=batch["rand_shared"].repeat(batch["b"], 1), **kw)
    torch.testing.assert_close(shared, full)


def test_loss_propagation_equals_reference(batch):
    g = torch.Generator().manual_seed(5)
    logits = 3 * torch.randn(batch["b"], 2, batch["p"], batch["p"], generator=g)
    weights = local_weights(logits, (batch["h"], batch["w"]))  # (B, 9, h, w)
    z = batch["z"].clone().requires_grad_()
    ours = hp_objective(z, batch["f"], batch["s_ema"], batch["pool_ag"], batch["pool_sp"],
                        patches_per_image=batch["p"], lam=0.5, tau=0.5, rho=0.3, negatives=batch["rand"],
                        neighbour_weights=weights, chunk_size=13)
    (gz,) = torch.autograd.grad(ours, z)
    z2 = batch["z"].clone().requires_grad_()
    ref = reference.paper_objective(z2, batch["f"], batch["s_ema"], batch["pool_ag"], batch["pool_sp"],
                                    random=batch["rand"], lam=0.5, tau=0.5, neighbour_weights=weights)
    (rz,) = torch.autograd.grad(ref, z2)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(gz, rz)


def test_random_negatives_are_reproducible_with_a_generator(batch):
    args = (batch["z"], batch["f"], batch["s_ema"], batch["pool_ag"], batch["pool_sp"])
    for style in ("paper", "official"):
        kw = dict(patches_per_image=batch["p"], lam=0.5, tau=0.5, rho=0.05, style=style)
        a = hp_objective(*args, generator=torch.Generator().manual_seed(1), **kw)
        b = hp_objective(*args, generator=torch.Generator().manual_seed(1), **kw)
        c = hp_objective(*args, generator=torch.Generator().manual_seed(2), **kw)
        assert a == b and a != c


def test_float32_inputs_work_and_need_no_grad(batch):
    args = [batch[k].float() for k in ("z", "f", "s_ema", "pool_ag", "pool_sp")]
    value = hp_objective(*args, patches_per_image=batch["p"], lam=0.5, tau=0.5, rho=0.2)
    assert value.dtype == torch.float32 and torch.isfinite(value) and not value.requires_grad


def test_bad_inputs_give_clear_errors(batch):
    args = (batch["z"], batch["f"], batch["s_ema"], batch["pool_ag"], batch["pool_sp"])
    kw = dict(patches_per_image=batch["p"], lam=0.5, tau=0.5, rho=0.2)
    with pytest.raises(ValueError, match="multiple of patches_per_image"):
        hp_objective(*args, **{**kw, "patches_per_image": 7})
    with pytest.raises(ValueError, match="rho"):
        hp_objective(*args, **{**kw, "rho": 2.0})
    with pytest.raises(ValueError, match="style"):
        hp_objective(*args, style="fast", **kw)
    with pytest.raises(ValueError, match="negatives"):
        hp_objective(*args, negatives=torch.ones(3, 3, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match="official"):
        hp_objective(*args, style="official", neighbour_weights=torch.ones(3, 9, 4, 5), **kw)


def test_eq1_chunked_equals_reference():
    g = torch.Generator().manual_seed(6)
    z = F.normalize(torch.randn(10, 4, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    za = F.normalize(torch.randn(10, 4, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    ours = self_contrastive_loss(z, za, tau=0.3, chunk_size=7)
    ref = reference.self_contrastive_loss(z, za, tau=0.3)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(torch.autograd.grad(ours, (z, za)), torch.autograd.grad(ref, (z, za))):
        torch.testing.assert_close(a, b)


def test_regulariser_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    za = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    # distances sqrt(2) and 0 (plus the 1e-6 eps of PairwiseDistance) -> mean ~ sqrt(2) / 2
    assert consistency_regularizer(z, za).item() == pytest.approx(math.sqrt(2) / 2, abs=1e-5)


def test_lambda_schedule_by_hand():
    assert [lambda_schedule(t, 10, warmup=2) for t in (0, 2, 3, 6, 10)] == [0.0, 0.0, 0.125, 0.5, 1.0]
    assert lambda_schedule(5, 10) == 0.5


@pytest.mark.parametrize("style", ["paper", "official"])
def test_bfloat16_matmuls_stay_close_to_float32(batch, style):
    args = [batch[k].float() for k in ("z", "f", "s_ema", "pool_ag", "pool_sp")]
    kw = dict(patches_per_image=batch["p"], lam=0.5, tau=0.5, rho=0.3, style=style,
              negatives=batch["rand_shared"])
    results = []
    for dtype in (None, torch.bfloat16):
        z = args[0].clone().requires_grad_()
        m = batch["z_mix"].float().clone().requires_grad_()
        loss = hp_objective(z, *args[1:], z_mix=m, matmul_dtype=dtype, **kw)
        results.append((loss.detach(), *torch.autograd.grad(loss, (z, m))))
    (l32, gz32, gm32), (l16, gz16, gm16) = results
    assert l16.item() == pytest.approx(l32.item(), rel=1e-2)
    for a, b in ((gz32, gz16), (gm32, gm16)):
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("rate,cols", [(0.02, 5000), (0.15, 300), (0.5, 400)])
def test_bernoulli_mask_has_the_requested_rate(rate, cols):
    from hpkit.method.objective import bernoulli_mask

    rows = 400
    mask = bernoulli_mask(rows, cols, rate, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (rows, cols) and mask.dtype == torch.bool
    per_row = mask.sum(1).double()
    mean, var = cols * rate, cols * rate * (1 - rate)
    # Binomial(cols, rate) per row: the average over 400 rows lies within 4 standard errors
    assert abs(per_row.mean().item() - mean) < 4 * math.sqrt(var / rows)
    assert 0.7 * var < per_row.var().item() < 1.3 * var
    # positions are spread evenly: each quarter of the columns gets a quarter of the hits
    quarters = mask.reshape(rows, 4, cols // 4).sum((0, 2)).double()
    assert (quarters / quarters.sum() - 0.25).abs().max() < 0.02
    again = bernoulli_mask(rows, cols, rate, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    assert bernoulli_mask(2, 3, 1.0).all() and not bernoulli_mask(2, 3, 0.0).any()
