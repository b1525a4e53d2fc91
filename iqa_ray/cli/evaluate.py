"""``iqa-ray evaluate MODEL --dataset SPEC ...``: the cross-dataset table of a trained model
(:mod:`iqa_ray.evaluation.cross_dataset`), printed and written as ``cross_dataset.md`` / ``.csv``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iqa_ray.evaluation import cross_dataset


def build_parser(prog: str = "iqa-ray evaluate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=cross_dataset.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="EXPERIMENT_OR_RUN", help=cross_dataset.ACCEPTED_FORMS)
    p.add_argument("--dataset", action="append", default=[], metavar="SPEC",
                   help="another dataset to score whole (repeatable): embedded, a pre-generated folder, or "
                        "ADAPTER:ROOT such as livec:../shared/data/livec-jpg")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for cross_dataset.md / .csv (default: the experiment or run folder)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return p


def main(argv: list[str] | None = None, prog: str = "iqa-ray evaluate") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        markdown, paths = cross_dataset.run(args)
    except cross_dataset.EvaluateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown, end="")
    print("written: " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0
