"""The end of a search: the trial it hands back, its test score beside the baselines, the summary.

The trial is selected on validation only (the study's selection rule); the model handed back (the
selected trial, or its refit, :mod:`iqa_ray.search.retrain`) is scored on the test split once, beside
PIQE, BRISQUE and a linear probe on the same frozen backbone scored on the same photos; the
``--splits`` runs follow, then ``summary.json`` and the exports. :func:`print_summary` prints it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Any

from iqa_ray.core.errors import LaunchError
from iqa_ray.core.io import atomic_write_json, git_revision
from iqa_ray.core.selection import kept_report, objective_values, pareto_flags, select_by_rule
from iqa_ray.search.console import device_note
from iqa_ray.search.ensemble import ensemble_hand_back, ensemble_lines, ensemble_summary, ensemble_test
from iqa_ray.search.export import export_experiment
from iqa_ray.search.phases import Phases, describe
from iqa_ray.search.retrain import REFIT_FIT_ON, hand_back, refit_plan, run_splits, split_lines
from iqa_ray.search.settings import SearchSettings, experiment_dir_hint
from iqa_ray.search.study import describe_model, model_record
from iqa_ray.search.tasks import has_test, score_checkpoint, score_classical, score_probe
from iqa_ray.search.tensorboard import tensorboard_command
from iqa_ray.search.tuner import close_orphaned_optuna_trials
from iqa_ray.training.config import TrainConfig

PROBE = "linear_probe"  # the summary's name for the frozen-feature linear probe baseline


def summarise(settings: SearchSettings, results: Any, decoded: Any, elapsed: float, *, features: Any = None,
              table: Any = None, phases: Phases | None = None) -> dict[str, Any]:
    """Select the trial to hand back (validation only), score it on the test split once, set it
    beside the baselines, re-train it on ``settings.splits`` more splits, export; each phase timed.

    Args:
        settings: the search's settings (the study's metric and mode select).
        results: Tune's ResultGrid.
        decoded: the decoded dataset or its object-store reference (the test split is scored from it).
        elapsed: seconds the search took.
        features: the shared feature cache (``feature_cache`` searches), reused by the probe and the splits.
        table: the decoded dataset's label table (``--splits`` draws the other splits of its rows).
        phases: the search's phase timer (the refit, test, baselines, splits and report phases are added).
    """
    phases = phases if phases is not None else Phases()
    study = settings.effective_study
    errors = [r for r in results if r.error is not None]
    reports = trial_reports(results)
    chosen = selected_trial_id(settings, reports, errors)
    best, rows = reports[chosen]
    best_row = kept_report(rows) or max(rows, key=lambda row: _selection_value(row.get(study.metric), study.mode))
    # The split and refit runs train single-process trials: one GPU at most each.
    single = replace(settings, gpus_per_trial=min(settings.gpus_per_trial, 1.0), workers_per_trial=1)
    resolved = study.resolve(best.config)
    train_config = TrainConfig.from_dict(resolved)
    # PIQE and BRISQUE read only the test photos: they run while a refit trains.
    overlap = refit_plan(single, train_config)[0] and table is not None and has_test(table)
    classical = (start_classical_baselines(decoded, cpus=settings.cpus_per_trial)
                 if overlap else None)
    with phases("refit"):
        if settings.ensemble:  # --ensemble K: several trials handed back together (search/ensemble.py)
            ensemble, handed, refit = ensemble_hand_back(single, reports, chosen, decoded, features)
        else:
            ensemble, (handed, refit) = None, hand_back(single, best, resolved, decoded, features)
    with phases("test"):
        test, test_error, scoring = (ensemble_test(settings, ensemble, handed, decoded, features) if ensemble
                                     else score_handed_back(settings, handed, decoded, features))
    config = study.reported_config(best.config)
    baselines, baselines_error = {}, None
    with phases("baselines"):
        if test:
            baselines, baselines_error = baselines_beside(settings, train_config, decoded,
                                                          features=features,
                                                          refit=bool(refit.get("trial") or refit.get("trials")),
                                                          classical=classical)
        elif classical is not None:
            cancel(classical)
    summary = {
        "study": settings.study.name, "experiment": experiment_dir_hint(settings), "git_revision": git_revision(),
        "searcher": settings.searcher, "trial_scheduler": settings.scheduler, "trials": len(results),
        "errored_trials": len(errors), "elapsed_s": round(elapsed, 1), "devices": trained_on(reports),
        "metric": study.metric, "mode": study.mode,
        "best_trial": best.path.rsplit("/", 1)[-1] if best.path else None,
        "best_config": {k: v for k, v in config.items()},
        "best_val": {"srcc": float(best_row["val_srcc"]), "plcc": float(best_row["val_plcc"]),
                     "epoch": int(best_row["epoch"]), study.metric: float(best_row[study.metric])},
        "best_trial_id": best.metrics.get("trial_id"),
        # The model handed back (score / load_model / export-model / evaluate read it): the refit's
        # trial folder, or the selected trial's.
        "model": refit.get("trial") or (best.path.rsplit("/", 1)[-1] if best.path else None),
        "trained": trained_record(settings, resolved), "refit": refit, "test": test, "test_source": test_source(refit),
        # How the test scores were computed: the head on the feature cache, checked against the whole
        # network on a few photos, or the whole network on every photo (search/ensemble.test_predictions).
        "test_scoring": scoring,
        # Validation SRCC of the selected epoch minus its test SRCC: how much the pick flatters itself.
        "val_test_gap": float(best_row["val_srcc"]) - test["srcc"] if test else None,
        "baselines": baselines,
    }
    if ensemble:
        summary.update(ensemble_summary(ensemble, test))
    summary.update(optional_keys(settings, reports, test, baselines, test_error, baselines_error))
    if settings.splits and best.checkpoint is not None:
        with phases("splits"):
            summary["splits"] = run_splits(single, resolved, decoded, table, features=features)
    with phases("report"):
        summary["exports"] = write_summary(settings, summary)
    summary.update(phases=phases.record(), total_s=round(phases.total(), 1))
    write_summary_file(settings, summary)  # again, with the report phase's time
    return summary


def optional_keys(settings: SearchSettings, reports: dict[str, tuple[Any, list[dict[str, Any]]]],
                  test: dict[str, float], baselines: dict[str, Any], test_error: str | None,
                  baselines_error: str | None) -> dict[str, Any]:
    """``summary.json``'s keys that only some searches have: the selection rule and Pareto front of
    multi-objective studies, the margin over the probe, errors, the rows left out."""
    study, out = settings.effective_study, {}
    if study.multi_objective or study.select != "best":
        out.update(objectives=[list(o) for o in study.objectives], select=study.select,
                   selection_rule=study.selection_rule.describe(), pareto_front=pareto_front(reports, study.objectives))
    if baselines.get(PROBE):
        out["versus_probe"] = test["srcc"] - baselines[PROBE]["srcc"]
    if test_error:
        out["test_error"] = test_error
    if baselines_error:
        out["baselines_error"] = baselines_error
    if settings.skipped_rows:
        out["skipped_rows"] = list(settings.skipped_rows)
    return out


def trained_record(settings: SearchSettings, resolved: dict[str, Any]) -> dict[str, Any]:
    """What the model handed back is (summary.json's ``trained``): :func:`~iqa_ray.search.study.model_record`
    of the selected trial's resolved config, and the recipe that set it (``None``: the study as written)."""
    return {**model_record(resolved), "recipe": settings.recipe["name"] if settings.recipe else None}


def test_source(refit: dict[str, Any]) -> str:
    """Which weights the summary's test score is of."""
    if refit.get("trial"):
        return (f"the selected configuration re-trained on {REFIT_FIT_ON} ({refit['trial']}), its final weights, "
                "scored once after the search")
    return "the selected trial's kept weights (chosen by validation, or its final ones), scored once after the search"


def trial_reports(results: Any) -> dict[str, tuple[Any, list[dict[str, Any]]]]:
    """Every trial that reported an epoch: its id -> (its Tune result, its reports in order)."""
    reports = {}
    for r in results:
        frame = r.metrics_dataframe
        if frame is not None and len(frame):
            reports[r.metrics.get("trial_id") or r.path] = (r, frame.to_dict("records"))
    return reports


def trained_on(reports: dict[str, tuple[Any, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Where the search's trials trained (summary.json's ``devices``): trials per device (``cpu``,
    ``cuda``, ...), and the trials that held a GPU share but found no CUDA, with the console's note."""
    last = {trial_id: rows[-1] for trial_id, (_, rows) in reports.items()}
    counts = Counter(str(row.get("device") or "not reported") for row in last.values())
    without = sorted(t for t, row in last.items() if device_note(t, row) is not None)
    record: dict[str, Any] = {"trials": dict(sorted(counts.items())), "gpu_share_without_cuda": without}
    if without:
        record["note"] = device_note(without[0], last[without[0]])
    return record


def selected_trial_id(settings: SearchSettings, reports: dict[str, tuple[Any, list[dict[str, Any]]]],
                 errors: list[Any]) -> str:
    """The trial the search hands back, by the study's selection rule on validation only.

    Raises:
        LaunchError: no trial reported, or none qualifies (every finished trial is exported first).
    """
    study = settings.effective_study
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
    return chosen


def write_summary(settings: SearchSettings, summary: dict[str, Any]) -> dict[str, str]:
    """``summary.json``, ``trials.parquet`` and ``epochs.parquet`` in the experiment folder (local
    storage; none on remote storage); returns the exports' paths."""
    local = settings.local_experiment_dir()
    if local is None:
        return {}
    close_orphaned_optuna_trials(local / "optuna.db")
    write_summary_file(settings, summary)  # read by the export (selected trial)
    return {k: str(v) for k, v in export_experiment(local).items()}


def write_summary_file(settings: SearchSettings, summary: dict[str, Any]) -> None:
    """``summary.json`` in the experiment folder (local storage), written atomically."""
    local = settings.local_experiment_dir()
    if local is not None:
        atomic_write_json(local / "summary.json", summary)


def score_handed_back(settings: SearchSettings, handed: Any, decoded: Any,
                      features: Any = None) -> tuple[dict[str, float], str | None, dict[str, Any]]:
    """The model handed back scored on the test split once, why there is no score (or ``None``), and
    how the scores were computed (:func:`~iqa_ray.search.ensemble.test_predictions`)."""
    if handed.checkpoint is None:
        return {}, "the selected trial left no checkpoint", {}
    test, scoring = score_test_split(handed.checkpoint, decoded, cpus=settings.cpus_per_trial,
                                     gpus=min(settings.gpus_per_trial, 1.0), features=features)
    return test, None if test else "the dataset has no test split", scoring


def baselines_beside(settings: SearchSettings, config: TrainConfig, decoded: Any, *, features: Any,
                     refit: bool, classical: dict[str, Any] | None = None) -> tuple[dict[str, dict[str, Any]], str | None]:
    """:func:`score_baselines` with one trial's resources, and the error that stopped them (or ``None``)."""
    try:  # a baseline that cannot run (e.g. hub weights offline) must not lose the finished search
        return score_baselines(config, decoded, cpus=settings.cpus_per_trial, gpus=min(settings.gpus_per_trial, 1.0),
                               features=features, refit=refit, classical=classical), None
    except Exception as exc:  # noqa: BLE001 - reported in the summary and printed, not swallowed
        return {}, f"{type(exc).__name__}: {exc}"


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


def score_baselines(config: TrainConfig, decoded: Any, *, cpus: float, gpus: float, features: Any = None,
                    refit: bool = False, classical: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """PIQE, BRISQUE and the linear probe on the frozen backbone of ``config``, on the test split
    (``refit``: the probe fitted again on training and validation photos, beside a refit model).

    The probe's Ray task with one trial's resources beside PIQE's and BRISQUE's task, both reading
    the dataset's object-store copy, like :func:`score_test_split`; ``classical``: PIQE's and
    BRISQUE's results, already started (:func:`start_classical_baselines`).
    """
    import ray

    task = ray.remote(score_probe).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
    probe = task.remote(config, decoded, int(cpus), features, refit)
    classical = classical if classical is not None else start_classical_baselines(decoded, cpus=cpus)
    names = [PROBE, *classical]
    return dict(zip(names, ray.get([probe, *classical.values()])))


def start_classical_baselines(decoded: Any, *, cpus: float) -> dict[str, Any]:
    """PIQE's and BRISQUE's scores of the test photos of ``decoded`` (its object-store reference),
    started now: name -> the reference of its result. One Ray task computes them one after the
    other (they use one thread), so that while they run a trial's worth of CPUs stays free for the
    refit: two tasks took both of a 2-core machine's CPUs and the refit waited for them."""
    import ray

    from iqa_ray.evaluation.baselines import BASELINES

    names = tuple(BASELINES)
    task = ray.remote(score_classical).options(num_cpus=min(cpus, 1.0), num_gpus=0, max_retries=0,
                                                num_returns=len(names))
    refs = task.remote(decoded, names)
    return dict(zip(names, refs if isinstance(refs, list) else [refs]))


def cancel(tasks: dict[str, Any]) -> None:
    """Cancel Ray tasks whose results are no longer wanted."""
    import ray

    for ref in tasks.values():
        ray.cancel(ref)


def score_test_split(checkpoint: Any, decoded: Any, *, cpus: float, gpus: float,
                     features: Any = None) -> tuple[dict[str, float], dict[str, Any]]:
    """Score the selected trial's best-by-validation weights on the test split, once; its metrics,
    and how they were computed (from the search's feature cache where it fits the checkpoint,
    checked against the whole network on a few photos: :func:`~iqa_ray.search.ensemble.test_predictions`).

    Runs as a Ray task with one trial's resources (its GPU share on a GPU cluster), reading the
    dataset the trials read from the object store (pass its reference: no second copy).
    """
    import ray

    task = ray.remote(score_checkpoint).options(num_cpus=cpus, num_gpus=gpus, max_retries=1)
    return ray.get(task.remote(checkpoint, decoded, int(cpus), features))


def scoring_line(scoring: dict[str, Any], n: int) -> str:
    """How the test scores were computed, in words (``summary.json``'s ``test_scoring``)."""
    if scoring["source"] == "feature cache":
        return (f"scored {n} test photos from the feature cache; the whole network scored {scoring['checked']} of them "
                f"within {scoring['max_abs_diff']:.1g} MOS points of it")
    if "max_abs_diff" in scoring:
        return (f"scored {n} test photos through the whole network: on {scoring['checked']} of them its scores were "
                f"up to {scoring['max_abs_diff']:.3g} MOS points from the feature cache's")
    return f"scored {n} test photos through the whole network"


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
                     + f"): SRCC {_metric(probe['srcc'])}  PLCC {_metric(probe['plcc'])}")
        for name in ("piqe", "brisque"):
            lines.append(classical_line(name, b[name]))
        margin = s.get("versus_probe")
        if margin is None or not math.isfinite(margin):
            lines.append("the model handed back cannot be compared with the probe: one of them has no test SRCC")
        else:
            lines.append(f"the model handed back beats the probe by {margin:+.4f} SRCC" if margin > 0
                         else f"the model handed back does not beat the probe ({margin:+.4f} SRCC)")
    elif s.get("baselines_error"):
        lines.append(f"baselines could not be computed: {s['baselines_error']}")
    return lines


def skipped_line(skipped: list[dict[str, Any]], shown: int = 3) -> str:
    """The bad rows a search left out (``--skip-bad-rows``), for the console: their count and the first few."""
    def one(row: dict[str, Any]) -> str:
        where = f"row {row['row']} " if row.get("row") is not None else ""
        return f"{where}(image {row['image']!r}): {row['reason']}"

    return (f"{len(skipped)} bad row{'s' if len(skipped) > 1 else ''} skipped (--skip-bad-rows), in no split: "
            + "; ".join(one(row) for row in skipped[:shown]) + ("; ..." if len(skipped) > shown else ""))


def _metric(value: Any) -> str:
    """A correlation for the console: 4 decimals, or ``undefined`` (never a bare ``nan``)."""
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "undefined"


def classical_line(name: str, record: dict[str, Any]) -> str:
    """PIQE's or BRISQUE's summary line: its SRCC and PLCC over the photos it scored, how many it
    could not score and why, or why it has no correlation at all."""
    label = name.upper()
    srcc, plcc = record.get("srcc"), record.get("plcc")
    finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (srcc, plcc))
    n, scored = record.get("n"), record.get("scored", record.get("n"))
    if not finite:
        why = record.get("undefined") or "its correlation with MOS is undefined"
        return f"  {label}: no SRCC or PLCC: {why}" + (f"; {record['note']}" if record.get("note") else "")
    line = f"  {label}: SRCC {srcc:.4f}  PLCC {plcc:.4f}"
    if record.get("note"):
        line += f" on the other {scored} photos; {record['note']}"
    return line


def print_summary(settings: SearchSettings, s: dict[str, Any]) -> None:
    print("\n" + "=" * 78)
    print(f"study {s['study']}: {s['trials']} trials ({s['errored_trials']} errored) in {s['elapsed_s']:.0f} s, "
          f"searcher={s['searcher']}, trial_scheduler={s['trial_scheduler']}")
    if s.get("trained"):
        recipe = s["trained"].get("recipe")
        print(f"trained: {describe_model(s['trained'])}; " + (f"recipe {recipe}" if recipe else "no recipe"))
    if s.get("skipped_rows"):
        print(f"dataset: {skipped_line(s['skipped_rows'])}; summary.json lists every one")
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
        which = "the ensemble's" if s.get("ensemble") else "selected trial's"
        print(f"test (the model handed back, held-out photos): SRCC {s['test']['srcc']:.4f}  PLCC {s['test']['plcc']:.4f}  "
              f"({which} validation SRCC - test SRCC = {s['val_test_gap']:+.4f})")
        if s.get("test_scoring"):
            print(f"  {scoring_line(s['test_scoring'], s['test']['n'])}")
    for line in ensemble_lines(s.get("ensemble") or {}):
        print(line)
    for line in baseline_lines(s):
        print(line)
    for line in split_lines(s.get("splits") or {}):
        print(line)
    if s.get("phases"):
        print(describe(s["phases"], s["total_s"]))
    print(f"results: {s['experiment']}")
    for name, path in s["exports"].items():
        print(f"  {name}: {path}")
    if not s["exports"]:
        print("  (remote storage: copy the experiment folder locally, then `iqa-ray export FOLDER` "
              "writes trials.parquet / epochs.parquet)")
    print(f"TensorBoard: {tensorboard_command(s['experiment'])}")
    tracked = s.get("mlflow") or {}
    if tracked.get("error"):
        print(f"MLflow ({tracked['tracking_uri']}): the summary run could not be logged: {tracked['error']}")
    elif tracked:
        print(f"MLflow: {tracked['ui']}  (experiment {tracked['experiment']})")
    print("=" * 78)

