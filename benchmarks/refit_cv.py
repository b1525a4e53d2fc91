"""Does a refit on training and validation photos help on this dataset? Measured without test photos.

The model a search hands back is, by default, the selected configuration re-trained on the search
split's training and validation photos (``iqa_ray/search/retrain.py``). Whether that helps depends on
the dataset: more source photos to learn from, against nothing. This benchmark measures it the way
the default was chosen on LIVE Challenge (it replaced ``frozen_features.py --refit``, whose folds
were drawn by row), for any dataset the cpu recipe reads, on the split's training and validation
rows only:

* the rows are grouped by source photo (the table's ``group`` column where it has one, e.g. the
  embedded data's 4-8 distorted crops of one photo; else each row is its own photo), and the
  groups of the train+val rows are cut into 5 folds, for 5 fold seeds (25 folds);
* in each fold, the recipe's MLP head (:func:`frozen_features.head_srcc`: the cpu recipe's
  settings, the ranking study's middle values) is trained on the frozen backbone's pooled
  features of three quarters of the other folds' groups (a split's training part, 0.6 of 0.8) and
  on all of them (training and validation, the refit), and scored on the held-out fold's SRCC.

Printed: each fold's pair, then the mean of each and the paired difference (standard error, folds
won). Written to ``benchmarks/results/refit_cv_<dataset>.json``.

    python benchmarks/refit_cv.py                                     # the embedded dataset
    python benchmarks/refit_cv.py --dataset livec:../shared/data/livec-jpg
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
from frozen_features import CV_FOLDS, CV_SEEDS, head_srcc, paired  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def recipe_config(spec: str) -> Any:
    """The run config of the ranking study under the cpu recipe on ``spec`` (the embedded data's
    generated folder for ``embedded``), split seed 0."""
    from iqa_ray.data.catalog import EMBEDDED, ensure_embedded
    from iqa_ray.search.recipe import apply_recipe, load_recipe
    from iqa_ray.search.study_file import load_study
    from iqa_ray.training.config import TrainConfig

    study = apply_recipe(load_recipe("cpu"), load_study("ranking"), spec).study
    grid = {p.name: p.grid[0] for p in study.params}
    dataset = str(ensure_embedded()) if spec == EMBEDDED else spec
    return TrainConfig.from_dict({**study.constants(), **grid, "dataset": dataset, "split_seed": 0})


def grouped_folds(groups: np.ndarray, rows: np.ndarray, seed: int) -> list[np.ndarray]:
    """``rows`` cut into ``CV_FOLDS`` folds that never share a group (whole groups per fold)."""
    names = np.unique(groups[rows])
    order = np.random.default_rng(seed).permutation(names)
    return [rows[np.isin(groups[rows], part)] for part in np.array_split(order, CV_FOLDS)]


def refit_cv(x: np.ndarray, mos: np.ndarray, groups: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
    """The head on 3/4 of each fold's other groups vs all of them, by grouped k-fold over ``rows``."""
    scores: dict[str, list[float]] = {"three_quarters": [], "all": []}
    for seed in CV_SEEDS:
        folds = grouped_folds(groups, rows, seed)
        for k in range(CV_FOLDS):
            others = [folds[j] for j in range(CV_FOLDS) if j != k]
            rest = np.concatenate(others)
            names = np.random.default_rng(1000 + seed).permutation(np.unique(groups[rest]))
            part = rest[np.isin(groups[rest], names[: int(round(len(names) * 0.75))])]
            scores["three_quarters"].append(head_srcc(x, mos, part, folds[k], seed=100 * seed + k))
            scores["all"].append(head_srcc(x, mos, rest, folds[k], seed=100 * seed + k))
            print(f"[refit] fold seed {seed} fold {k} ({len(folds[k])} rows): 3/4 {scores['three_quarters'][-1]:.4f} "
                  f"all {scores['all'][-1]:.4f}", flush=True)
    return {"mean": {n: float(np.mean(v)) for n, v in scores.items()},
            "paired": paired(scores, "all", "three_quarters"), "per_fold": scores}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="embedded", help="a dataset spec, as --dataset of tune_ranking.py")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", type=Path, default=None, help="results file (default benchmarks/results/refit_cv_<name>.json)")
    args = p.parse_args()

    import torch

    from iqa_ray.core.io import atomic_write_json
    from iqa_ray.training.features import compute_features
    from iqa_ray.training.loaders import load_decoded

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    config = recipe_config(args.dataset)
    decoded = load_decoded(config)
    table = decoded.table
    split = table["split"].to_numpy()
    rows = np.flatnonzero(np.isin(split, ("train", "val")))
    groups = (table["group"] if "group" in table.columns else table.index.to_series()).astype(str).to_numpy()
    mos = table["mos"].to_numpy(np.float64)
    t0 = time.perf_counter()
    x = compute_features(decoded, config, "cpu").plain
    print(f"[features] {len(table)} rows, {x.shape[1]} features in {time.perf_counter() - t0:.0f} s; "
          f"{len(rows)} train+val rows from {len(np.unique(groups[rows]))} source photos (test rows not used)", flush=True)
    result = refit_cv(x, mos, groups, rows)
    d = result["paired"]
    print(f"\nThe recipe's MLP head, grouped {CV_FOLDS}-fold cross-validation over the train+val rows "
          f"({len(CV_SEEDS)} fold seeds), mean SRCC: 3/4 of the other folds {result['mean']['three_quarters']:.4f}, "
          f"all of them (the refit) {result['mean']['all']:.4f}; per fold {d['diff_mean']:+.4f} +- {d['diff_se']:.4f} "
          f"(standard error), the refit better in {d['wins']} of {d['folds']} folds")
    name = Path(args.dataset.split(":", 1)[0]).name or "dataset"
    out = args.json or RESULTS / f"refit_cv_{name}.json"
    atomic_write_json(out, {"dataset": args.dataset, "backbone": config.model.backbone,
                            "pooling": config.model.pooling, "rows": int(len(rows)),
                            "source_photos": int(len(np.unique(groups[rows]))), **result,
                            "seconds": round(time.perf_counter() - started, 1), "machine": platform.platform(),
                            "threads": args.threads})
    print(f"written: {out}")


if __name__ == "__main__":
    main()
