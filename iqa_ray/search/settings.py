"""A search's settings (:class:`SearchSettings`: the study plus how to run it) from its command
line: every flag checked, the study, recipe and ``--set`` values resolved, or, with ``--resume``,
the recorded experiment's settings.

Everything that can be rejected is rejected here, before Ray starts or any trial runs: the study
file, flag values, GPU shares, a ``--resume`` of an experiment that does not exist (an
unreachable ``--address`` is refused by :func:`iqa_ray.search.cluster.check_address`, and a request
for more GPUs than the cluster has by :func:`resolve_gpus` once Ray is up, before any trial starts).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from iqa_ray.core.deprecations import CONFIG, SEARCH, renamed_keys
from iqa_ray.core.errors import LaunchError
from iqa_ray.core.paths import default_results_dir
from iqa_ray.data.catalog import EMBEDDED
from iqa_ray.models.weights import check_weights
from iqa_ray.search.mlflow_store import LOCAL, check_new_experiment, require_mlflow, resumed_uri, tracking_uri
from iqa_ray.search.recipe import apply_recipe, dataset_adapter, foreign_family_keys, parse_recipe, resolve_recipe
from iqa_ray.search.study import MODEL_KEYS, SEARCHERS, TRIAL_SCHEDULERS, Study, StudyError
from iqa_ray.search.study_file import budget_problem, load_study, parse_study
from iqa_ray.training.config import TrainConfig

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def check_experiment_name(name: str) -> str:
    """Experiment names become folder names: letters, digits, ``_ . -`` only, no path parts."""
    if not _SAFE_NAME.match(name) or name in (".", ".."):
        raise StudyError(f"experiment name {name!r} must match {_SAFE_NAME.pattern} (it becomes a folder name)")
    return name


DEFAULT_PROGRESS_EVERY_S = 30.0  # seconds between the live trial tables of a search


@dataclass(frozen=True)
class SearchSettings:
    """Everything the launcher decided: the study plus how to run it."""

    study: Study
    name: str
    storage: str
    searcher: str
    scheduler: str
    num_samples: int
    max_epochs: int
    grace_period: int
    reduction_factor: int
    max_concurrent: int | None
    cpus_per_trial: float
    gpus_per_trial: float
    seed: int
    max_failures: int = 2
    workers_per_trial: int = 1  # CPU data-parallel workers per trial (GPU ones: gpus_per_trial > 1)
    overrides: tuple[tuple[str, Any], ...] = ()
    sets: tuple[tuple[str, Any], ...] = ()  # the --set values as given (parsed once), recorded for --resume
    splits: int = 0  # re-train the selected config on this many more random splits after the search
    splits_train_on_val: bool = True  # split runs train on train+val where the config chooses nothing on val
    refit: bool = True  # hand back the selected config re-trained on train+val where it chooses nothing on val
    ensemble: int = 0  # greedy rounds of ensemble selection over the trials (0: hand back one trial)
    recipe: dict[str, Any] | None = None  # AppliedRecipe.record() of the recipe applied to the study
    recipe_lines: tuple[str, ...] = ()  # AppliedRecipe.describe(), printed at the start
    verbose: bool = False  # Ray's own console (trial tables, echoed worker logs) instead of ours
    progress_every: float = DEFAULT_PROGRESS_EVERY_S  # seconds between live trial tables (our console)
    time_budget: float | None = None  # minutes: the search stops starting and running trials after this
    # A finished trial's actor starts the next trial (Tune's reuse_actors): on one node. On a cluster
    # of several, the next trial would wait for that actor instead of starting on an idle node.
    reuse_actors: bool = True
    # The bad rows of a real dataset left out of every split (config key skip_bad_rows, --skip-bad-rows),
    # once the data is read: label file and row, image, reason.
    skipped_rows: tuple[dict[str, Any], ...] = ()
    mlflow: str | None = None  # the MLflow tracking URI (--mlflow), or None: not tracked in MLflow

    def __post_init__(self) -> None:
        check_experiment_name(self.name)
        if self.searcher not in SEARCHERS:
            raise StudyError(f"searcher must be one of {SEARCHERS}, got {self.searcher!r}")
        if self.scheduler not in TRIAL_SCHEDULERS:
            raise StudyError(f"scheduler must be one of {TRIAL_SCHEDULERS}, got {self.scheduler!r}")
        problem = budget_problem(self.num_samples, self.max_epochs, self.grace_period, self.reduction_factor)
        if problem:
            raise StudyError(problem)
        if self.cpus_per_trial <= 0:
            raise StudyError(f"cpus_per_trial must be > 0, got {self.cpus_per_trial}")
        if self.workers_per_trial < 1:
            raise StudyError(f"workers_per_trial must be >= 1, got {self.workers_per_trial}")
        if self.splits < 0:
            raise StudyError(f"splits must be >= 0, got {self.splits}")
        if self.ensemble < 0:
            raise StudyError(f"ensemble must be >= 0 greedy rounds (0: hand back one trial), got {self.ensemble}")
        study = self.effective_study  # the study's fixed values with the overrides (--set) on top
        if study.fixed.get("train_on_val") or any(p.name == "train_on_val" for p in study.params):
            raise StudyError("train_on_val trains on the validation photos a search selects its trials on; it is for "
                             "re-training a selected configuration, which --splits does where select_epoch = 'last'. "
                             "Drop train_on_val from the study and --set")
        if not self.progress_every >= 0:
            raise StudyError(f"progress_every must be >= 0 seconds, got {self.progress_every}")
        if self.time_budget is not None and not (0 < self.time_budget < math.inf):
            raise StudyError(f"time_budget must be a number of minutes > 0, got {self.time_budget}")

    @property
    def effective_study(self) -> Study:
        """The study with this run's epoch budget and fixed overrides (e.g. dataset, crop size)."""
        return replace(self.study, max_epochs=self.max_epochs, fixed={**self.study.fixed, **dict(self.overrides)})

    def describe(self) -> list[str]:
        """What the search runs, printed before it starts: the recipe's decisions, then the study as it
        runs (what trains, what is searched), named after what changed it where it is not the file's."""
        changed_by = [f"recipe {self.recipe['name']}"] if self.recipe else []
        if any(key in MODEL_KEYS for key, _ in self.sets):
            changed_by.append("--set")
        return [*self.recipe_lines, *self.effective_study.describe(changed_by=" and ".join(changed_by) or None)]

    def is_remote_storage(self) -> bool:
        return "://" in self.storage and not self.storage.startswith("file://")

    def experiment_path(self) -> str:
        return self.storage.rstrip("/") + "/" + self.name

    def local_experiment_dir(self) -> Path | None:
        if self.is_remote_storage():
            return None
        return Path(self.storage.removeprefix("file://")).expanduser().resolve() / self.name


def experiment_dir_hint(settings: SearchSettings) -> str:
    """The experiment folder: a local path, or the storage URI of a remote one."""
    local = settings.local_experiment_dir()
    return str(local) if local is not None else settings.experiment_path()


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
    return renamed_keys(out, CONFIG, "--set")


def per_gpu(gpus_per_trial: float) -> int:
    """Trials that share one GPU at this share, if it divides a GPU sensibly (1, 1/2, 1/3, ...)."""
    if gpus_per_trial <= 0 or gpus_per_trial > 1:
        raise StudyError(f"--gpus-per-trial must be in (0, 1], got {gpus_per_trial}")
    n = 1.0 / gpus_per_trial
    if not math.isclose(n, round(n), rel_tol=1e-6):
        raise StudyError(f"--gpus-per-trial {gpus_per_trial} does not divide a GPU into whole trials "
                         f"(1/{gpus_per_trial} = {n:.3g}); use 1, 0.5, 0.25, 0.2, ...")
    return int(round(n))


def data_parallel_gpus(gpus_per_trial: float) -> int:
    """Workers of a data-parallel GPU trial: ``--gpus-per-trial`` above 1 must be a whole number."""
    if gpus_per_trial <= 1 or not float(gpus_per_trial).is_integer():
        raise LaunchError(f"--gpus-per-trial must be in (0, 1] (a share of one GPU: 1, 0.5, 0.25, ...) or a whole "
                          f"number of GPUs above 1 that a data-parallel trial trains on (2, 3, 4, ...), "
                          f"got {gpus_per_trial:g}")
    return int(gpus_per_trial)


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


def check_flag_values(args: argparse.Namespace) -> None:
    """Flag values that are wrong whatever the study (resources, budgets)."""
    gpus = args.gpus
    if gpus is not None and gpus < 0:
        raise LaunchError(f"--gpus must be >= 0, got {gpus}")
    if args.gpus_per_trial is not None:
        if args.gpus_per_trial > 1:
            data_parallel_gpus(args.gpus_per_trial)  # raises unless a whole number
        else:
            per_gpu(args.gpus_per_trial)  # raises with the valid shares
        if gpus == 0:
            raise LaunchError("--gpus-per-trial was given with --gpus 0; drop one of them")
    workers = getattr(args, "workers_per_trial", None)
    if workers is not None:
        if workers < 1 or workers != int(workers):
            raise LaunchError(f"--workers-per-trial must be a whole number >= 1 (1 = an ordinary trial, 2, 3, ... = "
                              f"data-parallel CPU workers), got {workers:g}")
        if args.gpus_per_trial is not None:
            raise LaunchError("--workers-per-trial N is for CPU workers; with GPUs, --gpus-per-trial N (a whole number) "
                              "gives one worker per GPU. Drop one of them")
    if args.cpus_per_trial <= 0:
        raise LaunchError(f"--cpus-per-trial must be > 0, got {args.cpus_per_trial}")
    for flag in ("num_samples", "max_concurrent", "max_epochs", "grace_period"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise LaunchError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if getattr(args, "splits", None) is not None and args.splits < 0:
        raise LaunchError(f"--splits must be >= 0, got {args.splits}")
    if getattr(args, "ensemble", None) is not None and args.ensemble < 0:
        raise LaunchError(f"--ensemble must be a whole number of greedy rounds >= 0 (0: hand back one trial), "
                          f"got {args.ensemble}")
    if args.reduction_factor is not None and args.reduction_factor < 2:
        raise LaunchError(f"--reduction-factor must be >= 2, got {args.reduction_factor}")
    if getattr(args, "mlflow", None) is not None:
        require_mlflow()  # first: the study, recipe and data checks can take a while


def default_dataset(study: Any, smoke_test: bool) -> str:
    """``--dataset``'s default: the study's own (``dataset`` in its ``[fixed]`` table: the ranking
    study's is ``livec``, the human-rated photos that ship with the repository), else ``embedded``;
    ``--smoke-test`` runs on the embedded dataset (a quarter of it: a minute's check that a search
    runs end to end)."""
    return EMBEDDED if smoke_test else str(study.fixed.get("dataset", EMBEDDED))


def settings_from_args(args: argparse.Namespace, study_name: str) -> SearchSettings:
    """Validate every flag and build the search settings; nothing has started yet."""
    check_flag_values(args)
    if args.resume:
        return resume_settings(args, study_name)
    study = load_study(study_name)
    if getattr(args, "select", None) is not None:
        study = study.with_select(args.select)
    sets = parse_sets(args.set)
    overrides = {**sets, "dataset": args.dataset or default_dataset(study, args.smoke_test)}
    if getattr(args, "skip_bad_rows", False):
        overrides["skip_bad_rows"] = True  # a config key: whatever re-reads the run's data leaves the same rows out
    recipe, note = resolve_recipe(args.recipe, args.gpus, study, overrides["dataset"])
    applied = apply_recipe(recipe, study, overrides["dataset"], overrides) if recipe is not None else None
    if applied is not None:
        study = applied.study
    study, family_note = switch_family(study, sets)
    if args.smoke_test and "eval_patches" not in {p.name for p in study.params}:
        overrides.setdefault("eval_patches", 1)
    # Every override must make a valid config with the study's fixed values.
    TrainConfig.from_dict({**study.fixed, **overrides})
    searched = sorted(set(overrides) & {p.name for p in study.params})
    if searched:
        raise LaunchError(f"--set {', '.join(searched)}: searched by study {study.name!r}, so a fixed value would be "
                          "overridden by the searcher; drop the --set, or copy the study file and move the key to [fixed]")
    # Every backbone x weights combination the search can pick, named with what to do when offline.
    check_weights({**study.fixed, **overrides}, {p.name: list(p.values or p.grid) for p in study.params})
    check_weights_reachable(study, overrides)
    splits = args.splits if args.splits is not None else (recipe.splits if recipe is not None else 0)
    real = dataset_adapter(overrides["dataset"]) is not None
    if splits and not real:
        if args.splits:
            raise LaunchError(f"--splits {args.splits} draws new random splits of a real dataset (ADAPTER:ROOT); "
                              f"{overrides['dataset']!r} has a fixed split by source photo. Drop --splits, or use a "
                              "dataset such as livec:/data/livec")
        splits = 0  # the recipe's default applies to real datasets only
    config = TrainConfig.from_dict({**study.fixed, **overrides})
    if config.data.feature_cache:
        from iqa_ray.training.features import cache_keys

        searched_keys = sorted({p.name for p in study.params} & set(cache_keys()))
        if searched_keys:
            raise LaunchError(f"feature_cache computes one feature cache per search, but the study searches "
                              f"{', '.join(searched_keys)}, which changes the features; fix them (--set) or set "
                              "feature_cache=false")
    if real:
        from iqa_ray.search.preflight import preflight_decoded
        from iqa_ray.training.loaders import load_run_table

        d = config.data
        # Every bad row and unreadable image, in one error (or skipped: skip_bad_rows), before Ray starts.
        table = load_run_table(config, check_images=True)
        preflight_decoded(table, dataset=d.dataset, image_size=d.image_size,
                          short_side=d.short_side, min_side=0 if d.whole_image else d.crop_size)
    gpt = args.gpus_per_trial
    num_samples = args.num_samples or study.num_samples
    max_epochs = args.max_epochs or study.max_epochs
    grace = args.grace_period or min(study.grace_period, max_epochs)
    if args.smoke_test:
        num_samples, max_epochs, grace = min(num_samples, 2), 1, 1
    settings = SearchSettings(
        study=study, name=args.name or f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage=args.storage or str(default_results_dir()),
        searcher=args.searcher or study.searcher, scheduler=args.trial_scheduler or study.trial_scheduler,
        num_samples=num_samples, max_epochs=max_epochs, grace_period=grace,
        reduction_factor=args.reduction_factor or study.reduction_factor, max_concurrent=args.max_concurrent,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=0.0 if gpt is None else gpt,
        workers_per_trial=int(args.workers_per_trial or 1),
        seed=study.seed if args.seed is None else args.seed, max_failures=args.max_failures,
        overrides=tuple(sorted(overrides.items())), sets=tuple(sets.items()),
        splits=1 if args.smoke_test and splits else splits,
        splits_train_on_val=not getattr(args, "splits_train_only", False),
        refit=not getattr(args, "no_refit", False), ensemble=int(getattr(args, "ensemble", None) or 0),
        recipe=applied.record() if applied is not None else None,
        recipe_lines=(*(applied.describe() if applied is not None else ((note,) if note else ())),
                      *((family_note,) if family_note else ())),
        verbose=args.verbose, progress_every=args.progress_every, time_budget=getattr(args, "time_budget", None),
    )
    return replace(settings, mlflow=new_tracking_uri(getattr(args, "mlflow", None), settings))


def new_tracking_uri(flag: str | None, settings: SearchSettings) -> str | None:
    """The MLflow tracking URI ``--mlflow`` asks a new search to log to, checked (:mod:`iqa_ray.search.mlflow_store`)."""
    uri = tracking_uri(flag, settings.local_experiment_dir(), settings.storage)
    if uri is not None and flag != LOCAL:  # the default store is in the new experiment folder
        check_new_experiment(uri, settings.name)
    return uri


# Flags that shape what a search computes: on --resume they must match the recorded experiment
# (the restored Tuner would ignore new values silently). Resource flags may change.
_RECORDED_FLAGS = ("searcher", "trial_scheduler", "num_samples", "max_epochs", "grace_period", "reduction_factor", "seed",
                   "time_budget")


def resume_settings(args: argparse.Namespace, study_name: str) -> SearchSettings:
    """The settings of the experiment ``--resume`` continues, from its ``experiment.json``.

    The study (as it was when the search started), dataset and ``--set`` values come from the
    record; a flag that would change them is refused with the keys that differ, and an unknown
    experiment is refused before Ray starts or any image is decoded.
    """
    if not args.name:
        raise LaunchError("--resume needs --name (the experiment to continue)")
    storage = args.storage or str(default_results_dir())
    probe = SearchSettings(study=load_study(study_name), name=args.name, storage=storage, searcher="optuna",
                           scheduler="asha", num_samples=1, max_epochs=1, grace_period=1, reduction_factor=2,
                           max_concurrent=None, cpus_per_trial=1.0, gpus_per_trial=0.0, seed=0)
    local = probe.local_experiment_dir()
    if local is None:
        raise LaunchError(f"--resume with remote storage ({storage}) is not supported: copy the experiment folder "
                          "to local storage and resume it there")
    record_file = local / "experiment.json"
    if not record_file.is_file():
        raise StudyError(f"--resume: no experiment named {args.name!r} under {storage} (looked for {record_file}); "
                         "start it without --resume, or check --name/--storage")
    # Records written before the rename name the trial scheduler `scheduler` (iqa_ray.core.deprecations).
    record = renamed_keys(json.loads(record_file.read_text()), SEARCH)
    launch = record.get("launch")
    if launch is None:
        raise LaunchError(f"--resume: {record_file} was written by an older iqa-ray that did not record the launch "
                          "flags; start a new experiment")
    study = parse_study(record["study_definition"], name=record["study"],
                        path=Path(record["study_file"]) if record.get("study_file") else None)
    # The selection rule only decides which finished trial is handed back: --select may change it.
    select = args.select if getattr(args, "select", None) is not None else record.get("select", study.select)
    study = study.with_select(select)
    recorded_recipe = record.get("recipe")
    applied = None
    if recorded_recipe is not None:
        recipe = parse_recipe(recorded_recipe["definition"], name=recorded_recipe["name"],
                              path=Path(recorded_recipe["file"]) if recorded_recipe.get("file") else None)
        applied = apply_recipe(recipe, study, launch["dataset"], launch["set"])
    differs = changed_flags(args, record, study, current=probe.study)
    if differs:
        raise LaunchError(f"--resume of {args.name!r} would not continue the experiment that was started: "
                          f"{'; '.join(differs)}. Drop those flags (the recorded values are used), or start a new "
                          "experiment with another --name")
    resumed, _ = switch_family(applied.study if applied is not None else study, launch["set"])
    return SearchSettings(
        study=resumed, name=args.name, storage=storage,
        searcher=record["searcher"], scheduler=record.get("trial_scheduler"),
        num_samples=record["num_samples"], max_epochs=record["max_epochs"], grace_period=record["grace_period"],
        reduction_factor=record["reduction_factor"], max_concurrent=args.max_concurrent,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=0.0 if args.gpus_per_trial is None else args.gpus_per_trial,
        workers_per_trial=int(args.workers_per_trial or 1), seed=record["seed"], max_failures=args.max_failures,
        overrides=tuple(sorted(record["overrides"].items())), sets=tuple(launch["set"].items()),
        splits=record.get("splits", 0), splits_train_on_val=record.get("splits_train_on_val", True),
        refit=record.get("refit", True), ensemble=record.get("ensemble", 0),
        recipe=applied.record() if applied is not None else None,
        recipe_lines=tuple(applied.describe()) if applied is not None else (),
        verbose=args.verbose, progress_every=args.progress_every, time_budget=record.get("time_budget"),
        mlflow=resumed_uri(getattr(args, "mlflow", None), (record.get("mlflow") or {}).get("tracking_uri"), local),
    )


def changed_flags(args: argparse.Namespace, record: Mapping[str, Any], study: Study, *, current: Study) -> list[str]:
    """What a ``--resume`` command line would change in the recorded experiment, one phrase each.

    Args:
        args: the command line.
        record: the experiment's ``experiment.json`` (keys under their current names).
        study: the recorded study (with this command's ``--select``).
        current: the study the command line names, as its file reads now.
    """
    launch, recorded_recipe = record["launch"], record.get("recipe")
    differs = []
    if current.name != study.name or current.definition != study.definition:
        differs.append(f"study ({current.name} now, {study.name} recorded"
                       + (", its file has changed since" if current.name == study.name else "") + ")")
    if args.dataset is not None and args.dataset != launch["dataset"]:
        differs.append(f"--dataset ({args.dataset} now, {launch['dataset']} recorded)")
    sets = parse_sets(args.set)
    if args.set and sets != launch["set"]:
        keys = sorted(k for k in set(sets) | set(launch["set"]) if sets.get(k) != launch["set"].get(k))
        differs.append(f"--set {', '.join(keys)} ({sets} now, {launch['set']} recorded)")
    recorded_name = recorded_recipe["name"] if recorded_recipe else "none"
    if args.recipe is not None and Path(args.recipe).stem != recorded_name:
        differs.append(f"--recipe ({args.recipe} now, {recorded_name} recorded)")
    if args.splits is not None and args.splits != record.get("splits", 0):
        differs.append(f"--splits ({args.splits} now, {record.get('splits', 0)} recorded)")
    if getattr(args, "splits_train_only", False) and record.get("splits_train_on_val", True):
        differs.append("--splits-train-only (given now, not recorded)")
    if getattr(args, "no_refit", False) and record.get("refit", True):
        differs.append("--no-refit (given now, not recorded)")
    if getattr(args, "ensemble", None) is not None and args.ensemble != record.get("ensemble", 0):
        differs.append(f"--ensemble ({args.ensemble} now, {record.get('ensemble', 0)} recorded)")
    if getattr(args, "skip_bad_rows", False) and not record["overrides"].get("skip_bad_rows", False):
        differs.append("--skip-bad-rows (given now, not recorded)")
    if args.smoke_test != launch["smoke_test"]:
        differs.append(f"--smoke-test ({args.smoke_test} now, {launch['smoke_test']} recorded)")
    for flag in _RECORDED_FLAGS:
        value, recorded = getattr(args, flag), record.get(flag)
        if value is not None and value != recorded:
            differs.append(f"--{flag.replace('_', '-')} ({value} now, {recorded} recorded)")
    return differs


def switch_family(study: Any, sets: Mapping[str, Any]) -> tuple[Any, str | None]:
    """The study with ``--set family=X`` honoured: its fixed keys that only other families take are
    dropped (said in the returned note); searching one of them is an error.

    Raises:
        LaunchError: the study searches a key the chosen family does not take.
    """
    family = sets.get("family")
    if family is None or family == study.fixed.get("family", TrainConfig().model.family):
        return study, None
    searched = foreign_family_keys({p.name: None for p in study.params}, str(family))
    if searched:
        raise LaunchError(f"--set family={family}: study {study.name!r} searches {', '.join(sorted(searched))}, which "
                          f"family {family!r} does not take; use a study written for it (or copy this one without them)")
    dropped = foreign_family_keys(study.fixed, str(family), keep=sets)
    if not dropped:
        return study, None
    study = replace(study, fixed={k: v for k, v in study.fixed.items() if k not in dropped})
    return study, (f"--set family={family}: the study's fixed {', '.join(f'{k} = {v!r}' for k, v in dropped.items())} "
                   "apply to another family and are dropped")


def check_weights_reachable(study: Any, overrides: dict[str, Any]) -> None:
    """A study that downloads ImageNet weights (``pretrained = "hub"``) fails now when offline,
    not once per trial after Ray has started."""
    from iqa_ray.core.net import hub_reachable

    fixed = {**study.fixed, **overrides}
    searched = next((p for p in study.params if p.name == "pretrained"), None)
    wants_hub = fixed.get("pretrained") == "hub" or (searched is not None and "hub" in searched.values)
    if not wants_hub:
        return
    reachable, reason = hub_reachable()
    if not reachable:
        raise LaunchError(
            f"study {study.name!r} loads backbone weights from the Hugging Face hub (pretrained = \"hub\"), which is "
            f"not reachable ({reason}). Offline options: --set pretrained=none (random initialisation), "
            "--set pretrained=/path/to/weights.safetensors (a local file for the backbone), or a study on "
            "efficientnet_lite0 with pretrained = \"offline\" (ImageNet weights shipped in a pip package)."
        )
