"""Multi-objective studies: accuracy against cost, Pareto flags and the rule that picks a trial."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from iqa_ray.core.selection import (
    COST_OBJECTIVES,
    SelectionRule,
    knee_index,
    objective_values,
    pareto_flags,
    parse_rule,
    select_by_rule,
)
from iqa_ray.search.study import StudyError
from iqa_ray.search.study_file import parse_study

NAN = float("nan")
SRCC_LATENCY = (("val_srcc", "max"), ("latency_ms", "min"))


def reports(srcc: float, latency: float, epochs: int = 2) -> list[dict]:
    """A trial's reports: its SRCC climbs to ``srcc`` at the last (kept) epoch; cost is constant."""
    return [{"epoch": e, "best_epoch": epochs, "val_srcc": srcc - 0.1 * (epochs - e), "latency_ms": latency,
             "params_m": latency / 10} for e in range(1, epochs + 1)]


def brute_force_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """Pareto-optimal (max first, min second) by the definition, pair by pair."""
    def dominates(a, b):
        return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])
    return {k for k, p in points.items() if not any(dominates(q, p) for j, q in points.items() if j != k)}


def test_pareto_flags_equal_the_definition_on_random_trials():
    rng = np.random.default_rng(0)
    for _ in range(20):
        points = {f"t{i}": (float(rng.choice([0.5, 0.6, 0.7, 0.8])), float(rng.choice([5, 10, 20, 40])))
                  for i in range(12)}  # a coarse grid: ties and duplicates happen
        flags = pareto_flags(points, ("max", "min"))
        assert {k for k, on in flags.items() if on} == brute_force_front(points)


def test_a_trial_without_finite_values_is_never_on_the_front():
    trials = {"ok": reports(0.7, 10), "nan": reports(NAN, 1), "no_cost": [{"epoch": 1, "best_epoch": 1, "val_srcc": 0.9}]}
    points = {k: objective_values(v, SRCC_LATENCY) for k, v in trials.items()}
    assert points["nan"] is None and points["no_cost"] is None and points["ok"] == (0.7, 10)
    assert pareto_flags(points, ("max", "min")) == {"ok": True, "nan": False, "no_cost": False}


def test_values_are_taken_at_the_kept_epoch():
    rows = [{"epoch": 1, "best_epoch": 1, "val_srcc": 0.8, "latency_ms": 5.0},
            {"epoch": 2, "best_epoch": 1, "val_srcc": 0.6, "latency_ms": 5.0}]
    assert objective_values(rows, SRCC_LATENCY) == (0.8, 5.0)


def test_the_knee_is_the_front_point_nearest_the_ideal_after_scaling():
    front = [(0.90, 100.0), (0.88, 20.0), (0.80, 5.0), (0.60, 1.0)]
    # scaled: srcc gap / 0.30, latency / 99 -> distances 1.0, 0.22, 0.40, 1.0 -> the second point
    assert knee_index(front, ("max", "min")) == 1
    assert knee_index([(0.5, 3.0)], ("max", "min")) == 0  # one point: itself
    # scaling makes the knee independent of units (ms or s)
    assert knee_index([(a, b / 1000) for a, b in front], ("max", "min")) == 1


def test_best_knee_and_budget_rules_pick_their_trials():
    trials = {"big": reports(0.90, 100.0), "knee": reports(0.88, 20.0), "small": reports(0.80, 5.0),
              "tiny": reports(0.60, 1.0), "dominated": reports(0.79, 30.0)}
    assert select_by_rule(trials, SelectionRule.parse(SRCC_LATENCY, "best")) == "big"
    assert select_by_rule(trials, SelectionRule.parse(SRCC_LATENCY, "knee")) == "knee"
    assert select_by_rule(trials, SelectionRule.parse(SRCC_LATENCY, "latency_ms<=10")) == "small"
    assert select_by_rule(trials, SelectionRule.parse(SRCC_LATENCY, "latency_ms<=30,params_m<=1")) == "small"
    assert select_by_rule(trials, SelectionRule.parse(SRCC_LATENCY, "latency_ms<=0.5")) is None
    # a budget works in a single-objective study too (the cost is reported by every trial)
    assert select_by_rule(trials, SelectionRule.parse([("val_srcc", "max")], "latency_ms<=25")) == "knee"


def test_the_trial_handed_back_does_not_depend_on_the_order_trials_are_listed_in():
    # The summary lists trials in the order Ray started them, the export in the order of their
    # folders: on a tie they must still agree (CI once saw them hand back different trials).
    # A front of two points is always a tie for the knee: each is 0 on one scaled axis and 1 on the other.
    two = {"5da4e225": reports(0.33, 14.0), "4ee29d46": reports(0.09, 3.0)}
    knee = SelectionRule.parse(SRCC_LATENCY, "knee")
    for order in (list(two), list(reversed(two))):
        assert select_by_rule({k: two[k] for k in order}, knee) == "5da4e225"  # the more accurate one
    # exact ties on the primary metric go to the smallest trial id, in any order
    tied = {"b": reports(0.5, 10.0), "a": reports(0.5, 10.0), "c": reports(0.4, 1.0)}
    best = SelectionRule.parse(SRCC_LATENCY, "best")
    for order in (["b", "a", "c"], ["c", "a", "b"]):
        assert select_by_rule({k: tied[k] for k in order}, best) == "a"
    assert knee_index([(0.09, 3.0), (0.33, 14.0)], ("max", "min")) == 1


@pytest.mark.parametrize("text, match", [
    ("fastest", "not valid: use one of"),
    ("val_srcc<=0.5", "not valid"),
    ("latency_ms<20", "not valid"),
    ("latency_ms<=-1", "must be a number > 0"),
    ("latency_ms<=abc", "must be a number > 0"),
])
def test_a_bad_rule_names_what_is_valid(text, match):
    with pytest.raises(ValueError, match=match):
        parse_rule(text)


@pytest.mark.parametrize("objectives, match", [
    ((("latency_ms", "min"), ("val_srcc", "max")), "not reported by the trials"),  # a cost cannot be primary
    ((("val_srcc", "max"), ("latency_ms", "max")), "is a cost: its mode must be 'min'"),
    ((("val_srcc", "max"), ("test_srcc", "max")), "test metric"),
    ((("val_srcc", "max"), ("val_srcc", "max")), "twice"),
    ((("val_srcc", "max"), ("fps", "max")), "or a cost: params_m"),
])
def test_bad_objectives_are_refused(objectives, match):
    with pytest.raises(ValueError, match=match):
        SelectionRule.parse(objectives)


def test_knee_needs_a_front():
    with pytest.raises(ValueError, match="'knee' needs at least two objectives"):
        SelectionRule.parse([("val_srcc", "max")], "knee")


STUDY = {"study": {"objectives": [{"metric": "val_srcc", "mode": "max"}, {"metric": "latency_ms", "mode": "min"}],
                   "select": "knee", "sampler": "nsga2"},
         "params": {"lr": {"role": "nuisance", "type": "loguniform", "low": 1e-4, "high": 1e-2}}}


def test_a_study_names_its_objectives_rule_and_sampler():
    study = parse_study(STUDY, name="front")
    assert study.objectives == SRCC_LATENCY and study.multi_objective
    assert (study.metric, study.mode) == ("val_srcc", "max")  # the primary drives ASHA
    assert study.selection_rule.rule == "knee" and study.sampler == "nsga2"
    assert "val_srcc (max) and latency_ms (min), sampler nsga2; hand back the knee" in study.describe()[2]
    single = parse_study({"params": STUDY["params"]}, name="one")
    assert single.objectives == (("val_srcc", "max"),) and not single.multi_objective
    assert single.with_select("latency_ms<=20").selection_rule.budgets == (("latency_ms", 20.0),)


@pytest.mark.parametrize("change, match", [
    ({"objectives": [{"metric": "val_srcc"}]}, "list of {metric, mode} tables"),
    ({"objectives": []}, "list of {metric, mode} tables"),
    ({"metric": "val_plcc"}, "disagrees with the first \\(primary\\) objective"),
    ({"objectives": [{"metric": "val_srcc", "mode": "max"}, {"metric": "gflops", "mode": "max"}]}, "mode must be 'min'"),
    ({"select": "cheapest"}, "selection rule 'cheapest' is not valid"),
    ({"sampler": "cmaes"}, "sampler must be one of"),
])
def test_bad_multi_objective_studies_fail_when_they_load(change, match):
    data = json.loads(json.dumps(STUDY))
    data["study"].update(change)
    with pytest.raises(StudyError, match=match):
        parse_study(data, name="bad")


def test_select_flag_is_validated_against_the_study():
    single = parse_study({"params": STUDY["params"]}, name="one")
    with pytest.raises(StudyError, match="--select: selection rule 'knee' needs at least two objectives"):
        single.with_select("knee")


def test_every_cost_objective_is_reported_by_the_cost_module():
    from iqa_ray.evaluation.cost import COST_METRICS

    assert tuple(COST_METRICS) == COST_OBJECTIVES and set(COST_METRICS.values()) == {"min"}


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_the_optuna_searcher_is_told_every_objective(sampler, tmp_path):
    import optuna

    from iqa_ray.search.settings import SearchSettings
    from iqa_ray.search.tuner import make_searcher

    data = json.loads(json.dumps(STUDY))
    data["study"]["sampler"] = sampler
    study = parse_study(data, name="front")
    settings = SearchSettings(study=study, name="mo", storage=str(tmp_path), searcher="optuna", scheduler="asha",
                              num_samples=9, max_epochs=2, grace_period=1, reduction_factor=2, max_concurrent=None,
                              cpus_per_trial=1, gpus_per_trial=0, seed=0)
    searcher, _, _ = make_searcher(settings, tmp_path / "optuna.db")
    assert searcher.metric == ["val_srcc", "latency_ms"] and searcher._mode == ["max", "min"]
    expected = optuna.samplers.NSGAIISampler if sampler == "nsga2" else optuna.samplers.TPESampler
    assert isinstance(searcher._sampler, expected)


def test_the_optuna_study_stores_both_values_of_a_finished_trial(tmp_path):
    """Through Tune's searcher interface, as the Tuner drives it: suggest, complete, read back."""
    import optuna

    from iqa_ray.search.settings import SearchSettings
    from iqa_ray.search.tuner import make_searcher

    study = parse_study(STUDY, name="front")
    settings = SearchSettings(study=study, name="mo", storage=str(tmp_path), searcher="optuna", scheduler="asha",
                              num_samples=4, max_epochs=2, grace_period=1, reduction_factor=2, max_concurrent=None,
                              cpus_per_trial=1, gpus_per_trial=0, seed=0)
    searcher, _, _ = make_searcher(settings, tmp_path / "optuna.db")
    for i, (srcc, ms) in enumerate(itertools.islice([(0.7, 9.0), (0.8, 20.0), (0.6, 30.0)], 3)):
        config = searcher.suggest(f"t{i}")
        assert 1e-4 <= config["lr"] <= 1e-2
        searcher.on_trial_complete(f"t{i}", {"val_srcc": srcc, "latency_ms": ms, "training_iteration": 2})
    stored = optuna.load_study(study_name="mo", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.values for t in stored.trials] == [[0.7, 9.0], [0.8, 20.0], [0.6, 30.0]]
    assert sorted(t.number for t in stored.best_trials) == [0, 1]  # Optuna's own front agrees


def write_trial(exp, trial_id: str, rows: list[dict]) -> None:
    folder = exp / f"trial_{trial_id}"
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps({"lr": 0.01, "epochs": 2}))
    (folder / "result.json").write_text("".join(json.dumps({"trial_id": trial_id, **r}) + "\n" for r in rows))


@pytest.mark.parametrize("select, chosen", [("knee", "knee"), ("best", "big"), ("latency_ms<=10", "small")])
def test_the_export_flags_the_front_and_selects_by_the_recorded_rule(tmp_path, select, chosen):
    import pandas as pd

    from iqa_ray.search.export import export_experiment

    exp = tmp_path / "exp"
    trials = {"big": reports(0.90, 100.0), "knee": reports(0.88, 20.0), "small": reports(0.80, 5.0),
              "dominated": reports(0.79, 30.0)}
    for trial_id, rows in trials.items():
        write_trial(exp, trial_id, rows)
    (exp / "experiment.json").write_text(json.dumps({"metric": "val_srcc", "mode": "max", "select": select,
                                                     "objectives": [list(o) for o in SRCC_LATENCY],
                                                     "study_definition": STUDY}))
    export_experiment(exp)
    frame = pd.read_parquet(exp / "trials.parquet").set_index("trial_id")
    assert frame.pareto_optimal.to_dict() == {"big": True, "dominated": False, "knee": True, "small": True}
    assert frame.index[frame.selected].tolist() == [chosen]
    assert frame.loc["knee", "latency_ms"] == 20.0


def test_the_export_marks_the_trial_the_summary_handed_back_with_its_test_figures(tmp_path):
    import pandas as pd

    from iqa_ray.search.export import export_experiment

    exp = tmp_path / "exp"
    for trial_id, rows in {"b": reports(0.33, 14.0), "a": reports(0.09, 3.0)}.items():
        write_trial(exp, trial_id, rows)
    (exp / "experiment.json").write_text(json.dumps({"metric": "val_srcc", "mode": "max", "select": "knee",
                                                     "objectives": [list(o) for o in SRCC_LATENCY],
                                                     "study_definition": STUDY}))
    # The summary is the record of what the run handed back and scored on test (here the cheaper
    # trial, as a run recorded with another tie-break would have): the export follows it, so the
    # selected row always carries the test figures.
    (exp / "summary.json").write_text(json.dumps({"best_trial_id": "a", "test": {"srcc": 0.08, "plcc": 0.07}}))
    export_experiment(exp)
    frame = pd.read_parquet(exp / "trials.parquet").set_index("trial_id")
    assert frame.index[frame.selected].tolist() == ["a"]
    assert frame.loc["a", "test_srcc"] == 0.08 and frame.loc["a", "test_source"] == "checkpoint"
    assert pd.isna(frame.loc["b", "test_srcc"]) and frame.pareto_optimal.all()


def test_an_old_experiment_without_objectives_exports_as_before(tmp_path):
    import pandas as pd

    from iqa_ray.search.export import export_experiment

    exp = tmp_path / "exp"
    write_trial(exp, "a", reports(0.7, 10.0))
    write_trial(exp, "b", reports(0.8, 50.0))
    (exp / "experiment.json").write_text(json.dumps({"metric": "val_srcc", "mode": "max",
                                                     "study_definition": {"params": STUDY["params"]}}))
    export_experiment(exp)
    frame = pd.read_parquet(exp / "trials.parquet").set_index("trial_id")
    assert frame.index[frame.selected].tolist() == ["b"]
    assert frame.pareto_optimal.to_dict() == {"a": False, "b": True}  # one objective: the best trial
