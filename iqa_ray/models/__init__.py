"""Quality models: timm backbones, the model families built on them, and their losses.

Nothing in this package knows about data files or Ray Tune.
"""

from iqa_ray.models.backbones import SUPPORTED_BACKBONES, Backbone, create_backbone
from iqa_ray.models.base import IQAModel
from iqa_ray.models.gmm import GMMIQA
from iqa_ray.models.hyperiqa import HyperIQA
from iqa_ray.models.losses import LOSSES, L1Loss, MSELoss, RankingLoss, RegressionLoss, build_loss
from iqa_ray.models.mlp import MLPIQA
from iqa_ray.models.registry import FAMILIES, build_model, family_arguments

__all__ = [
    "FAMILIES",
    "GMMIQA",
    "HyperIQA",
    "IQAModel",
    "L1Loss",
    "LOSSES",
    "MLPIQA",
    "MSELoss",
    "RankingLoss",
    "RegressionLoss",
    "SUPPORTED_BACKBONES",
    "Backbone",
    "build_loss",
    "build_model",
    "create_backbone",
    "family_arguments",
]
