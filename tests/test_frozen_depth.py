"""Frozen depth: a backbone that trains only its last N feature stages (``trainable_stages``)."""

from __future__ import annotations

import pytest
import torch

from iqa_ray.core.options import ConfigError
from iqa_ray.models.backbones import create_backbone
from iqa_ray.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_stages_own_the_parameters_that_compute_them():
    lite0 = create_backbone("efficientnet_lite0", pretrained="none").parameter_stages()
    assert lite0["conv_stem.weight"] == 0 and lite0["blocks.0.0.conv_dw.weight"] == 0
    assert lite0["blocks.3.0.conv_pw.weight"] == 3 and lite0["blocks.4.0.conv_pw.weight"] == 3  # blocks.4 emits stage 3
    assert lite0["blocks.5.0.conv_pw.weight"] == 4 and lite0["blocks.6.0.conv_pw.weight"] == 4
    resnet = create_backbone("resnet18", pretrained="none").parameter_stages()
    assert resnet["conv1.weight"] == 0 and resnet["layer1.0.conv1.weight"] == 1 and resnet["layer4.1.bn2.bias"] == 4
    assert sorted(set(resnet.values())) == [0, 1, 2, 3, 4]


def test_only_the_last_stage_trains_and_the_frozen_ones_keep_weights_and_statistics():
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", pretrained="none", trainable_stages=1)
    trainable = {n for n, p in backbone.body.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("layer4.") for n in trainable)
    backbone.train()
    assert not backbone.body.layer1.training and not backbone.body.bn1.training and backbone.body.layer4.training
    before = {k: v.clone() for k, v in backbone.body.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.1)
    loss = backbone(torch.rand(4, 3, 64, 64))[-1].square().mean()
    loss.backward()
    optimizer.step()
    after = backbone.body.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("layer4.") for k in changed), sorted(changed)[:5]
    # BatchNorm running statistics of the frozen stages did not move either (eval mode)
    assert torch.equal(before["layer1.0.bn1.running_mean"], after["layer1.0.bn1.running_mean"])
    assert not torch.equal(before["layer4.0.bn1.running_mean"], after["layer4.0.bn1.running_mean"])


def test_zero_and_all_stages():
    none_train = create_backbone("efficientnet_lite0", pretrained="none", trainable_stages=0)
    assert not any(p.requires_grad for p in none_train.parameters())
    every = create_backbone("efficientnet_lite0", pretrained="none", trainable_stages=5)
    assert all(p.requires_grad for p in every.parameters())


def test_out_of_range_and_conflicting_settings_are_named():
    with pytest.raises(ValueError, match=r"trainable_stages must be an integer in \[0, 5\] for resnet18"):
        create_backbone("resnet18", pretrained="none", trainable_stages=6)
    with pytest.raises(ValueError, match="trainable_stages with frozen=True"):
        create_backbone("resnet18", pretrained="none", frozen=True, trainable_stages=1)
    with pytest.raises(ConfigError, match="trainable_stages must be None"):
        TrainConfig.from_dict({"trainable_stages": -1})
    with pytest.raises(ConfigError, match="trainable_stages with frozen_backbone = true"):
        TrainConfig.from_dict({"trainable_stages": 1, "frozen_backbone": True})


def test_a_run_with_a_frozen_depth_trains_the_last_stage_and_its_head_only(tiny_dataset):
    from iqa_ray.training.build import build

    config = TrainConfig.from_dict({"dataset": str(tiny_dataset.path), "family": "mlp", "pretrained": "offline",
                                    "trainable_stages": 2, "crop_size": 48})
    model = build(config, torch.device("cpu"))
    groups = {g["name"]: g for g in model.param_groups(1e-3, 1e-4)}
    stages = model.backbone.parameter_stages()
    trained = {id(p) for p in groups["backbone"]["params"]}
    by_id = {id(p): n for n, p in model.backbone.body.named_parameters()}
    assert trained and {stages[by_id[i]] for i in trained} == {3, 4}
    assert groups["head"]["params"]


def test_a_config_bounds_the_frozen_depth_by_its_backbones_stages_before_anything_is_built():
    from iqa_ray.models.backbones import FEATURE_STAGES, SUPPORTED_BACKBONES

    assert set(FEATURE_STAGES) == set(SUPPORTED_BACKBONES)
    for name in SUPPORTED_BACKBONES:  # the table is what the built backbones return
        assert len(create_backbone(name, pretrained="none").channels) == FEATURE_STAGES[name], name
    assert TrainConfig.from_dict({"trainable_stages": 5}).model.trainable_stages == 5
    with pytest.raises(ConfigError, match="trainable_stages must be at most 5 for efficientnet_lite0"):
        TrainConfig.from_dict({"trainable_stages": 9})
    with pytest.raises(ConfigError, match="at most 4 for swin_tiny_patch4_window7_224"):
        TrainConfig.from_dict({"backbone": "swin_tiny_patch4_window7_224", "trainable_stages": 5})
