"""The process group of a data-parallel trial, started by its workers rather than by Ray Train.

Ray Train's :class:`~ray.train.torch.TorchConfig` starts ``torch.distributed`` before the training
function runs, with NCCL whenever the workers *asked for* GPUs, whether or not they have CUDA: on a
node that declares GPUs it does not have (``ray start --num-gpus 2`` on a CPU machine) that is
``ValueError: ProcessGroupNCCL is only supported with GPUs, no GPUs found!``. Worse, in Ray 2.60 a
failure there leaves the worker group's placement group held (the group counts as started, so its
partial clean-up skips it, and the controller never received the group to shut it down); the
trial's retry then waits for those GPUs and CPUs forever and the search hangs.

So Ray Train is given :class:`WorkerProcessGroup`: its workers are placed and share the node's
``CUDA_VISIBLE_DEVICES`` as under ``TorchConfig``, and no process group is started for them. Each
worker starts it in the training function (:func:`start_process_group`), with NCCL where it computes
on CUDA and gloo where it finds none (:func:`train_device`). A group that cannot start (no CUDA
where rank 0 has it, a ``GLOO_SOCKET_IFNAME`` the node lacks, an unreachable rank 0) is then a
failure of the training function: Ray Train shuts the worker group down, freeing its placement
group, retries it up to ``FailureConfig(max_failures)`` times and then fails the trial with the
error, which Tune retries up to ``--max-failures`` times before it ends the trial as ERROR.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
from ray.train.backend import Backend
from ray.train.torch import TorchConfig

PROCESS_GROUP_TIMEOUT_S = 1800  # torch.distributed's collectives time out after this (TorchConfig's default)


class _PlacedOnly(Backend):
    """A Ray Train backend that only shares ``CUDA_VISIBLE_DEVICES`` among a node's workers (as
    Torch's does, so that ``ray.train.torch.get_device`` names each worker's own GPU and NCCL can
    reach its peers); it starts nothing."""

    share_cuda_visible_devices = True


@dataclass
class WorkerProcessGroup(TorchConfig):
    """``TorchConfig`` whose workers start their own process group (:func:`start_process_group`).

    ``backend`` is what the workers choose, recorded for Ray Train's run metadata only.
    """

    backend: str = "per worker: nccl on CUDA, else gloo"

    @property
    def backend_cls(self) -> type[Backend]:
        return _PlacedOnly


def train_device() -> torch.device:
    """This Ray Train worker's device: its GPU where it holds one and has CUDA, else the CPU.

    ``ray.train.torch.get_device`` names a CUDA device whenever Ray assigned the worker a GPU, even
    where torch finds no CUDA (a node that declares GPUs it does not have); such a worker computes
    on the CPU (its reports say so: :func:`iqa_ray.trainables.placement.device_report`).
    """
    import ray.train.torch

    device = ray.train.torch.get_device()
    return device if device.type == "cuda" and torch.cuda.is_available() else torch.device("cpu")


def start_process_group(rank: int, world_size: int, device: torch.device,
                        timeout_s: float = PROCESS_GROUP_TIMEOUT_S) -> str:
    """Join this Ray Train run's ``torch.distributed`` process group; returns its backend.

    Rank 0 picks its address and a free port and chooses the backend from its own device (``nccl``
    on CUDA, ``gloo`` on the CPU); every worker receives them (Ray Train's broadcast, a barrier) and
    connects. A worker whose device does not fit rank 0's choice fails here, naming both.

    Raises:
        RuntimeError: this worker computes on another kind of device than rank 0.
    """
    import ray
    import torch.distributed as dist
    from ray.train.collective import broadcast_from_rank_zero

    backend = "nccl" if device.type == "cuda" else "gloo"
    offer = None
    if rank == 0:
        with socket.socket() as probe:  # a port free now; rank 0's store binds it in a moment
            probe.bind(("", 0))
            offer = (ray.util.get_node_ip_address(), probe.getsockname()[1], backend)
    host, port, chosen = broadcast_from_rank_zero(offer)
    if chosen == "nccl" and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        # As Ray Train sets it: a stalled NCCL collective fails the worker instead of hanging the trial.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if chosen != backend:
        raise RuntimeError(f"data-parallel worker {rank} computes on {device} ({backend}) but rank 0 chose {chosen}: "
                           "every worker of a trial needs CUDA, or none does; check the nodes' CUDA drivers and "
                           "torch builds")
    dist.init_process_group(chosen, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return chosen
