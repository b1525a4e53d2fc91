"""Shared command-line helpers: argument types and run folders (Ray start-up lives in
:mod:`iqa_ray.search.cluster`).

Only command-line entry points (launchers, ``iqa-train``, ``iqa-pretrain``) import this.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


class UsageError(Exception):
    """A bad command line or run folder; entry points print it as ``error: ...`` and exit with 2."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def run_folder(out: Path | None, default_name: str, resume: bool, checkpoint_file: str) -> tuple[Path, Path | None]:
    """A standalone run's folder and, with ``--resume``, the checkpoint to continue from.

    ``out`` defaults to ``runs/<default_name>-<date>-<time>``. Raises :class:`UsageError`, before
    anything is written, when ``--resume`` finds no ``checkpoint_file`` there, or when a new run
    would write over one that is already in the folder (its ``metrics.jsonl``).
    """
    out = out or Path("runs") / f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if resume:
        checkpoint = out / checkpoint_file
        if not checkpoint.exists():
            raise UsageError(f"--resume: no {checkpoint_file} in {out}")
        return out, checkpoint
    if (out / "metrics.jsonl").exists():
        raise UsageError(f"{out} already holds a run; use --resume to continue it or another --out")
    return out, None


__all__ = ["UsageError", "positive_int", "run_folder"]
