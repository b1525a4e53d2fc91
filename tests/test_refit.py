"""train_on_val: the refit of a selected configuration on training and validation photos (--splits)."""

import dataclasses

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from iqa_ray.baselines import ridge_probe
from iqa_ray.config import ConfigError
from iqa_ray.data.dataset import DecodedImages
from iqa_ray.engine import fit, load_decoded, make_loaders
from iqa_ray.features import compute_features
from iqa_ray.search.splits import split_fit
from iqa_ray.search.study import StudyError, load_study
from iqa_ray.search.tuner import SearchSettings
from test_feature_cache import cached as feature_cache_run

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
