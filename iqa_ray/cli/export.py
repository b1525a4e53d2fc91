"""``iqa-ray export EXPERIMENT``: ``trials.parquet`` and ``epochs.parquet`` of a search, written
again from its Tune results (:mod:`iqa_ray.search.export`; a search writes them itself when it ends)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from iqa_ray.search import export


def main(argv: list[str] | None = None, prog: str = "iqa-ray export") -> int:
    p = argparse.ArgumentParser(prog=prog, description=export.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", type=Path, help="an experiment folder (RESULTS_DIR/<name>)")
    args = p.parse_args(argv)
    try:
        paths = export.export_experiment(args.experiment)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path} ({len(pd.read_parquet(path))} rows)")
    return 0
