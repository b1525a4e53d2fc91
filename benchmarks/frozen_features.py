#!/usr/bin/env python
"""Which frozen features the cpu recipe trains on: input size x pooling, measured by ridge probes.

LIVE Challenge (627 photos with human MOS), split seed 0 with the cpu recipe's fractions
(0.6/0.2/0.2), the recipe's frozen EfficientNet-Lite0 (ImageNet weights, float32, eval mode).
Every photo goes through the backbone whole, as:

* ``native``: at its own size (the recipe's ``whole_image`` with no resize rule; 500 x 500 for
  all but two photos);
* ``0.5x`` / ``1.5x``: resized by that factor (bilinear, antialiased) before the backbone;

and its stage feature maps are pooled three ways (:func:`iqa_ray.models.mlp.pool_stages`):

* ``last mean``: the last stage's spatial mean (``pooling = "last"``);
* ``stage means``: every stage's spatial mean, concatenated (the linear-probe baseline's features);
* ``stage mean+std``: every stage's mean and standard deviation (``pooling = "stages"``, the
  recipe's choice).

and, at native size, ``block mean+std``: the same over every block group of Lite0 (7 groups: the 5
stages plus ``blocks.3`` and ``blocks.5``; ``pooling = "blocks"``, the recipe's choice).

Each of the 10 feature sets gets a ridge probe (:func:`iqa_ray.baselines.ridge_probe`: features
standardised on train, ridge strength chosen on validation SRCC, test scored once). Printed as a
markdown table (validation and test SRCC, test PLCC), written to
``benchmarks/results/frozen_features.json``. Features are cached under /tmp per input size, so a
rerun only fits the probes.

    python benchmarks/frozen_features.py [--json OUT]
    python benchmarks/frozen_features.py --quick   # 150 photos, JSON under /tmp
    python benchmarks/frozen_features.py --cv      # also: stage vs block mean+std by cross-validation

``--cv`` compares the two poolings the way the recipe was chosen, on training and validation photos
only: 5-fold cross-validation over the split's train+val photos (in each fold a quarter of the
other folds picks the ridge strength), for 3 fold seeds; it prints each pooling's mean SRCC and the
paired difference per fold (mean +- standard error, folds where blocks win). Test photos are not used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DATASET = "livec:../shared/data/livec-jpg"
SCALES = {"native": 1.0, "0.5x": 0.5, "1.5x": 1.5}
POOLINGS = ("last mean", "stage means", "stage mean+std")
CV_FOLDS, CV_SEEDS = 5, (0, 1, 2)
DEFAULT_JSON = Path("benchmarks/results/frozen_features.json")
QUICK_JSON = Path(tempfile.gettempdir()) / "frozen_features_quick.json"
FEATURE_DIR = Path(tempfile.gettempdir()) / "iqa_ray_feature_cache"
QUICK_PHOTOS = 150
_BATCH = 16


def recipe_config() -> Any:
    """The run config of the ranking study under the cpu recipe on LIVE Challenge (split seed 0)."""
    from iqa_ray.config import TrainConfig
    from iqa_ray.search.recipe import apply_recipe, load_recipe
    from iqa_ray.search.study import load_study

    study = apply_recipe(load_recipe("cpu"), load_study("ranking"), DATASET).study
    grid = {p.name: p.grid[0] for p in study.params}
    return TrainConfig.from_dict({**study.constants(), **grid, "dataset": DATASET, "split_seed": 0})


def fingerprint(table: Any, extra: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for path in table["path"].astype(str):
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def pooled_features(backbone: Any, images: list[np.ndarray], scale: float, blocks: Any = None) -> dict[str, np.ndarray]:
    """Each photo (resized by ``scale`` unless 1) through the frozen backbone, pooled three ways (and
    through ``blocks``, the same backbone tapping every block group, pooled as ``blocks``)."""
    import torch
    import torch.nn.functional as F

    from iqa_ray.models.mlp import pool_stages

    out: dict[str, list[np.ndarray]] = {"last": [], "stages": [], **({"blocks": []} if blocks is not None else {})}
    start = 0
    with torch.no_grad():
        while start < len(images):
            shape, stop = images[start].shape, start + 1  # consecutive photos of one size, up to 16
            while stop < len(images) and stop - start < _BATCH and images[stop].shape == shape:
                stop += 1
            batch = torch.from_numpy(np.stack(images[start:stop])).permute(0, 3, 1, 2).float().div_(255.0)
            if scale != 1.0:
                batch = F.interpolate(batch, scale_factor=scale, mode="bilinear", antialias=True,
                                      align_corners=False, recompute_scale_factor=True)
            stages = backbone(batch)
            out["last"].append(pool_stages(stages, "last").numpy())
            out["stages"].append(pool_stages(stages, "stages").numpy())
            if blocks is not None:
                out["blocks"].append(pool_stages(blocks(batch), "blocks").numpy())
            start = stop
    return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def stage_means(mean_std: np.ndarray, channels: tuple[int, ...]) -> np.ndarray:
    """The mean columns of ``stages`` pooling (per stage: its means, then its standard deviations)."""
    columns, start = [], 0
    for c in channels:
        columns.append(np.arange(start, start + c))
        start += 2 * c
    return mean_std[:, np.concatenate(columns)]


def cross_validate(feats: dict[str, np.ndarray], mos: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
    """Stage vs block mean+std ridge probes by k-fold cross-validation over ``rows`` (train+val)."""
    from iqa_ray.baselines import ridge_probe

    scores: dict[str, list[float]] = {"stages": [], "blocks": []}
    for seed in CV_SEEDS:
        folds = np.array_split(np.random.default_rng(seed).permutation(rows), CV_FOLDS)
        for k in range(CV_FOLDS):
            rest = np.concatenate([folds[j] for j in range(CV_FOLDS) if j != k])
            pick, fit_rows = rest[: len(rest) // 4], rest[len(rest) // 4:]
            for name in scores:
                scores[name].append(ridge_probe(feats[name].astype(np.float64), mos, fit_rows, pick, folds[k])["srcc"])
    diff = np.array(scores["blocks"]) - np.array(scores["stages"])
    return {"stages": float(np.mean(scores["stages"])), "blocks": float(np.mean(scores["blocks"])),
            "diff_mean": float(diff.mean()), "diff_se": float(diff.std(ddof=1) / np.sqrt(len(diff))),
            "blocks_better": int((diff > 0).sum()), "folds": int(len(diff)), "per_fold": scores}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None, help=f"results file (default {DEFAULT_JSON})")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke check on {QUICK_PHOTOS} photos (seeded, every split kept), JSON under /tmp")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cv", action="store_true",
                   help="also compare stage and block mean+std by cross-validation on train+val photos")
    args = p.parse_args()
    out = args.json or (QUICK_JSON if args.quick else DEFAULT_JSON)

    import torch

    from iqa_ray.baselines import ridge_probe
    from iqa_ray.config import TrainConfig
    from iqa_ray.engine import build, load_decoded
    from iqa_ray.utils.io import atomic_write_json

    torch.set_num_threads(args.threads)
    config = recipe_config()
    started = time.perf_counter()
    decoded = load_decoded(config)  # whole photos at their own size (the recipe has no resize rule)
    table = decoded.table
    rows = np.arange(len(table))
    if args.quick:
        rows = np.sort(np.random.default_rng(0).choice(rows, size=min(QUICK_PHOTOS, len(rows)), replace=False))
        table = table.iloc[rows].reset_index(drop=True)
    images = [decoded.images[i] for i in rows]
    split = table["split"].to_numpy()
    mos = table["mos"].to_numpy(np.float64)
    train, val, test = (np.flatnonzero(split == s) for s in ("train", "val", "test"))
    print(f"[data] {len(images)} photos decoded in {time.perf_counter() - started:.0f} s "
          f"({len(train)} train / {len(val)} val / {len(test)} test)", flush=True)

    stage_config = TrainConfig.from_dict({**config.to_dict(), "pooling": "stages"})
    backbone = build(stage_config, torch.device("cpu")).backbone.eval()  # the recipe's frozen Lite0, as the cache builds it
    channels = tuple(int(c) for c in backbone.channels)
    block_config = TrainConfig.from_dict({**config.to_dict(), "pooling": "blocks"})
    block_backbone = build(block_config, torch.device("cpu")).backbone.eval()  # tapping every block group
    results, timings = [], {}
    for name, scale in SCALES.items():
        key = {"backbone": config.model.backbone, "pretrained": str(config.model.pretrained), "scale": scale,
               "channels": channels, "resize": "bilinear, antialias" if scale != 1.0 else None,
               "blocks": block_backbone.tap_channels if scale == 1.0 else None}
        names = ("last", "stages", "blocks") if scale == 1.0 else ("last", "stages")
        path = FEATURE_DIR / f"livec_probe_{name}_{fingerprint(table, key)}.npz"
        if path.exists():
            with np.load(path) as z:
                feats = {k: z[k] for k in names}
            timings[name] = {"file": str(path), "loaded": True}
        else:
            t0 = time.perf_counter()
            feats = pooled_features(backbone, images, scale, block_backbone if scale == 1.0 else None)
            seconds = time.perf_counter() - t0
            FEATURE_DIR.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npz")
            np.savez(tmp, **feats)
            os.replace(tmp, path)
            timings[name] = {"file": str(path), "loaded": False, "seconds": round(seconds, 1)}
        print(f"[features] {name}: " + (f"computed in {timings[name]['seconds']:.0f} s" if not timings[name]["loaded"]
                                        else "loaded") + f" ({path})", flush=True)
        sets = {"last mean": feats["last"], "stage means": stage_means(feats["stages"], channels),
                "stage mean+std": feats["stages"]}
        if "blocks" in feats:
            sets["block mean+std"] = feats["blocks"]
            native = {k: v for k, v in feats.items()}
        for pooling in sets:
            x = sets[pooling].astype(np.float64)
            probe = ridge_probe(x, mos, train, val, test)
            results.append({"input": name, "scale": scale, "pooling": pooling, "dim": int(x.shape[1]),
                            "ridge_alpha": probe["alpha"], "val_srcc": probe["val_srcc"], "test_srcc": probe["srcc"],
                            "test_plcc": probe["plcc"], "n_test": probe["n"]})

    print(f"\nRidge probes on frozen {config.model.backbone} features, LIVE Challenge "
          f"({len(images)} photos, split seed 0, {'/'.join(map(str, config.data.split_fractions))})\n")
    print("| input | pooling | dim | ridge alpha | val SRCC | test SRCC | test PLCC |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['input']} | {r['pooling']} | {r['dim']} | {r['ridge_alpha']:g} | {r['val_srcc']:.3f} | "
              f"{r['test_srcc']:.3f} | {r['test_plcc']:.3f} |")
    cv = cross_validate(native, mos, np.concatenate([train, val])) if args.cv else None
    if cv is not None:
        print(f"\nCross-validation on the {len(train) + len(val)} train+val photos ({CV_FOLDS} folds x "
              f"{len(CV_SEEDS)} fold seeds, native size; test photos not used):")
        print(f"  stage mean+std: SRCC {cv['stages']:.4f}   block mean+std: SRCC {cv['blocks']:.4f}")
        print(f"  blocks - stages per fold: {cv['diff_mean']:+.4f} +- {cv['diff_se']:.4f} (standard error), "
              f"blocks better in {cv['blocks_better']} of {cv['folds']} folds")
    best = max(results, key=lambda r: r["val_srcc"])
    print(f"\nbest on validation: {best['input']}, {best['pooling']} (test SRCC {best['test_srcc']:.3f})")
    summary = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
               "date": time.strftime("%Y-%m-%d"), "dataset": DATASET, "quick": args.quick, "photos": len(images),
               "split": {"seed": 0, "fractions": list(config.data.split_fractions),
                         "counts": {"train": len(train), "val": len(val), "test": len(test)}},
               "backbone": config.model.backbone, "pretrained": str(config.model.pretrained), "channels": channels,
               "probe": "iqa_ray.baselines.ridge_probe: standardised on train, ridge alpha by validation SRCC, "
                        "test scored once",
               "features": timings, "results": results,
               "best_on_validation": {k: best[k] for k in ("input", "pooling", "val_srcc", "test_srcc")},
               "cross_validation": cv}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, summary)
    print(f"written {out}")


if __name__ == "__main__":
    main()
