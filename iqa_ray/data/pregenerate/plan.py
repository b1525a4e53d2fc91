"""Planning a pre-generation on the driver: the references of the source, each photo's crop boxes, the
split by photo group, one crop task per box (``--sample`` keeps a fraction) and the work units."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from iqa_ray.core.errors import DatasetError
from iqa_ray.data.pregenerate.config import PregenConfig
from iqa_ray.data.sources import (
    ReferenceInfo,
    embedded_references,
    folder_references,
    hf_disk_references,
    hf_hub_references,
    load_reference,
)
from iqa_ray.data.splits import assign_group_splits

__all__ = [
    "CropTask", "crop_grid", "draw_split", "list_references", "make_tasks", "make_units", "plan_boxes",
    "reference_size", "sample_tasks", "scaled_size",
]


@dataclass(frozen=True)
class CropTask:
    """One reference crop to generate: the unit of randomness (its own seeded rng)."""

    ref_index: int
    crop_id: str
    box: tuple[int, int, int, int]  # left, top, right, bottom in the scaled photo
    split: str


def list_references(config: PregenConfig) -> tuple[list[ReferenceInfo], list[dict[str, str]]]:
    """References of the configured source, plus files that could not even be listed."""
    if config.source == "embedded":
        refs, failed = embedded_references(), []
    elif config.source == "folder":
        refs, failed = folder_references(config.source_path)
    elif config.source == "hf_disk":
        refs, failed = hf_disk_references(config.source_path, split=config.hf_split,
                                          image_column=config.image_column, limit=config.limit), []
    else:
        refs, failed = hf_hub_references(config.source_path, split=config.hf_split or "train",
                                         image_column=config.image_column, limit=config.limit), []
    if config.limit is not None:
        refs = refs[: config.limit]
    return refs, failed


def scaled_size(width: int, height: int, max_short_side: int) -> tuple[int, int]:
    """Size after downscaling so the short side is at most ``max_short_side`` (never upscaled)."""
    short = min(width, height)
    if short <= max_short_side:
        return width, height
    factor = max_short_side / short
    return max(1, round(width * factor)), max(1, round(height * factor))


def crop_grid(width: int, height: int, crop: int, max_crops: int) -> list[tuple[int, int, int, int]]:
    """Non-overlapping ``crop`` x ``crop`` boxes centred on the image, at most ``max_crops``.

    When more fit, an evenly spaced subset (in raster order) is kept, so the crops still cover
    the whole photo rather than one corner.
    """
    nx, ny = width // crop, height // crop
    if nx == 0 or ny == 0:
        return []
    x0, y0 = (width - nx * crop) // 2, (height - ny * crop) // 2
    boxes = [(x0 + i * crop, y0 + j * crop, x0 + (i + 1) * crop, y0 + (j + 1) * crop) for j in range(ny) for i in range(nx)]
    if len(boxes) > max_crops:
        keep = np.linspace(0, len(boxes) - 1, max_crops).round().astype(int)
        boxes = [boxes[k] for k in keep]
    return boxes


def reference_size(ref: ReferenceInfo) -> tuple[int, int]:
    """Width and height of a reference, decoding it only when the listing did not know them."""
    if ref.width and ref.height:
        return ref.width, ref.height
    image = load_reference(ref)
    return int(image.shape[1]), int(image.shape[0])


def plan_boxes(
    refs: Sequence[ReferenceInfo], config: PregenConfig
) -> tuple[dict[int, list[tuple[int, int, int, int]]], list[dict[str, str]]]:
    """Crop boxes of every usable reference, and the references rejected while planning.

    A reference is rejected (with its path and reason) when its header cannot be read or it is
    smaller than one crop.
    """
    rejected: list[dict[str, str]] = []
    boxes_by_ref: dict[int, list[tuple[int, int, int, int]]] = {}
    for i, ref in enumerate(refs):
        try:
            w, h = scaled_size(*reference_size(ref), config.max_short_side)
        except DatasetError as exc:
            rejected.append({"path": ref.locator, "error": str(exc)})
            continue
        boxes = crop_grid(w, h, config.crop_size, config.max_crops_per_photo)
        if not boxes:
            rejected.append({
                "path": ref.locator,
                "error": f"image {w}x{h} is smaller than the crop size {config.crop_size}x{config.crop_size}",
            })
            continue
        boxes_by_ref[i] = boxes
    return boxes_by_ref, rejected


def draw_split(refs: Sequence[ReferenceInfo], usable: Iterable[int], config: PregenConfig) -> dict[str, str]:
    """The split of every photo group among the ``usable`` references (indices into ``refs``).

    Deterministic for (groups, grey flags, ``split_fractions``, ``seed``); ``config.sample`` plays
    no part, so a sampled run has the split of the full one.
    """
    # Stratified by grey vs colour so every split holds both kinds of photo (colour-only
    # distortions, e.g. saturation, then appear in every split).
    strata = {refs[i].group: ("grey" if refs[i].grey else "colour") for i in usable}
    return assign_group_splits(strata, config.split_fractions, config.seed, strata=strata)


def make_tasks(
    refs: Sequence[ReferenceInfo],
    boxes_by_ref: dict[int, list[tuple[int, int, int, int]]],
    config: PregenConfig,
    split_of_group: dict[str, str] | None = None,
) -> tuple[list[CropTask], dict[str, str]]:
    """Turn every box into a crop task, in the split of its photo's group.

    Args:
        refs: the listed references.
        boxes_by_ref: crop boxes of each usable reference (by index into ``refs``).
        config: the generation config.
        split_of_group: the split already drawn (:func:`draw_split`); by default it is drawn over
            the references of ``boxes_by_ref``. ``config.sample`` is not applied here.

    Returns:
        The crop tasks and the split of each group.
    """
    if split_of_group is None:
        split_of_group = draw_split(refs, boxes_by_ref, config)
    tasks = [
        CropTask(ref_index=i, crop_id=f"{refs[i].key}@{box[0]},{box[1]}", box=box, split=split_of_group[refs[i].group])
        for i, boxes in sorted(boxes_by_ref.items())
        for box in boxes
    ]
    return tasks, split_of_group


def sample_tasks(tasks: list[CropTask], fraction: float, seed: int) -> list[CropTask]:
    """Keep ``fraction`` of the crops of each split (at least one per split), in original order."""
    rng = np.random.default_rng([seed, 1])
    keep: set[int] = set()
    for split in ("train", "val", "test"):
        idx = [i for i, t in enumerate(tasks) if t.split == split]
        if idx:
            n = max(1, math.ceil(fraction * len(idx)))
            keep.update(rng.choice(idx, size=n, replace=False).tolist())
    return [t for i, t in enumerate(tasks) if i in keep]


def make_units(tasks: Sequence[CropTask], crops_per_unit: int) -> list[list[CropTask]]:
    """Group crop tasks into work units of at most ``crops_per_unit`` crops of one photo."""
    by_ref: dict[int, list[CropTask]] = {}
    for task in tasks:
        by_ref.setdefault(task.ref_index, []).append(task)
    units = []
    for ref_tasks in by_ref.values():
        for start in range(0, len(ref_tasks), crops_per_unit):
            units.append(ref_tasks[start : start + crops_per_unit])
    return units
