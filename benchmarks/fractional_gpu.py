#!/usr/bin/env python
"""Fractional GPUs: trials completed per hour at 1, 2 and 4 trials per GPU, peak memory, AMP.

Runs the same short ranking study (``--num-samples`` trials x ``--max-epochs``, no early
stopping, so every packing does the same work) through the real launcher with
``--gpus 1 --gpus-per-trial`` 1, 0.5 and 0.25, and reads back from ``trials.parquet`` /
``epochs.parquet``: wall time, trials per hour, and each trial's peak GPU memory
(``gpu_peak_mem_mb``, reported by the engine on CUDA). Mixed precision (bf16 autocast, the
engine's default on CUDA) is checked by a separate one-epoch run with ``amp`` on and off: both
must give finite losses and similar validation SRCC.

Needs one CUDA GPU; on a machine without one it says so and exits 2.

    python benchmarks/fractional_gpu.py [--num-samples 8] [--max-epochs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--max-epochs", type=int, default=3)
    p.add_argument("--shares", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    p.add_argument("--cpus-per-trial", type=float, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine: run this benchmark on a GPU box", file=sys.stderr)
        return 2
    from iqa_ray.cli.tune import main as launch
    from iqa_ray.training.config import TrainConfig
    from iqa_ray.training.engine import fit
    from iqa_ray.training.loaders import load_decoded

    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for share in args.shares:
            name = f"gpu-share-{share:g}"
            start = time.perf_counter()
            code = launch(["--gpus", "1", "--gpus-per-trial", str(share), "--cpus-per-trial", str(args.cpus_per_trial),
                           "--num-samples", str(args.num_samples), "--max-epochs", str(args.max_epochs),
                           "--trial-scheduler", "none", "--searcher", "random", "--storage", storage, "--name", name,
                           "--recipe", "none"],  # the study as written: the paper recipe needs hub weights
                          study="ranking")
            wall = time.perf_counter() - start
            if code != 0:
                raise SystemExit(f"search with --gpus-per-trial {share} failed ({code})")
            trials = pd.read_parquet(Path(storage) / name / "trials.parquet")
            epochs = pd.read_parquet(Path(storage) / name / "epochs.parquet")
            rows.append({"gpus_per_trial": share, "trials_per_gpu": round(1 / share), "wall_s": round(wall, 1),
                         "trials": len(trials), "trials_per_hour": round(len(trials) / wall * 3600, 1),
                         "peak_gpu_mem_mb_per_trial": round(float(epochs["gpu_peak_mem_mb"].max()), 1),
                         "mean_train_images_per_s": round(float(epochs["images_per_s"].mean()), 1),
                         "best_val_srcc": round(float(trials["best_val_srcc"].max()), 4)})
            print(rows[-1], flush=True)
    amp = {}
    for flag in (True, False):
        config = TrainConfig.from_dict({"epochs": 1, "amp": flag})
        decoded = load_decoded(config)
        result = fit(config, decoded, device="cuda")
        amp["on" if flag else "off"] = {"train_loss": result.history[-1]["train_loss"],
                                        "val_srcc": result.best_val["srcc"],
                                        "images_per_s": result.history[-1]["images_per_s"]}
    summary = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "packing": rows, "amp": amp}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
