"""The pre-training loop: seeded per epoch (a resumed run equals an uninterrupted one), checkpoints,
held-out ranking accuracy, the encoder file."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from iqa_ray.core.errors import DatasetError
from iqa_ray.core.io import CheckpointError, git_revision, load_weights_file, save_checkpoint, written_with
from iqa_ray.core.runtime import default_device, epoch_seed, seed_everything
from iqa_ray.data import distortions as dist
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
        batch_tensor([_sample(config, images[holdout_idx[j % len(holdout_idx)]],
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
        if not written_with(state, config):
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
