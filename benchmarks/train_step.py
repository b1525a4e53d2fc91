#!/usr/bin/env python
"""The engine's training step, images/s, on this CPU: this tree against another commit's.

Each case trains HyperIQA (random init, 128 px crops, batch 16, one crop per image) for
``--epochs`` epochs through the engine's own ``fit`` on a synthetic decoded dataset (nothing is
read or downloaded) and reads ``images_per_s`` of each epoch after the first (the engine times
its training loop: loader, forward, loss, backward, optimizer step, bookkeeping; not evaluation).
With ``--compare TREE`` every case also runs with ``PYTHONPATH=TREE`` (a worktree of an older
commit), the two engines alternating case by case in fresh processes, so machine noise falls on
both alike; the table gives each and their ratio.

    git worktree add /tmp/before 968f339
    python benchmarks/train_step.py --compare /tmp/before [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BACKBONES = ("efficientnet_lite0", "resnet18", "resnet50")


def measure(backbone: str, epochs: int, n_train: int, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from synthetic import synthetic_decoded

    import iqa_ray
    from iqa_ray.training.config import TrainConfig
    from iqa_ray.training.engine import fit

    torch.set_num_threads(threads)
    decoded = synthetic_decoded(n_train=n_train, n_val=16, width=160, height=160)
    config = TrainConfig.from_dict({"family": "hyperiqa", "backbone": backbone, "pretrained": "none",
                                    "crop_size": 128, "batch_size": 16, "eval_patches": 1, "epochs": epochs,
                                    "num_workers": 0, "amp": False})
    result = fit(config, decoded, device="cpu", score_test=False)
    rates = [h["images_per_s"] for h in result.history[1:]]
    return {"backbone": backbone, "engine": str(Path(iqa_ray.__file__).resolve().parent.parent),
            "images_per_s": rates, "median_images_per_s": round(statistics.median(rates), 2)}


def run_child(backbone: str, args: argparse.Namespace, tree: str | None) -> dict:
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = tree + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, __file__, "--child", backbone, "--epochs", str(args.epochs), "--n-train",
           str(args.n_train), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/" if tree else None)
    if proc.returncode != 0:
        raise SystemExit(f"{backbone} with {tree or 'this tree'} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", metavar="TREE", help="a worktree of the commit to compare with")
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n-train", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.epochs, args.n_train, args.threads)))
        return 0
    if args.compare and not (Path(args.compare) / "iqa_ray" / "engine.py").exists():
        p.error(f"--compare {args.compare}: not a source tree of iqa-ray (no iqa_ray/training/engine.py there)")
    rows = []
    for backbone in args.backbones:
        row = {"backbone": backbone}
        if args.compare:
            row["before"] = run_child(backbone, args, args.compare)
        row["after"] = run_child(backbone, args, None)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nHyperIQA, 128 px, batch 16, {args.threads} threads, median of epochs 2-{args.epochs} "
          f"({args.n_train} images each)\n")
    if args.compare:
        print(f"| backbone | before img/s ({args.compare}) | after img/s | after / before |\n|---|---|---|---|")
        for r in rows:
            b, a = r["before"]["median_images_per_s"], r["after"]["median_images_per_s"]
            r["ratio"] = round(a / b, 3)
            print(f"| {r['backbone']} | {b} | {a} | {r['ratio']} |")
    else:
        print("| backbone | img/s |\n|---|---|")
        for r in rows:
            print(f"| {r['backbone']} | {r['after']['median_images_per_s']} |")
    if args.json:
        summary = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {platform.machine()}, "
                   f"{os.cpu_count()} CPUs", "threads": args.threads, "epochs": args.epochs,
                   "n_train": args.n_train, "compare": args.compare, "rows": rows}
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
