#!/usr/bin/env python
"""Training and inference throughput (images/s) per family and backbone on this machine.

Synthetic uint8 batches through the engine's own step (float conversion, forward, family loss,
backward, AdamW step); inference is the eval path (no grad). Warm-up steps are excluded.

    python benchmarks/train_throughput.py [--batch-size 16] [--steps 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from iqa_ray.training.build import build
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.schedule import build_optimizer

CASES = [
    ("mlp", "efficientnet_lite0", 128), ("gmm", "efficientnet_lite0", 128), ("hyperiqa", "efficientnet_lite0", 128),
    ("hyperiqa", "resnet18", 128), ("hyperiqa", "resnet50", 128), ("hyperiqa", "efficientnet_b0", 128),
    ("mlp", "vit_small_patch16_224", 224), ("hyperiqa", "swin_tiny_patch4_window7_224", 224),
]


def measure(family: str, backbone: str, size: int, batch: int, steps: int) -> dict[str, float]:
    extra = {"n_clusters": 4, "feature_dim": 64, "hidden_dim": 128} if family == "gmm" else {}
    config = TrainConfig.from_dict({"family": family, "backbone": backbone, "pretrained": "none", "crop_size": size,
                                    "batch_size": batch, **extra})
    device = torch.device("cpu")
    model = build(config, device)
    if family == "gmm":
        model.on_train_start([torch.rand(16, 3, size, size) for _ in range(2)])
    optimizer = build_optimizer(config, model)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    target = torch.rand(batch) * 100

    def train_step() -> None:
        out = model(images.float().div(255))
        loss = model.compute_loss(out, target)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.train()
    train_step()
    start = time.perf_counter()
    for _ in range(steps):
        train_step()
    train = batch * steps / (time.perf_counter() - start)
    model.eval()
    with torch.no_grad():
        model(images.float().div(255))
        start = time.perf_counter()
        for _ in range(steps):
            model(images.float().div(255))
        infer = batch * steps / (time.perf_counter() - start)
    return {"train_images_per_s": round(train, 1), "inference_images_per_s": round(infer, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for family, backbone, size in CASES:
        r = {"family": family, "backbone": backbone, "size": size,
             **measure(family, backbone, size, args.batch_size, args.steps)}
        rows.append(r)
        print(r, flush=True)
    summary = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
               "threads": args.threads, "batch_size": args.batch_size, "rows": rows}
    print("\n| family | backbone | px | train img/s | inference img/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['backbone']} | {r['size']} | {r['train_images_per_s']} | {r['inference_images_per_s']} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
