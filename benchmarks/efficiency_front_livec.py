#!/usr/bin/env python
"""Accuracy against latency on real photos: the front a multi-objective search finds vs random search.

The efficiency study (``search_spaces/efficiency.toml``: crop size, evaluation patches, frozen
depth, head width, ranking loss, LR; objectives validation SRCC (max) and ``latency_ms`` (min), the
knee handed back) on LIVE Challenge (``../shared/data/livec-jpg``, the adapter's split seed 0,
``--recipe none``: the study as written, backbones trained as far as ``trainable_stages`` says),
run twice through the launcher with the same wall-clock budget (``--time-budget``):

* ``optuna``: Optuna's multi-objective TPE (the study's sampler) with ASHA on validation SRCC;
* ``random``: random search with the same ASHA.

Per search, from its ``trials.parquet`` (validation values only; the test split is scored once, for
the trial each search hands back): trials with values, the Pareto-optimal trials, the most accurate
trial, **the fastest trial within 0.02 validation SRCC of the most accurate one and its latency
ratio to it**, the hypervolume of the front (area dominated in (SRCC, latency) above SRCC 0 and
below a reference latency shared by both searches: bigger is better), and the selected trial's test
SRCC. Latency is ms per image at batch 1, measured by each trial on its CPU before it trained.

    python benchmarks/efficiency_front_livec.py [--budget-min 10] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DATASET = "livec:" + str((ROOT / ".." / "shared" / "data" / "livec-jpg").resolve())
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "efficiency_front_livec.json"
WITHIN = 0.02


def run_search(searcher: str, budget_min: float, storage: Path) -> tuple[Path, float]:
    name = f"front-{searcher}"
    started = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "launch" / "tune_efficiency.py"), "--dataset", DATASET, "--recipe", "none",
           "--searcher", searcher, "--time-budget", str(budget_min), "--num-samples", "500",
           "--storage", str(storage), "--name", name, "--progress-every", "120"]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (storage / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}); see {storage / (name + '.log')}")
    return storage / name, time.perf_counter() - started


def hypervolume(points: np.ndarray, ref_latency: float) -> float:
    """Area dominated by (SRCC, latency) points (SRCC up, latency down) above SRCC 0 and below
    ``ref_latency``: the front's points sorted by latency, each adding the band between its SRCC and
    the previous one's, from its latency to the reference."""
    pts = sorted((float(lat), float(srcc)) for srcc, lat in points if lat < ref_latency and srcc > 0)
    area, previous = 0.0, 0.0
    for lat, srcc in pts:
        if srcc > previous:  # on the front: better than every faster point
            area += (ref_latency - lat) * (srcc - previous)
            previous = srcc
    return area


def describe(experiment: Path, ref_latency: float) -> dict[str, Any]:
    trials = pd.read_parquet(experiment / "trials.parquet")
    trials = trials[trials["kind"] == "search"]
    scored = trials[trials.selection_score.notna() & trials.latency_ms.notna()]
    front = scored[scored.pareto_optimal].sort_values("latency_ms")
    best = scored.loc[scored.selection_score.idxmax()]
    near = scored[scored.selection_score >= best.selection_score - WITHIN]
    fastest = near.loc[near.latency_ms.idxmin()]
    selected = trials[trials.selected].iloc[0]
    summary = json.loads((experiment / "summary.json").read_text())
    keys = ["config.crop_size", "config.eval_patches", "config.trainable_stages", "config.hidden_dim"]
    return {
        "trials": int(len(trials)), "with_values": int(len(scored)), "front_size": int(len(front)),
        "front": [{"trial_id": r["trial_id"], "val_srcc": float(r["selection_score"]),
                   "latency_ms": float(r["latency_ms"]), "params_m": float(r["params_m"]),
                   **{k.removeprefix("config."): r[k].item() if hasattr(r[k], "item") else r[k] for k in keys}}
                  for _, r in front.iterrows()],
        "most_accurate": {"trial_id": best.trial_id, "val_srcc": float(best.selection_score),
                          "latency_ms": float(best.latency_ms)},
        "fastest_within": {"trial_id": fastest.trial_id, "val_srcc": float(fastest.selection_score),
                           "latency_ms": float(fastest.latency_ms),
                           "latency_ratio": float(fastest.latency_ms / best.latency_ms)},
        "hypervolume": hypervolume(scored[["selection_score", "latency_ms"]].to_numpy(), ref_latency),
        "selected": {"trial_id": selected.trial_id, "val_srcc": float(selected.selection_score),
                     "latency_ms": float(selected.latency_ms), "test_srcc": summary["test"].get("srcc"),
                     "rule": summary.get("selection_rule")},
        "ended_by": trials.ended_by.value_counts().to_dict(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-min", type=float, default=10.0, help="wall-clock budget of each search (minutes)")
    p.add_argument("--storage", type=Path, default=Path("/tmp/efficiency_front_livec"))
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args()
    args.storage.mkdir(parents=True, exist_ok=True)
    runs = {}
    for searcher in ("optuna", "random"):
        runs[searcher] = run_search(searcher, args.budget_min, args.storage)
    latencies = [pd.read_parquet(path / "trials.parquet").latency_ms.max() for path, _ in runs.values()]
    ref = float(np.nanmax(latencies)) * 1.1
    results = {s: {**describe(path, ref), "wall_s": round(wall, 1)} for s, (path, wall) in runs.items()}
    print(f"\nLIVE Challenge, efficiency study, --time-budget {args.budget_min:g} min each, 2 cores "
          f"(hypervolume reference: SRCC 0, {ref:.1f} ms)\n")
    print("| search | trials (with values) | front | most accurate: val SRCC, ms | fastest within 0.02: val SRCC, ms, "
          "ratio | hypervolume | selected (knee): val SRCC, ms, test SRCC | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for s, r in results.items():
        m, f, sel = r["most_accurate"], r["fastest_within"], r["selected"]
        print(f"| {s} | {r['trials']} ({r['with_values']}) | {r['front_size']} | {m['val_srcc']:.3f}, {m['latency_ms']:.1f} | "
              f"{f['val_srcc']:.3f}, {f['latency_ms']:.1f}, {f['latency_ratio']:.2f}x | {r['hypervolume']:.1f} | "
              f"{sel['val_srcc']:.3f}, {sel['latency_ms']:.1f}, {sel['test_srcc']:.3f} | {r['wall_s']:.0f} |")
    for s, r in results.items():
        print(f"\n{s} front:")
        for row in r["front"]:
            print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    out = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
           "dataset": DATASET, "budget_min": args.budget_min, "reference_latency_ms": ref, "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2, default=str))
    os.replace(tmp, args.json)
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
