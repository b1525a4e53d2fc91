"""Which trial a search hands back: one rule, used by the end-of-run summary, the export and the
notebooks (which read the export's ``selected`` column rather than ranking trials themselves).

A trial is judged by the study's ``metric`` at the epoch whose weights it keeps: the engine reports
that epoch as ``best_epoch`` (the best validation SRCC so far with ``select_epoch = "best"``, the
latest epoch with ``"last"``), whether the trial ran to the end or a scheduler stopped it. Reports
without ``best_epoch`` (older runs) fall back to the metric's best value over the epochs. Only
validation metrics can select; a non-finite value (a diverged or collapsed model gives NaN) never
wins, and a trial with no finite value is never selected. :func:`select_by_rule` breaks ties the
same way whatever order its caller lists the trials in (the summary lists them in the order Ray
started them, the export in the order of their folders): by the trial id.

Multi-objective studies (accuracy against cost) name several ``objectives``; the first is the
*primary* one, always a validation metric (schedulers such as ASHA stop trials on it). Every
other objective is a validation metric or one of the model's costs that every trial reports
(:data:`COST_OBJECTIVES`, measured by :mod:`iqa_ray.evaluation.cost`; smaller is better). A trial is
*Pareto-optimal* when no other trial is at least as good on every objective and better on one
(values taken at the epoch whose weights the trial keeps). Which trial is handed back is a stated
:class:`SelectionRule`:

* ``best``: the best primary value (the single-objective rule; always on the front);
* ``knee``: the front's knee: each objective scaled to [0, 1] over the front (0 = its best value
  on the front), the trial closest to the ideal point (all zeros);
* ``<cost> <= <value>`` (e.g. ``latency_ms<=20``, several joined by ``,``): the best primary value
  among trials within every budget; none when no trial fits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from iqa_ray.core.metrics import METRIC_NAMES

__all__ = ["SELECTABLE_METRICS", "COST_OBJECTIVES", "MODES", "RULES", "SelectionRule", "check_selection",
           "check_objectives", "finite", "kept_report", "trial_score", "objective_values", "pareto_flags", "knee_index",
           "parse_rule", "select_trial", "select_by_rule"]

MODES = ("max", "min")
# Everything a trial reports about the validation split; `best_val_srcc` is the running maximum.
SELECTABLE_METRICS = ("best_val_srcc", *(f"val_{name}" for name in METRIC_NAMES))
# Metrics where smaller is better; selecting their maximum would hand back the worst model.
_LOWER_IS_BETTER = ("val_rmse",)
#: What every trial reports about its model's cost (iqa_ray.evaluation.cost measures them); smaller is better.
COST_OBJECTIVES = ("params_m", "gflops", "latency_ms", "latency_batch_ms")
#: Named selection rules (a budget rule is written ``<cost> <= <value>``).
RULES = ("best", "knee")


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


# ----------------------------------------------------------------------------- several objectives


@dataclass(frozen=True)
class SelectionRule:
    """How a multi-objective search picks the trial it hands back (see the module docstring).

    Attributes:
        objectives: ``(metric, mode)`` pairs, the primary one first.
        rule: ``best``, ``knee`` or ``budget``.
        budgets: ``(cost metric, largest allowed value)`` pairs of a ``budget`` rule.
    """

    objectives: tuple[tuple[str, str], ...]
    rule: str = "best"
    budgets: tuple[tuple[str, float], ...] = ()

    @classmethod
    def parse(cls, objectives: Iterable[tuple[str, str]], text: str = "best") -> "SelectionRule":
        """The rule written ``text`` (``best``, ``knee``, ``latency_ms<=20[,params_m<=5]``) over ``objectives``."""
        objectives = tuple((str(m), str(d)) for m, d in objectives)
        check_objectives(objectives)
        rule, budgets = parse_rule(text)
        if rule == "knee" and len(objectives) < 2:
            raise ValueError("selection rule 'knee' needs at least two objectives (a front); "
                             "add one, e.g. {metric = \"latency_ms\", mode = \"min\"}, or use 'best'")
        return cls(objectives, rule, budgets)

    @property
    def primary(self) -> tuple[str, str]:
        return self.objectives[0]

    def describe(self) -> str:
        if self.rule == "budget":
            return "best " + self.primary[0] + " within " + ", ".join(f"{k} <= {v:g}" for k, v in self.budgets)
        if self.rule == "knee":
            return "knee of the front of " + " / ".join(f"{m} ({d})" for m, d in self.objectives)
        return f"best {self.primary[0]} ({self.primary[1]})"


def parse_rule(text: str) -> tuple[str, tuple[tuple[str, float], ...]]:
    """``("best" | "knee", ())`` or ``("budget", ((cost, limit), ...))`` from a rule's text."""
    text = str(text).strip()
    if text in RULES:
        return text, ()
    budgets = []
    for part in text.split(","):
        key, sep, value = part.partition("<=")
        key, value = key.strip(), value.strip()
        if not sep or key not in COST_OBJECTIVES:
            raise ValueError(f"selection rule {text!r} is not valid: use one of {RULES} or a budget "
                             f"'<cost> <= <value>' with <cost> among {', '.join(COST_OBJECTIVES)} "
                             "(several joined by ',', e.g. 'latency_ms<=20,params_m<=5')")
        limit = finite(value) if value else None
        if limit is None or limit <= 0:
            raise ValueError(f"selection rule {text!r}: the budget of {key} must be a number > 0, got {value!r}")
        budgets.append((key, limit))
    return "budget", tuple(budgets)


def check_objectives(objectives: Iterable[tuple[str, str]]) -> None:
    """Raise ``ValueError`` unless the primary objective is a selectable validation metric and every
    other one is a validation metric or a cost (minimised), each named once."""
    objectives = list(objectives)
    if not objectives:
        raise ValueError("objectives must name at least one metric")
    check_selection(*objectives[0])
    names = [m for m, _ in objectives]
    if len(set(names)) != len(names):
        raise ValueError(f"objectives name a metric twice: {names}")
    for metric, mode in objectives[1:]:
        if metric in COST_OBJECTIVES:
            if mode != "min":
                raise ValueError(f"objective {metric!r} is a cost: its mode must be 'min', got {mode!r}")
        else:
            try:
                check_selection(metric, mode)
            except ValueError as exc:
                raise ValueError(f"{exc}; or a cost: {', '.join(COST_OBJECTIVES)}") from None


def objective_values(reports: Iterable[Mapping[str, Any]], objectives: Iterable[tuple[str, str]]) -> tuple[float, ...] | None:
    """A trial's value of each objective at the epoch whose weights it keeps (:func:`trial_score`),
    or ``None`` when any of them is missing or not finite."""
    reports = list(reports)
    values = []
    for metric, mode in objectives:
        value = trial_score(reports, metric, mode)
        if value is None:
            return None
        values.append(value)
    return tuple(values)


def _as_costs(values: tuple[float, ...], modes: tuple[str, ...]) -> tuple[float, ...]:
    """Values turned so that smaller is better on every objective."""
    return tuple(-v if m == "max" else v for v, m in zip(values, modes))


def pareto_flags(points: Mapping[str, tuple[float, ...] | None], modes: Iterable[str]) -> dict[str, bool]:
    """For each trial, whether it is Pareto-optimal among the trials with values (``None``: never).

    A trial is dominated when another is at least as good on every objective and strictly better on
    one; trials with identical values are all on the front.
    """
    modes = tuple(modes)
    costs = {k: _as_costs(v, modes) for k, v in points.items() if v is not None}
    flags = {}
    for key in points:
        mine = costs.get(key)
        flags[key] = mine is not None and not any(
            all(o <= m for o, m in zip(other, mine)) and any(o < m for o, m in zip(other, mine))
            for other_key, other in costs.items() if other_key != key)
    return flags


def knee_index(front: list[tuple[float, ...]], modes: Iterable[str]) -> int:
    """Index of the knee of ``front`` (Pareto-optimal values): every objective min-max scaled over the
    front with 0 at its best value, the point nearest the ideal point (0, ..., 0).

    Ties (a front of two points is always one: each is 0 on one axis and 1 on the other) go to the
    point better on the first objective, then on the next ones, then to the first listed."""
    if not front:
        raise ValueError("the front is empty")
    costs = [_as_costs(p, tuple(modes)) for p in front]
    lows = [min(c[i] for c in costs) for i in range(len(costs[0]))]
    spans = [max(c[i] for c in costs) - lows[i] for i in range(len(costs[0]))]
    distances = [math.sqrt(sum(((c[i] - lows[i]) / spans[i]) ** 2 for i in range(len(c)) if spans[i] > 0))
                 for c in costs]
    return min(range(len(front)), key=lambda i: (distances[i], costs[i], i))


def select_by_rule(trials: Mapping[str, Iterable[Mapping[str, Any]]], rule: SelectionRule) -> str | None:
    """The id of the trial ``rule`` hands back, or ``None`` when no trial qualifies.

    The answer does not depend on the order of ``trials``: they are taken in the order of their ids,
    so a tie goes to the smallest id (after :func:`knee_index`'s own tie-break).
    """
    trials = {k: list(trials[k]) for k in sorted(trials, key=str)}
    metric, mode = rule.primary
    if rule.rule == "best":
        return select_trial(trials, metric, mode)
    if rule.rule == "budget":
        within = {}
        for trial_id, reports in trials.items():
            costs = objective_values(reports, [(k, "min") for k, _ in rule.budgets])
            if costs is not None and all(c <= limit for c, (_, limit) in zip(costs, rule.budgets)):
                within[trial_id] = reports
        return select_trial(within, metric, mode)
    points = {k: objective_values(v, rule.objectives) for k, v in trials.items()}
    modes = tuple(m for _, m in rule.objectives)
    front = [k for k, on in pareto_flags(points, modes).items() if on]
    if not front:
        return None
    return front[knee_index([points[k] for k in front], modes)]
