#!/usr/bin/env python
"""Search efficiency on real photos: the seed's alpha x margin grid vs Optuna TPE + ASHA, equal epochs.

The ranking study (``search_spaces/ranking.toml``: ranking-loss weight alpha x hinge margin, LR as
nuisance) with the CPU recipe applied (``recipes/cpu.toml``: frozen EfficientNet-Lite0 features of
whole photos computed once, an MLP head trained on them), on LIVE Challenge (627 photos with human
MOS, split 0.6/0.2/0.2 with split seed 0). Two searches per seed:

* ``grid``: the seed's 5 alpha x 4 margin grid at the grid's one LR (1e-3), no scheduler, every
  trial trained to ``max_epochs``. The epochs it trains define the budget B (20 x 20 = 400).
* ``optuna_asha``: Optuna TPE (alpha, margin and LR) with ASHA (the recipe's grace period and
  reduction factor), new trials until B epochs were trained (distinct trial epochs counted).

A seed is the searcher's seed and the training seed (``seed``); the split stays seed 0, so every
search sees the same photos and the same feature cache. Each search hands back one trial by the
study's rule (:func:`iqa_ray.core.selection.select_trial` over the trials' validation reports: the
recipe keeps each trial's last epoch), and only that trial is scored on the test split, once: its
config is re-trained with the same seed for the epochs the trial trained (training is
deterministic; the re-trained validation SRCC is compared with the reported one and recorded), and
the kept weights are scored on test. Reported per search: selected alpha / margin / LR, validation
SRCC, test SRCC / PLCC, epochs trained, trials, wall seconds of the search; and the median over
seeds of each search.

The dataset is decoded once and the feature cache computed once per process (cached under /tmp
as ``.npz``, keyed by the images and the cache's config, so a rerun skips it); both go to Ray's
object store once, and every search runs in one Ray instance, one CPU per trial. Finished
(search, seed) runs are saved as they end, and a rerun with the same settings runs only what is
missing.

    python benchmarks/search_efficiency_livec.py [--seeds 0 1 2] [--max-epochs 20] [--json OUT]
    python benchmarks/search_efficiency_livec.py --quick   # 4 grid configs x 2 epochs, seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

DATASET = "livec:../shared/data/livec-jpg"
SEARCHES = ("grid", "optuna_asha")
DEFAULT_JSON = Path("benchmarks/results/search_efficiency_livec.json")
QUICK_JSON = Path(tempfile.gettempdir()) / "search_efficiency_livec_quick.json"
FEATURE_DIR = Path(tempfile.gettempdir()) / "iqa_ray_feature_cache"
REPORTED_KEYS = ("alpha", "margin", "lr")


# ----------------------------------------------------------------------------- the study


def ranking_study(dataset: str, quick: bool) -> tuple[Any, Any]:
    """The ranking study with the cpu recipe applied for ``dataset`` (and its applied-recipe record)."""
    from iqa_ray.search.recipe import apply_recipe, load_recipe
    from iqa_ray.search.study_file import load_study

    applied = apply_recipe(load_recipe("cpu"), load_study("ranking"), dataset)
    study = applied.study
    if quick:  # the first two values of each grid: 2 alpha x 2 margin x 1 LR = 4 configs
        study = replace(study, params=tuple(replace(p, grid=tuple(p.grid[:2])) for p in study.params))
    return study, applied


def grace_period(study: Any, max_epochs: int) -> int:
    """The recipe's grace period, or half the epochs when the run is too short for it (--quick)."""
    return study.grace_period if study.grace_period < max_epochs else max(1, max_epochs // 2)


# ----------------------------------------------------------------------------- data, computed once


def images_fingerprint(table: Any) -> str:
    """Which photos, in which order, and their file sizes and times: what the decoded rows depend on."""
    h = hashlib.sha256()
    for path in table["path"].astype(str):
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def load_features(decoded: Any, config: Any, dataset: str) -> tuple[Any, dict[str, Any]]:
    """The :class:`~iqa_ray.training.features.FeatureCache` of ``decoded``: from /tmp when computed before for
    the same photos and cache config, else computed here (about 2-3 minutes on 2 cores) and saved."""
    import torch

    from iqa_ray.training.features import FeatureCache, cache_key, compute_features

    d = config.data
    key = {"cache_key": [str(v) for v in cache_key(config)], "dataset": dataset,
           "decode": {"image_size": d.image_size, "short_side": d.short_side, "whole_image": d.whole_image},
           "images": images_fingerprint(decoded.table), "n": len(decoded.table)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = FEATURE_DIR / f"livec_features_{digest}.npz"
    if path.exists():
        with np.load(path) as z:
            cache = FeatureCache(plain=z["plain"], flipped=z["flipped"] if "flipped" in z else None,
                                 key=cache_key(config), channels=tuple(int(c) for c in z["channels"]))
        return cache, {"file": str(path), "loaded": True, "seconds": 0.0}
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.perf_counter()
    cache = compute_features(decoded, config, "cpu")
    seconds = time.perf_counter() - started
    torch.set_num_threads(threads)
    FEATURE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npz")
    mirrors = {} if cache.flipped is None else {"flipped": cache.flipped}
    np.savez(tmp, plain=cache.plain, **mirrors, channels=np.array(cache.channels, dtype=np.int64), key=json.dumps(key))
    os.replace(tmp, path)
    return cache, {"file": str(path), "loaded": False, "seconds": round(seconds, 1)}


# ----------------------------------------------------------------------------- one search


def epoch_budget(budget: int | None) -> Any:
    """A Tune stopper that ends the experiment once ``budget`` distinct trial epochs were reported."""
    from ray.tune import Stopper

    class EpochBudget(Stopper):
        def __init__(self) -> None:
            self.epochs: set[tuple[str, int]] = set()

        def __call__(self, trial_id: str, result: dict) -> bool:
            # A finished trial's last result can pass through twice: count (trial, epoch) pairs.
            self.epochs.add((trial_id, int(result["training_iteration"])))
            return False

        def stop_all(self) -> bool:
            return budget is not None and len(self.epochs) >= budget

    return EpochBudget()


def refit_and_test(config_dict: dict[str, Any], epochs: int, decoded: Any, features: Any) -> dict[str, Any]:
    """Re-train a trial's config for the epochs it trained (same seed, one thread, like the trial)
    and score its kept weights on the test split once. Runs as a Ray task."""
    from iqa_ray.trainables.placement import worker_device
    from iqa_ray.training.config import TrainConfig
    from iqa_ray.training.engine import fit

    device = worker_device(1)
    started = time.perf_counter()
    result = fit(TrainConfig.from_dict(config_dict), decoded, device=device, max_epochs=epochs, score_test=True,
                 features=features)
    return {"test_srcc": result.test["srcc"], "test_plcc": result.test["plcc"], "n_test": int(len(result.test_predictions[1])),
            "refit_val_srcc": result.history[-1]["val_srcc"], "refit_epochs": len(result.history),
            "refit_seconds": round(time.perf_counter() - started, 1)}


def run_search(search: str, seed: int, study: Any, max_epochs: int, budget: int | None, refs: dict[str, Any],
               storage: str, cpus: int) -> dict[str, Any]:
    import ray
    from ray import tune

    from iqa_ray.core.selection import kept_report, select_trial, trial_score
    from iqa_ray.search.settings import SearchSettings
    from iqa_ray.search.tuner import make_scheduler, make_searcher, trial_dirname
    from iqa_ray.trainables.iqa import iqa_trainable

    grace = grace_period(study, max_epochs)
    # Optuna may start a trial per grace period of the budget (every one stopped at its first rung).
    num_samples = 1 if search == "grid" else max(1, budget // grace)
    settings = SearchSettings(
        study=study, name=f"{search}-s{seed}", storage=storage, searcher="grid" if search == "grid" else "optuna",
        scheduler="none" if search == "grid" else "asha", num_samples=num_samples, max_epochs=max_epochs,
        grace_period=grace, reduction_factor=study.reduction_factor, max_concurrent=cpus, cpus_per_trial=1,
        gpus_per_trial=0, seed=seed, max_failures=0, overrides=(("dataset", DATASET), ("seed", seed)),
    )
    effective = settings.effective_study
    searcher, space, num_samples = make_searcher(settings, None)
    trainable = tune.with_resources(
        tune.with_parameters(iqa_trainable, decoded=refs["decoded"], resolve=effective.resolve, cpus_per_trial=1,
                             features=refs["features"]),
        {"cpu": 1})
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=study.metric, mode=study.mode, search_alg=searcher,
                                    scheduler=make_scheduler(settings), num_samples=num_samples,
                                    # one CPU per trial caps concurrency at `cpus` (Optuna's searcher
                                    # also has a ConcurrencyLimiter; Tune ignores this for the grid's)
                                    max_concurrent_trials=None, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=settings.name, storage_path=storage, verbose=0, stop=epoch_budget(budget),
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    started = time.perf_counter()
    results = tuner.fit()
    seconds = time.perf_counter() - started

    reports: dict[str, tuple[Any, list[dict[str, Any]]]] = {}
    for r in results:
        frame = r.metrics_dataframe
        if frame is not None and len(frame):
            rows = frame.drop_duplicates("training_iteration", keep="last").to_dict("records")
            reports[str(rows[-1].get("trial_id") or r.path)] = (r, rows)
    errors = sum(1 for r in results if r.error is not None)
    if not reports:
        raise RuntimeError(f"{settings.name}: no trial reported an epoch ({errors} errored)")
    chosen = select_trial({k: rows for k, (_, rows) in reports.items()}, study.metric, study.mode)
    if chosen is None:
        raise RuntimeError(f"{settings.name}: no trial reported a finite {study.metric}")
    best, rows = reports[chosen]
    kept = kept_report(rows) or rows[-1]
    config = effective.resolve(best.config)
    test = ray.get(ray.remote(refit_and_test).options(num_cpus=1, max_retries=0).remote(
        config, int(kept["epoch"]), refs["decoded"], refs["features"]))

    # Best validation SRCC so far (each trial judged by the selection rule) against cumulative epochs.
    ordered = sorted(((float(row["timestamp"]), float(row.get("time_total_s", 0)), tid, row)
                      for tid, (_, rs) in reports.items() for row in rs), key=lambda x: x[:2])
    curve, best_so_far, seen = [], -np.inf, {}
    for _, _, tid, row in ordered:
        seen.setdefault(tid, []).append(row)
        score = trial_score(seen[tid], study.metric, study.mode)
        if score is not None:
            best_so_far = max(best_so_far, score)
        curve.append(round(best_so_far, 4) if np.isfinite(best_so_far) else None)
    trials = [{**{k: effective.reported_config(r.config).get(k) for k in REPORTED_KEYS}, "epochs": len(rs),
               "val_srcc": float((kept_report(rs) or rs[-1])[study.metric])}
              for r, rs in reports.values()]
    selected = effective.reported_config(best.config)
    return {
        "search": search, "seed": seed, "searcher": settings.searcher, "scheduler": settings.scheduler,
        "budget": budget, "max_epochs": max_epochs, "grace_period": grace if search != "grid" else None,
        "reduction_factor": study.reduction_factor if search != "grid" else None,
        "selected": {k: selected.get(k) for k in REPORTED_KEYS},
        "selected_epochs": int(kept["epoch"]), "val_srcc": float(kept["val_srcc"]),
        "test_srcc": test["test_srcc"], "test_plcc": test["test_plcc"], "n_test": test["n_test"],
        "refit_val_srcc": test["refit_val_srcc"],
        "refit_matches": bool(abs(test["refit_val_srcc"] - float(kept["val_srcc"])) < 1e-6),
        "refit_seconds": test["refit_seconds"],
        "epochs": sum(len(rs) for _, rs in reports.values()), "trials": len(reports), "errored_trials": errors,
        # trials the budget stopped before their first epoch report nothing and are not counted
        "trials_without_report": len(results) - len(reports),
        "epoch_seconds_median": round(float(np.median([row["epoch_seconds"] for _, rs in reports.values()
                                                       for row in rs])), 2),
        "seconds": round(seconds, 1), "curve": curve, "trial_results": trials,
    }


# ----------------------------------------------------------------------------- report


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 0.01 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for search in SEARCHES:
        rs = [r for r in runs if r["search"] == search]
        if rs:
            out[search] = {"seeds": sorted(r["seed"] for r in rs),
                           **{k: statistics.median(r[k] for r in rs)
                              for k in ("val_srcc", "test_srcc", "test_plcc", "epochs", "trials", "seconds")}}
    return out


def report(summary: dict[str, Any]) -> None:
    runs = sorted(summary["runs"], key=lambda r: (SEARCHES.index(r["search"]), r["seed"]))
    print(f"\nRanking study, cpu recipe, {summary['dataset']} ({summary['split']}); grid budget "
          f"{summary['grid_configs']} configs x {summary['max_epochs']} epochs")
    print("\n| search | seed | alpha | margin | lr | val SRCC | test SRCC | test PLCC | epochs | trials | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        s = r["selected"]
        print(f"| {r['search']} | {r['seed']} | {fmt(s['alpha'])} | {fmt(s['margin'])} | {fmt(s['lr'])} | "
              f"{r['val_srcc']:.3f} | {r['test_srcc']:.3f} | {r['test_plcc']:.3f} | {r['epochs']} | {r['trials']} | "
              f"{r['seconds']:.0f} |")
    print("\nMedian over seeds:\n")
    print("| search | seeds | val SRCC | test SRCC | test PLCC | epochs | trials | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for search, m in summary["median"].items():
        print(f"| {search} | {' '.join(map(str, m['seeds']))} | {m['val_srcc']:.3f} | {m['test_srcc']:.3f} | "
              f"{m['test_plcc']:.3f} | {m['epochs']:g} | {m['trials']:g} | {m['seconds']:.0f} |")
    mismatched = [f"{r['search']} seed {r['seed']}" for r in runs if not r["refit_matches"]]
    if mismatched:
        print(f"\nnote: the re-trained selected config's validation SRCC differs from the trial's report for "
              f"{', '.join(mismatched)} (see refit_val_srcc in the JSON)")


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="searcher and training seeds (default 0 1 2)")
    p.add_argument("--max-epochs", type=int, default=None, help="epochs of a full trial (default: the recipe's 20)")
    p.add_argument("--json", type=Path, default=None, help=f"results file (default {DEFAULT_JSON})")
    p.add_argument("--quick", action="store_true", help="smoke check: 4 grid configs x 2 epochs, seed 0, JSON under /tmp")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the Ray instance (one per trial)")
    p.add_argument("--searches", nargs="+", default=list(SEARCHES), choices=SEARCHES)
    args = p.parse_args()
    from iqa_ray.core.io import atomic_write_json

    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    study, applied = ranking_study(DATASET, args.quick)
    max_epochs = args.max_epochs or (2 if args.quick else study.max_epochs)
    out = args.json or (QUICK_JSON if args.quick else DEFAULT_JSON)

    settings = {"dataset": DATASET, "recipe": "cpu", "study": "ranking", "quick": args.quick, "max_epochs": max_epochs,
                "grid_configs": study.grid_size(), "grace_period": grace_period(study, max_epochs),
                "reduction_factor": study.reduction_factor, "cpus": args.cpus}
    saved = json.loads(out.read_text()) if out.exists() else {}
    if saved and saved.get("settings") != settings:
        print(f"[resume] {out} holds runs of other settings: starting afresh", flush=True)
        saved = {}
    runs = [r for r in saved.get("runs", []) if r["seed"] in seeds and r["search"] in args.searches]
    todo = [(seed, s) for seed in seeds for s in args.searches
            if not any(r["seed"] == seed and r["search"] == s for r in runs)]
    summary = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
               "date": time.strftime("%Y-%m-%d"), "settings": settings, "dataset": DATASET,
               "split": "split seed 0, fractions " + "/".join(map(str, applied.study.fixed["split_fractions"])),
               "grid_configs": study.grid_size(), "max_epochs": max_epochs,
               "recipe_applied": applied.applied, "features": saved.get("features"), "runs": runs}
    if todo:
        import torch

        from iqa_ray.training.config import TrainConfig
        from iqa_ray.training.loaders import load_decoded

        constants = TrainConfig.from_dict({**study.constants(), "dataset": DATASET, "epochs": max_epochs})
        torch.set_num_threads(args.cpus)
        started = time.perf_counter()
        decoded = load_decoded(constants)
        counts = decoded.table["split"].value_counts().to_dict()
        print(f"[data] {len(decoded.table)} photos decoded in {time.perf_counter() - started:.0f} s "
              f"({counts.get('train', 0)} train / {counts.get('val', 0)} val / {counts.get('test', 0)} test)", flush=True)
        features, info = load_features(decoded, constants, DATASET)
        how = "loaded from" if info["loaded"] else f"computed in {info['seconds']:.0f} s, saved to"
        print(f"[features] {how} {info['file']}: {features.plain.shape[1]} features per photo", flush=True)
        summary["features"] = {**info, "dim": int(features.plain.shape[1])}

        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        import ray

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        try:
            refs = {"decoded": ray.put(decoded), "features": ray.put(features)}
            del decoded, features
            grid_epochs = {r["seed"]: r["epochs"] for r in runs if r["search"] == "grid"}
            with tempfile.TemporaryDirectory(prefix="search_efficiency_livec_") as storage:
                for seed, search in sorted(todo, key=lambda x: (x[0], SEARCHES.index(x[1]))):
                    if search == "grid":
                        budget = None
                    else:
                        # The grid's epochs as trained for this seed (or its nominal total if not run).
                        budget = grid_epochs.get(seed, study.grid_size() * max_epochs)
                    print(f"[run] {search} seed {seed}" + (f", budget {budget} epochs" if budget else ""), flush=True)
                    r = run_search(search, seed, study, max_epochs, budget, refs, storage, args.cpus)
                    if search == "grid":
                        grid_epochs[seed] = r["epochs"]
                    runs.append(r)
                    summary["median"] = medians(runs)
                    print(json.dumps({k: v for k, v in r.items() if k not in ("curve", "trial_results")}), flush=True)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_json(out, summary)
        finally:
            ray.shutdown()
    summary["median"] = medians(runs)
    if runs:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, summary)
        report(summary)
        print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
