"""What a Ray trial or task may use: its CPU threads and, when it holds a GPU share, that GPU."""

from __future__ import annotations

import os

import torch


def worker_device(threads: float) -> torch.device:
    """Set torch's thread count to this worker's CPU share and return where it should compute.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPU a trial or task was given, so ``"cuda"`` is that
    GPU; a worker without a GPU share computes on the CPU even where the node has GPUs, and so does
    a worker that holds a share but finds no CUDA (a node that declares GPUs it does not have, or a
    CPU-only torch): :func:`device_report` says so in every report.

    Args:
        threads: the worker's CPU share (``cpus_per_trial``); fractions round down, at least 1.
    """
    torch.set_num_threads(max(1, int(threads)))
    return torch.device("cuda") if _gpu_ids() and torch.cuda.is_available() else torch.device("cpu")


def _gpu_ids() -> list:
    """Ray's GPU ids for this process; none outside Ray (a test, a user's script), where
    ``ray.get_gpu_ids()`` would start a whole local Ray instance to answer."""
    import ray

    return ray.get_gpu_ids() if ray.is_initialized() else []


def device_report(device: torch.device) -> dict[str, str]:
    """Where this process computes beside what Ray gave it, reported with every epoch: ``device``
    (``cpu``, ``cuda``, ``cuda:1``), ``gpu_ids`` (Ray's GPU ids for this process, comma-separated,
    empty without a GPU share) and ``cuda_visible_devices`` (the variable as this process sees it).
    A report with ``gpu_ids`` and ``device`` ``cpu`` is a trial that held a GPU share and found no
    CUDA (:func:`iqa_ray.search.console.device_note`)."""
    return {"device": str(device), "gpu_ids": ",".join(str(i) for i in _gpu_ids()),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
