"""Re-training the selected configuration: the model a search hands back (the refit) and ``--splits``.

Both train the configuration the search selected again, from scratch, in a Tune experiment of
their own inside the experiment folder (``refit/``, ``splits/``; built by
:func:`iqa_ray.search.tuner.experiment_tuner`), each trial with one trial's resources.

**The refit.** A search selects a configuration on its validation photos. Where the configuration
then chooses nothing on them (``select_epoch = "last"``, no early stopping, no plateau schedule:
the cpu recipe), those photos have done their job, and the model handed back is better trained on
them too, as scikit-learn's ``GridSearchCV(refit=True)`` does and as IQA papers train on 80 % of a
dataset: after the search, one more Tune trial trains the selected configuration from scratch on
the search split's training and validation photos (``train_on_val``), for its full epochs, and
keeps its final weights. That trial's checkpoint is the model ``summary.json`` names (``model``),
the one the test split is scored on (once), and the one ``iqa-ray score`` / ``load_model`` /
``export-model`` / ``evaluate`` read from the experiment folder. Its trial lives in the
experiment's ``refit/`` folder and appears in ``trials.parquet`` with ``kind = "refit"``.

Where the configuration chooses on validation (``select_epoch = "best"``, early stopping, a plateau
schedule), a refit would have nothing to choose with, so the selected trial's own weights are
handed back, as they are with ``SearchSettings.refit = False`` (``--no-refit``).

What was measured before this became the default (docs/BENCHMARKS.md, "Why each recipe
choice"): on LIVE Challenge, the recipe's head trained on all of a cross-validation
fold's other photos instead of three quarters of them gained +0.012 +- 0.004 SRCC (19 of 25 folds).

**``--splits N``** re-trains the selected configuration on N more random splits, reported as
papers do. IQA papers report the median (and often mean +- std) of test SRCC/PLCC over 10 random
80/20 splits of a dataset, because one split of a few hundred photos moves SRCC by several
hundredths. After a search has selected its configuration (on the validation photos of the
search's split), each of N new split seeds draws another split of the same photos by source photo;
one Tune trial per split trains the selected configuration from scratch on it, keeps its weights
by the configuration's own rule (validation only) and scores them on that split's test photos
once. Where that rule chooses nothing on validation (``select_epoch = "last"``, no early stopping,
no plateau schedule; the cpu recipe's), the split's model trains on its training and validation
photos together (``train_on_val``: a refit of a configuration already selected, the papers' 80 %
for training); ``SearchSettings.splits_train_on_val = False`` (``--splits-train-only``) keeps the
validation photos out. The trials run in parallel as resources allow, in a Tune experiment inside
the search's folder (``splits/``), and their rows appear in ``trials.parquet`` with ``kind =
"split"``.

Beside each split's model, the frozen-feature linear probe is fitted and scored on the same split
(ridge strength chosen on that split's validation photos, then, beside a refit model, fitted again
on training and validation photos), so "beats the probe on every split" is measured, not assumed.

What this protocol does not hide: the configuration was selected on the search split's validation
photos, and the other splits' test photos were among that split's photos. That is the papers'
protocol too (hyper-parameters chosen once, then N splits); a strictly held-out figure is the
search's own test result, which ``summary.json`` keeps beside this one.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from iqa_ray.core.paths import REFIT_DIR
from iqa_ray.search.export import SPLITS_DIR
from iqa_ray.search.settings import SearchSettings
from iqa_ray.search.tuner import experiment_tuner
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.config_sections import validation_chooser

REFIT_FIT_ON = "training and validation photos"


# ----------------------------------------------------------------------------- the refit, the model handed back


def hand_back(settings: SearchSettings, best: Any, resolved: dict[str, Any], decoded: Any,
              features: Any) -> tuple[Any, dict[str, Any]]:
    """The model the search hands back: a refit of the selected configuration on training and
    validation photos where it chooses nothing on validation (:func:`run_refit`), else the
    selected trial itself. A refit that fails hands back the selected trial, with the error recorded.

    Returns:
        The Tune result whose checkpoint is handed back, and ``summary.json``'s ``refit``.
    """
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


def refit_plan(settings: SearchSettings, config: TrainConfig) -> tuple[bool, str]:
    """Whether the model handed back is a refit of the selected configuration, and in words why (not)."""
    if not settings.refit:
        return False, "--no-refit: the selected trial's own weights, trained on training photos"
    chooser = validation_chooser(config.optim)
    if chooser:
        return False, f"the selected trial's own weights ({chooser} chooses on validation photos, so no refit)"
    return True, (f"the selected configuration re-trained on {REFIT_FIT_ON} "
                  "(select_epoch = 'last' chooses nothing on validation)")


def run_refit(settings: SearchSettings, resolved: Mapping[str, Any], decoded: Any, *, features: Any = None) -> Any:
    """Train the selected configuration on the search split's training and validation photos (one
    Tune trial in ``refit/``) and return its Tune ``Result``.

    Args:
        settings: the search's :class:`~iqa_ray.search.settings.SearchSettings` (resources, storage).
        resolved: the selected trial's flat run config.
        decoded: the decoded dataset's object-store reference (the search's split, as the trials saw it).
        features: the search's feature cache, if any.
    """
    trainable = retrain_trainable(settings, decoded, features, gpus=min(settings.gpus_per_trial, 1.0))
    tuner = experiment_tuner(settings, trainable, {**resolved, "train_on_val": True}, name=REFIT_DIR, num_samples=1)
    return tuner.fit()[0]


def retrain_trainable(settings: SearchSettings, decoded: Any, features: Any, *, gpus: float, **parameters: Any) -> Any:
    """:func:`~iqa_ray.trainables.iqa.iqa_trainable` with the search's data and one trial's resources
    (``gpus`` of a GPU), for a re-training run; ``parameters`` go to the trainable too."""
    from ray import tune

    from iqa_ray.trainables.iqa import iqa_trainable

    return tune.with_resources(
        tune.with_parameters(iqa_trainable, decoded=decoded, cpus_per_trial=settings.cpus_per_trial,
                             features=features, **parameters),
        {"cpu": settings.cpus_per_trial, "gpu": gpus},
    )


def trial_folder(result: Any) -> str:
    """A Tune result's trial folder name (the last part of its path)."""
    return str(result.path).rstrip("/").rsplit("/", 1)[-1]


def refit_folder(result: Any) -> str:
    """The refit trial's folder relative to the experiment folder (``refit/<trial folder>``)."""
    return f"{REFIT_DIR}/{trial_folder(result)}"


@dataclass(frozen=True)
class MemberConfigs:
    """The trainable's ``resolve`` for the refit of an ensemble's members: a trial's config names its
    member (``ensemble_member``: the search trial's id), which maps to that member's flat run config,
    trained on training and validation photos."""

    configs: Mapping[str, Mapping[str, Any]]

    def __call__(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.configs[config["ensemble_member"]], "train_on_val": True}


def hand_back_ensemble(settings: SearchSettings, members: Mapping[str, tuple[Any, dict[str, Any]]], decoded: Any,
                       features: Any) -> tuple[dict[str, tuple[Any, str]], dict[str, Any]]:
    """The models of an ensemble's members (``--ensemble``): each distinct member's configuration
    re-trained on training and validation photos where none of them chooses on validation (one Tune
    experiment in ``refit/``, the members as its trials, run side by side as resources allow), else
    the members' own trials. A refit that fails hands back the members' own trials, with the error.

    Args:
        members: search trial id -> (its Tune result, its resolved flat config).

    Returns:
        Member id -> (the Tune result whose checkpoint is handed back, its folder relative to the
        experiment folder), and ``summary.json``'s ``refit``.
    """
    own = {t: (result, trial_folder(result)) for t, (result, _) in members.items()}
    plans = {t: refit_plan(settings, TrainConfig.from_dict(resolved)) for t, (_, resolved) in members.items()}
    declined = [why for planned, why in plans.values() if not planned]
    report: dict[str, Any] = {"planned": not declined, "model": declined[0] if declined else (
        f"each member's configuration re-trained on {REFIT_FIT_ON} (select_epoch = 'last' chooses nothing on validation)")}
    if declined or any(result.checkpoint is None for result, _ in own.values()):
        return own, report
    from ray import tune

    print(f"[refit] {report['model']}: {len(members)} more trials, the ensemble handed back", flush=True)
    trainable = retrain_trainable(settings, decoded, features, gpus=min(settings.gpus_per_trial, 1.0),
                                  resolve=MemberConfigs({t: resolved for t, (_, resolved) in members.items()}))
    try:  # the search has finished: whatever the refits do, the members' own trials are kept
        # The keys every member shares are in each trial's params.json (and trials.parquet); MemberConfigs adds the rest.
        configs = [resolved for _, resolved in members.values()]
        shared = {k: v for k, v in configs[0].items() if all(c.get(k) == v for c in configs[1:])}
        space = {**shared, "train_on_val": True, "ensemble_member": tune.grid_search(sorted(members))}
        results = experiment_tuner(settings, trainable, space,
                                   name=REFIT_DIR, num_samples=1, max_concurrent_trials=settings.max_concurrent).fit()
        refits = {r.config["ensemble_member"]: r for r in results}
        failed = [f"{t}: {r.error}" if r.error is not None else f"{t}: no checkpoint"
                  for t, r in sorted(refits.items()) if r.error is not None or r.checkpoint is None]
        failed += [f"{t}: did not run" for t in sorted(set(members) - set(refits))]
    except Exception as exc:  # noqa: BLE001 - printed and recorded in summary.json, not swallowed
        failed = [f"{type(exc).__name__}: {exc}"]
    if failed:
        problem = "; ".join(failed)
        print(f"[refit] failed ({problem}); the members' own trials are handed back", flush=True)
        report.update(error=problem, model="the members' own trials (the refit failed)")
        return own, report
    handed = {t: (refits[t], refit_folder(refits[t])) for t in members}
    report["trials"] = {t: folder for t, (_, folder) in sorted(handed.items())}
    return handed, report


# ----------------------------------------------------------------------------- --splits


def split_progress(settings: SearchSettings) -> list[Any]:
    """The live table of the split runs (one row per split seed; none with ``--verbose``)."""
    if settings.verbose:
        return []
    from iqa_ray.search.console import TrialProgress

    return [TrialProgress(settings.study.metric, settings.study.mode, params=("split_seed",),
                          every=settings.progress_every)]


def split_seeds(base_seed: int, n: int) -> list[int]:
    """The N split seeds after the search's own (``base_seed + 1 ... base_seed + n``)."""
    return [base_seed + 1 + i for i in range(n)]


def split_columns(config: TrainConfig, table: Any, seeds: list[int]) -> dict[int, list[str]]:
    """Each seed's split of the rows of ``table`` (the decoded dataset's rows, in order).

    The label table is read again with each seed (no image is decoded; ``skip_bad_rows`` leaves
    the same rows out); rows are matched by ``image_id``, so images skipped at decode time do not
    shift the assignment.
    """
    from iqa_ray.training.loaders import load_run_table

    ids = table["image_id"].astype(str).tolist()
    out = {}
    for seed in seeds:
        other = load_run_table(config, split_seed=seed)
        by_id = dict(zip(other["image_id"].astype(str), other["split"]))
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(f"split seed {seed}: {len(missing)} decoded images are not in the re-read table "
                             f"(first: {missing[0]}); the dataset changed during the search")
        out[seed] = [by_id[i] for i in ids]
    return out


def summarise_values(values: list[float]) -> dict[str, float]:
    """Median, mean and sample std (n - 1) of finite values, and how many there were."""
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return {"n": 0}
    return {"median": statistics.median(finite), "mean": statistics.fmean(finite),
            "std": statistics.stdev(finite) if len(finite) > 1 else 0.0, "n": len(finite)}


def probe_on_splits(features: np.ndarray, table: Any, splits: Mapping[int, list[str]], *,
                    refit: bool = False) -> dict[int, dict[str, Any]]:
    """The ridge probe (:func:`iqa_ray.evaluation.baselines.ridge_probe`) fitted and scored on each split
    (``refit``: fitted again on training and validation photos once its strength is chosen)."""
    from iqa_ray.evaluation.baselines import ridge_probe

    mos = table["mos"].to_numpy(dtype=np.float64)
    out = {}
    for seed, column in splits.items():
        split = np.asarray(column)
        out[seed] = ridge_probe(features, mos, *(np.flatnonzero(split == s) for s in ("train", "val", "test")),
                                refit=refit)
    return out


def run_splits(settings: SearchSettings, resolved: Mapping[str, Any], decoded: Any, table: Any, *,
               features: Any = None) -> dict[str, Any]:
    """Train the selected config on ``settings.splits`` new splits (one Tune trial each) and report.

    Args:
        settings: the search's :class:`~iqa_ray.search.settings.SearchSettings` (resources, storage, name).
        resolved: the selected trial's flat run config.
        decoded: the decoded dataset's object-store reference (the same images for every split).
        table: its label table (rows in the same order).
        features: the search's feature cache, if any (shared again; the features do not depend on the split).

    Returns:
        ``summary.json``'s ``splits``: the seeds, one row per split (test SRCC/PLCC of the split's
        model, the probe's test SRCC on that split, whether the model beats it) and the median,
        mean and std of each.
    """
    from ray import tune

    from iqa_ray.training.features import probe_features

    config = TrainConfig.from_dict(resolved)
    seeds = split_seeds(config.data.split_seed, settings.splits)
    columns = split_columns(config, table, seeds)
    refit, fit_on = split_fit(settings, config)
    print(f"[splits] re-training the selected config on {len(seeds)} random splits (seeds {seeds}), "
          f"on {fit_on}" + ("; their val_srcc is measured on photos they train on: it follows the fit, "
                            "the summary gives each split's test SRCC" if refit else ""), flush=True)
    trainable = retrain_trainable(settings, decoded, features, gpus=settings.gpus_per_trial, splits=columns,
                                  score_test=True)
    space = {**resolved, "split_seed": tune.grid_search(seeds), "train_on_val": refit}
    results = experiment_tuner(settings, trainable, space, name=SPLITS_DIR, callbacks=split_progress(settings),
                               num_samples=1, max_concurrent_trials=settings.max_concurrent).fit()
    probe_matrix = probe_features(features, config)
    if probe_matrix is None:  # no cache to take them from: one backbone pass over every image, once
        probe_matrix = _probe_matrix(config, decoded, settings)
    probe = probe_on_splits(probe_matrix, table, columns, refit=refit)
    rows = []
    for result in results:
        seed = int(result.config["split_seed"])
        m = result.metrics or {}
        row = {"split_seed": seed, "test_srcc": m.get("test_srcc"), "test_plcc": m.get("test_plcc"),
               # a refit model trained on its validation photos: their SRCC measures nothing
               "val_srcc": None if refit else m.get("best_val_srcc"), "n_test": columns[seed].count("test"),
               "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}"}
        if seed in probe:
            row["probe_srcc"] = probe[seed]["srcc"]
            row["beats_probe"] = row["test_srcc"] is not None and row["test_srcc"] > probe[seed]["srcc"]
        rows.append(row)
    rows.sort(key=lambda r: r["split_seed"])
    report = {"seeds": seeds, "per_split": rows,
              "test_srcc": summarise_values([r["test_srcc"] for r in rows]),
              "test_plcc": summarise_values([r["test_plcc"] for r in rows]),
              "train_on_val": refit, "fit_on": fit_on,
              "protocol": "selected config re-trained from scratch on each split, on " + fit_on + "; "
                          + ("final epoch's weights" if refit else "kept weights by validation")
                          + "; test scored once per split"}
    if probe:
        report["probe_srcc"] = summarise_values([r.get("probe_srcc") for r in rows])
        report["beats_probe_on"] = sum(bool(r.get("beats_probe")) for r in rows)
    return report


def split_fit(settings: SearchSettings, config: TrainConfig) -> tuple[bool, str]:
    """Whether the split runs train on training and validation photos (a refit), and in words why (not)."""
    chooser = validation_chooser(config.optim)
    if not settings.splits_train_on_val:
        return False, "training photos only (--splits-train-only)"
    if chooser:
        return False, f"training photos only ({chooser} chooses on validation photos)"
    return True, "training and validation photos (the configuration is already selected; select_epoch = 'last')"


def _probe_matrix(config: TrainConfig, decoded: Any, settings: SearchSettings) -> np.ndarray:
    import ray

    from iqa_ray.evaluation.baselines import pooled_stage_features
    from iqa_ray.trainables.placement import worker_device

    m = config.model

    def work(images_of: Any) -> np.ndarray:
        return pooled_stage_features(list(images_of.images), backbone=m.backbone, pretrained=str(m.pretrained),
                                     img_size=m.img_size or config.data.crop_size,
                                     device=worker_device(int(settings.cpus_per_trial)))

    task = ray.remote(work).options(num_cpus=settings.cpus_per_trial, num_gpus=settings.gpus_per_trial, max_retries=0)
    return ray.get(task.remote(decoded))


def split_lines(report: Mapping[str, Any]) -> list[str]:
    """The summary's lines for a ``--splits`` report."""
    if not report:
        return []
    s, p = report["test_srcc"], report["test_plcc"]
    if not s.get("n"):
        return [f"splits: no split run finished ({len(report['per_split'])} started)"]
    lines = [f"over {s['n']} more random splits (selected config re-trained on each, on "
             f"{report.get('fit_on', 'training photos only')}): test SRCC median "
             f"{s['median']:.4f}, mean {s['mean']:.4f} +- {s['std']:.4f}; PLCC median {p['median']:.4f}, "
             f"mean {p['mean']:.4f} +- {p['std']:.4f}"]
    if "probe_srcc" in report and report["probe_srcc"].get("n"):
        q = report["probe_srcc"]
        lines.append(f"  linear probe on the same splits: SRCC median {q['median']:.4f}, mean {q['mean']:.4f} +- "
                     f"{q['std']:.4f}; the model beats it on {report['beats_probe_on']} of {len(report['per_split'])} splits")
    for r in report["per_split"]:
        extra = f"  probe {r['probe_srcc']:.4f}" if r.get("probe_srcc") is not None else ""
        value = "failed: " + r["error"] if r["test_srcc"] is None else f"test SRCC {r['test_srcc']:.4f}  PLCC {r['test_plcc']:.4f}"
        lines.append(f"  split seed {r['split_seed']}: {value}{extra}")
    return lines
