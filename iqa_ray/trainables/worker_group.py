"""The placement group of a data-parallel trial's workers, removed once its Ray Train run is over.

Ray Train (2.60) creates the workers' placement group from the run's controller, an actor of the
Tune trial that runs inside the trial's own placement group. When Tune ends such a trial (ASHA at a
rung, its last epoch, the time budget, a failure), it removes the trial's group, which ends every
actor in it at once, the controller included, before the controller has shut its workers down. A
placement group outlives the actor that created it until its job (the launcher) ends, so the
workers' CPUs and GPUs stayed held: the next data-parallel trial, or the test scoring after the
search, waited for them forever. Ray Train's own ``PlacementGroupCleaner`` is meant to remove it,
but it asks the dashboard's state API whether the controller is alive, and the launcher starts
Ray without a dashboard: it never saw the controller end.

:class:`WatchWorkerGroup` does its job with a check that needs no dashboard. Each run gets a
detached watcher actor (on the head node, no CPU) that holds a handle to the run's controller and
the run's placement groups; it removes those still there when the controller says it is shutting
down, or when a call to the controller fails because it is gone (checked every
:data:`WATCH_EVERY_S` seconds), and then exits. It holds the controller's handle only until then,
so the controller ends as it would without it.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback  # DeveloperAPI

WATCH_EVERY_S = 1.0  # how often the watcher asks whether the run's controller is still there
WATCHER_START_TIMEOUT_S = 120.0  # how long the controller waits for its watcher's process to start
HEAD_NODE = "node:__internal_head__"  # the head node's resource: the watcher lives where the cluster does


class RunWatcher:
    """The detached actor of :class:`WatchWorkerGroup` (``max_concurrency=2``: :meth:`watch` runs
    while :meth:`add` and :meth:`finish` are called)."""

    def __init__(self, controller: Any) -> None:
        self._controller = controller
        self._groups: list[Any] = []
        self._done = threading.Event()
        self._lock = threading.Lock()

    def add(self, group: Any) -> None:
        with self._lock:
            self._groups.append(group)

    def finish(self) -> None:
        """The controller is shutting down, its worker group already shut down: remove what is left
        (normally nothing) and exit."""
        self._done.set()

    def watch(self, every_s: float = WATCH_EVERY_S) -> None:
        import ray

        while not self._done.is_set() and _alive(self._controller, timeout_s=every_s):
            self._done.wait(every_s)
        self._controller = None  # no longer keeps the controller alive
        with self._lock:
            removed = remove_if_held(self._groups)
        if removed:
            print(f"removed {removed} placement group(s) of a data-parallel run whose controller ended first",
                  flush=True)
        ray.actor.exit_actor()


def _alive(controller: Any, timeout_s: float) -> bool:
    """Whether ``controller`` still answers; a busy one (its event loop waits in a report callback)
    is alive, a dead one fails at once."""
    import ray
    from ray.exceptions import ActorDiedError, GetTimeoutError

    try:
        ray.get(controller.__ray_ready__.remote(), timeout=timeout_s)
    except GetTimeoutError:
        return True
    except ActorDiedError:
        return False
    return True


def remove_if_held(groups: list[Any]) -> int:
    """Remove the placement groups of ``groups`` that are not removed yet; returns how many."""
    from ray.util.placement_group import placement_group_table, remove_placement_group

    removed = 0
    for group in groups:
        if placement_group_table(group).get("state", "REMOVED") != "REMOVED":
            remove_placement_group(group)
            removed += 1
    return removed


class WatchWorkerGroup(ControllerCallback, WorkerGroupCallback):
    """A Ray Train callback (it runs in the run's controller): starts the run's watcher, hands it each
    worker group's placement group, and tells it when the controller shuts down (after removing its
    worker group)."""

    def __init__(self) -> None:
        self._watcher: Any = None

    def after_controller_start(self, train_run_context: Any) -> None:
        import ray

        watcher = ray.remote(RunWatcher).options(
            num_cpus=0, lifetime="detached", max_concurrency=2, resources={HEAD_NODE: 0.001},
            # outside the trial's placement group, whose removal ends the controller it watches
            scheduling_strategy="DEFAULT")
        self._watcher = watcher.remote(ray.get_runtime_context().current_actor)
        self._watcher.watch.remote()

    def after_worker_group_start(self, worker_group: Any) -> None:
        import ray
        from ray.exceptions import RayError

        # Where Ray Train's own PlacementGroupCleanerCallback finds the group (Ray 2.60).
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        try:
            ray.get(self._watcher.add.remote(group), timeout=WATCHER_START_TIMEOUT_S)
        except RayError as exc:  # the run trains on; only the clean-up after an abrupt end is lost
            print(f"warning: the watcher of this data-parallel run is not there ({exc!r}); if Tune ends the trial "
                  f"before the run shuts down, its workers' placement group {group.id.hex()} stays held until the "
                  "launcher exits (`ray.util.remove_placement_group` frees it)", file=sys.stderr, flush=True)

    async def before_controller_shutdown(self) -> None:
        # (An abort, which removes the groups after its callbacks, ends the controller: the watcher
        # sees that.)
        if self._watcher is not None:
            self._watcher.finish.remote()
            self._watcher = None

