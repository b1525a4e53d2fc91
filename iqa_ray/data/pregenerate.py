"""Pre-generation: references -> distorted versions -> parquet shards, once, on Ray Data.

Distorting images on the fly repeats the same work every epoch of every trial; the seeds'
users split generation from training (seed 003) and so do we. A generated dataset is a folder::

    <out>/<source>-<strength>-<hash>/
        manifest.json           generating config + hash, references with licences, split,
                                severity table, shard list, schema, git revision
        processing_stats.json   processed, failed (with path and error), per-type counts,
                                elapsed, images/s
        shards/shard-00000.parquet ...   one row per image (PNG bytes + labels)

How it runs. The driver lists the references and plans the work: each photo is scaled so
its short side is at most ``max_short_side``, cut into a grid of non-overlapping
``crop_size`` crops, and the crops are grouped into *work units* of a few crops of the same
photo. Ray Data maps a function over the units, one block per unit, across every CPU of the
cluster. A unit decodes its photo once, writes its own shard atomically and returns only a
small stats row, so image bytes never travel back through the driver. Blocks are sized to
units of real work (tens of images) because a block per single image costs more in
scheduling than the work it holds.

Three passes: a *decode check* decodes every photo once, so that corrupt files are left out
before the split by photo is drawn; a *calibration* pass distorts the centre crop of every
*training* photo at a grid of levels for every type and averages the full-reference label,
giving the content-free ``severity`` table (validation and test photos take no part in it, so
nothing about them shapes the labels a model is trained on); the *generation* pass then writes
both labels for every image of every split.

Crash safety. Work happens in ``<out>/.partial-<name>/``. Each shard and its stats sidecar are
written atomically, so a killed run leaves only complete shards, and a re-run with the same
config skips the units already done. The folder is renamed to its final name only after the
manifest is written: a folder without the ``.partial-`` prefix is always complete.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import shutil
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from iqa_ray.core.errors import DatasetError
from iqa_ray.core.io import atomic_path, atomic_write_json, git_revision, stable_hash
from iqa_ray.core.options import Options, require
from iqa_ray.data import distortions as dist
from iqa_ray.data.labels import DEFAULT_LABEL, quality_label
from iqa_ray.data.sources import (
    SOURCE_KINDS,
    ReferenceInfo,
    embedded_references,
    folder_references,
    hf_disk_references,
    hf_hub_references,
    load_reference,
)
from iqa_ray.data.splits import EMBEDDED_FRACTIONS, assign_group_splits, validate_fractions

FORMAT_VERSION = 1
# Version of the labelling recipe, part of the config fingerprint, so that a dataset labelled by
# an older recipe is never reused from the data dir. 2: the severity table is calibrated on the
# training photos only (1 averaged every photo, test photos included).
LABEL_VERSION = 2
CALIBRATION_TYPES_PER_ITEM = 5
# Photos per decode-check item: decoding one photo is too little work for a Ray Data block.
DECODE_CHECKS_PER_ITEM = 8

SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image", pa.binary()),
        ("ref_id", pa.string()),
        ("photo", pa.string()),
        ("group", pa.string()),
        ("split", pa.string()),
        ("distortion", pa.string()),
        ("level", pa.float64()),
        ("parameter", pa.string()),
        ("mos_ssim", pa.float64()),
        ("mos_severity", pa.float64()),
        ("seed", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)


@dataclass(frozen=True)
class PregenConfig(Options):
    """Everything that determines a generated dataset; its hash names the output folder.

    Attributes:
        source: one of ``embedded``, ``folder``, ``hf_disk``, ``hf``.
        source_path: folder or saved-dataset path (``folder``/``hf_disk``) or hub name (``hf``).
        hf_split: split of a Hugging Face dataset.
        image_column: image column of a Hugging Face dataset (default: the first image column).
        limit: use only the first ``limit`` references (Hugging Face sources are large).
        strength: distortion strength preset (``light``, ``medium``, ``heavy``).
        per_image: distorted versions generated per reference crop.
        crop_size: side of the square reference crops, in pixels.
        max_crops_per_photo: at most this many crops per photo (evenly spread), so a huge
            photo does not dominate the set.
        max_short_side: photos are downscaled (never upscaled) so the short side is at most
            this, keeping crops at a similar scale of content across sources.
        distortions: distortion types to draw from; empty means all registered types.
        include_references: also store each pristine crop (label 100).
        split_fractions: train/val/test share of source photos.
        seed: seed of the split, the distortion choice and the distortions themselves.
        sample: fraction of crops to generate (``--sample 0.1`` for a quick run).
        severity_levels: number of levels in the calibration grid of the severity table.
    """

    source: str = "embedded"
    source_path: str | None = None
    hf_split: str | None = None
    image_column: str | None = None
    limit: int | None = None
    strength: str = "medium"
    per_image: int = 5
    crop_size: int = 160
    max_crops_per_photo: int = 9
    max_short_side: int = 512
    distortions: tuple[str, ...] = ()
    include_references: bool = True
    split_fractions: tuple[float, float, float] = EMBEDDED_FRACTIONS
    seed: int = 0
    sample: float = 1.0
    severity_levels: int = 6

    def __post_init__(self) -> None:
        require(self.source in SOURCE_KINDS, f"unknown source {self.source!r}; valid: {', '.join(SOURCE_KINDS)}")
        require(self.source == "embedded" or bool(self.source_path),
                f"source {self.source!r} needs source_path (a folder, saved dataset or hub name)")
        require(self.strength in dist.STRENGTH_PRESETS,
                f"unknown strength {self.strength!r}; valid: {', '.join(dist.STRENGTH_PRESETS)}")
        require(self.per_image >= 1, f"per_image must be >= 1, got {self.per_image}")
        require(self.crop_size >= 32, f"crop_size must be >= 32 pixels, got {self.crop_size}")
        require(self.max_crops_per_photo >= 1, f"max_crops_per_photo must be >= 1, got {self.max_crops_per_photo}")
        require(self.max_short_side >= self.crop_size,
                f"max_short_side ({self.max_short_side}) must be >= crop_size ({self.crop_size})")
        require(0.0 < self.sample <= 1.0, f"sample must be in (0, 1], got {self.sample}")
        require(self.severity_levels >= 3, f"severity_levels must be >= 3, got {self.severity_levels}")
        for name in self.distortions:
            dist.get_distortion(name)  # raises, listing the valid names
        object.__setattr__(self, "distortions", tuple(self.distortions))
        object.__setattr__(self, "split_fractions", validate_fractions(self.split_fractions))

    def distortion_names(self) -> tuple[str, ...]:
        return self.distortions or tuple(dist.DISTORTIONS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CropTask:
    """One reference crop to generate: the unit of randomness (its own seeded rng)."""

    ref_index: int
    crop_id: str
    box: tuple[int, int, int, int]  # left, top, right, bottom in the scaled photo
    split: str


@dataclass
class GeneratedDataset:
    """Handle on a finished dataset folder."""

    path: Path
    manifest: dict[str, Any]
    stats: dict[str, Any]
    reused: bool = False

    @property
    def shard_paths(self) -> list[Path]:
        return [self.path / s["file"] for s in self.manifest["shards"]]


# ----------------------------------------------------------------------------- planning


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


def _sample_tasks(tasks: list[CropTask], fraction: float, seed: int) -> list[CropTask]:
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


# ----------------------------------------------------------------------------- worker side


@functools.lru_cache(maxsize=4)
def _scaled_reference(ref: ReferenceInfo, max_short_side: int) -> np.ndarray:
    """Decode and downscale a photo once per worker process (units of one photo reuse it)."""
    image = load_reference(ref)
    w, h = scaled_size(image.shape[1], image.shape[0], max_short_side)
    if (w, h) != (image.shape[1], image.shape[0]):
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.LANCZOS))
    return image


def _crop(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    left, top, right, bottom = box
    return np.ascontiguousarray(image[top:bottom, left:right])


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of an RGB uint8 array (codec artefacts are stored exactly)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def crop_rng(seed: int, crop_id: str) -> np.random.Generator:
    """The crop's own generator: independent of execution order, worker and unit size."""
    return np.random.default_rng([seed, zlib.crc32(crop_id.encode("utf-8"))])


def allowed_types(config: PregenConfig, grey: bool) -> list[str]:
    """Distortion types that change this reference (colour-only types are skipped on grey photos)."""
    names = [n for n in config.distortion_names() if not (grey and dist.get_distortion(n).needs_color)]
    if not names:
        raise DatasetError(f"no distortion type applies to a grey reference among {config.distortion_names()}")
    return names


def severity_of(table: dict[str, dict[str, list[float]]], name: str, level: float) -> float:
    """Content-free label: the calibration table's mean label for ``name``, interpolated at ``level``.

    Raises:
        DatasetError: ``name`` was not calibrated (no training photo it applies to).
    """
    entry = table.get(name)
    if entry is None:
        raise DatasetError(f"the severity table has no calibration for {name!r} (calibrated: {sorted(table)}): "
                           "no training photo it applies to was calibrated (a colour-only type needs a colour "
                           "photo in the training split); add such photos or leave the type out of distortions")
    return float(np.interp(level, entry["levels"], entry["mos"]))


def _decode_check_unit(unit: dict[str, Any]) -> dict[str, Any]:
    """Decode (and scale) a few photos, doing nothing else: which of them cannot be used.

    Runs before the split is drawn, so a corrupt or truncated photo is left out of it (as it was
    when calibration decoded every photo) instead of taking a split's place with no crops.
    """
    config: PregenConfig = unit["config"]
    failed = []
    for ref in unit["refs"]:
        try:
            _scaled_reference(ref, config.max_short_side)
        except DatasetError as exc:  # corrupt or truncated: reported once, the photo is left out
            failed.append({"path": ref.locator, "error": str(exc)})
    return {"item": unit["item"], "failed": json.dumps(failed)}


def _calibrate_unit(unit: dict[str, Any]) -> dict[str, Any]:
    """Labels of one photo's centre crop at every grid level of some types: a calibration row."""
    config: PregenConfig = unit["config"]
    ref: ReferenceInfo = unit["ref"]
    try:
        image = _scaled_reference(ref, config.max_short_side)
    except DatasetError as exc:  # corrupt or truncated: reported once, the photo is left out
        return {"ref": ref.key, "labels": "{}", "error": json.dumps({"path": ref.locator, "error": str(exc)})}
    h, w = image.shape[:2]
    c = config.crop_size
    box = ((w - c) // 2, (h - c) // 2, (w - c) // 2 + c, (h - c) // 2 + c)
    crop = _crop(image, box)
    levels = np.linspace(0.0, 1.0, config.severity_levels)
    out = {}
    for name in (n for n in allowed_types(config, dist.is_grey(crop)) if n in unit["types"]):
        rng = crop_rng(config.seed, f"calibration:{ref.key}:{name}")
        out[name] = [quality_label(crop, dist.apply_distortion(name, crop, float(lv), rng)) for lv in levels]
    return {"ref": ref.key, "labels": json.dumps(out), "error": ""}


def severity_table(rows: Sequence[dict[str, Any]], config: PregenConfig) -> dict[str, dict[str, list[float]]]:
    """Average the calibration rows (one per training photo and chunk of types) into
    ``{type: {levels, mos, n_photos}}``.

    The mean is made monotone (a running minimum over levels) so that the severity label
    can never rise with level, even where two adjacent grid points tie within noise.
    """
    levels = np.linspace(0.0, 1.0, config.severity_levels)
    per_type: dict[str, list[list[float]]] = {}
    for row in rows:
        for name, labels in json.loads(row["labels"]).items():
            per_type.setdefault(name, []).append(labels)
    table = {}
    for name in config.distortion_names():
        if name not in per_type:
            continue
        mean = np.minimum.accumulate(np.mean(per_type[name], axis=0))
        table[name] = {"levels": levels.round(6).tolist(), "mos": mean.round(4).tolist(), "n_photos": len(per_type[name])}
    return table


def _generate_unit(unit: dict[str, Any]) -> dict[str, Any]:
    """Distort every crop of one work unit, write its shard atomically, return its stats."""
    config: PregenConfig = unit["config"]
    ref: ReferenceInfo = unit["ref"]
    tasks: list[CropTask] = unit["tasks"]
    shard_path = Path(unit["shard_path"])
    stats_path = shard_path.with_suffix(".stats.json")
    table = unit["severity"]
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    try:
        photo = _scaled_reference(ref, config.max_short_side)
    except DatasetError as exc:  # truncated or corrupt: counted and listed, the run goes on
        photo = None
        failed.append({"path": ref.locator, "error": str(exc)})
    if photo is not None:
        lo, hi = dist.STRENGTH_PRESETS[config.strength]
        for task in tasks:
            crop = _crop(photo, task.box)
            rng = crop_rng(config.seed, task.crop_id)
            base = {"ref_id": task.crop_id, "photo": ref.key, "group": ref.group, "split": task.split,
                    "seed": config.seed, "width": crop.shape[1], "height": crop.shape[0]}
            if config.include_references:
                rows.append({**base, "image_id": f"{task.crop_id}|none", "image": encode_png(crop), "distortion": "none",
                             "level": 0.0, "parameter": "", "mos_ssim": 100.0, "mos_severity": 100.0})
            types = allowed_types(config, dist.is_grey(crop))
            chosen = rng.choice(types, size=config.per_image, replace=config.per_image > len(types))
            levels = rng.uniform(lo, hi, size=config.per_image)
            for k, (name, level) in enumerate(zip(chosen.tolist(), levels.tolist())):
                distorted = dist.apply_distortion(name, crop, level, rng)
                rows.append({
                    **base, "image_id": f"{task.crop_id}|{k}:{name}", "image": encode_png(distorted),
                    "distortion": name, "level": float(level),
                    "parameter": dist.get_distortion(name).parameter(level),
                    "mos_ssim": quality_label(crop, distorted),
                    "mos_severity": severity_of(table, name, level),
                })
    table_out = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    with atomic_path(shard_path) as tmp:
        pq.write_table(table_out, tmp)
    per_type: dict[str, int] = {}
    for row in rows:
        per_type[row["distortion"]] = per_type.get(row["distortion"], 0) + 1
    stats = {
        "unit": unit["unit_id"], "file": shard_path.name, "rows": len(rows), "per_type": per_type,
        "per_split": {s: sum(1 for r in rows if r["split"] == s) for s in ("train", "val", "test")},
        "failed": failed, "seconds": time.perf_counter() - start,
    }
    atomic_write_json(stats_path, stats)
    return {"unit": unit["unit_id"], "stats": json.dumps(stats)}


# ----------------------------------------------------------------------------- execution


Mapper = Callable[..., list[dict[str, Any]]]  # (fn, items, tick=None) -> results, in any order; tick(result)


def local_map(fn: Callable[[dict[str, Any]], dict[str, Any]], items: list[dict[str, Any]],
              tick: Callable[[dict[str, Any]], Any] | None = None) -> list[dict[str, Any]]:
    """Run ``fn`` over ``items`` in this process, one after another (the baseline engine);
    ``tick(result)`` after each item."""
    out = []
    for item in items:
        out.append(fn(item))
        if tick is not None:
            tick(out[-1])
    return out


def ray_data_map(fn: Callable[[dict[str, Any]], dict[str, Any]], items: list[dict[str, Any]],
                 tick: Callable[[dict[str, Any]], Any] | None = None) -> list[dict[str, Any]]:
    """Run ``fn`` over ``items`` with Ray Data, one block per item, on every CPU of the cluster.

    Each item is a work unit of tens of images, so a block carries enough work to pay for its
    scheduling. Ray must already be initialised (the launcher decides local vs. ``--address``).
    Results stream back as units finish (``tick(result)`` for each, e.g. to move a progress bar);
    Ray Data's own progress bars and per-operator console logging are off meanwhile (its log
    file keeps them).
    """
    import ray

    from iqa_ray.core.progress import quiet_ray_data

    if not items:
        return []
    if not ray.is_initialized():
        raise RuntimeError("ray_data_map needs ray.init() first (the launcher does it)")
    ctx = ray.data.DataContext.get_current()
    items = list(items)
    saved = ctx.op_resource_reservation_enabled
    # Ray Data reserves part of the cluster per operator for downstream work; a one-operator
    # pipeline has none, and on a 2-CPU node the reservation left one CPU idle for most of the
    # run (measured: 16 half-second units took 5.6 s with it, 4.2 s without; ideal 4.0 s).
    ctx.op_resource_reservation_enabled = False
    try:
        # Blocks carry only an index; the items travel once, inside the function's closure, so
        # Arrow never has to infer a schema for dataclasses.
        ds = ray.data.range(len(items), override_num_blocks=len(items))
        out = []
        with quiet_ray_data():
            for row in ds.map(lambda row: fn(items[row["id"]]), num_cpus=1).iter_rows():
                out.append(row)
                if tick is not None:
                    tick(row)
        return out
    finally:
        ctx.op_resource_reservation_enabled = saved


def dataset_name(config: PregenConfig, fingerprint: str) -> str:
    return f"{config.source}-{config.strength}-{fingerprint}"


def config_fingerprint(config: PregenConfig, refs: Sequence[ReferenceInfo]) -> str:
    """Hash of the config, the reference list (keys and sizes) and the labelling recipe, so changed
    inputs, or labels computed another way, regenerate."""
    return stable_hash({
        "format": FORMAT_VERSION,
        "labels": LABEL_VERSION,
        "config": config.to_dict(),
        "refs": [(r.key, r.width, r.height) for r in refs],
        "distortions": list(config.distortion_names()),
    })


def find_existing(out_dir: str | os.PathLike[str], config: PregenConfig) -> GeneratedDataset | None:
    """A finished dataset for ``config`` under ``out_dir``, if one exists."""
    refs, _ = list_references(config)
    path = Path(out_dir) / dataset_name(config, config_fingerprint(config, refs))
    if (path / "manifest.json").exists():
        return open_generated(path, reused=True)
    return None


def open_generated(path: str | os.PathLike[str], *, reused: bool = False) -> GeneratedDataset:
    """Open a finished dataset folder (one with a manifest)."""
    path = Path(path)
    manifest_file = path / "manifest.json"
    if not manifest_file.exists():
        raise DatasetError(
            f"{path} is not a finished pre-generated dataset (no manifest.json); "
            "run `python launch/pregenerate.py --out DIR` to create one"
        )
    manifest = json.loads(manifest_file.read_text())
    stats = json.loads((path / "processing_stats.json").read_text())
    return GeneratedDataset(path=path, manifest=manifest, stats=stats, reused=reused)


def pregenerate(
    config: PregenConfig,
    out_dir: str | os.PathLike[str],
    *,
    engine: str = "ray",
    crops_per_unit: int = 4,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    progress_bar: bool = False,
) -> GeneratedDataset:
    """Generate (or reuse) the dataset described by ``config`` under ``out_dir``.

    Args:
        config: what to generate.
        out_dir: root folder; the dataset lands in ``out_dir/<source>-<strength>-<hash>``.
        engine: ``"ray"`` (Ray Data over the running cluster; call ``ray.init`` first) or
            ``"local"`` (a plain loop in this process, the benchmark's baseline).
        crops_per_unit: crops per work unit (one Ray Data block each).
        force: regenerate even when a finished dataset with this config exists.
        progress: called with one-line progress messages.
        progress_bar: show one progress bar (stderr) over the run's three passes: checking the
            photos, calibrating the severity table, generating the images.

    Returns:
        The finished dataset.
    """
    say = progress or (lambda _msg: None)
    engine_map: Mapper = {"ray": ray_data_map, "local": local_map}.get(engine)  # type: ignore[assignment]
    if engine_map is None:
        raise ValueError(f"unknown engine {engine!r}; valid: ray, local")
    if crops_per_unit < 1:
        raise ValueError(f"crops_per_unit must be >= 1, got {crops_per_unit}")
    out_dir = Path(out_dir)
    start = time.perf_counter()
    refs, listing_failed = list_references(config)
    name = dataset_name(config, config_fingerprint(config, refs))
    final = out_dir / name
    if (final / "manifest.json").exists() and not force:
        say(f"reusing {final} (same config hash)")
        return open_generated(final, reused=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _generation_lock(out_dir / f".lock-{name}", say):
        # Another process may have finished this dataset while we waited for the lock.
        if (final / "manifest.json").exists() and not force:
            say(f"reusing {final} (same config hash, written by another process)")
            return open_generated(final, reused=True)
        partial = out_dir / f".partial-{name}"
        shards_dir = partial / "shards"
        shards_dir.mkdir(parents=True, exist_ok=True)
        for torn in partial.rglob(".*.tmp"):  # half-written by a killed run; never renamed into place
            torn.unlink()
        with progress_bar_for(progress_bar) as bar:
            if bar is not None:  # messages above the bar, not through it
                say = _above(bar, say)
            return _generate(config, refs, listing_failed, final, partial, shards_dir, crops_per_unit, start,
                             engine, engine_map, bar, say)


@contextlib.contextmanager
def _generation_lock(path: Path, say: Callable[[str], None]) -> Iterator[None]:
    """One process at a time generates a given dataset (two launches, or parallel test workers,
    sharing the dataset cache): the other waits, then reuses the finished folder. Without it, one
    process's clean-up of torn files, or its final rename, pulled the partial folder from under the
    other. The lock is released by the kernel if its holder dies, so a killed run never blocks."""
    import fcntl

    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process generating the same dataset ({path.name})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _above(bar: Any, say: Callable[[str], None]) -> Callable[[str], None]:
    def write(message: str) -> None:
        with bar.external_write_mode():
            say(message)
    return write


@contextlib.contextmanager
def progress_bar_for(show: bool) -> Iterator[Any]:
    """The run's one progress bar (``None`` when not shown)."""
    if not show:
        yield None
        return
    from iqa_ray.core.progress import progress_bar

    with progress_bar(None, "pregenerate") as bar:
        yield bar


def _phase_map(engine_map: Mapper, bar: Any, phase: str, total: int | None = None,
               amount: Callable[[dict[str, Any]], int] = lambda _row: 1) -> Mapper:
    """``engine_map`` moving ``bar`` through one pass: by work item ("task"), or by image when
    ``total`` (images) and ``amount`` (images in a result) are given."""
    def run(fn: Callable[[dict[str, Any]], dict[str, Any]], items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if bar is None:
            return engine_map(fn, items)
        bar.unit = "img" if total is not None else "task"
        bar.set_description(f"pregenerate: {phase}", refresh=False)
        bar.reset(total=len(items) if total is None else total)
        return engine_map(fn, items, lambda row: bar.update(amount(row)))
    return run


def _generate(config: PregenConfig, refs: list[ReferenceInfo], listing_failed: list[dict[str, str]], final: Path,
              partial: Path, shards_dir: Path, crops_per_unit: int, start: float, engine: str, engine_map: Mapper,
              bar: Any, say: Callable[[str], None]) -> GeneratedDataset:
    """:func:`pregenerate` from the planning on, moving ``bar`` (if any) through each pass."""
    name = final.name
    boxes_by_ref, rejected = plan_boxes(refs, config)
    # The split, and the severity table calibrated on its training photos, are computed once per
    # partial folder (always over all photos, also with --sample, so a quick run splits and labels
    # images exactly like a full run) and kept for a resumed run.
    calib_file = partial / "calibration.json"
    if calib_file.exists():
        calibration = json.loads(calib_file.read_text())
    else:
        calibration = _calibrate(refs, boxes_by_ref, config, listing_failed + rejected,
                                 check_map=_phase_map(engine_map, bar, "checking photos"),
                                 calibrate_map=_phase_map(engine_map, bar, "calibrating"))
        atomic_write_json(calib_file, calibration)
    table = calibration["table"]
    rejected += calibration["failed"]
    failed_paths = {f["path"] for f in calibration["failed"]}
    boxes_by_ref = {i: b for i, b in boxes_by_ref.items() if refs[i].locator not in failed_paths}
    # A photo that failed only in calibration (it decoded in the check) is dropped without
    # redrawing the split, which the table was calibrated for.
    kept_groups = {refs[i].group for i in boxes_by_ref}
    split_of_group = {g: s for g, s in calibration["split"].items() if g in kept_groups}
    say(f"severity table calibrated on the {len(calibration['calibrated_on'])} training photos "
        f"of {len(boxes_by_ref)} usable ones")

    all_tasks, split_of_group = make_tasks(refs, boxes_by_ref, config, split_of_group)
    tasks = _sample_tasks(all_tasks, config.sample, config.seed) if config.sample < 1.0 else all_tasks
    used_refs = sorted({t.ref_index for t in tasks})
    say(f"{len(refs)} references, {len(tasks)} crops planned, {len(rejected) + len(listing_failed)} rejected")

    units = make_units(tasks, crops_per_unit)
    items, done_stats = [], []
    for unit_id, unit_tasks in enumerate(units):
        shard = shards_dir / f"shard-{unit_id:05d}.parquet"
        sidecar = shard.with_suffix(".stats.json")
        if shard.exists() and sidecar.exists():  # finished by an earlier, interrupted run
            done_stats.append(json.loads(sidecar.read_text()))
            continue
        items.append({"config": config, "ref": refs[unit_tasks[0].ref_index], "tasks": unit_tasks,
                      "shard_path": str(shard), "unit_id": unit_id, "severity": table})
    if done_stats:
        say(f"resuming: {len(done_stats)} of {len(units)} units already written")
    # Largest units first (a photo's last unit may hold fewer crops): the small ones fill the tail.
    items.sort(key=lambda it: -len(it["tasks"]))
    gen_start = time.perf_counter()
    per_crop = config.per_image + int(config.include_references)
    generate_map = _phase_map(engine_map, bar, "generating", total=per_crop * sum(len(it["tasks"]) for it in items),
                              amount=lambda row: json.loads(row["stats"])["rows"])
    results = generate_map(_generate_unit, items)
    gen_seconds = time.perf_counter() - gen_start
    new_stats = [json.loads(r["stats"]) for r in results]
    unit_stats = sorted(done_stats + new_stats, key=lambda s: s["unit"])
    # Shards from a different plan (e.g. a crash during an older format) must not leak in.
    expected = {f"shard-{i:05d}.parquet" for i in range(len(units))}
    for stray in shards_dir.glob("*.parquet"):
        if stray.name not in expected:
            stray.unlink()

    stats = _summarise(unit_stats, listing_failed + rejected, time.perf_counter() - start, gen_seconds,
                       engine, sum(s["rows"] for s in new_stats))
    manifest = {
        "name": name,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "config_hash": name.rsplit("-", 1)[-1],
        "default_label": DEFAULT_LABEL,
        "labels": {
            "mos_ssim": "100 * clip(SSIM(reference crop, image), 0, 1); content-dependent (iqa_ray.data.labels)",
            "mos_severity": "mean of mos_ssim over the training split's source photos for this distortion type, "
                            "interpolated at this level (severity_table); content-free",
        },
        "severity_table": table,
        # Which photos the table averages: the training split's only, so no validation or test
        # photo shaped any label.
        "calibrated_on": {"split": "train", "photos": calibration["calibrated_on"]},
        "splits": {"by": "source photo group", "fractions": list(config.split_fractions), "seed": config.seed,
                   "groups": dict(sorted(split_of_group.items()))},
        "references": [
            {**refs[i].to_dict(), "split": split_of_group[refs[i].group],
             "crops": sum(1 for t in tasks if t.ref_index == i)}
            for i in used_refs
        ],
        "shards": [{"file": f"shards/{s['file']}", "rows": s["rows"]} for s in unit_stats],
        "schema": {f.name: str(f.type) for f in SHARD_SCHEMA},
        "distortion_types": {n: dist.get_distortion(n).description for n in config.distortion_names()},
        "git_revision": git_revision(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(partial / "processing_stats.json", stats)
    atomic_write_json(partial / "manifest.json", manifest)
    for sidecar in shards_dir.glob("*.stats.json"):
        sidecar.unlink()
    calib_file.unlink()
    if final.exists():  # a forced re-run replaces the old folder only once the new one is complete
        shutil.rmtree(final)
    os.replace(partial, final)
    say(f"wrote {stats['processed']} images to {final} in {stats['elapsed_s']:.1f} s")
    return open_generated(final)


def _calibrate(
    refs: Sequence[ReferenceInfo],
    boxes_by_ref: dict[int, list[tuple[int, int, int, int]]],
    config: PregenConfig,
    problems: Sequence[dict[str, str]],
    *,
    check_map: Mapper,
    calibrate_map: Mapper,
) -> dict[str, Any]:
    """Decode-check every usable photo, draw the split, and calibrate the severity table on the
    training photos only.

    Args:
        refs: the listed references.
        boxes_by_ref: crop boxes of the references that survived planning.
        config: the generation config.
        problems: references rejected so far (listing and planning), for the error message.
        check_map, calibrate_map: the engine (:func:`local_map` or :func:`ray_data_map`) for
            the decode check and for the calibration pass.

    Returns:
        ``{"table": severity table, "failed": [{path, error}, ...] (one per photo),
        "split": {group: split}, "calibrated_on": [keys of the training photos averaged]}``.

    Raises:
        DatasetError: no photo can be used, or none is in the training split.
    """
    usable = sorted(boxes_by_ref)
    batches = [usable[start : start + DECODE_CHECKS_PER_ITEM] for start in range(0, len(usable), DECODE_CHECKS_PER_ITEM)]
    check_items = [{"config": config, "item": k, "refs": [refs[i] for i in batch]} for k, batch in enumerate(batches)]
    failed = [f for r in sorted(check_map(_decode_check_unit, check_items), key=lambda r: r["item"])
              for f in json.loads(r["failed"])]
    failed_paths = {f["path"] for f in failed}
    decoded = [i for i in usable if refs[i].locator not in failed_paths]
    if not decoded:
        listed = "; ".join(f"{r['path']}: {r['error']}" for r in [*problems, *failed][:5])
        raise DatasetError(f"no usable reference images in source {config.source!r} "
                           f"({len(refs)} listed); problems: {listed or 'none listed'}")
    split_of_group = draw_split(refs, decoded, config)
    train = [i for i in decoded if split_of_group[refs[i].group] == "train"]
    if not train:
        raise DatasetError(f"no training photo to calibrate the severity table on: split_fractions "
                           f"{list(config.split_fractions)} put none of the {len(decoded)} usable photos in train; "
                           "give train a share > 0")
    # A photo's types are split over a few items so that no single item is a straggler.
    names = config.distortion_names()
    chunks = [names[k : k + CALIBRATION_TYPES_PER_ITEM] for k in range(0, len(names), CALIBRATION_TYPES_PER_ITEM)]
    calib_items = [{"config": config, "ref": refs[i], "types": chunk} for i in train for chunk in chunks]
    # Largest items first, so that no big item starts last and leaves the other CPUs idle
    # (grey photos have fewer types). Ray Data returns rows in completion order: sort them so
    # the table's float sums do not depend on scheduling.
    calib_items.sort(key=lambda it: -len(set(it["types"]) & set(allowed_types(config, it["ref"].grey))))
    rows = sorted(calibrate_map(_calibrate_unit, calib_items), key=lambda r: (r["ref"], r["labels"]))
    calib_failed = {r["error"]: json.loads(r["error"]) for r in rows if r["error"]}  # one entry per photo
    failed += list(calib_failed.values())
    # A photo that failed in any item is dropped as a whole, as it is from the generation pass.
    dropped = {r["ref"] for r in rows if r["error"]}
    good = [r for r in rows if r["ref"] not in dropped]
    if not good:
        raise DatasetError(f"no training photo could be calibrated: all {len(train)} failed to decode; problems: "
                           + "; ".join(f"{f['path']}: {f['error']}" for f in list(calib_failed.values())[:5]))
    table = severity_table(good, config)
    return {"table": table, "failed": failed, "split": dict(sorted(split_of_group.items())),
            "calibrated_on": sorted({r["ref"] for r in good})}


def _summarise(unit_stats: list[dict[str, Any]], planning_failed: list[dict[str, str]], elapsed: float,
               gen_seconds: float, engine: str, made_now: int) -> dict[str, Any]:
    per_type: dict[str, int] = {}
    per_split = {"train": 0, "val": 0, "test": 0}
    failed = list(planning_failed)
    for s in unit_stats:
        for k, v in s["per_type"].items():
            per_type[k] = per_type.get(k, 0) + v
        for k, v in s["per_split"].items():
            per_split[k] += v
        failed.extend(s["failed"])
    processed = sum(s["rows"] for s in unit_stats)
    return {
        "processed": processed,
        "failed": len(failed),
        "failures": failed,
        "per_type": dict(sorted(per_type.items())),
        "per_split": per_split,
        "units": len(unit_stats),
        "engine": engine,
        "elapsed_s": round(elapsed, 3),
        "generation_s": round(gen_seconds, 3),
        "images_per_s": round(made_now / gen_seconds, 2) if gen_seconds > 0 and made_now else None,
    }


def read_shards(dataset: GeneratedDataset | str | os.PathLike[str], *, columns: Sequence[str] | None = None) -> pa.Table:
    """All rows of a generated dataset as one Arrow table (sorted by image_id for stability)."""
    ds = dataset if isinstance(dataset, GeneratedDataset) else open_generated(dataset)
    tables = [pq.read_table(p, columns=list(columns) if columns else None) for p in ds.shard_paths]
    table = pa.concat_tables(tables) if tables else SHARD_SCHEMA.empty_table()
    if "image_id" in table.column_names:
        table = table.sort_by("image_id")
    return table


def summary_lines(ds: GeneratedDataset) -> list[str]:
    """A short human summary of a generated dataset (what `make tune` prints for now)."""
    m, s = ds.manifest, ds.stats
    refs = m["references"]
    lines = [
        f"dataset   {ds.path}{'  (reused)' if ds.reused else ''}",
        f"images    {s['processed']} ({s['per_split']['train']} train / {s['per_split']['val']} val / "
        f"{s['per_split']['test']} test), failed {s['failed']}",
        f"photos    {len(refs)} source photos, split by photo: "
        + ", ".join(f"{sp}={sum(1 for r in refs if r['split'] == sp)}" for sp in ("train", "val", "test")),
        "types     " + ", ".join(f"{k}:{v}" for k, v in s["per_type"].items()),
        f"labels    default={m['default_label']} (columns mos_severity, mos_ssim; 0-100, higher is better)",
        f"speed     {s['images_per_s']} images/s with engine={s['engine']}, elapsed {s['elapsed_s']} s",
    ]
    return lines


__all__ = [
    "PregenConfig", "GeneratedDataset", "CropTask", "pregenerate", "open_generated", "find_existing",
    "read_shards", "summary_lines", "plan_boxes", "draw_split", "make_tasks", "crop_grid",
    "scaled_size", "severity_of", "SHARD_SCHEMA",
]
