"""Data-parallel trials: one Tune trial trains on several workers through Ray Train.

The trial's function (the *driver*, :func:`ddp_trainable`) holds no resources of its own: it
starts a :class:`~ray.train.torch.TorchTrainer` whose workers (one per GPU with ``--gpus-per-trial
N``, or ``--workers-per-trial N`` CPU workers on gloo) each run the engine's ``fit`` with a
:class:`~iqa_ray.training.parallel.DataParallel` share of every global batch. Rank 0's reports reach the
trial through a queue and are reported to Tune with the same metric names and the same
``checkpoint.pt`` as :func:`~iqa_ray.trainables.iqa.iqa_trainable`, so ASHA, Optuna, the export,
selection and TensorBoard see an ordinary trial.

Each worker computes on its GPU where it has CUDA and on the CPU where it has none (a node that
declares GPUs it does not have), and the workers start their ``torch.distributed`` process group
themselves, in :func:`train_worker` (NCCL on CUDA, gloo on the CPU), so that a group that cannot
start is an ordinary failure of the training function (:mod:`iqa_ray.trainables.process_group`).

Failures are handled twice: a worker that dies restarts the worker group from the latest
checkpoint of the run (Ray Train's ``FailureConfig``; the epochs after it are trained again and
reach Tune once); a driver that dies (or a resumed search) starts again from the trial's Tune
checkpoint, handed to the workers as their starting point. Each report waits until Tune has
taken it (and copied its checkpoint), so the run never runs ahead of ASHA's decisions and Ray
Train's single kept checkpoint is never deleted before Tune has its copy.

The decoded dataset and the feature cache reach the workers as object-store references
(:class:`SharedData`): every worker on a node maps the same buffer, as trials do.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from iqa_ray.trainables.iqa import nonfinite_marker, process_report, trial_cost, with_split
from iqa_ray.trainables.placement import device_report
from iqa_ray.trainables.process_group import WorkerProcessGroup, start_process_group, train_device
from iqa_ray.trainables.worker_group import WatchWorkerGroup
from iqa_ray.training.checkpoints import load_checkpoint
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.engine import EpochResult, fit
from iqa_ray.training.parallel import DataParallel

_END = "__end__"


@dataclass(frozen=True)
class SharedData:
    """Object-store references the workers read: the decoded dataset and the feature cache."""

    decoded: Any  # ray.ObjectRef of a DecodedImages
    features: Any = None  # ray.ObjectRef of a FeatureCache, or None


@dataclass(frozen=True)
class Workers:
    """How one data-parallel trial is spread: ``count`` workers, each with these resources."""

    count: int
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"a data-parallel trial needs at least 1 worker, got {self.count}")
        if self.gpus_per_worker not in (0, 1):
            raise ValueError(f"a data-parallel worker holds no GPU or one whole GPU, got {self.gpus_per_worker}")


def train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the engine's ``fit`` on this worker's share, reporting every epoch.

    Every rank reports (Ray Train waits for all of them); only rank 0 writes and passes checkpoints.
    """
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = train_device()
    torch.set_num_threads(max(1, int(loop_config["cpus_per_worker"])))
    # First, so that a group that cannot start fails the worker before it loads anything.
    backend = start_process_group(rank, world, device) if world > 1 else "none"
    try:
        _train_share(loop_config, rank, world, device, backend)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train_share(loop_config: dict[str, Any], rank: int, world: int, device: Any, backend: str) -> None:
    """:func:`train_worker` once its process group is up: the engine's ``fit`` on this worker's share."""
    import ray
    import ray.train

    shared: SharedData = loop_config["shared"]
    decoded = ray.get(shared.decoded)
    features = ray.get(shared.features) if shared.features is not None else None
    train_config = TrainConfig.from_dict(loop_config["flat"])
    decoded = with_split(decoded, train_config.data.split_seed, loop_config["splits"])

    # The run's latest checkpoint after a worker failure, else the trial's (a resumed trial).
    checkpoint = ray.train.get_checkpoint() or loop_config["start_checkpoint"]
    resume_state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume_state = load_checkpoint(directory)
    # Every rank reports its device and GPU (the driver forwards each rank's, search/console.py notes
    # a GPU worker without CUDA once) and the process group's backend.
    node = process_report(resume_state, workers=world, process_group=backend, **device_report(device))
    if rank == 0:  # the model's cost on one worker's device, as an ordinary trial measures it (the
        # driver forwards rank 0's reports; the other workers wait at their first collective)
        node.update(trial_cost(train_config, decoded, device))
    must_checkpoint = set(loop_config["stop_epochs"])

    def report(epoch: EpochResult) -> None:
        metrics = {**epoch.metrics, **node}
        if rank == 0 and (epoch.checkpoint_due or epoch.epoch + 1 in must_checkpoint):
            with tempfile.TemporaryDirectory() as directory:
                epoch.save(directory)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)

    fit(train_config, decoded, device=device, resume=resume_state, on_epoch_end=report,
        score_test=loop_config["score_test"], features=features, cpus=max(1, int(loop_config["cpus_per_worker"])),
        data_parallel=DataParallel(rank=rank, world_size=world) if world > 1 else None)


def _forward_to(reports: Any, taken: Any) -> Any:
    """A Ray Train callback (it runs in the run's controller) that hands rank 0's reports to the driver
    and waits until the driver has reported them to Tune."""
    from ray.train.v2.api.callback import UserCallback

    class ForwardReports(UserCallback):
        def __init__(self, target: Any, done: Any) -> None:
            self.target, self.done = target, done

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            report = dict(metrics[0])
            # every rank's process, and the GPU Ray gave it (";" between ranks: a rank may hold several)
            report["worker_pids"] = ",".join(str(m.get("pid")) for m in metrics)
            report["worker_gpu_ids"] = ";".join(str(m.get("gpu_ids", "")) for m in metrics)
            self.target.put((report, checkpoint))
            # Until Tune has it: the run keeps pace with Tune's scheduler, and this checkpoint (the
            # run keeps one) is not replaced before Tune copied it into the trial's folder.
            self.done.get()

    return ForwardReports(reports, taken)


def ddp_trainable(
    config: Mapping[str, Any],
    *,
    shared: SharedData,
    workers: Workers,
    resolve: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
    splits: Mapping[int, Any] | None = None,
    score_test: bool = False,
    stop_epochs: Sequence[int] = (),
    max_worker_failures: int = 2,
    experiment_path: str | None = None,
) -> None:
    """Train one trial data-parallel on ``workers`` and report every epoch to Tune.

    Args:
        config: the trial's config from the search space (as for ``iqa_trainable``).
        shared: object-store references of the decoded dataset and the feature cache.
        workers: the worker count and each worker's CPUs and GPU.
        resolve: maps a trial config to flat :class:`~iqa_ray.training.config.TrainConfig` keys.
        splits: split seed -> split names of every row (``--splits`` runs), as for ``iqa_trainable``.
        score_test: score the kept weights on the test split at the end.
        stop_epochs: epochs (from 1) reported with a checkpoint whatever ``checkpoint_every``.
        max_worker_failures: restarts of the worker group from the run's latest checkpoint.
        experiment_path: the search's experiment folder (local or a URI): Ray Train keeps its
            run under the trial's folder there, where every worker can write (default: the
            trial's local folder).
    """
    from ray import tune
    from ray.util.queue import Queue

    flat = resolve(config) if resolve is not None else dict(config)
    TrainConfig.from_dict(flat)  # a bad config fails here, not in every worker
    context = tune.get_context()
    trial_dir = Path(context.get_trial_dir())
    marker = nonfinite_marker(trial_dir)

    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    taken = Queue(maxsize=1, actor_options={"num_cpus": 0})
    train_root, local_root = _fresh_run_root(experiment_path, trial_dir)
    trainer = _trainer(
        workers, train_root, max_worker_failures, [_forward_to(reports, taken), WatchWorkerGroup()],
        {"flat": flat, "shared": shared, "splits": splits, "score_test": score_test,
         "stop_epochs": list(stop_epochs), "cpus_per_worker": workers.cpus_per_worker,
         "start_checkpoint": tune.get_checkpoint()})
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the driver thread and raised there
            outcome["error"] = exc
        finally:
            reports.put((_END, None))

    thread = threading.Thread(target=run, name="ddp-trainer", daemon=True)
    thread.start()
    _report_to_tune(reports, taken)
    thread.join()
    if "error" not in outcome:
        if local_root is not None and local_root.exists():
            shutil.rmtree(local_root)  # Tune holds the checkpoint; the run's copy is a duplicate
    error = outcome.get("error")
    if error is not None:
        text = str(error)
        if "NonFiniteLossError" in text:  # a retry would fail the same way (runs are seeded)
            marker.write_text(json.dumps({"message": f"trial {context.get_trial_name()}: {text}"}))
        raise RuntimeError(f"data-parallel trial {context.get_trial_name()} failed: {text}") from error


def _fresh_run_root(experiment_path: str | None, trial_dir: Path) -> tuple[str, Path | None]:
    """Where Ray Train keeps this trial's runs (under the trial's folder in the experiment), and that
    folder on this machine (``None`` on remote storage), emptied of an earlier start's runs."""
    train_root = f"{experiment_path.rstrip('/')}/{trial_dir.name}/ddp" if experiment_path else str(trial_dir / "ddp")
    local_root = None if "://" in train_root and not train_root.startswith("file://") else Path(
        train_root.removeprefix("file://"))
    if local_root is not None and local_root.exists():
        # The runs of an earlier start of this trial (a driver restarted by Tune, or --resume):
        # it resumes from the trial's own checkpoint, so their copies are not needed.
        shutil.rmtree(local_root)
    return train_root, local_root


def _trainer(workers: Workers, train_root: str, max_worker_failures: int, callbacks: list[Any],
             loop_config: dict[str, Any]) -> Any:
    """The trial's :class:`~ray.train.torch.TorchTrainer`: ``workers`` running :func:`train_worker`,
    restarted from the run's latest checkpoint up to ``max_worker_failures`` times."""
    import ray.train
    from ray.train.torch import TorchTrainer

    use_gpu = workers.gpus_per_worker > 0
    resources = {"CPU": workers.cpus_per_worker, **({"GPU": workers.gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers.count, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        # The workers start their process group themselves, on the backend their devices allow.
        torch_config=WorkerProcessGroup(),
        run_config=ray.train.RunConfig(
            # A fresh run per driver start: a restarted driver resumes from the trial's checkpoint.
            name=f"ddp-{os.getpid()}-{os.urandom(3).hex()}", storage_path=train_root,
            failure_config=ray.train.FailureConfig(max_failures=max_worker_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=callbacks),
    )


def _report_to_tune(reports: Any, taken: Any) -> None:
    """Report rank 0's epochs to Tune as they arrive, until the run ends; each report is
    acknowledged (``taken``) once Tune has it."""
    from ray import tune
    from ray.util.queue import Empty

    last_epoch = 0
    while True:
        try:
            metrics, checkpoint = reports.get(timeout=1.0)
        except Empty:
            continue
        if metrics == _END:
            break
        try:
            if metrics["epoch"] <= last_epoch:
                # A restarted worker group re-trains the epochs after the run's latest checkpoint;
                # Tune counts reports as epochs, so each epoch reaches it once (training is seeded
                # per epoch: the re-trained epoch is the same).
                continue
            last_epoch = metrics["epoch"]
            if checkpoint is None:
                tune.report(metrics)
            else:  # Tune copies it into the trial's folder, as an ordinary trial's checkpoint
                tune.report(metrics, checkpoint=tune.Checkpoint(path=checkpoint.path,
                                                                filesystem=checkpoint.filesystem))
        finally:
            taken.put(True)
