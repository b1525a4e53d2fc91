"""Agreement between predicted quality scores and MOS: SRCC, PLCC, KRCC, RMSE, logistic PLCC.

SRCC, PLCC and KRCC are scipy's ``spearmanr``, ``pearsonr`` and ``kendalltau`` (tau-b, which
accounts for ties). ``plcc_logistic`` is PLCC after the 4-parameter logistic mapping recommended by
VQEG ("Final Report from the Video Quality Experts Group on the Validation of Objective Models of
Video Quality Assessment", 2000/2003) and used throughout the IQA literature to remove a monotone
non-linearity between predictions and MOS before measuring linear correlation.

Degenerate inputs give NaN, never an exception, so one odd validation batch cannot kill a trial:

* a correlation of fewer than 3 pairs is NaN (with 2 points any non-constant pair correlates at
  exactly +-1, which says nothing);
* a correlation with a constant input (all predictions equal, as a collapsed model produces) is
  NaN: the coefficient is 0/0, undefined;
* any non-finite value in either input makes every metric NaN (a diverged model);
* ``rmse`` is defined for any non-empty input; it is NaN only for empty input;
* ``plcc_logistic`` additionally needs 4 pairs (the logistic has 4 parameters); with 3 it is NaN.

Inputs may be numpy arrays, torch tensors (any device, with or without grad) or sequences; they
must be 1-D and of equal length.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize, stats

__all__ = [
    "METRIC_NAMES",
    "LogisticFit",
    "all_metrics",
    "krcc",
    "logistic_4p",
    "logistic_4p_fit",
    "plcc",
    "plcc_logistic",
    "rmse",
    "srcc",
]

# The keys of all_metrics, in its order; trials report each with a ``val_`` prefix.
METRIC_NAMES = ("srcc", "plcc", "krcc", "rmse", "plcc_logistic")
_MIN_CORRELATION_SAMPLES = 3
_MIN_LOGISTIC_SAMPLES = 4


def _as_array(values: Any, label: str) -> np.ndarray:
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch here
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{label} must be 1-D, got shape {array.shape}")
    return array


def _pair(pred: Any, mos: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_array(pred, "pred"), _as_array(mos, "mos")
    if x.shape != y.shape:
        raise ValueError(f"pred and mos differ in length: {x.shape[0]} vs {y.shape[0]}")
    return x, y


def _correlation_defined(x: np.ndarray, y: np.ndarray, min_samples: int = _MIN_CORRELATION_SAMPLES) -> bool:
    return (
        x.shape[0] >= min_samples
        and bool(np.all(np.isfinite(x)) and np.all(np.isfinite(y)))
        and bool(np.ptp(x) > 0 and np.ptp(y) > 0)
    )


def srcc(pred: Any, mos: Any) -> float:
    """Spearman rank-order correlation (scipy.stats.spearmanr); NaN when undefined (module doc)."""
    x, y = _pair(pred, mos)
    if not _correlation_defined(x, y):
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def plcc(pred: Any, mos: Any) -> float:
    """Pearson linear correlation (scipy.stats.pearsonr); NaN when undefined (module doc)."""
    x, y = _pair(pred, mos)
    if not _correlation_defined(x, y):
        return math.nan
    return float(stats.pearsonr(x, y).statistic)


def krcc(pred: Any, mos: Any) -> float:
    """Kendall rank correlation, tau-b (scipy.stats.kendalltau); NaN when undefined (module doc)."""
    x, y = _pair(pred, mos)
    if not _correlation_defined(x, y):
        return math.nan
    return float(stats.kendalltau(x, y).statistic)


def rmse(pred: Any, mos: Any) -> float:
    """Root mean squared error, on the scale of ``mos``; NaN for empty or non-finite input."""
    x, y = _pair(pred, mos)
    if x.shape[0] == 0 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return math.nan
    return float(np.sqrt(np.mean((x - y) ** 2)))


def logistic_4p(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """The 4-parameter logistic ``(b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2``.

    ``b1`` and ``b2`` are the upper and lower asymptotes (swapped for a decreasing relation),
    ``b3`` the midpoint and ``|b4|`` the slope scale.
    """
    z = np.clip(-(x - b3) / max(abs(b4), 1e-12), -700.0, 700.0)  # exp overflows beyond ~709
    return (b1 - b2) / (1.0 + np.exp(z)) + b2


@dataclass(frozen=True)
class LogisticFit:
    """Result of :func:`logistic_4p_fit`.

    Attributes:
        params: ``(b1, b2, b3, b4)`` of the logistic, or ``None`` when the fit failed.
        mapped: Predictions mapped onto the MOS scale (by the logistic, or by the linear fallback).
        converged: Whether the logistic fit succeeded.
        message: Why the fit failed and which fallback was used; empty on success.
    """

    params: tuple[float, float, float, float] | None
    mapped: np.ndarray
    converged: bool
    message: str = ""


def logistic_4p_fit(pred: Any, mos: Any) -> LogisticFit:
    """Fit the VQEG 4-parameter logistic from predictions to MOS (scipy.optimize.curve_fit).

    Initial values follow common practice: asymptotes at the MOS extremes (swapped when SRCC is
    negative, so the curve starts in the right direction), midpoint at the mean prediction, slope
    scale at the predictions' standard deviation.

    If the fit cannot run or fails (too few samples, constant input, no convergence, a constant
    fitted curve), a least-squares line is used instead and the failure is reported both in the
    result's ``message`` and as a ``RuntimeWarning``. PLCC after a least-squares line is |PLCC|,
    so the fallback never invents agreement.

    Args:
        pred: Predicted scores, 1-D.
        mos: Mean opinion scores, 1-D, same length.

    Returns:
        The fit.
    """
    x, y = _pair(pred, mos)
    reason = ""
    if not _correlation_defined(x, y, _MIN_LOGISTIC_SAMPLES):
        reason = (
            f"needs >= {_MIN_LOGISTIC_SAMPLES} finite, non-constant samples on both sides "
            f"(got {x.shape[0]})"
        )
    else:
        rising = stats.spearmanr(x, y).statistic >= 0
        b1, b2 = (y.max(), y.min()) if rising else (y.min(), y.max())
        initial = (b1, b2, float(np.mean(x)), float(np.std(x)))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optimize.OptimizeWarning)
                params, _ = optimize.curve_fit(logistic_4p, x, y, p0=initial, maxfev=20000)
            mapped = logistic_4p(x, *params)
            if np.all(np.isfinite(mapped)) and np.ptp(mapped) > 0:
                return LogisticFit(tuple(float(p) for p in params), mapped, True)
            reason = "the fitted logistic is constant or non-finite"
        except (RuntimeError, ValueError) as exc:
            reason = f"curve_fit failed: {exc}"

    message = f"4-parameter logistic fit failed ({reason}); falling back to a linear map"
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    if x.shape[0] >= 2 and np.ptp(x) > 0 and np.all(np.isfinite(x)) and np.all(np.isfinite(y)):
        slope, intercept = np.polyfit(x, y, 1)
        mapped = slope * x + intercept
    else:
        mapped = x.copy()
    return LogisticFit(None, mapped, False, message)


def plcc_logistic(pred: Any, mos: Any) -> float:
    """PLCC between MOS and the predictions mapped by the 4-parameter logistic.

    Like any PLCC after a fitted mapping it is >= 0 for a decreasing relation too. NaN when PLCC
    itself is undefined or fewer than 4 samples are given (module doc); when the fit fails
    otherwise, the linear fallback gives |PLCC| (and a ``RuntimeWarning``).
    """
    x, y = _pair(pred, mos)
    if not _correlation_defined(x, y, _MIN_LOGISTIC_SAMPLES):
        return math.nan
    fit = logistic_4p_fit(x, y)
    return plcc(fit.mapped, y)


def all_metrics(pred: Any, mos: Any) -> dict[str, float]:
    """Every metric at once: ``srcc``, ``plcc``, ``krcc``, ``rmse``, ``plcc_logistic``."""
    x, y = _pair(pred, mos)
    return {
        "srcc": srcc(x, y),
        "plcc": plcc(x, y),
        "krcc": krcc(x, y),
        "rmse": rmse(x, y),
        "plcc_logistic": plcc_logistic(x, y),
    }
