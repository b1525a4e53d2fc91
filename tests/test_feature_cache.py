"""Whole-image input, cached frozen features, patches per image, patch placement, select_epoch."""

import numpy as np
import pytest
import torch

from iqa_ray.core.metrics import srcc
from iqa_ray.core.options import ConfigError
from iqa_ray.data.decoded import IQADataset, grid_positions, random_positions
from iqa_ray.training.checkpoints import model_from_checkpoint
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.engine import fit
from iqa_ray.training.features import compute_features
from iqa_ray.training.inference import predict
from iqa_ray.training.loaders import eval_dataset, eval_loader, load_decoded, make_loaders

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cached(tiny_dataset, **kw):
    base = {"dataset": str(tiny_dataset.path), "crop_size": 32, "whole_image": True, "feature_cache": True,
            "family": "mlp", "pooling": "stages", "frozen_backbone": True, "pretrained": "offline",
            "hidden_dim": 32, "batch_size": 8, "epochs": 4, "lr": 3e-3, "patches_per_image": 2, "amp": False}
    base.update(kw)
    return TrainConfig.from_dict(base)


@pytest.fixture(scope="module")
def decoded(tiny_dataset):
    return load_decoded(cached(tiny_dataset))


@pytest.fixture(scope="module")
def features(tiny_dataset, decoded):
    return compute_features(decoded, cached(tiny_dataset))


def test_cached_features_train_the_model_a_forward_pass_on_images_gives(tiny_dataset, decoded, features, tmp_path):
    config = cached(tiny_dataset)
    saved = []
    result = fit(config, decoded, features=features, on_epoch_end=lambda e: saved.append(e.save(tmp_path)))
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    # The checkpoint is an ordinary model: scored on the test images themselves it gives the cached scores.
    model, _ = model_from_checkpoint(saved[-1])
    pred, mos = predict(model, eval_loader(config, eval_dataset(config, decoded, "test")), torch.device("cpu"))
    cached_pred, cached_mos = result.test_predictions
    np.testing.assert_allclose(pred, cached_pred, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(mos, cached_mos)
    assert result.test["srcc"] == pytest.approx(srcc(pred, mos), abs=1e-6)


def test_a_run_without_a_cache_computes_the_same_one(tiny_dataset, decoded, features):
    config = cached(tiny_dataset, epochs=2)
    with_cache = fit(config, decoded, features=features)
    without = fit(config, decoded)
    assert [h["val_srcc"] for h in with_cache.history] == [h["val_srcc"] for h in without.history]


def test_a_cached_run_resumed_from_a_checkpoint_equals_an_uninterrupted_one(tiny_dataset, decoded, features, tmp_path):
    config = cached(tiny_dataset, epochs=4)
    whole = fit(config, decoded, features=features)
    first = fit(config, decoded, features=features, max_epochs=2,
                on_epoch_end=lambda e: e.save(tmp_path) if e.epoch == 1 else None)
    assert len(first.history) == 2
    resumed = fit(config, decoded, features=features, resume=tmp_path / "checkpoint.pt")
    assert [h["val_srcc"] for h in resumed.history] == [h["val_srcc"] for h in whole.history]
    assert resumed.test == whole.test


def test_patches_per_image_is_that_many_draws_of_every_training_image_per_epoch(tiny_dataset, decoded, features):
    one = fit(cached(tiny_dataset, epochs=1, patches_per_image=1, batch_size=4), decoded, features=features)
    three = fit(cached(tiny_dataset, epochs=1, patches_per_image=3, batch_size=4), decoded, features=features)
    n_train = len(decoded.split_indices("train"))
    assert one.history[0]["images_per_s"] > 0
    steps = lambda k: (n_train * k) // 4  # noqa: E731 - drop_last, as the image loader
    assert steps(3) >= 3 * steps(1) - 2
    # The image path repeats each image too: its training view is k times as long.
    config = cached(tiny_dataset, feature_cache=False, frozen_backbone=False, patches_per_image=3,
                    whole_image=False)
    assert len(make_loaders(config, decoded).train.dataset) == 3 * n_train
    assert three.history[0]["train_loss"] != one.history[0]["train_loss"]


def test_select_epoch_last_hands_back_the_final_weights(tiny_dataset, decoded, features):
    result = fit(cached(tiny_dataset, epochs=3, select_epoch="last"), decoded, features=features)
    assert result.best_epoch == 3
    assert result.best_val["srcc"] == pytest.approx(result.history[-1]["val_srcc"])


def test_random_patch_placement_is_seeded_per_image_not_per_position_in_a_table(decoded):
    h, w = decoded.images[0].shape[:2]
    a = random_positions(h, w, 16, 5, seed=3, key="img-1")
    assert a == random_positions(h, w, 16, 5, seed=3, key="img-1")
    assert a != random_positions(h, w, 16, 5, seed=4, key="img-1")
    assert a != random_positions(h, w, 16, 5, seed=3, key="img-2")
    assert all(0 <= y <= h - 16 and 0 <= x <= w - 16 for y, x in a)
    test = decoded.split_indices("test")
    full = IQADataset(decoded, test, train=False, crop_size=16, eval_patches=5, patch_placement="random")
    reversed_ = IQADataset(decoded, test[::-1], train=False, crop_size=16, eval_patches=5, patch_placement="random")
    assert torch.equal(full[0]["image"], reversed_[len(test) - 1]["image"])
    grid = IQADataset(decoded, test, train=False, crop_size=16, eval_patches=5)
    assert not torch.equal(full[0]["image"], grid[0]["image"])
    assert grid_positions(h, w, 16, 1) == [((h - 16) // 2, (w - 16) // 2)]


def test_whole_image_views_return_the_image_uncropped(decoded):
    test = decoded.split_indices("test")
    view = IQADataset(decoded, test, train=False, crop_size=16, whole_image=True)
    h, w = decoded.images[test[0]].shape[:2]
    assert tuple(view[0]["image"].shape) == (1, 3, h, w)


@pytest.mark.parametrize("bad, message", [
    ({"frozen_backbone": False}, "frozen_backbone"),
    ({"whole_image": False}, "whole_image"),
    ({"family": "gmm", "pooling": "last"}, "family"),
    ({"pooling": "max"}, "pooling"),
    ({"patches_per_image": 0}, "patches_per_image"),
    ({"patch_placement": "spiral"}, "patch_placement"),
    ({"select_epoch": "median"}, "select_epoch"),
    ({"split_fractions": [0.5, 0.5, 0.5]}, "split_fractions"),
    ({"image_size": [64, 64], "short_side": 64}, "short_side"),
])
def test_bad_values_are_refused_naming_the_key(tiny_dataset, bad, message):
    with pytest.raises(ConfigError, match=message):
        cached(tiny_dataset, **bad)


def test_pooling_applies_to_the_mlp_family_only(tiny_dataset):
    with pytest.raises(ConfigError, match="pooling"):
        TrainConfig.from_dict({"family": "hyperiqa", "pooling": "stages"})


def test_the_search_scores_test_photos_from_the_cache_checked_against_the_whole_network(tiny_dataset, decoded,
                                                                                          features, tmp_path,
                                                                                          one_torch_thread):
    """search/ensemble.test_predictions: the head on the cached features gives the whole network's
    test scores; a cache that disagrees with the whole network, or was computed for another config,
    is not used."""
    from dataclasses import replace

    import ray
    from ray.tune import Checkpoint

    from iqa_ray.search.ensemble import RAW_CHECK, RAW_CHECK_ATOL, test_predictions

    config = cached(tiny_dataset, epochs=2)
    fit(config, decoded, features=features, on_epoch_end=lambda e: e.save(tmp_path))
    checkpoint = Checkpoint.from_directory(str(tmp_path))
    images, mos, how = test_predictions(checkpoint, decoded, 1)
    assert how == {"source": "images"} and len(mos) == len(decoded.split_indices("test")) > 0
    pred, cached_mos, how = test_predictions(checkpoint, decoded, 1, features)
    assert how["source"] == "feature cache" and how["checked"] == min(RAW_CHECK, len(mos))
    assert how["max_abs_diff"] <= RAW_CHECK_ATOL
    np.testing.assert_allclose(pred, images, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(cached_mos, mos)
    # Features that are not the whole network's: every test photo goes through the whole network.
    wrong, _, how = test_predictions(checkpoint, decoded, 1, replace(features, plain=features.plain * 3.0 + 1.0))
    assert how["source"] == "images" and how["max_abs_diff"] > RAW_CHECK_ATOL
    np.testing.assert_array_equal(wrong, images)
    # A cache computed for another config is not read at all.
    assert test_predictions(checkpoint, decoded, 1, replace(features, key=("another",)))[2] == {"source": "images"}
    assert not ray.is_initialized(), "scoring outside Ray started a Ray instance"
