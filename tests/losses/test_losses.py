"""Losses against slow references written from the formulas of docs/method.md, plus properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reid_ssl.losses import (
    LOSSES,
    MedianTripletLoss,
    build_loss,
    byol_loss,
    deputy_distances,
    nt_xent_loss,
    prob_rank_k_true_negative,
    smallest_safe_k,
    truncated_triplet_loss,
)


def truncated_triplet_reference(p, z, k_lo, k_hi, gamma, margin):
    """Row by row, in plain Python: d = -2 cos; deputy = mean of sorted negatives ranks k_lo..k_hi."""
    n = p.shape[0]
    total = 0.0
    for i in range(n):
        pi = p[i] / p[i].norm()
        d = [(-2.0 * torch.dot(pi, z[j] / z[j].norm())).item() for j in range(z.shape[0])]
        negatives = sorted(d[j] for j in range(z.shape[0]) if j != i)
        deputy = sum(negatives[k_lo - 1 : k_hi]) / (k_hi - k_lo + 1)
        total += max(0.0, gamma * d[i] - deputy + margin)
    return total / n


@pytest.mark.parametrize("n,dim", [(12, 8), (33, 16), (64, 5)])
@pytest.mark.parametrize("k_lo,k_hi", [(2, 10), (1, 1), (3, 3), (1, 5), (5, 11)])
@pytest.mark.parametrize("gamma,margin", [(2.0, 100.0), (1.0, 0.1), (2.0, 0.0)])
def test_matches_loop_reference(n, dim, k_lo, k_hi, gamma, margin):
    g = torch.Generator().manual_seed(n * 100 + dim + k_lo + k_hi)
    p = torch.randn(n, dim, generator=g, dtype=torch.float64)
    z = torch.randn(n, dim, generator=g, dtype=torch.float64)
    got = truncated_triplet_loss(p, z, k_lo, k_hi, gamma, margin).item()
    assert got == pytest.approx(truncated_triplet_reference(p, z, k_lo, k_hi, gamma, margin), abs=1e-5)


def test_extra_negatives_rows_are_only_negatives():
    """z with more rows than p (gathered negatives): the extra rows never act as positives."""
    g = torch.Generator().manual_seed(1)
    p = torch.randn(8, 6, generator=g, dtype=torch.float64)
    z = torch.randn(20, 6, generator=g, dtype=torch.float64)
    got = truncated_triplet_loss(p, z, 2, 10).item()
    assert got == pytest.approx(truncated_triplet_reference(p, z, 2, 10, 2.0, 100.0), abs=1e-5)


def test_hand_made_similarity_drops_rank_one_and_averages_two_to_ten():
    """Anchor 0 sees negatives with cosines 0.95 (hardest), 0.9, 0.8, ..., 0.1, then -0.5s."""
    cosines = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, -0.5, -0.5]
    n = len(cosines) + 1
    sim = torch.full((n, n), -0.5)
    sim[0, 0] = 1.0
    sim[0, 1:] = torch.tensor(cosines)
    d = -2.0 * sim
    deputy = deputy_distances(d, 2, 10)[0].item()
    expected = -2.0 * sum(cosines[1:10]) / 9  # ranks 2..10: 0.9 .. 0.1, the 0.95 is dropped
    assert deputy == pytest.approx(expected)
    assert deputy_distances(d, 1, 1)[0].item() == pytest.approx(-2 * 0.95)  # hardest negative
    assert deputy_distances(d, 3, 3)[0].item() == pytest.approx(-2 * 0.8)  # single rank-3 negative


def test_positive_is_never_a_negative():
    """Even if the positive is the most similar, it must not enter the deputy."""
    d = -2.0 * torch.tensor([[1.0, 0.2, 0.1], [0.0, 1.0, 0.3], [0.5, 0.4, 1.0]])
    assert deputy_distances(d, 1, 1).tolist() == pytest.approx([-0.4, -0.6, -1.0])


def test_large_margin_gives_the_linear_form():
    """docs/method.md, "The truncated triplet loss": l_i = -4 cos(p_i, z_i) + 2 mean_{r=2..10} cos(p_i, z_(r)) + 100."""
    g = torch.Generator().manual_seed(3)
    p, z = torch.randn(40, 32, generator=g), torch.randn(40, 32, generator=g)
    cos = F.normalize(p, dim=1) @ F.normalize(z, dim=1).t()
    masked = cos.clone().fill_diagonal_(-math.inf)
    top = masked.topk(10, dim=1).values[:, 1:10]
    linear = (-4 * cos.diagonal() + 2 * top.mean(dim=1) + 100).mean()
    assert truncated_triplet_loss(p, z).item() == pytest.approx(linear.item(), abs=1e-4)


def test_gradients_reach_p_only_through_positive_and_deputy():
    g = torch.Generator().manual_seed(4)
    p = torch.randn(16, 8, generator=g, requires_grad=True)
    z = torch.randn(16, 8, generator=g, requires_grad=True)
    truncated_triplet_loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    # z is a leaf here so it gets a gradient too; in training z comes from the no-grad target branch
    # (see test_models.py::test_no_gradient_reaches_target).


def test_loss_is_permutation_invariant():
    g = torch.Generator().manual_seed(5)
    p, z = torch.randn(24, 8, generator=g), torch.randn(24, 8, generator=g)
    perm = torch.randperm(24, generator=g)
    assert truncated_triplet_loss(p[perm], z[perm]).item() == pytest.approx(truncated_triplet_loss(p, z).item())


def test_loss_falls_when_optimising_a_separable_toy_batch():
    g = torch.Generator().manual_seed(6)
    z = F.normalize(torch.randn(32, 16, generator=g), dim=1)
    p = torch.randn(32, 16, generator=g, requires_grad=True)
    opt = torch.optim.SGD([p], lr=5.0)
    first = truncated_triplet_loss(p, z).item()
    for _ in range(50):
        opt.zero_grad()
        loss = truncated_triplet_loss(p, z)
        loss.backward()
        opt.step()
    assert loss.item() < first - 2.0  # the optimum is about 96 (cos = 1 to z_i, deputy cosines ~ 0)


def test_bad_arguments_raise():
    p = torch.randn(5, 4)
    with pytest.raises(ValueError, match="k_lo"):
        truncated_triplet_loss(p, p, k_lo=3, k_hi=2)
    with pytest.raises(ValueError, match="negatives"):
        truncated_triplet_loss(p, p, k_lo=2, k_hi=10)
    with pytest.raises(ValueError, match="same D"):
        truncated_triplet_loss(p, torch.randn(5, 3))
    with pytest.raises(KeyError, match="choose one of"):
        build_loss("nope")


def test_byol_loss_is_two_minus_two_cos():
    g = torch.Generator().manual_seed(7)
    p, z = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g)
    expected = sum(2 - 2 * F.cosine_similarity(p[i], z[i], dim=0).item() for i in range(10)) / 10
    assert byol_loss(p, z).item() == pytest.approx(expected, abs=1e-6)


def nt_xent_reference(p, z, t):
    """Anchor p_i; candidates: z_j (all j, positive j=i) and p_j (j != i)."""
    p, z = F.normalize(p, dim=1), F.normalize(z, dim=1)
    total = 0.0
    for i in range(p.shape[0]):
        logits = [torch.dot(p[i], z[j]).item() / t for j in range(z.shape[0])]
        logits += [torch.dot(p[i], p[j]).item() / t for j in range(p.shape[0]) if j != i]
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    return total / p.shape[0]


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_matches_reference(t):
    g = torch.Generator().manual_seed(8)
    p, z = torch.randn(9, 5, generator=g), torch.randn(9, 5, generator=g)
    assert nt_xent_loss(p, z, t).item() == pytest.approx(nt_xent_reference(p, z, t), abs=1e-4)


def test_median_variant_uses_the_median_negative():
    g = torch.Generator().manual_seed(9)
    p = torch.randn(11, 4, generator=g, dtype=torch.float64)
    z = torch.randn(11, 4, generator=g, dtype=torch.float64)
    # 10 negatives: lower median = rank 5
    got = MedianTripletLoss()(p, z).item()
    assert got == pytest.approx(truncated_triplet_reference(p, z, 5, 5, 2.0, 100.0), abs=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registered_loss_gives_a_finite_scalar(name):
    p, z = torch.randn(16, 8, requires_grad=True), torch.randn(16, 8)
    loss = build_loss(name)(p, z)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and torch.isfinite(p.grad).all()


# ----- the Bernoulli rule (docs/method.md, "Choosing k") ---------------------------------------------------------


@pytest.mark.parametrize(
    "negatives,classes,k,expected",
    [
        (195, 1000, 1, 0.823),
        (195, 1000, 2, 0.983),
        (195, 1000, 3, 0.999),
        (4095, 1000, 10, 0.991),
        (195, 28310, 1, 0.993),
        (195, 751, 2, 0.97),
        (6271, 1000, 15, 0.998),
    ],
)
def test_bernoulli_table(negatives, classes, k, expected):
    assert round(prob_rank_k_true_negative(negatives, classes, k), 3 if expected * 1000 % 10 else 2) == expected


def test_bernoulli_matches_a_simulation():
    g = torch.Generator().manual_seed(0)
    draws = torch.binomial(torch.full((200_000,), 195.0), torch.full((200_000,), 1 / 1000), generator=g)
    assert (draws < 2).float().mean().item() == pytest.approx(prob_rank_k_true_negative(195, 1000, 2), abs=0.002)


def test_smallest_safe_k():
    assert smallest_safe_k(195, 1000) == 3
    assert smallest_safe_k(4095, 1000) == 10
    assert smallest_safe_k(195, 28310) == 1
