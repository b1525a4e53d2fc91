"""KADID-10k (Lin, Hosu, Saupe, QoMEX 2019), read from its original download.

Layout (paths relative to the ``root`` given by the user): ``images/I01_01_01.png`` ... (distorted,
``I<ref>_<type>_<level>``) and ``images/I01.png`` ... (references), ``dmos.csv`` (``dist_img, ref_img,
dmos, var``). Despite its name ``dmos`` is a mean opinion score on 1-5 where higher is better.

The split is seeded and grouped by reference image, so no reference is in two splits.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import pandas as pd

from iqa_ray.data.datasets.label_files import dataset_root, find_image_dir, find_label_file, float_or_nan, read_csv
from iqa_ray.data.datasets.table import REAL_FRACTIONS, Row, Spec, build_table

__all__ = ["KADID_DISTORTIONS", "KADID_LABEL_FILE", "load_kadid10k"]

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

KADID_LABEL_FILE = "dmos.csv"

_KADID_NAME = re.compile(r"^I(\d+)_(\d+)_(\d+)\.[A-Za-z0-9]+$")


def load_kadid10k(
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
    """Read KADID-10k (Lin, Hosu, Saupe, QoMEX 2019) from its original download.

    The split is seeded and grouped by reference image (``ref_img``), so all 125 distorted
    versions of one reference land in the same split.

    Args:
        root: Folder with ``images/`` and ``dmos.csv``.
        split_seed: Seed of the grouped random split.
        fractions: (train, val, test) fractions of reference images.
        on_error: ``"raise"`` or ``"skip"``.
        check_files: Check that every distorted image exists (no decoding).
        check_images: An empty, unreadable or truncated image file is a bad row (:mod:`.image_check`).
        image_dir: Image folder, relative to ``root`` or absolute (default ``images``).
        label_file: Label CSV (default ``dmos.csv``).

    Returns:
        The common table; extras ``ref_img``, ``ref_path``, ``distortion`` (type number 1-25),
        ``distortion_name``, ``level`` (1-5) and ``var``.

    Raises:
        DatasetError: See :mod:`iqa_ray.data.datasets`.
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
            row.error = "file name does not follow the KADID-10k pattern I<ref>_<type>_<level>.png (e.g. I01_03_05.png)"
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
    frame = build_table(spec, rows, split_seed=split_seed, fractions=fractions, on_error=on_error,
                        check_files=check_files, check_images=check_images)
    frame["distortion"] = frame["distortion"].astype("int64")
    frame["level"] = frame["level"].astype("int64")
    return frame
