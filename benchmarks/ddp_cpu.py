"""A 2-worker CPU data-parallel trial against a 1-worker one on the same config (issue 15).

Runs the launcher twice on the embedded dataset, one trial each (same seeded lr): with
``--workers-per-trial 2`` (two gloo processes, 1 CPU each) and as one process with
``--cpus-per-trial 2`` (2 torch threads). Writes benchmarks/results/ddp_cpu.json and prints a
markdown table of wall time, training images/s (the last epoch's) and final val SRCC.

On a 2-core machine this is a correctness run, not a speed-up: both runs use the same 2 cores,
the data-parallel one adds a gradient all-reduce per step and every worker prepares the whole
global batch and evaluates the whole validation split. A ratio near 1 says the overhead is
small; a speed-up needs more cores or GPUs than one process can use.

    python benchmarks/ddp_cpu.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = """
[study]
description = "ddp_cpu benchmark: one mlp-head trial on a frozen Lite0"
num_samples = 1
max_epochs = {epochs}
grace_period = 1
searcher = "random"
trial_scheduler = "none"

[fixed]
family = "mlp"
hidden_dim = 16
crop_size = 64
eval_patches = 1
batch_size = 32
frozen_backbone = true
dropout = 0.0

[params.lr]
role = "scientific"
type = "loguniform"
low = 0.001
high = 0.003
grid = [0.002]
"""


def run(tmp: Path, name: str, extra: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "launch" / "tune.py"), "--study", str(tmp / "study.toml"), "--storage",
           str(tmp), "--name", name, "--cpus-per-trial", "2", *extra]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    (trial,) = (tmp / name).glob("trial_*")
    rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
    return {"command": " ".join(cmd[1:]), "launcher_wall_s": round(wall, 1),
            "train_wall_s": round(sum(r["epoch_seconds"] for r in rows), 2),
            "images_per_s_last_epoch": round(rows[-1]["images_per_s"], 1),
            "val_srcc_final": rows[-1]["val_srcc"], "train_loss_final": rows[-1]["train_loss"],
            "epochs": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        (tmp / "study.toml").write_text(STUDY.format(epochs=args.epochs))
        one = run(tmp, "one", [])
        two = run(tmp, "two", ["--workers-per-trial", "2"])
    result = {"config": "embedded dataset, mlp head on frozen efficientnet_lite0, crop 64, batch 32, dropout 0",
              "cpus": 2, "one_worker": one, "two_workers": two,
              "train_time_ratio_two_over_one": round(two["train_wall_s"] / one["train_wall_s"], 2),
              "val_srcc_abs_diff": abs(two["val_srcc_final"] - one["val_srcc_final"])}
    out = ROOT / "benchmarks" / "results" / "ddp_cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| run | launcher wall (s) | train time (s) | images/s (last epoch) | final val SRCC |")
    print("|---|---|---|---|---|")
    for label, r in (("1 worker, 2 threads", one), ("2 workers (gloo), 1 thread each", two)):
        print(f"| {label} | {r['launcher_wall_s']} | {r['train_wall_s']} | {r['images_per_s_last_epoch']} | "
              f"{r['val_srcc_final']:.6f} |")
    print(f"\ntrain time ratio (2 workers / 1): {result['train_time_ratio_two_over_one']}; "
          f"|val SRCC difference|: {result['val_srcc_abs_diff']:.2e}; written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
