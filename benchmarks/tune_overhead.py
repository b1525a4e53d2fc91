#!/usr/bin/env python
"""Tune overhead: the same configuration for the same epochs in the plain engine and in a Tune trial.

Both run on one thread with the same decoded data: (1) ``iqa_ray.training.engine.fit`` in this process;
(2) the same config through ``iqa_ray.trainables.iqa.iqa_trainable`` in a one-trial Tuner (data via
``tune.with_parameters``, a checkpoint and a report every epoch, as in a search). Reported: the
trial's own training time (``time_total_s``), the whole ``Tuner.fit()`` wall time (actor start,
data transfer, result processing), and their ratios to the plain run. Ray's start-up is excluded
(it is paid once per search, not per trial).

    python benchmarks/tune_overhead.py [--epochs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch

from iqa_ray.training.config import TrainConfig
from iqa_ray.training.engine import fit
from iqa_ray.training.loaders import load_decoded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--family", default="mlp")
    p.add_argument("--crop-size", type=int, default=96)
    p.add_argument("--json")
    args = p.parse_args()
    flat = {"family": args.family, "epochs": args.epochs, "crop_size": args.crop_size, "eval_patches": 1,
            "backbone_lr_mult": 1.0}
    config = TrainConfig.from_dict(flat)
    decoded = load_decoded(config)
    torch.set_num_threads(1)
    start = time.perf_counter()
    plain = fit(config, decoded)
    plain_s = time.perf_counter() - start

    import ray
    from ray import tune

    from iqa_ray.trainables.iqa import iqa_trainable

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    with tempfile.TemporaryDirectory() as storage:
        trainable = tune.with_resources(tune.with_parameters(iqa_trainable, decoded=decoded, cpus_per_trial=1),
                                        {"cpu": 1})
        tuner = tune.Tuner(trainable, param_space=config.flat(),
                           run_config=tune.RunConfig(name="overhead", storage_path=storage, verbose=0,
                                                     checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        start = time.perf_counter()
        grid = tuner.fit()
        tune_wall = time.perf_counter() - start
        result = grid[0]
        trial_s = float(result.metrics["time_total_s"])
        same = [round(h["val_srcc"], 6) for h in plain.history] == [round(v, 6) for v in result.metrics_dataframe["val_srcc"]]
    ray.shutdown()
    summary = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
        "config": flat, "plain_fit_s": round(plain_s, 2), "tune_trial_time_total_s": round(trial_s, 2),
        "tune_fit_wall_s": round(tune_wall, 2),
        "trial_over_plain": round(trial_s / plain_s, 3), "tuner_wall_over_plain": round(tune_wall / plain_s, 3),
        "same_val_srcc_per_epoch": same,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
