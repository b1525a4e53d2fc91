"""Pre-generate a dataset: :func:`pregenerate` reuses a finished folder with the same fingerprint or
generates one (the passes are in :mod:`iqa_ray.data.pregenerate.generate`), one process at a time, with
one progress bar over the run. :mod:`iqa_ray.data.pregenerate` describes the folder it writes."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from iqa_ray.data.pregenerate.config import PregenConfig
from iqa_ray.data.pregenerate.generate import Mapper, generate_dataset, local_map, ray_data_map
from iqa_ray.data.pregenerate.plan import list_references
from iqa_ray.data.pregenerate.store import (
    GeneratedDataset,
    config_fingerprint,
    dataset_name,
    generation_lock,
    open_generated,
)

__all__ = ["pregenerate", "progress_bar_for"]


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
    with generation_lock(out_dir / f".lock-{name}", say):
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
            return generate_dataset(config, refs, listing_failed, final, partial, shards_dir, crops_per_unit,
                                    start, engine, engine_map, bar, say)


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
