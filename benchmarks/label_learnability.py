#!/usr/bin/env python
"""How learnable is each embedded-dataset label? Three baselines on held-out photos.

For each label (``severity``: content-free, ``ssim``: content-dependent) on the embedded
dataset's split (by source photo):

* PIQE and BRISQUE (classical no-reference, no training; sign flipped so higher is better);
* a ridge regression on frozen, offline-ImageNet EfficientNet-Lite0 features (global-average
  pooled last stage), ridge strength chosen on the validation split, scored on test.

Reported: SRCC on the test photos overall, and SRCC within each reference crop (its
pristine version and its distortions), averaged: the "how bad is this distortion of this
picture" part of the task without the across-content part.

    python benchmarks/label_learnability.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.linear_model import Ridge

from iqa_ray.data.catalog import ensure_embedded, generated_table
from iqa_ray.data.decoded import decode_table
from iqa_ray.evaluation.baselines import baseline_scores
from iqa_ray.models.backbones import create_backbone


def within_group_srcc(pred: np.ndarray, mos: np.ndarray, groups: np.ndarray) -> float:
    values = []
    for g in np.unique(groups):
        m = groups == g
        if m.sum() >= 3 and np.ptp(mos[m]) > 0:
            values.append(spearmanr(pred[m], mos[m]).statistic)
    return float(np.mean(values))


@torch.no_grad()
def lite0_features(images: list[np.ndarray], batch: int = 64) -> np.ndarray:
    backbone = create_backbone("efficientnet_lite0", pretrained="offline", frozen=True).eval()
    feats = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(np.stack(images[start : start + batch])).permute(0, 3, 1, 2).float() / 255.0
        feats.append(backbone(x)[-1].mean(dim=(2, 3)).numpy())
    return np.concatenate(feats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    path = ensure_embedded()
    decoded = decode_table(generated_table(path))
    table = decoded.table
    images = decoded.images
    split = table["split"].to_numpy()
    test = split == "test"
    test_images = [images[i] for i in np.flatnonzero(test)]
    classical = {name: baseline_scores(name, test_images) for name in ("piqe", "brisque")}
    features = lite0_features(images)

    results = {}
    for label in ("severity", "ssim"):
        mos = table[f"mos_{label}"].to_numpy()
        groups = table["ref_id"].to_numpy()
        row = {}
        for name, pred in classical.items():
            row[name] = {"srcc": float(spearmanr(pred, mos[test]).statistic),
                         "srcc_within_ref": within_group_srcc(pred, mos[test], groups[test])}
        tr, va = split == "train", split == "val"
        best = max(
            (10.0 ** k for k in range(-3, 5)),
            key=lambda a: spearmanr(Ridge(alpha=a).fit(features[tr], mos[tr]).predict(features[va]), mos[va]).statistic,
        )
        pred = Ridge(alpha=best).fit(features[tr], mos[tr]).predict(features[test])
        row["lite0_ridge"] = {"srcc": float(spearmanr(pred, mos[test]).statistic),
                              "srcc_within_ref": within_group_srcc(pred, mos[test], groups[test]), "alpha": best}
        results[label] = row

    summary = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "dataset": str(path),
        "images": {s: int((split == s).sum()) for s in ("train", "val", "test")},
        "test_photos": sorted(table.loc[test, "photo"].unique().tolist()),
        "results": results,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary, indent=2))
    print("\n| label | PIQE | BRISQUE | Lite0 ridge | (within one reference: PIQE / BRISQUE / ridge) |")
    print("|---|---|---|---|---|")
    for label, row in results.items():
        print(f"| {label} | {row['piqe']['srcc']:.3f} | {row['brisque']['srcc']:.3f} | {row['lite0_ridge']['srcc']:.3f} | "
              f"{row['piqe']['srcc_within_ref']:.3f} / {row['brisque']['srcc_within_ref']:.3f} / "
              f"{row['lite0_ridge']['srcc_within_ref']:.3f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
