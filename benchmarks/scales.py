#!/usr/bin/env python
"""Two levers of issue 36, measured on LIVE Challenge's training and validation photos only.

**Two scales** (``scales = [1.0, 0.5]``, :class:`iqa_ray.models.mlp.MLPOptions`): each photo's
frozen features (the cpu recipe's cache: Lite0's every-block mean and std and their change under
the 4 px pseudo-reference blur) at its own size, with the same features of the photo at half size
appended, as CONTRIQUE does. The features go through the product's own path
(:func:`iqa_ray.training.features.compute_features` with the recipe's config and ``scales`` set); the
first half of such a cache is the features at one scale, so ``one scale`` is read from it.

**An average of heads** (``--heads K``): the mean score of K heads trained with different seeds
on the same features, the cheapest ensemble; it says how much a search's ensemble of similar heads
can gain before trials' differing hyperparameters add anything.

Protocol (the one the recipe's pooling, pseudo-reference and refit were chosen by): the seed-0
split's train+val photos cut into 5 folds per fold seed; in each fold the recipe's MLP head
(:func:`frozen_features.head_predict`) trains on the other four folds, with the same seed for every
variant, and is scored on the held-out fold (SRCC). Printed: each fold, then each variant's mean and
its paired difference from ``one scale`` (mean +- standard error, folds won). Test photos are not
used. Written to ``benchmarks/results/scales.json``.

    python benchmarks/scales.py [--seeds 0 1 2 3 4] [--heads 5]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frozen_features import CV_FOLDS, CV_SEEDS, cv_folds, fold_summary, head_predict, recipe_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=list(CV_SEEDS), help="fold seeds (default 0-4: 25 folds)")
    p.add_argument("--heads", type=int, default=5, help="heads averaged in the ensemble variants (default 5; 1: none)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", type=Path, default=RESULTS / "scales.json")
    args = p.parse_args()
    if args.heads < 1:
        p.error(f"--heads must be >= 1, got {args.heads}")

    import torch

    from iqa_ray.core.io import atomic_write_json
    from iqa_ray.core.metrics import srcc
    from iqa_ray.training.features import compute_features
    from iqa_ray.training.loaders import load_decoded

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    config = recipe_config()
    decoded = load_decoded(config)
    table = decoded.table
    mos = table["mos"].to_numpy(np.float64)
    rows = np.flatnonzero(np.isin(table["split"].to_numpy(), ("train", "val")))
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    one_cache = compute_features(decoded, config, "cpu")
    seconds["features one scale"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    two_cache = compute_features(decoded, config.replace(scales=[1.0, 0.5]), "cpu")
    seconds["features two scales"] = time.perf_counter() - t0
    d = one_cache.plain.shape[1]
    np.testing.assert_allclose(two_cache.plain[:, :d], one_cache.plain, rtol=1e-5, atol=1e-4)
    features = {"one scale": one_cache.plain, "two scales": two_cache.plain}
    print("[features] " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
          + f"; {len(rows)} train+val photos (test photos not used)", flush=True)
    names = [*features] + ([f"{n}, {args.heads} heads" for n in features] if args.heads > 1 else [])
    scores: dict[str, list[float]] = {n: [] for n in names}
    for seed in args.seeds:
        for k, rest, held in cv_folds(rows, seed):
            for name, x in features.items():
                preds = [head_predict(x, mos, rest, held, seed=100 * seed + k + 1000 * h) for h in range(args.heads)]
                scores[name].append(float(srcc(preds[0], mos[held])))
                if args.heads > 1:
                    scores[f"{name}, {args.heads} heads"].append(float(srcc(np.mean(preds, axis=0), mos[held])))
            print(f"[cv] fold seed {seed} fold {k}: " + "  ".join(f"{n} {s[-1]:.4f}" for n, s in scores.items()), flush=True)
    result = fold_summary(scores, "one scale", key="vs_one_scale")
    print(f"\nThe recipe's MLP head, {CV_FOLDS}-fold cross-validation over the seed-0 split's {len(rows)} train+val "
          f"photos, fold seeds {args.seeds}:\n")
    print("| variant | features | mean SRCC | vs one scale, per fold | wins |")
    print("|---|---|---|---|---|")
    for name, r in result.items():
        dcmp = r.get("vs_one_scale")
        width = features[name.split(",")[0]].shape[1]
        print(f"| {name} | {width} | {r['mean']:.4f} | "
              + ("|" if dcmp is None else f"{dcmp['diff_mean']:+.4f} +- {dcmp['diff_se']:.4f} | {dcmp['wins']} of {dcmp['folds']} |"))
    atomic_write_json(args.json, {"dataset": config.data.dataset, "backbone": config.model.backbone,
                                  "fold_seeds": args.seeds, "heads": args.heads, "rows": int(len(rows)),
                                  "variants": result, "per_fold": scores,
                                  "seconds": {**{k: round(v, 1) for k, v in seconds.items()},
                                              "total": round(time.perf_counter() - started, 1)},
                                  "machine": platform.platform(), "threads": args.threads, "config": config.to_dict()})
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
