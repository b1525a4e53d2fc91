"""train_on_val: the refit of a selected configuration on training and validation photos (--splits)."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from test_feature_cache import cached as feature_cache_run

from iqa_ray.core.options import ConfigError
from iqa_ray.core.paths import REFIT_DIR
from iqa_ray.data.decoded import DecodedImages
from iqa_ray.evaluation.baselines import ridge_probe
from iqa_ray.search.retrain import split_fit
from iqa_ray.search.settings import SearchSettings
from iqa_ray.search.study import StudyError
from iqa_ray.search.study_file import load_study
from iqa_ray.training.checkpoints import CHECKPOINT_FILE
from iqa_ray.training.engine import fit
from iqa_ray.training.features import compute_features
from iqa_ray.training.loaders import load_decoded, make_loaders

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cached(tiny_dataset, **kw):
    """test_feature_cache's run on cached features, 3 epochs, keeping the last (what a refit needs)."""
    return feature_cache_run(tiny_dataset, **{"epochs": 3, "select_epoch": "last", **kw})


@pytest.fixture(scope="module")
def decoded(tiny_dataset):
    return load_decoded(cached(tiny_dataset))


@pytest.mark.parametrize("rule, named", [({"select_epoch": "best"}, "select_epoch = 'best'"),
                                         ({"early_stopping_patience": 2}, "early_stopping_patience"),
                                         ({"lr_schedule": "plateau"}, "plateau")])
def test_a_refit_is_refused_where_the_run_chooses_anything_on_validation(tiny_dataset, rule, named):
    with pytest.raises(ConfigError, match=named):
        cached(tiny_dataset, train_on_val=True, **rule)
    assert cached(tiny_dataset, train_on_val=True).optim.train_on_val is True


def test_a_refit_trains_on_training_and_validation_photos(tiny_dataset, decoded):
    split = decoded.table["split"].to_numpy()
    both = np.flatnonzero((split == "train") | (split == "val"))
    image_config = cached(tiny_dataset, feature_cache=False, whole_image=False, train_on_val=True)
    assert make_loaders(image_config, decoded).train_rows.tolist() == both.tolist()
    assert make_loaders(cached(tiny_dataset, feature_cache=False, whole_image=False), decoded).train_rows.tolist() \
        == np.flatnonzero(split == "train").tolist()


def test_a_refit_equals_a_run_whose_validation_photos_are_training_photos(tiny_dataset, decoded):
    """The refit's model scores its test photos as a plain run scores them when its table calls the
    validation photos training photos (and the test photos validation photos): same rows, same draws."""
    features = compute_features(decoded, cached(tiny_dataset))
    refit = fit(cached(tiny_dataset, train_on_val=True), decoded, features=features)
    relabelled = decoded.table.copy()
    relabelled["split"] = relabelled["split"].map({"train": "train", "val": "train", "test": "val"})
    moved = DecodedImages(images=decoded.images, table=relabelled, skipped=decoded.skipped)
    plain = fit(cached(tiny_dataset), moved, features=features)
    assert refit.test["srcc"] == pytest.approx(plain.history[-1]["val_srcc"], abs=1e-12)
    assert refit.test["plcc"] == pytest.approx(plain.history[-1]["val_plcc"], abs=1e-12)
    # and it is another model than the one trained without the validation photos
    alone = fit(cached(tiny_dataset), decoded, features=features)
    assert alone.test["plcc"] != refit.test["plcc"]


def test_the_probe_beside_a_refit_chooses_its_strength_on_validation_then_fits_on_both():
    rng = np.random.default_rng(0)
    mos = rng.uniform(0, 100, 90)
    features = rng.normal(size=(90, 12)) + mos[:, None] / 40
    train, val, test = np.arange(0, 50), np.arange(50, 70), np.arange(70, 90)
    plain, refit = ridge_probe(features, mos, train, val, test), ridge_probe(features, mos, train, val, test, refit=True)
    assert refit["alpha"] == plain["alpha"] and refit["val_srcc"] == plain["val_srcc"]
    both = np.concatenate([train, val])
    x = (features - features[both].mean(0)) / (features[both].std(0) + 1e-8)
    direct = Ridge(alpha=refit["alpha"]).fit(x[both], mos[both]).predict(x[test])
    assert refit["plcc"] == pytest.approx(np.corrcoef(direct, mos[test])[0, 1], abs=1e-9)
    assert refit["plcc"] != plain["plcc"]


def settings(study, **kw):
    base = dict(study=study, name="refit", storage="/tmp/unused", searcher="random", scheduler="none",
                num_samples=2, max_epochs=2, grace_period=1, reduction_factor=2, max_concurrent=None,
                cpus_per_trial=1, gpus_per_trial=0, seed=0)
    return SearchSettings(**{**base, **kw})


def test_a_search_refuses_train_on_val_and_split_runs_refit_only_where_nothing_is_chosen_on_validation(tiny_dataset):
    study = load_study("ranking")
    with pytest.raises(StudyError, match="train_on_val"):
        settings(study, overrides=(("train_on_val", True),))
    with pytest.raises(StudyError, match="train_on_val"):
        settings(dataclasses.replace(study, fixed={**study.fixed, "train_on_val": True}))
    s = settings(study)
    assert split_fit(s, cached(tiny_dataset))[0] is True
    refit, why = split_fit(s, cached(tiny_dataset, select_epoch="best"))
    assert refit is False and "select_epoch = 'best'" in why
    refit, why = split_fit(settings(study, splits_train_on_val=False), cached(tiny_dataset))
    assert refit is False and "--splits-train-only" in why


def test_the_model_handed_back_is_a_refit_only_where_nothing_is_chosen_on_validation(tiny_dataset):
    from iqa_ray.search.retrain import refit_plan

    study = load_study("ranking")
    planned, why = refit_plan(settings(study), cached(tiny_dataset))
    assert planned is True and "training and validation photos" in why
    planned, why = refit_plan(settings(study), cached(tiny_dataset, early_stopping_patience=2))
    assert planned is False and "early_stopping_patience" in why
    planned, why = refit_plan(settings(study, refit=False), cached(tiny_dataset))
    assert planned is False and "--no-refit" in why


def experiment_with_refit(root: Path, checkpoint: Path) -> Path:
    """The folders and files a finished search with a refit leaves (as search/run.py and Tune write
    them): two search trials, the selected one's checkpoint, and the refit trial's."""
    exp = root / "exp"
    for trial, val in (("trial_a", 0.5), ("trial_b", 0.7)):
        (exp / trial / "checkpoint_000000").mkdir(parents=True)
        (exp / trial / "params.json").write_text(json.dumps({"lr": 0.1, "epochs": 1}))
        (exp / trial / "result.json").write_text(json.dumps({"trial_id": trial[-1], "epoch": 1, "val_srcc": val}) + "\n")
    refit = exp / REFIT_DIR / "iqa_trainable_r_00000_0"
    (refit / "checkpoint_000000").mkdir(parents=True)
    shutil.copy(checkpoint, refit / "checkpoint_000000" / CHECKPOINT_FILE)
    (refit / "params.json").write_text(json.dumps({"lr": 0.1, "epochs": 1, "train_on_val": True}))
    (refit / "result.json").write_text(json.dumps({"trial_id": "r_00000", "epoch": 1, "val_srcc": 0.9}) + "\n")
    summary = {"best_trial": "trial_b", "best_trial_id": "b", "model": f"{REFIT_DIR}/{refit.name}",
               "refit": {"planned": True, "trial": f"{REFIT_DIR}/{refit.name}"}, "test": {"srcc": 0.61, "n": 10}}
    (exp / "summary.json").write_text(json.dumps(summary))
    return exp


def test_the_refit_is_what_an_experiment_hands_back_and_its_row_holds_the_test_metrics(tiny_dataset, tmp_path):
    from iqa_ray.evaluation.cross_dataset import EvaluateError, resolve_source
    from iqa_ray.search import export

    run = tmp_path / "run"
    fit(cached(tiny_dataset, epochs=1, train_on_val=True), on_epoch_end=lambda e: e.save(run))
    exp = experiment_with_refit(tmp_path, run / CHECKPOINT_FILE)
    source = resolve_source(exp)
    assert source.trial == f"{REFIT_DIR}/iqa_trainable_r_00000_0"
    assert source.checkpoint == exp / REFIT_DIR / "iqa_trainable_r_00000_0" / "checkpoint_000000"
    trials, _ = export.collect(exp)
    rows = trials.set_index("trial_id")
    assert rows.loc["r_00000", "kind"] == "refit" and not rows.loc["r_00000", "selected"]
    assert rows.loc["r_00000", "test_srcc"] == 0.61 and rows.loc["r_00000", "test_source"] == "refit"
    assert rows.loc["b", "selected"] and np.isnan(rows.loc["b", "test_srcc"])  # the test belongs to the refit
    # without a refit, the selected trial's row holds them, as before
    summary = json.loads((exp / "summary.json").read_text())
    (exp / "summary.json").write_text(json.dumps({**summary, "model": "trial_b", "refit": {"planned": False}}))
    rows = export.collect(exp)[0].set_index("trial_id")
    assert rows.loc["b", "test_srcc"] == 0.61 and np.isnan(rows.loc["r_00000", "test_srcc"])
    for bad in ("../elsewhere", "refit/../../x", "splits/trial_x", "/abs"):
        (exp / "summary.json").write_text(json.dumps({**summary, "model": bad}))
        with pytest.raises(EvaluateError, match="not a trial folder name"):
            resolve_source(exp)


@pytest.mark.parametrize("outcome", ["error", "raises", "no checkpoint"])
def test_a_refit_that_fails_hands_back_the_selected_trial_and_says_why(tiny_dataset, monkeypatch, outcome):
    from types import SimpleNamespace

    from iqa_ray.search import retrain as refit_module
    from iqa_ray.search.retrain import hand_back

    def run_refit(*_args, **_kw):
        if outcome == "raises":
            raise RuntimeError("cluster lost")
        return SimpleNamespace(error=ValueError("diverged") if outcome == "error" else None, checkpoint=None,
                               metrics={}, path="/r/refit/iqa_trainable_x")

    monkeypatch.setattr(refit_module, "run_refit", run_refit)
    best = SimpleNamespace(checkpoint="selected checkpoint", path="/r/trial_b", metrics={})
    handed, report = hand_back(settings(load_study("ranking")), best, cached(tiny_dataset).to_dict(), None, None)
    assert handed is best and report["planned"] is True and "trial" not in report
    assert {"error": "diverged", "raises": "cluster lost", "no checkpoint": "no checkpoint"}[outcome] in report["error"]
    assert "the refit failed" in report["model"]


def test_the_refit_benchmark_folds_keep_each_source_photo_in_one_fold_and_cover_every_row():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from refit_cv import CV_FOLDS, grouped_folds

    groups = np.repeat([f"photo{i}" for i in range(15)], [4, 6, 8] * 5)
    rows = np.arange(len(groups))[5:]  # not every row is train+val
    for seed in (0, 1):
        folds = grouped_folds(groups, rows, seed)
        assert len(folds) == CV_FOLDS and all(len(f) for f in folds)
        assert sorted(np.concatenate(folds).tolist()) == rows.tolist()
        seen = [set(groups[f]) for f in folds]
        assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])
    assert [f.tolist() for f in grouped_folds(groups, rows, 0)] != [f.tolist() for f in grouped_folds(groups, rows, 1)]
