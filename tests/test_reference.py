"""The readable reference (hpkit.method.reference): single equations by hand, and the fast objective
(hpkit.method._kernels behind hp_objective) agreeing with it in value and gradient. Eq. 7-9 against the
fast mixing: tests/test_local_positives.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from hpkit import hp_objective, local_weights, self_contrastive_loss
from hpkit.method import reference as ref

S60 = math.sin(math.radians(60))


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --- single equations by hand -------------------------------------------------------------------------

# Three unit features at 0, ~53 and 90 degrees; a pool at ~37 and 270 degrees.
X3 = t64([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
POOL3 = t64([[0.8, 0.6], [0.0, -1.0]])


def test_eq2_criterion_by_hand():
    # c_0 = max(0.8, 0) = 0.8; c_1 = max(.48 + .48, -0.8) = 0.96; c_2 = max(0.6, -1) = 0.6
    torch.testing.assert_close(ref.criterion(X3, POOL3), t64([0.8, 0.96, 0.6]))


def test_eq3_global_positives_by_hand():
    # sim(0,1) = 0.6 < c_0, c_1; sim(0,2) = 0; sim(1,2) = 0.8: above c_2 = 0.6 but not c_1 = 0.96.
    # Symmetric: 2 in P_1 through c_2, and 1 in P_2. Non-symmetric: only P_2 = {1}.
    sym = ref.global_positives(X3, POOL3)
    assert sym.tolist() == [[False, False, False], [False, False, True], [False, True, False]]
    one_sided = ref.global_positives(X3, POOL3, symmetric=False)
    assert one_sided.tolist() == [[False, False, False], [False, False, False], [False, True, False]]


def test_strict_inequality_and_self_exclusion():
    x = F.normalize(torch.ones(3, 2, dtype=torch.float64), dim=1)  # identical patches, sim = c = 1
    assert not ref.global_positives(x, x[:1]).any()  # 1 > 1 is false
    assert torch.equal(ref.global_positives(x, t64([[1.0, -1.0]]) / math.sqrt(2)), ~torch.eye(3, dtype=torch.bool))


def test_negative_set_by_hand():
    positives = torch.tensor([[False, True, False], [True, False, False], [False, False, False]])
    random = torch.tensor([[True, True, True], [False, True, True], [True, False, True]])
    # N_i = R_i minus P_i and i itself
    assert ref.negative_set(positives, random).tolist() == [[False, False, True], [False, False, True],
                                                            [True, False, False]]


def test_eq5_contrastive_loss_by_hand():
    z = t64([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    anchors = t64([[1.0, 0.0], [1.0, 0.0]])
    positives = torch.tensor([[True, False, False, True], [True, False, False, True]])
    negatives = torch.tensor([[False, True, True, False], [False, True, False, False]])
    # logits / tau (tau = 0.5): 2, 0, -2, 1.2; the second anchor leaves z_2 out of its denominator
    lse = [math.log(math.exp(2) + 1 + math.exp(-2) + math.exp(1.2)), math.log(math.exp(2) + 1 + math.exp(1.2))]
    expected = t64([-((2 - v) + (1.2 - v)) / 2 for v in lse])
    torch.testing.assert_close(ref.contrastive_loss(anchors, z, positives, negatives, 0.5), expected)


def test_eq1_by_hand_and_as_cross_entropy():
    # Two patches, identical views, tau = 1: each anchor sees its partner at logit 1 and two others at 0.
    z = t64([[1.0, 0.0], [0.0, 1.0]])
    assert ref.self_contrastive_loss(z, z.clone(), tau=1.0).item() == pytest.approx(math.log(2 + math.e) - 1)
    g = torch.Generator().manual_seed(6)
    z, za = (F.normalize(torch.randn(7, 4, generator=g, dtype=torch.float64), dim=1) for _ in range(2))
    views = torch.cat([z, za])
    logits = (views @ views.T / 0.3).masked_fill(torch.eye(14, dtype=torch.bool), -math.inf)
    target = torch.cat([torch.arange(7, 14), torch.arange(7)])
    torch.testing.assert_close(ref.self_contrastive_loss(z, za, tau=0.3), F.cross_entropy(logits, target))


# Z3 / F3: the objective example of test_objective.py, positives 0 <-> 1 only.
F3 = t64([[1.0, 0.0], [0.5, S60], [-1.0, 0.0]])
POOL = t64([[0.0, 1.0]])
Z3 = t64([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
ALL = torch.ones(3, 3, dtype=torch.bool)


def test_paper_objective_by_hand():
    # Phi_0: P={1}, N={2}: logits 0, -2 -> log(1 + e^-2); Phi_1: P={0}, N={2}, logits 0, 0 -> log 2.
    # Anchor 2 has no positive and is left out of the mean.
    phi = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    value = ref.paper_objective(Z3, F3, None, POOL, None, random=ALL, lam=0.0, tau=0.5, task_specific=False)
    assert value.item() == pytest.approx(phi)
    # Psi with z_mix_0 = (0, 1): against the clean z, logits 2 (positive z_1) and 0 -> log(1 + e^-2)
    z_mix = t64([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    value = ref.paper_objective(Z3, F3, None, POOL, None, random=ALL, lam=0.0, tau=0.5, task_specific=False,
                                z_mix=z_mix)
    assert value.item() == pytest.approx(phi + (math.log(1 + math.exp(-2)) + math.log(2)) / 2)


def test_official_objective_by_hand():
    # One image of 3 patches: the same two anchors, pair average (1 pair each), times tau / 0.07.
    value = ref.official_objective(Z3, F3, None, POOL, None, random=ALL, patches_per_image=3, lam=0.0, tau=0.5,
                                   task_specific=False)
    expected = (0.5 / 0.07) * (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    assert value.item() == pytest.approx(expected)


def test_eq11_final_objective_by_hand():
    value = ref.final_objective(t64(1.0), t64(2.0), lam=0.5, alpha=0.05, regularizer=t64(4.0))
    assert value.item() == pytest.approx(1.0 + 0.5 * 2.0 + 0.05 * 4.0)


def _logits_3x3(row: list[float], anchor: int = 4) -> torch.Tensor:
    t = torch.zeros(1, 1, 9, 9)
    t[0, 0, anchor] = torch.tensor(row)
    return t


def test_surrounding_patches_count_the_anchor_and_respect_borders():
    assert ref.surrounding_patches(3, 3).sum(1).tolist() == [4, 6, 4, 6, 9, 6, 4, 6, 4]


def test_eq7_to_9_by_hand():
    # Anchor 4 (centre of 3x3) attends with logit log 6 to itself, log 3 to patch 1, 0 to the others:
    # p = 6/16, 3/16, 1/16. Paper: sigma = 9, the average 1, so I^local = {1, 4}; divisor |I^local| = 2.
    s = torch.eye(9, dtype=torch.float64).reshape(1, 9, 3, 3)  # s_j = e_j, so s_mix_4 lists the weights
    logits = _logits_3x3([0, math.log(3), 0, 0, math.log(6), 0, 0, 0, 0])
    surr = ref.surrounding_patches(3, 3)
    scores = 9 * logits.mean(1).softmax(-1)
    local = ref.local_hidden_positives(scores, surr)
    assert local[0, 4].nonzero().flatten().tolist() == [1, 4]
    mixed = ref.local_mix(s, logits).flatten(2)[0, :, 4]
    expected = torch.zeros(9, dtype=torch.float64)
    expected[1], expected[4] = 9 * 3 / 16 / 2, 9 * 6 / 16 / 2
    torch.testing.assert_close(mixed, expected)
    # Official: sorted row [0 x7, log 3, log 6]: the 90 % quantile (position 7.2) is log 3 + 0.2 log 2,
    # which clamps log 6; sigma 28, keep >= average 28/9 -> still {1, 4}; divisor |I^surr| = 9.
    top = 3 * 2 ** 0.2
    total = 7 + 3 + top
    expected[1], expected[4] = 28 * 3 / total / 9, 28 * top / total / 9
    torch.testing.assert_close(ref.local_mix(s, logits, style="official").flatten(2)[0, :, 4], expected)


def test_neighbour_rows_shares_sum_to_one():
    weights = local_weights(_logits_3x3([0, math.log(3), 0, 0, math.log(6), 0, 0, 0, 0]), (3, 3))
    rows, shares = ref.neighbour_rows(weights)
    assert rows[4].tolist() == list(range(9)) and rows[0].tolist()[4] == 0
    torch.testing.assert_close(shares[4], t64([0, 1 / 3, 0, 0, 2 / 3, 0, 0, 0, 0]).float())


# --- the fast path agrees with the reference ----------------------------------------------------------


def _both(batch, *, lhp: str, dtype=torch.float64, **kw) -> list[tuple[torch.Tensor, ...]]:
    """(value, dL/dz[, dL/dz_mix]) of the fast path and of the reference, on the same inputs."""
    f, s_ema, pool_ag, pool_sp = (batch[k].to(dtype) for k in ("f", "s_ema", "pool_ag", "pool_sp"))
    weights = None
    if lhp == "propagation":
        logits = 3 * torch.randn(batch["b"], 2, batch["p"], batch["p"], generator=torch.Generator().manual_seed(5))
        weights = local_weights(logits, (batch["h"], batch["w"]))
    out = []
    for use_reference in (False, True):
        z = batch["z"].to(dtype).requires_grad_()
        z_mix = batch["z_mix"].to(dtype).requires_grad_()
        loss = hp_objective(z, f, s_ema, pool_ag, pool_sp, patches_per_image=batch["p"], lam=0.6, tau=0.7, rho=0.3,
                            z_mix=z_mix if lhp == "mix" else None, neighbour_weights=weights,
                            reference=use_reference, **kw)
        out.append((loss.detach(), *torch.autograd.grad(loss, (z, z_mix) if lhp == "mix" else (z,))))
    return out


@pytest.mark.parametrize("style,lhp", [("paper", "none"), ("paper", "mix"), ("paper", "propagation"),
                                       ("official", "none"), ("official", "mix")])
@pytest.mark.parametrize("task_specific,symmetric", [(True, True), (False, True), (True, False)])
def test_fast_equals_reference_float64(batch, style, lhp, task_specific, symmetric):
    negatives = batch["rand"] if style == "paper" else batch["rand_shared"]
    fast, slow = _both(batch, lhp=lhp, style=style, negatives=negatives, task_specific=task_specific,
                       symmetric=symmetric, chunk_size=13 if style == "paper" else None)
    assert fast[0].item() > 0
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("style", ["paper", "official"])
def test_fast_equals_reference_float32(batch, style):
    negatives = batch["rand"] if style == "paper" else batch["rand_shared"]
    fast, slow = _both(batch, lhp="mix", dtype=torch.float32, style=style, negatives=negatives)
    assert fast[0].dtype == slow[0].dtype == torch.float32
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _both_seeded(batch, *, style: str, rho: float, chunk: int | None, seeds=(4, 4)):
    """(value, dL/dz) of the fast path and of the reference, negatives drawn from seeded generators."""
    out = []
    for use_reference, seed in zip((False, True), seeds):
        z = batch["z"].clone().requires_grad_()
        loss = hp_objective(z, batch["f"], batch["s_ema"], batch["pool_ag"], batch["pool_sp"],
                            patches_per_image=batch["p"], lam=0.5, tau=0.5, rho=rho, style=style, chunk_size=chunk,
                            generator=torch.Generator().manual_seed(seed), reference=use_reference)
        out.append((loss.detach(), *torch.autograd.grad(loss, z)))
    return out


@pytest.mark.parametrize("style", ["paper", "official"])
@pytest.mark.parametrize("rho", [0.05, 0.3, 1.0])  # geometric gaps, uniforms, everything
@pytest.mark.parametrize("chunk", [None, 7])
def test_same_generator_gives_the_same_negatives(batch, style, rho, chunk):
    fast, slow = _both_seeded(batch, style=style, rho=rho, chunk=chunk)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    if rho < 1.0:  # the draw matters: another seed gives another loss
        fast, other = _both_seeded(batch, style=style, rho=rho, chunk=chunk, seeds=(4, 5))
        assert abs(fast[0].item() - other[0].item()) > 1e-6


def test_reference_flag_keeps_the_input_checks_and_eq1(batch):
    with pytest.raises(ValueError, match="style"):
        hp_objective(batch["z"], batch["f"], batch["s_ema"], batch["pool_ag"], batch["pool_sp"],
                     patches_per_image=batch["p"], lam=0.5, tau=0.5, rho=0.2, style="fast", reference=True)
    z, za = batch["z"][:12], batch["z_mix"][:12]
    torch.testing.assert_close(self_contrastive_loss(z, za, tau=0.4, reference=True),
                               self_contrastive_loss(z, za, tau=0.4, chunk_size=5))

