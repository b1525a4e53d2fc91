"""``--ensemble K``: the search hands back a weighted ensemble of its trials instead of one trial.

After the search, :func:`choose_ensemble` reads every trial's validation predictions at the epoch
whose weights it keeps (the engine keeps them in each checkpoint: the very scores its reported
validation metrics were computed from, checked here against the reported SRCC) and runs greedy
ensemble selection with replacement over them for K rounds
(:func:`iqa_ray.core.ensembles.caruana_select`, started from the selected trial, maximising the
study's metric). Test photos play no part in it. Trials that left no predictions, whose predictions
disagree with their reports, that diverged, or that prepare photos unlike the selected trial
(:func:`iqa_ray.evaluation.ensemble.scoring_key`) are left out of the library, each with its reason.

Each distinct member is then re-trained on training and validation photos where the configuration
chooses nothing on validation (:func:`iqa_ray.search.retrain.hand_back_ensemble`), else its own
trial is used; ``ensemble.json`` in the experiment folder names the members' trial folders and
weights (what ``summary.json``'s ``model`` names, and what ``load_model`` / ``iqa-ray score`` /
``export-model`` read), and the ensemble is scored on the test split once
(:func:`score_ensemble`), beside the selected trial's own model scored on the same photos.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from iqa_ray.core.ensembles import ENSEMBLE_FILE, ENSEMBLE_METRICS, caruana_select, ensemble_predictions, manifest
from iqa_ray.core.errors import LaunchError
from iqa_ray.core.io import atomic_write_json
from iqa_ray.core.metrics import all_metrics, srcc
from iqa_ray.core.selection import kept_report
from iqa_ray.search.retrain import trial_folder
from iqa_ray.search.settings import SearchSettings
from iqa_ray.trainables.placement import worker_device

Reports = Mapping[str, tuple[Any, list[dict[str, Any]]]]


def check_ensemble(settings: SearchSettings) -> None:
    """``--ensemble K``: what an ensemble of trials cannot be combined with (each refusal names both),
    refused before Ray starts (:func:`iqa_ray.search.run.run_search`).

    Raises:
        LaunchError: ``--splits``, a selection rule other than ``best``, a metric ensemble selection
            cannot maximise, or remote storage.
    """
    k = settings.ensemble
    if not k:
        return
    study = settings.study
    if settings.splits:
        raise LaunchError(f"--ensemble {k} with --splits {settings.splits}: the split runs re-train one configuration, "
                          "not an ensemble's members; use --splits 0 with --ensemble (or drop --ensemble)")
    if study.multi_objective or study.select != "best":
        raise LaunchError(f"--ensemble {k} with --select {study.select}: an ensemble adds its members' costs, which a "
                          "cost budget or the Pareto knee would not see; drop --ensemble or select 'best'")
    if study.metric not in ENSEMBLE_METRICS:
        raise LaunchError(f"--ensemble {k}: study {study.name!r} selects on {study.metric}; ensemble selection "
                          f"maximises one of {', '.join(ENSEMBLE_METRICS)}")
    if settings.is_remote_storage():
        raise LaunchError(f"--ensemble {k} with --storage {settings.storage}: the ensemble's manifest is written beside "
                          "its members in a local experiment folder; use local storage")


def trial_predictions(result: Any) -> tuple[list[str], np.ndarray, np.ndarray, int] | None:
    """A trial's kept validation predictions from its newest checkpoint (ids, scores, MOS, kept epoch), or ``None``."""
    from iqa_ray.training.checkpoints import kept_val_predictions, load_checkpoint

    if result.checkpoint is None:
        return None
    with result.checkpoint.as_directory() as directory:
        return kept_val_predictions(load_checkpoint(directory))


def trial_library(settings: SearchSettings, reports: Reports, best_id: str) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, str]]:
    """The library ensemble selection chooses from: trial id -> its kept validation predictions, the
    validation photos' MOS (in the same order), and the trials left out -> why.

    Raises:
        LaunchError: the selected trial itself cannot be in the library (the reason named).
    """
    from iqa_ray.evaluation.ensemble import scoring_key
    from iqa_ray.training.config import TrainConfig

    study = settings.effective_study
    key = scoring_key(TrainConfig.from_dict(study.resolve(reports[best_id][0].config)))
    library, left_out, ids, mos = {}, {}, None, None
    for trial_id in [best_id, *sorted(k for k in reports if k != best_id)]:
        result, rows = reports[trial_id]
        found = trial_predictions(result)
        why = _left_out_why(found, kept_report(rows), ids, mos)
        if why is None and scoring_key(TrainConfig.from_dict(study.resolve(result.config))) != key:
            why = "it prepares photos unlike the selected trial (resize, patches or label)"
        if why is None:
            ids, library[trial_id], mos = found[0], found[1], found[2]
        elif trial_id == best_id:
            raise LaunchError(f"--ensemble: the selected trial {best_id} cannot start the ensemble: {why}")
        else:
            left_out[trial_id] = why
    return library, mos, left_out


def _left_out_why(found: tuple[list[str], np.ndarray, np.ndarray, int] | None, kept: Mapping[str, Any] | None,
                  ids: list[str] | None, mos: np.ndarray | None) -> str | None:
    """Why a trial's recorded predictions cannot join the library, or ``None`` when they can: they must
    be of the epoch its reports keep, finite, of the same photos as the others', and the very
    predictions its reported validation SRCC was computed from."""
    if kept is None:
        return "it kept no epoch"
    if found is None:
        return "its newest checkpoint holds no validation predictions"
    trial_ids, scores, trial_mos, epoch = found
    if ids is not None and (trial_ids != ids or not np.array_equal(trial_mos, mos)):
        return "it scored other validation photos"
    if epoch != kept.get("epoch"):
        return f"its newest checkpoint keeps epoch {epoch}, its reports epoch {kept.get('epoch')}"
    if not np.isfinite(scores).all():
        return "its validation predictions are not finite"
    recorded = srcc(scores, trial_mos)
    if not np.isclose(recorded, float(kept.get("val_srcc", np.nan)), rtol=0, atol=1e-9):
        return f"its recorded predictions give SRCC {recorded:.6f}, it reported {kept.get('val_srcc')}"
    return None


def choose_ensemble(settings: SearchSettings, reports: Reports, best_id: str) -> dict[str, Any]:
    """Greedy ensemble selection on validation (``settings.ensemble`` rounds); ``summary.json``'s
    ``ensemble`` so far: the members (trial id, weight, validation SRCC), the ensemble's validation
    SRCC and PLCC on the trials' reported predictions, the selected trial's, the trials left out."""
    library, mos, left_out = trial_library(settings, reports, best_id)
    metric = settings.effective_study.metric
    weights = caruana_select(library, mos, settings.ensemble, metric=ENSEMBLE_METRICS[metric])
    ensemble = ensemble_predictions(library, weights)
    members = [{"trial_id": t, "weight": w, "val_srcc": srcc(library[t], mos),
                "search_trial": trial_folder(reports[t][0]) if reports[t][0].path else None}
               for t, w in sorted(weights.items(), key=lambda item: (-item[1], item[0]))]
    val = all_metrics(ensemble, mos)
    return {"rounds": settings.ensemble, "metric": metric, "library": len(library), "left_out": left_out,
            "members": members, "val_srcc": val["srcc"], "val_plcc": val["plcc"], "best_trial": best_id,
            "best_trial_val_srcc": srcc(library[best_id], mos), "n_val": len(mos)}


def write_ensemble(settings: SearchSettings, record: dict[str, Any]) -> str:
    """``ensemble.json`` in the experiment folder (members' trial folders and weights); its name,
    which ``summary.json``'s ``model`` takes."""
    local = settings.local_experiment_dir()
    members = [{"model": m["model"], "weight": m["weight"], "trial_id": m["trial_id"]} for m in record["members"]]
    atomic_write_json(local / ENSEMBLE_FILE, manifest(members, rounds=record["rounds"], metric=record["metric"],
                                                      selected_trial=record["best_trial"]))
    return ENSEMBLE_FILE


# The test photos' scores from the search's feature cache when it holds them: the model handed back is
# the whole network, and its head on the cached features of the same frozen backbone gives the scores
# the whole network gives the photos (float32 rounding apart: tests/test_feature_cache.py). Each
# scoring checks it: the whole network scores the first RAW_CHECK test photos too, and any of them
# further than RAW_CHECK_ATOL MOS points from its cached score sends every test photo through the
# whole network instead (the cache saves a backbone pass per test photo: 20 s of `make tune`'s 5 min).
RAW_CHECK = 8
RAW_CHECK_ATOL = 1e-2


def test_predictions(checkpoint: Any, decoded: Any, threads: int,
                     features: Any = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A checkpoint's kept weights' predictions of the test photos, their MOS, and how they were
    computed (the search's test scoring of the model handed back, one model or each member of an
    ensemble): ``{"source": "feature cache" | "images", "checked": n, "max_abs_diff": d}`` (the
    whole network on ``n`` photos against their cached scores; ``source`` "images" with a
    ``max_abs_diff`` means they disagreed and every photo went through the whole network).

    Args:
        features: the search's :class:`~iqa_ray.training.features.FeatureCache`; used when it was
            computed for this checkpoint's config in float32 (else every photo goes through the whole network).
    """
    import torch

    from iqa_ray.training.checkpoints import model_from_checkpoint
    from iqa_ray.training.device import autocast_dtype, to_float
    from iqa_ray.training.feeds import pooled_scores
    from iqa_ray.training.inference import predict, ready_for_inference
    from iqa_ray.training.loaders import eval_dataset, eval_loader

    device = worker_device(threads)
    with checkpoint.as_directory() as directory:  # local folder or a download from remote storage
        model, config = model_from_checkpoint(directory, device=device)
    rows = decoded.split_indices("test")
    cached = None
    if (features is not None and config.data.feature_cache and config.optim.feature_dtype == "float32"
            and features.fits(config, len(decoded.table))):
        cached = pooled_scores(model, torch.from_numpy(np.array(features.plain[rows], dtype=np.float32)).to(device))
    # Inference only: the feature pass's speed-ups, checked on the first test image (its first patch).
    layout, verify = ready_for_inference(model, config)

    def whole_network(which: Any) -> tuple[np.ndarray, np.ndarray]:
        loader = eval_loader(config, eval_dataset(config, decoded, which))
        verify(to_float(loader.dataset[0]["image"][:1], device))
        return predict(model, loader, device, autocast_dtype(config.optim.amp, device), chunk=config.data.eval_chunk,
                       memory_format=layout)

    if cached is not None:
        check = min(RAW_CHECK, len(rows))
        raw, _ = whole_network(rows[:check])
        diff = float(np.max(np.abs(raw - cached[:check]))) if check else 0.0
        if diff <= RAW_CHECK_ATOL:
            mos = decoded.table["mos"].to_numpy(np.float32)[rows].astype(np.float64)  # as the image loader gives them
            return cached, mos, {"source": "feature cache", "checked": check, "max_abs_diff": diff}
        print(f"[test] the whole network's scores of {check} test photos are up to {diff:.4g} MOS points from their "
              f"cached scores (at most {RAW_CHECK_ATOL:g} expected): every test photo goes through the whole network",
              flush=True)
        pred, mos = whole_network("test")
        return pred, mos, {"source": "images", "checked": check, "max_abs_diff": diff}
    pred, mos = whole_network("test")
    return pred, mos, {"source": "images"}


def merge_scoring(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One ``test_scoring`` record for several models scored on the same photos (an ensemble's members)."""
    sources = {r["source"] for r in records}
    out: dict[str, Any] = {"source": sources.pop() if len(sources) == 1 else "mixed"}
    diffs = [r["max_abs_diff"] for r in records if "max_abs_diff" in r]
    if diffs:
        out.update(checked=max(r["checked"] for r in records), max_abs_diff=max(diffs))
    return out


def _ensemble_test(checkpoints: dict[str, Any], weights: dict[str, float], best_id: str, decoded: Any,
                   threads: int, features: Any = None) -> dict[str, dict[str, Any]]:
    if not bool((decoded.table["split"] == "test").any()):
        return {}
    predictions, mos, scoring = {}, None, []
    for trial_id, checkpoint in checkpoints.items():
        predictions[trial_id], mos, how = test_predictions(checkpoint, decoded, threads, features)
        scoring.append(how)
    n = {"n": len(mos)}
    return {"ensemble": {**all_metrics(ensemble_predictions(predictions, weights), mos), **n},
            "best_trial": {**all_metrics(predictions[best_id], mos), **n}, "scoring": merge_scoring(scoring)}


def score_ensemble(settings: SearchSettings, checkpoints: dict[str, Any], weights: dict[str, float], best_id: str,
                   decoded: Any, features: Any = None) -> dict[str, dict[str, Any]]:
    """The ensemble handed back scored on the test split once (the members' test predictions
    averaged with their weights), and the selected trial's model (a member) on the same photos, and
    how they were computed (``scoring``, :func:`test_predictions`). One Ray task with one trial's
    resources, reading the dataset's object-store copy (and the search's feature cache)."""
    import ray

    cpus, gpus = settings.cpus_per_trial, min(settings.gpus_per_trial, 1.0)
    task = ray.remote(_ensemble_test).options(num_cpus=cpus, num_gpus=gpus, max_retries=1)
    return ray.get(task.remote(checkpoints, weights, best_id, decoded, int(cpus), features))


def ensemble_lines(record: Mapping[str, Any]) -> list[str]:
    """The summary's lines for an ensemble: its members, its validation and test SRCC beside the selected trial's."""
    if not record:
        return []
    lines = [f"ensemble handed back ({ENSEMBLE_FILE}): {len(record['members'])} trials by {record['rounds']} greedy "
             f"rounds of ensemble selection on validation {record['metric']} (library of {record['library']} trials"
             + (f", {len(record['left_out'])} left out" if record.get("left_out") else "") + "):"]
    for m in record["members"]:
        where = f" -> {m['model']}" if m.get("model") and m["model"] != m.get("search_trial") else ""
        lines.append(f"  {m['trial_id']}  weight {m['weight']:.3f}  validation SRCC {m['val_srcc']:.4f}{where}")
    test, best_test = record.get("test") or {}, record.get("best_trial_test") or {}
    lines.append(f"  validation SRCC: ensemble {record['val_srcc']:.4f}, selected trial {record['best_trial']} "
                 f"{record['best_trial_val_srcc']:.4f}")
    if test and best_test:
        lines.append(f"  test SRCC: ensemble {test['srcc']:.4f}, selected trial's own model {best_test['srcc']:.4f} "
                     f"({test['srcc'] - best_test['srcc']:+.4f}, same {test['n']} photos)")
    return lines


def ensemble_hand_back(settings: SearchSettings, reports: Reports, best_id: str, decoded: Any,
                       features: Any) -> tuple[dict[str, Any], dict[str, tuple[Any, str]], dict[str, Any]]:
    """Select the ensemble on validation (:func:`choose_ensemble`), re-train its members
    (:func:`~iqa_ray.search.retrain.hand_back_ensemble`) and write ``ensemble.json``.

    Returns:
        ``summary.json``'s ``ensemble`` (each member with the folder of its model handed back), each
        member's Tune result and folder, and ``summary.json``'s ``refit``.
    """
    from iqa_ray.search.retrain import hand_back_ensemble

    record = choose_ensemble(settings, reports, best_id)
    study = settings.effective_study
    chosen = {m["trial_id"]: (reports[m["trial_id"]][0], study.resolve(reports[m["trial_id"]][0].config))
              for m in record["members"]}
    print(f"[ensemble] {len(chosen)} trials chosen on validation: validation {record['metric']} "
          f"{record['val_srcc']:.4f} (selected trial {record['best_trial_val_srcc']:.4f})", flush=True)
    handed, refit = hand_back_ensemble(settings, chosen, decoded, features)
    for member in record["members"]:
        member["model"] = handed[member["trial_id"]][1]
    write_ensemble(settings, record)
    return record, handed, refit


def ensemble_test(settings: SearchSettings, record: dict[str, Any], handed: Mapping[str, tuple[Any, str]],
                  decoded: Any, features: Any = None) -> tuple[dict[str, float], str | None, dict[str, Any]]:
    """The ensemble scored on test once (:func:`score_ensemble`), recorded in ``record`` beside the
    selected trial's model; its test metrics, why there are none (or ``None``), and how they were computed."""
    weights = {m["trial_id"]: m["weight"] for m in record["members"]}
    scored = score_ensemble(settings, {t: result.checkpoint for t, (result, _) in handed.items()}, weights,
                            record["best_trial"], decoded, features)
    record.update(test=scored.get("ensemble"), best_trial_test=scored.get("best_trial"))
    return scored.get("ensemble", {}), None if scored else "the dataset has no test split", scored.get("scoring", {})


def ensemble_summary(record: dict[str, Any], test: Mapping[str, float]) -> dict[str, Any]:
    """What an ensemble changes in ``summary.json``: the model handed back, its test source and gap, ``ensemble``."""
    return {"model": ENSEMBLE_FILE, "ensemble": record,
            "test_source": f"the ensemble of {ENSEMBLE_FILE} (each member's final weights, scores averaged with its "
                           "weight), scored once after the search",
            # the ensemble's validation SRCC (on the trials' reported predictions) minus its test SRCC
            "val_test_gap": record["val_srcc"] - test["srcc"] if test else None}
