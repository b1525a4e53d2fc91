"""Regression losses: exact L1 equivalence at alpha=0, brute-force ranking values, validation."""

from __future__ import annotations

import itertools

import pytest
import torch

from iqa_ray.models.losses import LOSSES, L1Loss, MSELoss, RankingLoss, build_loss


def _brute_force_rank(pred: torch.Tensor, target: torch.Tensor, margin: float) -> float:
    terms = [
        max(0.0, margin - (float(pred[i]) - float(pred[j])))
        for i, j in itertools.product(range(len(pred)), repeat=2)
        if float(target[i]) > float(target[j])
    ]
    return sum(terms) / len(terms) if terms else 0.0


def test_alpha_zero_is_exactly_l1_including_gradients():
    torch.manual_seed(0)
    target = torch.rand(16) * 100
    base = torch.rand(16) * 100

    pred_l1 = base.clone().requires_grad_(True)
    l1 = L1Loss()(pred_l1, target)["loss"]
    l1.backward()

    pred_rank = base.clone().requires_grad_(True)
    ranked = RankingLoss(alpha=0.0, margin=0.5)(pred_rank, target)["loss"]
    ranked.backward()

    assert torch.equal(l1.detach(), ranked.detach())
    assert torch.equal(pred_l1.grad, pred_rank.grad)


@pytest.mark.parametrize("alpha,margin", [(0.3, 0.5), (1.0, 1.0), (0.7, 0.0)])
def test_ranking_loss_matches_brute_force_double_loop(alpha, margin):
    pred = torch.tensor([0.2, 0.9, 0.4, 0.4, 1.5, -0.3], dtype=torch.float64)
    target = torch.tensor([10.0, 30.0, 30.0, 5.0, 60.0, 5.0], dtype=torch.float64)  # ties included
    parts = RankingLoss(alpha=alpha, margin=margin)(pred, target)

    expected_rank = _brute_force_rank(pred, target, margin)
    expected_l1 = float((pred - target).abs().mean())
    assert parts["rank"].item() == pytest.approx(expected_rank, abs=1e-12)
    assert parts["l1"].item() == pytest.approx(expected_l1, abs=1e-12)
    assert parts["loss"].item() == pytest.approx((1 - alpha) * expected_l1 + alpha * expected_rank, abs=1e-12)


def test_ranking_term_penalises_misordered_pairs_only():
    target = torch.tensor([10.0, 20.0, 30.0])
    in_order = RankingLoss(alpha=1.0, margin=0.5)(torch.tensor([1.0, 2.0, 3.0]), target)["rank"]
    reversed_ = RankingLoss(alpha=1.0, margin=0.5)(torch.tensor([3.0, 2.0, 1.0]), target)["rank"]
    assert in_order.item() == 0.0
    assert reversed_.item() > 1.0


def test_no_valid_pair_gives_zero_rank_term():
    pred = torch.tensor([1.0, 5.0, 3.0], requires_grad=True)
    parts = RankingLoss(alpha=0.5, margin=1.0)(pred, torch.full((3,), 42.0))
    assert parts["rank"].item() == 0.0
    parts["loss"].backward()
    assert torch.isfinite(pred.grad).all()
    single = RankingLoss(alpha=0.5)(torch.tensor([1.0]), torch.tensor([2.0]))
    assert single["rank"].item() == 0.0


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_invalid_alpha_is_rejected_with_value_and_range(alpha):
    with pytest.raises(ValueError, match=r"alpha=.*\[0, 1\]"):
        RankingLoss(alpha=alpha)


@pytest.mark.parametrize("margin", [-0.5, float("nan"), float("inf")])
def test_invalid_margin_is_rejected_with_value_and_range(margin):
    with pytest.raises(ValueError, match=r"margin=.*valid range"):
        RankingLoss(margin=margin)


def test_mismatched_shapes_are_rejected_instead_of_broadcast():
    with pytest.raises(ValueError, match="shape"):
        L1Loss()(torch.zeros(4, 1), torch.zeros(4))


def test_mse_and_l1_values():
    pred, target = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 0.0, 1.0])
    assert L1Loss()(pred, target)["loss"].item() == pytest.approx(5 / 3)
    assert MSELoss()(pred, target)["loss"].item() == pytest.approx(13 / 3)


def test_build_loss_registry():
    assert set(LOSSES) == {"l1", "mse", "ranking"}
    loss = build_loss("ranking", alpha=0.2, margin=0.7)
    assert isinstance(loss, RankingLoss) and (loss.alpha, loss.margin) == (0.2, 0.7)
    assert isinstance(build_loss("mse"), MSELoss)
    with pytest.raises(ValueError, match="l1, mse, ranking"):
        build_loss("huber")
    with pytest.raises(TypeError, match="alpah"):
        build_loss("ranking", alpah=0.3)
    with pytest.raises(TypeError, match="no arguments"):
        build_loss("l1", margin=1.0)
