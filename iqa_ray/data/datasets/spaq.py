"""SPAQ (Fang et al., CVPR 2020), smartphone photos, read from its original download.

Layout (paths relative to the ``root`` given by the user): ``TestImage/00001.jpg`` ... and the label
sheet ``MOS and Image attribute scores.xlsx`` (``Image name, MOS, Brightness, Colorfulness, Contrast,
Noisiness, Sharpness``), looked for in ``Annotations/`` and in the root. A CSV export with the same
base name and columns (``MOS and Image attribute scores.csv``) is preferred because reading ``.xlsx``
needs the optional ``openpyxl`` package. The split is seeded, one group per image.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import pandas as pd

from iqa_ray.data.datasets.label_files import (
    dataset_root,
    find_image_dir,
    find_label_file,
    float_or_nan,
    read_csv,
    read_excel,
)
from iqa_ray.data.datasets.table import REAL_FRACTIONS, Row, Spec, build_table

__all__ = ["SPAQ_LABEL_DIRS", "SPAQ_LABEL_STEM", "load_spaq"]

SPAQ_LABEL_STEM = "MOS and Image attribute scores"
SPAQ_LABEL_DIRS = ("Annotations", ".")


def load_spaq(
    root: str | os.PathLike[str],
    *,
    split_seed: int = 0,
    fractions: Sequence[float] = REAL_FRACTIONS,
    on_error: str = "raise",
    check_files: bool = True,
    check_images: bool = False,
    image_dir: str | os.PathLike[str] | None = None,
    label_file: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Read SPAQ (Fang et al., CVPR 2020) from its original download.

    The labels are read from ``MOS and Image attribute scores.csv`` (a CSV export of the
    official sheet) when it exists, else from the ``.xlsx`` with :func:`pandas.read_excel`,
    which needs ``openpyxl``. Both are looked for in ``Annotations/`` and in ``root``.

    Args:
        root: Folder with ``TestImage/`` and the label sheet.
        split_seed: Seed of the random split (one group per image).
        fractions: (train, val, test) fractions.
        on_error: ``"raise"`` or ``"skip"``.
        check_files: Check that every image exists (no decoding).
        check_images: An empty, unreadable or truncated image file is a bad row (:mod:`.image_check`).
        image_dir: Image folder, relative to ``root`` or absolute (default ``TestImage``); useful
            for a resized copy.
        label_file: Label file (``.csv`` or ``.xlsx``), relative to ``root`` or absolute.

    Returns:
        The common table; extras ``brightness``, ``colorfulness``, ``contrast``, ``noisiness``
        and ``sharpness`` (0-100) when present.

    Raises:
        DatasetError: See :mod:`iqa_ray.data.datasets`; also when only the ``.xlsx`` exists and openpyxl
            is missing.
    """
    dataset = "spaq"
    root_p = dataset_root(root, dataset, f"TestImage/ and Annotations/{SPAQ_LABEL_STEM}.xlsx")
    candidates = [
        Path(os.path.normpath(root_p / d / f"{SPAQ_LABEL_STEM}{ext}"))
        for ext in (".csv", ".xlsx")
        for d in SPAQ_LABEL_DIRS
    ]
    label = find_label_file(root_p, dataset, label_file, candidates)
    images = find_image_dir(root_p, dataset, image_dir, ("TestImage",), check_files)
    attributes = ["Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"]
    if label.suffix.lower() in (".xlsx", ".xls"):
        table = read_excel(label, f"{label.stem}.csv", ["Image name", "MOS"] + attributes)
    else:
        table = read_csv(label)
    cols = table.require(["Image name", "MOS"], attributes)
    rows = []
    for loc, values in table.rows:
        extras = {a.lower(): float_or_nan(values[cols[a]]) for a in attributes if a in cols}
        rows.append(Row(loc, values[cols["Image name"]], values[cols["MOS"]], extras))
    spec = Spec(
        dataset=dataset,
        root=root_p,
        image_dir=images,
        label_file=label,
        mos_label="MOS",
        mos_range=(0.0, 100.0),
        mos_scale="SPAQ MOS 0-100 used as is",
        extra_columns=tuple(a.lower() for a in attributes),
    )
    return build_table(
        spec, rows, split_seed=split_seed, fractions=fractions, on_error=on_error, check_files=check_files,
        check_images=check_images,
    )
