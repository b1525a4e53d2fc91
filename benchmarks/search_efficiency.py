#!/usr/bin/env python
"""Search efficiency: the seed's exhaustive grid vs random, random + ASHA and Optuna TPE + ASHA.

The ranking study (HyperIQA + pairwise ranking loss: alpha x margin, plus the learning rate) on the
embedded dataset, run four ways at the same total compute budget counted in trained epochs:

* ``grid``: the seed's 5 alpha x 4 margin grid at one LR, every trial trained to max epochs;
  its cost defines the budget B = 20 x max_epochs;
* ``random``: random configurations (alpha, margin and LR), every trial to max epochs, until B;
* ``random_asha``: random configurations with ASHA early stopping, until B epochs were trained;
* ``optuna_asha``: Optuna TPE (seeded) with ASHA, until B.

Each is repeated for a few seeds (searcher seed and training seed). Reported: best validation
SRCC reached vs cumulative epochs (plot + table), the epochs each method needed to get within
0.01 of the grid's best validation SRCC, and the test SRCC of each method's selected
configuration (selected on validation only). Small defaults fit a 2-core machine (64 px crops,
3 epochs, labels of half the training photos); ``--full`` is the same study at the CPU-search
scale (128 px, 6 epochs, every label), for a GPU box.

    python benchmarks/search_efficiency.py [--seeds 0 1] [--full] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from iqa_ray.core.io import atomic_write_json
from iqa_ray.data.catalog import ensure_embedded, generated_table
from iqa_ray.data.decoded import decode_table
from iqa_ray.search.settings import SearchSettings
from iqa_ray.search.study_file import load_study
from iqa_ray.search.tuner import make_scheduler, make_searcher

METHODS = ("grid", "random", "random_asha", "optuna_asha")


def epoch_budget_stopper(budget: int) -> Any:
    from ray.tune import Stopper

    class EpochBudget(Stopper):
        """Stops the whole experiment once ``budget`` epochs were reported across all trials."""

        def __init__(self) -> None:
            self.seen: set[tuple[str, int]] = set()

        def __call__(self, trial_id: str, result: dict) -> bool:
            # Tune passes a trial's last result through the stoppers a second time when its
            # function returns (done=True), so count distinct (trial, epoch) pairs, not calls:
            # counting calls ended the grid at 46 of its 60 epochs.
            self.seen.add((trial_id, int(result["training_iteration"])))  # Tune fills it in every result
            return False

        def stop_all(self) -> bool:
            return len(self.seen) >= budget

    return EpochBudget()


def run_method(method: str, seed: int, study: Any, scale: dict, decoded: Any, storage: str, cpus: int) -> dict:
    from ray import tune

    from iqa_ray.trainables.iqa import iqa_trainable

    max_epochs = scale["max_epochs"]
    budget = study.grid_size() * max_epochs
    overrides = {"crop_size": scale["crop_size"], "eval_patches": 1, "seed": seed, "dataset": scale["dataset"],
                 "label_fraction": scale["label_fraction"]}
    settings = SearchSettings(
        study=study, name=f"{method}-s{seed}", storage=storage,
        searcher={"grid": "grid", "random": "random", "random_asha": "random", "optuna_asha": "optuna"}[method],
        scheduler="asha" if method.endswith("asha") else "none",
        num_samples=1 if method == "grid" else 4 * study.grid_size(), max_epochs=max_epochs,
        grace_period=1, reduction_factor=scale["reduction_factor"], max_concurrent=cpus, cpus_per_trial=1,
        gpus_per_trial=0, seed=seed, overrides=tuple(sorted(overrides.items())),
    )
    searcher, space, num_samples = make_searcher(settings, None)
    trainable = tune.with_resources(
        tune.with_parameters(iqa_trainable, decoded=decoded, resolve=settings.effective_study.resolve, cpus_per_trial=1),
        {"cpu": 1})
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric="val_srcc", mode="max", search_alg=searcher, scheduler=make_scheduler(settings),
                                    num_samples=num_samples,
                                    max_concurrent_trials=cpus if settings.searcher != "optuna" else None),
        run_config=tune.RunConfig(name=settings.name, storage_path=storage, verbose=0,
                                  stop=epoch_budget_stopper(budget),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    start = time.perf_counter()
    grid = tuner.fit()
    elapsed = time.perf_counter() - start
    rows = []
    for r in grid:
        if r.metrics_dataframe is None or r.metrics_dataframe.empty:
            continue
        for _, row in r.metrics_dataframe.iterrows():
            rows.append((float(row["timestamp"]), float(row["time_total_s"]), float(row["val_srcc"]), r))
    rows.sort(key=lambda x: (x[0], x[1]))
    curve, best, best_result = [], -np.inf, None
    for i, (_, _, val, r) in enumerate(rows[:budget]):
        if val > best:
            best, best_result = val, r
        curve.append(best)
    test = {}
    if best_result.checkpoint is not None:  # trials report validation only: score the selected one once
        from iqa_ray.search.summary import score_test_split

        test, _ = score_test_split(best_result.checkpoint, decoded, cpus=1, gpus=0)
    return {"method": method, "seed": seed, "budget": budget, "epochs": len(curve), "curve": curve,
            "best_val_srcc": best, "test_srcc": test.get("srcc"), "test_plcc": test.get("plcc"),
            # trials that trained at least one epoch (random/grid pre-sample num_samples trials, and
            # those the epoch budget never started still appear in the ResultGrid)
            "trials": sum(1 for r in grid if r.metrics_dataframe is not None and not r.metrics_dataframe.empty),
            "elapsed_s": round(elapsed, 1),
            "best_config": {k: best_result.config.get(k) for k in ("alpha", "margin", "lr")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--full", action="store_true", help="CPU-search scale: 128 px crops, 6 epochs (a GPU box)")
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/search_efficiency"))
    p.add_argument("--report-only", action="store_true", help="rebuild the table and plot from the saved runs")
    args = p.parse_args()
    # Small mode: 64 px crops, 3 epochs and the labels of half the training photos (label_fraction,
    # drawn per seed, the same for every method of that seed), so the 4 methods x 2 seeds fit in
    # about an hour on 2 CPUs. --full uses every label at the CPU-search scale.
    scale = {"crop_size": 128, "max_epochs": 6, "reduction_factor": 3, "label_fraction": 1.0} if args.full else \
        {"crop_size": 64, "max_epochs": 3, "reduction_factor": 3, "label_fraction": 0.5}
    # Runs saved before the budget counted distinct trial epochs (version 1) are not comparable.
    scale["budget_counting"] = 2
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "search_efficiency.json"
    # Every finished (method, seed) run is saved at once, so an interrupted benchmark keeps what it
    # measured and a re-run with the same settings only runs what is missing.
    saved = json.loads(results_file.read_text()) if results_file.exists() else {}
    if saved and any(saved.get("scale", {}).get(k) != v for k, v in scale.items()):
        saved = {}
    runs = [r for r in saved.get("runs", []) if r["seed"] in args.seeds and r["method"] in args.methods]
    summary = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
               "date": time.strftime("%Y-%m-%d"), "scale": scale, "seeds": args.seeds, "runs": runs}
    todo = [(seed, m) for seed in args.seeds for m in args.methods
            if not any(r["seed"] == seed and r["method"] == m for r in runs)]
    if todo and not args.report_only:
        study = load_study("ranking")
        dataset = ensure_embedded()
        scale["dataset"] = str(dataset)
        decoded = decode_table(generated_table(dataset), min_size=scale["crop_size"])
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        import ray

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        ray.data.DataContext.get_current().enable_progress_bars = False
        with tempfile.TemporaryDirectory() as storage:
            for seed, method in todo:
                r = run_method(method, seed, study, scale, decoded, storage, args.cpus)
                runs.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
                atomic_write_json(results_file, summary)
        ray.shutdown()
    summary["seeds"] = sorted({r["seed"] for r in runs})
    report(summary, args.out)


def report(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = dict(zip(METHODS, ("black", "tab:blue", "tab:orange", "tab:green")))
    styles = ("-", "--", ":", "-.")  # one line style per seed, one colour per method
    style_names = dict(zip(styles, ("solid", "dashed", "dotted", "dash-dot")))
    seed_style = {seed: styles[i % len(styles)] for i, seed in enumerate(summary["seeds"])}
    for r in runs:
        ax.plot(np.arange(1, len(r["curve"]) + 1), r["curve"], color=colours[r["method"]], alpha=0.8,
                linestyle=seed_style[r["seed"]], label=r["method"] if r["seed"] == summary["seeds"][0] else None)
    ax.set_xlabel("cumulative trained epochs")
    ax.set_ylabel("best validation SRCC so far")
    ax.set_title("Ranking study: search efficiency at equal epoch budget")
    if len(seed_style) > 1:
        ax.text(0.99, 0.02, ", ".join(f"seed {seed} {style_names[style]}" for seed, style in seed_style.items()),
                transform=ax.transAxes, ha="right", va="bottom", fontsize=8)
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(out / "search_efficiency.png", dpi=120)
    print("\n| method | seed | best val SRCC | epochs to within 0.01 of grid best | % of grid budget | test SRCC (selected) | trials |")
    print("|---|---|---|---|---|---|---|")
    for seed in summary["seeds"]:
        grid = next((r for r in runs if r["method"] == "grid" and r["seed"] == seed), None)
        target = grid["best_val_srcc"] - 0.01 if grid else None
        for r in (x for x in runs if x["seed"] == seed):
            reach = next((i + 1 for i, v in enumerate(r["curve"]) if target is not None and v >= target), None)
            share = f"{100 * reach / r['budget']:.0f}%" if reach else "not reached"
            print(f"| {r['method']} | {seed} | {r['best_val_srcc']:.3f} | {reach or '-'} | {share} | "
                  f"{r['test_srcc'] if r['test_srcc'] is None else round(r['test_srcc'], 3)} | {r['trials']} |")


if __name__ == "__main__":
    main()
