"""Run a validated search: start Ray, prepare the data once, run or resume the Tuner, report.

At the end it prints the best configuration (selected on validation SRCC only), its validation
and test SRCC/PLCC, where the results are, and the exact TensorBoard command; and it exports
``trials.parquet`` / ``epochs.parquet`` into the experiment folder (:mod:`iqa_ray.search.summary`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from iqa_ray.core.errors import LaunchError
from iqa_ray.core.io import atomic_write_json, git_revision
from iqa_ray.data.catalog import EMBEDDED
from iqa_ray.search.cluster import (
    check_cpus_per_trial,
    check_data_parallel_fits,
    cpus_per_worker,
    gpu_concurrency,
    init_ray,
    trial_workers,
)
from iqa_ray.search.encoders import prepare_encoders
from iqa_ray.search.ensemble import check_ensemble
from iqa_ray.search.mlflow_runs import log_summary, trial_runs
from iqa_ray.search.phases import Phases
from iqa_ray.search.settings import SearchSettings, default_dataset, resolve_gpus
from iqa_ray.search.summary import print_summary, skipped_line, summarise
from iqa_ray.search.tuner import build_tuner, restore_tuner, stop_epochs
from iqa_ray.trainables.placement import worker_device
from iqa_ray.training.config import TrainConfig

DRIVER_MEMORY_BYTES = 2**20  # what a data-parallel trial's driver asks for (it holds no CPU)
DRIVER_LOG = "driver.log"  # the driver's Ray/Optuna INFO lines, in the experiment folder


def prepare_dataset(settings: SearchSettings, smoke: bool) -> tuple[Any, str, list[dict[str, Any]]]:
    """Pre-generate (embedded, on Ray Data) if needed and decode the dataset once for all trials.

    Returns:
        The decoded dataset, the exact dataset spec it came from (for ``embedded``, the generated
        folder), which is what trial configs record, and the bad rows left out (``--skip-bad-rows``):
        the label table's, before the split is drawn, then any image that failed to decode.
    """
    from iqa_ray.core.paths import default_data_dir
    from iqa_ray.core.progress import progress_bar
    from iqa_ray.data.catalog import generated_table
    from iqa_ray.data.pregenerate.config import PregenConfig
    from iqa_ray.data.pregenerate.run import pregenerate
    from iqa_ray.training.loaders import decode_for, load_run_table

    config = TrainConfig.from_dict(settings.effective_study.constants())
    d = config.data
    if d.dataset == EMBEDDED:
        pregen = PregenConfig(sample=0.25) if smoke else PregenConfig()
        generated = pregenerate(pregen, default_data_dir(), engine="ray",
                                progress=lambda m: print(f"[pregenerate] {m}", flush=True), progress_bar=True)
        table = generated_table(generated.path, label=d.label)
        spec = str(generated.path)
    else:
        spec = d.dataset
        table = load_run_table(config, check_images=True)
    with progress_bar(len(table), "decoding") as bar:
        decoded = decode_for(config, table, progress=bar.update)
    skipped = skipped_rows(table, decoded)
    counts = decoded.table["split"].value_counts().to_dict()
    print(f"[data] {d.dataset}: {len(decoded.table)} images decoded once "
          f"({counts.get('train', 0)} train / {counts.get('val', 0)} val / {counts.get('test', 0)} test), "
          f"{decoded.nbytes / 1e6:.0f} MB shared with every trial", flush=True)
    if skipped:
        print(f"[data] {d.dataset}: {skipped_line(skipped)}; experiment.json and summary.json list every one",
              flush=True)
    return decoded, spec, skipped


def skipped_rows(table: Any, decoded: Any) -> list[dict[str, Any]]:
    """The rows a search left out: the label table's bad rows (``attrs["skipped"]``), then the images
    that failed to decode (each with its ``path``)."""
    rows = [dict(row) for row in table.attrs.get("skipped", [])]
    paths = table["path"].tolist() if "path" in table.columns else [None] * len(table)
    for row in decoded.skipped:
        rows.append({"file": table.attrs.get("label_file"), "row": None, "line": None, "image": row["image_id"],
                     "path": paths[row["row"]], "reason": row["reason"]})
    return rows


def write_experiment_info(settings: SearchSettings, args: argparse.Namespace) -> None:
    """``experiment.json``: how the search was set up, for exports and notebooks (local storage)."""
    local = settings.local_experiment_dir()
    if local is None:
        return
    study = settings.effective_study
    atomic_write_json(local / "experiment.json", {
        "study": study.name, "study_file": str(study.path) if study.path else None,
        "study_definition": study.definition, "metric": study.metric, "mode": study.mode,
        "objectives": [list(o) for o in study.objectives], "select": study.select,
        "searcher": settings.searcher, "trial_scheduler": settings.scheduler, "num_samples": settings.num_samples,
        "max_epochs": settings.max_epochs, "grace_period": settings.grace_period,
        "reduction_factor": settings.reduction_factor, "seed": settings.seed, "time_budget": settings.time_budget,
        "cpus_per_trial": settings.cpus_per_trial, "gpus_per_trial": settings.gpus_per_trial,
        "workers_per_trial": trial_workers(settings),
        "max_concurrent": settings.max_concurrent, "fixed": study.fixed, "encoders": study.encoders,
        "recipe": settings.recipe, "splits": settings.splits,
        "splits_train_on_val": settings.splits_train_on_val,
        "refit": settings.refit,
        **({"ensemble": settings.ensemble} if settings.ensemble else {}),  # absent: one trial handed back
        # Where --mlflow tracks the search (its MLflow experiment is named like it); a resume keeps it.
        "mlflow": {"tracking_uri": settings.mlflow, "experiment": settings.name} if settings.mlflow else None,
        # What --resume continues: the flags as given, and the overrides they resolved into (for
        # `embedded`, the generated folder, so a resume reads the same images without regenerating).
        "launch": {"dataset": args.dataset or default_dataset(settings.study, args.smoke_test), "set": dict(settings.sets),
                   "smoke_test": args.smoke_test, "skip_bad_rows": bool(getattr(args, "skip_bad_rows", False))},
        "overrides": dict(settings.overrides),
        # The bad rows the search left out of every split (skip_bad_rows): label file and row, image, reason.
        "skipped_rows": list(settings.skipped_rows),
        "params": [{"name": p.name, "role": p.role, "type": p.type, "low": p.low, "high": p.high,
                    "values": list(p.values), "grid": list(p.grid),
                    "range_by": [p.range_by[0], {str(k): list(v) for k, v in p.range_by[1].items()}] if p.range_by else None}
                   for p in study.params],
        "command": " ".join(sys.argv), "git_revision": git_revision(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def run_search(settings: SearchSettings, args: argparse.Namespace) -> int:
    """Start (or join) Ray, run or resume the search, print its summary.

    A Ray instance this call started is shut down after it; one it joined (``--address``, or one
    this process had started already) is left running for its owner.
    """
    check_ensemble(settings)
    if settings.local_experiment_dir() is not None and not args.resume:
        existing = settings.local_experiment_dir()
        if existing.exists() and any(existing.iterdir()):
            raise LaunchError(f"experiment {settings.name!r} already exists in {existing}; use --resume to continue "
                              "it or choose another --name")
    from iqa_ray.search.console import quiet_console

    phases = Phases()
    with contextlib.ExitStack() as stack:
        if not settings.verbose:  # Ray's and Optuna's INFO lines to a file, our trial table on the console
            stack.enter_context(quiet_console(driver_log_path(settings)))
        import ray

        owns_ray = not args.address and not ray.is_initialized()
        try:
            with phases("startup"):
                resources = init_ray(address=args.address, log_to_driver=settings.verbose)
        except ConnectionError as exc:
            if not args.address:
                raise
            raise LaunchError(str(exc)) from None
        settings, summary = _search(settings, args, resources, owns_ray=owns_ray, phases=phases)
    if settings.mlflow is not None:
        summary = log_summary(settings, summary)
    print_summary(settings, summary)
    return 0


def driver_log_path(settings: SearchSettings) -> Path:
    """Where the driver's Ray/Optuna INFO lines end up: the experiment folder (local storage), else a
    file in the temp folder named after the experiment."""
    local = settings.local_experiment_dir()
    if local is not None:
        return local / DRIVER_LOG
    return Path(tempfile.gettempdir()) / f"iqa-ray-{settings.name}-{DRIVER_LOG}"


def _search(settings: SearchSettings, args: argparse.Namespace, resources: dict[str, float], *,
            owns_ray: bool, phases: Phases) -> tuple[SearchSettings, dict[str, Any]]:
    """Everything between Ray's start and its shutdown (where ``owns_ray``): data, features, the Tuner,
    the summary, each phase timed in ``phases``."""
    import ray

    from iqa_ray.search.console import console_callbacks

    try:
        settings, share, node_cpus = _place_trials(settings, args, resources)
        with phases("decoding"):
            decoded, spec, skipped = prepare_dataset(settings, args.smoke_test)
            settings = replace(settings, skipped_rows=tuple(skipped))
            # Into the object store once: every trial and the final test scoring map this copy, and the
            # driver keeps only the reference (and the small label table, for --splits).
            table = decoded.table
            decoded_ref = ray.put(decoded)
            del decoded
        # One task on one node: as many CPUs as the largest node has (up to 4), never the cluster total.
        # One process each (a data-parallel trial's whole-GPU count is its workers', not theirs).
        one_gpu = min(share, 1.0)
        with phases("features"):
            features = prepare_features(settings, decoded_ref, cpus=max(node_cpus, default=1.0), gpus=one_gpu,
                                        n_images=len(table))
        # Studies with `pretraining = "ssl"` get their encoders now, before any trial is started.
        encoders = {}
        if settings.effective_study.encoder_backbones():
            with phases("encoders"):
                encoders = prepare_encoders(settings.effective_study, cpus=settings.cpus_per_trial, gpus=one_gpu,
                                            smoke=args.smoke_test)
        if encoders:
            settings = replace(settings, study=settings.study.with_encoders(encoders))
        if not args.resume:  # a resumed Tuner keeps the configs it was started with
            settings = replace(settings, overrides=tuple(sorted({**dict(settings.overrides), "dataset": spec}.items())))
            write_experiment_info(settings, args)
        trainable = make_trainable(settings, decoded_ref, features)
        with phases("search"):
            started = time.perf_counter()
            if args.resume:  # a restored Tuner keeps the callbacks it was built with (the console, MLflow's)
                tuner = restore_tuner(settings, trainable)
            else:
                tuner = build_tuner(settings, trainable, callbacks=[*console_callbacks(settings), *trial_runs(settings)])
            results = tuner.fit()
            elapsed = time.perf_counter() - started
        summary = summarise(settings, results, decoded_ref, elapsed, features=features, table=table, phases=phases)
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()
    return settings, summary


def _place_trials(settings: SearchSettings, args: argparse.Namespace,
                  resources: dict[str, float]) -> tuple[SearchSettings, float, list[float]]:
    """The settings with the trials' GPU share and concurrency resolved against the cluster (refused
    when the cluster cannot place them), printed; that GPU share, and the CPUs of each alive node."""
    import ray

    gpus, share = resolve_gpus(args, resources)
    cpus = float(resources.get("CPU", 1))
    node_cpus = [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    if settings.workers_per_trial > 1:
        share = 0.0  # --workers-per-trial N: CPU workers (GPU ones are --gpus-per-trial N)
    settings = replace(settings, gpus_per_trial=share, reuse_actors=len(node_cpus) <= 1)
    if trial_workers(settings) > 1:
        # Data-parallel workers are placed by Ray Train, not in the trial's request: checked and
        # capped here so that no trial waits forever for workers the cluster cannot place.
        settings = replace(settings, max_concurrent=check_data_parallel_fits(settings, node_cpus, gpus))
    else:
        check_cpus_per_trial(settings.cpus_per_trial, node_cpus)
        # --gpus N caps the GPUs the search uses: at most N / share trials run at once.
        settings = replace(settings, max_concurrent=gpu_concurrency(gpus, share, settings.max_concurrent))
    print("\n".join(settings.describe()), flush=True)
    print(f"[search] searcher={settings.searcher} trial_scheduler={settings.scheduler} samples={settings.num_samples} "
          f"max_epochs={settings.max_epochs} cpus/trial={settings.cpus_per_trial:g} gpus/trial={share:g} "
          f"workers/trial={trial_workers(settings)} "
          f"(cluster: {cpus:g} CPU, {float(resources.get('GPU', 0)):g} GPU)", flush=True)
    return settings, share, node_cpus


def make_trainable(settings: SearchSettings, decoded_ref: Any, features: Any) -> Any:
    """The search's trainable with its data and resources: an ordinary trial, or a data-parallel one
    (``--workers-per-trial N`` / ``--gpus-per-trial N``) whose workers Ray Train places."""
    import ray
    from ray import tune

    from iqa_ray.trainables.iqa import iqa_trainable

    workers = trial_workers(settings)
    if workers == 1:
        return tune.with_resources(
            tune.with_parameters(iqa_trainable, decoded=decoded_ref, resolve=settings.effective_study.resolve,
                                 cpus_per_trial=settings.cpus_per_trial, features=features,
                                 stop_epochs=stop_epochs(settings)),
            {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
        )
    from iqa_ray.trainables.ddp import SharedData, Workers, ddp_trainable

    shared = SharedData(decoded=decoded_ref, features=ray.put(features) if features is not None else None)
    spread = Workers(count=workers, cpus_per_worker=cpus_per_worker(settings),
                     gpus_per_worker=1.0 if settings.gpus_per_trial > 1 else 0.0)
    # The driver only waits on its workers' reports: it asks for no CPU, so the workers get every CPU
    # (a placement group cannot be empty: it asks for 1 MiB of Ray's memory resource instead).
    return tune.with_resources(
        tune.with_parameters(ddp_trainable, shared=shared, workers=spread, resolve=settings.effective_study.resolve,
                             stop_epochs=stop_epochs(settings), max_worker_failures=settings.max_failures,
                             experiment_path=settings.experiment_path()),
        {"cpu": 0, "memory": DRIVER_MEMORY_BYTES},
    )


def prepare_features(settings: SearchSettings, decoded: Any, *, cpus: float, gpus: float,
                     n_images: int | None = None) -> Any:
    """The dataset's frozen-backbone feature cache, computed once before any trial (``feature_cache``
    searches), else ``None``. One Ray task with up to 4 of one node's ``cpus`` (and a trial's GPU share)."""
    import ray

    from iqa_ray.core.progress import progress_bar
    from iqa_ray.training.features import feature_steps

    config = TrainConfig.from_dict(settings.effective_study.constants())
    if not config.data.feature_cache:
        return None
    threads = max(1, min(4, int(cpus)))
    started = time.perf_counter()

    def work(decoded_images: Any) -> Iterator[Any]:
        yield from feature_steps(decoded_images, config, worker_device(threads))

    # A streaming generator: the images done after each batch, then the cache itself.
    task = ray.remote(work).options(num_cpus=threads, num_gpus=gpus, max_retries=1, num_returns="streaming")
    features = None
    with progress_bar(n_images, f"features ({config.model.backbone})") as bar:
        for ref in task.remote(decoded):
            step = ray.get(ref)
            if isinstance(step, int):
                bar.update(step - bar.n)
            else:
                features = step
    mirrors = "" if features.flipped is None else " (and their mirror images)"
    print(f"[features] frozen {config.model.backbone} features of {len(features.plain)} images{mirrors} "
          f"computed once in {time.perf_counter() - started:.0f} s: {features.nbytes / 1e6:.1f} MB shared "
          "with every trial", flush=True)
    return features
