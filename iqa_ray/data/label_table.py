"""The shared reader under every real-dataset adapter: label files (CSV, Excel) read as text with
row and line numbers for messages, and one builder that validates rows, normalises scores to 0-100,
splits by content group and assembles the common table (:mod:`iqa_ray.data.real` describes it).

An adapter only turns its dataset's layout into :class:`Row` objects and a :class:`Spec`;
declarative layouts (:mod:`iqa_ray.data.layouts`) do even that from data.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from iqa_ray.core.errors import DatasetError
from iqa_ray.data.splits import assign_group_splits, validate_fractions

__all__ = [
    "REAL_FRACTIONS", "ON_ERROR_VALUES", "BASE_COLUMNS", "SPLIT_NAMES", "Loc", "LabelTable",
    "Row", "Spec", "build_table", "check_on_error", "dataset_root", "find_image_dir",
    "find_label_file", "float_or_nan", "read_csv", "read_excel", "seeded_group_split", "under",
]

REAL_FRACTIONS = (0.7, 0.1, 0.2)  # train/val/test of a real dataset without an official split
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
# Reading label files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loc:
    """Where a label row lives, for messages: ``<file>: <unit> <row> (line <line>)<note>``."""

    file: Path
    row: int
    line: int | None = None
    unit: str = "data row"
    note: str = ""

    def describe(self) -> str:
        line = f" (line {self.line})" if self.line is not None else ""
        return f"{self.file}: {self.unit} {self.row}{line}{self.note}"


@dataclass
class LabelTable:
    """A label file read as text: header and rows keyed by header name, with locations."""

    file: Path
    header: list[str]
    rows: list[tuple[Loc, dict[str, str]]]

    def require(self, required: Sequence[str], optional: Sequence[str] = ()) -> dict[str, str]:
        """Map the wanted column names to the header's spelling; raise if a required one is absent.

        Matching ignores case and repeated or surrounding whitespace (``"Image Name"`` matches
        ``"image name"``); an exact match wins.
        """
        found: dict[str, str] = {}
        missing = []
        for want in list(required) + list(optional):
            col = match_column(want, self.header)
            if col is not None:
                found[want] = col
            elif want in required:
                missing.append(want)
        if missing:
            raise DatasetError(
                f"{self.file}: missing required column(s) {missing}; expected columns "
                f"{list(required)} (optional {list(optional)}), found {self.header}"
            )
        return found


def norm_col(name: str) -> str:
    return " ".join(str(name).split()).lower()


def match_column(want: str, header: Sequence[str]) -> str | None:
    if want in header:
        return want
    target = norm_col(want)
    for col in header:
        if norm_col(col) == target:
            return col
    return None


def read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read label file {path}: {exc}") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def read_csv(path: Path, delimiter: str | None = None) -> LabelTable:
    """Read a CSV (comma, tab or semicolon separated) keeping 1-based data rows and line numbers."""
    text = read_text(path)
    first_line = text.split("\n", 1)[0]
    if delimiter is None:
        delimiter = ","
        if "," not in first_line:
            if "\t" in first_line:
                delimiter = "\t"
            elif ";" in first_line:
                delimiter = ";"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DatasetError(f"{path}: the file is empty; expected a header line with column names") from None
    except csv.Error as exc:
        raise DatasetError(f"{path}: not a readable CSV file ({exc})") from exc
    header = [h.strip() for h in header]
    rows: list[tuple[Loc, dict[str, str]]] = []
    n = 0
    try:
        for record in reader:
            if not record or all(not cell.strip() for cell in record):
                continue  # blank line
            n += 1
            values = {col: (record[i] if i < len(record) else "") for i, col in enumerate(header)}
            rows.append((Loc(path, n, reader.line_num), values))
    except csv.Error as exc:
        raise DatasetError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from exc
    return LabelTable(path, header, rows)


def cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    return str(value)


def frame_to_table(frame: pd.DataFrame, path: Path, unit: str, first_line: int) -> LabelTable:
    header = [str(c).strip() for c in frame.columns]
    rows = []
    for i, record in enumerate(frame.itertuples(index=False, name=None)):
        values = {col: cell_text(v) for col, v in zip(header, record)}
        if all(not v.strip() for v in values.values()):
            continue
        rows.append((Loc(path, i + 1, None, unit, f" (sheet row {i + first_line})"), values))
    return LabelTable(path, header, rows)


def read_excel(path: Path, csv_name: str, columns: Sequence[str]) -> LabelTable:
    try:
        frame = pd.read_excel(path)
    except ImportError as exc:
        raise DatasetError(
            f"{path}: reading .xlsx needs the optional package openpyxl, which is not installed "
            f"({exc}). Either `pip install openpyxl`, or export the sheet to CSV as "
            f"{path.with_name(csv_name)} with the columns {list(columns)}."
        ) from exc
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes a clear DatasetError
        raise DatasetError(f"{path}: cannot read the spreadsheet ({type(exc).__name__}: {exc})") from exc
    return frame_to_table(frame, path, "data row", 2)


# --------------------------------------------------------------------------------------------
# Building the common table
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


def build_table(
    spec: Spec,
    rows: Iterable[Row],
    *,
    split_seed: int,
    fractions: Sequence[float],
    on_error: str,
    check_files: bool,
) -> pd.DataFrame:
    """Validate rows, normalise MOS, split, and assemble the common table."""
    check_on_error(on_error)
    fracs = validate_fractions(fractions)
    skipped: list[dict[str, Any]] = []
    files = FileIndex()
    first_seen: dict[str, Loc] = {}
    kept: list[dict[str, Any]] = []
    n_read = 0

    def fail(row: Row, problem: str) -> None:
        message = f"{row.loc.describe()}, image {row.image!r}: {problem}"
        if on_error == "raise":
            raise DatasetError(message)
        skipped.append(
            {
                "file": str(row.loc.file),
                "row": row.loc.row,
                "line": row.loc.line,
                "image": row.image,
                "reason": problem,
            }
        )

    for row in rows:
        n_read += 1
        image = row.image.strip().replace("\\", "/")
        row.image = image
        if not image:
            fail(row, f"the image name is empty; expected a file name relative to {spec.image_dir}")
            continue
        if image in first_seen:
            fail(
                row,
                f"duplicated image name: it is also listed at {first_seen[image].describe()}; "
                "each image must be listed once",
            )
            continue
        first_seen[image] = row.loc
        if row.error is not None:
            fail(row, row.error)
            continue
        value, problem = parse_mos(row.raw, spec)
        if problem is not None:
            fail(row, problem)
            continue
        split = None
        if spec.official_split:
            text = "" if row.split is None else str(row.split).strip()
            split = SPLIT_NAMES.get(text.lower())
            if split is None:
                shown = repr(text) if text else "empty"
                fail(
                    row,
                    f"{spec.split_column} value {shown} is not a known split; valid values are "
                    f"{sorted(SPLIT_NAMES)}",
                )
                continue
        rel = (row.rel_path or image).replace("\\", "/")
        path = os.path.abspath(os.path.join(spec.image_dir, rel))
        if check_files and not files.exists(path):
            fail(row, f"image file not found: expected {path}")
            continue
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
        kept.append(record)

    if not kept:
        if skipped:
            examples = "; ".join(
                f"{s['file']} row {s['row']} ({s['image']}): {s['reason']}" for s in skipped[:3]
            )
            raise DatasetError(
                f"{spec.dataset}: all {len(skipped)} rows of {spec.label_file} were skipped, "
                f"nothing is left to load. First problems: {examples}"
            )
        raise DatasetError(
            f"{spec.dataset}: {spec.label_file} has no data rows; expected one row per image "
            f"with a {spec.mos_label} score"
        )
    if skipped:
        warnings.warn(
            f"{spec.dataset}: skipped {len(skipped)} of {n_read} rows of {spec.label_file} "
            "(bad labels or missing images); see df.attrs['skipped']",
            UserWarning,
            stacklevel=3,
        )

    frame = pd.DataFrame.from_records(kept)
    extra = [c for c in spec.extra_columns if c in frame.columns]
    extra += [c for c in frame.columns if c not in BASE_COLUMNS and c not in extra]
    frame = frame[list(BASE_COLUMNS) + extra]
    frame["mos"] = frame["mos"].astype("float64")
    frame["mos_raw"] = frame["mos_raw"].astype("float64")
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
            "n_rows_read": n_read,
        }
    )
    frame.attrs.update(spec.attrs)
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


# --------------------------------------------------------------------------------------------
# Path helpers
# --------------------------------------------------------------------------------------------


def dataset_root(root: str | os.PathLike[str], dataset: str, expected: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetError(
            f"{dataset}: dataset root {path} does not exist; expected a folder with {expected}"
        )
    if not path.is_dir():
        raise DatasetError(
            f"{dataset}: dataset root {path} is not a folder; expected a folder with {expected}"
        )
    return Path(os.path.abspath(path))


def under(root: Path, value: str | os.PathLike[str]) -> Path:
    path = Path(value).expanduser()
    return Path(os.path.abspath(path if path.is_absolute() else root / path))


def find_image_dir(
    root: Path,
    dataset: str,
    override: str | os.PathLike[str] | None,
    candidates: Sequence[str],
    check: bool,
) -> Path:
    if override is not None:
        path = under(root, override)
        if check and not path.is_dir():
            raise DatasetError(f"{dataset}: image folder {path} (from image_dir) does not exist")
        return path
    for name in candidates:
        path = root / name
        if path.is_dir():
            return path
    if check:
        tried = ", ".join(str(root / c) for c in candidates)
        raise DatasetError(
            f"{dataset}: no image folder found; expected one of {tried} (or pass image_dir=...)"
        )
    return root / candidates[0]


def find_label_file(
    root: Path,
    dataset: str,
    override: str | os.PathLike[str] | None,
    candidates: Sequence[Path],
) -> Path:
    if override is not None:
        path = under(root, override)
        if not path.is_file():
            raise DatasetError(f"{dataset}: label file {path} (from label_file) does not exist")
        return path
    for path in candidates:
        if path.is_file():
            return path
    tried = " or ".join(str(p) for p in candidates)
    raise DatasetError(f"{dataset}: label file not found; expected {tried}")


def float_or_nan(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return float("nan")
    return value
