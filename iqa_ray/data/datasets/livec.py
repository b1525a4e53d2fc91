"""The LIVE In the Wild Image Quality Challenge database (Ghadiyaram and Bovik, TIP 2016), read from
its original release.

Layout (paths relative to the ``root`` given by the user): ``Images/*.bmp|*.JPG``,
``Images/trainingImages/t1.bmp`` ... ``t7.bmp``, ``Data/AllImages_release.mat`` (cell array of 1169 file
names), ``Data/AllMOS_release.mat`` (1x1169 MOS, 0-100) and optionally ``Data/AllStdDev_release.mat``. A
``ChallengeDB_release/`` folder directly under root is entered automatically. Users who converted the
labels may instead provide ``livec.csv`` (``image, mos``) in the root or in ``Data/``. The first 7
entries of the ``.mat`` files are the 7 images the authors used to train their raters
(``trainingImages/t1.bmp``..``t7.bmp``); as in common practice (1162 test images) they are dropped by
default (``drop_training_images=False`` keeps them). In a CSV they are recognised by name (``t1`` ...
``t7``, optionally under ``trainingImages/``). The split is seeded, one group per image.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from iqa_ray.core.errors import DatasetError
from iqa_ray.data.datasets.label_files import Loc, dataset_root, find_image_dir, find_label_file, float_or_nan, read_csv
from iqa_ray.data.datasets.table import REAL_FRACTIONS, Row, Spec, build_table

__all__ = [
    "LIVEC_CSV_FILE", "LIVEC_MOS_FILE", "LIVEC_NAMES_FILE", "LIVEC_N_TRAINING", "LIVEC_STD_FILE", "load_livec",
]

LIVEC_NAMES_FILE = "AllImages_release.mat"
LIVEC_MOS_FILE = "AllMOS_release.mat"
LIVEC_STD_FILE = "AllStdDev_release.mat"
LIVEC_CSV_FILE = "livec.csv"
LIVEC_N_TRAINING = 7

_LIVEC_TRAINING_NAME = re.compile(r"^(?:trainingimages/)?t[1-7]\.[a-z]+$")


def load_livec(
    root: str | os.PathLike[str],
    *,
    split_seed: int = 0,
    fractions: Sequence[float] = REAL_FRACTIONS,
    on_error: str = "raise",
    check_files: bool = True,
    check_images: bool = False,
    image_dir: str | os.PathLike[str] | None = None,
    label_file: str | os.PathLike[str] | None = None,
    drop_training_images: bool = True,
) -> pd.DataFrame:
    """Read the LIVE In the Wild Image Quality Challenge database (Ghadiyaram and Bovik, TIP 2016).

    Labels come from ``Data/AllImages_release.mat`` and ``Data/AllMOS_release.mat`` (and
    ``Data/AllStdDev_release.mat`` when present); without them from ``livec.csv`` (columns
    ``image``, ``mos``) in ``root`` or ``Data/``.

    Args:
        root: ``ChallengeDB_release`` folder (or its parent) with ``Images/`` and ``Data/``.
        split_seed: Seed of the random split (one group per image).
        fractions: (train, val, test) fractions.
        on_error: ``"raise"`` or ``"skip"``.
        check_files: Check that every image exists (no decoding).
        check_images: An empty, unreadable or truncated image file is a bad row (:mod:`.image_check`).
        image_dir: Image folder, relative to ``root`` or absolute (default ``Images``).
        label_file: A ``.csv`` with ``image``, ``mos`` to use instead of the ``.mat`` files.
        drop_training_images: Drop the 7 rater-training images (first 7 ``.mat`` entries,
            ``t1``..``t7`` in a CSV), leaving the 1162 images used in the literature.

    Returns:
        The common table; extra ``mos_std`` (raw, 0-100 scale) when the std file is present.

    Raises:
        DatasetError: See :mod:`iqa_ray.data.datasets`.
    """
    dataset = "livec"
    root_p = dataset_root(root, dataset, "Images/ and Data/AllMOS_release.mat (or livec.csv)")
    nested = root_p / "ChallengeDB_release"
    if not (root_p / "Data").is_dir() and not (root_p / LIVEC_CSV_FILE).is_file() and nested.is_dir():
        root_p = nested
    names_path = root_p / "Data" / LIVEC_NAMES_FILE
    mos_path = root_p / "Data" / LIVEC_MOS_FILE
    use_csv = label_file is not None or not (names_path.is_file() or mos_path.is_file())
    csv_candidates = [root_p / LIVEC_CSV_FILE, root_p / "Data" / LIVEC_CSV_FILE]
    if use_csv and label_file is None and not any(p.is_file() for p in csv_candidates):
        raise DatasetError(
            f"{dataset}: label files not found; expected {names_path} and {mos_path} "
            f"(original release) or a converted {csv_candidates[0]} with columns ['image', 'mos']"
        )
    images = find_image_dir(root_p, dataset, image_dir, ("Images",), check_files)

    if use_csv:
        label = find_label_file(root_p, dataset, label_file, csv_candidates)
        rows, dropped = _csv_rows(label, images, drop_training_images)
        mos_label = "mos"
    else:
        for path in (names_path, mos_path):
            if not path.is_file():
                raise DatasetError(f"{dataset}: label file not found; expected {path}")
        label = mos_path
        rows, dropped = _mat_rows(root_p / "Data", images, drop_training_images)
        mos_label = "AllMOS_release"
    spec = Spec(
        dataset=dataset,
        root=root_p,
        image_dir=images,
        label_file=label,
        mos_label=mos_label,
        mos_range=(0.0, 100.0),
        mos_scale="LIVE Challenge MOS 0-100 used as is",
        extra_columns=("mos_std",),
        attrs={"dropped_training_images": dropped},
    )
    return build_table(
        spec, rows, split_seed=split_seed, fractions=fractions, on_error=on_error, check_files=check_files,
        check_images=check_images,
    )


def _csv_rows(label: Path, images: Path, drop_training_images: bool) -> tuple[list[Row], list[str]]:
    """The rows of a converted ``livec.csv`` (``image``, ``mos``, optional ``std``) and the names of
    the rater-training images dropped."""
    rows: list[Row] = []
    dropped: list[str] = []
    table = read_csv(label)
    cols = table.require(["image", "mos"], ["std"])
    for loc, values in table.rows:
        name = values[cols["image"]].strip().replace("\\", "/")
        if drop_training_images and _LIVEC_TRAINING_NAME.match(name.lower()):
            dropped.append(name)
            continue
        extras = {"mos_std": float_or_nan(values[cols["std"]])} if "std" in cols else {}
        rel = _livec_image_path(images, name)
        rows.append(Row(loc, name, values[cols["mos"]], extras, rel_path=rel))
    return rows, dropped


def _mat_rows(data: Path, images: Path, drop_training_images: bool) -> tuple[list[Row], list[str]]:
    """The rows of the original ``.mat`` files in ``data`` (names, MOS and, when it matches them, the
    standard deviation) and the names of the rater-training images dropped (the first 7 entries)."""
    dataset = "livec"
    names_path, mos_path = data / LIVEC_NAMES_FILE, data / LIVEC_MOS_FILE
    names = [_mat_string(x) for x in _mat_variable(names_path, "AllImages_release").reshape(-1)]
    mos = _mat_variable(mos_path, "AllMOS_release").reshape(-1)
    if len(names) != len(mos):
        raise DatasetError(
            f"{dataset}: {names_path} lists {len(names)} images but {mos_path} has {len(mos)} "
            "scores; the two files must have one entry per image, in the same order"
        )
    std_path = data / LIVEC_STD_FILE
    std = None
    if std_path.is_file():
        std = _mat_variable(std_path, "AllStdDev_release").reshape(-1)
        if len(std) != len(names):
            std = None
    rows: list[Row] = []
    dropped: list[str] = []
    for i, (name, value) in enumerate(zip(names, mos)):
        if drop_training_images and i < LIVEC_N_TRAINING:
            dropped.append(name)
            continue
        loc = Loc(mos_path, i + 1, None, "entry", f" (image names from {names_path.name})")
        extras = {"mos_std": float(std[i])} if std is not None else {}
        rows.append(Row(loc, name, value, extras, rel_path=_livec_image_path(images, name)))
    return rows, dropped


def _mat_variable(path: Path, name: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        content = loadmat(str(path))
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes a DatasetError
        raise DatasetError(f"{path}: cannot read the MATLAB file ({type(exc).__name__}: {exc})") from exc
    if name not in content:
        found = sorted(k for k in content if not k.startswith("__"))
        raise DatasetError(f"{path}: expected a variable named {name!r}, found {found}")
    return np.asarray(content[name])


def _mat_string(item: Any) -> str:
    """Unwrap a MATLAB cell entry (nested 1-element arrays) to a string."""
    while isinstance(item, np.ndarray):
        if item.size == 0:
            return ""
        if item.dtype.kind in ("U", "S") and item.size == 1:
            item = item.reshape(-1)[0]
            break
        if item.dtype.kind in ("U", "S"):
            return "".join(str(c) for c in item.reshape(-1))
        item = item.reshape(-1)[0]
    if isinstance(item, bytes):
        return item.decode("utf-8", "replace")
    return str(item)


def _livec_image_path(image_root: Path, name: str) -> str | None:
    """Where a LIVE Challenge image lives relative to ``Images/`` (training images are in a subfolder)."""
    if "/" in name or (image_root / name).exists():
        return None
    if (image_root / "trainingImages" / name).exists():
        return f"trainingImages/{name}"
    return None
