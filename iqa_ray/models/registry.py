"""Model families by name, and the one function that builds a model from plain arguments.

A plain dict with explicit imports: adding a family means importing its class here and adding one
entry. Unknown names fail loudly with the list of valid ones.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from iqa_ray.models.backbones import SUPPORTED_BACKBONES, create_backbone
from iqa_ray.models.base import IQAModel
from iqa_ray.models.gmm import GMMIQA
from iqa_ray.models.hyperiqa import HyperIQA
from iqa_ray.models.losses import RegressionLoss
from iqa_ray.models.mlp import MLPIQA

__all__ = ["FAMILIES", "build_model", "family_arguments"]

FAMILIES: dict[str, type[IQAModel]] = {
    "mlp": MLPIQA,
    "gmm": GMMIQA,
    "hyperiqa": HyperIQA,
}


def family_arguments(family: str) -> list[str]:
    """The family-specific keyword arguments a family takes (everything but backbone and loss)."""
    _check_family(family)
    parameters = inspect.signature(FAMILIES[family]).parameters.values()
    return [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name != "loss"]


def build_model(
    family: str,
    *,
    backbone: str,
    pretrained: str | os.PathLike[str] = "none",
    frozen_backbone: bool = False,
    img_size: int | None = None,
    loss: RegressionLoss | None = None,
    trainable_stages: int | None = None,
    **family_kwargs: Any,
) -> IQAModel:
    """Build a quality model.

    Args:
        family: One of ``FAMILIES``: ``"mlp"``, ``"gmm"``, ``"hyperiqa"``.
        backbone: One of :data:`~iqa_ray.models.backbones.SUPPORTED_BACKBONES`.
        pretrained: Backbone weight source (see :func:`~iqa_ray.models.backbones.create_backbone`).
        frozen_backbone: Freeze the backbone.
        img_size: Input size, needed by fixed-size backbones (ViT, Swin).
        loss: Regression loss; L1 by default.
        trainable_stages: Train only the backbone's last this many feature stages (``None``: all).
        **family_kwargs: The family's own arguments (see :func:`family_arguments`).

    Returns:
        The model, in train mode.

    Raises:
        ValueError: Unknown family or backbone.
        TypeError: An argument the family does not take.
    """
    _check_family(family)
    accepted = family_arguments(family)
    unknown = sorted(set(family_kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"family {family!r} got unexpected arguments {unknown}; it takes {accepted}")
    if backbone not in SUPPORTED_BACKBONES:
        create_backbone(backbone)  # raises the error that lists the valid names
    net = create_backbone(backbone, pretrained=pretrained, frozen=frozen_backbone, img_size=img_size,
                          trainable_stages=trainable_stages)
    return FAMILIES[family](net, loss=loss, **family_kwargs)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; valid families: {', '.join(FAMILIES)}")
