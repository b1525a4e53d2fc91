#!/usr/bin/env python
"""Tune overhead on short trials: the same trials in the plain engine and in one Tuner.

The trials a cpu-recipe search runs: the recipe's MLP head on LIVE Challenge's cached frozen
features (the cache computed once, outside the timings, with 2 threads), ``--epochs`` epochs each
(about a second per epoch: 10-second trials), ``--trials`` of them differing only in their seed.
Everything trains on one thread:

1. ``plain``: :func:`iqa_ray.training.engine.fit` for each trial, one after the other, in this process;
2. ``Tuner, new actor per trial``: the same trials through :func:`iqa_ray.trainables.iqa.iqa_trainable`
   in one Tuner on a 1-CPU Ray instance (data and features through ``tune.with_parameters``,
   reports every epoch, checkpoints as the recipe sets them), ``reuse_actors = false``: how
   searches ran before issue 35;
3. ``Tuner, actors reused``: the same with ``reuse_actors = true``, as searches run now.

Reported: wall seconds of each, the trials' own time (``time_total_s``) and the ratio of each
Tuner's wall time to the plain run's. Ray's start-up is excluded (paid once per search).
Validation SRCC of every trial is compared between the plain run and the Tuners (training is
seeded: the same).

    python benchmarks/tune_overhead.py [--trials 8] [--epochs 10] [--json benchmarks/results/tune_overhead.json]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frozen_features import recipe_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--json", type=Path, default=RESULTS / "tune_overhead.json")
    args = p.parse_args()

    import torch

    from iqa_ray.core.io import atomic_write_json
    from iqa_ray.training.engine import fit
    from iqa_ray.training.features import compute_features
    from iqa_ray.training.loaders import load_decoded

    config = recipe_config().replace(epochs=args.epochs)
    decoded = load_decoded(config)
    torch.set_num_threads(2)
    features = compute_features(decoded, config, "cpu")
    torch.set_num_threads(1)
    seeds = list(range(args.trials))
    start = time.perf_counter()
    plain_val = [fit(config.replace(seed=s), decoded, features=features).history[-1]["val_srcc"] for s in seeds]
    plain_s = time.perf_counter() - start
    print(f"[plain] {args.trials} trials x {args.epochs} epochs: {plain_s:.1f} s", flush=True)

    import ray
    from ray import tune

    from iqa_ray.trainables.iqa import iqa_trainable

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    runs = {}
    try:
        for name, reuse in (("Tuner, new actor per trial", False), ("Tuner, actors reused", True)):
            with tempfile.TemporaryDirectory() as storage:
                trainable = tune.with_resources(
                    tune.with_parameters(iqa_trainable, decoded=decoded, features=features, cpus_per_trial=1), {"cpu": 1})
                tuner = tune.Tuner(trainable, param_space={**config.flat(), "seed": tune.grid_search(seeds)},
                                   tune_config=tune.TuneConfig(reuse_actors=reuse),
                                   run_config=tune.RunConfig(name="overhead", storage_path=storage, verbose=0,
                                                             checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
                start = time.perf_counter()
                grid = tuner.fit()
                wall = time.perf_counter() - start
                by_seed = {r.config["seed"]: r for r in grid}
                runs[name] = {"wall_s": round(wall, 1), "ratio_to_plain": round(wall / plain_s, 3),
                              "trial_time_total_s": round(sum(float(r.metrics["time_total_s"]) for r in grid), 1),
                              "same_val_srcc": [by_seed[s].metrics["val_srcc"] for s in seeds] == plain_val}
                print(f"[{name}] {wall:.1f} s", flush=True)
    finally:
        ray.shutdown()
    print(f"\n| {args.trials} trials x {args.epochs} epochs, one thread | wall (s) | ratio to plain | trials' own time (s) "
          "| same validation SRCC |")
    print("|---|---|---|---|---|")
    print(f"| plain `engine.fit`, one after the other | {plain_s:.1f} | 1 | | |")
    for name, r in runs.items():
        print(f"| {name} | {r['wall_s']:.1f} | {r['ratio_to_plain']:.2f}x | {r['trial_time_total_s']:.1f} | "
              f"{r['same_val_srcc']} |")
    atomic_write_json(args.json, {"trials": args.trials, "epochs": args.epochs, "plain_s": round(plain_s, 1),
                                  "runs": runs, "config": config.to_dict(), "machine": platform.platform(),
                                  "date": time.strftime("%Y-%m-%d")})
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
