"""MLflow tracking of a search (``--mlflow``): one run per trial, and one summary run.

The MLflow experiment is named like the search. In it:

* **One run per trial** (tag ``kind = trial``), logged by :class:`TrialRuns`, Ray Tune's
  :class:`~ray.air.integrations.mlflow.MLflowLoggerCallback` with three changes. Parameters are the
  trial's resolved config (``lr``, not the ``lr__unit`` a ``range_by`` study searches; the study's
  fixed values too), as the TensorBoard HParams sessions show them (:mod:`iqa_ray.search.tensorboard`).
  Metrics are the trial's reports under their own names (``val_srcc``, ``train_loss``, ``lr_head``,
  ...), one point per epoch (step = epochs trained), in one batch per epoch; Tune's bookkeeping
  (``done``, ``pid``, ``config/*``, ...) stays out. The status says how the trial ended: ``FINISHED``
  (its epochs done, or the engine's own early stopping), ``KILLED`` (stopped by ASHA/HyperBand or by
  ``--time-budget``), ``FAILED`` (an error); the tag ``ended_by`` says which, as ``trials.parquet``
  does (``completed``, ``early_stopping``, ``scheduler``, ``time_budget``, ``error``).
* **One summary run** (tag ``kind = summary``, :func:`log_summary`): the selected configuration as
  parameters, the handed-back model's test metrics (``test_srcc``, ...), its selected trial's validation
  figures (``best_val_*``), the baselines on the same photos (``baseline_linear_probe_srcc``,
  ``baseline_piqe_srcc``, ``baseline_brisque_srcc``, ...), the model handed back (tag ``model``), and
  ``summary.json`` and ``experiment.json`` as artifacts.

A resumed search (``--resume``) restores this callback with the Tuner; a trial that had a run before
the interruption gets it back (found by its ``trial_id`` tag), and epochs it had logged are not
logged twice; a trial the killed driver had started before Tune's snapshot recorded it is not in the
resumed experiment, and its run is closed at the end (``KILLED``, ``ended_by = interrupted``). Logging never stops a search: a store that fails is reported on the console and in
the driver log, and the search goes on without it (its results are in the experiment folder).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback

from iqa_ray.core.io import git_revision
from iqa_ray.search.export import ended_by
from iqa_ray.search.mlflow_store import artifact_location, ui_hint
from iqa_ray.search.settings import SearchSettings
from iqa_ray.search.study import Study
from iqa_ray.search.summary import write_summary_file
from iqa_ray.search.tensorboard import BOOKKEEPING
from iqa_ray.search.tuner import stop_epochs

logger = logging.getLogger(__name__)

TRIAL, SUMMARY = "trial", "summary"  # the runs' ``kind`` tag
STATUS = {"completed": "FINISHED", "early_stopping": "FINISHED", "error": "FAILED"}  # else KILLED
_PARAM_CHARS = 6000  # MLflow's longest parameter value
LOST = "its driver was killed before Tune recorded the trial; the resumed search does not hold it"


def _errors() -> tuple[type[BaseException], ...]:
    """What a failing store raises: MLflow's own error (a server's answer), a database's that MLflow
    passes on (a file that is not an SQLite database), or a connection's. Imported when needed:
    mlflow is an optional extra."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return (MlflowException, SQLAlchemyError, OSError)


def open_experiment(client: Any, name: str, artifacts: str | None) -> str:
    """The id of the MLflow experiment ``name``, created (with its artifacts at ``artifacts``) if new."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=artifacts)


def param_values(config: Mapping[str, Any]) -> dict[str, str]:
    """A config as MLflow parameters: every value as text, cut to MLflow's longest."""
    return {str(k): str(v)[:_PARAM_CHARS] for k, v in sorted(config.items())}


def metric_values(result: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a trial's report that are metrics: its own keys, Tune's bookkeeping left out."""
    out = {}
    for key, value in result.items():
        if key in BOOKKEEPING or key.startswith("config") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) or hasattr(value, "item"):  # numpy scalars too
            try:
                out[key] = float(value)
            except (TypeError, ValueError):  # a numpy array: not one number
                continue
    return out


def _batch(client: Any, run_id: str, *, metrics: Mapping[str, float] | None = None,
           params: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None, step: int = 0) -> None:
    """One ``log_batch`` call (one store transaction, where one metric a call would be one each)."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in (metrics or {}).items()],
                     params=[Param(k, v) for k, v in (params or {}).items()],
                     tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])


class TrialRuns(MLflowLoggerCallback):
    """Ray Tune's MLflow logger with the search's parameters, metrics and statuses (see the module doc).

    Pass it in ``RunConfig(callbacks=[...])``; :func:`trial_runs` builds it from the settings.
    """

    def __init__(self, tracking_uri: str, *, experiment_name: str, study: Study, max_epochs: int,
                 stops: tuple[frozenset[int] | None, bool], artifacts: str | None, tags: Mapping[str, str]):
        super().__init__(tracking_uri, experiment_name=experiment_name, tags=dict(tags))
        self._study = study
        self._max_epochs = max_epochs
        self._stops = stops
        self._artifacts = artifacts
        self._reset()

    def _reset(self) -> None:
        self._client: Any = None  # made in setup: the callback is pickled with the Tuner
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._steps: dict[str, int] = {}  # trial id -> last step logged
        self.failure: str | None = None  # why logging stopped, if it did

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_client=None, _runs={}, _steps={}, failure=None, _trial_runs={})
        return state

    def setup(self, *args: Any, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(self.tracking_uri)
        # Created here first, with its artifacts beside the default store (Tune's setup would let MLflow
        # put them in ./mlruns under the current folder); Tune's setup then finds it by name.
        open_experiment(self._client, self.experiment_name, self._artifacts)
        super().setup(*args, **kwargs)

    def _logging(self, what: str, log: Any) -> None:
        """Run ``log()``; a store that fails stops the logging, said once, and never the search."""
        if self.failure is not None:
            return
        try:
            log()
        except _errors() as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            logger.exception("MLflow: could not %s", what)
            print(f"[mlflow] logging stopped: could not {what} at {self.tracking_uri} ({self.failure}); the search "
                  "goes on, its results are in the experiment folder", file=sys.stderr, flush=True)

    def log_trial_start(self, trial: Any) -> None:
        if trial.trial_id not in self._runs:
            self._logging(f"start the run of trial {trial.trial_id}", lambda: self._start(trial))

    def _start(self, trial: Any) -> None:
        experiment_id = self.mlflow_util.experiment_id
        found = self._client.search_runs([experiment_id], f"tags.trial_id = '{trial.trial_id}'", max_results=1)
        if found:  # a resumed search: the trial's run from before the interruption, and the epochs it holds
            run_id = found[0].info.run_id
            history = self._client.get_metric_history(run_id, "epoch")
            self._steps[trial.trial_id] = max((m.step for m in history), default=0)
            self._client.update_run(run_id, status="RUNNING")
        else:
            tags = {**self.tags, "kind": TRIAL, "trial_id": trial.trial_id, "trial_name": str(trial)}
            run_id = self._client.create_run(experiment_id, run_name=str(trial), tags=tags).info.run_id
            _batch(self._client, run_id, params=param_values(self._study.reported_config(trial.config)))
        self._runs[trial.trial_id] = run_id

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        if trial.trial_id not in self._runs:
            self.log_trial_start(trial)
        step = int(result.get("training_iteration", iteration))
        if self.failure is not None or step <= self._steps.get(trial.trial_id, 0):
            return  # an epoch logged before the interruption: its first report stands
        self._logging(f"log epoch {step} of trial {trial.trial_id}",
                      lambda: _batch(self._client, self._runs[trial.trial_id], metrics=metric_values(result), step=step))
        self._steps[trial.trial_id] = step

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        if trial.trial_id not in self._runs:  # e.g. a trial that failed before it started: it gets its run
            self.log_trial_start(trial)
        if self.failure is None:
            self._logging(f"end the run of trial {trial.trial_id}", lambda: self._end(trial, failed))

    def _end(self, trial: Any, failed: bool) -> None:
        last = trial.last_result if trial.last_result and "epoch" in trial.last_result else None
        how = ended_by("ERROR" if failed else "TERMINATED", None, last,
                       trial.config.get("epochs", self._max_epochs), self._stops)
        tags = {"ended_by": how}
        error_file = trial.error_file
        if failed and error_file and Path(error_file).is_file():
            lines = Path(error_file).read_text(errors="replace").strip().splitlines()
            tags["error"] = lines[-1][:500] if lines else ""
        run_id = self._runs[trial.trial_id]
        _batch(self._client, run_id, tags=tags)
        self._client.set_terminated(run_id, status=STATUS.get(how, "KILLED"))

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        super().on_experiment_end(trials, **info)
        known = {t.trial_id for t in trials}
        self._logging("close the runs of lost trials", lambda: self._close_lost(known))

    def _close_lost(self, known: set[str]) -> None:
        """Runs still open of trials the experiment does not hold: a driver killed after starting them
        and before Tune's snapshot recorded them (the resumed search sampled others in their place)."""
        open_runs = self._client.search_runs([self.mlflow_util.experiment_id],
                                             f"tags.kind = '{TRIAL}' and attributes.status = 'RUNNING'")
        for run in open_runs:
            if run.data.tags.get("trial_id") not in known:
                _batch(self._client, run.info.run_id, tags={"ended_by": "interrupted", "error": LOST})
                self._client.set_terminated(run.info.run_id, status="KILLED")


def trial_runs(settings: SearchSettings) -> list[Any]:
    """The search's MLflow callback (none without ``--mlflow``)."""
    if settings.mlflow is None:
        return []
    local = settings.local_experiment_dir()
    return [TrialRuns(settings.mlflow, experiment_name=settings.name, study=settings.effective_study,
                      max_epochs=settings.max_epochs,
                      stops=(frozenset(stop_epochs(settings)), bool(settings.time_budget)),
                      artifacts=artifact_location(settings.mlflow, local, settings.name), tags=search_tags(settings))]


def search_tags(settings: SearchSettings) -> dict[str, str]:
    """Tags every run of the search carries: where its results are, its study and code."""
    local = settings.local_experiment_dir()
    return {"experiment_dir": str(local) if local is not None else settings.experiment_path(),
            "study": settings.study.name, "git_revision": git_revision() or "unknown"}


# ----------------------------------------------------------------------------- the summary run


def summary_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The summary's numbers as metrics: test, validation of the selected trial, baselines, budget."""
    out: dict[str, Any] = {f"test_{k}": v for k, v in (summary.get("test") or {}).items()}
    out.update({f"best_val_{k}": v for k, v in (summary.get("best_val") or {}).items() if not k.startswith("val_")})
    for name, figures in (summary.get("baselines") or {}).items():
        out.update({f"baseline_{name}_{k}": v for k, v in figures.items() if k in ("srcc", "plcc", "krcc", "rmse")})
    for key in ("val_test_gap", "versus_probe", "trials", "errored_trials", "elapsed_s", "total_s"):
        out[key] = summary.get(key)
    return {k: float(v) for k, v in out.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def log_summary(settings: SearchSettings, summary: dict[str, Any]) -> dict[str, Any]:
    """Log the search's summary as one more run, note where in ``summary["mlflow"]`` (``summary.json``
    is written again with it) and attach ``summary.json`` and ``experiment.json``. A store that
    fails is noted there (``error``) and printed; the summary is returned either way."""
    local = settings.local_experiment_dir()
    record: dict[str, Any] = {"tracking_uri": settings.mlflow, "experiment": settings.name}
    summary["mlflow"] = record
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(settings.mlflow)
        record["experiment_id"] = open_experiment(client, settings.name,
                                                   artifact_location(settings.mlflow, local, settings.name))
        tags = {**search_tags(settings), "kind": SUMMARY, "model": summary.get("model"),
                "best_trial_id": summary.get("best_trial_id"), "test_source": summary.get("test_source"),
                "baselines_error": summary.get("baselines_error"), "test_error": summary.get("test_error")}
        run_id = client.create_run(record["experiment_id"], run_name=SUMMARY,
                                   tags={k: str(v) for k, v in tags.items() if v is not None}).info.run_id
        record.update(summary_run_id=run_id, ui=ui_hint(settings.mlflow, record["experiment_id"]))
        _batch(client, run_id, metrics=summary_metrics(summary), params=param_values(summary.get("best_config") or {}))
        write_summary_file(settings, summary)
        if local is not None:
            for name in ("summary.json", "experiment.json"):
                if (local / name).is_file():
                    client.log_artifact(run_id, str(local / name))
        else:
            client.log_dict(run_id, summary, "summary.json")
        client.set_terminated(run_id, status="FINISHED")
    except _errors() as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        logger.exception("MLflow: could not log the summary run")
        print(f"[mlflow] could not log the summary run to {settings.mlflow}: {record['error']}", file=sys.stderr,
              flush=True)
        write_summary_file(settings, summary)
    return summary
