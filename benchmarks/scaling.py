#!/usr/bin/env python
"""Scaling shape: pre-generation and search throughput with 1 and 2 CPUs of a local Ray node.

* Pre-generation: the embedded dataset (``--per-image`` versions per crop) on Ray Data with the
  Ray instance limited to N CPUs; images/s and CPU-seconds per image.
* Search: the same small ranking search (``--trials`` trials x ``--epochs`` epochs at 64 px, no
  early stopping) through the real launcher on a Ray instance of N CPUs (one CPU per trial, so N
  trials run at once); trials/hour and CPU-seconds per trial.

    python benchmarks/scaling.py [--cpus 1 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd


def pregeneration(cpus: int, per_image: int) -> dict:
    import ray

    from iqa_ray.data.pregenerate import PregenConfig, pregenerate

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            ds = pregenerate(PregenConfig(per_image=per_image), out, engine="ray")
            wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    n = ds.stats["processed"]
    return {"cpus": cpus, "images": n, "wall_s": round(wall, 1), "images_per_s": round(n / wall, 1),
            "cpu_s_per_image": round(cpus * wall / n, 4)}


def search(cpus: int, trials: int, epochs: int) -> dict:
    import ray

    from iqa_ray.search.launcher import main as launch

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    with tempfile.TemporaryDirectory() as storage:
        start = time.perf_counter()
        code = launch(["--num-samples", str(trials), "--max-epochs", str(epochs), "--scheduler", "none",
                       "--searcher", "random", "--cpus-per-trial", "1", "--set", "crop_size=64",
                       "--set", "eval_patches=1", "--storage", storage, "--name", f"scale{cpus}"], study="ranking")
        wall = time.perf_counter() - start
        done = len(pd.read_parquet(Path(storage) / f"scale{cpus}" / "trials.parquet")) if code == 0 else 0
    if ray.is_initialized():
        ray.shutdown()
    return {"cpus": cpus, "trials": done, "wall_s": round(wall, 1), "trials_per_hour": round(done / wall * 3600, 1),
            "cpu_s_per_trial": round(cpus * wall / max(done, 1), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    p.add_argument("--per-image", type=int, default=10)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    result = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
              "pregeneration": [pregeneration(c, args.per_image) for c in args.cpus],
              "search": [search(c, args.trials, args.epochs) for c in args.cpus]}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
