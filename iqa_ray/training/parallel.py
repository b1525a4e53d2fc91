"""A data-parallel run's place (rank, world size), its checks, and the sums over its processes.

The engine trains data-parallel when given a :class:`DataParallel`; :mod:`iqa_ray.trainables.ddp`
starts the processes (Ray Train's ``TorchTrainer``) and the process group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iqa_ray.core.options import ConfigError
from iqa_ray.training.config import TrainConfig


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
                           "worker with a process group (iqa_ray.trainables.ddp does), or pass data_parallel=None")


def sum_over_processes(sums: dict[str, torch.Tensor], n_images: int,
                        device: torch.device) -> tuple[dict[str, torch.Tensor], int]:
    """Loss sums and image counts of every process (the reported train metrics are the global ones)."""
    import torch.distributed as dist

    keys = sorted(sums)  # every process has the same loss parts, in any order
    packed = torch.stack([sums[k].double() for k in keys] + [torch.tensor(float(n_images), dtype=torch.float64,
                                                                              device=device)])
    dist.all_reduce(packed)
    return {k: packed[i] for i, k in enumerate(keys)}, int(packed[-1].item())

