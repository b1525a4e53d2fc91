"""The model a :class:`~iqa_ray.training.config.TrainConfig` describes, on a device: family, backbone, loss,
a pre-trained encoder loaded into the backbone, and the memory format for the device.

Used by the training engine and by the frozen-feature pass (:mod:`iqa_ray.training.features`), which must
build the very backbone a run trains on.
"""

from __future__ import annotations

import os

import torch

from iqa_ray.models.base import IQAModel
from iqa_ray.models.encoder_file import load_encoder_into
from iqa_ray.models.losses import build_loss
from iqa_ray.models.registry import build_model
from iqa_ray.training.config import TrainConfig


def build(config: TrainConfig, device: torch.device) -> IQAModel:
    """A new model for ``config`` on ``device`` (``pretrained_encoder`` loaded, strictly)."""
    m = config.model
    img_size = m.img_size or config.data.crop_size
    model = build_model(m.family, backbone=m.backbone, pretrained=m.pretrained, frozen_backbone=m.frozen_backbone,
                        img_size=img_size, loss=build_loss(m.loss, **m.loss_kwargs()),
                        **m.family_kwargs(seed=config.optim.seed))
    if m.pretrained_encoder:
        load_encoder_into(model.backbone, os.path.expanduser(m.pretrained_encoder))
    if m.trainable_stages is not None:  # after the encoder is loaded (loading may not reset requires_grad)
        model.backbone.freeze_stages(m.trainable_stages)
    model = model.to(device)
    if memory_format(config, device) is torch.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


CNN_PREFIXES = ("resnet", "efficientnet", "mobilenet", "convnext", "regnet", "densenet", "vgg")


def memory_format(config: TrainConfig, device: torch.device) -> torch.memory_format | None:
    """``channels_last`` for CNN backbones on CUDA when the run allows it, else ``None`` (as is)."""
    if device.type == "cuda" and config.optim.channels_last and config.model.backbone.startswith(CNN_PREFIXES):
        return torch.channels_last
    return None


def inference_memory_format(config: TrainConfig) -> torch.memory_format | None:
    """``channels_last`` for CNN backbones on every device when the run allows it, else ``None``:
    the frozen-feature pass, where NHWC convolutions are about 2x faster on CPU too."""
    if config.optim.channels_last and config.model.backbone.startswith(CNN_PREFIXES):
        return torch.channels_last
    return None
