"""Cluster start-up and what a search may ask of the cluster.

Starting or joining Ray for a search, pre-generation or a test: bound to 127.0.0.1 when local, no
dashboard, an ``--address`` checked before anything starts, a connection error that says what to
do, and a worker setup hook that keeps a stopped trial's actor from aborting at exit. Once Ray is
up, a search's requests are checked against what the cluster has (CPUs per trial, data-parallel
workers, GPU concurrency), so that no trial waits forever for resources that cannot be placed.

This module imports no torch: every Ray worker imports it at start-up (the setup hook), and
``iqa-ray pregenerate`` starts Ray through it.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from iqa_ray.core.errors import LaunchError
from iqa_ray.core.plugins import PLUGINS_ENV

if TYPE_CHECKING:  # the settings module pulls in torch; a Ray worker's start-up should not
    from iqa_ray.search.settings import SearchSettings

ADDRESS_TIMEOUT_S = 10.0
# How long an exiting Ray worker waits for a Tune trial's training thread to finish unwinding.
# A stopped trial's thread is released from `tune.report` and ends in milliseconds; the bound only
# matters for a thread that is still computing when its actor is told to exit.
TRIAL_THREAD_EXIT_WAIT_S = 10.0
# Runs once in every worker process of the jobs `init_ray` starts (runtime_env setup hook).
WORKER_SETUP_HOOK = "iqa_ray.search.cluster.wait_for_trial_threads_at_exit"


def wait_for_trial_threads_at_exit() -> None:
    """Ray worker setup hook: make the worker's interpreter shutdown wait for Tune training threads.

    Ray Tune runs a function trainable in a daemon thread of the trial actor. When Tune stops a
    trial (ASHA at a rung, or the last epoch reached), ``FunctionTrainable.cleanup`` wakes that
    thread inside ``tune.report``, where it raises ``SystemExit(0)``, and does not wait for it
    (``session.finish(timeout=0)``); the actor then exits at once. The thread is still unwinding
    ``fit()``'s frames, freeing the model's and optimiser's tensors, and each tensor's deallocation
    (``THPVariable_clear``) releases and re-takes the GIL. Once the interpreter is finalizing,
    Python 3.11 answers that re-take with ``pthread_exit``, whose forced unwind cannot pass torch's
    ``noexcept`` deallocator: ``std::terminate`` -> ``abort()`` -> SIGABRT, and faulthandler's
    "Fatal Python error: Aborted" dump on the console. ``atexit`` handlers run before
    finalization starts, so joining the training thread there lets it finish normally.
    """
    atexit.register(join_trial_threads)


def join_trial_threads(timeout: float = TRIAL_THREAD_EXIT_WAIT_S) -> None:
    """Wait, at most ``timeout`` seconds in all, for this process's Ray Tune training threads to end."""
    util = sys.modules.get("ray.air._internal.util")  # not imported: no trial ran in this process
    runner = getattr(util, "RunnerThread", None)
    if runner is None:
        return
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if isinstance(thread, runner) and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


def check_address(address: str, timeout: float = ADDRESS_TIMEOUT_S) -> None:
    """Fail within ``timeout`` seconds when ``host:port`` does not accept connections."""
    if address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise LaunchError(f"--address {address!r} must be HOST:PORT (e.g. 10.0.0.5:6379), ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except OSError as exc:
        raise LaunchError(f"--address {address}: no Ray cluster answers there ({exc}); start one with "
                          f"`ray start --head --port {port}` or check the address") from None


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> dict[str, float]:
    """Connect to ``address`` or start a local Ray instance bound to 127.0.0.1; return its resources.

    The dashboard is not started (it would open a port); Ray's own logs stay in its temp folder.
    Every worker runs :func:`wait_for_trial_threads_at_exit` at start-up (unless ``runtime_env``
    names another setup hook), so a stopped trial's actor exits without a SIGABRT; the
    ``IQA_RAY_PLUGINS`` variable (:mod:`iqa_ray.core.plugins`) is passed on to every worker.
    """
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env.setdefault("worker_process_setup_hook", WORKER_SETUP_HOOK)
    if os.environ.get(PLUGINS_ENV):  # the user's families and layouts, registered in every worker too
        runtime_env["env_vars"] = {PLUGINS_ENV: os.environ[PLUGINS_ENV], **runtime_env.get("env_vars", {})}
    init_kwargs: dict[str, Any] = {"include_dashboard": False, "ignore_reinit_error": True, "log_to_driver": True,
                                   "runtime_env": runtime_env}
    if address:
        init_kwargs["address"] = address
    else:
        init_kwargs["num_cpus"] = num_cpus
        init_kwargs["_node_ip_address"] = "127.0.0.1"
    init_kwargs.update(kwargs)
    try:
        ray.init(**init_kwargs)
    except ConnectionError as exc:
        if not address:
            raise
        raise ConnectionError(_connection_hint(address, exc)) from None
    return ray.cluster_resources()


def _connection_hint(address: str, exc: BaseException) -> str:
    """Why ``ray.init(address=...)`` failed, in one message that says what to do.

    The usual cause (Ray 2.60, this venv): ``ray start --head`` enables token authentication when it
    finds a token (``~/.ray/auth_token``) and ``RAY_AUTH_MODE`` is unset, but a driver connecting to
    an explicit address never sends a token unless ``RAY_AUTH_MODE=token`` is set.
    """
    causes: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(causes) < 8:
        causes.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    text = " ".join(causes)
    if "InvalidAuthToken" in text or "AuthenticationError" in text or "uthentication token" in text:
        return (f"the Ray cluster at {address} requires token authentication and this process sent no valid "
                "token. Set RAY_AUTH_MODE=token and make the cluster's token available here (RAY_AUTH_TOKEN, "
                "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, the same token on every node), then run again. "
                "See docs/CLUSTER.md.")
    return (f"could not connect to the Ray cluster at {address} ({causes[0]}). Check that `ray status --address "
            f"{address}` works from this machine and that it runs the cluster's Ray and Python versions.")


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
