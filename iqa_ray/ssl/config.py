"""The pre-training config: everything that determines one run (frozen, validated when built)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from iqa_ray.core.options import Options, finite, require
from iqa_ray.data.distortions.registry import DISTORTIONS
from iqa_ray.models.backbones import SUPPORTED_BACKBONES


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class PretrainConfig(Options):
    """Everything that determines one pre-training run (frozen, validated when built).

    Attributes:
        backbone: a timm backbone (see ``iqa_ray.models.backbones.SUPPORTED_BACKBONES``).
        pretrained: the start point: ``offline`` (ImageNet EfficientNet-Lite0 weights shipped in a
            pip package), ``none``, ``hub`` or a weights file.
        epochs: pre-training epochs.
        lr: learning rate of the backbone (the projection head gets ``lr * head_lr_mult``).
        head_lr_mult: head learning rate as a multiple of ``lr`` (the head starts random).
        weight_decay: AdamW's decoupled weight decay.
        levels: K, degradation levels per crop (>= 2); every ordered pair is ranked.
        level_range: (lowest, highest) level in [0, 1] the K levels are spread over.
        level_jitter: random shift of each level, as a fraction of half the spacing, in [0, 1).
        margin: ranking margin on the [-1, 1] quality score.
        ranking_weight: weight of the margin ranking loss.
        agreement_weight: weight of the two-crop agreement loss.
        crop_size: side of the square crops, in pixels.
        batch_size: images per optimiser step (each gives 2 x K crops).
        images_per_epoch: image samples per epoch (images are cycled, reshuffled every epoch).
        distortions: distortion types to draw from; empty means all registered types.
        embedding_dim: width of the quality embedding.
        hidden_dim: width of the projection MLP's hidden layer.
        holdout_images: images kept out of training to measure the held-out ranking accuracy.
        eval_samples: fixed (crop, type, levels) draws from the held-out images scored per epoch.
        grad_clip: clip the global gradient norm to this (``None`` = off).
        seed: seed of initialisation, sampling and distortions.
    """

    backbone: str = "efficientnet_lite0"
    pretrained: str = "offline"
    epochs: int = 10
    lr: float = 1e-4
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    levels: int = 4
    level_range: tuple[float, float] = (0.1, 0.9)
    level_jitter: float = 0.5
    margin: float = 0.05
    ranking_weight: float = 1.0
    agreement_weight: float = 1.0
    crop_size: int = 128
    batch_size: int = 8
    images_per_epoch: int = 256
    distortions: tuple[str, ...] = ()
    embedding_dim: int = 128
    hidden_dim: int = 512
    holdout_images: int = 2
    eval_samples: int = 16
    grad_clip: float | None = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.backbone in SUPPORTED_BACKBONES,
                f"unknown backbone {self.backbone!r}; valid: {', '.join(SUPPORTED_BACKBONES)}")
        require(isinstance(self.pretrained, str) and self.pretrained != "", "pretrained must be a non-empty string")
        require(_int(self.epochs) and self.epochs >= 1, f"epochs must be an integer >= 1, got {self.epochs!r}")
        require(finite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        require(finite(self.head_lr_mult) and self.head_lr_mult > 0, f"head_lr_mult must be > 0, got {self.head_lr_mult!r}")
        require(finite(self.weight_decay) and self.weight_decay >= 0,
                f"weight_decay must be >= 0, got {self.weight_decay!r}")
        require(_int(self.levels) and self.levels >= 2,
                f"levels (K) must be an integer >= 2 (ranking needs two levels), got {self.levels!r}")
        lr_ = tuple(self.level_range) if isinstance(self.level_range, (tuple, list)) else ()
        require(len(lr_) == 2 and all(finite(v) for v in lr_) and 0 <= lr_[0] < lr_[1] <= 1,
                f"level_range must be (low, high) with 0 <= low < high <= 1, got {self.level_range!r}")
        object.__setattr__(self, "level_range", (float(lr_[0]), float(lr_[1])))
        require(finite(self.level_jitter) and 0 <= self.level_jitter < 1,
                f"level_jitter must be in [0, 1) (a fraction of half the level spacing), got {self.level_jitter!r}")
        require(finite(self.margin) and self.margin >= 0, f"margin must be >= 0, got {self.margin!r}")
        for name in ("ranking_weight", "agreement_weight"):
            value = getattr(self, name)
            require(finite(value) and value >= 0, f"{name} must be >= 0, got {value!r}")
        require(self.ranking_weight > 0, "ranking_weight must be > 0: without the ranking term nothing ties the "
                                         "embedding to quality (agreement alone is met by a constant)")
        require(_int(self.crop_size) and 32 <= self.crop_size <= 1024,
                f"crop_size must be an integer in [32, 1024], got {self.crop_size!r}")
        require(_int(self.batch_size) and self.batch_size >= 1, f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        require(_int(self.images_per_epoch) and self.images_per_epoch >= self.batch_size,
                f"images_per_epoch must be an integer >= batch_size ({self.batch_size}), got {self.images_per_epoch!r}")
        require(isinstance(self.distortions, (tuple, list)) and all(isinstance(d, str) for d in self.distortions),
                f"distortions must be a list of distortion names, got {self.distortions!r}")
        unknown = [d for d in self.distortions if d not in DISTORTIONS]
        require(not unknown, f"unknown distortions {unknown}; valid: {', '.join(DISTORTIONS)}")
        require(len(set(self.distortions)) == len(self.distortions), f"distortions repeat a type: {self.distortions!r}")
        object.__setattr__(self, "distortions", tuple(self.distortions))
        require(_int(self.embedding_dim) and self.embedding_dim >= 2,
                f"embedding_dim must be an integer >= 2, got {self.embedding_dim!r}")
        require(_int(self.hidden_dim) and self.hidden_dim >= 1, f"hidden_dim must be an integer >= 1, got {self.hidden_dim!r}")
        require(_int(self.holdout_images) and self.holdout_images >= 1,
                f"holdout_images must be an integer >= 1, got {self.holdout_images!r}")
        require(_int(self.eval_samples) and self.eval_samples >= 1,
                f"eval_samples must be an integer >= 1, got {self.eval_samples!r}")
        require(self.grad_clip is None or (finite(self.grad_clip) and self.grad_clip > 0),
                f"grad_clip must be None or > 0, got {self.grad_clip!r}")
        require(_int(self.seed) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None, **overrides: Any) -> PretrainConfig:
        """Build from flat keys (a Tune trial's config, a JSON file), validating every value.

        Raises:
            ConfigError: an unknown key (the message lists the valid ones) or an invalid value.
        """
        return super().from_dict({**(values or {}), **overrides}, what="pre-training config")

    def distortion_names(self) -> tuple[str, ...]:
        return self.distortions or tuple(DISTORTIONS)

    @property
    def steps_per_epoch(self) -> int:
        return self.images_per_epoch // self.batch_size
