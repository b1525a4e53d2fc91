"""Label files of real IQA datasets, read as text with row and line numbers for messages, and the
files located: the dataset root, its image folder and its label file (the first part of the shared
reader; :mod:`iqa_ray.data.datasets.table` turns the rows into the common table).
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from iqa_ray.core.errors import DatasetError

__all__ = [
    "Loc", "LabelTable", "read_csv", "read_excel", "dataset_root", "under", "find_image_dir", "find_label_file",
    "float_or_nan",
]


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
# Locating the files
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
