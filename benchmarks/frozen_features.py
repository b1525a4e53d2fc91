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
stages plus ``blocks.3`` and ``blocks.5``; ``pooling = "blocks"``), and ``every-block mean+std``:
over every block of Lite0 (16 blocks; ``pooling = "every_block"``, the recipe's choice).

Each of the 11 feature sets gets a ridge probe (:func:`iqa_ray.evaluation.baselines.ridge_probe`: features
standardised on train, ridge strength chosen on validation SRCC, test scored once). Printed as a
markdown table (validation and test SRCC, test PLCC), written to
``benchmarks/results/frozen_features.json``. Features are cached under /tmp per input size, so a
rerun only fits the probes.

    python benchmarks/frozen_features.py [--json OUT]
    python benchmarks/frozen_features.py --quick   # 150 photos, JSON under /tmp
    python benchmarks/frozen_features.py --cv      # also: stage vs block vs every-block mean+std by cross-validation

``--cv`` compares the native-size poolings the way the recipe was chosen, on training and
validation photos only: 5-fold cross-validation over the split's train+val photos, for 5 fold
seeds (25 folds), of

* ridge probes on stage, block and every-block mean+std (in each fold a quarter of the other folds
  picks the ridge strength), and
* the recipe's MLP head (:func:`head_srcc`: standardised features, one hidden layer of 256 with
  dropout 0.5, AdamW at 3e-4 with a cosine schedule, 20 epochs of 10 draws per photo, L1 mixed with
  the ranking loss at alpha 0.1, margin 0.5) on block and every-block mean+std.

It prints each one's mean SRCC and the paired difference per fold against the previous pooling
(mean +- standard error, folds where the richer pooling wins). Test photos are not used.

Whether a refit on training and validation photos helps (``--splits`` and the model a search hands
back) is measured by ``benchmarks/refit_cv.py``, with folds cut by source photo; it replaced this
script's ``--refit``, whose figure (+0.012 SRCC per fold, 19 of 25, rows drawn at random and the
3/4 part a prefix of them) is recorded in docs/BENCHMARKS.md.
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
from typing import Any, Iterator, Sequence

import numpy as np

DATASET = "livec:../shared/data/livec-jpg"
SCALES = {"native": 1.0, "0.5x": 0.5, "1.5x": 1.5}
POOLINGS = ("last mean", "stage means", "stage mean+std")
CV_FOLDS, CV_SEEDS = 5, (0, 1, 2, 3, 4)
NATIVE_POOLINGS = ("stages", "blocks", "every_block")
DEFAULT_JSON = Path("benchmarks/results/frozen_features.json")
QUICK_JSON = Path(tempfile.gettempdir()) / "frozen_features_quick.json"
FEATURE_DIR = Path(tempfile.gettempdir()) / "iqa_ray_feature_cache"
QUICK_PHOTOS = 150
_BATCH = 16


def recipe_config() -> Any:
    """The run config of the ranking study under the cpu recipe on LIVE Challenge (split seed 0)."""
    from iqa_ray.search.recipe import apply_recipe, load_recipe
    from iqa_ray.search.study_file import load_study
    from iqa_ray.training.config import TrainConfig

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
    through ``blocks``, the same backbone tapping every block, pooled as ``every_block`` and, from
    the maps that end a block group, as ``blocks``)."""
    import torch
    import torch.nn.functional as F

    from iqa_ray.models.mlp import pool_stages

    out: dict[str, list[np.ndarray]] = {"last": [], "stages": [],
                                        **({"blocks": [], "every_block": []} if blocks is not None else {})}
    if blocks is not None:
        sizes = [len(group) for group in blocks.body.blocks]
        group_ends = [sum(sizes[:g + 1]) - 1 for g in range(len(sizes))]
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
                maps = blocks(batch)
                out["every_block"].append(pool_stages(maps, "every_block").numpy())
                out["blocks"].append(pool_stages([maps[i] for i in group_ends], "blocks").numpy())
            start = stop
    return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def stage_means(mean_std: np.ndarray, channels: tuple[int, ...]) -> np.ndarray:
    """The mean columns of ``stages`` pooling (per stage: its means, then its standard deviations)."""
    columns, start = [], 0
    for c in channels:
        columns.append(np.arange(start, start + c))
        start += 2 * c
    return mean_std[:, np.concatenate(columns)]


def head_srcc(x: np.ndarray, mos: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int, *,
              weights: np.ndarray | None = None, flipped: np.ndarray | None = None) -> float:
    """Test SRCC of :func:`head_predict` (the recipe's MLP head) on rows ``test``."""
    from iqa_ray.core.metrics import srcc

    return float(srcc(head_predict(x, mos, train, test, seed, weights=weights, flipped=flipped), mos[test]))


def head_predict(x: np.ndarray, mos: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int, *,
                 weights: np.ndarray | None = None, flipped: np.ndarray | None = None) -> np.ndarray:
    """Scores of rows ``test`` by the recipe's MLP head trained on rows ``train`` of features ``x`` (a plain torch loop
    with the recipe's settings and the ranking study's middle values; see the module docstring).

    ``weights`` (one per row) weight each row's L1 term and each pair's ranking term by the product
    of the two rows' weights; ``flipped`` (the features of each photo's mirror image, as ``x``) makes
    every training draw the photo or its mirror at random and the score the mean of the two. Without
    either, the loop is the recipe's and draws the same random numbers as before they existed.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    feats, target = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(mos.astype(np.float32))
    mirror = None if flipped is None else torch.from_numpy(flipped.astype(np.float32))
    weight = None if weights is None else torch.from_numpy(weights.astype(np.float32))
    mean, std = feats[train].mean(0), feats[train].std(0, correction=0).clamp_min(1e-6)
    t_mean, t_std = target[train].mean(), target[train].std()
    head = nn.Sequential(nn.Linear(feats.shape[1], 256), nn.GELU(), nn.Dropout(0.5), nn.Linear(256, 1))
    nn.init.normal_(head[-1].weight, std=1e-3)
    nn.init.zeros_(head[-1].bias)
    epochs, draws, batch, lr, alpha, margin = 20, 10, 32, 3e-4, 0.1, 0.5
    steps = len(train) * draws // batch
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps, eta_min=lr * 0.01)
    rows = torch.from_numpy(train).repeat(draws)
    for _ in range(epochs):
        order = rows[torch.randperm(len(rows), generator=gen)]
        flips = None if mirror is None else torch.rand(len(order), generator=gen) < 0.5
        for step in range(steps):
            idx = order[step * batch:(step + 1) * batch]
            xb = feats[idx] if flips is None else torch.where(flips[step * batch:(step + 1) * batch, None], mirror[idx], feats[idx])
            y = (target[idx] - t_mean) / t_std
            pred = head((xb - mean) / std).squeeze(1)
            ordered = y[:, None] > y[None, :]
            hinge = (margin / t_std - (pred[:, None] - pred[None, :])).clamp_min(0)[ordered]
            if weight is None:
                loss = (1 - alpha) * (pred - y).abs().mean() + alpha * hinge.mean()
            else:
                w = weight[idx]
                pair_w = (w[:, None] * w[None, :])[ordered]
                loss = ((1 - alpha) * ((pred - y).abs() * w).sum() / w.sum()
                        + alpha * (hinge * pair_w).sum() / pair_w.sum().clamp_min(1e-12))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    with torch.no_grad():
        score = head((feats[test] - mean) / std).squeeze(1)
        if mirror is not None:
            score = (score + head((mirror[test] - mean) / std).squeeze(1)) / 2
        return score.numpy().astype(np.float64)


def paired(scores: dict[str, list[float]], richer: str, base: str) -> dict[str, Any]:
    diff = np.array(scores[richer]) - np.array(scores[base])
    return {"richer": richer, "base": base, "diff_mean": float(diff.mean()),
            "diff_se": float(diff.std(ddof=1) / np.sqrt(len(diff))), "wins": int((diff > 0).sum()), "folds": int(len(diff))}


def fold_summary(scores: dict[str, list[float]], base: str, key: str | None = None) -> dict[str, dict[str, Any]]:
    """Each variant's mean over the folds and (except ``base``) its :func:`paired` difference from
    ``base`` under ``key`` (``vs_<base>`` by default)."""
    key = key or f"vs_{base}"
    return {name: {"mean": float(np.mean(s)), **({} if name == base else {key: paired(scores, name, base)})}
            for name, s in scores.items()}


def cv_folds(rows: np.ndarray, seed: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(k, rest, held_out)`` for each of the ``CV_FOLDS`` folds of ``rows`` permuted by fold seed ``seed``."""
    folds = np.array_split(np.random.default_rng(seed).permutation(rows), CV_FOLDS)
    for k in range(CV_FOLDS):
        yield k, np.concatenate([folds[j] for j in range(CV_FOLDS) if j != k]), folds[k]


def head_cv(variants: dict[str, dict[str, Any]], mos: np.ndarray, rows: np.ndarray, seeds: Sequence[int],
            base: str) -> tuple[dict[str, list[float]], dict[str, dict[str, Any]]]:
    """The recipe's MLP head on each variant, by cross-validation over ``rows`` (train+val).

    Each variant is a dict of :func:`head_srcc` keyword arguments (``x``, and optionally ``weights``
    and ``flipped``); every variant trains on the same folds with the same seed (``100 * fold seed
    + fold``). Prints each fold's scores; returns the scores per fold and, per variant, the mean and
    (except ``base``) the paired difference from ``base`` as ``vs_<base>`` (:func:`paired`).
    """
    scores: dict[str, list[float]] = {name: [] for name in variants}
    for seed in seeds:
        for k, rest, held in cv_folds(rows, seed):
            for name, v in variants.items():
                scores[name].append(head_srcc(v["x"], mos, rest, held, seed=100 * seed + k,
                                              weights=v.get("weights"), flipped=v.get("flipped")))
            print(f"[cv] fold seed {seed} fold {k}: " + "  ".join(f"{n} {s[-1]:.4f}" for n, s in scores.items()), flush=True)
    result = fold_summary(scores, base)
    return scores, result


def cross_validate(feats: dict[str, np.ndarray], mos: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
    """Ridge probes on every native pooling and the MLP head on the two block poolings, by k-fold
    cross-validation over ``rows`` (train+val)."""
    from iqa_ray.evaluation.baselines import ridge_probe

    ridge: dict[str, list[float]] = {name: [] for name in NATIVE_POOLINGS}
    head: dict[str, list[float]] = {name: [] for name in NATIVE_POOLINGS[1:]}
    for seed in CV_SEEDS:
        for k, rest, held in cv_folds(rows, seed):
            pick, fit_rows = rest[: len(rest) // 4], rest[len(rest) // 4:]
            for name in ridge:
                ridge[name].append(ridge_probe(feats[name].astype(np.float64), mos, fit_rows, pick, held)["srcc"])
            for name in head:
                head[name].append(head_srcc(feats[name], mos, rest, held, seed=100 * seed + k))
            print(f"[cv] fold seed {seed} fold {k}: ridge " + " ".join(f"{n} {v[-1]:.3f}" for n, v in ridge.items())
                  + "; head " + " ".join(f"{n} {v[-1]:.3f}" for n, v in head.items()), flush=True)
    return {"ridge": {n: float(np.mean(v)) for n, v in ridge.items()}, "head": {n: float(np.mean(v)) for n, v in head.items()},
            "paired": {"ridge blocks vs stages": paired(ridge, "blocks", "stages"),
                       "ridge every_block vs blocks": paired(ridge, "every_block", "blocks"),
                       "head every_block vs blocks": paired(head, "every_block", "blocks")},
            "per_fold": {"ridge": ridge, "head": head}}


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

    from iqa_ray.core.io import atomic_write_json
    from iqa_ray.evaluation.baselines import ridge_probe
    from iqa_ray.training.build import build
    from iqa_ray.training.config import TrainConfig
    from iqa_ray.training.loaders import load_decoded

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
    block_config = TrainConfig.from_dict({**config.to_dict(), "pooling": "every_block"})
    block_backbone = build(block_config, torch.device("cpu")).backbone.eval()  # tapping every block
    results, timings = [], {}
    for name, scale in SCALES.items():
        key = {"backbone": config.model.backbone, "pretrained": str(config.model.pretrained), "scale": scale,
               "channels": channels, "resize": "bilinear, antialias" if scale != 1.0 else None,
               "blocks": block_backbone.tap_channels if scale == 1.0 else None}
        names = ("last", "stages", "blocks", "every_block") if scale == 1.0 else ("last", "stages")
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
            sets["every-block mean+std"] = feats["every_block"]
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
              f"{len(CV_SEEDS)} fold seeds, native size; test photos not used), mean SRCC:")
        print("  ridge: " + "   ".join(f"{n} mean+std {v:.4f}" for n, v in cv["ridge"].items()))
        print("  MLP head: " + "   ".join(f"{n} mean+std {v:.4f}" for n, v in cv["head"].items()))
        for name, d in cv["paired"].items():
            print(f"  {name}, per fold: {d['diff_mean']:+.4f} +- {d['diff_se']:.4f} (standard error), "
                  f"{d['richer']} better in {d['wins']} of {d['folds']} folds")
    best = max(results, key=lambda r: r["val_srcc"])
    print(f"\nbest on validation: {best['input']}, {best['pooling']} (test SRCC {best['test_srcc']:.3f})")
    summary = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
               "date": time.strftime("%Y-%m-%d"), "dataset": DATASET, "quick": args.quick, "photos": len(images),
               "split": {"seed": 0, "fractions": list(config.data.split_fractions),
                         "counts": {"train": len(train), "val": len(val), "test": len(test)}},
               "backbone": config.model.backbone, "pretrained": str(config.model.pretrained), "channels": channels,
               "probe": "iqa_ray.evaluation.baselines.ridge_probe: standardised on train, ridge alpha by validation SRCC, "
                        "test scored once",
               "features": timings, "results": results,
               "best_on_validation": {k: best[k] for k in ("input", "pooling", "val_srcc", "test_srcc")},
               "cross_validation": cv}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, summary)
    print(f"written {out}")


if __name__ == "__main__":
    main()
