"""The quality encoder (backbone -> pooled last stage -> projection -> embedding and score with two
learnable anchors) and the pre-training loss: margin ranking over levels plus two-crop agreement."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iqa_ray.models.backbones import Backbone


class QualityEncoder(nn.Module):
    """Backbone -> pooled last stage -> projection MLP -> quality embedding and score.

    Args:
        backbone: the feature extractor being pre-trained (the only part kept afterwards).
        embedding_dim: width of the L2-normalised quality embedding.
        hidden_dim: hidden width of the projection MLP.

    ``forward(images)`` returns ``"embedding"`` (B, D) unit vectors and ``"score"`` (B,) in
    [-1, 1]: half the difference of the cosines to the learnable ``good`` and ``bad`` anchors.
    """

    def __init__(self, backbone: Backbone, *, embedding_dim: int = 128, hidden_dim: int = 512) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = nn.Sequential(
            nn.Linear(backbone.channels[-1], hidden_dim), nn.GELU(), nn.Linear(hidden_dim, embedding_dim)
        )
        # Row 0: "good photo", row 1: "bad photo" (QualiCLIP's antonym prompts, without text).
        self.anchors = nn.Parameter(torch.randn(2, embedding_dim) / math.sqrt(embedding_dim))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        pooled = self.backbone(images)[-1].mean(dim=(2, 3))
        embedding = F.normalize(self.projection(pooled), dim=1)
        cosines = embedding @ F.normalize(self.anchors, dim=1).T
        return {"embedding": embedding, "score": (cosines[:, 0] - cosines[:, 1]) / 2}

    def param_groups(self, lr: float, head_lr: float) -> list[dict[str, Any]]:
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [*self.projection.parameters(), self.anchors]
        return [{"name": "backbone", "params": backbone, "lr": lr}, {"name": "head", "params": head, "lr": head_lr}]


def _ordered_pairs(levels: int, device: torch.device) -> tuple[Tensor, Tensor]:
    i, j = torch.triu_indices(levels, levels, offset=1, device=device)
    return i, j


def ssl_loss(
    scores: Tensor,
    embeddings: Tensor,
    *,
    margin: float,
    ranking_weight: float = 1.0,
    agreement_weight: float = 1.0,
) -> dict[str, Tensor]:
    """The pre-training loss of one batch and its parts.

    Args:
        scores: (B, 2, K) quality scores; level index 0 is the least degraded.
        embeddings: (B, 2, K, D) unit-norm quality embeddings.
        margin: the ranking margin.
        ranking_weight: weight of the ranking term.
        agreement_weight: weight of the agreement term.

    Returns:
        ``loss``, ``ranking`` (margin ranking over all ordered level pairs in each crop),
        ``agreement`` (mean ``1 - cos`` between the two crops at each level) and
        ``pair_accuracy`` (share of ordered pairs scored in the right order; not differentiable).
    """
    if scores.ndim != 3 or scores.shape[1] != 2 or scores.shape[2] < 2:
        raise ValueError(f"scores must have shape (B, 2, K) with K >= 2, got {tuple(scores.shape)}")
    if embeddings.shape[:3] != scores.shape:
        raise ValueError(f"embeddings {tuple(embeddings.shape)} do not match scores {tuple(scores.shape)}")
    i, j = _ordered_pairs(scores.shape[2], scores.device)
    gaps = scores[:, :, i] - scores[:, :, j]  # (B, 2, pairs): must be >= margin
    ranking = F.relu(margin - gaps).mean()
    agreement = (1 - (embeddings[:, 0] * embeddings[:, 1]).sum(dim=-1)).mean()
    return {
        "loss": ranking_weight * ranking + agreement_weight * agreement,
        "ranking": ranking,
        "agreement": agreement,
        "pair_accuracy": (gaps > 0).float().mean().detach(),
    }


def ranking_accuracy(scores: Tensor) -> float:
    """Share of ordered level pairs (over crops and samples) whose less degraded member scores higher."""
    i, j = _ordered_pairs(scores.shape[-1], scores.device)
    return float((scores[..., i] > scores[..., j]).float().mean())


def encode_samples(encoder: QualityEncoder, batch: Tensor) -> tuple[Tensor, Tensor]:
    """(B, 2, K, 3, S, S) -> scores (B, 2, K) and embeddings (B, 2, K, D), in one backbone pass."""
    b, c, k = batch.shape[:3]
    out = encoder(batch.flatten(0, 2))
    return out["score"].view(b, c, k), out["embedding"].view(b, c, k, -1)
