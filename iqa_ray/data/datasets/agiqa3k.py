"""AGIQA-3K (Li et al., IEEE TCSVT 2023): AI-generated images with perception MOS, a declared layout.

Layout (paths relative to the ``root`` given by the user): ``data.csv`` (``name, prompt, adj1, adj2,
style, mos_quality, std_quality, mos_align, std_align``) and the images in ``AGIQA-3K/`` (the folder of
the official archive) or ``images/``. Rows are grouped by ``prompt`` because one prompt is rendered by
several generators (and settings) into images of similar content. The released ``mos_quality`` values
lie roughly between 0.1 and 4.5 on the nominal 0-5 scale of its subjective study; ``std_quality``,
``mos_align`` and ``std_align`` are kept raw.
"""

from __future__ import annotations

import os
from typing import Sequence

import pandas as pd

from iqa_ray.data.datasets.layout import Layout, read_layout
from iqa_ray.data.datasets.table import REAL_FRACTIONS

__all__ = ["AGIQA3K", "load_agiqa3k"]


def _generator(name: str) -> str:
    """AGIQA-3K file names start with the generator and its setting (``sd1.5_...``, ``midjourney_...``)."""
    return name.split("_", 1)[0] if "_" in name else ""


#: AGIQA-3K (Li et al., IEEE TCSVT 2023): AI-generated images with a perceptual-quality MOS on 0-5
#: (``mos_quality``); one prompt is rendered by several generators into images of similar content,
#: so rows are grouped by ``prompt``.
AGIQA3K = Layout(
    name="agiqa3k",
    label_files=("data.csv",),
    image_dirs=("AGIQA-3K", "AGIQA-3k", "AGIQA3K", "images"),
    image_col="name",
    score_col="mos_quality",
    score_range=(0.0, 5.0),
    score_scale="AGIQA-3K mos_quality 0-5 -> mos_quality*20",
    group_col="prompt",
    keep_group=True,
    derived=(("generator", _generator),),
    text_columns=("adj1", "adj2", "style"),
    number_columns=("std_quality", "mos_align", "std_align"),
    expected="data.csv and AGIQA-3K/",
)


def load_agiqa3k(
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
    """Read AGIQA-3K (Li et al., IEEE TCSVT 2023), AI-generated images with perception MOS: the
    declared layout :data:`AGIQA3K` read by :func:`~iqa_ray.data.datasets.layout.read_layout`.

    The score is ``mos_quality`` (perceptual quality); the split is seeded and grouped by
    ``prompt``. Extras: ``prompt``, ``generator`` (file-name prefix, e.g. ``sd1.5``), ``adj1``,
    ``adj2``, ``style``, ``std_quality``, ``mos_align`` and ``std_align``.
    """
    return read_layout(AGIQA3K, root, split_seed=split_seed, fractions=fractions, on_error=on_error,
                       check_files=check_files, check_images=check_images, image_dir=image_dir,
                       label_file=label_file)
