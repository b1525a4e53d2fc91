"""Resolve a dataset name (``--dataset``) to one labelled table.

Accepted forms:

``livec``
    The human-rated photos that ship with the repository (:data:`BUNDLED`): 627 LIVE Challenge
    photos with their MOS in ``datasets/livec/``, read by the ``livec`` adapter.
``embedded``
    The default pre-generated dataset over the embedded photos (generated on first use, in
    this process, into :func:`iqa_ray.core.paths.default_data_dir`; a few seconds on 2 cores).
``/path/to/generated/folder``
    Any folder written by ``launch/pregenerate.py`` (it holds ``manifest.json``).
``<adapter>:<root>``
    A real IQA dataset on disk, e.g. ``koniq10k:/data/koniq10k`` or ``kadid10k:~/kadid10k``;
    see :mod:`iqa_ray.data.datasets` for the adapters and their layouts.

Every form yields the same columns: ``image_id``, ``split``, ``mos`` (0-100, higher is
better), ``group`` and either ``image`` (encoded bytes) or ``path``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from iqa_ray.core.errors import DatasetError
from iqa_ray.core.paths import bundled_datasets_dir, default_data_dir
from iqa_ray.data.labels import DEFAULT_LABEL, LABELS
from iqa_ray.data.pregenerate.config import PregenConfig
from iqa_ray.data.pregenerate.run import pregenerate
from iqa_ray.data.pregenerate.store import open_generated, read_shards

EMBEDDED = "embedded"
#: Short names of the datasets that ship with the repository: name -> (adapter, folder under ``datasets/``).
BUNDLED = {"livec": ("livec", "livec")}


def describe_valid_specs() -> str:
    from iqa_ray.data.datasets.registry import ADAPTERS

    return (f"'{EMBEDDED}', {', '.join(repr(n) for n in BUNDLED)} (in the repository's datasets/), a folder made by "
            f"launch/pregenerate.py, or '<adapter>:<root>' with adapter in {sorted(ADAPTERS)}")


def resolve_spec(spec: str) -> str:
    """``spec`` with a bundled dataset's short name (:data:`BUNDLED`) written out as ``<adapter>:<its folder>``;
    any other spec as it is.

    Raises:
        DatasetError: a bundled dataset whose folder is missing (an installed package without the
            repository's ``datasets/``); the message says where it was looked for.
    """
    if spec not in BUNDLED:
        return spec
    adapter, folder = BUNDLED[spec]
    root = bundled_datasets_dir() / folder
    if not root.is_dir():
        raise DatasetError(f"dataset {spec!r} ships with the repository, in {root}, which does not exist here (an "
                           f"installed package without the clone, or IQA_RAY_BUNDLED pointing elsewhere); clone the "
                           f"repository or pass '{adapter}:<root>' with a copy of the dataset")
    return f"{adapter}:{root}"


def generated_table(path: str | os.PathLike[str], *, label: str = DEFAULT_LABEL) -> pd.DataFrame:
    """Rows of a pre-generated dataset with ``mos`` taken from the chosen label column."""
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; valid: {', '.join(LABELS)}")
    ds = open_generated(path)
    table = read_shards(ds).to_pandas()
    table["mos"] = table[f"mos_{label}"]
    table.attrs.update({"dataset": ds.manifest["name"], "label": label, "root": str(ds.path),
                        "mos_scale": ds.manifest["labels"][f"mos_{label}"], "split_source": "by source photo"})
    return table


def ensure_embedded(data_dir: str | os.PathLike[str] | None = None, *, engine: str = "local",
                    progress: Any = None) -> Path:
    """Path of the default embedded dataset, generating it first if it does not exist yet."""
    ds = pregenerate(PregenConfig(), Path(data_dir) if data_dir else default_data_dir(), engine=engine,
                     progress=progress)
    return ds.path


def load_table(
    spec: str,
    *,
    label: str = DEFAULT_LABEL,
    data_dir: str | os.PathLike[str] | None = None,
    split_seed: int = 0,
    on_error: str = "raise",
    split_fractions: tuple[float, float, float] | None = None,
    check_images: bool = False,
) -> pd.DataFrame:
    """The labelled table named by ``spec`` (see the module docstring for the forms).

    ``split_seed`` and ``split_fractions`` (``None``: the adapter's default) shape the seeded
    split of real datasets; pre-generated data has its own split by source photo. ``on_error``
    and ``check_images`` apply to real datasets (:func:`~iqa_ray.data.datasets.registry.load_iqa_dataset`:
    every bad row raised in one error, or skipped); pre-generated images were written by iqa-ray.

    Raises:
        DatasetError: ``spec`` names nothing usable; the message lists the valid forms.
    """
    if spec == EMBEDDED:
        return generated_table(ensure_embedded(data_dir), label=label)
    spec = resolve_spec(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "manifest.json").exists():
            return generated_table(path, label=label)
        raise DatasetError(f"{path} is a folder but not a pre-generated dataset (no manifest.json); "
                           f"valid: {describe_valid_specs()}")
    if ":" in spec:
        from iqa_ray.data.datasets.registry import load_iqa_dataset

        name, root = spec.split(":", 1)
        extra = {"fractions": tuple(split_fractions)} if split_fractions is not None else {}
        table = load_iqa_dataset(name, Path(root).expanduser(), split_seed=split_seed, on_error=on_error,
                                 check_images=check_images, **extra)
        table.attrs.setdefault("label", "mos")
        return table
    raise DatasetError(f"unknown dataset {spec!r}; valid: {describe_valid_specs()}")
