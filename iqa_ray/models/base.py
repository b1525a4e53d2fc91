"""The interface every quality-model family implements, so one training loop serves them all.

An :class:`IQAModel` is a :class:`~iqa_ray.models.backbones.Backbone` plus a family head. The
engine only ever calls:

* ``forward(images) -> {"score": (B,), ...}`` on float images in [0, 1] (families implement
  ``forward_head(stages)``: the backbone may run under autocast, the head never does);
* ``compute_loss(outputs, target) -> {"loss": ..., <parts>}``;
* ``param_groups(lr, backbone_lr)`` to build its optimizer;
* ``on_train_start(batches)`` / ``on_epoch_start(epoch, batches)`` hooks (no-ops unless a family
  needs data-driven initialisation, as the GMM family does);
* ``set_label_stats(mean, std)`` once, from the training labels.

A family whose head reads globally pooled backbone features (registered with ``pools_features``)
can train on a frozen-feature cache (:mod:`iqa_ray.training.features`). It then also implements
``pool_images(images)`` (what the cache holds) and ``forward_pooled(features)`` (the head on them),
and declares what the cache depends on: :attr:`IQAModel.FEATURE_CACHE_OPTIONS` and
:meth:`IQAModel.feature_cache_key` (its options that change the features),
:meth:`IQAModel.stage_mean_columns` (where the features hold every stage's spatial mean) and
:meth:`IQAModel.on_train_start_pooled` (what it does with the cached training features), so the
training layer never reads a family's options.

Heads predict standardised scores ``z``; the model reports ``score = label_mean + label_std * z``.
With ``z`` near 0 at initialisation, training starts at the data's mean instead of having to
climb to it from 0, and the same head works for 0-1 or 0-100 labels.

Precision: under mixed precision only the backbone runs in reduced precision. Its feature maps are
cast to float32 and the head, the label-scale map and everything computed from the scores (losses,
metrics) run in float32 with autocast switched off. A bfloat16 score has 8 significant bits: on a
0-100 scale its step is 0.25 between 32 and 64 and 0.5 above, so whole batches of images tie
(measured: 64 random images, 2 distinct bf16 scores) and a ranking margin of 0.1-1.0 is at or
below the rounding step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from iqa_ray.models.backbones import Backbone
from iqa_ray.models.losses import L1Loss, RegressionLoss

__all__ = ["IQAModel", "ParamGroup", "full_precision"]

# {"name": str, "params": list[nn.Parameter], "lr": float}
ParamGroup = dict[str, Any]


def full_precision(device: torch.device) -> torch.autocast:
    """A context in which autocast is off on ``device``: float32 tensors stay float32."""
    return torch.autocast(device_type=device.type, enabled=False)


class IQAModel(nn.Module):
    """Base class of the quality-model families.

    Args:
        backbone: Feature extractor; the head sizes itself from ``backbone.channels``.
        loss: Regression loss on MOS-scale scores; L1 by default.
        label_mean: Initial score offset (replace it with :meth:`set_label_stats`).
        label_std: Initial score scale.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        loss: RegressionLoss | None = None,
        label_mean: float = 50.0,
        label_std: float = 25.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.loss_fn: RegressionLoss = loss if loss is not None else L1Loss()
        self.register_buffer("label_mean", torch.tensor(0.0))
        self.register_buffer("label_std", torch.tensor(1.0))
        self.set_label_stats(label_mean, label_std)

    def set_label_stats(self, mean: float, std: float) -> None:
        """Set the affine map from standardised head outputs to the label scale.

        Args:
            mean: Mean of the training labels.
            std: Standard deviation of the training labels; must be > 0.
        """
        mean, std = float(mean), float(std)
        if not math.isfinite(mean):
            raise ValueError(f"label mean must be finite, got {mean}")
        if not (std > 0.0 and math.isfinite(std)):
            raise ValueError(f"label std must be finite and > 0, got {std}")
        self.label_mean.fill_(mean)
        self.label_std.fill_(std)

    def to_label_scale(self, standardised: Tensor) -> Tensor:
        """Map standardised head outputs to float32 scores on the label scale.

        A 0-dim float32 buffer times a bfloat16 tensor stays bfloat16, so the input is cast first.
        """
        return self.label_mean.float() + self.label_std.float() * standardised.float()

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Score images: the backbone under whatever autocast is active, the head in float32.

        Args:
            images: Float images in [0, 1], shape (B, 3, H, W).

        Returns:
            ``"score"`` of shape (B,) on the label scale (float32), plus family-specific extras.
        """
        stages = self.backbone(images)
        with full_precision(images.device):
            return self.forward_head([s.float() for s in stages])

    def forward_head(self, stages: list[Tensor]) -> dict[str, Tensor]:
        """The family's head on the backbone's feature maps; always runs in float32.

        Args:
            stages: float32 NCHW feature maps, one per backbone stage.

        Returns:
            ``"score"`` of shape (B,) on the label scale, plus family-specific extras.
        """
        raise NotImplementedError

    def compute_loss(self, outputs: dict[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        """The training loss for one batch.

        Args:
            outputs: What :meth:`forward` returned.
            target: Label-scale targets, shape (B,).

        Returns:
            ``"loss"`` (to back-propagate) and its named parts.
        """
        return self.loss_fn(outputs["score"], target)

    def param_groups(self, lr: float, backbone_lr: float) -> list[ParamGroup]:
        """Optimizer parameter groups, each with a ``"name"`` and a concrete list of parameters.

        Frozen parameters are left out, and so are groups that end up empty. Lists, never lazy
        ``filter()`` iterators: an iterator is exhausted after the first optimizer is built, which
        silently stopped the hypernetwork from training in the seed scripts.

        Args:
            lr: Learning rate of the head.
            backbone_lr: Learning rate of the backbone.

        Returns:
            Groups for ``torch.optim`` (extra keys such as ``"name"`` are kept by PyTorch).
        """
        for label, value in (("lr", lr), ("backbone_lr", backbone_lr)):
            if not (value > 0.0 and math.isfinite(value)):
                raise ValueError(f"{label} must be finite and > 0, got {value}")
        backbone_params = [p for p in self.backbone.parameters() if p.requires_grad]
        taken = {id(p) for p in self.backbone.parameters()}
        groups = [{"name": "backbone", "params": backbone_params, "lr": float(backbone_lr)}]
        for group in self._head_groups(float(lr)):
            group["params"] = [p for p in group["params"] if p.requires_grad and id(p) not in taken]
            taken.update(id(p) for p in group["params"])
            groups.append(group)
        # Whatever no family group claimed still trains, at the head's rate.
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in taken]
        if rest:
            head = next((g for g in groups if g["name"] == "head"), None)
            if head is None:
                groups.append({"name": "head", "params": rest, "lr": float(lr)})
            else:
                head["params"].extend(rest)
        return [g for g in groups if g["params"]]

    def _head_groups(self, lr: float) -> list[ParamGroup]:
        """Family-specific groups of non-backbone parameters; unclaimed ones join ``"head"``."""
        return []

    def on_train_start(self, feature_batches: Iterable[Tensor]) -> None:
        """Called once before the first epoch of a fresh (not resumed) run.

        Args:
            feature_batches: Batches of training images (float, [0, 1], (B, 3, H, W)).
        """

    def on_epoch_start(self, epoch: int, feature_batches: Iterable[Tensor]) -> None:
        """Called at the start of every epoch (0-based); may leave ``feature_batches`` unread.

        Args:
            epoch: Index of the epoch about to run.
            feature_batches: Batches of training images (float, [0, 1], (B, 3, H, W)).
        """

    # ------------------------------------------------------------------ frozen-feature cache

    #: The family's options that change the pooled features a frozen-feature cache holds: a search
    #: that shares one cache between its trials may not search them (none by default).
    FEATURE_CACHE_OPTIONS: tuple[str, ...] = ()

    @classmethod
    def feature_cache_key(cls, options: Any) -> tuple[Any, ...]:
        """This family's part of a feature cache's key: the values of its options that change the
        pooled features (:attr:`FEATURE_CACHE_OPTIONS`), from ``options`` (an instance of the
        family's options class); ``()`` by default."""
        return ()

    def stage_mean_columns(self) -> tuple[int, ...] | None:
        """The columns of this model's pooled features that are every backbone stage's spatial mean
        (the strong linear probe's features), or ``None`` when they hold none (the default)."""
        return None

    def on_train_start_pooled(self, features: Tensor) -> None:
        """Called once before the first epoch of a fresh (not resumed) run that trains on a feature
        cache, in place of :meth:`on_train_start`.

        Args:
            features: The training images' cached pooled features, (N, D).
        """

    def extra_repr(self) -> str:
        return f"loss={self.loss_fn!r}"
