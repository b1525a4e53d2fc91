"""Regression losses for quality scores, behind one interface that returns a dict of named parts.

Every loss takes predicted and target scores on the dataset's MOS scale (0-100, like KonIQ-10k's
MOS in HyperIQA), shape (B,), and returns ``{"loss": total, <part>: value, ...}`` so the training
loop can back-propagate ``"loss"`` and log every part without knowing which loss runs.

:class:`RankingLoss` is the pairwise ranking loss of the HyperIQA experiments (seed 002): a
margin hinge on score differences of correctly ordered pairs, the loss RankIQA popularised for
IQA (Liu, van de Weijer, Bagdanov, "RankIQA: Learning from Rankings for No-reference Image
Quality Assessment", ICCV 2017), mixed with L1 as ``(1 - alpha) * L1 + alpha * L_rank``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RegressionLoss", "L1Loss", "MSELoss", "RankingLoss", "LOSSES", "build_loss"]


class RegressionLoss:
    """Interface: ``loss(pred, target) -> {"loss": total, <part>: value, ...}``."""

    def __call__(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Compute the loss.

        Args:
            pred: Predicted scores, shape (B,).
            target: Target scores on the same scale, shape (B,).

        Returns:
            ``"loss"`` (the scalar to back-propagate) and the named parts it is made of.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _check_pair(pred: Tensor, target: Tensor) -> None:
    # (B, 1) against (B,) would broadcast to (B, B) and train on nonsense without any error.
    if pred.ndim != 1 or pred.shape != target.shape:
        raise ValueError(
            f"pred and target must both have shape (B,), got {tuple(pred.shape)} and {tuple(target.shape)}"
        )


class L1Loss(RegressionLoss):
    """Mean absolute error (HyperIQA's training loss)."""

    def __call__(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        _check_pair(pred, target)
        l1 = F.l1_loss(pred, target.to(pred.dtype))
        return {"loss": l1, "l1": l1}


class MSELoss(RegressionLoss):
    """Mean squared error."""

    def __call__(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        _check_pair(pred, target)
        mse = F.mse_loss(pred, target.to(pred.dtype))
        return {"loss": mse, "mse": mse}


class RankingLoss(RegressionLoss):
    """L1 mixed with a pairwise margin ranking loss.

    ``loss = (1 - alpha) * L1 + alpha * L_rank`` with
    ``L_rank = mean over pairs (i, j) with target_i > target_j of max(0, margin - (pred_i - pred_j))``.
    Tied targets form no pair; a batch without any ordered pair has ``L_rank = 0``.

    Args:
        alpha: Weight of the ranking term, in [0, 1]; 0 is plain L1 (seed 002 recommends 0.3 and
            wanted a grid over 0.1-0.7).
        margin: How far, in MOS points, a better image should score above a worse one; >= 0
            (seed 002: 0.5, grid 0.3-1.0).
    """

    def __init__(self, alpha: float = 0.3, margin: float = 0.5) -> None:
        alpha, margin = float(alpha), float(margin)
        if not 0.0 <= alpha <= 1.0:  # also rejects NaN
            raise ValueError(f"alpha={alpha} is outside the valid range [0, 1]")
        if not (margin >= 0.0 and math.isfinite(margin)):
            raise ValueError(f"margin={margin} is outside the valid range [0, inf)")
        self.alpha = alpha
        self.margin = margin

    def __call__(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        _check_pair(pred, target)
        target = target.to(pred.dtype)
        l1 = F.l1_loss(pred, target)
        # All B x B pairs at once: row i, column j holds the pair (i, j).
        ordered = target.unsqueeze(1) > target.unsqueeze(0)
        hinge = torch.clamp(self.margin - (pred.unsqueeze(1) - pred.unsqueeze(0)), min=0.0)
        n_pairs = ordered.sum()
        rank = (hinge * ordered).sum() / n_pairs.clamp(min=1)
        loss = (1.0 - self.alpha) * l1 + self.alpha * rank
        return {"loss": loss, "l1": l1, "rank": rank}


LOSSES: dict[str, type[RegressionLoss]] = {
    "l1": L1Loss,
    "mse": MSELoss,
    "ranking": RankingLoss,
}


def build_loss(name: str, **kwargs: Any) -> RegressionLoss:
    """Build a regression loss by name.

    Args:
        name: One of ``LOSSES``: ``"l1"``, ``"mse"``, ``"ranking"``.
        **kwargs: Arguments of that loss (``alpha``, ``margin`` for ``"ranking"``).

    Returns:
        The loss object.

    Raises:
        ValueError: Unknown name or invalid argument value.
        TypeError: An argument the loss does not take.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}")
    cls = LOSSES[name]
    accepted = [
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"loss {name!r} got unexpected arguments {unknown}; it takes {accepted or 'no arguments'}"
        )
    return cls(**kwargs)
