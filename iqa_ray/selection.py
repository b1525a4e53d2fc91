"""Which trial a search hands back: one rule, used by the end-of-run summary, the export and the
notebooks (which read the export's ``selected`` column rather than ranking trials themselves).

A trial is judged by the study's ``metric`` at the epoch whose weights it keeps: the engine reports
that epoch as ``best_epoch`` (the best validation SRCC so far with ``select_epoch = "best"``, the
latest epoch with ``"last"``), whether the trial ran to the end or a scheduler stopped it. Reports
without ``best_epoch`` (older runs) fall back to the metric's best value over the epochs. Only
validation metrics can select; a non-finite value (a diverged or collapsed model gives NaN) never
wins, and a trial with no finite value is never selected. Ties go to the trial listed first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from iqa_ray.metrics import METRIC_NAMES

__all__ = ["SELECTABLE_METRICS", "MODES", "check_selection", "finite", "kept_report", "trial_score", "select_trial"]

MODES = ("max", "min")
# Everything a trial reports about the validation split; `best_val_srcc` is the running maximum.
SELECTABLE_METRICS = ("best_val_srcc", *(f"val_{name}" for name in METRIC_NAMES))
# Metrics where smaller is better; selecting their maximum would hand back the worst model.
_LOWER_IS_BETTER = ("val_rmse",)


def check_selection(metric: str, mode: str) -> None:
    """Raise ``ValueError`` unless trials report ``metric`` and ``mode`` picks its better end.

    Args:
        metric: a study's ``metric``.
        mode: a study's ``mode``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if metric.startswith("test_"):
        raise ValueError(f"metric {metric!r} is a test metric: selecting on the test split would flatter the "
                         f"result; choose a validation metric: {', '.join(SELECTABLE_METRICS)}")
    if metric not in SELECTABLE_METRICS:
        raise ValueError(f"metric {metric!r} is not reported by the trials; valid: {', '.join(SELECTABLE_METRICS)}")
    better = "min" if metric in _LOWER_IS_BETTER else "max"
    if mode != better:
        raise ValueError(f"metric {metric!r} with mode {mode!r} would select the worst trial; use mode {better!r}")


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else ``None`` (NaN, inf, None, text)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def trial_score(reports: Iterable[Mapping[str, Any]], metric: str, mode: str) -> float | None:
    """A trial's value of ``metric`` at its best reported epoch, or ``None`` if it has no finite one.

    Args:
        reports: the trial's reported results (one mapping per epoch; missing keys are skipped).
        metric: the study's metric.
        mode: ``max`` or ``min``.
    """
    reports = list(reports)
    kept = kept_report(reports)
    if kept is not None:
        return finite(kept.get(metric))
    values = [v for v in (finite(r.get(metric)) for r in reports) if v is not None]
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def kept_report(reports: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The report of the epoch whose weights the trial keeps (its last report's ``best_epoch``).

    ``None`` when the reports do not say (no ``best_epoch``) or the kept epoch is not among them;
    a trial whose every epoch was non-finite reports ``best_epoch`` 0 and keeps nothing.
    """
    reports = list(reports)
    if not reports or "best_epoch" not in reports[-1]:
        return None
    kept = reports[-1]["best_epoch"]
    return next((r for r in reports if r.get("epoch") == kept), None)


def select_trial(trials: Mapping[str, Iterable[Mapping[str, Any]]], metric: str, mode: str) -> str | None:
    """The id of the trial to hand back, or ``None`` when no trial has a finite ``metric``.

    Args:
        trials: trial id -> that trial's reported results, in a stable order (ties go to the first).
        metric: the study's metric (see :func:`check_selection`).
        mode: ``max`` or ``min``.
    """
    check_selection(metric, mode)
    best_id, best = None, None
    for trial_id, reports in trials.items():
        score = trial_score(reports, metric, mode)
        if score is None:
            continue
        if best is None or (score > best if mode == "max" else score < best):
            best_id, best = trial_id, score
    return best_id
