"""MLPIQA: pooled backbone features regressed by a small MLP (the seeds' "simple baseline").

No paper of its own: this is the fine-tuned-backbone regressor that most deep NR-IQA work
compares against, e.g. KonCept512 (Hosu, Lin, Sziranyi, Saupe, "KonIQ-10k: An Ecologically Valid
Database for Deep Learning of Blind Image Quality Assessment", IEEE TIP 2020): an ImageNet
backbone, global average pooling of the last stage, and fully connected layers with dropout.
"""

from __future__ import annotations

from torch import Tensor, nn

from iqa_ray.models.backbones import Backbone
from iqa_ray.models.base import IQAModel
from iqa_ray.models.losses import RegressionLoss

__all__ = ["MLPIQA", "init_small_output"]


def init_small_output(layer: nn.Linear, std: float = 1e-3) -> None:
    """Initialise a score-producing layer near zero so the first predictions sit at the label mean."""
    nn.init.normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)


class MLPIQA(IQAModel):
    """Backbone -> global average pool of the last stage -> MLP -> score.

    Args:
        backbone: Feature extractor.
        hidden_dim: Width of the hidden layer.
        dropout: Dropout before the output layer, in [0, 1).
        loss: Regression loss; L1 by default.

    Outputs of ``forward``: ``"score"`` (B,), ``"features"`` (B, C) pooled last-stage features.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        hidden_dim: int = 512,
        dropout: float = 0.3,
        loss: RegressionLoss | None = None,
    ) -> None:
        super().__init__(backbone, loss=loss)
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {hidden_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        in_dim = backbone.channels[-1]
        self.head = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, 1),
        )
        init_small_output(self.head[-1])

    def forward_head(self, stages: list[Tensor]) -> dict[str, Tensor]:
        features = stages[-1].mean(dim=(2, 3))
        standardised = self.head(features).squeeze(1)
        return {"score": self.to_label_scale(standardised), "features": features}
