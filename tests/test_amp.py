"""Mixed precision: the backbone may run in bfloat16, scores, losses and metrics never do.

CPU autocast with bfloat16 is the same code path a GPU runs with ``amp`` on, so these tests are how
CI covers it. Before the fix, the label-scale map ran inside autocast: 64 random images gave 64
distinct scores in float32 and 2 under autocast.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from iqa_ray.core.options import ConfigError
from iqa_ray.models.registry import build_model
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.device import autocast_dtype
from iqa_ray.training.engine import fit
from iqa_ray.training.inference import predict
from iqa_ray.training.loaders import load_decoded, make_loaders

SMALL = {"mlp": {"hidden_dim": 16}, "gmm": {"n_clusters": 2, "feature_dim": 8, "hidden_dim": 8}, "hyperiqa": {}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_hyperiqa_lite0_scores_stay_distinct_and_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = build_model("hyperiqa", backbone="efficientnet_lite0", pretrained="offline").eval()
    model.set_label_stats(50.0, 20.0)
    images = torch.rand(64, 3, 128, 128)
    with torch.no_grad():
        full = model(images)["score"]
        with _bf16():
            mixed = model(images)["score"]
    assert full.dtype == torch.float32 and mixed.dtype == torch.float32
    # An untrained head spreads scores over about 0.1 around the mean: float32 keeps them apart
    # (a chance tie or two is possible), bfloat16 rounded all 64 onto 1-2 values.
    assert len(torch.unique(full)) >= 60
    # The backbone's bf16 rounding moves scores a little; the head must not round them into ties.
    assert len(torch.unique(mixed)) >= 60
    assert spearmanr(full.numpy(), mixed.numpy()).statistic > 0.9


@pytest.mark.parametrize("family", sorted(SMALL))
def test_every_familys_scores_and_loss_are_float32_under_bf16_autocast(family):
    torch.manual_seed(0)
    model = build_model(family, backbone="resnet18", pretrained="none", **SMALL[family])
    images, target = torch.rand(8, 3, 64, 64), torch.linspace(10, 90, 8)
    with _bf16():
        outputs = model(images)
    assert outputs["score"].dtype == torch.float32
    losses = model.compute_loss(outputs, target)
    assert all(v.dtype == torch.float32 for v in losses.values())
    losses["loss"].backward()  # gradients flow back through the bf16 backbone
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_label_scale_map_is_float32_for_a_bfloat16_input():
    model = build_model("mlp", backbone="resnet18", pretrained="none", hidden_dim=8)
    model.set_label_stats(50.0, 20.0)
    z = torch.tensor([0.001, 0.002, 0.003], dtype=torch.bfloat16)
    scores = model.to_label_scale(z)
    assert scores.dtype == torch.float32
    assert len(torch.unique(scores)) == 3


def test_amp_setting_chooses_the_autocast_dtype_and_rejects_other_values():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(True, cpu) is None  # bf16 on CPU only when asked for
    assert autocast_dtype("auto", cpu) is None
    # "auto" / true on CUDA: bfloat16 where the device has it, float16 (with a scaler) where not
    assert autocast_dtype(True, cuda, bf16_supported=True) is torch.bfloat16
    assert autocast_dtype("auto", cuda, bf16_supported=False) is torch.float16
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("fp16", cpu) is torch.float16
    assert autocast_dtype(False, cuda) is None
    assert autocast_dtype("off", cuda) is None
    with pytest.raises(ConfigError, match="amp must be one of auto, bf16, fp16, off"):
        TrainConfig.from_dict({"amp": "fp8"})


def test_a_bf16_run_on_cpu_trains_and_scores_in_float32(tiny_dataset):
    config = TrainConfig.from_dict({"dataset": str(tiny_dataset.path), "crop_size": 48, "batch_size": 8,
                                    "eval_batch_size": 32, "epochs": 1, "lr": 3e-3, "family": "hyperiqa",
                                    "pretrained": "offline", "amp": "bf16"})
    decoded = load_decoded(config)
    result = fit(config, decoded, device="cpu")
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_srcc"]) for h in result.history)
    pred, _ = predict(result.model, make_loaders(config, decoded).val, torch.device("cpu"), torch.bfloat16)
    # Float32 scores: no ties forced by bfloat16's 8-bit mantissa.
    assert len(np.unique(pred)) == len(pred)
