"""Starting or joining Ray for a search, pre-generation or a test: bound to 127.0.0.1 when local,
no dashboard, a connection error that says what to do, and a worker setup hook that keeps a
stopped trial's actor from aborting at exit.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from typing import Any

from iqa_ray.core.plugins import PLUGINS_ENV

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
