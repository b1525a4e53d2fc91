"""pooling = "blocks" / "every_block": every block group's (or block's) mean and spread
(EfficientNet-Lite0: 16 blocks in 7 groups, 5 stages)."""

import numpy as np
import pytest
import torch

from iqa_ray.models.backbones import create_backbone
from iqa_ray.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_block_taps_return_every_group_and_the_stages_among_them_unchanged():
    backbone = create_backbone("efficientnet_lite0", pretrained="offline", frozen=True)
    x = torch.rand(2, 3, 96, 128)
    stages = backbone(x)
    backbone.use_block_taps()
    blocks = backbone(x)
    assert backbone.tap_channels == [16, 24, 40, 80, 112, 192, 320] and len(blocks) == 7
    assert backbone.stage_taps == [0, 1, 2, 4, 6]
    for stage, tap in zip(stages, backbone.stage_taps):
        assert torch.equal(stage, blocks[tap])
    # every block: the groups' outputs are the last block of each group, the stages among them unchanged
    backbone.use_block_taps(every_block=True)
    every = backbone(x)
    assert backbone.taps == "every_block" and len(every) == 16
    assert backbone.tap_channels == [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320]
    assert backbone.stage_taps == [0, 2, 4, 10, 15]
    for group_out, tap in zip(blocks, [0, 2, 4, 7, 10, 14, 15]):
        assert torch.equal(group_out, every[tap])
    # a backbone without block groups keeps returning its stages
    resnet = create_backbone("resnet18", pretrained="none")
    resnet.use_block_taps()
    assert resnet.taps == "stages" and len(resnet(x)) == 5


def config(tiny_dataset, **kw):
    return TrainConfig.from_dict({"dataset": str(tiny_dataset.path), "crop_size": 32, "whole_image": True,
                                  "feature_cache": True, "family": "mlp", "pooling": "blocks", "frozen_backbone": True,
                                  "pretrained": "offline", "hidden_dim": 32, "batch_size": 8, "epochs": 3, "lr": 3e-3,
                                  "amp": False, **kw})


def test_a_block_cache_holds_what_the_model_pools_and_the_probes_stage_means(tiny_dataset):
    from iqa_ray.training.build import build
    from iqa_ray.training.features import compute_features
    from iqa_ray.training.loaders import load_decoded

    cfg = config(tiny_dataset)
    decoded = load_decoded(cfg)
    blocks = compute_features(decoded, cfg)
    stages = compute_features(decoded, config(tiny_dataset, pooling="stages"))
    every_cfg = config(tiny_dataset, pooling="every_block")
    every = compute_features(decoded, every_cfg)
    model = build(cfg, torch.device("cpu")).eval()
    every_model = build(every_cfg, torch.device("cpu")).eval()
    assert model.feature_dim == 2 * (16 + 24 + 40 + 80 + 112 + 192 + 320) == blocks.plain.shape[1]
    assert every_model.feature_dim == 2 * (16 + 2 * 24 + 2 * 40 + 3 * 80 + 3 * 112 + 4 * 192 + 320) == every.plain.shape[1]
    with torch.no_grad():
        image = torch.from_numpy(decoded.images[0]).permute(2, 0, 1)[None].float() / 255
        # One image through the model as trained (NCHW, BatchNorms as they are) against a cache computed
        # in batches, NHWC, with the BatchNorms folded into the convolutions: float32 sums grouped
        # differently (1.3e-5 seen on a 0.03 value of a deep block; the features reach 1.3), the same
        # absolute tolerance for both poolings.
        np.testing.assert_allclose(model(image)["features"][0].numpy(), blocks.plain[0], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(every_model(image)["features"][0].numpy(), every.plain[0], rtol=1e-5, atol=1e-4)
    # the strong probe reads the same stage means from any of the caches
    np.testing.assert_allclose(blocks.stage_means(), stages.stage_means(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(every.stage_means(), stages.stage_means(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pooling", ["blocks", "every_block"])
def test_a_block_pooled_head_trains_on_the_cache_and_its_checkpoint_scores_images_alike(tiny_dataset, tmp_path, pooling):
    from iqa_ray.training.checkpoints import model_from_checkpoint
    from iqa_ray.training.engine import fit
    from iqa_ray.training.features import compute_features
    from iqa_ray.training.inference import predict
    from iqa_ray.training.loaders import eval_dataset, eval_loader, load_decoded

    cfg = config(tiny_dataset, pooling=pooling)
    decoded = load_decoded(cfg)
    saved = []
    result = fit(cfg, decoded, features=compute_features(decoded, cfg), on_epoch_end=lambda e: saved.append(e.save(tmp_path)))
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    model, _ = model_from_checkpoint(saved[-1])
    pred, _ = predict(model, eval_loader(cfg, eval_dataset(cfg, decoded, "test")), torch.device("cpu"))
    np.testing.assert_allclose(pred, result.test_predictions[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("pooling", ["blocks", "every_block"])
def test_a_block_pooled_model_exports_to_torchscript_with_the_same_scores(tiny_dataset, tmp_path, pooling):
    """The block taps are the body's own forward written out: tracing keeps them."""
    import iqa_ray
    from iqa_ray.evaluation.portable import export_torchscript
    from iqa_ray.training.engine import fit
    from iqa_ray.training.loaders import load_decoded

    cfg = config(tiny_dataset, feature_cache=False, epochs=1, pooling=pooling)
    decoded = load_decoded(cfg)
    saved = []
    fit(cfg, decoded, on_epoch_end=lambda e: saved.append(e.save(tmp_path / "run")))
    scorer = iqa_ray.load_model(saved[-1], device="cpu")
    images = [decoded.images[i] for i in decoded.split_indices("test")[:3]]
    expected = scorer(images)
    exported = torch.jit.load(str(export_torchscript(scorer, tmp_path / "model.pt")))
    got = exported(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
