"""The real-dataset registry: every adapter by name (``koniq10k``, ``kadid10k``, ``spaq``, ``livec``,
``agiqa3k``, ``csv`` and the layouts registered at run time), their aliases, and
:func:`load_iqa_dataset`, the one entry point that reads a dataset by name.

Importing this module registers the built-in layouts and loads the user's plug-ins
(``IQA_RAY_PLUGINS``), in every process that imports the adapters.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import pandas as pd

from iqa_ray.core.errors import DatasetError
from iqa_ray.core.plugins import load_plugins
from iqa_ray.data.datasets.agiqa3k import AGIQA3K, load_agiqa3k
from iqa_ray.data.datasets.generic_csv import load_csv_dataset
from iqa_ray.data.datasets.kadid10k import load_kadid10k
from iqa_ray.data.datasets.koniq10k import load_koniq10k
from iqa_ray.data.datasets.layout import Layout, read_layout
from iqa_ray.data.datasets.livec import load_livec
from iqa_ray.data.datasets.spaq import load_spaq
from iqa_ray.data.datasets.table import REAL_FRACTIONS, check_on_error
from iqa_ray.data.splits import validate_fractions

__all__ = [
    "ADAPTERS", "ALIASES", "BUILT_IN_LAYOUTS", "load_iqa_dataset", "register_layout", "resolve_dataset_name",
    "unregister_layout",
]

#: The layouts that ship with iqa-ray (registered as adapters below).
BUILT_IN_LAYOUTS = (AGIQA3K,)

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
    """Make a declared layout (:class:`~iqa_ray.data.datasets.layout.Layout`) an adapter: ``<name>:ROOT``
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
    check_images: bool = False,
    **kwargs: Any,
) -> pd.DataFrame:
    """Load a real IQA dataset by name into the common table (see :mod:`iqa_ray.data.datasets`).

    Args:
        name: One of ``ADAPTERS`` (``koniq10k``, ``kadid10k``, ``spaq``, ``livec``, ``agiqa3k``,
            ``csv``) or an alias (``koniq``, ``kadid-10k``, ``clive``, ``agiqa-3k``, ...).
        root: Dataset folder in the layout of the original download.
        split_seed: Seed of the grouped random split (unused with an official split).
        fractions: (train, val, test) fractions of the seeded split.
        on_error: ``"raise"`` (default) or ``"skip"`` bad rows.
        check_files: Check that every listed image exists (no decoding).
        check_images: An empty, unreadable or truncated image file is a bad row (:mod:`.image_check`).
        **kwargs: Adapter-specific options (``image_dir``, ``label_file``, ``mos_column``,
            ``drop_training_images``, the generic adapter's column names, ...).

    Returns:
        The common table with ``attrs`` filled in.

    Raises:
        ValueError: Unknown name, invalid ``on_error`` or invalid ``fractions``.
        DatasetError: Missing or malformed data (see :mod:`iqa_ray.data.datasets`).
    """
    check_on_error(on_error)
    validate_fractions(fractions)
    adapter = ADAPTERS[resolve_dataset_name(name)]
    if adapter is load_csv_dataset and not {"csv_file", "image_col", "mos_col", "mos_range"} <= set(kwargs):
        # the generic adapter reads any table, so it has to be told which: a bare `csv:ROOT` spec cannot say
        raise DatasetError(f"the generic csv adapter needs its label file, column names and score range "
                           f"(csv_file, image_col, mos_col, mos_range), which a '{name}:{root}' spec cannot give; "
                           "declare the table as a Layout and register it (docs/DATA.md, a few lines of data), "
                           "or call iqa_ray.data.datasets.load_csv_dataset with them")
    return adapter(
        root,
        split_seed=split_seed,
        fractions=fractions,
        on_error=on_error,
        check_files=check_files,
        check_images=check_images,
        **kwargs,
    )


for _layout in BUILT_IN_LAYOUTS:
    if _layout.name not in ADAPTERS:  # AGIQA-3K keeps its documented wrapper, load_agiqa3k
        register_layout(_layout)
load_plugins()  # the user's layouts (IQA_RAY_PLUGINS), in every process that imports the adapters
