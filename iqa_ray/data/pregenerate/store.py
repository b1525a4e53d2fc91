"""How a pre-generated dataset is stored and found again: the shard schema, one shard per work unit,
the manifest and processing stats that finish a folder, the fingerprint that names it, the lock that
lets one process at a time write it, and reading a finished folder back."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from iqa_ray.core.errors import DatasetError
from iqa_ray.core.io import atomic_path, atomic_write_json, git_revision, stable_hash
from iqa_ray.data.distortions.registry import get_distortion
from iqa_ray.data.labels import DEFAULT_LABEL
from iqa_ray.data.pregenerate.config import PregenConfig
from iqa_ray.data.pregenerate.plan import CropTask, list_references
from iqa_ray.data.sources import ReferenceInfo

__all__ = [
    "FORMAT_VERSION", "LABEL_VERSION", "SHARD_SCHEMA", "GeneratedDataset", "build_manifest", "config_fingerprint",
    "dataset_name", "find_existing", "finish_dataset", "generation_lock", "open_generated", "read_shards",
    "remove_stray_shards", "summarise", "summary_lines", "write_shard",
]

FORMAT_VERSION = 1
# Version of the labelling recipe, part of the config fingerprint, so that a dataset labelled by
# an older recipe is never reused from the data dir. 2: the severity table is calibrated on the
# training photos only (1 averaged every photo, test photos included).
LABEL_VERSION = 2

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


# ----------------------------------------------------------------------------- naming and finding


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


@contextlib.contextmanager
def generation_lock(path: Path, say: Callable[[str], None]) -> Iterator[None]:
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


# ----------------------------------------------------------------------------- writing


def write_shard(rows: list[dict[str, Any]], path: Path) -> None:
    """Write one work unit's rows as a parquet shard, atomically (a killed run leaves no torn shard)."""
    table_out = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table_out, tmp)


def remove_stray_shards(shards_dir: Path, n_units: int) -> None:
    """Delete shards from a different plan (e.g. a crash during an older format), so they do not leak in."""
    expected = {f"shard-{i:05d}.parquet" for i in range(n_units)}
    for stray in shards_dir.glob("*.parquet"):
        if stray.name not in expected:
            stray.unlink()


def summarise(unit_stats: list[dict[str, Any]], planning_failed: list[dict[str, str]], elapsed: float,
               gen_seconds: float, engine: str, made_now: int) -> dict[str, Any]:
    """The content of ``processing_stats.json``: images made and failed, per type and split, and the speed."""
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


def build_manifest(config: PregenConfig, name: str, refs: Sequence[ReferenceInfo], tasks: Sequence[CropTask],
                   split_of_group: dict[str, str], calibration: dict[str, Any],
                   unit_stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The content of ``manifest.json``: the generating config and its hash, the labels and the severity
    table, the split, the references used (with licences), the shards, the schema and the git revision."""
    used_refs = sorted({t.ref_index for t in tasks})
    return {
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
        "severity_table": calibration["table"],
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
        "distortion_types": {n: get_distortion(n).description for n in config.distortion_names()},
        "git_revision": git_revision(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def finish_dataset(partial: Path, final: Path, stats: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Write the stats and the manifest into the partial folder, drop the run's working files, and
    rename it to its final name: only now does the dataset look complete."""
    shards_dir = partial / "shards"
    atomic_write_json(partial / "processing_stats.json", stats)
    atomic_write_json(partial / "manifest.json", manifest)
    for sidecar in shards_dir.glob("*.stats.json"):
        sidecar.unlink()
    (partial / "calibration.json").unlink()
    if final.exists():  # a forced re-run replaces the old folder only once the new one is complete
        shutil.rmtree(final)
    os.replace(partial, final)


# ----------------------------------------------------------------------------- reading


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
