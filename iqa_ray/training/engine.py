"""The one training engine: every model family is trained and evaluated by this loop.

The seed scripts had four copies of the loop and three optimiser bugs in them; this engine is
written against those bugs:

* parameter groups are lists built once (an exhausted ``filter()`` iterator froze HyperIQA's
  hypernetwork after the first epoch);
* the optimiser and scheduler are built once per run and saved in every checkpoint (one was
  re-created every epoch, losing Adam's moments);
* the scheduler scales *every* group, backbone included (the backbone LR never decayed).

Model selection uses the validation split only: the best epoch by validation SRCC is kept, and
the test split is evaluated once, for that model, at the end. Randomness is re-seeded from
``(seed, epoch)`` at the start of every epoch, so a run resumed from the checkpoint of epoch k
reproduces exactly the epochs an uninterrupted run would have trained.

The engine knows models, losses, metrics and datasets; it does not know Ray. Callers observe
epochs through ``on_epoch_end`` and decide where checkpoints go. A caller that started
``torch.distributed`` (one process per worker) passes :class:`DataParallel` and the same loop
trains data-parallel: each process computes its share of every global batch through
DistributedDataParallel.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from iqa_ray.core.errors import DatasetError
from iqa_ray.core.io import CheckpointError, git_revision, save_checkpoint, written_with
from iqa_ray.core.metrics import all_metrics
from iqa_ray.core.runtime import default_device, epoch_seed, seed_everything
from iqa_ray.data.dataset import DecodedImages
from iqa_ray.models.base import IQAModel
from iqa_ray.models.mlp import SPREAD_POOLINGS
from iqa_ray.training.build import build, memory_format
from iqa_ray.training.checkpoints import (
    CHECKPOINT_FILE,
    CHECKPOINT_VERSION,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.device import AMP_DTYPES, amp_mode, autocast_for, configure_device, to_float
from iqa_ray.training.inference import predict
from iqa_ray.training.loaders import (
    SplitLoaders,
    load_decoded,
    make_loaders,
    train_indices,
)
from iqa_ray.training.parallel import DataParallel, check_data_parallel, sum_over_processes
from iqa_ray.training.schedule import Schedule, build_optimizer

# The engine's public names, wherever they are defined: callers import them from here.
__all__ = ["EpochResult", "FitResult", "NonFiniteLossError", "fit"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the epoch and step."""


class _FiniteWatch:
    """Remembers, on the device, the first step whose loss was NaN or infinite.

    ``step`` queues two tiny device ops and never waits; ``check`` reads the result (one wait)
    and raises :class:`NonFiniteLossError` naming the epoch, the step and the loss's value.
    """

    def __init__(self, device: torch.device) -> None:
        self.step_index = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_value = torch.zeros((), dtype=torch.float32, device=device)

    def step(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        newly = (self.first_bad < 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(newly, self.step_index, self.first_bad)
        self.bad_value = torch.where(newly, loss, self.bad_value)
        self.step_index += 1

    def check(self, epoch: int, config: TrainConfig, data_parallel: DataParallel | None = None) -> None:
        step = int(self.first_bad)
        if data_parallel is not None:
            # Every process raises together (one alone would leave the others waiting in the next
            # gradient all-reduce): the first bad step of any process, in one small all-reduce.
            import torch.distributed as dist

            first = torch.where(self.first_bad >= 0, self.first_bad, torch.full_like(self.first_bad, 2**62))
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
            step = int(first) if int(first) < 2**62 else -1
        if step >= 0:
            o = config.optim
            value = float(self.bad_value) if int(self.first_bad) == step else "non-finite on another data-parallel worker"
            raise NonFiniteLossError(
                f"training loss became {value} at epoch {epoch} (0-based), step {step}; "
                f"lr={o.lr}, backbone_lr={o.resolved_backbone_lr}. Lower the learning rate or enable grad_clip.")


@dataclass
class EpochResult:
    """What one epoch produced; ``save(dir)`` writes a full, resumable checkpoint of this moment."""

    epoch: int
    metrics: dict[str, float]
    is_best: bool
    save: Callable[[str | os.PathLike[str]], Path]
    # whether this epoch should be checkpointed: every ``checkpoint_every`` epochs and at the end
    checkpoint_due: bool = True


@dataclass
class FitResult:
    config: TrainConfig
    history: list[dict[str, float]]
    best_epoch: int
    best_val: dict[str, float]
    test: dict[str, float] | None
    stopped_early: bool
    model: IQAModel = field(repr=False)
    test_predictions: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)


class _PooledForward(nn.Module):
    """``model.forward_pooled`` as a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model: IQAModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.forward_pooled(features)


class _ImageFeed:
    """Batches of decoded images through the whole model (the usual run)."""

    def __init__(self, loaders: SplitLoaders, device: torch.device, amp: torch.dtype | None, chunk: int = 64,
                 memory_format: torch.memory_format | None = None) -> None:
        self.loaders, self.device, self.amp, self.chunk = loaders, device, amp, chunk
        self.memory_format = memory_format
        self.steps_per_epoch = max(1, len(loaders.train))
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


class _CachedFeed:
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
        return _PooledForward(model)

    def forward(self, module: nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return module(inputs)

    @torch.no_grad()
    def predict(self, model: IQAModel, split: str) -> tuple[np.ndarray, np.ndarray]:
        rows = self.rows[split].to(self.plain.device)
        was_training = model.training
        model.eval()
        try:
            scores = model.forward_pooled(self.plain[rows])["score"].float()
        finally:
            model.train(was_training)
        return scores.cpu().numpy().astype(np.float64), self.mos[rows].cpu().numpy().astype(np.float64)

    def has(self, split: str) -> bool:
        return len(self.rows[split]) > 0

    def on_train_start(self, model: IQAModel) -> None:
        if getattr(model, "pooling", None) in SPREAD_POOLINGS:
            model.fit_feature_stats(self.plain[self.rows["train"].to(self.plain.device)])

    def feature_batches(self) -> Iterator[torch.Tensor]:
        return iter(())


def fit(
    config: TrainConfig,
    decoded: DecodedImages | None = None,
    *,
    device: torch.device | str | None = None,
    resume: str | os.PathLike[str] | dict[str, Any] | None = None,
    on_epoch_end: Callable[[EpochResult], None] | None = None,
    max_epochs: int | None = None,
    score_test: bool = True,
    features: Any = None,
    cpus: int | None = None,
    data_parallel: DataParallel | None = None,
) -> FitResult:
    """Train ``config`` and evaluate the best-by-validation model on the test split.

    Args:
        config: the resolved run config.
        decoded: the decoded dataset (shared between runs); loaded from ``config.data`` if None.
        device: where to train (default: CUDA if available).
        resume: a checkpoint (path, folder or loaded dict) to continue from.
        on_epoch_end: called after every epoch with its metrics and a ``save`` function.
        max_epochs: stop after this epoch count even if ``config.optim.epochs`` is larger (for
            tests that simulate an interruption).
        score_test: score the selected weights on the test split when the run ends. Search trials
            pass False: they report validation only, and the search scores the one trial it
            selects, once (a test figure per trial invites choosing on test).
        features: with ``feature_cache``, the :class:`~iqa_ray.training.features.FeatureCache` of
            ``decoded`` (shared between runs); computed here if None.
        cpus: the run's CPU share, which sizes its DataLoader workers on a GPU
            (:func:`resolve_num_workers`); default torch's thread count.
        data_parallel: this process's rank and the world size when the caller runs one process
            per worker with ``torch.distributed`` initialised (:class:`DataParallel`): each trains
            on its share of every global batch, gradients and reported train metrics are summed
            over the processes, and every process evaluates the same validation split (the
            weights are identical). Only the caller decides which process saves checkpoints.

    Returns:
        History, best epoch and validation metrics, and test metrics of the best model (``None``
        without a test split or with ``score_test=False``).

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (names the epoch and step).
    """
    device = torch.device(device) if device is not None else default_device()
    o = config.optim
    configure_device(config, device)
    seed_everything(o.seed)
    decoded = decoded if decoded is not None else load_decoded(config)
    mode = amp_mode(o.amp, device)
    amp = AMP_DTYPES[mode]
    # float16's range is narrow: the loss is scaled up for backward and the step skipped when
    # a gradient overflowed (bfloat16 has float32's range and needs no scaler).
    scaler = torch.amp.GradScaler(device.type, enabled=mode == "fp16")
    if config.data.feature_cache:
        from iqa_ray.training.features import compute_features

        if features is None:
            features = compute_features(decoded, config, device)
            seed_everything(o.seed)  # building the feature backbone drew from the generators; start afresh
        feed: _ImageFeed | _CachedFeed = _CachedFeed(config, decoded, features, device, with_test=score_test)
        train_mos = decoded.table["mos"].to_numpy(np.float64)[feed.rows["train"].numpy()]
    else:
        loaders = make_loaders(config, decoded, with_test=score_test, device=device, cpus=cpus)
        feed = _ImageFeed(loaders, device, amp, config.data.eval_chunk, memory_format(config, device))
        train_mos = loaders.train_mos
    if data_parallel is not None:
        check_data_parallel(data_parallel, config, len(train_mos))
        feed.data_parallel = data_parallel
    model = build(config, device)
    model.set_label_stats(float(train_mos.mean()), float(max(train_mos.std(), 1e-3)))
    optimizer = build_optimizer(config, model)
    trained = [p for group in optimizer.param_groups for p in group["params"]]  # what grad_clip measures
    schedule = Schedule(config, optimizer, feed.steps_per_epoch)

    history: list[dict[str, float]] = []
    start_epoch, best_epoch, best_val, best_state = 0, -1, {"srcc": -math.inf}, None
    bad_epochs = 0
    if resume is not None:
        state = resume if isinstance(resume, dict) else load_checkpoint(resume)
        if not written_with(state, config):
            raise CheckpointError("the checkpoint was written by a different config; resume needs the same config")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        set_rng_state(state["rng"])
        start_epoch = int(state["epoch"]) + 1
        history = json.loads(state["history"])
        best_epoch = int(state["best_epoch"])
        best_val = json.loads(state["best_val"])
        best_state = state["best_model"]
        if best_state is None and best_epoch >= 0:  # the kept weights were this checkpoint's own
            best_state = {k: v.detach().clone().cpu() for k, v in state["model"].items()}
        bad_epochs = int(state["bad_epochs"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])

    model.train()
    if start_epoch == 0:
        feed.on_train_start(model)
    module = feed.training_module(model)
    if data_parallel is not None:
        # Built after the weights are final (resumed, statistics fitted): it broadcasts rank 0's.
        module = DistributedDataParallel(module, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)

    end_epoch = min(o.epochs, max_epochs) if max_epochs is not None else o.epochs
    stopped_early = False
    test: dict[str, float] | None = None
    test_predictions: tuple[np.ndarray, np.ndarray] | None = None
    for epoch in range(start_epoch, end_epoch):
        seed_everything(epoch_seed(o.seed, epoch))
        model.on_epoch_start(epoch, feed.feature_batches())
        model.train()
        # Nothing in the step waits for the device: loss parts are summed on it, and whether the
        # loss stayed finite is read every ``finite_check_every`` steps and at the end of the epoch.
        sums: dict[str, torch.Tensor] = {}
        n_images, n_steps = 0, 0
        watch = _FiniteWatch(device)
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
        started = time.perf_counter()
        for inputs, target, n_global in feed.train_batches():
            outputs = feed.forward(module, inputs)
            outputs = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in outputs.items()}
            losses = model.compute_loss(outputs, target)
            loss = losses["loss"]
            watch.step(loss)
            optimizer.zero_grad(set_to_none=True)
            if data_parallel is not None:
                # DDP averages the shares' gradients; weighting each share's mean loss by its size
                # makes that average the gradient of the global batch's mean, shares equal or not.
                loss = loss * (target.shape[0] * data_parallel.world_size / n_global)
            scaler.scale(loss).backward()
            if o.grad_clip is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                nn.utils.clip_grad_norm_(trained, o.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            n_steps += 1
            n = target.shape[0]
            n_images += n
            for key, value in losses.items():
                part = value.detach().float() * n
                sums[key] = sums[key] + part if key in sums else part
            if n_steps % o.finite_check_every == 0:
                watch.check(epoch, config, data_parallel)
        watch.check(epoch, config, data_parallel)  # waits for the device: the epoch's time below is real
        if data_parallel is not None:
            sums, n_images = sum_over_processes(sums, n_images, device)
        train_seconds = time.perf_counter() - started
        val = all_metrics(*feed.predict(model, "val"))
        schedule.epoch_end(epoch, val["srcc"])
        # "best": the epoch with the best validation SRCC so far; "last": every finite epoch
        # replaces the kept weights, so the run hands back its final weights.
        is_best = bool(np.isfinite(val["srcc"]) and (o.select_epoch == "last" or val["srcc"] > best_val["srcc"]))
        if is_best:
            best_epoch, best_val = epoch, dict(val)
            best_state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
            bad_epochs = 0
        else:
            bad_epochs += 1
        stop_early = o.early_stopping_patience is not None and bad_epochs >= o.early_stopping_patience
        metrics = {
            "epoch": epoch + 1,  # epochs completed, as Tune's training_iteration counts
            **{f"train_{k}": float(v) / max(n_images, 1) for k, v in sums.items()},
            **{f"val_{k}": v for k, v in val.items()},
            **{f"lr_{k}": v for k, v in lrs.items()},
            "images_per_s": n_images / train_seconds if train_seconds > 0 else float("nan"),
            "epoch_seconds": time.perf_counter() - started,
            "best_val_srcc": best_val["srcc"],
            "best_epoch": best_epoch + 1,
            "stopped_early": stop_early,  # the engine's own patience ended the run here
        }
        if device.type == "cuda":  # what a fractional-GPU trial really needs
            metrics["gpu_peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        history.append(metrics)

        def save(directory: str | os.PathLike[str], _epoch: int = epoch, _kept_is_current: bool = is_best) -> Path:
            # What resume needs, each tensor once: the kept (best or last) weights are stored
            # apart from the current ones only when they differ (``best_model: None`` = the same).
            target = Path(directory) / CHECKPOINT_FILE
            save_checkpoint(target, {
                "format": "iqa-ray", "version": CHECKPOINT_VERSION, "epoch": _epoch,
                "config": json.dumps(config.to_dict()), "git_revision": git_revision(),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "rng": rng_state(), "history": json.dumps(history), "best_epoch": best_epoch,
                "best_val": json.dumps(best_val), "best_model": None if _kept_is_current else best_state,
                "bad_epochs": bad_epochs,
            })
            return target

        checkpoint_due = (epoch + 1) % o.checkpoint_every == 0 or epoch == o.epochs - 1 or stop_early

        if (epoch == o.epochs - 1 or stop_early) and feed.has("test") and best_state is not None:
            # The run ends here: score the selected (best-by-validation) weights on the test split
            # once, and report them with this last epoch, so a Tune trial's final result holds them.
            current = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(best_state)
            test_predictions = feed.predict(model, "test")
            model.load_state_dict(current)
            test = all_metrics(*test_predictions)
            metrics.update({f"test_{k}": v for k, v in test.items()})
        if on_epoch_end is not None:
            on_epoch_end(EpochResult(epoch=epoch, metrics=metrics, is_best=is_best, save=save,
                                     checkpoint_due=checkpoint_due))
        if stop_early:
            stopped_early = True
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    if test is None and feed.has("test") and best_state is not None:  # resumed after the end
        test_predictions = feed.predict(model, "test")
        test = all_metrics(*test_predictions)
    return FitResult(config=config, history=history, best_epoch=best_epoch + 1, best_val=best_val, test=test,
                     stopped_early=stopped_early, model=model, test_predictions=test_predictions)

