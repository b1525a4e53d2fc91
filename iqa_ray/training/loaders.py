"""What a run reads: its dataset's label table, the decoded images, and the DataLoaders of each split.

The splits and the patch rules come from the run's :class:`~iqa_ray.training.config.TrainConfig`; the
engine (:mod:`iqa_ray.training.engine`), the search and the scoring commands all build their loaders here,
so a trial, a re-scoring and ``iqa-ray score`` see the same crops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from iqa_ray.core.errors import DatasetError
from iqa_ray.core.runtime import default_device
from iqa_ray.data.catalog import load_table
from iqa_ray.data.decoded import DecodedImages, IQADataset, decode_table
from iqa_ray.training.config import TrainConfig


def load_run_table(config: TrainConfig, spec: str | None = None, *, split_seed: int | None = None,
                   check_images: bool = False) -> Any:
    """The label table of the run's dataset (or of ``spec``), split as the run's data config says.

    Bad rows stop it with one error naming them all, or with ``skip_bad_rows`` are left out of
    every split (``attrs["skipped"]``), unreadable image files included; ``check_images`` finds
    those without skipping them (:func:`~iqa_ray.data.catalog.load_table`).
    """
    d = config.data
    return load_table(spec or d.dataset, label=d.label, split_seed=d.split_seed if split_seed is None else split_seed,
                      split_fractions=d.split_fractions, on_error="skip" if d.skip_bad_rows else "raise",
                      check_images=check_images or d.skip_bad_rows)


def decode_for(config: TrainConfig, table: Any, progress: Callable[[int], Any] | None = None) -> DecodedImages:
    """Decode ``table`` with the run's resize rule (``image_size`` or ``short_side``);
    ``progress(1)`` after each image; with ``skip_bad_rows`` an image that fails is left out and listed."""
    d = config.data
    kwargs = {"short_side": d.short_side} if d.short_side is not None else {}
    return decode_table(table, image_size=d.image_size, min_size=0 if d.whole_image else d.crop_size,
                        progress=progress, on_error="skip" if d.skip_bad_rows else "raise", **kwargs)


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


def train_indices(decoded: DecodedImages, label_fraction: float, seed: int, *, with_val: bool = False) -> np.ndarray:
    """Rows of the training split (and, ``with_val``, of the validation split: a refit, see
    ``train_on_val``), restricted to a seeded fraction of their groups (photos)."""
    idx = decoded.split_indices("train")
    if with_val:
        idx = np.sort(np.concatenate([idx, decoded.split_indices("val")]))
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
    tr = train_indices(decoded, d.label_fraction, config.optim.seed, with_val=config.optim.train_on_val)
    has_test = with_test and bool((decoded.table["split"] == "test").any())
    kw = loader_kwargs(config, device, cpus)
    train_ds = IQADataset(decoded, tr, train=True, crop_size=d.crop_size, patches_per_image=d.patches_per_image,
                          whole_image=d.whole_image, hflip=d.hflip)
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

