import math

import pytest

from iqa_ray.search.study import StudyError
from iqa_ray.search.study_file import available_studies, load_study, parse_study


def test_every_shipped_study_loads_and_labels_every_hyperparameter():
    names = available_studies()
    assert {"ranking", "gmm", "backbone", "lr_schedule"} <= set(names)
    for name in names:
        study = load_study(name)
        assert study.params, name
        for p in study.params:
            assert study.roles[p.name] in ("scientific", "nuisance")
        for key in study.fixed:
            assert study.roles[key] == "fixed"


def test_ranking_study_matches_the_seed_space_and_its_grid():
    study = load_study("ranking")
    params = {p.name: p for p in study.params}
    assert (params["alpha"].low, params["alpha"].high) == (0.0, 0.7)
    assert (params["margin"].low, params["margin"].high) == (0.1, 1.0)
    assert params["alpha"].grid == (0.1, 0.2, 0.3, 0.5, 0.7)
    assert params["margin"].grid == (0.3, 0.5, 0.7, 1.0)
    assert study.grid_size() == 20  # the seed's 5 x 4 grid (one LR)
    assert study.fixed["loss"] == "ranking" and study.fixed["family"] == "hyperiqa"
    assert params["lr"].type == "loguniform" and params["lr"].role == "nuisance"


def test_gmm_and_schedule_spaces():
    gmm = {p.name: p for p in load_study("gmm").params}
    assert (gmm["n_clusters"].low, gmm["n_clusters"].high) == (2, 16)
    assert gmm["cluster_loss_weight"].type == gmm["balance_weight"].type == "loguniform"
    assert "refit_interval" in gmm
    sched = {p.name: p for p in load_study("lr_schedule").params}
    assert set(sched["lr_schedule"].values) == {"cosine", "step", "plateau", "none"}
    assert sched["lr"].type == sched["weight_decay"].type == "loguniform"
    assert "warmup_epochs" in sched


def test_backbone_lr_range_depends_on_the_backbone():
    study = load_study("backbone")
    lr = next(p for p in study.params if p.name == "lr")
    assert lr.searched_name == "lr__unit"
    ranges = lr.range_by[1]
    assert set(ranges) == set(next(p for p in study.params if p.name == "backbone").values)
    low = study.resolve({"backbone": "resnet50", "lr__unit": 0.0})
    high = study.resolve({"backbone": "resnet50", "lr__unit": 1.0})
    mid = study.resolve({"backbone": "swin_tiny_patch4_window7_224", "lr__unit": 0.5})
    assert low["lr"] == pytest.approx(ranges["resnet50"][0]) and high["lr"] == pytest.approx(ranges["resnet50"][1])
    lo, hi = ranges["swin_tiny_patch4_window7_224"]
    assert mid["lr"] == pytest.approx(math.sqrt(lo * hi))  # log-scale midpoint
    assert "lr__unit" not in mid


def base(**params):
    return {"study": {"num_samples": 2}, "fixed": {"family": "hyperiqa", "loss": "ranking"},
            "params": params or {"alpha": {"role": "scientific", "type": "uniform", "low": 0.0, "high": 0.5}}}


@pytest.mark.parametrize(
    "data, match",
    [
        ({"study": {}, "fixed": {}, "params": {}}, "search space is empty"),
        (base(alpha={"role": "scientific", "type": "uniform", "low": 0.0, "high": 1.5}), "alpha must be in \\[0, 1\\]"),
        (base(margin={"role": "scientific", "type": "uniform", "low": -1.0, "high": 1.0}), "margin must be >= 0"),
        (base(lr={"role": "scientific", "type": "loguniform", "low": 0.0, "high": 1.0}), "log scale needs low > 0"),
        (base(alpha={"role": "scientific", "type": "uniform", "low": 0.5, "high": 0.1}), "low \\(0.5\\) must be < high"),
        (base(alpha={"role": "important", "type": "uniform", "low": 0.0, "high": 0.5}), "role must be one of"),
        (base(alpha={"role": "scientific", "type": "normal", "low": 0.0, "high": 0.5}), "type must be one of"),
        (base(alpha={"role": "scientific", "type": "uniform", "low": 0.0, "high": 0.5, "grid": [0.9]}), "outside"),
        (base(learning_rate={"role": "nuisance", "type": "uniform", "low": 0.1, "high": 0.5}), "not a config key"),
        (base(backbone={"role": "scientific", "type": "choice", "values": ["resnet18", "resnet9000"]}), "unknown backbone 'resnet9000'"),
        ({"fixed": {}, "params": {"family": {"role": "scientific", "type": "choice", "values": ["mlp", "cnn"]}}},
         "unknown model family 'cnn'"),
        (base(family={"role": "scientific", "type": "choice", "values": ["mlp"]}), "both fixed and searched"),
        ({**base(), "study": {"searcher": "bayes"}}, "searcher must be one of"),
        ({**base(), "study": {"max_epochs": 2, "grace_period": 3}}, "grace_period \\(3\\) exceeds max_epochs"),
        ({**base(), "fixed": {"family": "hyperiqa", "loss": "ranking", "epochs": 3}}, "max_epochs"),
        ({**base(), "extras": {}}, "unknown tables"),
    ],
)
def test_invalid_studies_are_rejected_before_any_trial(data, match):
    with pytest.raises(StudyError, match=match):
        parse_study(data, name="bad")


def test_gmm_knob_on_a_non_gmm_family_is_rejected():
    data = {"fixed": {"family": "mlp"}, "params": {"n_clusters": {"role": "scientific", "type": "int", "low": 2, "high": 8}}}
    with pytest.raises(StudyError, match="n_clusters applies to family gmm only"):
        parse_study(data, name="bad")


def test_unknown_study_lists_the_available_ones():
    with pytest.raises(StudyError, match="available: .*ranking"):
        load_study("rankin")


def test_a_new_study_is_one_file(tmp_path):
    (tmp_path / "mine.toml").write_text(
        '[study]\nnum_samples = 3\n[fixed]\nfamily = "mlp"\n'
        '[params.dropout]\nrole = "scientific"\ntype = "uniform"\nlow = 0.0\nhigh = 0.5\n'
    )
    study = load_study(tmp_path / "mine.toml")
    assert study.name == "mine" and study.num_samples == 3
    space = study.optuna_space()
    assert space["dropout"].low == 0.0 and space["dropout"].high == 0.5


def test_study_files_with_the_old_scheduler_keys_still_load_with_deprecation_messages():
    old = {"study": {"scheduler": "none"}, "fixed": {"family": "mlp", "scheduler": "step"},
           "params": {"lr": {"role": "nuisance", "type": "loguniform", "low": 1e-4, "high": 1e-2},
                      "scheduler": {"role": "scientific", "type": "choice", "values": ["cosine", "none"]}}}
    del old["fixed"]["scheduler"]  # searched and fixed at once would be an error, renamed or not
    with pytest.warns(FutureWarning) as seen:
        study = parse_study(old, name="old")
    messages = " ".join(str(w.message) for w in seen)
    assert "[study] scheduler is deprecated, use trial_scheduler" in messages
    assert "the key 'scheduler' is deprecated, use 'lr_schedule'" in messages
    assert study.trial_scheduler == "none" and [p.name for p in study.params] == ["lr", "lr_schedule"]
    fixed = {"study": {}, "fixed": {"scheduler": "step"}, "params": {"lr": old["params"]["lr"]}}
    with pytest.warns(FutureWarning):
        assert parse_study(fixed, name="fixed").fixed == {"lr_schedule": "step"}
    with pytest.raises(StudyError, match="both 'scheduler' \\(its old name\\) and 'trial_scheduler'"):
        parse_study({"study": {"scheduler": "asha", "trial_scheduler": "none"}, "params": fixed["params"]}, name="both")


def test_shipped_studies_and_recipes_use_the_current_key_names():
    import warnings

    from iqa_ray.search.recipe import load_recipe

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for name in available_studies():
            load_study(name)
        for recipe in ("cpu", "paper"):
            load_recipe(recipe)


def test_the_deprecation_table_names_the_values_each_renamed_key_takes():
    from iqa_ray.core.deprecations import CONFIG, RENAMED_KEYS, SEARCH, old_flags
    from iqa_ray.search.study import TRIAL_SCHEDULERS
    from iqa_ray.training.config_sections import LR_SCHEDULES

    assert RENAMED_KEYS[CONFIG]["scheduler"] == ("lr_schedule", LR_SCHEDULES)
    assert RENAMED_KEYS[SEARCH]["scheduler"] == ("trial_scheduler", TRIAL_SCHEDULERS)
    assert old_flags(CONFIG, "lr_schedule") == old_flags(SEARCH, "trial_scheduler") == ("--scheduler",)
