"""scales: the pooled features of the photo at its own size and at smaller sizes, concatenated
(CONTRIQUE's two scales), computed once by the feature pass and again by the model on raw images."""

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from iqa_ray.core.options import ConfigError
from iqa_ray.models.mlp import gaussian_blur, pool_stages
from iqa_ray.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(tiny_dataset, **kw):
    return TrainConfig.from_dict({"dataset": str(tiny_dataset.path), "crop_size": 64, "whole_image": True,
                                  "feature_cache": True, "family": "mlp", "pooling": "blocks", "frozen_backbone": True,
                                  "pretrained": "offline", "hidden_dim": 32, "batch_size": 8, "epochs": 3, "lr": 3e-3,
                                  "amp": False, "reference_blur": 2.0, "scales": [1.0, 0.5], **kw})


@pytest.mark.parametrize("bad", [[0.5, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.5], [], [1.0, float("nan")], "half"])
def test_bad_scales_are_refused_naming_the_key_and_what_is_valid(tiny_dataset, bad):
    with pytest.raises(ConfigError, match=r"scales must be distinct factors .* the first 1\.0"):
        config(tiny_dataset, scales=bad)


def test_the_cache_appends_the_half_size_photos_features_and_the_model_computes_the_same(tiny_dataset):
    from iqa_ray.training.build import build
    from iqa_ray.training.features import cache_key, compute_features
    from iqa_ray.training.loaders import load_decoded

    cfg, one = config(tiny_dataset), config(tiny_dataset, scales=[1.0])
    assert cache_key(cfg) != cache_key(one)
    # written next to results as a list, read back as the same config
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.flat()))) == cfg
    decoded = load_decoded(cfg)
    two, single = compute_features(decoded, cfg), compute_features(decoded, one)
    d = single.plain.shape[1]
    assert two.plain.shape == (single.plain.shape[0], 2 * d)
    # the first part is the photo at its own size: the same features, the same probe columns
    np.testing.assert_array_equal(two.plain[:, :d], single.plain)
    np.testing.assert_array_equal(two.stage_means(), single.stage_means())
    # the second part is the same pooling (with its pseudo-reference) of the photo at half size
    model = build(cfg, torch.device("cpu")).eval()
    assert model.feature_dim == 2 * d
    image = torch.from_numpy(decoded.images[0]).permute(2, 0, 1)[None].float() / 255
    half = F.interpolate(image, size=(image.shape[2] // 2, image.shape[3] // 2), mode="bilinear", antialias=True,
                         align_corners=False)
    with torch.no_grad():
        own = pool_stages(model.backbone(half), "blocks")
        blurred = pool_stages(model.backbone(gaussian_blur(half, 2.0)), "blocks")
        want = torch.cat([own, own - blurred], dim=1)[0].numpy()
        np.testing.assert_allclose(two.plain[0, d:], want, rtol=1e-5, atol=1e-4)
        # the model on the raw photo computes what the cache holds
        np.testing.assert_allclose(model(image)["features"][0].numpy(), two.plain[0], rtol=1e-5, atol=1e-4)


def test_a_two_scale_head_trains_on_the_cache_and_scores_raw_images_alike(tiny_dataset, tmp_path):
    import iqa_ray
    from iqa_ray.training.engine import fit
    from iqa_ray.training.features import compute_features
    from iqa_ray.training.loaders import load_decoded

    cfg = config(tiny_dataset, reference_blur=0.0)
    decoded = load_decoded(cfg)
    saved = []
    result = fit(cfg, decoded, features=compute_features(decoded, cfg),
                 on_epoch_end=lambda e: saved.append(e.save(tmp_path / "run")))
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    scorer = iqa_ray.load_model(saved[-1], device="cpu")
    test = decoded.split_indices("test")
    np.testing.assert_allclose(scorer([decoded.images[i] for i in test]), result.test_predictions[0],
                               rtol=1e-4, atol=1e-3)
