"""Adapters that read real IQA datasets, in the layouts of their original downloads, into one table.

Every adapter returns a :class:`pandas.DataFrame` with one row per image and these columns:

==========  =============================================================================
column      meaning
==========  =============================================================================
image_id    str, unique: the file name relative to the image folder (``/`` separators)
path        str, absolute path of the image file
mos         float, the score normalised to 0-100 where higher is better (table below)
mos_raw     float, the score exactly as in the label file
split       ``"train"``, ``"val"`` or ``"test"``
group       str, content group used for splitting (the image itself when there is none)
...         dataset-specific extras (``distortion``, ``level``, ``ref_img``, ``prompt``, ...)
==========  =============================================================================

``df.attrs`` holds ``dataset`` (canonical name), ``mos_scale`` (text of the mapping to 0-100),
``split_source`` (``"official"`` when the split comes from the data files, otherwise
``"seeded-random(seed=S, fractions=(a, b, c))"``), ``skipped`` (list of dicts with ``file``,
``row``, ``line``, ``image`` and ``reason`` for each skipped row), ``root``, ``image_dir``,
``label_file`` and ``n_rows_read``.

Layouts read (paths relative to the ``root`` given by the user)
---------------------------------------------------------------
KonIQ-10k (``koniq10k``)
    ``1024x768/*.jpg`` (or ``512x384/*.jpg``, the official half-size download; ``image_dir``
    overrides), ``koniq10k_scores_and_distributions.csv`` (``image_name, c1..c5, c_total, MOS,
    SD, MOS_zscore``; MOS on 1-5) and, optionally, ``koniq10k_distributions_sets.csv`` from the
    KonIQ GitHub repository (``image_name, c1..c5, c_total, MOS, SD, set`` with ``set`` in
    training/validation/test). Labels come from the scores file and only ``set`` is taken from
    the sets file, because the sets file's ``MOS`` column is on the 0-100 scale (it equals
    ``MOS_zscore``), not 1-5. When only the sets file exists its 0-100 ``MOS`` is used as is.
KADID-10k (``kadid10k``)
    ``images/I01_01_01.png`` ... (distorted, ``I<ref>_<type>_<level>``) and ``images/I01.png``
    ... (references), ``dmos.csv`` (``dist_img, ref_img, dmos, var``). Despite its name
    ``dmos`` is a mean opinion score on 1-5 where higher is better.
SPAQ (``spaq``)
    ``TestImage/00001.jpg`` ... and the label sheet ``MOS and Image attribute scores.xlsx``
    (``Image name, MOS, Brightness, Colorfulness, Contrast, Noisiness, Sharpness``), looked for
    in ``Annotations/`` and in the root. A CSV export with the same base name and columns
    (``MOS and Image attribute scores.csv``) is preferred because reading ``.xlsx`` needs the
    optional ``openpyxl`` package.
LIVE Challenge (``livec``)
    ``Images/*.bmp|*.JPG``, ``Images/trainingImages/t1.bmp`` ... ``t7.bmp``,
    ``Data/AllImages_release.mat`` (cell array of 1169 file names), ``Data/AllMOS_release.mat``
    (1x1169 MOS) and optionally ``Data/AllStdDev_release.mat``. A ``ChallengeDB_release/``
    folder directly under root is entered automatically. Users who converted the labels may
    instead provide ``livec.csv`` (``image, mos``) in the root or in ``Data/``. The first 7
    entries of the ``.mat`` files are the 7 images the authors used to train their raters
    (``trainingImages/t1.bmp``..``t7.bmp``); as in common practice (1162 test images) they are
    dropped by default (``drop_training_images=False`` keeps them). In a CSV they are recognised
    by name (``t1`` ... ``t7``, optionally under ``trainingImages/``).
AGIQA-3K (``agiqa3k``)
    ``data.csv`` (``name, prompt, adj1, adj2, style, mos_quality, std_quality, mos_align,
    std_align``) and the images in ``AGIQA-3K/`` (the folder of the official archive) or
    ``images/``. Rows are grouped by ``prompt`` because one prompt is rendered by several
    generators (and settings) into images of similar content.
Generic CSV (``csv``)
    Any folder with a CSV whose column names the user gives (``image_col``, ``mos_col``,
    optional ``group_col`` and ``split_col``) together with the raw MOS range and direction.

Normalisation to 0-100 (higher is better)
-----------------------------------------
=============  ====================  ===========================  =============================
dataset        label column          raw range (checked)          mapping to ``mos``
=============  ====================  ===========================  =============================
koniq10k       ``MOS`` (default)     1-5                          ``(MOS - 1) / 4 * 100``
koniq10k       ``MOS_zscore``        0-100                        as is
koniq10k       sets-file ``MOS``     0-100                        as is (only sets file present)
kadid10k       ``dmos``              1-5                          ``(dmos - 1) / 4 * 100``
spaq           ``MOS``               0-100                        as is
livec          ``AllMOS_release``    0-100                        as is
agiqa3k        ``mos_quality``       0-5                          ``mos_quality * 20``
csv            ``mos_col``           ``mos_range=(lo, hi)``       ``(x - lo) / (hi - lo) * 100``,
                                                                  or ``(hi - x) / (hi - lo) * 100``
                                                                  when ``higher_is_better=False``
=============  ====================  ===========================  =============================

A raw value outside its range is treated as a bad label (usually the wrong column or file).
AGIQA-3K's released ``mos_quality`` values lie roughly between 0.1 and 4.5 on the nominal 0-5
scale of its subjective study; ``std_quality``, ``mos_align`` and ``std_align`` are kept raw.

Splits
------
KonIQ-10k's official split is used when ``koniq10k_distributions_sets.csv`` is present (and
``use_official_split`` is true) and the generic adapter uses ``split_col`` when given; everything
else gets a seeded split grouped by ``group`` (:func:`seeded_group_split`): whole groups go to
one split, so no reference image (KADID-10k) or prompt (AGIQA-3K) is in two splits.

Errors
------
Problems raise :class:`~iqa_ray.core.errors.DatasetError` naming the file, the row and what is
valid. Row problems (a MOS that is empty, not a number or out of range, a duplicated image name,
a missing image file, an unknown split value) can instead be skipped with ``on_error="skip"``:
they are listed in ``df.attrs["skipped"]`` and a warning gives their number. For a duplicated
name the first row is kept. Structural problems (missing root, label file, image folder or
columns, unreadable files, nothing left to load) always raise. Images are not decoded here.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from iqa_ray.core.errors import DatasetError
from iqa_ray.core.plugins import load_plugins
from iqa_ray.data.label_table import (
    REAL_FRACTIONS,
    Loc,
    Row,
    Spec,
    build_table,
    check_on_error,
    dataset_root,
    find_image_dir,
    find_label_file,
    float_or_nan,
    read_csv,
    read_excel,
    under,
)
from iqa_ray.data.layouts import AGIQA3K, BUILT_IN_LAYOUTS, Layout, read_layout
from iqa_ray.data.splits import validate_fractions

__all__ = [
    "ADAPTERS", "ALIASES", "KADID_DISTORTIONS", "load_agiqa3k", "load_csv_dataset", "load_iqa_dataset",
    "load_kadid10k", "load_koniq10k", "load_livec", "load_spaq", "register_layout", "resolve_dataset_name",
    "unregister_layout",
]

# KADID-10k distortion types, numbered as in the file names (Lin, Hosu, Saupe, QoMEX 2019).
KADID_DISTORTIONS = {
    1: "gaussian blur",
    2: "lens blur",
    3: "motion blur",
    4: "color diffusion",
    5: "color shift",
    6: "color quantization",
    7: "color saturation 1",
    8: "color saturation 2",
    9: "jpeg2000",
    10: "jpeg",
    11: "white noise",
    12: "white noise in color component",
    13: "impulse noise",
    14: "multiplicative noise",
    15: "denoise",
    16: "brighten",
    17: "darken",
    18: "mean shift",
    19: "jitter",
    20: "non-eccentricity patch",
    21: "pixelate",
    22: "quantization",
    23: "color block",
    24: "high sharpen",
    25: "contrast change",
}

KONIQ_SCORES_FILE = "koniq10k_scores_and_distributions.csv"
KONIQ_SETS_FILE = "koniq10k_distributions_sets.csv"
KONIQ_IMAGE_DIRS = ("1024x768", "512x384")
KADID_LABEL_FILE = "dmos.csv"
SPAQ_LABEL_STEM = "MOS and Image attribute scores"
SPAQ_LABEL_DIRS = ("Annotations", ".")
LIVEC_NAMES_FILE = "AllImages_release.mat"
LIVEC_MOS_FILE = "AllMOS_release.mat"
LIVEC_STD_FILE = "AllStdDev_release.mat"
LIVEC_CSV_FILE = "livec.csv"
LIVEC_N_TRAINING = 7

_KADID_NAME = re.compile(r"^I(\d+)_(\d+)_(\d+)\.[A-Za-z0-9]+$")
_LIVEC_TRAINING_NAME = re.compile(r"^(?:trainingimages/)?t[1-7]\.[a-z]+$")


# --------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------


def load_koniq10k(
    root: str | os.PathLike[str],
    *,
    split_seed: int = 0,
    fractions: Sequence[float] = REAL_FRACTIONS,
    on_error: str = "raise",
    check_files: bool = True,
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
        on_error: ``"raise"`` or ``"skip"`` (see the module docstring).
        check_files: Check that every image file exists (no decoding).
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
        DatasetError: See the module docstring.
    """
    dataset = "koniq10k"
    root_p = dataset_root(root, dataset, f"{KONIQ_IMAGE_DIRS[0]}/ and {KONIQ_SCORES_FILE}")
    if mos_column not in ("MOS", "MOS_zscore"):
        raise ValueError(f"mos_column must be 'MOS' or 'MOS_zscore', got {mos_column!r}")
    scores_path = under(root_p, label_file) if label_file is not None else root_p / KONIQ_SCORES_FILE
    sets_path = under(root_p, sets_file) if sets_file is not None else root_p / KONIQ_SETS_FILE
    if label_file is not None and not scores_path.is_file():
        raise DatasetError(f"{dataset}: label file {scores_path} (from label_file) does not exist")
    if sets_file is not None and not sets_path.is_file():
        raise DatasetError(f"{dataset}: split file {sets_path} (from sets_file) does not exist")

    have_scores = scores_path.is_file()
    have_sets = sets_path.is_file()
    if not have_scores and not have_sets:
        raise DatasetError(
            f"{dataset}: label file not found; expected {scores_path} (or the official split file "
            f"{sets_path}, whose MOS is on 0-100)"
        )
    images = find_image_dir(root_p, dataset, image_dir, KONIQ_IMAGE_DIRS, check_files)
    official = use_official_split and have_sets
    split_of: dict[str, tuple[str, Loc]] = {}
    if have_sets and (official or not have_scores):
        sets = read_csv(sets_path)
        scols = sets.require(
            ["image_name", "set"] + ([] if have_scores else ["MOS"]),
            [] if have_scores else ["SD", "c1", "c2", "c3", "c4", "c5", "c_total"],
        )
        for loc, values in sets.rows:
            name = values[scols["image_name"]].strip()
            if name and name not in split_of:
                split_of[name] = (values[scols["set"]], loc)

    if have_scores:
        table = read_csv(scores_path)
        cols = table.require(
            ["image_name", mos_column], ["SD", "MOS_zscore", "c1", "c2", "c3", "c4", "c5", "c_total"]
        )
        if mos_column == "MOS":
            mos_range, scale = (1.0, 5.0), "KonIQ-10k MOS 1-5 -> (MOS-1)/4*100"
        else:
            mos_range, scale = (0.0, 100.0), "KonIQ-10k MOS_zscore (0-100) used as is"
        mos_col = cols[mos_column]
    else:
        table = sets
        cols = scols
        mos_range, scale = (0.0, 100.0), "KonIQ-10k sets-file MOS (0-100, equals MOS_zscore) used as is"
        mos_col = cols["MOS"]

    extra_names = {"SD": "sd", "MOS_zscore": "mos_zscore", **{f"c{k}": f"c{k}" for k in range(1, 6)}}
    extra_names["c_total"] = "c_total"
    rows = []
    for loc, values in table.rows:
        name = values[cols["image_name"]]
        extras = {
            out: float_or_nan(values[cols[col]])
            for col, out in extra_names.items()
            if col in cols and not (col == "MOS_zscore" and mos_column == "MOS_zscore")
        }
        row = Row(loc, name, values[mos_col], extras)
        if official:
            entry = split_of.get(name.strip())
            if entry is None:
                row.error = f"not listed in the official split file {sets_path}; every image needs a 'set'"
            else:
                row.split = entry[0]
        rows.append(row)

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
        extra_columns=tuple(extra_names.values()),
        attrs={"split_file": str(sets_path) if official else None},
    )
    return build_table(
        spec, rows, split_seed=split_seed, fractions=fractions, on_error=on_error, check_files=check_files
    )


def load_kadid10k(
    root: str | os.PathLike[str],
    *,
    split_seed: int = 0,
    fractions: Sequence[float] = REAL_FRACTIONS,
    on_error: str = "raise",
    check_files: bool = True,
    image_dir: str | os.PathLike[str] | None = None,
    label_file: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Read KADID-10k (Lin, Hosu, Saupe, QoMEX 2019) from its original download.

    The split is seeded and grouped by reference image (``ref_img``), so all 125 distorted
    versions of one reference land in the same split.

    Args:
        root: Folder with ``images/`` and ``dmos.csv``.
        split_seed: Seed of the grouped random split.
        fractions: (train, val, test) fractions of reference images.
        on_error: ``"raise"`` or ``"skip"``.
        check_files: Check that every distorted image exists (no decoding).
        image_dir: Image folder, relative to ``root`` or absolute (default ``images``).
        label_file: Label CSV (default ``dmos.csv``).

    Returns:
        The common table; extras ``ref_img``, ``ref_path``, ``distortion`` (type number 1-25),
        ``distortion_name``, ``level`` (1-5) and ``var``.

    Raises:
        DatasetError: See the module docstring.
    """
    dataset = "kadid10k"
    root_p = dataset_root(root, dataset, f"images/ and {KADID_LABEL_FILE}")
    label = find_label_file(root_p, dataset, label_file, [root_p / KADID_LABEL_FILE])
    images = find_image_dir(root_p, dataset, image_dir, ("images",), check_files)
    table = read_csv(label)
    cols = table.require(["dist_img", "ref_img", "dmos"], ["var"])
    rows = []
    for loc, values in table.rows:
        name = values[cols["dist_img"]].strip()
        ref = values[cols["ref_img"]].strip()
        extras: dict[str, Any] = {"ref_img": ref, "distortion": -1, "distortion_name": "", "level": -1}
        row = Row(loc, name, values[cols["dmos"]], extras)
        match = _KADID_NAME.match(os.path.basename(name))
        if match is None:
            row.error = (
                "file name does not follow the KADID-10k pattern I<ref>_<type>_<level>.png "
                "(e.g. I01_03_05.png)"
            )
        else:
            kind, level = int(match.group(2)), int(match.group(3))
            extras["distortion"] = kind
            extras["distortion_name"] = KADID_DISTORTIONS.get(kind, f"type {kind}")
            extras["level"] = level
            if not ref:
                ref = f"I{match.group(1)}{os.path.splitext(name)[1]}"
                extras["ref_img"] = ref
        extras["ref_path"] = os.path.abspath(os.path.join(images, ref)) if ref else ""
        if "var" in cols:
            extras["var"] = float_or_nan(values[cols["var"]])
        row.group = ref
        rows.append(row)
    spec = Spec(
        dataset=dataset,
        root=root_p,
        image_dir=images,
        label_file=label,
        mos_label="dmos",
        mos_range=(1.0, 5.0),
        mos_scale="KADID-10k dmos 1-5 (a MOS, higher is better) -> (dmos-1)/4*100",
        extra_columns=("ref_img", "ref_path", "distortion", "distortion_name", "level", "var"),
        attrs={"group_by": "ref_img"},
    )
    frame = build_table(
        spec, rows, split_seed=split_seed, fractions=fractions, on_error=on_error, check_files=check_files
    )
    frame["distortion"] = frame["distortion"].astype("int64")
    frame["level"] = frame["level"].astype("int64")
    return frame


def load_spaq(
    root: str | os.PathLike[str],
    *,
    split_seed: int = 0,
    fractions: Sequence[float] = REAL_FRACTIONS,
    on_error: str = "raise",
    check_files: bool = True,
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
        image_dir: Image folder, relative to ``root`` or absolute (default ``TestImage``); useful
            for a resized copy.
        label_file: Label file (``.csv`` or ``.xlsx``), relative to ``root`` or absolute.

    Returns:
        The common table; extras ``brightness``, ``colorfulness``, ``contrast``, ``noisiness``
        and ``sharpness`` (0-100) when present.

    Raises:
        DatasetError: See the module docstring; also when only the ``.xlsx`` exists and openpyxl
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
        spec, rows, split_seed=split_seed, fractions=fractions, on_error=on_error, check_files=check_files
    )


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


def load_livec(
    root: str | os.PathLike[str],
    *,
    split_seed: int = 0,
    fractions: Sequence[float] = REAL_FRACTIONS,
    on_error: str = "raise",
    check_files: bool = True,
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
        image_dir: Image folder, relative to ``root`` or absolute (default ``Images``).
        label_file: A ``.csv`` with ``image``, ``mos`` to use instead of the ``.mat`` files.
        drop_training_images: Drop the 7 rater-training images (first 7 ``.mat`` entries,
            ``t1``..``t7`` in a CSV), leaving the 1162 images used in the literature.

    Returns:
        The common table; extra ``mos_std`` (raw, 0-100 scale) when the std file is present.

    Raises:
        DatasetError: See the module docstring.
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

    rows: list[Row] = []
    dropped: list[str] = []
    if use_csv:
        label = find_label_file(root_p, dataset, label_file, csv_candidates)
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
        mos_label = "mos"
    else:
        for path in (names_path, mos_path):
            if not path.is_file():
                raise DatasetError(f"{dataset}: label file not found; expected {path}")
        label = mos_path
        names = [_mat_string(x) for x in _mat_variable(names_path, "AllImages_release").reshape(-1)]
        mos = _mat_variable(mos_path, "AllMOS_release").reshape(-1)
        if len(names) != len(mos):
            raise DatasetError(
                f"{dataset}: {names_path} lists {len(names)} images but {mos_path} has {len(mos)} "
                "scores; the two files must have one entry per image, in the same order"
            )
        std_path = root_p / "Data" / LIVEC_STD_FILE
        std = None
        if std_path.is_file():
            std = _mat_variable(std_path, "AllStdDev_release").reshape(-1)
            if len(std) != len(names):
                std = None
        for i, (name, value) in enumerate(zip(names, mos)):
            if drop_training_images and i < LIVEC_N_TRAINING:
                dropped.append(name)
                continue
            loc = Loc(mos_path, i + 1, None, "entry", f" (image names from {names_path.name})")
            extras = {"mos_std": float(std[i])} if std is not None else {}
            rows.append(Row(loc, name, value, extras, rel_path=_livec_image_path(images, name)))
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
        spec, rows, split_seed=split_seed, fractions=fractions, on_error=on_error, check_files=check_files
    )


def load_agiqa3k(
    root: str | os.PathLike[str],
    *,
    split_seed: int = 0,
    fractions: Sequence[float] = REAL_FRACTIONS,
    on_error: str = "raise",
    check_files: bool = True,
    image_dir: str | os.PathLike[str] | None = None,
    label_file: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Read AGIQA-3K (Li et al., IEEE TCSVT 2023), AI-generated images with perception MOS: the
    declared layout :data:`iqa_ray.data.layouts.AGIQA3K` read by :func:`~iqa_ray.data.layouts.read_layout`.

    The score is ``mos_quality`` (perceptual quality); the split is seeded and grouped by
    ``prompt``. Extras: ``prompt``, ``generator`` (file-name prefix, e.g. ``sd1.5``), ``adj1``,
    ``adj2``, ``style``, ``std_quality``, ``mos_align`` and ``std_align``.
    """
    return read_layout(AGIQA3K, root, split_seed=split_seed, fractions=fractions, on_error=on_error,
                       check_files=check_files, image_dir=image_dir, label_file=label_file)


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

    Returns:
        The common table; every other CSV column is kept as an extra (as text), unless its
        name clashes with a common column.

    Raises:
        DatasetError: See the module docstring.
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
                       check_files=check_files, image_dir=image_dir)


# --------------------------------------------------------------------------------------------
# Registry and entry point
# --------------------------------------------------------------------------------------------

ADAPTERS: dict[str, Callable[..., pd.DataFrame]] = {
    "koniq10k": load_koniq10k,
    "kadid10k": load_kadid10k,
    "spaq": load_spaq,
    "livec": load_livec,
    "agiqa3k": load_agiqa3k,
    "csv": load_csv_dataset,
}

ALIASES: dict[str, str] = {
    "koniq": "koniq10k",
    "koniq-10k": "koniq10k",
    "koniq_10k": "koniq10k",
    "kadid": "kadid10k",
    "kadid-10k": "kadid10k",
    "kadid_10k": "kadid10k",
    "live_challenge": "livec",
    "live-challenge": "livec",
    "livechallenge": "livec",
    "live_wild": "livec",
    "clive": "livec",
    "agiqa-3k": "agiqa3k",
    "agiqa_3k": "agiqa3k",
    "agiqa": "agiqa3k",
    "generic": "csv",
}


def register_layout(layout: Layout, *, aliases: Sequence[str] = ()) -> None:
    """Make a declared layout (:class:`~iqa_ray.data.layouts.Layout`) an adapter: ``<name>:ROOT``
    then works wherever a dataset spec does (``--dataset``, ``dataset = ...``, evaluation).

    Raises:
        ValueError: the name or an alias is taken.
    """
    names = [layout.name.lower(), *(a.lower() for a in aliases)]
    taken = [n for n in names if n in ADAPTERS or n in ALIASES]
    if taken:
        raise ValueError(f"dataset names {taken} are already registered; registered: {sorted(ADAPTERS)} "
                         f"(aliases: {sorted(ALIASES)})")
    ADAPTERS[names[0]] = functools.partial(read_layout, layout)
    ALIASES.update({alias: names[0] for alias in names[1:]})


def unregister_layout(name: str) -> None:
    """Remove a registered layout and its aliases (for tests and temporary plug-ins)."""
    key = resolve_dataset_name(name)
    adapter = ADAPTERS[key]
    if not isinstance(adapter, functools.partial) or adapter.func is not read_layout:
        raise ValueError(f"{key!r} is a built-in adapter, not a registered layout")
    del ADAPTERS[key]
    for alias in [a for a, target in ALIASES.items() if target == key]:
        del ALIASES[alias]


def resolve_dataset_name(name: str) -> str:
    """Canonical registry name for ``name`` or one of its aliases (case-insensitive).

    Raises:
        ValueError: If the name is unknown; the message lists the valid names and aliases.
    """
    key = str(name).strip().lower()
    if key in ADAPTERS:
        return key
    if key in ALIASES:
        return ALIASES[key]
    raise ValueError(
        f"unknown dataset {name!r}; valid names are {sorted(ADAPTERS)} "
        f"(aliases: {', '.join(f'{a}->{c}' for a, c in sorted(ALIASES.items()))})"
    )


def load_iqa_dataset(
    name: str,
    root: str | os.PathLike[str],
    *,
    split_seed: int = 0,
    fractions: Sequence[float] = REAL_FRACTIONS,
    on_error: str = "raise",
    check_files: bool = True,
    **kwargs: Any,
) -> pd.DataFrame:
    """Load a real IQA dataset by name into the common table (see the module docstring).

    Args:
        name: One of ``ADAPTERS`` (``koniq10k``, ``kadid10k``, ``spaq``, ``livec``, ``agiqa3k``,
            ``csv``) or an alias (``koniq``, ``kadid-10k``, ``clive``, ``agiqa-3k``, ...).
        root: Dataset folder in the layout of the original download.
        split_seed: Seed of the grouped random split (unused with an official split).
        fractions: (train, val, test) fractions of the seeded split.
        on_error: ``"raise"`` (default) or ``"skip"`` bad rows.
        check_files: Check that every listed image exists (no decoding).
        **kwargs: Adapter-specific options (``image_dir``, ``label_file``, ``mos_column``,
            ``drop_training_images``, the generic adapter's column names, ...).

    Returns:
        The common table with ``attrs`` filled in.

    Raises:
        ValueError: Unknown name, invalid ``on_error`` or invalid ``fractions``.
        DatasetError: Missing or malformed data (see the module docstring).
    """
    check_on_error(on_error)
    validate_fractions(fractions)
    adapter = ADAPTERS[resolve_dataset_name(name)]
    return adapter(
        root,
        split_seed=split_seed,
        fractions=fractions,
        on_error=on_error,
        check_files=check_files,
        **kwargs,
    )


for _layout in BUILT_IN_LAYOUTS:
    if _layout.name not in ADAPTERS:  # AGIQA-3K keeps its documented wrapper, load_agiqa3k
        register_layout(_layout)
load_plugins()  # the user's layouts (IQA_RAY_PLUGINS), in every process that imports the adapters
