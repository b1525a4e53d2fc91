#!/usr/bin/env python
"""Does a search on cached features spend its time training? Wall time against the trials' own time.

The main job's search (the ranking study under the cpu recipe: frozen Lite0 features computed once,
an MLP head per trial, Optuna + ASHA) on LIVE Challenge, run through the product's own command
(:func:`iqa_ray.cli.tune.main`, ``--no-refit --splits 0``, results under /tmp), twice in one
process, one after the other:

* ``before``: each trial in a new actor (``reuse_actors = false``, so the model's cost is measured
  by every trial) and a checkpoint every epoch (``--set checkpoint_every=1``), as searches ran
  before issue 35;
* ``after``: the product as it is (actors reused, the cost measured once per worker, the recipe's
  checkpoint every 4th epoch and wherever ASHA may stop a trial).

For each, from the experiment's ``summary.json`` and ``trials.parquet``: the search phase's wall
time (``phases.search``: ``Tuner.fit`` alone, no feature pass, no test scoring), the sum of the
trials' own time (``time_total_s``: their training, validation and reports), the concurrency
(the cluster's CPUs over a trial's), and the ratio ``wall / (sum / concurrency)``: 1.0 is a search
whose every core trains all the time.

    python benchmarks/search_overhead.py [--dataset livec:../shared/data/livec-jpg] [--variants before after]

Written to ``benchmarks/results/search_overhead.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"


@contextlib.contextmanager
def as_before() -> Iterator[None]:
    """Searches as they ran before issue 35: a new actor per trial, the model's cost timed by every trial."""
    import iqa_ray.search.tuner as tuner_module

    # (each trial in a new actor: a new process, whose cost cache starts empty, so it times its model again)
    experiment_tuner = tuner_module.experiment_tuner

    def fresh_actors(settings: Any, trainable: Any, param_space: Any, *args: Any, **tune_config: Any) -> Any:
        return experiment_tuner(settings, trainable, param_space, *args, **{**tune_config, "reuse_actors": False})

    tuner_module.experiment_tuner = fresh_actors
    try:
        yield
    finally:
        tuner_module.experiment_tuner = experiment_tuner


def measure(experiment: Path, cpus: float) -> dict[str, Any]:
    summary = json.loads((experiment / "summary.json").read_text())
    trials = pd.read_parquet(experiment / "trials.parquet")
    search = trials[trials["kind"] == "search"]
    info = json.loads((experiment / "experiment.json").read_text())
    per_trial = float(info.get("cpus_per_trial") or 1.0)
    concurrency = max(1.0, cpus // per_trial)
    if info.get("max_concurrent"):
        concurrency = min(concurrency, float(info["max_concurrent"]))
    trained = float(search["time_total_s"].sum())
    wall = float(summary["phases"]["search"])
    return {"search_wall_s": round(wall, 1), "trials": int(len(search)), "trial_time_sum_s": round(trained, 1),
            "concurrency": concurrency, "wall_over_trial_time": round(wall / (trained / concurrency), 3),
            "test_srcc": summary.get("test", {}).get("srcc"), "phases": summary["phases"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="livec:../shared/data/livec-jpg")
    p.add_argument("--variants", nargs="+", choices=("before", "after"), default=["before", "after"])
    p.add_argument("--json", type=Path, default=RESULTS / "search_overhead.json")
    args = p.parse_args()

    import os

    from iqa_ray.cli.tune import main as tune_main
    from iqa_ray.core.io import atomic_write_json

    cpus = float(os.cpu_count() or 1)
    rows = {}
    with tempfile.TemporaryDirectory() as storage:
        for variant in args.variants:
            argv = ["--dataset", args.dataset, "--gpus", "0", "--no-refit", "--splits", "0",
                    "--storage", storage, "--name", variant, *(["--set", "checkpoint_every=1"] if variant == "before" else [])]
            with as_before() if variant == "before" else contextlib.nullcontext():
                code = tune_main(argv, study="ranking")
            if code != 0:
                raise SystemExit(f"the {variant} search failed ({code})")
            rows[variant] = measure(Path(storage) / variant, cpus)
    print("\n| search | wall (s) | trials | sum of trials' own time (s) | concurrency | wall / (sum / concurrency) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['search_wall_s']:.0f} | {r['trials']} | {r['trial_time_sum_s']:.0f} | "
              f"{r['concurrency']:g} | {r['wall_over_trial_time']:.2f}x |")
    atomic_write_json(args.json, {"dataset": args.dataset, "cpus": cpus, "variants": rows,
                                  "machine": platform.platform()})
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
