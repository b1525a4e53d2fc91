"""What the training loop feeds a model: batches of decoded images, or of cached pooled features.

:func:`open_feed` picks one for a run. Both kinds give :func:`iqa_ray.training.engine.fit` the
same handful of operations: the training batches of an epoch (each process's share of them when
the run is data-parallel), the module a training step calls, a forward pass, predictions on a
split, and the hook that starts a fresh run.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from iqa_ray.core.errors import DatasetError
from iqa_ray.core.runtime import seed_everything
from iqa_ray.data.decoded import DecodedImages
from iqa_ray.models.base import IQAModel
from iqa_ray.training.build import memory_format
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.device import autocast_for, to_float
from iqa_ray.training.features import compute_features
from iqa_ray.training.inference import predict
from iqa_ray.training.loaders import SplitLoaders, make_loaders, train_indices
from iqa_ray.training.parallel import DataParallel

__all__ = ["CachedFeed", "ImageFeed", "PooledForward", "open_feed", "pooled_scores"]


def open_feed(config: TrainConfig, decoded: DecodedImages, *, features: Any, device: torch.device,
              amp: torch.dtype | None, with_test: bool, cpus: int | None) -> ImageFeed | CachedFeed:
    """The feed of a run: cached features with ``feature_cache`` (computed here when ``features``
    is None), decoded images otherwise (see :func:`iqa_ray.training.engine.fit` for the arguments)."""
    if config.data.feature_cache:
        if features is None:
            features = compute_features(decoded, config, device)
            seed_everything(config.optim.seed)  # building the feature backbone drew from the generators; start afresh
        return CachedFeed(config, decoded, features, device, with_test=with_test)
    loaders = make_loaders(config, decoded, with_test=with_test, device=device, cpus=cpus)
    return ImageFeed(loaders, device, amp, config.data.eval_chunk, memory_format(config, device))


@torch.no_grad()
def pooled_scores(model: IQAModel, features: torch.Tensor) -> np.ndarray:
    """The model's scores of pooled features (its head, in eval mode; the mode is restored), float64."""
    was_training = model.training
    model.eval()
    try:
        scores = model.forward_pooled(features)["score"].float()
    finally:
        model.train(was_training)
    return scores.cpu().numpy().astype(np.float64)


class PooledForward(nn.Module):
    """``model.forward_pooled`` as a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model: IQAModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.forward_pooled(features)


class ImageFeed:
    """Batches of decoded images through the whole model (the usual run)."""

    def __init__(self, loaders: SplitLoaders, device: torch.device, amp: torch.dtype | None, chunk: int = 64,
                 memory_format: torch.memory_format | None = None) -> None:
        self.loaders, self.device, self.amp, self.chunk = loaders, device, amp, chunk
        self.memory_format = memory_format
        self.steps_per_epoch = max(1, len(loaders.train))
        self.train_mos: np.ndarray = loaders.train_mos  # the labels the model's score scale is set from
        self.data_parallel: DataParallel | None = None  # set by fit: keep this process's share of a batch

    def train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """(inputs, targets, size of the global batch they are this process's share of)."""
        for batch in self.loaders.train:
            images, mos = batch["image"], batch["mos"]
            n_global = len(mos)
            if self.data_parallel is not None:
                images, mos = self.data_parallel.shard(images), self.data_parallel.shard(mos)
            images = to_float(images, self.device)
            if self.memory_format is not None:
                images = images.contiguous(memory_format=self.memory_format)
            yield images, mos.to(self.device, non_blocking=True).float(), n_global

    def training_module(self, model: IQAModel) -> nn.Module:
        """The module a training step calls (what DistributedDataParallel wraps)."""
        return model

    def forward(self, module: nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast_for(self.device, self.amp):
            return module(inputs)

    def predict(self, model: IQAModel, split: str) -> tuple[np.ndarray, np.ndarray]:
        return predict(model, getattr(self.loaders, split), self.device, self.amp, self.chunk, self.memory_format)

    def has(self, split: str) -> bool:
        return getattr(self.loaders, split) is not None

    def on_train_start(self, model: IQAModel) -> None:
        model.on_train_start(self.feature_batches())

    def feature_batches(self) -> Iterator[torch.Tensor]:
        for batch in self.loaders.train_eval:
            yield to_float(batch["image"][:, 0], self.device)


class CachedFeed:
    """Batches of cached pooled features through the head only (``feature_cache``: a frozen backbone).

    Each epoch draws every training image ``patches_per_image`` times in a seeded random order, each
    draw the image or its mirror with equal odds (unless ``hflip`` is false: the cache then holds no
    mirror images): the samples an image loader with random flips would give, minus the backbone
    pass. Evaluation scores the whole, unflipped images.
    """

    def __init__(self, config: TrainConfig, decoded: DecodedImages, cache: Any, device: torch.device,
                 with_test: bool) -> None:
        d = config.data
        cache.check(config, len(decoded.table))
        # Copies (a few MB): the object store's arrays are read-only, and torch wants to own its tensors.
        self.plain = torch.from_numpy(np.array(cache.plain, dtype=np.float32)).to(device)
        self.flipped = (None if cache.flipped is None
                        else torch.from_numpy(np.array(cache.flipped, dtype=np.float32)).to(device))
        self.mos = torch.from_numpy(decoded.table["mos"].to_numpy(np.float32)).to(device)
        self.rows = {"train": torch.from_numpy(train_indices(decoded, d.label_fraction, config.optim.seed,
                                                                  with_val=config.optim.train_on_val)),
                     "val": torch.from_numpy(decoded.split_indices("val")),
                     "test": torch.from_numpy(decoded.split_indices("test")) if with_test else torch.zeros(0, dtype=torch.long)}
        if len(self.rows["val"]) == 0:
            raise DatasetError("split 'val' is empty: a run needs validation images to select its weights")
        self.train_mos: np.ndarray = decoded.table["mos"].to_numpy(np.float64)[self.rows["train"].numpy()]
        self.batch_size, self.repeats = d.batch_size, d.patches_per_image
        n = len(self.rows["train"]) * self.repeats
        self.steps_per_epoch = n // self.batch_size if n > self.batch_size else 1  # drop_last, as the image loader
        self.data_parallel: DataParallel | None = None  # set by fit: keep this process's share of a batch

    def train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """(inputs, targets, size of the global batch they are this process's share of)."""
        draws = self.rows["train"].repeat(self.repeats)
        order = draws[torch.randperm(len(draws))]
        for step in range(self.steps_per_epoch):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size].to(self.plain.device)
            n_global = len(idx)
            if self.flipped is None:
                if self.data_parallel is not None:
                    idx = self.data_parallel.shard(idx)
                yield self.plain[idx], self.mos[idx], n_global
                continue
            mirror = (torch.rand(len(idx)) < 0.5).to(self.plain.device)  # drawn for the global batch
            if self.data_parallel is not None:
                idx, mirror = self.data_parallel.shard(idx), self.data_parallel.shard(mirror)
            yield torch.where(mirror[:, None], self.flipped[idx], self.plain[idx]), self.mos[idx], n_global

    def training_module(self, model: IQAModel) -> nn.Module:
        """The module a training step calls (what DistributedDataParallel wraps): the head only."""
        return PooledForward(model)

    def forward(self, module: nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return module(inputs)

    def predict(self, model: IQAModel, split: str) -> tuple[np.ndarray, np.ndarray]:
        rows = self.rows[split].to(self.plain.device)
        return pooled_scores(model, self.plain[rows]), self.mos[rows].cpu().numpy().astype(np.float64)

    def has(self, split: str) -> bool:
        return len(self.rows[split]) > 0

    def on_train_start(self, model: IQAModel) -> None:
        model.on_train_start_pooled(self.plain[self.rows["train"].to(self.plain.device)])

    def feature_batches(self) -> Iterator[torch.Tensor]:
        return iter(())
