"""Quality-aware self-supervised pre-training of any backbone on unlabelled images.

Follows the image side of QualiCLIP (Agnolucci, Galteri, Bertini, "Quality-Aware Image-Text
Alignment for Opinion-Unaware Image Quality Assessment", 2024). QualiCLIP degrades unlabelled
photos synthetically at increasing intensities and trains CLIP's image encoder so that the
similarity to the antonym prompts "Good photo." / "Bad photo." ranks the degraded versions in
order, while two crops of one photo degraded at the same intensity get consistent
representations. There is no text here: the two prompt embeddings become two learnable anchor
vectors in a quality-embedding space, so the recipe works for every timm backbone of the project.

The objective, for one unlabelled image:

1. Two random ``crop_size`` crops (same content statistics, different pixels).
2. One distortion type drawn for the image (types that need colour are skipped on grey photos)
   and ``levels`` = K increasing levels, evenly spaced in ``level_range`` and jittered by up to
   ``level_jitter`` of half the spacing (so the order never changes). Each crop is degraded at
   every level with the same random draws (noise pattern, blur angle), so a higher level is a
   stronger version of the same degradation.
3. Every degraded crop goes through the encoder: backbone -> global average pool of the last
   stage -> MLP projection -> L2-normalised quality embedding ``e``; its quality score is
   ``s = (cos(e, a_good) - cos(e, a_bad)) / 2`` in [-1, 1] with learnable anchors ``a_good``,
   ``a_bad`` (the image-only stand-ins for the two prompts). A bounded score is what makes the
   ranking margin mean something: an unbounded score could meet any margin by scaling up.
4. Loss = ``ranking_weight * L_rank + agreement_weight * L_agree``:

   * ``L_rank``: margin ranking over all ordered level pairs i < j within each crop,
     ``mean(relu(margin - (s_i - s_j)))`` (the less degraded crop must score higher);
   * ``L_agree``: ``mean(1 - cos(e_crop1_k, e_crop2_k))`` over the levels, so the embedding
     depends on the degradation, not on which part of the photo is seen (content-independent
     quality).

Only the backbone is kept: :func:`save_encoder` writes its ``state_dict`` in the
``iqa-ray-encoder`` format and :func:`load_encoder_into` loads it into a quality model's backbone
for fine-tuning (``TrainConfig`` key ``pretrained_encoder``, with a smaller ``backbone_lr``).

Why a second loop next to :mod:`iqa_ray.engine`: the engine's loop is the supervised one (labels,
validation SRCC, model selection); this one has no labels and a different sample (an image turned
into 2 x K crops), so it is not a copy of the engine's loop. It reuses the engine's seeding and
checkpoint helpers, and like the engine it re-seeds from ``(seed, epoch)`` at every epoch, so a run
resumed from epoch k's checkpoint equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from iqa_ray.config import ConfigError, finite, require
from iqa_ray.data import distortions as dist
from iqa_ray.data.errors import DatasetError
from iqa_ray.models.encoder_file import (  # the encoder file format, here for ssl users as before
    ENCODER_FILE,
    ENCODER_FORMAT,
    EncoderError,
    load_encoder_into,
    read_encoder,
    save_encoder,
)
from iqa_ray.models.backbones import SUPPORTED_BACKBONES, Backbone, create_backbone
from iqa_ray.utils.io import CheckpointError, git_revision, load_weights_file, save_checkpoint
from iqa_ray.utils.runtime import default_device, epoch_seed, seed_everything

__all__ = [
    "ENCODER_FILE",
    "ENCODER_FORMAT",
    "CHECKPOINT_FILE",
    "EncoderError",
    "PretrainConfig",
    "UnlabelledImages",
    "PretrainEpoch",
    "PretrainResult",
    "QualityEncoder",
    "level_grid",
    "load_encoder_into",
    "load_pretrain_checkpoint",
    "load_unlabelled",
    "make_sample",
    "pretrain",
    "ranking_accuracy",
    "read_encoder",
    "save_encoder",
    "ssl_loss",
]

PRETRAIN_FORMAT = "iqa-ray-pretrain"
FORMAT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"
# Seed stream of the held-out evaluation samples (fixed for a run; training streams use the epoch).
_EVAL_STREAM = 1_000_000


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines one pre-training run (frozen, validated when built).

    Attributes:
        backbone: a timm backbone (see ``iqa_ray.models.SUPPORTED_BACKBONES``).
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
        unknown = [d for d in self.distortions if d not in dist.DISTORTIONS]
        require(not unknown, f"unknown distortions {unknown}; valid: {', '.join(dist.DISTORTIONS)}")
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
        merged = {**(values or {}), **overrides}
        valid = [f.name for f in fields(cls)]
        unknown = sorted(k for k in merged if k not in valid)
        if unknown:
            raise ConfigError(f"unknown pre-training config keys {unknown}; valid keys: {valid}")
        for key in ("level_range", "distortions"):
            if isinstance(merged.get(key), list):
                merged[key] = tuple(merged[key])
        try:
            return cls(**merged)
        except TypeError as exc:  # a wrongly typed value that a comparison choked on
            raise ConfigError(str(exc)) from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable), written next to every result."""
        return dataclasses.asdict(self)

    def distortion_names(self) -> tuple[str, ...]:
        return self.distortions or tuple(dist.DISTORTIONS)

    @property
    def steps_per_epoch(self) -> int:
        return self.images_per_epoch // self.batch_size


# ----------------------------------------------------------------------------- data


@dataclass
class UnlabelledImages:
    """Decoded unlabelled images kept in memory (RGB ``uint8``), with a name for each."""

    images: list[np.ndarray]
    names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.images)


def _downscale(image: np.ndarray, max_short_side: int | None) -> np.ndarray:
    """Downscale (never upscale) so the short side is at most ``max_short_side``, as the pre-generator does."""
    if max_short_side is None or min(image.shape[:2]) <= max_short_side:
        return np.ascontiguousarray(image)
    from iqa_ray.data.pregenerate import scaled_size

    w, h = scaled_size(image.shape[1], image.shape[0], max_short_side)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.LANCZOS))


def load_unlabelled(
    source: str,
    *,
    splits: Sequence[str] | None = None,
    max_short_side: int | None = 512,
    pristine_only: bool = False,
    split_seed: int = 0,
) -> UnlabelledImages:
    """Decode the images of ``source`` once, without labels.

    Args:
        source: ``embedded`` (the photos shipped in scikit-image / scikit-learn), a folder of
            image files, or any ``--dataset`` form whose labels are ignored: a pre-generated
            folder (with ``manifest.json``) or ``<adapter>:<root>`` (``koniq10k:/data/koniq``).
        splits: keep only photos of these splits (e.g. ``("train",)``, so nothing the test split
            holds is seen, not even without labels). For ``embedded`` the split is the default
            embedded dataset's, by photo. ``None`` keeps every image.
        max_short_side: downscale so the short side is at most this (the pre-generator's 512);
            ``None`` keeps sizes.
        pristine_only: for pre-generated tables, keep only the undistorted crops
            (``distortion == "none"``), so pre-training degrades clean images.
        split_seed: seed of seeded splits of real datasets (``<adapter>:<root>`` without an
            official split). Pass the ``split_seed`` of the runs the encoder is for: another seed
            draws another ``train`` split, holding photos those runs validate and test on.
            Embedded and pre-generated data have their split fixed at generation and ignore it.

    Returns:
        The images and their names.

    Raises:
        DatasetError: nothing usable, an unknown split, or a filter that does not apply.
    """
    from iqa_ray.data.catalog import EMBEDDED, load_table
    from iqa_ray.data.sources import embedded_references, folder_references, load_reference

    wanted = tuple(splits) if splits is not None else None
    if wanted is not None:
        bad = [s for s in wanted if s not in ("train", "val", "test")]
        if bad or not wanted:
            raise DatasetError(f"splits must be a non-empty subset of train, val, test; got {list(wanted)}")
    path = Path(source).expanduser()
    if source == EMBEDDED:
        refs = embedded_references()
        if wanted is not None:
            table = load_table(EMBEDDED)
            split_of = dict(zip(table["group"], table["split"]))
            refs = [r for r in refs if split_of.get(r.group) in wanted]
        images = [_downscale(load_reference(r), max_short_side) for r in refs]
        names = [r.key for r in refs]
    elif path.is_dir() and not (path / "manifest.json").exists():
        if wanted is not None:
            raise DatasetError(f"{path} is a plain folder of images: it has no splits to filter by {list(wanted)}")
        refs, failed = folder_references(path)
        if failed:
            raise DatasetError(f"unreadable images in {path}: {failed[:3]}")
        images = [_downscale(load_reference(r), max_short_side) for r in refs]
        names = [r.key for r in refs]
    else:
        from iqa_ray.data.dataset import decode_table

        table = load_table(source, split_seed=split_seed)
        if wanted is not None:
            table = table[table["split"].isin(wanted)]
        if pristine_only:
            if "distortion" not in table or not (table["distortion"] == "none").any():
                raise DatasetError(f"pristine_only needs a pre-generated table with undistorted rows "
                                   f"(distortion == 'none'); {source} has none")
            table = table[table["distortion"] == "none"]
        if len(table) == 0:
            raise DatasetError(f"no images left in {source} after the split/pristine filters")
        decoded = decode_table(table.reset_index(drop=True))
        images = [_downscale(np.asarray(im), max_short_side) for im in decoded.images]
        names = decoded.table["image_id"].astype(str).tolist()
    if not images:
        raise DatasetError(f"no images in {source}" + (f" for splits {list(wanted)}" if wanted else ""))
    return UnlabelledImages(images=images, names=names, source=source)


def level_grid(n: int, level_range: tuple[float, float], jitter: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` increasing levels evenly spread over ``level_range``, each jittered inside its own slot."""
    low, high = level_range
    base = np.linspace(low, high, n)
    half_gap = (high - low) / (n - 1) / 2
    shifted = base + rng.uniform(-1.0, 1.0, size=n) * jitter * half_gap
    # Jitter < 1 keeps every level inside its half-gap, so the order never changes.
    return np.clip(shifted, 0.0, 1.0)


def make_sample(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    crop_size: int,
    levels: int,
    level_range: tuple[float, float],
    level_jitter: float,
    distortions: Sequence[str],
) -> tuple[np.ndarray, str, np.ndarray]:
    """One training sample: two crops of ``image``, each degraded at ``levels`` increasing levels.

    Args:
        image: RGB uint8 (H, W, 3), both sides >= ``crop_size``.
        rng: the only source of randomness (crop positions, type, levels, distortion draws).
        crop_size: crop side in pixels.
        levels: K, the number of levels.
        level_range: (low, high) levels.
        level_jitter: jitter of each level as a fraction of half the spacing.
        distortions: types to draw from (colour-only types are skipped on grey images).

    Returns:
        ``crops`` uint8 (2, K, crop, crop, 3) ordered from least to most degraded, the type, and
        the K levels.
    """
    h, w = image.shape[:2]
    if min(h, w) < crop_size:
        raise DatasetError(f"image {w}x{h} is smaller than crop_size {crop_size}")
    allowed = list(distortions)
    if dist.is_grey(image):
        allowed = [d for d in allowed if not dist.DISTORTIONS[d].needs_color]
    if not allowed:
        raise DatasetError(f"no distortion type applies to a grey image among {list(distortions)} (all need colour)")
    kind = allowed[int(rng.integers(len(allowed)))]
    grid = level_grid(levels, level_range, level_jitter, rng)
    crops = np.empty((2, levels, crop_size, crop_size, 3), dtype=np.uint8)
    distortion_seed = int(rng.integers(2**62))
    for c in range(2):
        top, left = int(rng.integers(h - crop_size + 1)), int(rng.integers(w - crop_size + 1))
        crop = np.ascontiguousarray(image[top : top + crop_size, left : left + crop_size])
        for k, level in enumerate(grid):
            # The same generator state at every level: same noise pattern / blur angle, stronger.
            crops[c, k] = dist.apply_distortion(kind, crop, float(level), np.random.default_rng([distortion_seed, c]))
    return crops, kind, grid


def _batch_tensor(crops: Sequence[np.ndarray]) -> Tensor:
    """Samples (2, K, S, S, 3) uint8 -> float (B, 2, K, 3, S, S) in [0, 1]."""
    array = torch.from_numpy(np.stack(crops))
    return array.permute(0, 1, 2, 5, 3, 4).float().div_(255.0)


# ----------------------------------------------------------------------------- model and loss


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


def _encode(encoder: QualityEncoder, batch: Tensor) -> tuple[Tensor, Tensor]:
    """(B, 2, K, 3, S, S) -> scores (B, 2, K) and embeddings (B, 2, K, D), in one backbone pass."""
    b, c, k = batch.shape[:3]
    out = encoder(batch.flatten(0, 2))
    return out["score"].view(b, c, k), out["embedding"].view(b, c, k, -1)


# ----------------------------------------------------------------------------- the loop


@dataclass
class PretrainEpoch:
    """One finished epoch; ``save(dir)`` writes ``checkpoint.pt`` (resumable) and ``encoder.pt``."""

    epoch: int
    metrics: dict[str, float]
    save: Callable[[str | os.PathLike[str]], Path]


@dataclass
class PretrainResult:
    config: PretrainConfig
    history: list[dict[str, float]]
    initial: dict[str, float]  # held-out metrics before the first step
    encoder: QualityEncoder = field(repr=False)

    def save_encoder(self, path: str | os.PathLike[str]) -> Path:
        return save_encoder(self.encoder.backbone, path, config=self.config, epoch=len(self.history) - 1)


def _lr_factor(step: int, total: int, floor: float = 0.01) -> float:
    """Cosine decay from 1 to ``floor`` over the run, computed from the step (nothing to save)."""
    progress = min(1.0, step / max(total, 1))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _check_images(images: Sequence[np.ndarray], config: PretrainConfig) -> None:
    if len(images) <= config.holdout_images:
        raise DatasetError(f"pre-training needs more than holdout_images={config.holdout_images} images "
                           f"(they are held out to measure ranking accuracy), got {len(images)}")
    for i, image in enumerate(images):
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            raise DatasetError(f"image {i} must be an RGB uint8 (H, W, 3) array, got "
                               f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
        if min(image.shape[:2]) < config.crop_size:
            raise DatasetError(f"image {i} is {image.shape[1]}x{image.shape[0]}, smaller than crop_size "
                               f"{config.crop_size}; use a smaller crop_size")
    if all(dist.is_grey(im) for im in images) and all(dist.DISTORTIONS[d].needs_color for d in config.distortion_names()):
        raise DatasetError(f"every image is grey and every distortion in {list(config.distortion_names())} needs colour")


def _sample(config: PretrainConfig, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    crops, _kind, _levels = make_sample(image, rng, crop_size=config.crop_size, levels=config.levels,
                                        level_range=config.level_range, level_jitter=config.level_jitter,
                                        distortions=config.distortion_names())
    return crops


def _split_holdout(n: int, config: PretrainConfig) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng([config.seed, 3]).permutation(n)
    return np.sort(order[config.holdout_images :]), np.sort(order[: config.holdout_images])


@torch.no_grad()
def _evaluate(encoder: QualityEncoder, batches: list[Tensor], config: PretrainConfig, device: torch.device) -> dict[str, float]:
    was_training = encoder.training
    encoder.eval()
    try:
        scores, embeddings = zip(*(_encode(encoder, b.to(device)) for b in batches))
        s, e = torch.cat(scores), torch.cat(embeddings)
        parts = ssl_loss(s, e, margin=config.margin, ranking_weight=config.ranking_weight,
                         agreement_weight=config.agreement_weight)
    finally:
        encoder.train(was_training)
    return {"val_ranking_accuracy": ranking_accuracy(s), "val_loss": float(parts["loss"]),
            "val_ranking": float(parts["ranking"]), "val_agreement": float(parts["agreement"]),
            # mean score gap between the least and the most degraded level: does the score spread?
            "val_score_span": float((s[..., 0] - s[..., -1]).mean())}


def load_pretrain_checkpoint(resume: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    """A full pre-training checkpoint (file or folder holding ``checkpoint.pt``), ``weights_only=True``.

    Raises:
        CheckpointError: missing, unreadable, or not a pre-training checkpoint.
    """
    if isinstance(resume, dict):
        return resume
    path, state = load_weights_file(resume, default_file=CHECKPOINT_FILE, what="pre-training checkpoint",
                                    error=CheckpointError)
    if not isinstance(state, dict) or state.get("format") != PRETRAIN_FORMAT:
        raise CheckpointError(f"{path} is not an {PRETRAIN_FORMAT} checkpoint")
    return state


def pretrain(
    config: PretrainConfig,
    images: Sequence[np.ndarray] | UnlabelledImages,
    *,
    device: torch.device | str | None = None,
    resume: str | os.PathLike[str] | dict[str, Any] | None = None,
    on_epoch_end: Callable[[PretrainEpoch], None] | None = None,
    max_epochs: int | None = None,
) -> PretrainResult:
    """Pre-train ``config.backbone`` on unlabelled ``images`` with the quality-aware objective.

    Args:
        config: the resolved pre-training config.
        images: RGB uint8 (H, W, 3) arrays, each at least ``crop_size`` on its short side;
            ``holdout_images`` of them (seeded) are held out to measure ranking accuracy.
        device: where to train (default: CUDA if available).
        resume: a full checkpoint (file, folder holding ``checkpoint.pt`` or loaded dict) of
            the same config to continue from.
        on_epoch_end: called after every epoch with its metrics and a ``save`` function.
        max_epochs: stop after this epoch count (to simulate an interruption in tests).

    Returns:
        The per-epoch history, the held-out metrics before training, and the encoder.

    Raises:
        DatasetError: too few images, or images smaller than the crop.
        CheckpointError: ``resume`` is not a pre-training checkpoint of this config.
        FloatingPointError: the loss became NaN or infinite (names the epoch and step).
    """
    images = list(images.images if isinstance(images, UnlabelledImages) else images)
    _check_images(images, config)
    device = torch.device(device) if device is not None else default_device()
    seed_everything(config.seed)
    backbone = create_backbone(config.backbone, pretrained=config.pretrained, img_size=config.crop_size)
    encoder = QualityEncoder(backbone, embedding_dim=config.embedding_dim, hidden_dim=config.hidden_dim).to(device)
    optimizer = torch.optim.AdamW(encoder.param_groups(config.lr, config.lr * config.head_lr_mult),
                                  weight_decay=config.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    train_idx, holdout_idx = _split_holdout(len(images), config)
    eval_batches = [
        _batch_tensor([_sample(config, images[holdout_idx[j % len(holdout_idx)]],
                               np.random.default_rng([config.seed, _EVAL_STREAM, j]))
                       for j in range(start, min(start + config.batch_size, config.eval_samples))])
        for start in range(0, config.eval_samples, config.batch_size)
    ]
    steps = config.steps_per_epoch
    total_steps = steps * config.epochs

    history: list[dict[str, float]] = []
    start_epoch = 0
    if resume is not None:
        state = load_pretrain_checkpoint(resume)
        if json.loads(state["config"]) != json.loads(json.dumps(config.to_dict())):
            raise CheckpointError("the pre-training checkpoint was written by a different config; resume needs the same")
        encoder.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = json.loads(state["history"])
        initial = json.loads(state["initial"])
        start_epoch = int(state["epoch"]) + 1
    else:
        initial = _evaluate(encoder, eval_batches, config, device)
    revision = git_revision()

    end_epoch = min(config.epochs, max_epochs) if max_epochs is not None else config.epochs
    encoder.train()
    for epoch in range(start_epoch, end_epoch):
        seed_everything(epoch_seed(config.seed, epoch))
        order_rng = np.random.default_rng([config.seed, epoch, 1])
        order = np.concatenate([order_rng.permutation(train_idx)
                                for _ in range(math.ceil(config.images_per_epoch / len(train_idx)))])
        sums: dict[str, float] = {}
        sample_seconds, started = 0.0, time.perf_counter()
        for step in range(steps):
            global_step = epoch * steps + step
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * _lr_factor(global_step, total_steps)
            t0 = time.perf_counter()
            # Each sample's randomness depends only on (seed, epoch, position): batching-independent.
            positions = range(step * config.batch_size, (step + 1) * config.batch_size)
            batch = _batch_tensor([_sample(config, images[order[p]], np.random.default_rng([config.seed, epoch, 2, p]))
                                   for p in positions]).to(device)
            sample_seconds += time.perf_counter() - t0
            scores, embeddings = _encode(encoder, batch)
            parts = ssl_loss(scores, embeddings, margin=config.margin, ranking_weight=config.ranking_weight,
                             agreement_weight=config.agreement_weight)
            if not torch.isfinite(parts["loss"]):
                raise FloatingPointError(f"pre-training loss became {parts['loss'].item()} at epoch {epoch} (0-based), "
                                         f"step {step}; lower lr (now {config.lr}) or keep grad_clip on")
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(encoder.parameters(), config.grad_clip)
            optimizer.step()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
        seconds = time.perf_counter() - started
        n_images = steps * config.batch_size
        metrics = {
            "epoch": epoch + 1,  # epochs completed, as Tune's training_iteration counts
            **{f"train_{k}": v / steps for k, v in sums.items()},
            **_evaluate(encoder, eval_batches, config, device),
            "lr_backbone": optimizer.param_groups[0]["lr"],
            "images_per_s": n_images / seconds,
            "crops_per_s": n_images * 2 * config.levels / seconds,
            "sampling_share": sample_seconds / seconds,
            "epoch_seconds": time.perf_counter() - started,
        }
        history.append(metrics)

        def save(directory: str | os.PathLike[str], _epoch: int = epoch) -> Path:
            directory = Path(directory)
            save_checkpoint(directory / CHECKPOINT_FILE, {
                "format": PRETRAIN_FORMAT, "version": FORMAT_VERSION, "epoch": _epoch,
                "config": json.dumps(config.to_dict()), "git_revision": revision,
                "model": encoder.state_dict(), "optimizer": optimizer.state_dict(),
                "history": json.dumps(history), "initial": json.dumps(initial),
            })
            save_encoder(encoder.backbone, directory / ENCODER_FILE, config=config, epoch=_epoch)
            return directory / CHECKPOINT_FILE

        if on_epoch_end is not None:
            on_epoch_end(PretrainEpoch(epoch=epoch, metrics=metrics, save=save))
    encoder.eval()
    return PretrainResult(config=config, history=history, initial=initial, encoder=encoder)
