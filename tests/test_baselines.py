"""The baselines every search summary prints: PIQE, BRISQUE and the frozen-feature linear probe."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from iqa_ray.core.metrics import all_metrics, srcc
from iqa_ray.evaluation.baselines import (
    PROBE_ALPHAS,
    baseline_report,
    baseline_scores,
    pooled_stage_features,
    ridge_probe,
)
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.loaders import load_decoded

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _split(n, rng):
    order = rng.permutation(n)
    return order[: n // 2], order[n // 2: 3 * n // 4], order[3 * n // 4:]


def test_the_probe_chooses_its_ridge_strength_on_validation_and_equals_sklearn():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 30))
    mos = features[:, :3] @ np.array([3.0, -2.0, 1.0]) + rng.normal(scale=2.0, size=200)
    train, val, test = _split(200, rng)
    result = ridge_probe(features, mos, train, val, test)
    assert result["alpha"] in PROBE_ALPHAS and result["n"] == len(test)
    x = (features - features[train].mean(0)) / (features[train].std(0) + 1e-8)
    val_srcc = {a: srcc(Ridge(alpha=a).fit(x[train], mos[train]).predict(x[val]), mos[val]) for a in PROBE_ALPHAS}
    assert result["val_srcc"] == pytest.approx(max(val_srcc.values()))
    expected = all_metrics(Ridge(alpha=result["alpha"]).fit(x[train], mos[train]).predict(x[test]), mos[test])
    assert result["srcc"] == pytest.approx(expected["srcc"]) and result["plcc"] == pytest.approx(expected["plcc"])
    assert result["srcc"] > 0.6  # the signal is there and the probe finds it


def test_the_test_labels_do_not_shape_the_probe():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(120, 20))
    mos = features[:, 0] * 2 + rng.normal(size=120)
    train, val, test = _split(120, rng)
    shuffled = mos.copy()
    shuffled[test] = rng.permutation(mos[test])
    a, b = ridge_probe(features, mos, train, val, test), ridge_probe(features, shuffled, train, val, test)
    assert a["alpha"] == b["alpha"] and a["val_srcc"] == b["val_srcc"]  # chosen without the test labels
    assert a["srcc"] != b["srcc"]  # and scored against them


def test_pooled_features_take_every_stage_of_whole_images_of_mixed_sizes():
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8) for _ in range(3)]
    images.append(rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8))
    torch.manual_seed(0)  # random weights: the same ones for both calls
    features = pooled_stage_features(images, backbone="resnet18", pretrained="none")
    assert features.shape == (4, 64 + 64 + 128 + 256 + 512)  # resnet18's five stages
    torch.manual_seed(0)
    alone = pooled_stage_features(images[2:], backbone="resnet18", pretrained="none")
    np.testing.assert_allclose(features[2:], alone, rtol=1e-4, atol=1e-5)  # batching changes nothing


def test_baseline_report_scores_the_test_split_of_a_dataset(tiny_dataset):
    decoded = load_decoded(TrainConfig.from_dict({"dataset": str(tiny_dataset.path), "crop_size": 48}))
    report = baseline_report(decoded, backbone="efficientnet_lite0", pretrained="offline")
    test = decoded.split_indices("test")
    assert set(report) == {"piqe", "brisque", "linear_probe"}
    assert all(r["n"] == len(test) for r in report.values())
    mos = decoded.table["mos"].to_numpy()[test]
    piqe = all_metrics(baseline_scores("piqe", [decoded.images[i] for i in test]), mos)
    assert report["piqe"]["srcc"] == pytest.approx(piqe["srcc"])
    assert np.isfinite(report["linear_probe"]["srcc"]) and report["linear_probe"]["backbone"] == "efficientnet_lite0"


def test_brisque_score_is_the_package_score_of_its_36_features():
    from skimage.data import astronaut

    from iqa_ray.evaluation.baselines import _brisque_model, brisque_features, brisque_score

    image = astronaut()[::2, ::2]
    features = brisque_features(image)
    assert features.shape == (36,) and np.isfinite(features).all()
    # the package's own path (grey image, features at full and half size, its SVR) gives the same score
    assert brisque_score(image) == pytest.approx(float(_brisque_model().score(image)), abs=1e-9)
    # half size is its own 18 statistics, not a copy of the first
    assert not np.allclose(features[:18], features[18:])
