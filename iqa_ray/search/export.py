"""Export a Tune experiment folder to ``trials.parquet`` and ``epochs.parquet``.

    iqa-ray export RESULTS_DIR/EXPERIMENT

Reads only what Tune wrote (each trial's ``params.json``, ``result.json`` and ``error.txt``, and
the experiment state for trial status), so it works on finished, interrupted and resumed
experiments alike, and is run automatically at the end of every search.

Schema (docs/RESULTS.md points here):

``epochs.parquet`` - one row per trial and reported epoch:
    ``trial_id``, ``epoch``, every reported metric (``train_loss``, ``val_srcc``, ``val_plcc``,
    ``val_krcc``, ``val_rmse``, ``val_plcc_logistic``, ``lr_*``, ``images_per_s``,
    ``epoch_seconds``, ``best_val_srcc``, ``stopped_early``), ``node_id``,
    ``hostname``, ``pid`` (the trial process), ``resumed_from_epoch`` (epochs done before this
    process started: > 0 after a restart from a checkpoint), the device columns (below),
    ``time_total_s``, ``timestamp``.
``trials.parquet`` - one row per trial:
    ``trial_id``, ``kind`` (``search``: a trial of the search; ``split``: a ``--splits`` re-run of
    the selected config on another random split, with its own ``config.split_seed`` and its own
    ``test_*`` figures, never selectable; ``refit``: the selected config re-trained on the search
    split's training and validation photos, the model handed back, :mod:`iqa_ray.search.retrain`), ``status`` (``TERMINATED``, ``ERROR``, ``RUNNING``/``PENDING`` when exported
    mid-run), ``ended_by`` (``completed``: reached max epochs; ``scheduler``: stopped by ASHA /
    HyperBand; ``time_budget``: ended by ``--time-budget`` at an epoch where the scheduler cannot
    stop a trial; ``early_stopping``: the engine's own patience; ``error``; ``interrupted``; ``not
    started``), ``stopped_by_scheduler`` (``ended_by == "scheduler"``), ``stop_epoch``,
    ``max_epochs``, ``config.<key>`` for every run-config key of the trial (derived search keys
    resolved, e.g. ``config.lr`` from ``config.lr__unit``, which is kept too), ``best_val_srcc``,
    ``best_epoch``, ``best_val_plcc`` / ``_krcc`` / ``_rmse`` (at the best epoch), ``last_*``
    metrics, ``selection_score`` (the study's metric at the trial's best epoch, the value
    :mod:`iqa_ray.core.selection` compares), ``selected`` (the one trial the search handed back, as its ``summary.json`` records; while
    it runs, the current leader by the study's selection rule; notebooks read this column instead of ranking trials themselves), ``pareto_optimal`` (no other
    trial of the search is as good on every objective and better on one; with one objective, the
    best trials), the cost columns ``params_m`` / ``gflops`` / ``latency_ms`` / ``latency_batch_ms``
    / ``latency_batch_size`` (:mod:`iqa_ray.evaluation.cost`), ``test_srcc`` / ``test_plcc`` /
    ``test_krcc`` / ``test_rmse`` / ``test_plcc_logistic`` / ``test_n`` (only on the row of the
    model the search handed back, once the search has ended: the refit's row, or the selected
    trial's where there is no refit; its kept weights scored on the test split once; every other
    search row has none, so nothing invites choosing on test), ``test_source`` (``refit`` or
    ``checkpoint`` on that row, ``split run`` on split rows), ``time_total_s``, ``checkpoint_path`` (relative to the experiment folder),
    ``node_id``, ``hostname``, the device columns of its last report (below), ``git_revision``
    (of the code that trained the trial), ``error`` (last line of the error, if any), ``trial_dir``
    (folder name).

The device columns (:func:`iqa_ray.trainables.placement.device_report`): ``device`` where the trial
trained (``cpu``, ``cuda``, ``cuda:1``), ``gpu_ids`` the GPUs Ray gave it (empty without a GPU
share; a share with ``device`` ``cpu`` found no CUDA), ``cuda_visible_devices`` as the trial's
process saw it, and ``process_group`` the backend of a data-parallel trial's workers (``gloo``,
``nccl``; rank 0's columns; absent from ordinary trials).

``lr_*`` columns are each parameter group's learning rate at the start of the epoch. The
experiment folder also holds ``experiment.json`` (searcher, scheduler, budgets, and every searched
parameter with its role, type, declared range and grid) and ``summary.json`` (the selection).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from iqa_ray.core.deprecations import SEARCH, renamed_keys
from iqa_ray.core.io import atomic_path, git_revision
from iqa_ray.core.paths import REFIT_DIR
from iqa_ray.core.selection import (
    SelectionRule,
    finite,
    kept_report,
    objective_values,
    pareto_flags,
    select_by_rule,
    trial_score,
)

METRIC_PREFIXES = ("train_", "val_", "test_", "lr_")
COST_KEYS = ("params_m", "gflops", "latency_ms", "latency_batch_ms", "latency_batch_size")  # iqa_ray.evaluation.cost, reported by every trial
DEVICE_KEYS = ("device", "gpu_ids", "cuda_visible_devices", "process_group")  # iqa_ray.trainables.placement, every trial
SPLITS_DIR = "splits"  # the --splits re-runs of the selected config: a Tune experiment inside the experiment
_KEEP = (*COST_KEYS, *DEVICE_KEYS, "epoch", "images_per_s", "epoch_seconds", "best_val_srcc", "best_epoch", "stopped_early", "node_id",
         "hostname", "pid",
         "git_revision",
         "resumed_from_epoch", "time_total_s", "timestamp", "training_iteration")


def _read_results(trial_dir: Path) -> list[dict[str, Any]]:
    path = trial_dir / "result.json"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a crash mid-write: the rest still count
                continue
    return rows


def _trial_states(experiment: Path) -> dict[str, str]:
    """trial_id -> status from Tune's newest experiment state file."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return {}
    data = json.loads(states[-1].read_text())
    out = {}
    for entry in data.get("trial_data", []):
        trial = json.loads(entry[0]) if isinstance(entry, list) else entry
        if isinstance(trial, dict) and "trial_id" in trial:
            out[trial["trial_id"]] = trial.get("status", "UNKNOWN")
    return out


def _latest_checkpoint(trial_dir: Path) -> str | None:
    checkpoints = sorted(trial_dir.glob("checkpoint_*"))
    return str(checkpoints[-1]) if checkpoints else None


def _experiment_info(experiment: Path) -> dict[str, Any]:
    """``experiment.json`` (how the search was set up), or ``{}`` without one; keys under their current
    names (``scheduler`` in records before the rename, :mod:`iqa_ray.core.deprecations`)."""
    info_file = experiment / "experiment.json"
    return renamed_keys(json.loads(info_file.read_text()), SEARCH) if info_file.exists() else {}


def _resolver(info: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Maps a trial's params to its run config (derived keys such as ``lr__unit`` -> ``lr``)."""
    if not info:
        return dict
    from iqa_ray.search.study_file import parse_study

    definition = dict(info.get("study_definition") or {})
    definition["fixed"] = info.get("fixed", definition.get("fixed", {}))
    study = parse_study(definition, name=info.get("study", "study"))
    return study.with_encoders(info.get("encoders") or {}).resolve


def _selection(info: dict[str, Any]) -> SelectionRule:
    """The study's objectives and selection rule as recorded in ``experiment.json`` (the
    single-objective defaults without one)."""
    objectives = info.get("objectives") or [[info.get("metric", "val_srcc"), info.get("mode", "max")]]
    return SelectionRule.parse([tuple(o) for o in objectives], info.get("select", "best"))


def _finite_or_minus_inf(value: Any) -> float:
    number = finite(value)
    return -math.inf if number is None else number


def _scheduler_stops(info: dict[str, Any]) -> tuple[frozenset[int] | None, bool]:
    """(epochs at which the search's scheduler may stop a trial, or None when any; whether the search
    had a time budget), from ``experiment.json``."""
    budget = bool(info.get("time_budget"))
    scheduler = info.get("trial_scheduler")
    if scheduler == "asha" and all(info.get(k) for k in ("grace_period", "reduction_factor", "max_epochs")):
        from iqa_ray.search.tuner import asha_rungs

        rungs = asha_rungs(int(info["grace_period"]), int(info["reduction_factor"]), int(info["max_epochs"]))
        return frozenset(rungs), budget
    if scheduler == "none":
        return frozenset(), budget
    return None, budget


def ended_by(status: str, error: str | None, last: dict[str, Any] | None, max_epochs: Any,
              stops: tuple[frozenset[int] | None, bool] = (None, False)) -> str:
    """How a trial ended (``trials.parquet``'s ``ended_by``; the MLflow runs' tag of that name).

    Args:
        status: Tune's status of the trial (``TERMINATED``, ``ERROR``, ``RUNNING``, ...).
        error: the last line of its error, if any.
        last: its last report (``epoch``, ``stopped_early``), or ``None`` when it reported none.
        max_epochs: the epochs it could train.
        stops: the epochs at which the scheduler may stop a trial (``None``: any), and whether the
            search had a time budget.
    """
    if error or status == "ERROR":
        return "error"
    if last is None:
        return "not started"
    if status in ("RUNNING", "PENDING", "PAUSED"):
        return "interrupted"
    if max_epochs and last["epoch"] >= max_epochs:
        return "completed"
    if last.get("stopped_early"):
        return "early_stopping"
    rungs, budget = stops
    # With a time budget, a trial that ended where its scheduler cannot stop one was ended by the budget.
    if budget and rungs is not None and int(last["epoch"]) not in rungs:
        return "time_budget"
    return "scheduler"


def collect(experiment: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, epochs) data frames of an experiment folder."""
    experiment = Path(experiment)
    if not experiment.is_dir():
        raise FileNotFoundError(f"no experiment folder at {experiment}")
    info = _experiment_info(experiment)
    resolve = _resolver(info)
    summary_file = experiment / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    export_revision = git_revision()
    rule = _selection(info)
    metric, mode = rule.primary
    stops = _scheduler_stops(info)
    trial_rows, epoch_rows, reports = [], [], {}
    folders, inner_states = _trial_folders(experiment)
    handed_back = summary.get("model") if summary.get("test") else None  # the folder the test metrics belong to
    for trial_dir, kind in folders:
        params = json.loads((trial_dir / "params.json").read_text())
        results = _read_results(trial_dir)
        by_epoch = _by_epoch(results)
        trial_id = results[-1]["trial_id"] if results else trial_dir.name.removeprefix("trial_")
        if kind == "search":  # split re-runs are reports of the selected config, never candidates
            reports[trial_id] = [by_epoch[e] for e in sorted(by_epoch)]
        for epoch, r in sorted(by_epoch.items()):
            row = {"trial_id": trial_id, "kind": kind,
                   **{k: r[k] for k in r if k.startswith(METRIC_PREFIXES) or k in _KEEP}}
            epoch_rows.append(row)
        error_file = trial_dir / "error.txt"
        error = error_file.read_text().strip().splitlines()[-1][:500] if error_file.exists() else None
        status = inner_states.get(kind, {}).get(trial_id, "ERROR" if error else ("TERMINATED" if by_epoch else "PENDING"))
        max_epochs = params.get("epochs")
        row: dict[str, Any] = {"trial_id": trial_id, "kind": kind, "status": status}
        row.update({f"config.{k}": v for k, v in sorted(resolve(params).items())})
        row.update({f"config.{k}": v for k, v in params.items() if k not in resolve(params)})  # e.g. lr__unit
        if by_epoch:
            epochs = [by_epoch[e] for e in sorted(by_epoch)]
            # The epoch whose weights the trial keeps (select_epoch "best" or "last"); without that
            # record, the best validation SRCC (NaN never compares as best).
            best = kept_report(epochs) or max(epochs, key=lambda r: _finite_or_minus_inf(r.get("val_srcc")))
            last = epochs[-1]
            row.update({
                "stop_epoch": int(last["epoch"]), "max_epochs": max_epochs,
                "ended_by": ended_by(status, error, last, max_epochs, stops),
                "best_val_srcc": best.get("val_srcc"), "best_epoch": int(best["epoch"]),
                "best_val_plcc": best.get("val_plcc"), "best_val_krcc": best.get("val_krcc"),
                "best_val_rmse": best.get("val_rmse"),
                **{f"last_{k}": v for k, v in last.items() if k.startswith(("train_", "val_"))},
                "selection_score": trial_score(epochs, metric, mode),
                **{k: last.get(k) for k in COST_KEYS},
                "time_total_s": last.get("time_total_s"), "node_id": last.get("node_id"),
                "hostname": last.get("hostname"), **{k: last[k] for k in DEVICE_KEYS if k in last},
            })
        else:
            row.update({"stop_epoch": 0, "max_epochs": max_epochs, "ended_by": ended_by(status, error, None, max_epochs)})
        row["stopped_by_scheduler"] = row["ended_by"] == "scheduler"
        if kind == "split" and by_epoch:
            # Each split run is a final model of its own split: its kept weights were scored on
            # that split's test photos once, at its end (the --splits report).
            final = by_epoch[max(by_epoch)]
            row.update({k: v for k, v in final.items() if k.startswith("test_")})
            row["test_source"] = "split run"
        if kind == "refit" and handed_back == f"{REFIT_DIR}/{trial_dir.name}":
            # The model the search handed back: the test split was scored once, for it.
            row.update({f"test_{k}": v for k, v in summary["test"].items()})
            row["test_source"] = "refit"
        checkpoint = _latest_checkpoint(trial_dir)
        row.update({
            "checkpoint_path": str(Path(checkpoint).relative_to(experiment)) if checkpoint else None,
            "git_revision": (by_epoch[max(by_epoch)].get("git_revision") if by_epoch else None) or export_revision,
            "error": error, "trial_dir": trial_dir.name,
        })
        trial_rows.append(row)
    _mark_selected(trial_rows, reports, rule, summary)
    return pd.DataFrame(trial_rows), pd.DataFrame(epoch_rows)


def _trial_folders(experiment: Path) -> tuple[list[tuple[Path, str]], dict[str, dict[str, str]]]:
    """Every trial folder with its kind (``search``, ``split``, ``refit``), and each kind's trial states."""
    folders = [(p, "search") for p in sorted(experiment.iterdir()) if p.is_dir() and (p / "params.json").exists()]
    inner_states: dict[str, dict[str, str]] = {"search": _trial_states(experiment)}
    for kind, name in (("split", SPLITS_DIR), ("refit", REFIT_DIR)):  # Tune experiments inside the experiment
        inner = experiment / name
        if inner.is_dir():
            inner_states[kind] = _trial_states(inner)
            folders += [(p, kind) for p in sorted(inner.iterdir()) if p.is_dir() and (p / "params.json").exists()]
    return folders, inner_states


def _by_epoch(results: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """A trial's reports by epoch. A trial restored from a checkpoint re-reports nothing twice, but a
    retried epoch can appear twice in result.json: the last report of each epoch is kept."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for r in results:
        if "epoch" in r:
            by_epoch[int(r["epoch"])] = r
    return by_epoch


def _mark_selected(trial_rows: list[dict[str, Any]], reports: dict[str, list[dict[str, Any]]], rule: SelectionRule,
                   summary: dict[str, Any]) -> None:
    """``selected``, ``pareto_optimal`` and, on the model handed back, the test metrics of each search row."""
    handed_back = summary.get("model") if summary.get("test") else None  # the folder the test metrics belong to
    # The trial the end-of-run summary handed back; mid-run (no summary yet) the current leader by
    # the same rule (no test yet).
    chosen = summary.get("best_trial_id") if summary.get("best_trial_id") in reports else select_by_rule(reports, rule)
    # Pareto-optimal among the search's trials on every objective (single-objective: the best ones).
    front = pareto_flags({k: objective_values(v, rule.objectives) for k, v in reports.items()},
                         [d for _, d in rule.objectives])
    for row in trial_rows:
        if row["kind"] != "search":
            row["selected"] = row["pareto_optimal"] = False
            continue
        row["selected"] = row["trial_id"] == chosen
        row["pareto_optimal"] = bool(front.get(row["trial_id"], False))
        # The test metrics sit on the row of the model handed back: the selected trial's, unless a refit's.
        tested = (row["selected"] and summary.get("best_trial_id") == chosen and summary.get("test")
                  and (handed_back is None or handed_back == row["trial_dir"]))
        row.update({f"test_{k}": v for k, v in (summary["test"].items() if tested else ())})
        row["test_source"] = "checkpoint" if tested else None


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    # Mixed-type config columns (e.g. a choice of numbers and strings) become strings, so the
    # file always writes; the original values stay in each trial's params.json.
    for column in frame.columns:
        if frame[column].dtype == object:
            kinds = {type(v) for v in frame[column].dropna()}
            if len(kinds) > 1 or (kinds and not kinds <= {str, bool, int, float}):
                frame[column] = frame[column].map(lambda v: None if v is None else json.dumps(v) if not isinstance(v, str) else v)
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def export_experiment(experiment: str | Path) -> dict[str, Path]:
    """Write ``trials.parquet`` and ``epochs.parquet`` into the experiment folder (atomically)."""
    experiment = Path(experiment)
    trials, epochs = collect(experiment)
    out = {"trials": experiment / "trials.parquet", "epochs": experiment / "epochs.parquet"}
    _write_parquet(trials, out["trials"])
    _write_parquet(epochs, out["epochs"])
    return out
