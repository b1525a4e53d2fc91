"""Run a validated search: start Ray, prepare the data once, run or resume the Tuner, report.

At the end it prints the best configuration (selected on validation SRCC only), its validation
and test SRCC/PLCC, where the results are, and the exact TensorBoard command; and it exports
``trials.parquet`` / ``epochs.parquet`` into the experiment folder.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from iqa_ray.core.io import atomic_write_json, git_revision
from iqa_ray.core.selection import kept_report, objective_values, pareto_flags, select_by_rule
from iqa_ray.data.catalog import EMBEDDED
from iqa_ray.search.encoders import prepare_encoders
from iqa_ray.search.refit import REFIT_FIT_ON
from iqa_ray.search.resources import (
    LaunchError,
    check_cpus_per_trial,
    check_data_parallel_fits,
    cpus_per_worker,
    experiment_dir_hint,
    gpu_concurrency,
    resolve_gpus,
    trial_workers,
)
from iqa_ray.search.tensorboard import tensorboard_command
from iqa_ray.search.tuner import (
    SearchSettings,
    build_tuner,
    close_orphaned_optuna_trials,
    restore_tuner,
    stop_epochs,
)
from iqa_ray.trainables.placement import worker_device
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.features import probe_features

DRIVER_MEMORY_BYTES = 2**20  # what a data-parallel trial's driver asks for (it holds no CPU)
DRIVER_LOG = "driver.log"  # the driver's Ray/Optuna INFO lines, in the experiment folder
PROBE = "linear_probe"  # the summary's name for the frozen-feature linear probe baseline


def prepare_dataset(settings: SearchSettings, smoke: bool) -> tuple[Any, str]:
    """Pre-generate (embedded, on Ray Data) if needed and decode the dataset once for all trials.

    Returns:
        The decoded dataset and the exact dataset spec it came from (for ``embedded``, the
        generated folder), which is what trial configs record.
    """
    from iqa_ray.core.paths import default_data_dir
    from iqa_ray.core.progress import progress_bar
    from iqa_ray.data.catalog import generated_table
    from iqa_ray.data.pregenerate import PregenConfig, pregenerate
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
        table = load_run_table(config)
    with progress_bar(len(table), "decoding") as bar:
        decoded = decode_for(config, table, progress=bar.update)
    counts = decoded.table["split"].value_counts().to_dict()
    print(f"[data] {d.dataset}: {len(decoded.table)} images decoded once "
          f"({counts.get('train', 0)} train / {counts.get('val', 0)} val / {counts.get('test', 0)} test), "
          f"{decoded.nbytes / 1e6:.0f} MB shared with every trial", flush=True)
    return decoded, spec


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
        # What --resume continues: the flags as given, and the overrides they resolved into (for
        # `embedded`, the generated folder, so a resume reads the same images without regenerating).
        "launch": {"dataset": args.dataset or EMBEDDED, "set": dict(settings.sets), "smoke_test": args.smoke_test},
        "overrides": dict(settings.overrides),
        "params": [{"name": p.name, "role": p.role, "type": p.type, "low": p.low, "high": p.high,
                    "values": list(p.values), "grid": list(p.grid),
                    "range_by": [p.range_by[0], {str(k): list(v) for k, v in p.range_by[1].items()}] if p.range_by else None}
                   for p in study.params],
        "command": " ".join(sys.argv), "git_revision": git_revision(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def run_search(settings: SearchSettings, args: argparse.Namespace) -> int:
    from iqa_ray.search.cluster import init_ray

    if settings.local_experiment_dir() is not None and not args.resume:
        existing = settings.local_experiment_dir()
        if existing.exists() and any(existing.iterdir()):
            raise LaunchError(f"experiment {settings.name!r} already exists in {existing}; use --resume to continue "
                              "it or choose another --name")
    from iqa_ray.search.console import quiet_console

    with contextlib.ExitStack() as stack:
        if not settings.verbose:  # Ray's and Optuna's INFO lines to a file, our trial table on the console
            stack.enter_context(quiet_console(driver_log_path(settings)))
        try:
            resources = init_ray(address=args.address, log_to_driver=settings.verbose)
        except ConnectionError as exc:
            if not args.address:
                raise
            raise LaunchError(str(exc)) from None
        settings, summary = _search(settings, args, resources)
    print_summary(settings, summary)
    return 0


def driver_log_path(settings: SearchSettings) -> Path:
    """Where the driver's Ray/Optuna INFO lines end up: the experiment folder (local storage), else a
    file in the temp folder named after the experiment."""
    local = settings.local_experiment_dir()
    if local is not None:
        return local / DRIVER_LOG
    return Path(tempfile.gettempdir()) / f"iqa-ray-{settings.name}-{DRIVER_LOG}"


def _search(settings: SearchSettings, args: argparse.Namespace, resources: dict[str, float]) -> tuple[SearchSettings, dict[str, Any]]:
    """Everything between Ray's start and its shutdown: data, features, the Tuner, the summary."""
    import ray

    from iqa_ray.search.console import console_callbacks

    try:
        gpus, share = resolve_gpus(args, resources)
        cpus = float(resources.get("CPU", 1))
        node_cpus = [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        if settings.workers_per_trial > 1:
            share = 0.0  # --workers-per-trial N: CPU workers (GPU ones are --gpus-per-trial N)
        settings = replace(settings, gpus_per_trial=share)
        if trial_workers(settings) > 1:
            # Data-parallel workers are placed by Ray Train, not in the trial's request: checked and
            # capped here so that no trial waits forever for workers the cluster cannot place.
            settings = replace(settings, max_concurrent=check_data_parallel_fits(settings, node_cpus, gpus))
        else:
            check_cpus_per_trial(settings.cpus_per_trial, node_cpus)
            # --gpus N caps the GPUs the search uses: at most N / share trials run at once.
            settings = replace(settings, max_concurrent=gpu_concurrency(gpus, share, settings.max_concurrent))
        print("\n".join([*settings.recipe_lines, *settings.effective_study.describe()]), flush=True)
        print(f"[search] searcher={settings.searcher} trial_scheduler={settings.scheduler} samples={settings.num_samples} "
              f"max_epochs={settings.max_epochs} cpus/trial={settings.cpus_per_trial:g} gpus/trial={share:g} "
              f"workers/trial={trial_workers(settings)} "
              f"(cluster: {cpus:g} CPU, {float(resources.get('GPU', 0)):g} GPU)", flush=True)
        decoded, spec = prepare_dataset(settings, args.smoke_test)
        # Into the object store once: every trial and the final test scoring map this copy, and the
        # driver keeps only the reference (and the small label table, for --splits).
        table = decoded.table
        decoded_ref = ray.put(decoded)
        del decoded
        # One task on one node: as many CPUs as the largest node has (up to 4), never the cluster total.
        # One process each (a data-parallel trial's whole-GPU count is its workers', not theirs).
        one_gpu = min(share, 1.0)
        features = prepare_features(settings, decoded_ref, cpus=max(node_cpus, default=1.0), gpus=one_gpu,
                                    n_images=len(table))
        # Studies with `pretraining = "ssl"` get their encoders now, before any trial is started.
        encoders = prepare_encoders(settings.effective_study, cpus=settings.cpus_per_trial, gpus=one_gpu,
                                    smoke=args.smoke_test)
        if encoders:
            settings = replace(settings, study=settings.study.with_encoders(encoders))
        if not args.resume:  # a resumed Tuner keeps the configs it was started with
            settings = replace(settings, overrides=tuple(sorted({**dict(settings.overrides), "dataset": spec}.items())))
            write_experiment_info(settings, args)
        trainable = make_trainable(settings, decoded_ref, features)
        started = time.perf_counter()
        tuner = (restore_tuner(settings, trainable) if args.resume
                 else build_tuner(settings, trainable, callbacks=console_callbacks(settings)))
        results = tuner.fit()
        elapsed = time.perf_counter() - started
        summary = summarise(settings, results, decoded_ref, elapsed, features=features, table=table)
    finally:
        if ray.is_initialized() and not args.address:
            ray.shutdown()
    return settings, summary


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


def summarise(settings: SearchSettings, results: Any, decoded: Any, elapsed: float, *, features: Any = None,
              table: Any = None) -> dict[str, Any]:
    """Select the trial to hand back (validation only), score it on the test split once, set it
    beside the baselines, re-train it on ``settings.splits`` more splits, export.

    Args:
        settings: the search's settings (the study's metric and mode select).
        results: Tune's ResultGrid.
        decoded: the decoded dataset or its object-store reference (the test split is scored from it).
        elapsed: seconds the search took.
        features: the shared feature cache (``feature_cache`` searches), reused by the probe and the splits.
        table: the decoded dataset's label table (``--splits`` draws the other splits of its rows).
    """
    from iqa_ray.search.export import export_experiment

    study = settings.effective_study
    errors = [r for r in results if r.error is not None]
    reports = {}
    for r in results:
        frame = r.metrics_dataframe
        if frame is not None and len(frame):
            reports[r.metrics.get("trial_id") or r.path] = (r, frame.to_dict("records"))
    if not reports:
        raise LaunchError(f"no trial reported any epoch ({len(errors)} errored); see {experiment_dir_hint(settings)}")
    rule = study.selection_rule
    chosen = select_by_rule({k: rows for k, (_, rows) in reports.items()}, rule)
    local = settings.local_experiment_dir()
    if chosen is None:
        if local is not None:  # every finished trial stays readable in the exports (no trial selected)
            close_orphaned_optuna_trials(local / "optuna.db")
            export_experiment(local)
        if rule.rule == "budget":
            seen = {k: objective_values(rows, [(c, "min") for c, _ in rule.budgets]) for k, (_, rows) in reports.items()}
            cheapest = {c: min((v[i] for v in seen.values() if v is not None), default=None)
                        for i, (c, _) in enumerate(rule.budgets)}
            raise LaunchError(f"no trial fits the selection rule {rule.describe()} (the cheapest trials: "
                              + ", ".join(f"{c} = {v:.4g}" if v is not None else f"{c} not reported" for c, v in cheapest.items())
                              + f"); every trial is kept in {experiment_dir_hint(settings)}; search again with a larger "
                              "budget (--select) or cheaper models")
        raise LaunchError(f"no trial reported a finite {study.metric} ({len(reports)} reported, {len(errors)} errored; "
                          f"every model diverged or predicted constants); see {experiment_dir_hint(settings)}")
    best, rows = reports[chosen]
    best_row = kept_report(rows) or max(rows, key=lambda row: _selection_value(row.get(study.metric), study.mode))
    # The split and refit runs train single-process trials: one GPU at most each.
    single = replace(settings, gpus_per_trial=min(settings.gpus_per_trial, 1.0), workers_per_trial=1)
    handed, refit = hand_back(single, best, study.resolve(best.config), decoded, features)
    test, test_error = {}, None
    if handed.checkpoint is None:
        test_error = "the selected trial left no checkpoint"
    else:
        test = score_test_split(handed.checkpoint, decoded, cpus=settings.cpus_per_trial,
                                gpus=min(settings.gpus_per_trial, 1.0))
        if not test:
            test_error = "the dataset has no test split"
    config = study.reported_config(best.config)
    baselines, baselines_error = {}, None
    if test:
        try:  # a baseline that cannot run (e.g. hub weights offline) must not lose the finished search
            baselines = score_baselines(TrainConfig.from_dict(study.resolve(best.config)), decoded,
                                        cpus=settings.cpus_per_trial, gpus=min(settings.gpus_per_trial, 1.0),
                                        features=features, refit=bool(refit.get("trial")))
        except Exception as exc:  # noqa: BLE001 - reported in the summary and printed, not swallowed
            baselines_error = f"{type(exc).__name__}: {exc}"
    summary = {
        "study": settings.study.name, "experiment": experiment_dir_hint(settings), "git_revision": git_revision(),
        "searcher": settings.searcher, "trial_scheduler": settings.scheduler, "trials": len(results),
        "errored_trials": len(errors), "elapsed_s": round(elapsed, 1),
        "metric": study.metric, "mode": study.mode,
        "best_trial": best.path.rsplit("/", 1)[-1] if best.path else None,
        "best_config": {k: v for k, v in config.items()},
        "best_val": {"srcc": float(best_row["val_srcc"]), "plcc": float(best_row["val_plcc"]),
                     "epoch": int(best_row["epoch"]), study.metric: float(best_row[study.metric])},
        "best_trial_id": best.metrics.get("trial_id"),
        # The model handed back (score / load_model / export-model / evaluate read it): the refit's
        # trial folder, or the selected trial's.
        "model": refit.get("trial") or (best.path.rsplit("/", 1)[-1] if best.path else None),
        "refit": refit, "test": test,
        "test_source": (f"the selected configuration re-trained on {REFIT_FIT_ON} ({refit['trial']}), its final "
                        "weights, scored once after the search" if refit.get("trial") else
                        "the selected trial's kept weights (chosen by validation, or its final ones), scored once "
                        "after the search"),
        # Validation SRCC of the selected epoch minus its test SRCC: how much the pick flatters itself.
        "val_test_gap": float(best_row["val_srcc"]) - test["srcc"] if test else None,
        "baselines": baselines,
    }
    if study.multi_objective or study.select != "best":
        summary.update(objectives=[list(o) for o in study.objectives], select=study.select,
                       selection_rule=rule.describe(), pareto_front=pareto_front(reports, study.objectives))
    if baselines.get(PROBE):
        summary["versus_probe"] = test["srcc"] - baselines[PROBE]["srcc"]
    if test_error:
        summary["test_error"] = test_error
    if baselines_error:
        summary["baselines_error"] = baselines_error
    if settings.splits and best.checkpoint is not None:
        from iqa_ray.search.splits import run_splits

        summary["splits"] = run_splits(single, study.resolve(best.config), decoded, table, features=features)
    if local is not None:
        close_orphaned_optuna_trials(local / "optuna.db")
        atomic_write_json(local / "summary.json", summary)  # read by the export (selected trial)
        summary["exports"] = {k: str(v) for k, v in export_experiment(local).items()}
    else:
        summary["exports"] = {}
    return summary


def hand_back(settings: SearchSettings, best: Any, resolved: dict[str, Any], decoded: Any,
              features: Any) -> tuple[Any, dict[str, Any]]:
    """The model the search hands back: a refit of the selected configuration on training and
    validation photos where it chooses nothing on validation (:mod:`iqa_ray.search.refit`), else the
    selected trial itself. A refit that fails hands back the selected trial, with the error recorded.

    Returns:
        The Tune result whose checkpoint is handed back, and ``summary.json``'s ``refit``.
    """
    from iqa_ray.search.refit import refit_folder, refit_plan, run_refit

    planned, why = refit_plan(settings, TrainConfig.from_dict(resolved))
    report: dict[str, Any] = {"planned": planned, "model": why}
    if not planned or best.checkpoint is None:
        return best, report
    print(f"[refit] {why}: one more trial, the model handed back", flush=True)
    try:  # the search has finished: whatever the refit does, its selected trial is kept and handed back
        result = run_refit(settings, resolved, decoded, features=features)
        failure = result.error if result.error is not None else (None if result.checkpoint is not None else "")
    except Exception as exc:  # noqa: BLE001 - printed and recorded in summary.json, not swallowed
        result, failure = None, exc
    if failure is not None:
        problem = f"{type(failure).__name__}: {failure}" if failure != "" else "it left no checkpoint"
        print(f"[refit] failed ({problem}); the selected trial's own weights are handed back", flush=True)
        report.update(error=problem, model="the selected trial's own weights (the refit failed)")
        return best, report
    epochs = result.metrics.get("epoch")
    report.update(trial=refit_folder(result), epochs=int(epochs) if epochs is not None else None)
    return result, report


def pareto_front(reports: dict[str, tuple[Any, list[dict[str, Any]]]], objectives: Any) -> list[dict[str, Any]]:
    """The Pareto-optimal trials: id and each objective's value at the kept epoch, best primary first."""
    points = {k: objective_values(rows, objectives) for k, (_, rows) in reports.items()}
    flags = pareto_flags(points, [d for _, d in objectives])
    front = [{"trial_id": k, **dict(zip((m for m, _ in objectives), points[k]))} for k, on in flags.items() if on]
    primary, mode = objectives[0]
    return sorted(front, key=lambda r: -r[primary] if mode == "max" else r[primary])


def _selection_value(value: Any, mode: str) -> float:
    """A report's metric value for max(); non-finite values never win."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return -math.inf
    return float(value) if mode == "max" else -float(value)


def _score_checkpoint(checkpoint: Any, decoded: Any, threads: int) -> dict[str, float]:
    """The best-by-validation weights of a checkpoint, scored on test (empty without a test split)."""
    from iqa_ray.training.checkpoints import model_from_checkpoint
    from iqa_ray.training.device import autocast_dtype
    from iqa_ray.training.inference import evaluate
    from iqa_ray.training.loaders import eval_dataset, eval_loader

    device = worker_device(threads)
    if not (decoded.table["split"] == "test").any():
        return {}
    with checkpoint.as_directory() as directory:  # local folder or a download from remote storage
        model, config = model_from_checkpoint(directory, device=device)
    loader = eval_loader(config, eval_dataset(config, decoded, "test"))
    return {**evaluate(model, loader, device, autocast_dtype(config.optim.amp, device), chunk=config.data.eval_chunk),
            "n": len(loader.dataset)}


def _score_baseline(name: str, config: TrainConfig, decoded: Any, threads: int, features: Any = None,
                    refit: bool = False) -> dict[str, Any]:
    from iqa_ray.evaluation.baselines import classical_baseline, probe_baseline

    device = worker_device(threads)
    if name != PROBE:
        return classical_baseline(decoded, name)
    m = config.model
    return probe_baseline(decoded, backbone=m.backbone, pretrained=str(m.pretrained),
                          img_size=m.img_size or config.data.crop_size, device=device,
                          features=probe_features(features, config), refit=refit)


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


def score_baselines(config: TrainConfig, decoded: Any, *, cpus: float, gpus: float,
                    features: Any = None, refit: bool = False) -> dict[str, dict[str, Any]]:
    """PIQE, BRISQUE and the linear probe on the frozen backbone of ``config``, on the test split
    (``refit``: the probe fitted again on training and validation photos, beside a refit model).

    One Ray task per baseline, side by side, each with one trial's resources and reading the
    dataset's object-store copy, like :func:`score_test_split`.
    """
    import ray

    from iqa_ray.evaluation.baselines import BASELINES

    task = ray.remote(_score_baseline).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
    names = [PROBE, *BASELINES]
    results = ray.get([task.remote(name, config, decoded, int(cpus), features if name == PROBE else None, refit)
                       for name in names])
    return dict(zip(names, results))


def score_test_split(checkpoint: Any, decoded: Any, *, cpus: float, gpus: float) -> dict[str, float]:
    """Score the selected trial's best-by-validation weights on the test split, once.

    Runs as a Ray task with one trial's resources (its GPU share on a GPU cluster), reading the
    dataset the trials read from the object store (pass its reference: no second copy).
    """
    import ray

    task = ray.remote(_score_checkpoint).options(num_cpus=cpus, num_gpus=gpus, max_retries=1)
    return ray.get(task.remote(checkpoint, decoded, int(cpus)))


def baseline_lines(s: dict[str, Any]) -> list[str]:
    """The summary's baseline lines: each baseline on the same test photos, and the verdict."""
    b = s.get("baselines") or {}
    lines = []
    if b:
        probe = b[PROBE]
        lines.append(f"baselines on the same {probe['n']} test photos:")
        lines.append(f"  linear probe ({probe['backbone']}, {probe['pretrained']} weights, frozen; every stage pooled, "
                     f"ridge alpha {probe['alpha']:g} chosen on validation"
                     + (", then fitted on training and validation photos like the model" if probe.get("refit") else "")
                     + f"): SRCC {probe['srcc']:.4f}  PLCC {probe['plcc']:.4f}")
        for name in ("piqe", "brisque"):
            lines.append(f"  {name.upper()}: SRCC {b[name]['srcc']:.4f}  PLCC {b[name]['plcc']:.4f}")
        margin = s["versus_probe"]
        lines.append(f"the model handed back beats the probe by {margin:+.4f} SRCC" if margin > 0
                     else f"the model handed back does not beat the probe ({margin:+.4f} SRCC)")
    elif s.get("baselines_error"):
        lines.append(f"baselines could not be computed: {s['baselines_error']}")
    return lines


def print_summary(settings: SearchSettings, s: dict[str, Any]) -> None:
    print("\n" + "=" * 78)
    print(f"study {s['study']}: {s['trials']} trials ({s['errored_trials']} errored) in {s['elapsed_s']:.0f} s, "
          f"searcher={s['searcher']}, trial_scheduler={s['trial_scheduler']}")
    if s.get("pareto_front"):
        names = [m for m, _ in s["objectives"]]
        print(f"Pareto front ({len(s['pareto_front'])} trials; " + " / ".join(f"{m} ({d})" for m, d in s["objectives"]) + "):")
        for row in s["pareto_front"]:
            mark = "  <- selected" if row["trial_id"] == s["best_trial_id"] else ""
            print("  " + row["trial_id"] + "  " + "  ".join(f"{m} {row[m]:.4g}" for m in names) + mark)
        print(f"best config (selected on validation only: {s['selection_rule']}):")
    else:
        print("best config (selected on validation SRCC):")
    searched = {p.name for p in settings.study.params}
    for k in sorted(s["best_config"]):
        if k in searched:
            print(f"  {k} = {s['best_config'][k]}")
    if s["best_val"]:
        print(f"validation: SRCC {s['best_val']['srcc']:.4f}  PLCC {s['best_val']['plcc']:.4f}  (epoch {s['best_val']['epoch']})")
    refit = s.get("refit") or {}
    if refit.get("model"):
        print(f"model handed back: {refit['model']}" + (f" ({refit['trial']})" if refit.get("trial") else ""))
    if s["test"]:
        print(f"test (the model handed back, held-out photos): SRCC {s['test']['srcc']:.4f}  PLCC {s['test']['plcc']:.4f}  "
              f"(selected trial's validation SRCC - test SRCC = {s['val_test_gap']:+.4f})")
    for line in baseline_lines(s):
        print(line)
    from iqa_ray.search.splits import split_lines

    for line in split_lines(s.get("splits") or {}):
        print(line)
    print(f"results: {s['experiment']}")
    for name, path in s["exports"].items():
        print(f"  {name}: {path}")
    if not s["exports"]:
        print("  (remote storage: copy the experiment folder locally, then `iqa-ray export FOLDER` "
              "writes trials.parquet / epochs.parquet)")
    print(f"TensorBoard: {tensorboard_command(s['experiment'])}")
    print("=" * 78)

