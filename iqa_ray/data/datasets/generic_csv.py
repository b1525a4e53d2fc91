"""The generic ``csv`` adapter: any folder of images with a CSV of scores whose columns the user names
(``image_col``, ``mos_col``, optional ``group_col`` and ``split_col``) together with the raw score range
and direction; the scores are mapped to 0-100 by ``(x - lo) / (hi - lo) * 100`` (``(hi - x) / (hi - lo)
* 100`` when ``higher_is_better=False``). It builds a :class:`~iqa_ray.data.datasets.layout.Layout`
from those names and reads it.
"""

from __future__ import annotations

import os
from typing import Sequence

import pandas as pd

from iqa_ray.data.datasets.layout import Layout, read_layout
from iqa_ray.data.datasets.table import REAL_FRACTIONS

__all__ = ["load_csv_dataset"]


def load_csv_dataset(
    root: str | os.PathLike[str],
    *,
    csv_file: str | os.PathLike[str],
    image_col: str,
    mos_col: str,
    mos_range: tuple[float, float],
    higher_is_better: bool = True,
    group_col: str | None = None,
    split_col: str | None = None,
    image_dir: str | os.PathLike[str] | None = None,
    name: str = "csv",
    delimiter: str | None = None,
    split_seed: int = 0,
    fractions: Sequence[float] = REAL_FRACTIONS,
    on_error: str = "raise",
    check_files: bool = True,
    check_images: bool = False,
) -> pd.DataFrame:
    """Read any folder of images with a CSV of scores whose columns the user names.

    Args:
        root: Dataset folder.
        csv_file: Label CSV, relative to ``root`` or absolute.
        image_col: Column with image file names, relative to ``image_dir``.
        mos_col: Column with the scores.
        mos_range: (lowest, highest) possible raw score; values outside are bad labels.
        higher_is_better: False for DMOS-like scores (lower is better), which are flipped.
        group_col: Optional content-group column for the grouped split (empty -> the image).
        split_col: Optional column with train/val/test (also training/validation/valid/testing)
            used instead of a seeded split.
        image_dir: Image folder, relative to ``root`` or absolute (default ``root``).
        name: Dataset name stored in ``df.attrs["dataset"]``.
        delimiter: CSV delimiter; default sniffed from the header (comma, tab or semicolon).
        split_seed: Seed of the grouped random split.
        fractions: (train, val, test) fractions of groups.
        on_error: ``"raise"`` or ``"skip"``.
        check_files: Check that every image exists (no decoding).
        check_images: An empty, unreadable or truncated image file is a bad row (:mod:`.image_check`).

    Returns:
        The common table; every other CSV column is kept as an extra (as text), unless its
        name clashes with a common column.

    Raises:
        DatasetError: See :mod:`iqa_ray.data.datasets`.
        ValueError: If ``mos_range`` is not two finite numbers with lowest < highest.
    """
    try:
        layout = Layout(name=name, label_files=(str(csv_file),), image_col=image_col, score_col=mos_col,
                        score_range=mos_range, higher_is_better=higher_is_better, group_col=group_col,
                        split_col=split_col, keep_other_columns=True, delimiter=delimiter,
                        expected=f"the label CSV {csv_file}")
    except ValueError as exc:
        raise ValueError(str(exc).replace(f"{name}: score_range", "mos_range")) from None
    return read_layout(layout, root, split_seed=split_seed, fractions=fractions, on_error=on_error,
                       check_files=check_files, check_images=check_images, image_dir=image_dir)
