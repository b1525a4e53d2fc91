"""What a Ray trial or task may use: its CPU threads and, when it holds a GPU share, that GPU."""

from __future__ import annotations

import torch


def worker_device(threads: float) -> torch.device:
    """Set torch's thread count to this worker's CPU share and return where it should compute.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPU a trial or task was given, so ``"cuda"`` is that
    GPU; a worker without a GPU share computes on the CPU even where the node has GPUs.

    Args:
        threads: the worker's CPU share (``cpus_per_trial``); fractions round down, at least 1.
    """
    import ray

    torch.set_num_threads(max(1, int(threads)))
    return torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
