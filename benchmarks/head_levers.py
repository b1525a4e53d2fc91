#!/usr/bin/env python
"""Levers on the cpu recipe's head, measured on LIVE Challenge's training and validation photos only.

Each lever is a change to what the recipe's MLP head (:func:`frozen_features.head_srcc`) sees or how
it weighs its training photos, on top of the recipe's frozen features (Lite0's every-block mean and
std of each whole photo at its own size, the feature cache a search computes):

* ``+ BRISQUE``: the 36 BRISQUE statistics of each photo (:func:`iqa_ray.evaluation.baselines.brisque_features`)
  appended to the features: the classical natural-scene statistics the backbone may not encode;
* ``+ quantiles``: each block's 10th and 90th spatial percentile per channel appended (the tails of
  where a feature fires, beside its mean and spread);
* ``rating-std weights``: each photo's L1 term and each pair's ranking term weighted by 1 / the
  photo's rating std squared (normalised to mean 1; LIVE Challenge ships each photo's std):
  photos people agreed on count more;
* ``mirror views``: every training draw is the photo or its mirror image at random (the cache holds
  both), and the score the mean of the two;
* ``all four`` together.

Protocol (the one the recipe's pooling and refit were chosen by): the seed-0 split's train+val
photos cut into 5 folds, for fold seeds 0 and 1 (10 folds; ``--seeds`` for more); in each fold
every variant trains on the other four folds with the same seed and is scored on the held-out fold
(SRCC). Printed: each fold, then each variant's mean and its paired difference from the recipe
(mean +- standard error, folds won). Test photos are not used. Written to
``benchmarks/results/head_levers.json``.

    python benchmarks/head_levers.py [--seeds 0 1 2 3 4]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frozen_features import CV_FOLDS, head_cv, recipe_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QUANTILES = (0.1, 0.9)


def block_quantiles(decoded: Any, config: Any) -> np.ndarray:
    """(N, 2 * channels) each every-block map's per-channel spatial quantiles of each whole photo."""
    import torch

    from iqa_ray.training.build import build

    backbone = build(config, torch.device("cpu")).backbone.eval()
    q = torch.tensor(QUANTILES)
    out = []
    with torch.no_grad():
        for image in decoded.images:
            maps = backbone(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().div_(255.0))
            per_map = [torch.quantile(m.float().flatten(2), q, dim=2) for m in maps]  # each (2, 1, C)
            out.append(torch.cat([p[i, 0] for i in range(len(QUANTILES)) for p in per_map]).numpy())
    return np.stack(out).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fold seeds (default 0 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", type=Path, default=RESULTS / "head_levers.json")
    args = p.parse_args()

    import torch

    from iqa_ray.core.io import atomic_write_json
    from iqa_ray.evaluation.baselines import brisque_features
    from iqa_ray.training.features import compute_features
    from iqa_ray.training.loaders import load_decoded

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    # the recipe's features as these levers were measured on (before reference_blur and hflip = false
    # entered it), the mirror images included
    config = recipe_config().replace(reference_blur=0.0, hflip=True)
    decoded = load_decoded(config)
    table = decoded.table
    if "mos_std" not in table.columns or table["mos_std"].isna().any():
        raise SystemExit("head_levers.py needs each photo's rating std (the livec adapter's mos_std column)")
    mos = table["mos"].to_numpy(np.float64)
    rows = np.flatnonzero(np.isin(table["split"].to_numpy(), ("train", "val")))
    t0 = time.perf_counter()
    cache = compute_features(decoded, config, "cpu")
    seconds = {"features": time.perf_counter() - t0}
    t0 = time.perf_counter()
    brisque = np.stack([brisque_features(im) for im in decoded.images]).astype(np.float32)
    seconds["brisque"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    quantiles = block_quantiles(decoded, config)
    seconds["quantiles"] = time.perf_counter() - t0
    print("[features] " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
          + f"; {len(rows)} train+val photos (test photos not used)", flush=True)
    std = table["mos_std"].to_numpy(np.float64)
    weights = 1.0 / std**2
    weights /= weights[rows].mean()
    x, both = cache.plain, np.concatenate([cache.plain, brisque, quantiles], 1)
    flipped_both = np.concatenate([cache.flipped, brisque, quantiles], 1)  # BRISQUE and quantiles of the unmirrored photo
    variants: dict[str, dict[str, Any]] = {
        "recipe": {"x": x},
        "+ BRISQUE": {"x": np.concatenate([x, brisque], 1)},
        "+ quantiles": {"x": np.concatenate([x, quantiles], 1)},
        "rating-std weights": {"x": x, "weights": weights},
        "mirror views": {"x": x, "flipped": cache.flipped},
        "all four": {"x": both, "weights": weights, "flipped": flipped_both},
    }
    scores, result = head_cv(variants, mos, rows, args.seeds, base="recipe")
    print(f"\nThe recipe's MLP head, {CV_FOLDS}-fold cross-validation over the seed-0 split's {len(rows)} train+val "
          f"photos, fold seeds {args.seeds}:\n")
    print("| variant | mean SRCC | vs the recipe, per fold | wins |")
    print("|---|---|---|---|")
    for name, r in result.items():
        d = r.get("vs_recipe")
        print(f"| {name} | {r['mean']:.4f} | " + ("" if d is None else f"{d['diff_mean']:+.4f} +- {d['diff_se']:.4f} | "
                                                  f"{d['wins']} of {d['folds']}") + (" | |" if d is None else " |"))
    atomic_write_json(args.json, {"dataset": config.data.dataset, "backbone": config.model.backbone,
                                  "pooling": config.model.pooling, "fold_seeds": args.seeds, "rows": int(len(rows)),
                                  "variants": result, "per_fold": scores,
                                  "seconds": {**{k: round(v, 1) for k, v in seconds.items()},
                                              "total": round(time.perf_counter() - started, 1)},
                                  "machine": platform.platform(), "threads": args.threads})
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
