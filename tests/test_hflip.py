"""hflip: random horizontal flips of training samples, and a feature cache without mirror images."""

import numpy as np
import pytest
import torch

from iqa_ray.core.options import ConfigError
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.engine import fit
from iqa_ray.training.features import cache_key, compute_features
from iqa_ray.training.feeds import CachedFeed
from iqa_ray.training.loaders import load_decoded, make_loaders

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cached(tiny_dataset, **kw):
    return TrainConfig.from_dict({"dataset": str(tiny_dataset.path), "crop_size": 32, "whole_image": True,
                                  "feature_cache": True, "family": "mlp", "pooling": "stages", "frozen_backbone": True,
                                  "pretrained": "offline", "hidden_dim": 32, "batch_size": 8, "epochs": 3, "lr": 3e-3,
                                  "patches_per_image": 2, "amp": False, **kw})


@pytest.fixture(scope="module")
def decoded(tiny_dataset):
    return load_decoded(cached(tiny_dataset))


@pytest.fixture(scope="module")
def caches(tiny_dataset, decoded):
    return {flip: compute_features(decoded, cached(tiny_dataset, hflip=flip)) for flip in (True, False)}


def test_without_hflip_the_cache_holds_the_same_features_and_no_mirror_images(tiny_dataset, caches):
    mirrored, unflipped = caches[True], caches[False]
    assert unflipped.flipped is None and mirrored.flipped is not None
    np.testing.assert_array_equal(unflipped.plain, mirrored.plain)
    assert not np.allclose(mirrored.flipped, mirrored.plain)
    assert unflipped.nbytes == mirrored.nbytes // 2
    # a cache is only used by runs it was computed for: the key says whether it holds mirror images
    assert cache_key(cached(tiny_dataset, hflip=False)) != cache_key(cached(tiny_dataset))
    with pytest.raises(ValueError, match="unflipped"):
        mirrored.check(cached(tiny_dataset, hflip=False), len(unflipped.plain))
    with pytest.raises(ValueError, match="unflipped"):
        unflipped.check(cached(tiny_dataset), len(unflipped.plain))


def _training_rows(feed):
    torch.manual_seed(0)
    return torch.cat([x for x, _, _ in feed.train_batches()])


def test_the_cached_feed_draws_mirror_images_only_with_hflip(tiny_dataset, decoded, caches):
    plain = torch.from_numpy(caches[True].plain)
    flipped = torch.from_numpy(caches[True].flipped)

    def sources(x):  # for each training input: 0 from a photo, 1 from its mirror
        is_plain = (x[:, None, :] == plain[None]).all(-1).any(1)
        is_flipped = (x[:, None, :] == flipped[None]).all(-1).any(1)
        assert bool((is_plain | is_flipped).all())
        return is_flipped.long()

    with_flips = _training_rows(CachedFeed(cached(tiny_dataset), decoded, caches[True], torch.device("cpu"), False))
    without = _training_rows(CachedFeed(cached(tiny_dataset, hflip=False), decoded, caches[False],
                                         torch.device("cpu"), False))
    assert 0 < int(sources(with_flips).sum()) < len(with_flips)
    assert int(sources(without).sum()) == 0
    assert len(without) == len(with_flips)


def test_a_run_without_hflip_trains_repeatably_and_differs_from_one_with_it(tiny_dataset, decoded, caches):
    config = cached(tiny_dataset, hflip=False)
    first = fit(config, decoded, features=caches[False])
    again = fit(config, decoded)  # computes its own cache, without mirror images
    assert first.history[-1]["train_loss"] < first.history[0]["train_loss"]
    assert [h["val_srcc"] for h in first.history] == [h["val_srcc"] for h in again.history]
    flipping = fit(cached(tiny_dataset), decoded, features=caches[True])
    assert [h["train_loss"] for h in flipping.history] != [h["train_loss"] for h in first.history]


def test_the_image_loader_flips_training_images_only_with_hflip(tiny_dataset, decoded):
    for flip in (True, False):
        config = cached(tiny_dataset, feature_cache=False, frozen_backbone=False, whole_image=False, hflip=flip)
        train = make_loaders(config, decoded).train.dataset
        assert train.hflip is flip
    whole = cached(tiny_dataset, feature_cache=False, frozen_backbone=False, hflip=False)
    train = make_loaders(whole, decoded).train.dataset
    row = int(train.indices[0])
    image = torch.from_numpy(np.ascontiguousarray(decoded.images[row])).permute(2, 0, 1)
    torch.manual_seed(0)
    assert all(torch.equal(train[0]["image"], image) for _ in range(16))
    train.hflip = True  # the same view with flips: some of 16 draws are the mirror image
    assert any(torch.equal(train[0]["image"], image.flip(2)) for _ in range(16))


def test_a_bad_hflip_is_refused_naming_the_key(tiny_dataset):
    with pytest.raises(ConfigError, match="hflip must be true or false"):
        cached(tiny_dataset, hflip="no")


def test_a_study_that_searches_hflip_cannot_share_the_cpu_recipes_cache():
    from iqa_ray.search.recipe import resolve_recipe
    from iqa_ray.search.study import StudyError
    from iqa_ray.search.study_file import parse_study

    study = parse_study({"study": {"metric": "val_srcc", "mode": "max", "num_samples": 2, "max_epochs": 2},
                         "fixed": {"family": "mlp"},
                         "params": {"hflip": {"role": "scientific", "type": "choice", "values": [True, False]}}},
                         name="flips")
    with pytest.raises(StudyError, match="hflip"):
        resolve_recipe("cpu", 0, study, "embedded")
