#!/usr/bin/env python
"""Data feed: what the data path delivers vs what the training step consumes, per family/backbone.

Consumption: training images/s of the engine's step for each (family, backbone, crop) at its
batch size (``train_throughput.measure``). Delivery: images/s of the engine's own training
DataLoader (decode-once cache, random crop + flip, batching) over the embedded dataset at the same
crop and batch size, with the engine's default settings (``num_workers=0``; pinned memory only on
CUDA). Goal: delivery >= 3x consumption, so the accelerator never waits for data.

    python benchmarks/data_feed.py [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from train_throughput import CASES, measure

from iqa_ray.data.catalog import ensure_embedded, generated_table
from iqa_ray.data.decoded import decode_table
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.loaders import make_loaders


def delivery(crop: int, batch: int, epochs: int = 3) -> float:
    size = None if crop <= 160 else (crop + 32, crop + 32)  # the embedded crops are 160 px
    decoded = decode_table(generated_table(ensure_embedded()), image_size=size, min_size=crop)
    config = TrainConfig.from_dict({"crop_size": crop, "batch_size": batch})
    loader = make_loaders(config, decoded).train
    n, start = 0, time.perf_counter()
    for _ in range(epochs):
        for b in loader:
            n += b["image"].shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows, delivered = [], {}
    for family, backbone, size in CASES:
        consumed = measure(family, backbone, size, args.batch_size, steps=4)["train_images_per_s"]
        if size not in delivered:
            delivered[size] = delivery(size, args.batch_size)
        rows.append({"family": family, "backbone": backbone, "crop": size, "step_images_per_s": consumed,
                     "data_images_per_s": round(delivered[size], 1),
                     "ratio": round(delivered[size] / consumed, 1)})
        print(rows[-1], flush=True)
    summary = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
               "threads": args.threads, "batch_size": args.batch_size, "rows": rows}
    print("\n| family | backbone | crop | step consumes img/s | data path delivers img/s | ratio |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['backbone']} | {r['crop']} | {r['step_images_per_s']} | {r['data_images_per_s']} | {r['ratio']}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
