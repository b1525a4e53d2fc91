#!/usr/bin/env python
"""The cpu recipe's frozen-feature pass: memory layout and precision, on LIVE Challenge.

The pass is the product's own (:func:`iqa_ray.training.features.compute_features`) with the cpu
recipe's config on ``livec:../shared/data/livec-jpg`` (627 photos at their own size, Lite0 with the
offline ImageNet weights, every-block mean and std of the photo and of its blurred
pseudo-reference: two backbone passes per photo), run three ways in one process, one after the
other, on the same decoded photos:

* ``before: NCHW float32``: ``channels_last = false`` and the BatchNorms run as they are (the
  pass before issue 35);
* ``channels_last float32``: NHWC layout only;
* ``channels_last float32, BatchNorm folded``: the default now (the BatchNorms folded into the
  convolutions, :func:`iqa_ray.models.backbones.fold_batchnorm`);
* ``channels_last bf16, BatchNorm folded``: ``feature_dtype = "bf16"`` (bfloat16 autocast for the
  backbone, pooling in float32).

Printed as a markdown table: seconds, photos/s, speed against NCHW, and the largest difference of
each variant's features from the before pass's (relative to the features' scale). The CPU's bf16 units
(:func:`iqa_ray.training.device.cpu_bf16_native`) are printed with them: bf16 is fast only where
the CPU computes it natively.

``--cv`` then measures what bf16 features do to the recipe's MLP head, on the seed-0 split's
training and validation photos only (5 folds x 5 fold seeds, the protocol of
``benchmarks/pseudo_reference.py``; test photos not used): each fold's SRCC with float32 and with
bf16 features, and the paired difference.

    python benchmarks/feature_pass.py [--photos N] [--cv] [--threads 2]
    python benchmarks/feature_pass.py --scoring   # only: a head trained on bf16 features, scored both ways

Written to ``benchmarks/results/feature_pass.json`` (``--photos``: under /tmp).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frozen_features import CV_SEEDS, head_cv, recipe_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# name -> (run config options, BatchNorm folded)
VARIANTS = {"before: NCHW float32": ({"channels_last": False, "feature_dtype": "float32"}, False),
            "channels_last float32": ({"channels_last": True, "feature_dtype": "float32"}, False),
            "channels_last float32, BatchNorm folded": ({"channels_last": True, "feature_dtype": "float32"}, True),
            "channels_last bf16, BatchNorm folded": ({"channels_last": True, "feature_dtype": "bf16"}, True)}
FP32, BF16 = "channels_last float32, BatchNorm folded", "channels_last bf16, BatchNorm folded"


def scoring_check(decoded: object, config: object, bf16: np.ndarray) -> dict[str, float]:
    """The recipe's head (first grid point, seed 0) trained on bf16 features; its test photos scored
    as the search's splits score them (from the bf16 cache) and as the model handed back scores
    them (raw images, the backbone in float32): the SRCC of each and the largest score difference."""
    import torch

    from iqa_ray.core.metrics import srcc
    from iqa_ray.training.features import FeatureCache, cache_key
    from iqa_ray.training.inference import predict
    from iqa_ray.training.loaders import eval_dataset, eval_loader

    config = config.replace(feature_dtype="bf16")
    from iqa_ray.training.engine import fit

    cache = FeatureCache(plain=bf16, flipped=None, key=cache_key(config))

    run = fit(config, decoded, features=cache)
    cached_pred, mos = run.test_predictions
    raw_pred, raw_mos = predict(run.model, eval_loader(config, eval_dataset(config, decoded, "test")),
                                torch.device("cpu"))
    assert np.array_equal(mos, raw_mos)
    out = {"test_srcc_from_cache": float(srcc(cached_pred, mos)), "test_srcc_raw_images": float(srcc(raw_pred, mos)),
           "largest_score_difference": float(np.abs(cached_pred - raw_pred).max()),
           "score_std": float(np.std(raw_pred))}
    print(f"\nA head trained on bf16 features, {len(mos)} test photos: SRCC {out['test_srcc_from_cache']:.4f} from the "
          f"cache, {out['test_srcc_raw_images']:.4f} from raw images in float32; largest score difference "
          f"{out['largest_score_difference']:.4f} (scores' std {out['score_std']:.3f})", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=None, help="only the first N photos (a quick look; JSON under /tmp)")
    p.add_argument("--cv", action="store_true", help="also: the MLP head on float32 vs bf16 features, by cross-validation")
    p.add_argument("--scoring", action="store_true",
                   help="also: a head trained on bf16 features, its test photos scored from the cache and from raw images")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.photos is not None and args.photos < 16:
        p.error(f"--photos must be at least 16 (one batch), got {args.photos}")

    import torch

    from iqa_ray.core.io import atomic_write_json
    from iqa_ray.training.device import cpu_bf16_native
    from iqa_ray.training.features import compute_features
    from iqa_ray.training.loaders import load_decoded

    torch.set_num_threads(args.threads)
    config = recipe_config()
    decoded = load_decoded(config)
    if args.photos is not None:
        # the pass reads only the images (and --cv the label table): the first N of both
        decoded = SimpleNamespace(images=decoded.images[:args.photos], table=decoded.table.iloc[:args.photos])
    n = len(decoded.images)
    native = cpu_bf16_native()
    print(f"{n} photos of {config.data.dataset}, {config.model.backbone} ({config.model.pooling} pooling, "
          f"reference_blur {config.model.options.reference_blur:g}), {args.threads} threads; "
          f"CPU computes bf16 natively: {native}", flush=True)
    features, seconds = {}, {}
    import iqa_ray.training.inference as pass_module

    fold = pass_module.fold_for_inference
    # --scoring alone: only the bf16 features it needs (no timing table)
    variants = {BF16: VARIANTS[BF16]} if args.scoring and not args.cv else VARIANTS
    for name, (options, folded) in variants.items():
        pass_module.fold_for_inference = fold if folded else (lambda model: None)  # the pass as it was, unfolded
        started = time.perf_counter()
        features[name] = compute_features(decoded, config.replace(**options), "cpu").plain
        seconds[name] = time.perf_counter() - started
        print(f"[{name}] {seconds[name]:.1f} s", flush=True)
    pass_module.fold_for_inference = fold
    if variants is not VARIANTS:
        result = {"dataset": config.data.dataset, "photos": n, "scoring": scoring_check(decoded, config, features[BF16])}
        out = args.json or Path(tempfile.gettempdir()) / "feature_pass_scoring.json"
        atomic_write_json(out, result)
        print(f"written: {out}")
        return
    base = features["before: NCHW float32"]
    scale = float(np.abs(base).max())
    rows = {}
    print("\n| feature pass | seconds | photos/s | vs before | largest difference (of the features' scale) |")
    print("|---|---|---|---|---|")
    for name in VARIANTS:
        diff = float(np.abs(features[name] - base).max()) / scale
        rows[name] = {"seconds": round(seconds[name], 1), "photos_per_s": round(n / seconds[name], 2),
                      "speedup": round(seconds["before: NCHW float32"] / seconds[name], 2), "max_rel_diff": diff}
        print(f"| {name} | {seconds[name]:.1f} | {n / seconds[name]:.2f} | {rows[name]['speedup']:.2f}x | {diff:.1e} |")
    result = {"dataset": config.data.dataset, "photos": n, "backbone": config.model.backbone, "threads": args.threads,
              "cpu_bf16_native": native, "variants": rows, "machine": platform.platform(),
              "processor": platform.processor()}
    if args.cv:
        table = decoded.table
        mos = table["mos"].to_numpy(np.float64)
        train_val = np.flatnonzero(np.isin(table["split"].to_numpy(), ("train", "val")))
        scores, cv = head_cv({"float32": {"x": features[FP32]}, "bf16": {"x": features[BF16]}}, mos, train_val, CV_SEEDS, base="float32")
        d = cv["bf16"]["vs_float32"]
        print(f"\nThe recipe's MLP head by cross-validation over {len(train_val)} train+val photos: float32 "
              f"{cv['float32']['mean']:.4f}, bf16 {cv['bf16']['mean']:.4f}, bf16 - float32 per fold "
              f"{d['diff_mean']:+.4f} +- {d['diff_se']:.4f}, bf16 better in {d['wins']} of {d['folds']}")
        result["cv"] = {"rows": int(len(train_val)), "fold_seeds": list(CV_SEEDS), "variants": cv, "per_fold": scores}
    if args.scoring:
        result["scoring"] = scoring_check(decoded, config, features[BF16])
    out = args.json or (RESULTS / "feature_pass.json" if args.photos is None
                        else Path(tempfile.gettempdir()) / "feature_pass_quick.json")
    atomic_write_json(out, result)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
