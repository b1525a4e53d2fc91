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
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from iqa_ray.config import ConfigError, TrainConfig
from iqa_ray.data.catalog import load_table
from iqa_ray.data.dataset import DecodedImages, IQADataset, decode_table
from iqa_ray.data.errors import DatasetError
from iqa_ray.metrics import all_metrics
from iqa_ray.models import IQAModel
from iqa_ray.models.mlp import SPREAD_POOLINGS
from iqa_ray.build import build, memory_format
from iqa_ray.utils.io import CheckpointError, git_revision, load_weights_file, save_checkpoint
from iqa_ray.utils.runtime import default_device, epoch_seed, seed_everything

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_VERSION = 1


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




# ----------------------------------------------------------------------------- data


def load_run_table(config: TrainConfig, spec: str | None = None, *, split_seed: int | None = None) -> Any:
    """The label table of the run's dataset (or of ``spec``), split as the run's data config says."""
    d = config.data
    return load_table(spec or d.dataset, label=d.label, split_seed=d.split_seed if split_seed is None else split_seed,
                      split_fractions=d.split_fractions)


def decode_for(config: TrainConfig, table: Any, progress: Callable[[int], Any] | None = None) -> DecodedImages:
    """Decode ``table`` with the run's resize rule (``image_size`` or ``short_side``);
    ``progress(1)`` after each image."""
    d = config.data
    kwargs = {"short_side": d.short_side} if d.short_side is not None else {}
    return decode_table(table, image_size=d.image_size, min_size=0 if d.whole_image else d.crop_size,
                        progress=progress, **kwargs)


def load_decoded(config: TrainConfig) -> DecodedImages:
    """Decode the run's dataset once (all splits), ready to be shared by many runs."""
    return decode_for(config, load_run_table(config))


def eval_dataset(config: TrainConfig, decoded: DecodedImages, rows: str | Any) -> IQADataset:
    """Deterministic evaluation view of some rows (a split name or indices) with the run's patch rule."""
    d = config.data
    return IQADataset(decoded, rows, train=False, crop_size=d.crop_size, eval_patches=d.eval_patches,
                      patch_placement=d.patch_placement, placement_seed=d.split_seed, whole_image=d.whole_image)


def eval_loader(config: TrainConfig, dataset: IQADataset, **kw: Any) -> DataLoader:
    """Batches of an evaluation view; whole images of mixed sizes go one by one."""
    return DataLoader(dataset, batch_size=config.data.eval_batch_size if dataset.same_size else 1, **kw)


def train_indices(decoded: DecodedImages, label_fraction: float, seed: int) -> np.ndarray:
    """Rows of the training split, restricted to a seeded fraction of its groups (photos)."""
    idx = decoded.split_indices("train")
    if label_fraction >= 1.0:
        return idx
    groups = decoded.table["group"].to_numpy()[idx] if "group" in decoded.table else idx.astype(str)
    unique = np.array(sorted(set(groups.tolist())))
    rng = np.random.default_rng([seed, 7])
    keep = set(rng.choice(unique, size=max(1, round(label_fraction * len(unique))), replace=False).tolist())
    return idx[np.array([g in keep for g in groups])]


@dataclass
class SplitLoaders:
    train: DataLoader
    val: DataLoader
    test: DataLoader | None
    train_eval: DataLoader  # deterministic crops of the training split (GMM fitting)
    train_mos: np.ndarray
    train_rows: np.ndarray


def resolve_num_workers(config: TrainConfig, device: torch.device, cpus: int | None = None) -> int:
    """DataLoader workers of a run: ``num_workers`` if set; else 0 on CPU, and on a GPU one fewer
    than the run's CPU share (``cpus``, default torch's thread count, which a trial sets to
    ``--cpus-per-trial``), at least 1 and at most 8, so crops are prepared while the GPU computes."""
    if config.data.num_workers is not None:
        return config.data.num_workers
    if device.type != "cuda":
        return 0
    cpus = cpus if cpus is not None else torch.get_num_threads()
    return int(min(8, max(1, cpus - 1)))


def loader_kwargs(config: TrainConfig, device: torch.device | None = None, cpus: int | None = None) -> dict[str, Any]:
    """Worker, pinning and prefetch settings of a run's DataLoaders.

    Workers are forked, so they read the decoded images (the object store's buffer, or the
    process's own array) in place: a worker's unique memory does not grow by the cache's size
    (``tests/test_gpu_path.py``). They persist between epochs, and pin batches on CUDA so the copy
    to the GPU overlaps compute.
    """
    device = device if device is not None else default_device()
    workers = resolve_num_workers(config, device, cpus)
    kw: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=config.data.prefetch_factor)
    return kw


def make_loaders(config: TrainConfig, decoded: DecodedImages, *, with_test: bool = True,
                 device: torch.device | None = None, cpus: int | None = None) -> SplitLoaders:
    """Loaders of every split; ``with_test=False`` builds none for the test split."""
    d = config.data
    tr = train_indices(decoded, d.label_fraction, config.optim.seed)
    has_test = with_test and bool((decoded.table["split"] == "test").any())
    kw = loader_kwargs(config, device, cpus)
    train_ds = IQADataset(decoded, tr, train=True, crop_size=d.crop_size, patches_per_image=d.patches_per_image,
                          whole_image=d.whole_image)
    if not train_ds.same_size and not d.feature_cache:
        raise DatasetError("whole_image training needs images of one size to batch them: set image_size=[W, H], "
                           "or feature_cache = true with a frozen backbone (features are computed image by image)")
    n_train = len(train_ds)
    return SplitLoaders(
        # drop_last keeps every step's batch statistics (BatchNorm, ranking pairs) comparable
        train=DataLoader(train_ds, batch_size=d.batch_size, shuffle=True, drop_last=n_train > d.batch_size, **kw),
        val=eval_loader(config, eval_dataset(config, decoded, "val"), **kw),
        test=eval_loader(config, eval_dataset(config, decoded, "test"), **kw) if has_test else None,
        train_eval=eval_loader(config, IQADataset(decoded, tr, train=False, crop_size=d.crop_size,
                                                  whole_image=d.whole_image), **kw),
        train_mos=decoded.table["mos"].to_numpy(np.float64)[tr],
        train_rows=tr,
    )


# ----------------------------------------------------------------------------- building


def configure_device(config: TrainConfig, device: torch.device) -> None:
    """Process-wide switches of a run on ``device`` (a trial owns its process)."""
    o = config.optim
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = o.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = o.tf32
        torch.backends.cudnn.allow_tf32 = o.tf32
    else:
        # Adam's second moments of a small head decay into denormal floats, which CPUs compute
        # an order of magnitude slower (a cached-feature epoch went from 1.2 s to 6 s); flushing
        # them to zero changes no result that matters.
        torch.set_flush_denormal(True)


def build_optimizer(config: TrainConfig, model: IQAModel) -> torch.optim.Optimizer:
    o = config.optim
    groups = model.param_groups(o.lr, o.resolved_backbone_lr)
    groups = [g for g in groups if g["params"] and g["lr"] > 0]
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen or has learning rate 0")
    # The fused kernel (one launch per step for every tensor) where every parameter is on CUDA.
    fused = {"fused": True} if o.fused_optimizer and all(p.is_cuda for g in groups for p in g["params"]) else {}
    if o.optimizer == "adam":
        return torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay, **fused)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, **fused)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def lr_factor(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of every group's base LR after ``step`` optimiser steps (warm-up x schedule).

    Computed per step, so a short run's warm-up and cosine are smooth rather than three jumps.
    ``plateau`` contributes 1 here; its reductions are applied on top, per epoch.
    """
    o = config.optim
    epoch = step / steps_per_epoch
    warm = min(1.0, epoch / o.warmup_epochs) if o.warmup_epochs > 0 else 1.0
    if o.lr_schedule == "cosine":
        t_max = o.t_max or o.epochs
        progress = min(1.0, max(0.0, epoch - o.warmup_epochs) / max(t_max - o.warmup_epochs, 1e-9))
        factor = o.eta_min + (1 - o.eta_min) * 0.5 * (1 + math.cos(math.pi * progress))
    elif o.lr_schedule == "step":
        factor = o.gamma ** int(epoch // o.step_size)
    else:
        factor = 1.0
    return warm * factor


class Schedule:
    """Per-step LR schedule plus the per-epoch plateau reductions, with a saveable state."""

    def __init__(self, config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> None:
        self.config = config
        self.optimizer = optimizer
        self.steps_per_epoch = steps_per_epoch
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.step_count = 0
        self.plateau_scale = 1.0
        self.plateau_best = -math.inf
        self.plateau_bad_epochs = 0
        self.apply()

    def apply(self) -> None:
        factor = lr_factor(self.config, self.step_count, self.steps_per_epoch) * self.plateau_scale
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def step(self) -> None:
        self.step_count += 1
        self.apply()

    def epoch_end(self, epoch: int, val_srcc: float) -> None:
        o = self.config.optim
        if o.lr_schedule != "plateau" or epoch + 1 <= o.warmup_epochs:
            return
        if val_srcc > self.plateau_best + 1e-4:
            self.plateau_best, self.plateau_bad_epochs = val_srcc, 0
        else:
            self.plateau_bad_epochs += 1
            if self.plateau_bad_epochs > o.plateau_patience:
                self.plateau_scale *= o.plateau_factor
                self.plateau_bad_epochs = 0
        self.apply()

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "plateau_scale": self.plateau_scale,
                "plateau_best": self.plateau_best, "plateau_bad_epochs": self.plateau_bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.plateau_scale = float(state["plateau_scale"])
        self.plateau_best = float(state["plateau_best"])
        self.plateau_bad_epochs = int(state["plateau_bad_epochs"])
        self.apply()


# ----------------------------------------------------------------------------- seeding


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": json.dumps(random.getstate()),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- evaluation


def to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (..., 3, H, W) on CPU -> float in [0, 1] on ``device`` (converted after the copy)."""
    return images.to(device, non_blocking=True).float().div_(255.0)


@torch.no_grad()
def predict(model: IQAModel, loader: DataLoader, device: torch.device,
            amp: torch.dtype | None = None, chunk: int = 64,
            memory_format: torch.memory_format | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores and MOS of every image of ``loader``; patch scores are averaged per image.

    Patches go through the model ``chunk`` at a time (a batch of 64 images with 25 patches each
    would otherwise be one 1,600-patch forward pass). ``amp`` is the backbone's autocast dtype
    (``None``: float32); scores are float32 either way.
    """
    was_training = model.training
    model.eval()
    preds, mos = [], []
    try:
        for batch in loader:
            images = batch["image"]
            b, p = images.shape[:2]
            flat = images.flatten(0, 1)
            parts = []
            for start in range(0, len(flat), chunk):
                inputs = to_float(flat[start:start + chunk], device)
                if memory_format is not None:
                    inputs = inputs.contiguous(memory_format=memory_format)
                with _autocast(device, amp):
                    parts.append(model(inputs)["score"].float())
            scores = torch.cat(parts)
            preds.append(scores.view(b, p).mean(dim=1).cpu().numpy())
            mos.append(batch["mos"].numpy())
    finally:
        model.train(was_training)
    return np.concatenate(preds).astype(np.float64), np.concatenate(mos).astype(np.float64)


def evaluate(model: IQAModel, loader: DataLoader, device: torch.device,
             amp: torch.dtype | None = None, chunk: int = 64) -> dict[str, float]:
    """SRCC, PLCC, KRCC, RMSE and logistic PLCC of ``model`` on ``loader``."""
    pred, mos = predict(model, loader, device, amp, chunk=chunk)
    return all_metrics(pred, mos)


def evaluate_dataset(model: IQAModel, config: TrainConfig, spec: str, *, split: str = "all",
                     device: torch.device | None = None) -> dict[str, float]:
    """Score a trained model on another dataset (cross-dataset evaluation), with the run's crops.

    Args:
        model: the trained model.
        config: the run's config (crop size, patches, label, image size are reused).
        spec: the dataset to score (any ``--dataset`` form).
        split: ``"all"`` (the usual cross-dataset protocol: the model never saw this dataset) or
            one split name.
        device: where to run.

    Returns:
        The metrics plus ``n``, the number of images scored.
    """
    device = device or default_device()
    table = load_run_table(config, spec)
    if split != "all":
        table = table[table["split"] == split].reset_index(drop=True)
    decoded = decode_for(config, table)
    rows = np.arange(len(decoded.table))
    loader = eval_loader(config, eval_dataset(config, decoded, rows))
    return {**evaluate(model, loader, device, chunk=config.data.eval_chunk), "n": int(len(rows))}


def amp_mode(amp: bool | str, device: torch.device, bf16_supported: bool | None = None) -> str:
    """What a run's ``amp`` setting means on ``device``: ``"bf16"``, ``"fp16"`` or ``"off"``.

    ``"auto"`` (or ``True``) is bfloat16 on CUDA devices that support it and float16 (with a
    gradient scaler) on those that do not (V100, T4), off on CPU (CPU autocast is slow on CPUs
    without bfloat16 units); ``"bf16"`` and ``"fp16"`` force that dtype everywhere, so the CPU
    tests run the paths a GPU runs. ``bf16_supported`` overrides the device query (tests).
    """
    if amp is False or amp == "off":
        return "off"
    if amp in ("bf16", "fp16"):
        return str(amp)
    if device.type != "cuda":
        return "off"
    if bf16_supported is None:
        bf16_supported = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return "bf16" if bf16_supported else "fp16"


_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def autocast_dtype(amp: bool | str, device: torch.device, bf16_supported: bool | None = None) -> torch.dtype | None:
    """The autocast dtype of a run's ``amp`` setting on ``device`` (:func:`amp_mode`), or ``None`` for float32."""
    return _AMP_DTYPES[amp_mode(amp, device, bf16_supported)]


def _autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    # Only the backbone runs in ``dtype``: IQAModel.forward switches autocast off for its head.
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


# ----------------------------------------------------------------------------- checkpoints


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects (``weights_only=True``).

    Raises:
        CheckpointError: missing, not a checkpoint, or containing anything but tensors and plain
            data (a tampered file with pickled code is refused, not executed).
    """
    path, state = load_weights_file(path, default_file=CHECKPOINT_FILE, what="iqa-ray checkpoint", error=CheckpointError)
    if not isinstance(state, dict) or state.get("format") != "iqa-ray" or "model" not in state:
        raise CheckpointError(f"{path} is not an iqa-ray checkpoint (missing format marker or model weights)")
    return state


# ----------------------------------------------------------------------------- the loop


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


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run; ``torch.distributed`` is already initialised.

    Every process draws the same global batch (the generators are seeded alike, so the shuffled
    order, crops and flips are the single-process ones) and keeps the elements ``rank``,
    ``rank + world_size``, ...: the global batch is ``batch_size`` whatever the worker count, and
    DistributedDataParallel averages the gradients of the shares (each share's loss weighted by
    its size). A loss that is a mean over the batch, in a model without batch statistics in
    training (a frozen backbone, cached features), then steps as one process would, up to float
    summation order. Two things differ by design: a loss over pairs (``ranking``) pairs images
    within a share only, a trained BatchNorm normalises each share by its own statistics
    (DistributedDataParallel keeps rank 0's running statistics), and dropout draws each share's
    masks afresh (the same distribution, other draws), as in any DDP run.

    Each process prepares the whole global batch (crops and flips of cached images are cheap) and
    moves only its share to its device; every process evaluates the whole validation split.
    """

    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"DataParallel needs 0 <= rank < world_size, got rank {self.rank} of {self.world_size}")

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's elements of a global batch."""
        return batch[self.rank::self.world_size]


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
        with _autocast(self.device, self.amp):
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
    draw the image or its mirror with equal odds: the samples an image loader with random flips
    would give, minus the backbone pass. Evaluation scores the whole, unflipped images.
    """

    def __init__(self, config: TrainConfig, decoded: DecodedImages, cache: Any, device: torch.device,
                 with_test: bool) -> None:
        d = config.data
        cache.check(config, len(decoded.table))
        # Copies (a few MB): the object store's arrays are read-only, and torch wants to own its tensors.
        self.plain = torch.from_numpy(np.array(cache.plain, dtype=np.float32)).to(device)
        self.flipped = torch.from_numpy(np.array(cache.flipped, dtype=np.float32)).to(device)
        self.mos = torch.from_numpy(decoded.table["mos"].to_numpy(np.float32)).to(device)
        self.rows = {"train": torch.from_numpy(train_indices(decoded, d.label_fraction, config.optim.seed)),
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
            mirror = (torch.rand(len(idx)) < 0.5).to(self.plain.device)  # drawn for the global batch
            n_global = len(idx)
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
        features: with ``feature_cache``, the :class:`~iqa_ray.features.FeatureCache` of
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
    amp = _AMP_DTYPES[mode]
    # float16's range is narrow: the loss is scaled up for backward and the step skipped when
    # a gradient overflowed (bfloat16 has float32's range and needs no scaler).
    scaler = torch.amp.GradScaler(device.type, enabled=mode == "fp16")
    if config.data.feature_cache:
        from iqa_ray.features import compute_features

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
        saved_config = json.loads(state["config"])
        if saved_config != config.to_dict():
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
            sums, n_images = _sum_over_processes(sums, n_images, device)
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


def check_data_parallel(data_parallel: DataParallel, config: TrainConfig, n_train_images: int) -> None:
    """A data-parallel run needs ``torch.distributed`` and at least one image per process per step."""
    import torch.distributed as dist

    d = config.data
    # The config first (what the user can fix): the feeds draw min(batch_size, every training
    # draw) images a step (drop_last otherwise), and every process needs at least one of them.
    per_step = min(d.batch_size, n_train_images * d.patches_per_image)
    if per_step < data_parallel.world_size:
        raise ConfigError(f"batch_size {d.batch_size} gives {per_step} images a step, fewer than the "
                          f"{data_parallel.world_size} data-parallel workers: raise batch_size to at least "
                          f"{data_parallel.world_size} or use fewer workers")
    if data_parallel.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("data_parallel was given but torch.distributed is not initialised; start one process per "
                           "worker with a process group (iqa_ray.search.ddp does), or pass data_parallel=None")


def _sum_over_processes(sums: dict[str, torch.Tensor], n_images: int,
                        device: torch.device) -> tuple[dict[str, torch.Tensor], int]:
    """Loss sums and image counts of every process (the reported train metrics are the global ones)."""
    import torch.distributed as dist

    keys = sorted(sums)  # every process has the same loss parts, in any order
    packed = torch.stack([sums[k].double() for k in keys] + [torch.tensor(float(n_images), dtype=torch.float64,
                                                                              device=device)])
    dist.all_reduce(packed)
    return {k: packed[i] for i, k in enumerate(keys)}, int(packed[-1].item())


def best_model_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The best-by-validation weights stored in a checkpoint."""
    return checkpoint["best_model"] if checkpoint.get("best_model") is not None else checkpoint["model"]


def model_from_checkpoint(path: str | os.PathLike[str], device: torch.device | str = "cpu",
                          best: bool = True) -> tuple[IQAModel, TrainConfig]:
    """Rebuild a trained model (best-by-validation weights by default) and its config."""
    state = load_checkpoint(path)
    saved = json.loads(state["config"])
    try:
        config = TrainConfig.from_dict(saved)
    except ConfigError:
        if not saved.get("model", {}).get("pretrained_encoder"):
            raise
        # The encoder file the run started from is gone; its weights are in the checkpoint anyway.
        config = TrainConfig.from_dict(saved, pretrained_encoder=None)
    # The weights come from the checkpoint, so the backbone is built without any download or encoder.
    blank = config.replace(pretrained="none", pretrained_encoder=None)
    model = build(blank, torch.device(device))
    model.load_state_dict(best_model_state(state) if best else state["model"])
    model.eval()
    return model, config

