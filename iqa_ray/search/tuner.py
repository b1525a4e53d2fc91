"""Searchers, schedulers and the Tuner: how a study runs on Ray Tune.

Searchers: ``optuna`` (TPE, seeded; the study is also stored in the experiment folder with
Optuna's SQLite storage, so ``optuna-dashboard sqlite:///.../optuna.db`` shows parameter
importances and history), ``random`` (seeded) and ``grid`` (every combination of the
parameters' ``grid`` values). Schedulers: ``asha`` (asynchronous successive halving),
``hyperband`` and ``none``. Early stopping is the scheduler's job: trials report every epoch
and ASHA stops the unpromising ones at its rungs. Every Tuner of a search (the search itself,
its refit and its ``--splits`` runs) is built by :func:`experiment_tuner`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iqa_ray.search.settings import SearchSettings, experiment_dir_hint
from iqa_ray.search.study import StudyError


def make_searcher(settings: SearchSettings, optuna_db: Path | None) -> tuple[Any, dict[str, Any], int]:
    """The search algorithm, the Tuner's param_space and its num_samples for these settings."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    study = settings.effective_study
    if settings.searcher == "grid":
        # num_samples repeats the whole grid; each repeat is one pass over every combination.
        return BasicVariantGenerator(random_state=settings.seed), study.grid_space(), settings.num_samples
    if settings.searcher == "random":
        return BasicVariantGenerator(random_state=settings.seed), study.tune_space(), settings.num_samples
    import optuna

    storage = None
    if optuna_db is not None:
        optuna_db.parent.mkdir(parents=True, exist_ok=True)
        storage = optuna.storages.RDBStorage(f"sqlite:///{optuna_db}")
    # Several objectives: Optuna is told every one (TPE and NSGA-II both handle a front); Tune's
    # schedulers (ASHA) stop trials on the primary one, which is the Tuner's metric.
    metrics = [m for m, _ in study.objectives] if study.multi_objective else study.metric
    modes = [d for _, d in study.objectives] if study.multi_objective else study.mode
    searcher = ResumableOptunaSearch(
        space=study.optuna_space(),
        metric=metrics,
        mode=modes,
        sampler=make_sampler(study.sampler, settings.seed, settings.num_samples),
        study_name=settings.name,
        storage=storage,
        seed=settings.seed,
    )
    if settings.max_concurrent:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=settings.max_concurrent)
    return searcher, study.constants(), settings.num_samples


def make_sampler(name: str, seed: int, num_samples: int) -> Any:
    """The seeded Optuna sampler ``name`` (``tpe`` or ``nsga2``), sized for ``num_samples`` trials:
    TPE samples a third of the budget (2 to 5 trials) at random first; NSGA-II's generations are a
    third of the budget (2 to 50 trials)."""
    import optuna

    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, min(50, num_samples // 3)))
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(5, num_samples // 3)))
    raise StudyError(f"sampler must be one of tpe, nsga2, got {name!r}")


def _resumable_optuna_class() -> type:
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class _ResumableOptunaSearch(OptunaSearch):
        """OptunaSearch whose SQLite study may be ahead of Tune's experiment snapshot.

        The Optuna study lives in the experiment folder (for optuna-dashboard) and is written at
        once, while Tune snapshots its own state every few seconds. After a crash in between,
        ``--resume`` can replay a trial that the database already closed; its recorded result
        stands, and the replayed report is ignored instead of crashing the driver.
        """

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            try:
                super().on_trial_result(trial_id, result)
            except optuna.exceptions.UpdateFinishedTrialError:
                self._completed_trials.add(trial_id)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is not None and self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
                self._completed_trials.add(trial_id)
                return
            super().on_trial_complete(trial_id, result, error)

    return _ResumableOptunaSearch


def ResumableOptunaSearch(**kwargs: Any) -> Any:  # noqa: N802 - a class factory, used like a class
    """An :class:`~ray.tune.search.optuna.OptunaSearch` that survives a resume after a crash."""
    return _resumable_optuna_class()(**kwargs)


def close_orphaned_optuna_trials(optuna_db: Path) -> int:
    """Mark Optuna trials left RUNNING by a crashed driver as FAIL (none can run after the search).

    Returns:
        How many trials were closed.
    """
    import optuna

    if not optuna_db.exists():
        return 0
    storage = optuna.storages.RDBStorage(f"sqlite:///{optuna_db}")
    closed = 0
    for summary in optuna.get_all_study_summaries(storage):
        for trial in storage.get_all_trials(storage.get_study_id_from_name(summary.study_name), deepcopy=False):
            if trial.state == optuna.trial.TrialState.RUNNING:
                storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
                closed += 1
    return closed


def make_scheduler(settings: SearchSettings) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    if settings.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=settings.max_epochs,
                             grace_period=settings.grace_period, reduction_factor=settings.reduction_factor)
    if settings.scheduler == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", max_t=settings.max_epochs,
                                  reduction_factor=settings.reduction_factor)
    return FIFOScheduler()


def asha_rungs(grace_period: int, reduction_factor: int, max_epochs: int) -> tuple[int, ...]:
    """ASHA's rungs below ``max_epochs``: ``grace_period * reduction_factor**k`` (epochs from 1)."""
    rungs, t = [], grace_period
    while t < max_epochs:
        rungs.append(t)
        t *= reduction_factor
    return tuple(rungs)


def stop_epochs(settings: SearchSettings) -> tuple[int, ...]:
    """Epochs (counted from 1) after which the search's scheduler may stop a trial.

    A trial checkpoints there whatever its ``checkpoint_every``, so a stopped trial's final report
    always comes with its weights. ASHA's rungs are ``grace_period * reduction_factor**k``;
    HyperBand's brackets stop trials at many epochs, so every epoch is one.
    """
    if settings.scheduler == "asha":
        return asha_rungs(settings.grace_period, settings.reduction_factor, settings.max_epochs)
    if settings.scheduler == "hyperband":
        return tuple(range(1, settings.max_epochs + 1))
    return ()


def trial_dirname(trial: Any) -> str:
    """Trial folders are named from the trial id only, never from config values (no path escape)."""
    return f"trial_{trial.trial_id}"


def build_tuner(settings: SearchSettings, trainable: Any, *, callbacks: list[Any] | None = None) -> Any:
    """A new Tuner for the search of ``settings`` (see :func:`restore_tuner` to continue one)."""
    from iqa_ray.search.tensorboard import HParamsCallback

    local_dir = settings.local_experiment_dir()
    optuna_db = local_dir / "optuna.db" if local_dir is not None else None
    searcher, param_space, num_samples = make_searcher(settings, optuna_db)
    max_concurrent = settings.max_concurrent if settings.searcher != "optuna" else None
    return experiment_tuner(
        settings, trainable, param_space,
        # TensorBoard: per-epoch scalars under readable tags (val/srcc, train/loss, lr/head, ...) and
        # HParams sessions of the resolved config; being a TBXLoggerCallback, it replaces Tune's
        # default one (whose ray/tune/* dump charts Tune's bookkeeping too).
        callbacks=[*(callbacks or []), HParamsCallback(settings.effective_study)],
        metric=settings.study.metric, mode=settings.study.mode, search_alg=searcher,
        scheduler=make_scheduler(settings), num_samples=num_samples, max_concurrent_trials=max_concurrent,
        trial_dirname_creator=trial_dirname,
        # Tune ends the search at the budget: running trials stop with their last checkpoint
        # and every finished epoch stays in the results.
        time_budget_s=settings.time_budget * 60 if settings.time_budget else None,
    )


def experiment_tuner(settings: SearchSettings, trainable: Any, param_space: dict[str, Any], *,
                     name: str | None = None, callbacks: list[Any] | None = None, **tune_config: Any) -> Any:
    """The one place a Tuner is built: the search's own experiment (:func:`build_tuner`), or, with
    ``name``, a re-training run in its own Tune experiment inside the search's folder (the refit and
    the ``--splits`` runs, :mod:`iqa_ray.search.retrain`).

    Args:
        settings: the search's settings (storage, retries of a crashed trial, console).
        trainable: the trainable with its data and resources.
        param_space: the trials' configs (fixed values, samplers or a grid).
        name: the re-training run's folder in the experiment folder; ``None`` for the search itself.
        callbacks: the run's Tune callbacks.
        tune_config: :class:`ray.tune.TuneConfig` arguments (metric, searcher, scheduler, samples, ...).
    """
    from ray import tune

    # A finished trial's actor starts the next trial (same resources): a worker process and its
    # imports (torch, timm, the trainable) are paid once per worker, not once per trial. Only on a
    # one-node cluster (SearchSettings.reuse_actors): on several nodes, Tune gave a finished trial's
    # actor to the next trial while another node's actor was still starting, and the trials ran one
    # after the other on one node (tests/test_cluster.py).
    tune_config.setdefault("reuse_actors", settings.reuse_actors)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune.TuneConfig(**tune_config),
                      run_config=run_config(settings, callbacks, name=name))


def run_config(settings: SearchSettings, callbacks: list[Any] | None, *, name: str | None = None) -> Any:
    """The RunConfig of one of the search's Tune experiments: the search itself (``settings.name``
    under ``settings.storage``), or the re-training run ``name`` inside the experiment folder."""
    from ray import tune

    return tune.RunConfig(
        name=settings.name if name is None else name,
        storage_path=settings.storage if name is None else experiment_dir_hint(settings),
        failure_config=tune.FailureConfig(max_failures=settings.max_failures),
        # One checkpoint per trial: it holds the best-by-validation weights as well as the latest
        # state (a resnet18 + AdamW checkpoint is ~130 MB), and num_to_keep=1 also makes Tune
        # snapshot the experiment after every checkpoint, so a crash loses at most one epoch.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=callbacks,
        # Ray's console (1) with --verbose; else silent (0), and the caller passes our live table
        # (iqa_ray.search.console.console_callbacks).
        verbose=1 if settings.verbose else 0,
    )


def restore_tuner(settings: SearchSettings, trainable: Any) -> Any:
    """Continue an interrupted experiment: finished trials keep their results, unfinished ones
    resume from their checkpoints and the searcher keeps its state."""
    from ray import tune

    path = settings.experiment_path()
    if not tune.Tuner.can_restore(path):
        raise StudyError(f"--resume: no experiment named {settings.name!r} under {settings.storage} "
                         f"(looked for {path}); start it without --resume, or check --name/--storage")
    return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
