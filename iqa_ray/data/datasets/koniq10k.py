"""KonIQ-10k (Hosu et al., IEEE TIP 2020), read from its original download.

Layout (paths relative to the ``root`` given by the user): ``1024x768/*.jpg`` (or ``512x384/*.jpg``,
the official half-size download; ``image_dir`` overrides), ``koniq10k_scores_and_distributions.csv``
(``image_name, c1..c5, c_total, MOS, SD, MOS_zscore``; MOS on 1-5) and, optionally,
``koniq10k_distributions_sets.csv`` from the KonIQ GitHub repository (``image_name, c1..c5, c_total,
MOS, SD, set`` with ``set`` in training/validation/test). Labels come from the scores file and only
``set`` is taken from the sets file, because the sets file's ``MOS`` column is on the 0-100 scale
(it equals ``MOS_zscore``), not 1-5. When only the sets file exists its 0-100 ``MOS`` is used as is.

The official split is used when the sets file is present (and ``use_official_split`` is true);
otherwise the split is seeded, one group per image.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import pandas as pd

from iqa_ray.core.errors import DatasetError
from iqa_ray.data.datasets.label_files import (
    LabelTable,
    Loc,
    dataset_root,
    find_image_dir,
    float_or_nan,
    read_csv,
    under,
)
from iqa_ray.data.datasets.table import REAL_FRACTIONS, Row, Spec, build_table

__all__ = ["KONIQ_IMAGE_DIRS", "KONIQ_SCORES_FILE", "KONIQ_SETS_FILE", "load_koniq10k"]

KONIQ_SCORES_FILE = "koniq10k_scores_and_distributions.csv"
KONIQ_SETS_FILE = "koniq10k_distributions_sets.csv"
KONIQ_IMAGE_DIRS = ("1024x768", "512x384")

# The raw range and the mapping to 0-100 of each score column of the scores file.
_SCALES = {
    "MOS": ((1.0, 5.0), "KonIQ-10k MOS 1-5 -> (MOS-1)/4*100"),
    "MOS_zscore": ((0.0, 100.0), "KonIQ-10k MOS_zscore (0-100) used as is"),
}
# Extras kept from the label file: its column -> the table's column.
_EXTRA_NAMES = {"SD": "sd", "MOS_zscore": "mos_zscore", **{f"c{k}": f"c{k}" for k in range(1, 6)}, "c_total": "c_total"}


def load_koniq10k(
    root: str | os.PathLike[str],
    *,
    split_seed: int = 0,
    fractions: Sequence[float] = REAL_FRACTIONS,
    on_error: str = "raise",
    check_files: bool = True,
    check_images: bool = False,
    image_dir: str | os.PathLike[str] | None = None,
    mos_column: str = "MOS",
    use_official_split: bool = True,
    label_file: str | os.PathLike[str] | None = None,
    sets_file: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Read KonIQ-10k (Hosu et al., IEEE TIP 2020) from its original download.

    Args:
        root: Folder with ``1024x768/`` (or ``512x384/``) and the label CSV(s).
        split_seed: Seed of the grouped random split used when there is no official split.
        fractions: (train, val, test) fractions of the seeded split.
        on_error: ``"raise"`` or ``"skip"`` (see :mod:`iqa_ray.data.datasets`).
        check_files: Check that every image file exists (no decoding).
        check_images: An empty, unreadable or truncated image file is a bad row (:mod:`.image_check`).
        image_dir: Image folder, relative to ``root`` or absolute; default ``1024x768`` if it
            exists, else ``512x384``.
        mos_column: ``"MOS"`` (1-5, mapped to 0-100) or ``"MOS_zscore"`` (0-100, used as is).
        use_official_split: Use the ``set`` column of ``koniq10k_distributions_sets.csv`` when
            that file exists; otherwise (or when false) split at random by image.
        label_file: Scores file, default ``koniq10k_scores_and_distributions.csv``.
        sets_file: Official split file, default ``koniq10k_distributions_sets.csv``.

    Returns:
        The common table; extras ``sd``, ``mos_zscore``, ``c1``..``c5``, ``c_total`` when present.

    Raises:
        DatasetError: See :mod:`iqa_ray.data.datasets`.
    """
    dataset = "koniq10k"
    root_p = dataset_root(root, dataset, f"{KONIQ_IMAGE_DIRS[0]}/ and {KONIQ_SCORES_FILE}")
    if mos_column not in ("MOS", "MOS_zscore"):
        raise ValueError(f"mos_column must be 'MOS' or 'MOS_zscore', got {mos_column!r}")
    scores_path, sets_path = _label_files(root_p, label_file, sets_file)
    have_scores, have_sets = scores_path.is_file(), sets_path.is_file()
    images = find_image_dir(root_p, dataset, image_dir, KONIQ_IMAGE_DIRS, check_files)
    official = use_official_split and have_sets
    split_of: dict[str, tuple[str, Loc]] = {}
    if have_sets and (official or not have_scores):
        sets, set_cols, split_of = _read_sets(sets_path, have_scores)

    if have_scores:
        table = read_csv(scores_path)
        cols = table.require(
            ["image_name", mos_column], ["SD", "MOS_zscore", "c1", "c2", "c3", "c4", "c5", "c_total"]
        )
        (mos_range, scale), mos_col = _SCALES[mos_column], cols[mos_column]
    else:
        table, cols = sets, set_cols
        mos_range, scale = (0.0, 100.0), "KonIQ-10k sets-file MOS (0-100, equals MOS_zscore) used as is"
        mos_col = cols["MOS"]
    rows = _rows(table, cols, mos_col, mos_column, split_of if official else None, sets_path)
    spec = Spec(
        dataset=dataset,
        root=root_p,
        image_dir=images,
        label_file=table.file,
        mos_label=mos_column if have_scores else "MOS",
        mos_range=mos_range,
        mos_scale=scale,
        official_split=official,
        split_column=f"'set' ({sets_path.name})",
        extra_columns=tuple(_EXTRA_NAMES.values()),
        attrs={"split_file": str(sets_path) if official else None},
    )
    return build_table(
        spec, rows, split_seed=split_seed, fractions=fractions, on_error=on_error, check_files=check_files,
        check_images=check_images,
    )


def _label_files(
    root: Path, label_file: str | os.PathLike[str] | None, sets_file: str | os.PathLike[str] | None
) -> tuple[Path, Path]:
    """The scores file and the official split file; at least one of them exists."""
    dataset = "koniq10k"
    scores_path = under(root, label_file) if label_file is not None else root / KONIQ_SCORES_FILE
    sets_path = under(root, sets_file) if sets_file is not None else root / KONIQ_SETS_FILE
    if label_file is not None and not scores_path.is_file():
        raise DatasetError(f"{dataset}: label file {scores_path} (from label_file) does not exist")
    if sets_file is not None and not sets_path.is_file():
        raise DatasetError(f"{dataset}: split file {sets_path} (from sets_file) does not exist")
    if not scores_path.is_file() and not sets_path.is_file():
        raise DatasetError(
            f"{dataset}: label file not found; expected {scores_path} (or the official split file "
            f"{sets_path}, whose MOS is on 0-100)"
        )
    return scores_path, sets_path


def _read_sets(
    sets_path: Path, have_scores: bool
) -> tuple[LabelTable, dict[str, str], dict[str, tuple[str, Loc]]]:
    """The split file, its columns (with the labels too when there is no scores file) and the
    ``set`` of each image (the first row of a name counts)."""
    sets = read_csv(sets_path)
    cols = sets.require(
        ["image_name", "set"] + ([] if have_scores else ["MOS"]),
        [] if have_scores else ["SD", "c1", "c2", "c3", "c4", "c5", "c_total"],
    )
    split_of: dict[str, tuple[str, Loc]] = {}
    for loc, values in sets.rows:
        name = values[cols["image_name"]].strip()
        if name and name not in split_of:
            split_of[name] = (values[cols["set"]], loc)
    return sets, cols, split_of


def _rows(
    table: LabelTable,
    cols: dict[str, str],
    mos_col: str,
    mos_column: str,
    split_of: dict[str, tuple[str, Loc]] | None,
    sets_path: Path,
) -> list[Row]:
    """One row per label, with its official split when ``split_of`` is given."""
    rows = []
    for loc, values in table.rows:
        name = values[cols["image_name"]]
        extras = {
            out: float_or_nan(values[cols[col]])
            for col, out in _EXTRA_NAMES.items()
            if col in cols and not (col == "MOS_zscore" and mos_column == "MOS_zscore")
        }
        row = Row(loc, name, values[mos_col], extras)
        if split_of is not None:
            entry = split_of.get(name.strip())
            if entry is None:
                row.error = f"not listed in the official split file {sets_path}; every image needs a 'set'"
            else:
                row.split = entry[0]
        rows.append(row)
    return rows
