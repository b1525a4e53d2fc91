#!/usr/bin/env python
"""Data loading: the decode-once cache vs decoding every sample, in images/s.

Both paths produce identical training batches (random 128 px crop + flip of the same images,
collated by a DataLoader with the same batch size and workers); the only difference is that
the baseline decodes the PNG bytes of each sample every time it is drawn, as a dataset that
reads files in ``__getitem__`` would. Measured over whole epochs of the embedded train split.

    python benchmarks/data_loading.py [--epochs 3] [--batch-size 16] [--workers 0]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from iqa_ray.data.catalog import ensure_embedded, generated_table
from iqa_ray.data.decoded import IQADataset, decode_table


class DecodeEverySample(Dataset):
    """The alternative: keep encoded bytes, decode on every access."""

    def __init__(self, table, crop_size: int) -> None:
        train = table[table["split"] == "train"]
        self.blobs = list(train["image"])
        self.mos = train["mos"].to_numpy(np.float32)
        self.crop_size = crop_size

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int):
        with Image.open(io.BytesIO(self.blobs[i])) as im:
            image = np.asarray(im.convert("RGB"))
        c = self.crop_size
        h, w = image.shape[:2]
        y = int(torch.randint(0, h - c + 1, ()).item())
        x = int(torch.randint(0, w - c + 1, ()).item())
        patch = image[y : y + c, x : x + c]
        if bool(torch.rand(()) < 0.5):
            patch = patch[:, ::-1]
        return {"image": torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1),
                "mos": torch.tensor(self.mos[i]), "index": i}


def images_per_second(dataset: Dataset, epochs: int, batch_size: int, workers: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0)
    n = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            n += batch["image"].shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--crop-size", type=int, default=128)
    p.add_argument("--json")
    args = p.parse_args()
    table = generated_table(ensure_embedded())
    t = time.perf_counter()
    decoded = decode_table(table)
    decode_once_s = time.perf_counter() - t
    cached = IQADataset(decoded, "train", train=True, crop_size=args.crop_size)
    baseline = DecodeEverySample(table, args.crop_size)
    assert len(cached) == len(baseline)
    results = {
        "cached_images_per_s": images_per_second(cached, args.epochs, args.batch_size, args.workers),
        "decode_every_sample_images_per_s": images_per_second(baseline, args.epochs, args.batch_size, args.workers),
    }
    summary = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "train_images": len(cached),
        "decode_all_once_s": round(decode_once_s, 3),
        **{k: round(v, 1) for k, v in results.items()},
        "ratio_cached_over_decode": round(results["cached_images_per_s"] / results["decode_every_sample_images_per_s"], 2),
        "settings": vars(args),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
