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

It reads top to bottom: :func:`fit` (set-up, the epoch loop, the test scoring of the kept
weights), ``_run_epoch`` (train, validate, select), ``_train_steps`` (the step loop). What a
checkpoint holds is one object, :class:`~iqa_ray.training.checkpoints.TrainState`, saved and
restored by the same code; batches come from a feed (:mod:`iqa_ray.training.feeds`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from iqa_ray.core.metrics import all_metrics
from iqa_ray.core.runtime import default_device, epoch_seed, seed_everything
from iqa_ray.data.decoded import DecodedImages
from iqa_ray.models.base import IQAModel
from iqa_ray.training.build import build
from iqa_ray.training.checkpoints import TrainState, load_checkpoint
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.device import AMP_DTYPES, amp_mode, configure_device
from iqa_ray.training.feeds import CachedFeed, ImageFeed, open_feed
from iqa_ray.training.loaders import load_decoded
from iqa_ray.training.parallel import DataParallel, check_data_parallel, sum_over_processes
from iqa_ray.training.schedule import Schedule, build_optimizer

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
            (:func:`~iqa_ray.training.loaders.resolve_num_workers`); default torch's thread count.
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
    state, feed = _prepare(config, decoded, features, device, resume, score_test, cpus, data_parallel)
    model = state.model
    model.train()
    if state.epoch < 0:  # a fresh run, not a resumed one
        feed.on_train_start(model)
    module = _training_module(feed, model, data_parallel, device)

    end_epoch = min(o.epochs, max_epochs) if max_epochs is not None else o.epochs
    stopped_early, test, test_predictions = False, None, None
    for epoch in range(state.epoch + 1, end_epoch):
        metrics, is_best, stopped_early = _run_epoch(state, feed, module, config, epoch, device, data_parallel)
        last = epoch == o.epochs - 1 or stopped_early
        if last and feed.has("test") and state.best_model is not None:
            # The run ends here: the test metrics of the selected weights are reported with this
            # last epoch, so a Tune trial's final result holds them.
            test_predictions, test = _score_test(model, state.best_model, feed)
            metrics.update({f"test_{k}": v for k, v in test.items()})
        if on_epoch_end is not None:
            on_epoch_end(EpochResult(epoch=epoch, metrics=metrics, is_best=is_best,
                                     save=partial(state.save, config=config),
                                     checkpoint_due=(epoch + 1) % o.checkpoint_every == 0 or last))
        if stopped_early:
            break

    if state.best_model is not None:
        model.load_state_dict(state.best_model)
    if test is None and feed.has("test") and state.best_model is not None:  # resumed after the end
        test_predictions, test = _score_test(model, state.best_model, feed)
    return FitResult(config=config, history=state.history, best_epoch=state.best_epoch + 1, best_val=state.best_val,
                     test=test, stopped_early=stopped_early, model=model, test_predictions=test_predictions)


def _prepare(config: TrainConfig, decoded: DecodedImages, features: Any, device: torch.device,
             resume: str | os.PathLike[str] | dict[str, Any] | None, score_test: bool, cpus: int | None,
             data_parallel: DataParallel | None) -> tuple[TrainState, ImageFeed | CachedFeed]:
    """The run's state (the model with its label scale, optimiser, schedule and gradient scaler,
    restored from ``resume`` if given) and its feed."""
    mode = amp_mode(config.optim.amp, device)
    # float16's range is narrow: the loss is scaled up for backward and the step skipped when
    # a gradient overflowed (bfloat16 has float32's range and needs no scaler).
    scaler = torch.amp.GradScaler(device.type, enabled=mode == "fp16")
    feed = open_feed(config, decoded, features=features, device=device, amp=AMP_DTYPES[mode], with_test=score_test,
                     cpus=cpus)
    if data_parallel is not None:
        check_data_parallel(data_parallel, config, len(feed.train_mos))
        feed.data_parallel = data_parallel
    model = build(config, device)
    model.set_label_stats(float(feed.train_mos.mean()), float(max(feed.train_mos.std(), 1e-3)))
    optimizer = build_optimizer(config, model)
    state = TrainState(model, optimizer, Schedule(config, optimizer, feed.steps_per_epoch), scaler,
                       val_ids=decoded.table["image_id"].iloc[decoded.split_indices("val")].astype(str).tolist())
    if resume is not None:
        state.restore(resume if isinstance(resume, dict) else load_checkpoint(resume), config)
    return state, feed


def _training_module(feed: ImageFeed | CachedFeed, model: IQAModel, data_parallel: DataParallel | None,
                     device: torch.device) -> nn.Module:
    """The module a training step calls, wrapped in DistributedDataParallel when the run is data-parallel."""
    module = feed.training_module(model)
    if data_parallel is None:
        return module
    # Built after the weights are final (resumed, statistics fitted): it broadcasts rank 0's.
    return DistributedDataParallel(module, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)


def _run_epoch(state: TrainState, feed: ImageFeed | CachedFeed, module: nn.Module, config: TrainConfig, epoch: int,
               device: torch.device, data_parallel: DataParallel | None) -> tuple[dict[str, Any], bool, bool]:
    """Train and validate one epoch, re-seeded from ``(seed, epoch)``, and add its metrics to the history.

    Returns:
        The epoch's metrics, whether its weights are the ones kept, and whether the engine's own
        patience (``early_stopping_patience``) ends the run here.
    """
    o, model = config.optim, state.model
    seed_everything(epoch_seed(o.seed, epoch))
    model.on_epoch_start(epoch, feed.feature_batches())
    model.train()
    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(state.optimizer.param_groups)}
    started = time.perf_counter()
    sums, n_images = _train_steps(state, feed, module, config, epoch, device, data_parallel)
    train_seconds = time.perf_counter() - started
    val_scores, val_mos = feed.predict(model, "val")
    val = all_metrics(val_scores, val_mos)
    state.schedule.epoch_end(epoch, val["srcc"])
    is_best = state.end_epoch(epoch, val, o.select_epoch, (val_scores, val_mos))
    stop_early = o.early_stopping_patience is not None and state.bad_epochs >= o.early_stopping_patience
    metrics = {
        "epoch": epoch + 1,  # epochs completed, as Tune's training_iteration counts
        **{f"train_{k}": float(v) / max(n_images, 1) for k, v in sums.items()},
        **{f"val_{k}": v for k, v in val.items()},
        **{f"lr_{k}": v for k, v in lrs.items()},
        "images_per_s": n_images / train_seconds if train_seconds > 0 else float("nan"),
        "epoch_seconds": time.perf_counter() - started,
        "best_val_srcc": state.best_val["srcc"],
        "best_epoch": state.best_epoch + 1,
        "stopped_early": stop_early,  # the engine's own patience ended the run here
    }
    if device.type == "cuda":  # what a fractional-GPU trial really needs
        metrics["gpu_peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    state.history.append(metrics)
    return metrics, is_best, stop_early


def _train_steps(state: TrainState, feed: ImageFeed | CachedFeed, module: nn.Module, config: TrainConfig, epoch: int,
                 device: torch.device, data_parallel: DataParallel | None) -> tuple[dict[str, torch.Tensor], int]:
    """One epoch's optimiser steps: the loss parts summed over its images, and the image count
    (both summed over the processes of a data-parallel run).

    Nothing in the step waits for the device: loss parts are summed on it, and whether the loss
    stayed finite is read every ``finite_check_every`` steps and at the end of the epoch.
    """
    o, model, optimizer, scaler = config.optim, state.model, state.optimizer, state.scaler
    trained = [p for group in optimizer.param_groups for p in group["params"]]  # what grad_clip measures
    sums: dict[str, torch.Tensor] = {}
    n_images, n_steps = 0, 0
    watch = _FiniteWatch(device)
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
        state.schedule.step()
        n_steps += 1
        n = target.shape[0]
        n_images += n
        for key, value in losses.items():
            part = value.detach().float() * n
            sums[key] = sums[key] + part if key in sums else part
        if n_steps % o.finite_check_every == 0:
            watch.check(epoch, config, data_parallel)
    watch.check(epoch, config, data_parallel)  # waits for the device: the epoch's time is real
    if data_parallel is not None:
        sums, n_images = sum_over_processes(sums, n_images, device)
    return sums, n_images


def _score_test(model: IQAModel, kept: dict[str, torch.Tensor],
                feed: ImageFeed | CachedFeed) -> tuple[tuple[np.ndarray, np.ndarray], dict[str, float]]:
    """The test split scored once, with the kept (selected) weights: the predictions and their
    metrics. The model keeps its current weights (a checkpoint of this epoch may follow)."""
    current = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(kept)
    predictions = feed.predict(model, "test")
    model.load_state_dict(current)
    return predictions, all_metrics(*predictions)
