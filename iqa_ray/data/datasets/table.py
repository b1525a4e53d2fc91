"""The common table of a real IQA dataset, built from its label rows: every row validated, scores
normalised to 0-100, the split drawn by content group (the second part of the shared reader under every
adapter; :mod:`iqa_ray.data.datasets.label_files` reads the files). :mod:`iqa_ray.data.datasets`
describes the table.

An adapter only turns its dataset's layout into :class:`Row` objects and a :class:`Spec`;
declarative layouts (:mod:`iqa_ray.data.datasets.layout`) do even that from data.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from iqa_ray.core.errors import DatasetError
from iqa_ray.data.datasets.image_check import image_problems
from iqa_ray.data.datasets.label_files import Loc
from iqa_ray.data.splits import assign_group_splits, validate_fractions

__all__ = [
    "REAL_FRACTIONS", "ON_ERROR_VALUES", "BASE_COLUMNS", "SPLIT_NAMES", "Row", "Spec", "RowChecker",
    "build_table", "check_on_error", "seeded_group_split",
]

REAL_FRACTIONS = (0.7, 0.1, 0.2)  # train/val/test of a real dataset without an official split
LISTED_BAD_ROWS = 20  # bad rows named in the one error that lists them (the rest are counted)
ON_ERROR_VALUES = ("raise", "skip")
BASE_COLUMNS = ("image_id", "path", "mos", "mos_raw", "split", "group")

# Split labels accepted in split columns (compared lower-cased and stripped).
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


# --------------------------------------------------------------------------------------------
# Checking rows
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One label row before validation."""

    loc: Loc
    image: str
    raw: Any
    extras: dict[str, Any] = field(default_factory=dict)
    group: str | None = None
    split: str | None = None
    rel_path: str | None = None  # location under the image folder when it differs from ``image``
    error: str | None = None  # problem found by the adapter (e.g. bad file name pattern)


@dataclass
class Spec:
    """What the shared builder needs to know about a dataset."""

    dataset: str
    root: Path
    image_dir: Path
    label_file: Path
    mos_label: str
    mos_range: tuple[float, float]
    mos_scale: str
    higher_is_better: bool = True
    official_split: bool = False
    split_column: str = "split"
    extra_columns: tuple[str, ...] = ()
    attrs: dict[str, Any] = field(default_factory=dict)

    def normalise(self, value: float) -> float:
        lo, hi = self.mos_range
        if self.higher_is_better:
            return (value - lo) / (hi - lo) * 100.0
        return (hi - value) / (hi - lo) * 100.0


class FileIndex:
    """Cheap existence checks: one ``os.listdir`` per folder instead of one ``stat`` per image."""

    def __init__(self) -> None:
        self._listings: dict[str, set[str]] = {}

    def exists(self, path: str) -> bool:
        parent, name = os.path.split(path)
        listing = self._listings.get(parent)
        if listing is None:
            try:
                listing = set(os.listdir(parent))
            except OSError:
                listing = set()
            self._listings[parent] = listing
        return name in listing


def parse_mos(raw: Any, spec: Spec) -> tuple[float | None, str | None]:
    """Return (value, None) or (None, problem)."""
    lo, hi = spec.mos_range
    valid = f"expected a number in [{lo:g}, {hi:g}]"
    if isinstance(raw, np.generic):
        raw = raw.item()  # numpy scalars from .mat files: report them as plain numbers
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None, f"{spec.mos_label} value is empty; {valid}"
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        return None, f"{spec.mos_label} value {raw!r} is not a number; {valid}"
    if not math.isfinite(value):
        return None, f"{spec.mos_label} value {raw!r} is not a finite number; {valid}"
    eps = 1e-9 * max(1.0, abs(hi - lo))
    if value < lo - eps or value > hi + eps:
        return None, f"{spec.mos_label} value {raw!r} is outside the raw range; {valid}"
    return value, None


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR_VALUES:
        raise ValueError(f"on_error must be one of {list(ON_ERROR_VALUES)}, got {on_error!r}")



class RowProblem(Exception):
    """A bad label row: raised, or skipped and listed, as ``on_error`` says."""


class RowChecker:
    """Checks label rows one at a time and makes each good one a record of the common table.

    Every bad row is listed in ``skipped`` (with ``on_error="raise"``, :meth:`error` then makes them
    one :class:`DatasetError`); for a duplicated image name the first row is kept.
    """

    def __init__(self, spec: Spec, *, on_error: str, check_files: bool) -> None:
        self.spec = spec
        self.on_error = on_error
        self.check_files = check_files
        self.n_read = 0
        self._files = FileIndex()
        self._first_seen: dict[str, Loc] = {}
        self._found: list[tuple[int, str, dict[str, Any]]] = []  # (row order, message, skipped entry)

    def record(self, row: Row) -> dict[str, Any] | None:
        """The table record of ``row``, or ``None`` when it is bad (listed)."""
        self.n_read += 1
        row.image = row.image.strip().replace("\\", "/")
        try:
            return self._record(row)
        except RowProblem as exc:
            problem = str(exc)
        self.fail(row, problem, self.n_read)
        return None

    def fail(self, row: Row, problem: str, order: int, path: str | None = None) -> None:
        """List ``row`` as bad (``order``: its place among the rows read, which orders the list)."""
        entry = {"file": str(row.loc.file), "row": row.loc.row, "line": row.loc.line, "image": row.image,
                 "reason": problem}
        if path is not None:
            entry["path"] = path
        self._found.append((order, f"{row.loc.describe()}, image {row.image!r}: {problem}", entry))

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """The bad rows, in the order they were read: ``file``, ``row``, ``line``, ``image``, ``reason``
        (and ``path`` for an image that cannot be used)."""
        return [entry for _, _, entry in sorted(self._found, key=lambda found: found[0])]

    def check_images(self, kept: list[tuple[int, Row, dict[str, Any]]]) -> list[tuple[int, Row, dict[str, Any]]]:
        """``kept`` (row order, row, record) without the rows whose image file cannot be used
        (:func:`~iqa_ray.data.datasets.image_check.image_problems`), which are listed as bad."""
        problems = image_problems([record["path"] for _, _, record in kept])
        for i, problem in problems.items():
            order, row, record = kept[i]
            self.fail(row, problem, order, path=record["path"])
        return [item for i, item in enumerate(kept) if i not in problems]

    def error(self) -> DatasetError | None:
        """Every bad row in one error (the first :data:`LISTED_BAD_ROWS` and a count of the rest) when
        ``on_error="raise"`` and there are any; else ``None``."""
        if self.on_error != "raise" or not self._found:
            return None
        n, spec = len(self._found), self.spec
        found = sorted(self._found, key=lambda item: item[0])
        lines = [message for _, message, _ in found[:LISTED_BAD_ROWS]]
        if n > LISTED_BAD_ROWS:
            lines.append(f"... and {n - LISTED_BAD_ROWS} more")
        return DatasetError(
            f"{spec.dataset}: {n} bad row{'s' if n > 1 else ''} in {spec.label_file}; nothing is loaded until "
            f"{'they are' if n > 1 else 'it is'} fixed, or skipped (iqa-ray tune --skip-bad-rows, the config key "
            f"skip_bad_rows = true, or on_error=\"skip\"):\n  "
            + "\n  ".join(lines))

    def _record(self, row: Row) -> dict[str, Any]:
        spec, image = self.spec, row.image
        if not image:
            raise RowProblem(f"the image name is empty; expected a file name relative to {spec.image_dir}")
        if image in self._first_seen:
            raise RowProblem(
                f"duplicated image name: it is also listed at {self._first_seen[image].describe()}; "
                "each image must be listed once"
            )
        self._first_seen[image] = row.loc
        if row.error is not None:
            raise RowProblem(row.error)
        value, problem = parse_mos(row.raw, spec)
        if problem is not None:
            raise RowProblem(problem)
        split = self._official_split(row) if spec.official_split else None
        rel = (row.rel_path or image).replace("\\", "/")
        path = os.path.abspath(os.path.join(spec.image_dir, rel))
        if self.check_files and not self._files.exists(path):
            raise RowProblem(f"image file not found: expected {path}")
        group = row.group.strip() if isinstance(row.group, str) else ""
        record = {
            "image_id": image,
            "path": path,
            "mos": spec.normalise(value),
            "mos_raw": value,
            "split": split,
            "group": group or image,
        }
        record.update(row.extras)
        return record

    def _official_split(self, row: Row) -> str:
        text = "" if row.split is None else str(row.split).strip()
        split = SPLIT_NAMES.get(text.lower())
        if split is None:
            shown = repr(text) if text else "empty"
            raise RowProblem(
                f"{self.spec.split_column} value {shown} is not a known split; valid values are "
                f"{sorted(SPLIT_NAMES)}"
            )
        return split


# --------------------------------------------------------------------------------------------
# Building the common table
# --------------------------------------------------------------------------------------------


def build_table(
    spec: Spec,
    rows: Iterable[Row],
    *,
    split_seed: int,
    fractions: Sequence[float],
    on_error: str,
    check_files: bool,
    check_images: bool = False,
) -> pd.DataFrame:
    """Validate rows, normalise MOS, split, and assemble the common table.

    Every bad row is found before the split is drawn: ``on_error="raise"`` raises one
    :class:`DatasetError` listing them (:meth:`RowChecker.error`), ``"skip"`` leaves them out of
    every split and lists them in ``attrs["skipped"]``. ``check_images``: an image file that cannot
    be used (empty, not an image, a truncated JPEG or PNG: :mod:`~iqa_ray.data.datasets.image_check`)
    makes its row bad too (its entry then holds the image's ``path``).
    """
    check_on_error(on_error)
    fracs = validate_fractions(fractions)
    checker = RowChecker(spec, on_error=on_error, check_files=check_files)
    checked = []  # (row order, row, record) of the good rows
    for row in rows:
        record = checker.record(row)
        if record is not None:
            checked.append((checker.n_read, row, record))
    if check_images:
        checked = checker.check_images(checked)
    error = checker.error()
    if error is not None:
        raise error
    kept = [record for _, _, record in checked]
    skipped = checker.skipped
    if not kept:
        raise _nothing_to_load(spec, skipped)
    if skipped:
        warnings.warn(
            f"{spec.dataset}: skipped {len(skipped)} of {checker.n_read} rows of {spec.label_file} "
            "(bad labels or missing images); see df.attrs['skipped']",
            UserWarning,
            stacklevel=3,
        )

    frame = _common_columns(pd.DataFrame.from_records(kept), spec)
    if spec.official_split:
        split_source = "official"
    else:
        frame["split"] = seeded_group_split(frame["group"].tolist(), seed=split_seed, fractions=fracs)
        split_source = f"seeded-random(seed={split_seed}, fractions={fracs})"
    frame = frame.reset_index(drop=True)
    frame.attrs.update(
        {
            "dataset": spec.dataset,
            "mos_scale": spec.mos_scale,
            "split_source": split_source,
            "skipped": skipped,
            "root": str(spec.root),
            "image_dir": str(spec.image_dir),
            "label_file": str(spec.label_file),
            "n_rows_read": checker.n_read,
        }
    )
    frame.attrs.update(spec.attrs)
    return frame


def _nothing_to_load(spec: Spec, skipped: list[dict[str, Any]]) -> DatasetError:
    """The error for a label file that leaves no row to load."""
    if skipped:
        examples = "; ".join(
            f"{s['file']} row {s['row']} ({s['image']}): {s['reason']}" for s in skipped[:3]
        )
        return DatasetError(
            f"{spec.dataset}: all {len(skipped)} rows of {spec.label_file} were skipped, "
            f"nothing is left to load. First problems: {examples}"
        )
    return DatasetError(
        f"{spec.dataset}: {spec.label_file} has no data rows; expected one row per image "
        f"with a {spec.mos_label} score"
    )


def _common_columns(frame: pd.DataFrame, spec: Spec) -> pd.DataFrame:
    """The base columns first, then the adapter's extras (in its order), then any others; float scores."""
    extra = [c for c in spec.extra_columns if c in frame.columns]
    extra += [c for c in frame.columns if c not in BASE_COLUMNS and c not in extra]
    frame = frame[list(BASE_COLUMNS) + extra]
    frame["mos"] = frame["mos"].astype("float64")
    frame["mos_raw"] = frame["mos_raw"].astype("float64")
    return frame


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------


def seeded_group_split(
    groups: Sequence[str],
    *,
    seed: int = 0,
    fractions: Sequence[float] = REAL_FRACTIONS,
) -> list[str]:
    """The split of each item, whole groups per split (see :func:`iqa_ray.data.splits.assign_group_splits`).

    Args:
        groups: The group of each item (compared as strings).
        seed: Seed of the shuffle.
        fractions: (train, val, test) fractions of groups, non-negative, summing to 1.

    Returns:
        The split name of each item, in the order of ``groups``.
    """
    keys = [str(g) for g in groups]
    if not keys:
        return []
    assignment = assign_group_splits(keys, fractions, seed)
    return [assignment[k] for k in keys]
