"""What pre-training samples: unlabelled images decoded once, and one image turned into two crops
degraded at K increasing levels of one distortion."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from iqa_ray.core.errors import DatasetError
from iqa_ray.data.distortions.registry import DISTORTIONS, apply_distortion, is_grey


@dataclass
class UnlabelledImages:
    """Decoded unlabelled images kept in memory (RGB ``uint8``), with a name for each."""

    images: list[np.ndarray]
    names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.images)


def _downscale(image: np.ndarray, max_short_side: int | None) -> np.ndarray:
    """Downscale (never upscale) so the short side is at most ``max_short_side``, as the pre-generator does."""
    if max_short_side is None or min(image.shape[:2]) <= max_short_side:
        return np.ascontiguousarray(image)
    from iqa_ray.data.pregenerate.plan import scaled_size

    w, h = scaled_size(image.shape[1], image.shape[0], max_short_side)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.LANCZOS))


def load_unlabelled(
    source: str,
    *,
    splits: Sequence[str] | None = None,
    max_short_side: int | None = 512,
    pristine_only: bool = False,
    split_seed: int = 0,
) -> UnlabelledImages:
    """Decode the images of ``source`` once, without labels.

    Args:
        source: ``embedded`` (the photos shipped in scikit-image / scikit-learn), a folder of
            image files, or any ``--dataset`` form whose labels are ignored: a pre-generated
            folder (with ``manifest.json``) or ``<adapter>:<root>`` (``koniq10k:/data/koniq``).
        splits: keep only photos of these splits (e.g. ``("train",)``, so nothing the test split
            holds is seen, not even without labels). For ``embedded`` the split is the default
            embedded dataset's, by photo. ``None`` keeps every image.
        max_short_side: downscale so the short side is at most this (the pre-generator's 512);
            ``None`` keeps sizes.
        pristine_only: for pre-generated tables, keep only the undistorted crops
            (``distortion == "none"``), so pre-training degrades clean images.
        split_seed: seed of seeded splits of real datasets (``<adapter>:<root>`` without an
            official split). Pass the ``split_seed`` of the runs the encoder is for: another seed
            draws another ``train`` split, holding photos those runs validate and test on.
            Embedded and pre-generated data have their split fixed at generation and ignore it.

    Returns:
        The images and their names.

    Raises:
        DatasetError: nothing usable, an unknown split, or a filter that does not apply.
    """
    from iqa_ray.data.catalog import EMBEDDED, load_table
    from iqa_ray.data.sources import embedded_references, folder_references, load_reference

    wanted = tuple(splits) if splits is not None else None
    if wanted is not None:
        bad = [s for s in wanted if s not in ("train", "val", "test")]
        if bad or not wanted:
            raise DatasetError(f"splits must be a non-empty subset of train, val, test; got {list(wanted)}")
    path = Path(source).expanduser()
    if source == EMBEDDED:
        refs = embedded_references()
        if wanted is not None:
            table = load_table(EMBEDDED)
            split_of = dict(zip(table["group"], table["split"]))
            refs = [r for r in refs if split_of.get(r.group) in wanted]
        images = [_downscale(load_reference(r), max_short_side) for r in refs]
        names = [r.key for r in refs]
    elif path.is_dir() and not (path / "manifest.json").exists():
        if wanted is not None:
            raise DatasetError(f"{path} is a plain folder of images: it has no splits to filter by {list(wanted)}")
        refs, failed = folder_references(path)
        if failed:
            raise DatasetError(f"unreadable images in {path}: {failed[:3]}")
        images = [_downscale(load_reference(r), max_short_side) for r in refs]
        names = [r.key for r in refs]
    else:
        from iqa_ray.data.decoded import decode_table

        table = load_table(source, split_seed=split_seed)
        if wanted is not None:
            table = table[table["split"].isin(wanted)]
        if pristine_only:
            if "distortion" not in table or not (table["distortion"] == "none").any():
                raise DatasetError(f"pristine_only needs a pre-generated table with undistorted rows "
                                   f"(distortion == 'none'); {source} has none")
            table = table[table["distortion"] == "none"]
        if len(table) == 0:
            raise DatasetError(f"no images left in {source} after the split/pristine filters")
        decoded = decode_table(table.reset_index(drop=True))
        images = [_downscale(np.asarray(im), max_short_side) for im in decoded.images]
        names = decoded.table["image_id"].astype(str).tolist()
    if not images:
        raise DatasetError(f"no images in {source}" + (f" for splits {list(wanted)}" if wanted else ""))
    return UnlabelledImages(images=images, names=names, source=source)


def level_grid(n: int, level_range: tuple[float, float], jitter: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` increasing levels evenly spread over ``level_range``, each jittered inside its own slot."""
    low, high = level_range
    base = np.linspace(low, high, n)
    half_gap = (high - low) / (n - 1) / 2
    shifted = base + rng.uniform(-1.0, 1.0, size=n) * jitter * half_gap
    # Jitter < 1 keeps every level inside its half-gap, so the order never changes.
    return np.clip(shifted, 0.0, 1.0)


def make_sample(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    crop_size: int,
    levels: int,
    level_range: tuple[float, float],
    level_jitter: float,
    distortions: Sequence[str],
) -> tuple[np.ndarray, str, np.ndarray]:
    """One training sample: two crops of ``image``, each degraded at ``levels`` increasing levels.

    Args:
        image: RGB uint8 (H, W, 3), both sides >= ``crop_size``.
        rng: the only source of randomness (crop positions, type, levels, distortion draws).
        crop_size: crop side in pixels.
        levels: K, the number of levels.
        level_range: (low, high) levels.
        level_jitter: jitter of each level as a fraction of half the spacing.
        distortions: types to draw from (colour-only types are skipped on grey images).

    Returns:
        ``crops`` uint8 (2, K, crop, crop, 3) ordered from least to most degraded, the type, and
        the K levels.
    """
    h, w = image.shape[:2]
    if min(h, w) < crop_size:
        raise DatasetError(f"image {w}x{h} is smaller than crop_size {crop_size}")
    allowed = list(distortions)
    if is_grey(image):
        allowed = [d for d in allowed if not DISTORTIONS[d].needs_color]
    if not allowed:
        raise DatasetError(f"no distortion type applies to a grey image among {list(distortions)} (all need colour)")
    kind = allowed[int(rng.integers(len(allowed)))]
    grid = level_grid(levels, level_range, level_jitter, rng)
    crops = np.empty((2, levels, crop_size, crop_size, 3), dtype=np.uint8)
    distortion_seed = int(rng.integers(2**62))
    for c in range(2):
        top, left = int(rng.integers(h - crop_size + 1)), int(rng.integers(w - crop_size + 1))
        crop = np.ascontiguousarray(image[top : top + crop_size, left : left + crop_size])
        for k, level in enumerate(grid):
            # The same generator state at every level: same noise pattern / blur angle, stronger.
            crops[c, k] = apply_distortion(kind, crop, float(level), np.random.default_rng([distortion_seed, c]))
    return crops, kind, grid


def batch_tensor(crops: Sequence[np.ndarray]) -> Tensor:
    """Samples (2, K, S, S, 3) uint8 -> float (B, 2, K, 3, S, S) in [0, 1]."""
    array = torch.from_numpy(np.stack(crops))
    return array.permute(0, 1, 2, 5, 3, 4).float().div_(255.0)
