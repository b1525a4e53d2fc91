import pytest

from iqa_ray.core.selection import SELECTABLE_METRICS, check_selection, select_trial, trial_score
from iqa_ray.search.study import StudyError
from iqa_ray.search.study_file import parse_study

NAN = float("nan")


def test_the_best_epoch_of_each_trial_is_compared_and_nan_never_wins():
    trials = {
        "a": [{"val_srcc": 0.5}, {"val_srcc": 0.7}, {"val_srcc": 0.6}],
        "b": [{"val_srcc": NAN}, {"val_srcc": NAN}],  # diverged: never selected
        "c": [{"val_srcc": 0.69}, {"val_srcc": NAN}],
    }
    assert trial_score(trials["a"], "val_srcc", "max") == 0.7
    assert trial_score(trials["b"], "val_srcc", "max") is None
    assert select_trial(trials, "val_srcc", "max") == "a"
    # A NaN in the first report of the leader does not hide its finite epochs.
    assert select_trial({"x": [{"val_srcc": NAN}, {"val_srcc": 0.2}], "y": [{"val_srcc": 0.1}]},
                        "val_srcc", "max") == "x"
    assert select_trial({"b": trials["b"]}, "val_srcc", "max") is None


def test_the_studys_metric_and_mode_are_honoured():
    trials = {"a": [{"val_srcc": 0.9, "val_rmse": 12.0}], "b": [{"val_srcc": 0.8, "val_rmse": 9.0}]}
    assert select_trial(trials, "val_srcc", "max") == "a"
    assert select_trial(trials, "val_rmse", "min") == "b"
    # Ties go to the trial listed first.
    assert select_trial({"p": [{"val_plcc": 0.5}], "q": [{"val_plcc": 0.5}]}, "val_plcc", "max") == "p"


@pytest.mark.parametrize("metric, mode, message", [
    ("test_srcc", "max", "test metric"),
    ("val_sroc", "max", "not reported by the trials"),
    ("train_loss", "min", "not reported by the trials"),
    ("val_rmse", "max", "would select the worst trial"),
    ("val_srcc", "min", "would select the worst trial"),
    ("val_srcc", "maximum", "mode must be one of"),
])
def test_a_metric_the_trials_do_not_report_or_a_wrong_mode_is_an_error(metric, mode, message):
    with pytest.raises(ValueError, match=message):
        check_selection(metric, mode)


def test_a_study_with_an_unreported_metric_fails_when_it_loads():
    definition = {"study": {"metric": "val_accuracy", "mode": "max"}, "fixed": {"family": "mlp"},
                  "params": {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2, "role": "scientific"}}}
    with pytest.raises(StudyError, match="val_accuracy.*not reported by the trials"):
        parse_study(definition, name="bad")
    for metric in SELECTABLE_METRICS:
        mode = "min" if metric == "val_rmse" else "max"
        assert parse_study({**definition, "study": {"metric": metric, "mode": mode}}, name="ok").metric == metric
