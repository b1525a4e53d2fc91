#!/usr/bin/env python
"""Does handing back an ensemble of a search's trials (``tune --ensemble K``) beat its single best trial?

Measured without test photos, the way the recipe's levers were (``refit_cv.py``, ``scales.py``): the
seed-0 split's train+val photos of the bundled LIVE Challenge set, cut into ``--folds`` folds for
each fold seed. In each fold, the other folds are a search's photos, split 3:1 into its training
and validation photos (the cpu recipe's 0.6/0.2), and the held-out fold plays the test split:

1. a search: ``--samples`` configurations of the ranking study under the cpu recipe (``alpha``,
   ``margin``, ``lr`` drawn at random from the study's ranges; no ASHA, every trial runs its
   epochs), each trained by the product's engine (:func:`iqa_ray.training.engine.fit` on the
   product's frozen-feature cache) on the training photos; its validation predictions are its
   final epoch's (``select_epoch = "last"``);
2. the single best trial by validation SRCC, and the ensemble from the same trials
   (:func:`iqa_ray.core.ensembles.caruana_select`, ``--rounds`` greedy rounds, as ``tune --ensemble``);
3. both handed back as the search would: each chosen configuration re-trained on training and
   validation photos (the refit), then scored on the held-out fold (the ensemble: its members'
   scores averaged with their weights).

Printed: each fold's pair, then the mean of each and the paired difference (ensemble - single,
mean +- standard error, folds won). Written to ``benchmarks/results/ensemble.json``.

    python benchmarks/ensemble.py --folds 2 --fold-seeds 0 --samples 4 --rounds 4 --photos 120 --epochs 5  # small: ~2 min
    python benchmarks/ensemble.py                  # full: 5 folds x 5 fold seeds, 16 trials, 8 rounds
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frozen_features import paired  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def livec_spec() -> str:
    from iqa_ray.core.paths import bundled_datasets_dir

    return f"livec:{bundled_datasets_dir() / 'livec'}"


def study_and_base(spec: str, epochs: int | None) -> tuple[Any, dict[str, Any]]:
    """The ranking study under the cpu recipe on ``spec``, and its constants (split seed 0)."""
    from iqa_ray.search.recipe import apply_recipe, load_recipe
    from iqa_ray.search.study_file import load_study

    study = apply_recipe(load_recipe("cpu"), load_study("ranking"), spec).study
    base = {**study.constants(), "dataset": spec, "split_seed": 0}
    if epochs:
        base["epochs"] = epochs
    return study, base


def sample_configs(study: Any, n: int, seed: int) -> list[dict[str, float]]:
    """``n`` random draws of the study's searched values (log-uniform where the study says so)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        draw = {}
        for p in study.params:
            if p.type == "loguniform":
                draw[p.name] = float(math.exp(rng.uniform(math.log(p.low), math.log(p.high))))
            elif p.type == "uniform":
                draw[p.name] = float(rng.uniform(p.low, p.high))
            else:
                draw[p.name] = p.values[int(rng.integers(len(p.values)))]
        out.append(draw)
    return out


def train_and_predict(base: dict[str, Any], params: dict[str, float], decoded: Any, cache: Any, split: np.ndarray,
                      *, train_on_val: bool) -> tuple[np.ndarray, np.ndarray]:
    """The product's engine trains ``params`` on the ``train`` rows (and ``val`` rows with
    ``train_on_val``); the final weights' scores of the ``val`` and ``test`` rows (as the engine's
    feature feed scores them)."""
    import torch

    from iqa_ray.data.decoded import DecodedImages
    from iqa_ray.training.config import TrainConfig
    from iqa_ray.training.engine import fit

    table = decoded.table.copy()
    table["split"] = split
    data = DecodedImages(images=decoded.images, table=table, skipped=decoded.skipped)
    config = TrainConfig.from_dict({**base, **params, "train_on_val": train_on_val})
    model = fit(config, data, device="cpu", features=cache, score_test=False).model.eval()
    plain = torch.from_numpy(np.asarray(cache.plain, dtype=np.float32))
    with torch.no_grad():
        scores = model.forward_pooled(plain)["score"].float().numpy().astype(np.float64)
    return scores[split == "val"], scores[split == "test"]


def one_fold(study: Any, base: dict[str, Any], decoded: Any, cache: Any, rest: np.ndarray, held: np.ndarray,
             args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """One fold: a search on ``rest`` (3:1 train/val), its best trial and its ensemble refitted on
    ``rest`` and scored on ``held``."""
    from iqa_ray.core.ensembles import caruana_select, ensemble_predictions
    from iqa_ray.core.metrics import srcc

    mos = decoded.table["mos"].to_numpy(np.float64)
    order = np.random.default_rng(1000 + seed).permutation(rest)
    val_rows = np.sort(order[: len(order) // 4])
    search_split = np.full(len(mos), "none", dtype=object)
    search_split[rest], search_split[val_rows], search_split[held] = "train", "val", "test"
    configs = sample_configs(study, args.samples, seed)
    val_preds = {f"t{i:02d}": train_and_predict(base, c, decoded, cache, search_split, train_on_val=False)[0]
                 for i, c in enumerate(configs)}
    val_mos = mos[search_split == "val"]
    weights = caruana_select(val_preds, val_mos, args.rounds)
    best = max(sorted(val_preds), key=lambda t: srcc(val_preds[t], val_mos))
    refit_split = search_split.copy()  # the refit: training and validation photos, the held-out fold as test
    held_preds = {t: train_and_predict(base, configs[int(t[1:])], decoded, cache, refit_split, train_on_val=True)[1]
                  for t in sorted(set(weights) | {best})}
    held_mos = mos[refit_split == "test"]
    return {"single": srcc(held_preds[best], held_mos),
            "ensemble": srcc(ensemble_predictions(held_preds, weights), held_mos),
            "val_single": srcc(val_preds[best], val_mos),
            "val_ensemble": srcc(ensemble_predictions(val_preds, weights), val_mos),
            "members": len(weights), "weights": weights}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folds", type=int, default=5, help="folds per fold seed (default 5)")
    p.add_argument("--fold-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="fold seeds (default 0-4)")
    p.add_argument("--samples", type=int, default=16, help="trials per search (default 16, the cpu recipe's)")
    p.add_argument("--rounds", type=int, default=8, help="greedy rounds of ensemble selection (default 8)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: the cpu recipe's 20)")
    p.add_argument("--photos", type=int, default=None, help="use only this many train+val photos (a quick check)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", type=Path, default=RESULTS / "ensemble.json")
    args = p.parse_args()
    if args.folds < 2 or args.samples < 1 or args.rounds < 1:
        p.error(f"--folds must be >= 2, --samples and --rounds >= 1; got {args.folds}, {args.samples}, {args.rounds}")

    import torch

    from iqa_ray.core.io import atomic_write_json
    from iqa_ray.training.config import TrainConfig
    from iqa_ray.training.features import compute_features
    from iqa_ray.training.loaders import decode_for, load_run_table

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    spec = livec_spec()
    study, base = study_and_base(spec, args.epochs)
    config = TrainConfig.from_dict(base)
    table = load_run_table(config)
    table = table[table["split"].isin(["train", "val"])].reset_index(drop=True)  # test photos are never read
    if args.photos:
        table = table.iloc[np.sort(np.random.default_rng(0).permutation(len(table))[: args.photos])].reset_index(drop=True)
    decoded = decode_for(config, table)
    t0 = time.perf_counter()
    cache = compute_features(decoded, config, "cpu")
    print(f"[features] {len(decoded.table)} train+val photos (test photos not read) in {time.perf_counter() - t0:.0f} s",
          flush=True)
    rows = np.arange(len(decoded.table))
    scores: dict[str, list[float]] = {"single": [], "ensemble": []}
    folds = []
    for seed in args.fold_seeds:
        parts = np.array_split(np.random.default_rng(seed).permutation(rows), args.folds)
        for k in range(args.folds):
            rest = np.sort(np.concatenate([parts[j] for j in range(args.folds) if j != k]))
            fold = one_fold(study, base, decoded, cache, rest, np.sort(parts[k]), args, seed=100 * seed + k)
            folds.append({"fold_seed": seed, "fold": k, **fold})
            scores["single"].append(fold["single"])
            scores["ensemble"].append(fold["ensemble"])
            print(f"[ensemble] fold seed {seed} fold {k} ({len(parts[k])} photos): single {fold['single']:.4f} "
                  f"ensemble {fold['ensemble']:.4f} ({fold['members']} members; validation {fold['val_single']:.4f} "
                  f"-> {fold['val_ensemble']:.4f})", flush=True)
    d = paired(scores, "ensemble", "single")
    se = f"{d['diff_se']:.4f}" if np.isfinite(d["diff_se"]) else "n/a"
    print(f"\nThe best of {args.samples} trials vs the ensemble of the same trials ({args.rounds} rounds), both refitted, "
          f"{args.folds}-fold cross-validation over train+val ({len(args.fold_seeds)} fold seeds), mean held-out SRCC: "
          f"single {np.mean(scores['single']):.4f}, ensemble {np.mean(scores['ensemble']):.4f}; per fold "
          f"{d['diff_mean']:+.4f} +- {se} (standard error), the ensemble better in {d['wins']} of {d['folds']} folds")
    atomic_write_json(args.json, {"dataset": spec, "photos": len(decoded.table), "folds": args.folds,
                                  "fold_seeds": args.fold_seeds, "samples": args.samples, "rounds": args.rounds,
                                  "epochs": base["epochs"], "mean": {n: float(np.mean(v)) for n, v in scores.items()},
                                  "paired": d, "per_fold": folds, "seconds": round(time.perf_counter() - started, 1),
                                  "machine": platform.platform(), "threads": args.threads})
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
