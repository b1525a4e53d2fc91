"""reference_blur: the pooled features' change when each image is blurred (a pseudo-reference),
appended to the image's own pooled features."""

import numpy as np
import pytest
import torch

from iqa_ray.core.options import ConfigError
from iqa_ray.models.mlp import gaussian_blur, pool_stages
from iqa_ray.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(tiny_dataset, **kw):
    return TrainConfig.from_dict({"dataset": str(tiny_dataset.path), "crop_size": 32, "whole_image": True,
                                  "feature_cache": True, "family": "mlp", "pooling": "blocks", "frozen_backbone": True,
                                  "pretrained": "offline", "hidden_dim": 32, "batch_size": 8, "epochs": 3, "lr": 3e-3,
                                  "amp": False, "reference_blur": 2.0, **kw})


@pytest.mark.parametrize("sigma", [0.7, 2.0, 3.5])
def test_the_blur_is_scipys_gaussian_filter_with_extended_edges(sigma):
    import math

    from scipy.ndimage import gaussian_filter

    images = torch.rand(2, 3, 23, 31, dtype=torch.float64)
    got = gaussian_blur(images, sigma).numpy()
    radius = math.ceil(3 * sigma)  # the kernel cut at 3 sigma, rounded up
    want = gaussian_filter(images.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", radius=(0, 0, radius, radius))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    constant = torch.full((1, 3, 9, 9), 0.25)
    torch.testing.assert_close(gaussian_blur(constant, sigma), constant)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan")])
def test_the_blur_refuses_a_sigma_that_is_not_positive(sigma):
    with pytest.raises(ValueError, match="sigma must be"):
        gaussian_blur(torch.rand(1, 3, 8, 8), sigma)


@pytest.mark.parametrize("bad", [-1.0, float("inf"), "two"])
def test_a_bad_reference_blur_is_refused_naming_the_key(tiny_dataset, bad):
    with pytest.raises(ConfigError, match="reference_blur"):
        config(tiny_dataset, reference_blur=bad)


def test_the_cache_appends_the_change_under_the_blur_and_the_model_computes_the_same(tiny_dataset):
    from iqa_ray.training.build import build
    from iqa_ray.training.features import cache_key, compute_features
    from iqa_ray.training.loaders import load_decoded

    cfg, plain_cfg = config(tiny_dataset), config(tiny_dataset, reference_blur=0.0)
    assert cache_key(cfg) != cache_key(plain_cfg)
    decoded = load_decoded(cfg)
    with_blur, without = compute_features(decoded, cfg), compute_features(decoded, plain_cfg)
    d = without.plain.shape[1]
    assert with_blur.plain.shape[1] == with_blur.flipped.shape[1] == 2 * d
    # the first half is the image's own features; the probe reads the same stage means
    np.testing.assert_array_equal(with_blur.plain[:, :d], without.plain)
    np.testing.assert_array_equal(with_blur.flipped[:, :d], without.flipped)
    np.testing.assert_array_equal(with_blur.stage_means(), without.stage_means())
    # the second half is those features minus the blurred image's
    model = build(cfg, torch.device("cpu")).eval()
    assert model.feature_dim == 2 * d
    image = torch.from_numpy(decoded.images[0]).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        blurred = pool_stages(model.backbone(gaussian_blur(image, 2.0)), "blocks")
        np.testing.assert_allclose(with_blur.plain[0, d:], without.plain[0] - blurred[0].numpy(), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(model(image)["features"][0].numpy(), with_blur.plain[0], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="blurred images too"):
        model.forward_head(model.backbone(image))


def test_a_blurry_image_changes_less_under_the_blur_than_a_sharp_one():
    """What the lever is for: blurring an image that is blurry already changes its features little."""
    from iqa_ray.models.registry import build_model

    model = build_model("mlp", backbone="efficientnet_lite0", pretrained="offline", frozen_backbone=True,
                        pooling="blocks", reference_blur=2.0).eval()
    torch.manual_seed(0)
    sharp = torch.rand(4, 3, 96, 96)
    blurry = gaussian_blur(sharp, 2.0)
    d = model.feature_dim // 2
    with torch.no_grad():
        change = lambda x: model.pool_images(x)[:, d:].norm(dim=1)  # noqa: E731
        assert (change(blurry) < 0.5 * change(sharp)).all()


def test_under_bf16_autocast_the_blur_and_the_scores_stay_float32(tiny_dataset):
    from iqa_ray.training.build import build

    model = build(config(tiny_dataset), torch.device("cpu")).eval()
    images = torch.rand(2, 3, 40, 48)
    with torch.no_grad():
        full = model(images)["score"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.blurred(images).dtype == torch.float32
            mixed = model(images)["score"]
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed, full, rtol=0.05, atol=0.05)


def test_a_pseudo_reference_head_trains_on_the_cache_and_its_export_scores_images_alike(tiny_dataset, tmp_path):
    import iqa_ray
    from iqa_ray.evaluation.portable import export_torchscript
    from iqa_ray.training.checkpoints import model_from_checkpoint
    from iqa_ray.training.engine import fit
    from iqa_ray.training.features import compute_features
    from iqa_ray.training.inference import predict
    from iqa_ray.training.loaders import eval_dataset, eval_loader, load_decoded

    cfg = config(tiny_dataset)
    decoded = load_decoded(cfg)
    saved = []
    result = fit(cfg, decoded, features=compute_features(decoded, cfg), on_epoch_end=lambda e: saved.append(e.save(tmp_path / "run")))
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    model, _ = model_from_checkpoint(saved[-1])
    pred, _ = predict(model, eval_loader(cfg, eval_dataset(cfg, decoded, "test")), torch.device("cpu"))
    np.testing.assert_allclose(pred, result.test_predictions[0], rtol=1e-4, atol=1e-3)
    scorer = iqa_ray.load_model(saved[-1], device="cpu")
    images = [decoded.images[i] for i in decoded.split_indices("test")[:3]]
    exported = torch.jit.load(str(export_torchscript(scorer, tmp_path / "model.pt")))
    got = exported(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()).numpy()
    np.testing.assert_allclose(got, scorer(images), rtol=1e-4, atol=1e-3)
