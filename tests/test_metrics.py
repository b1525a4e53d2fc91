"""Metrics agree with scipy, handle degenerate input as documented, and the logistic fit helps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from iqa_ray.core import metrics
from iqa_ray.core.metrics import all_metrics, krcc, logistic_4p_fit, plcc, plcc_logistic, rmse, srcc


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_scipy_on_arrays_with_ties(seed):
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, 8, size=60).astype(float)  # few distinct values: many ties
    mos = np.round(pred * 10 + rng.normal(0, 15, size=60))
    assert srcc(pred, mos) == pytest.approx(stats.spearmanr(pred, mos).statistic, abs=1e-12)
    assert plcc(pred, mos) == pytest.approx(stats.pearsonr(pred, mos).statistic, abs=1e-12)
    assert krcc(pred, mos) == pytest.approx(stats.kendalltau(pred, mos).statistic, abs=1e-12)
    assert rmse(pred, mos) == pytest.approx(math.sqrt(np.mean((pred - mos) ** 2)), abs=1e-12)


def test_torch_tensors_are_accepted_and_agree_with_numpy():
    rng = np.random.default_rng(3)
    pred, mos = rng.normal(size=40), rng.normal(size=40)
    pred_t = torch.tensor(pred, dtype=torch.float64, requires_grad=True)
    from_torch = all_metrics(pred_t, torch.tensor(mos))
    from_numpy = all_metrics(pred, mos)
    assert from_torch == pytest.approx(from_numpy, abs=1e-12)
    assert from_numpy["srcc"] == pytest.approx(stats.spearmanr(pred, mos).statistic, abs=1e-12)


def test_all_metrics_keys_and_perfect_agreement():
    mos = np.linspace(10, 90, 20)
    result = all_metrics(mos, mos)
    assert set(result) == {"srcc", "plcc", "krcc", "rmse", "plcc_logistic"}
    assert result["srcc"] == pytest.approx(1.0)
    assert result["plcc"] == pytest.approx(1.0)
    assert result["krcc"] == pytest.approx(1.0)
    assert result["rmse"] == 0.0
    assert result["plcc_logistic"] == pytest.approx(1.0, abs=1e-9)


def test_logistic_plcc_beats_raw_plcc_on_monotone_nonlinear_relation():
    rng = np.random.default_rng(4)
    pred = rng.uniform(0, 1, size=300)
    mos = 100 / (1 + np.exp(-(pred - 0.5) / 0.06)) + rng.normal(0, 2, size=300)
    raw = plcc(pred, mos)
    mapped = plcc_logistic(pred, mos)
    assert mapped > raw + 0.03
    assert mapped > 0.99
    fit = logistic_4p_fit(pred, mos)
    assert fit.converged and fit.message == ""
    b1, b2, b3, _ = fit.params
    assert b1 == pytest.approx(100, abs=3) and b2 == pytest.approx(0, abs=3) and b3 == pytest.approx(0.5, abs=0.02)


def test_logistic_fit_handles_a_decreasing_relation():
    pred = np.linspace(-3, 3, 50)
    mos = 80 - 60 / (1 + np.exp(-pred))
    fit = logistic_4p_fit(pred, mos)
    assert fit.converged
    assert plcc_logistic(pred, mos) == pytest.approx(1.0, abs=1e-6)


def test_failed_logistic_fit_is_reported_and_falls_back_to_raw_plcc(monkeypatch):
    def failing_curve_fit(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found")

    monkeypatch.setattr(metrics.optimize, "curve_fit", failing_curve_fit)
    rng = np.random.default_rng(5)
    pred, mos = rng.normal(size=30), rng.normal(size=30)
    with pytest.warns(RuntimeWarning, match="logistic fit failed"):
        fit = logistic_4p_fit(pred, mos)
    assert not fit.converged and fit.params is None
    assert "Optimal parameters not found" in fit.message
    with pytest.warns(RuntimeWarning):
        assert plcc_logistic(pred, mos) == pytest.approx(abs(plcc(pred, mos)), abs=1e-12)
    assert optimize.curve_fit is failing_curve_fit  # the patch really was in effect


def test_constant_predictions_give_nan_correlations_not_errors():
    mos = np.array([10.0, 20.0, 30.0, 40.0])
    result = all_metrics(np.full(4, 3.0), mos)
    for key in ("srcc", "plcc", "krcc", "plcc_logistic"):
        assert math.isnan(result[key]), key
    assert result["rmse"] == pytest.approx(math.sqrt(np.mean((3.0 - mos) ** 2)))


def test_fewer_than_three_samples_give_nan_correlations():
    result = all_metrics([1.0, 2.0], [3.0, 5.0])
    assert all(math.isnan(result[k]) for k in ("srcc", "plcc", "krcc", "plcc_logistic"))
    assert result["rmse"] == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 5) ** 2) / 2))
    assert math.isnan(rmse([], []))
    # Three samples: correlations defined, logistic PLCC (4 parameters) not.
    three = all_metrics([1.0, 2.0, 4.0], [1.0, 3.0, 2.0])
    assert three["srcc"] == pytest.approx(0.5) and math.isnan(three["plcc_logistic"])


def test_non_finite_predictions_give_nan():
    assert math.isnan(srcc([1.0, np.nan, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]))
    assert math.isnan(rmse([1.0, np.inf], [1.0, 2.0]))


def test_shape_errors_are_reported():
    with pytest.raises(ValueError, match="length"):
        srcc([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="1-D"):
        plcc(np.zeros((3, 2)), np.zeros((3, 2)))
