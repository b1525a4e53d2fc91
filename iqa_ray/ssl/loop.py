"""The pre-training loop: seeded per epoch (a resumed run equals an uninterrupted one), checkpoints,
held-out ranking accuracy, the encoder file."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from iqa_ray.core.errors import DatasetError
from iqa_ray.core.io import CheckpointError, git_revision, load_weights_file, save_checkpoint, written_with
from iqa_ray.core.runtime import default_device, epoch_seed, seed_everything
from iqa_ray.data.distortions.registry import DISTORTIONS, is_grey
from iqa_ray.models.backbones import create_backbone
from iqa_ray.models.encoder_file import ENCODER_FILE, save_encoder
from iqa_ray.ssl.config import PretrainConfig
from iqa_ray.ssl.data import UnlabelledImages, batch_tensor, make_sample
from iqa_ray.ssl.model import QualityEncoder, encode_samples, ranking_accuracy, ssl_loss

PRETRAIN_FORMAT = "iqa-ray-pretrain"
FORMAT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"
# Seed stream of the held-out evaluation samples (fixed for a run; training streams use the epoch).
_EVAL_STREAM = 1_000_000


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
    if all(is_grey(im) for im in images) and all(DISTORTIONS[d].needs_color for d in config.distortion_names()):
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
        scores, embeddings = zip(*(encode_samples(encoder, b.to(device)) for b in batches))
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


@dataclass
class PretrainState:
    """A pre-training run at the end of an epoch: everything its checkpoint holds, so saving and
    resuming are one serialisation (:meth:`save`, :meth:`restore`).

    Attributes:
        encoder, optimizer: the run's objects, built before any state is restored.
        epoch: the last finished epoch (0-based; -1 before the first).
        history: every finished epoch's metrics.
        initial: the held-out metrics before the first step.
    """

    encoder: QualityEncoder
    optimizer: torch.optim.Optimizer
    epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)
    initial: dict[str, float] = field(default_factory=dict)

    def save(self, directory: str | os.PathLike[str], config: PretrainConfig, revision: str) -> Path:
        """Write ``checkpoint.pt`` (resumable) and ``encoder.pt`` to ``directory``; the checkpoint's path."""
        directory = Path(directory)
        save_checkpoint(directory / CHECKPOINT_FILE, {
            "format": PRETRAIN_FORMAT, "version": FORMAT_VERSION, "epoch": self.epoch,
            "config": json.dumps(config.to_dict()), "git_revision": revision,
            "model": self.encoder.state_dict(), "optimizer": self.optimizer.state_dict(),
            "history": json.dumps(self.history), "initial": json.dumps(self.initial),
        })
        save_encoder(self.encoder.backbone, directory / ENCODER_FILE, config=config, epoch=self.epoch)
        return directory / CHECKPOINT_FILE

    def restore(self, checkpoint: dict[str, Any], config: PretrainConfig) -> None:
        """Continue from ``checkpoint`` (what :meth:`save` wrote).

        Raises:
            CheckpointError: the checkpoint was written by a different config.
        """
        if not written_with(checkpoint, config):
            raise CheckpointError("the pre-training checkpoint was written by a different config; resume needs the same")
        self.encoder.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.history = json.loads(checkpoint["history"])
        self.initial = json.loads(checkpoint["initial"])
        self.epoch = int(checkpoint["epoch"])


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
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # before a resumed optimiser's state replaces them
    state = PretrainState(encoder, optimizer)
    train_idx, holdout_idx = _split_holdout(len(images), config)
    eval_batches = _holdout_batches(images, holdout_idx, config)
    if resume is not None:
        state.restore(load_pretrain_checkpoint(resume), config)
    else:
        state.initial = _evaluate(encoder, eval_batches, config, device)
    revision = git_revision()

    end_epoch = min(config.epochs, max_epochs) if max_epochs is not None else config.epochs
    encoder.train()
    for epoch in range(state.epoch + 1, end_epoch):
        metrics = _pretrain_epoch(state, base_lrs, images, train_idx, eval_batches, config, epoch, device)
        state.history.append(metrics)
        state.epoch = epoch
        if on_epoch_end is not None:
            on_epoch_end(PretrainEpoch(epoch=epoch, metrics=metrics,
                                       save=partial(state.save, config=config, revision=revision)))
    encoder.eval()
    return PretrainResult(config=config, history=state.history, initial=state.initial, encoder=encoder)


def _holdout_batches(images: list[np.ndarray], holdout_idx: np.ndarray, config: PretrainConfig) -> list[Tensor]:
    """The held-out evaluation samples, fixed for a run (their own seed stream)."""
    return [
        batch_tensor([_sample(config, images[holdout_idx[j % len(holdout_idx)]],
                               np.random.default_rng([config.seed, _EVAL_STREAM, j]))
                       for j in range(start, min(start + config.batch_size, config.eval_samples))])
        for start in range(0, config.eval_samples, config.batch_size)
    ]


def _pretrain_epoch(state: PretrainState, base_lrs: list[float], images: list[np.ndarray], train_idx: np.ndarray,
                    eval_batches: list[Tensor], config: PretrainConfig, epoch: int,
                    device: torch.device) -> dict[str, float]:
    """Train one epoch, re-seeded from ``(seed, epoch)``, then measure the held-out samples; its metrics."""
    encoder, optimizer = state.encoder, state.optimizer
    seed_everything(epoch_seed(config.seed, epoch))
    order_rng = np.random.default_rng([config.seed, epoch, 1])
    order = np.concatenate([order_rng.permutation(train_idx)
                            for _ in range(math.ceil(config.images_per_epoch / len(train_idx)))])
    steps, total_steps = config.steps_per_epoch, config.steps_per_epoch * config.epochs
    sums: dict[str, float] = {}
    sample_seconds, started = 0.0, time.perf_counter()
    for step in range(steps):
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * _lr_factor(epoch * steps + step, total_steps)
        t0 = time.perf_counter()
        # Each sample's randomness depends only on (seed, epoch, position): batching-independent.
        positions = range(step * config.batch_size, (step + 1) * config.batch_size)
        batch = batch_tensor([_sample(config, images[order[p]], np.random.default_rng([config.seed, epoch, 2, p]))
                               for p in positions]).to(device)
        sample_seconds += time.perf_counter() - t0
        scores, embeddings = encode_samples(encoder, batch)
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
    return {
        "epoch": epoch + 1,  # epochs completed, as Tune's training_iteration counts
        **{f"train_{k}": v / steps for k, v in sums.items()},
        **_evaluate(encoder, eval_batches, config, device),
        "lr_backbone": optimizer.param_groups[0]["lr"],
        "images_per_s": n_images / seconds,
        "crops_per_s": n_images * 2 * config.levels / seconds,
        "sampling_share": sample_seconds / seconds,
        "epoch_seconds": time.perf_counter() - started,
    }
