#!/usr/bin/env python
"""The pseudo-reference lever (``reference_blur``), measured on LIVE Challenge's training and validation photos only.

``reference_blur = sigma`` appends to each photo's frozen features (Lite0's every-block mean and std
of the whole photo at its own size, the cpu recipe's feature cache) their change when the photo is
blurred by a Gaussian of that standard deviation in pixels (:class:`iqa_ray.models.mlp.MLPOptions`):
a sharp photo changes much, one that is blurry already little (BPRI's pseudo-reference image, Min et
al., IEEE TMM 2018). The features go through the product's own path
(:func:`iqa_ray.training.features.compute_features` with the recipe's config and ``reference_blur`` set);
the first half of such a cache is the features without the lever, so ``off`` is read from it.

Protocol (the one the recipe's pooling, refit and the head levers were chosen by): the seed-0
split's train+val photos cut into 5 folds per fold seed; in each fold the recipe's MLP head
(:func:`frozen_features.head_srcc`) trains on the other four folds with the same seed for every
variant and is scored on the held-out fold (SRCC). Printed: each fold, then each variant's mean and
its paired difference from ``off`` (mean +- standard error, folds won). Test photos are not used.
Written to ``benchmarks/results/pseudo_reference.json``.

``--mirror`` adds, for each sigma, the head trained on mirror views too (a draw is the photo or its
mirror, the score the mean of both; what ``hflip`` gives the product's runs): the recipe sets
``hflip = false``, which halves the feature pass, on this comparison.

    python benchmarks/pseudo_reference.py [--sigmas 2] [--seeds 0 1 2 3 4] [--mirror]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frozen_features import CV_FOLDS, CV_SEEDS, head_cv, recipe_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sigmas", type=float, nargs="+", default=[2.0], help="blur standard deviations in pixels (default 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(CV_SEEDS), help="fold seeds (default 0-4: 25 folds)")
    p.add_argument("--mirror", action="store_true",
                   help="also train each sigma's head on mirror views (hflip: a draw is the photo or its mirror)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", type=Path, default=RESULTS / "pseudo_reference.json")
    args = p.parse_args()
    if any(not s > 0 for s in args.sigmas):
        p.error(f"--sigmas must be blur standard deviations > 0, got {args.sigmas}")

    import torch

    from iqa_ray.core.io import atomic_write_json
    from iqa_ray.training.features import compute_features
    from iqa_ray.training.loaders import load_decoded

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    # the recipe's features without the lever, with the mirror images (hflip) that --mirror trains on
    config = recipe_config().replace(reference_blur=0.0, hflip=True)
    decoded = load_decoded(config)
    table = decoded.table
    mos = table["mos"].to_numpy(np.float64)
    rows = np.flatnonzero(np.isin(table["split"].to_numpy(), ("train", "val")))
    variants: dict[str, dict[str, np.ndarray]] = {}
    seconds: dict[str, float] = {}
    for sigma in args.sigmas:
        t0 = time.perf_counter()
        cache = compute_features(decoded, config.replace(reference_blur=sigma), "cpu")
        seconds[f"features sigma {sigma:g}"] = time.perf_counter() - t0
        half = cache.plain.shape[1] // 2
        variants.setdefault("off", {"x": cache.plain[:, :half]})
        variants[f"sigma {sigma:g}"] = {"x": cache.plain}
        if args.mirror:
            variants[f"sigma {sigma:g}, mirror views"] = {"x": cache.plain, "flipped": cache.flipped}
    print("[features] " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
          + f" (the photo, its mirror and both blurred); {len(rows)} train+val photos (test photos not used)", flush=True)
    scores, result = head_cv(variants, mos, rows, args.seeds, base="off")
    print(f"\nThe recipe's MLP head, {CV_FOLDS}-fold cross-validation over the seed-0 split's {len(rows)} train+val "
          f"photos, fold seeds {args.seeds}:\n")
    print("| reference_blur | features | mean SRCC | vs off, per fold | wins |")
    print("|---|---|---|---|---|")
    for name, r in result.items():
        d = r.get("vs_off")
        print(f"| {name} | {variants[name]['x'].shape[1]} | {r['mean']:.4f} | "
              + ("|" if d is None else f"{d['diff_mean']:+.4f} +- {d['diff_se']:.4f} | {d['wins']} of {d['folds']} |"))
    atomic_write_json(args.json, {"dataset": config.data.dataset, "backbone": config.model.backbone,
                                  "pooling": config.model.pooling, "sigmas": args.sigmas, "mirror": args.mirror,
                                  "fold_seeds": args.seeds,
                                  "rows": int(len(rows)), "variants": result, "per_fold": scores,
                                  "seconds": {**{k: round(v, 1) for k, v in seconds.items()},
                                              "total": round(time.perf_counter() - started, 1)},
                                  "machine": platform.platform(), "threads": args.threads,
                                  "config": config.to_dict()})
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
