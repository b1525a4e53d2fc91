"""What a search may ask of the cluster, checked before any trial starts: GPUs and GPU shares,
CPUs per trial, data-parallel workers; and the launch error every check raises.

Below :mod:`iqa_ray.search.settings` (flags) and :mod:`iqa_ray.search.run` (execution), which
both use it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from iqa_ray.search.tuner import SearchSettings, per_gpu
from iqa_ray.training.config import renamed_keys


class LaunchError(RuntimeError):
    """A launch request that cannot work; the message says why and what would."""


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` flags as a dict (values parsed as JSON, else kept as text), renamed keys
    under their new names, so an old key overrides a study's value written with the new one."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise LaunchError(f"--set expects KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[key.strip()] = text
    return renamed_keys(out, "--set")


def resolve_gpus(args: argparse.Namespace, resources: dict[str, float]) -> tuple[float, float]:
    """(GPUs to use, share per trial), checked against what the cluster really has."""
    available = float(resources.get("GPU", 0.0))
    gpus = available if args.gpus is None else float(args.gpus)
    if gpus > available:
        raise LaunchError(
            f"--gpus {args.gpus:g} asks for more GPUs than the Ray cluster has ({available:g}); trials would wait "
            f"forever. Use --gpus {available:g}" + (" (CPU only)" if available == 0 else "") + " or add GPU nodes."
        )
    if gpus == 0:
        if args.gpus_per_trial is not None:
            raise LaunchError(f"--gpus-per-trial {args.gpus_per_trial:g} was given but the Ray cluster has no GPU; "
                              "drop it to run on CPU, or connect to a cluster with GPUs (--address)")
        return 0.0, 0.0
    share = args.gpus_per_trial if args.gpus_per_trial is not None else 0.25
    if share > 1:
        data_parallel_gpus(share)
        if share > gpus:
            raise LaunchError(f"--gpus-per-trial {share:g} trains each trial data-parallel on {share:g} GPUs, but "
                              f"the search may use {gpus:g}; use --gpus-per-trial {max(int(gpus), 1):g} or fewer")
    else:
        per_gpu(share)
    return gpus, share


def data_parallel_gpus(gpus_per_trial: float) -> int:
    """Workers of a data-parallel GPU trial: ``--gpus-per-trial`` above 1 must be a whole number."""
    if gpus_per_trial <= 1 or not float(gpus_per_trial).is_integer():
        raise LaunchError(f"--gpus-per-trial must be in (0, 1] (a share of one GPU: 1, 0.5, 0.25, ...) or a whole "
                          f"number of GPUs above 1 that a data-parallel trial trains on (2, 3, 4, ...), "
                          f"got {gpus_per_trial:g}")
    return int(gpus_per_trial)


def trial_workers(settings: SearchSettings) -> int:
    """Data-parallel workers of every trial: 1 for an ordinary trial."""
    if settings.gpus_per_trial > 1:
        return int(settings.gpus_per_trial)
    return settings.workers_per_trial


def check_data_parallel_fits(settings: SearchSettings, node_cpus: list[float], gpus: float) -> int | None:
    """A data-parallel trial's workers must fit in what the search may use; returns its concurrency cap.

    Ray Train places the workers of a trial itself, outside the trial's (empty) resource request,
    so a trial whose workers cannot all be placed would wait for them forever: refused here.
    The cap keeps Tune from starting more trials than the cluster can place workers for.
    """
    workers = trial_workers(settings)
    if workers == 1:
        return settings.max_concurrent
    flag = (f"--gpus-per-trial {workers}" if settings.gpus_per_trial > 1 else f"--workers-per-trial {workers}")
    if settings.gpus_per_trial > 1 and settings.gpus_per_trial > gpus:
        raise LaunchError(f"{flag} asks for {workers} GPUs per trial but the search may use {gpus:g}; "
                          f"use --gpus-per-trial {max(int(gpus), 1)} or fewer" + (" (or a share below 1)" if gpus else ""))
    per_worker = cpus_per_worker(settings)
    largest, total = max(node_cpus, default=0.0), sum(node_cpus)
    if per_worker > largest:
        raise LaunchError(f"{flag} with --cpus-per-trial {settings.cpus_per_trial:g}: each worker needs "
                          f"{per_worker:g} CPUs, more than the largest node's {largest:g}")
    fitting = sum(int(c // per_worker) for c in node_cpus)  # workers the cluster can hold at once
    if workers > fitting:
        valid = max(fitting, 1)
        raise LaunchError(f"{flag} needs {workers} workers of {per_worker:g} CPU each, but the Ray cluster "
                          f"({total:g} CPUs on {len(node_cpus)} node(s)) can place {fitting}; the trial would stay "
                          f"PENDING forever. Use {flag.split()[0]} {valid} or fewer, or add nodes")
    cap = fitting // workers
    if settings.gpus_per_trial > 1:
        cap = min(cap, int(gpus // workers))
    return cap if settings.max_concurrent is None else min(cap, settings.max_concurrent)


def cpus_per_worker(settings: SearchSettings) -> float:
    """A data-parallel trial's ``--cpus-per-trial`` shared by its workers, at least 1 CPU each."""
    return max(1.0, settings.cpus_per_trial / trial_workers(settings))


def gpu_concurrency(gpus: float, share: float, max_concurrent: int | None) -> int | None:
    """Trials that may run at once so the search uses at most ``gpus`` GPUs at ``share`` each."""
    if gpus <= 0:
        return max_concurrent
    cap = max(1, int(round(gpus / share, 6)))
    return cap if max_concurrent is None else min(cap, max_concurrent)


def check_cpus_per_trial(cpus_per_trial: float, node_cpus: list[float]) -> None:
    """A trial must fit on one node: the cluster total is not enough."""
    largest = max(node_cpus, default=0.0)
    if cpus_per_trial > largest:
        raise LaunchError(f"--cpus-per-trial {cpus_per_trial:g} exceeds the largest node's {largest:g} CPUs "
                          f"(nodes: {', '.join(f'{c:g}' for c in node_cpus)}); the trial could never be placed")


def experiment_dir_hint(settings: SearchSettings) -> str:
    local = settings.local_experiment_dir()
    return str(local) if local is not None else settings.experiment_path()
