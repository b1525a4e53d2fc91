"""Datasets declared as data: a :class:`Layout` says where a dataset's label table and images are
and what its columns mean; :func:`read_layout` turns any layout into the common table through the
shared builder (:func:`iqa_ray.data.datasets.table.build_table`), with the same checks and messages as
every adapter. IQA toolboxes keep a meta file per dataset; a layout is that, with the score's range
and direction, the content group and the split column written down once.

A dataset whose labels are one table (CSV, or Excel when ``openpyxl`` is installed) beside its
images needs a layout and nothing else: register it (:func:`iqa_ray.data.datasets.registry.register_layout`)
and ``<name>:ROOT`` works wherever a dataset spec does (AGIQA-3K is declared this way, in
:mod:`iqa_ray.data.datasets.agiqa3k`). Datasets with labels spread over several files or stored in
MATLAB files (KonIQ-10k's split file, LIVE Challenge's ``.mat`` files, KADID-10k's names that encode
the reference and distortion) keep small adapters, one module each in :mod:`iqa_ray.data.datasets`,
on the same builder.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from iqa_ray.core.errors import DatasetError
from iqa_ray.data.datasets.label_files import (
    dataset_root,
    find_image_dir,
    find_label_file,
    float_or_nan,
    read_csv,
    under,
)
from iqa_ray.data.datasets.table import BASE_COLUMNS, REAL_FRACTIONS, Row, Spec, build_table

__all__ = ["Layout", "read_layout"]


@dataclass(frozen=True)
class Layout:
    """Where a dataset's labels and images are and what the label columns mean.

    Attributes:
        name: the adapter name (``<name>:ROOT``).
        label_files: candidate label files relative to the root, the first that exists is read.
        image_dirs: candidate image folders relative to the root (``"."``: the root itself).
        image_col: the column of image file names, relative to the image folder.
        score_col: the column of scores.
        score_range: the lowest and highest possible raw score; values outside are bad labels.
        higher_is_better: ``False`` for DMOS-like scores, which are flipped onto 0-100.
        group_col: the content-group column (whole groups go to one split; empty: the image).
        split_col: a column of train / val / test (also training, validation, valid, testing)
            used instead of a seeded split.
        text_columns: optional columns kept as text extras (stripped).
        number_columns: optional columns kept as float extras (``NaN`` where not a number).
        derived: extras computed from the image name, ``(column, function of the name)``.
        keep_other_columns: keep every column not used above as a text extra, as written.
        keep_group: keep the group column as an extra under its own name too.
        score_scale: the mapping to 0-100 in words (``df.attrs["mos_scale"]``); default: derived
            from the range and direction.
        delimiter: the label file's delimiter (default: sniffed: comma, tab or semicolon).
        expected: what the root should hold, in words, for the message when it does not exist.
    """

    name: str
    label_files: tuple[str, ...]
    image_col: str
    score_col: str
    score_range: tuple[float, float]
    image_dirs: tuple[str, ...] = (".",)
    higher_is_better: bool = True
    group_col: str | None = None
    split_col: str | None = None
    text_columns: tuple[str, ...] = ()
    number_columns: tuple[str, ...] = ()
    derived: tuple[tuple[str, Callable[[str], Any]], ...] = ()
    keep_other_columns: bool = False
    keep_group: bool = False
    score_scale: str | None = None
    delimiter: str | None = None
    expected: str | None = None

    def __post_init__(self) -> None:
        try:
            lo, hi = (float(v) for v in self.score_range)
        except (TypeError, ValueError):  # not two numbers (None, one number, three, text)
            raise ValueError(f"{self.name}: score_range must be (lowest, highest), got {self.score_range!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"{self.name}: score_range must be two finite numbers with lowest < highest, "
                             f"got {self.score_range!r}")
        object.__setattr__(self, "score_range", (lo, hi))
        if not self.label_files:
            raise ValueError(f"{self.name}: a layout needs at least one label file")

    def describe_scale(self) -> str:
        lo, hi = self.score_range
        if self.score_scale:
            return self.score_scale
        direction = "higher is better" if self.higher_is_better else "lower is better"
        mapping = "(x-lo)/(hi-lo)*100" if self.higher_is_better else "(hi-x)/(hi-lo)*100"
        return f"{self.score_col} {lo:g}-{hi:g} ({direction}) -> {mapping} with lo={lo:g}, hi={hi:g}"


def read_layout(
    layout: Layout,
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
    """Read a dataset laid out as ``layout`` says into the common table.

    Args:
        layout: the dataset's layout.
        root: the dataset folder.
        split_seed: seed of the grouped random split (unused with a split column).
        fractions: (train, val, test) fractions of groups.
        on_error: ``"raise"`` or ``"skip"`` bad rows.
        check_files: check that every image exists (no decoding).
        check_images: An empty, unreadable or truncated image file is a bad row (:mod:`.image_check`).
        image_dir: image folder, relative to ``root`` or absolute (overrides the layout's).
        label_file: label file, relative to ``root`` or absolute (overrides the layout's).

    Raises:
        DatasetError: see :mod:`iqa_ray.data.datasets`.
    """
    name = layout.name
    root_p = dataset_root(root, name, layout.expected or f"{' or '.join(layout.label_files)} and the images")
    label = find_label_file(root_p, name, label_file, [under(root_p, f) for f in layout.label_files])
    if layout.image_dirs == (".",) and image_dir is None:
        images = root_p
    elif layout.image_dirs == (".",):
        images = under(root_p, image_dir)
        if check_files and not images.is_dir():
            raise DatasetError(f"{name}: image folder {images} (from image_dir) does not exist")
    else:
        images = find_image_dir(root_p, name, image_dir, layout.image_dirs, check_files)
    table = read_csv(label, layout.delimiter)
    given = [c for c in (layout.group_col, layout.split_col) if c]
    optional = [*layout.text_columns, *layout.number_columns]
    cols = table.require([layout.image_col, layout.score_col, *given], optional)
    used = set(cols.values())
    rows = []
    for loc, values in table.rows:
        image = values[cols[layout.image_col]]
        extras: dict[str, Any] = {}
        if layout.keep_group and layout.group_col:
            extras[layout.group_col] = values[cols[layout.group_col]].strip()
        for column, function in layout.derived:
            extras[column] = function(image.strip())
        for column in layout.text_columns:
            if column in cols:
                extras[column] = values[cols[column]].strip()
        for column in layout.number_columns:
            if column in cols:
                extras[column] = float_or_nan(values[cols[column]])
        if layout.keep_other_columns:
            extras.update({c: v for c, v in values.items() if c not in used and c not in BASE_COLUMNS and c})
        row = Row(loc, image, values[cols[layout.score_col]], extras)
        if layout.group_col:
            row.group = values[cols[layout.group_col]]
        if layout.split_col:
            row.split = values[cols[layout.split_col]]
        rows.append(row)
    spec = Spec(
        dataset=name, root=root_p, image_dir=Path(images), label_file=label,
        mos_label=layout.score_col, mos_range=layout.score_range,
        mos_scale=layout.describe_scale(),
        higher_is_better=layout.higher_is_better,
        official_split=bool(layout.split_col),
        split_column=repr(layout.split_col) if layout.split_col else "split",
        extra_columns=tuple(rows[-1].extras) if rows else (),
        attrs={"group_by": layout.group_col, "split_column": layout.split_col},
    )
    return build_table(spec, rows, split_seed=split_seed, fractions=fractions, on_error=on_error,
                       check_files=check_files, check_images=check_images)
