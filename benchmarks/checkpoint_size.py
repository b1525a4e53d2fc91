#!/usr/bin/env python
"""Checkpoint megabytes written per trial-epoch by a HyperIQA-ResNet-50 trial.

Trains HyperIQA on ResNet-50 (multi-scale, as the paper recipe; random init, 224 px crops, AdamW) for ``--epochs`` epochs on a
tiny synthetic dataset through the engine's ``fit``, and saves checkpoints from
``on_epoch_end`` the way the Tune trainable does: every epoch whose ``checkpoint_due`` is set
(an engine without that field, before issue 15, checkpointed every epoch). It reports the
bytes of every checkpoint file written, per epoch trained, for each case:

* ``--cases`` ``every1-best every1-last every2-best every4-best`` (``checkpoint_every`` and
  ``select_epoch``); an engine without ``checkpoint_every`` runs its one format (``current``).

Plus the exact sizes of the parts (weights, AdamW moments) for reference. Run it against an
older commit with ``PYTHONPATH=/path/to/old/worktree`` to measure the old format.

    python benchmarks/checkpoint_size.py [--epochs 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from synthetic import synthetic_decoded

import iqa_ray
from iqa_ray.training.build import build
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.config_sections import OptimConfig
from iqa_ray.training.engine import fit
from iqa_ray.training.schedule import build_optimizer

MB = 1e6


def supports(field: str) -> bool:
    return field in {f.name for f in dataclasses.fields(OptimConfig)}


def tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


MULTISCALE = True  # the paper recipe's HyperIQA (recipes/paper.toml); --single-scale turns it off


def base_config(epochs: int, extra: dict) -> TrainConfig:
    return TrainConfig.from_dict({"family": "hyperiqa", "backbone": "resnet50", "pretrained": "none", "crop_size": 224,
                                  "multiscale": MULTISCALE,
                                  "batch_size": 2, "eval_patches": 1, "patches_per_image": 1, "optimizer": "adamw",
                                  "epochs": epochs, "num_workers": 0, **extra})


def run_case(name: str, extra: dict, epochs: int, decoded) -> dict:
    config = base_config(epochs, extra)
    written: list[dict] = []
    with tempfile.TemporaryDirectory() as root:
        def on_epoch_end(e) -> None:
            if not getattr(e, "checkpoint_due", True):  # engines before issue 15 saved every epoch
                return
            path = e.save(Path(root) / f"epoch{e.epoch}")
            written.append({"epoch": e.epoch + 1, "mb": os.path.getsize(path) / MB, "is_best": e.is_best})

        start = time.perf_counter()
        fit(config, decoded, device="cpu", on_epoch_end=on_epoch_end, score_test=False)
        seconds = time.perf_counter() - start
    total = sum(w["mb"] for w in written)
    return {"case": name, **extra, "epochs": epochs, "checkpoints": len(written),
            "mb_per_checkpoint": [round(w["mb"], 1) for w in written], "mb_written": round(total, 1),
            "mb_per_trial_epoch": round(total / epochs, 1), "seconds": round(seconds, 1)}


CASES = {
    "every1-best": {"checkpoint_every": 1, "select_epoch": "best"},
    "every1-last": {"checkpoint_every": 1, "select_epoch": "last"},
    "every2-best": {"checkpoint_every": 2, "select_epoch": "best"},
    "every4-best": {"checkpoint_every": 4, "select_epoch": "best"},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--single-scale", action="store_true", help="HyperIQA without multi-scale features (smaller)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    global MULTISCALE
    MULTISCALE = not args.single_scale
    torch.set_num_threads(args.threads)
    decoded = synthetic_decoded(n_train=4, n_val=4, width=256, height=256)

    config = base_config(args.epochs, {})
    model = build(config, torch.device("cpu"))
    optimizer = build_optimizer(config, model)
    weights = tensor_bytes(model.state_dict())
    moments = sum(p.numel() * p.element_size() * 2 for g in optimizer.param_groups for p in g["params"])
    parts = {"weights_mb": round(weights / MB, 1), "adamw_moments_mb": round(moments / MB, 1),
             "weights+best+moments_mb": round((2 * weights + moments) / MB, 1),
             "weights+moments_mb": round((weights + moments) / MB, 1)}
    print(parts, flush=True)

    rows = []
    if supports("checkpoint_every"):
        for name in args.cases:
            rows.append(run_case(name, CASES[name], args.epochs, decoded))
            print(rows[-1], flush=True)
    else:
        rows.append(run_case("current (every epoch, best)", {}, args.epochs, decoded))
        print(rows[-1], flush=True)
    summary = {"engine": str(Path(iqa_ray.__file__).resolve().parent.parent), "date": time.strftime("%Y-%m-%d"),
               "torch": torch.__version__, "multiscale": MULTISCALE, "parts": parts, "rows": rows}
    print("\n| case | checkpoints / epochs | MB per checkpoint | MB per trial-epoch |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['checkpoints']} / {r['epochs']} | {', '.join(map(str, r['mb_per_checkpoint']))} | "
              f"{r['mb_per_trial_epoch']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
