"""The training-side dataset: decode every image once, keep it in memory, crop per sample.

The seeds measured 40x faster epochs by preloading images instead of reading and decoding them
each time (seed 002); here every dataset (pre-generated shards or a real IQA dataset) is
decoded once into :class:`DecodedImages`, optionally resized, and kept as ``uint8`` arrays. A
:class:`IQADataset` view over one split then only crops:

* training: a random ``crop_size`` crop and a random horizontal flip;
* evaluation: deterministic crops, the centre (``eval_patches=1``) or a fixed, evenly spaced
  grid of ``eval_patches`` patches whose predictions the engine averages per image, so
  evaluating the same checkpoint twice gives identical numbers (seed 002's CenterCrop fix).

Samples are ``uint8`` tensors; the model owns its input normalisation, so the data path does
not depend on which backbone is trained.
"""

from __future__ import annotations

import io
import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from iqa_ray.core.errors import DatasetError

ON_ERROR = ("raise", "skip")


@dataclass
class DecodedImages:
    """Decoded images of a whole labelled table, ready to be cropped.

    Attributes:
        images: the ``uint8`` (H, W, 3) image of each row: one contiguous (N, H, W, 3) array
            when all rows have the same size (shared through Ray's object store without
            copies), else a list of arrays.
        table: the label table (without image bytes), aligned with ``images``.
        skipped: rows that could not be decoded (``on_error="skip"``), with their reasons.
    """

    images: np.ndarray | list[np.ndarray]
    table: pd.DataFrame
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def split_indices(self, split: str) -> np.ndarray:
        """Row indices of one split, in table order."""
        idx = np.flatnonzero(self.table["split"].to_numpy() == split)
        return idx

    @property
    def nbytes(self) -> int:
        return int(sum(im.nbytes for im in self.images))


_EXIF_ORIENTATION = 0x0112  # EXIF tag 274: how the stored pixels must be turned to stand upright


def short_side_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) after resizing, aspect preserved, so the shorter side is ``short_side``.

    The longer side is rounded to the nearest pixel (at least 1). Images are scaled up as well
    as down; an image whose short side already equals ``short_side`` keeps its size.

    >>> short_side_size(300, 200, 128)
    (192, 128)
    >>> short_side_size(200, 300, 128)
    (128, 192)
    """
    short = min(width, height)
    if short == short_side:
        return width, height
    factor = short_side / short
    if width <= height:
        return short_side, max(1, round(height * factor))
    return max(1, round(width * factor)), short_side


def _upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF Orientation tag says (phone photos store pixels sideways).

    Uses :func:`PIL.ImageOps.exif_transpose`; an image without the tag (or with orientation 1)
    is returned as is, without a copy. A malformed EXIF block only loses the orientation hint:
    the pixels are returned as stored rather than failing an image that decodes fine.
    """
    from PIL import ImageOps

    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - broken metadata, pixels still usable
        return im
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return im
    return ImageOps.exif_transpose(im)


def prepare_image(im: Image.Image, size: tuple[int, int] | None, short_side: int | None = None) -> np.ndarray:
    """An opened image as decoding makes it: upright (EXIF), RGB, resized (bicubic) to exactly
    ``size`` (width, height) or so that its shorter side is ``short_side``; ``uint8`` (H, W, 3)."""
    im = _upright(im)
    im = im.convert("RGB")
    if size is None and short_side is not None:
        size = short_side_size(im.size[0], im.size[1], short_side)
    if size is not None and im.size != tuple(size):
        im = im.resize(tuple(size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def _decode_one(
    row: dict[str, Any], size: tuple[int, int] | None, short_side: int | None = None
) -> np.ndarray:
    """Decode one row to an upright ``uint8`` (H, W, 3) array.

    The EXIF orientation is applied first (always), then the mode is converted to RGB, then the
    image is resized (bicubic) to exactly ``size`` (width, height) or, with ``short_side``, so
    that its shorter side is ``short_side`` (aspect preserved). Sizes are those of the upright
    image. Any failure is a :class:`DatasetError` naming the image.
    """
    source = row.get("image")
    where = row.get("path") or f"image bytes of {row['image_id']}"
    try:
        if source is not None:
            im = Image.open(io.BytesIO(source))
        else:
            path = row["path"]
            if not os.path.exists(path):
                raise FileNotFoundError(f"no such file: {path}")
            if os.path.getsize(path) == 0:
                raise OSError("file is empty (0 bytes)")
            im = Image.open(path)
        with im:
            im.load()
            return prepare_image(im, size, short_side)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(
            f"cannot decode image {row['image_id']!r} ({where}): {type(exc).__name__}: {exc}"
        ) from exc


def decode_table(
    table: pd.DataFrame,
    *,
    image_size: tuple[int, int] | None = None,
    short_side: int | None = None,
    min_size: int = 0,
    on_error: str = "raise",
    threads: int | None = None,
    progress: Callable[[int], Any] | None = None,
) -> DecodedImages:
    """Decode every row of ``table`` once.

    Args:
        table: rows with ``image_id``, ``split``, ``mos`` and either ``image`` (encoded bytes)
            or ``path``.
        image_size: resize every image to this (width, height); ``None`` keeps sizes.
        short_side: resize every image, aspect preserved, so its shorter side is this many
            pixels (bicubic; up or down; no-op when already that size). Mutually exclusive
            with ``image_size``. Phone datasets (SPAQ) mix sizes and orientations, so one exact
            (w, h) would distort half of them; this keeps each photo's shape.
        min_size: images whose short side is below this are bad input (smaller than the
            training crop).
        on_error: ``"raise"`` stops at the first bad image with a :class:`DatasetError`
            naming it; ``"skip"`` drops it and lists it in ``skipped``.
        threads: decoding threads (PIL releases the GIL while decoding); default: CPU count.
        progress: called with 1 after each image (in table order), e.g. a progress bar's update.

    Every image is first turned upright by its EXIF Orientation tag (a photo stored sideways
    with "rotate 90" in its EXIF comes out upright), then converted to RGB, then resized.

    Returns:
        The decoded images and the table without the bytes column.

    Raises:
        ValueError: bad ``on_error``, ``image_size`` and ``short_side`` both given, or a
            ``short_side`` that is not a positive integer.
        DatasetError: bad table or (``on_error="raise"``) an image that cannot be decoded.
    """
    _check_decode_arguments(table, image_size, short_side, on_error)
    records = table.to_dict("records")

    # With an exact image_size every image has one shape: decode straight into the one block the
    # dataset is kept in, instead of a list of arrays stacked afterwards (which peaked at about
    # 2.8x the decoded size: docs/PREFLIGHT.md).
    block = None
    if image_size is not None:
        width, height = (int(v) for v in image_size)
        block = np.empty((len(records), height, width, 3), dtype=np.uint8)
    results = _decode_rows(records, image_size, short_side, min_size, block, threads, progress)
    keep, images, skipped = [], [], []
    for i, (row, result) in enumerate(zip(records, results)):
        if isinstance(result, DatasetError):
            if on_error == "raise":
                raise result
            skipped.append({"row": i, "image_id": row["image_id"], "reason": str(result)})
            continue
        keep.append(i)
        images.append(result)
    if not images:
        raise DatasetError(f"every image failed to decode ({len(skipped)} skipped); first: {skipped[0]['reason']}")
    if block is not None:
        # The block already holds every image; only skipped rows need compacting (a copy, rare).
        images = block if len(keep) == len(records) else block[np.asarray(keep)]
    else:
        images = _pack(images)
    label_table = table.iloc[keep].drop(columns=[c for c in ("image",) if c in table.columns]).reset_index(drop=True)
    return DecodedImages(images=images, table=label_table, skipped=skipped)


def _check_decode_arguments(
    table: pd.DataFrame, image_size: tuple[int, int] | None, short_side: int | None, on_error: str
) -> None:
    """Raise the ``ValueError`` or ``DatasetError`` of :func:`decode_table` for bad arguments or table."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if image_size is not None and short_side is not None:
        raise ValueError(
            f"give image_size (exact width, height) or short_side (shorter side, aspect kept), not both; "
            f"got image_size={tuple(image_size)!r} and short_side={short_side!r}"
        )
    if short_side is not None and (
        isinstance(short_side, bool) or not isinstance(short_side, (int, np.integer)) or short_side < 1
    ):
        raise ValueError(f"short_side must be a positive integer number of pixels or None, got {short_side!r}")
    missing = {"image_id", "split", "mos"} - set(table.columns)
    if missing or not ({"image", "path"} & set(table.columns)):
        raise DatasetError(
            f"label table needs columns image_id, split, mos and one of image/path; missing {sorted(missing)}, "
            f"found {list(table.columns)}"
        )
    if len(table) == 0:
        raise DatasetError("the dataset is empty: no rows to decode")


def _decode_rows(
    records: list[dict[str, Any]],
    image_size: tuple[int, int] | None,
    short_side: int | None,
    min_size: int,
    block: np.ndarray | None,
    threads: int | None,
    progress: Callable[[int], Any] | None,
) -> list[np.ndarray | DatasetError]:
    """Decode every row on a thread pool: its image (a view of ``block`` when given) or the
    :class:`DatasetError` that names why it cannot be used, in table order."""

    def work(item: tuple[int, dict[str, Any]]) -> np.ndarray | DatasetError:
        i, row = item
        try:
            image = _decode_one(row, image_size, short_side)
        except DatasetError as exc:
            return exc
        if min(image.shape[:2]) < min_size:
            return DatasetError(
                f"image {row['image_id']!r} is {image.shape[1]}x{image.shape[0]}, smaller than the crop size "
                f"{min_size}; use a smaller crop or resize the dataset (image_size=)"
            )
        if block is not None:
            block[i] = image
            return block[i]
        return image

    workers = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = []
        for result in pool.map(work, enumerate(records)):
            results.append(result)
            if progress is not None:
                progress(1)
    return results


def _pack(images: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """Store equal-sized images in one contiguous array (one buffer to pickle and to share)."""
    if len({im.shape for im in images}) == 1:
        return np.stack(images)
    return images


def grid_positions(height: int, width: int, crop: int, n: int) -> list[tuple[int, int]]:
    """Top-left corners of ``n`` crops on an evenly spaced grid (n=1: the centre)."""
    if n == 1:
        return [((height - crop) // 2, (width - crop) // 2)]
    rows = int(math.floor(math.sqrt(n)))
    cols = int(math.ceil(n / rows))
    ys = np.linspace(0, height - crop, rows).round().astype(int)
    xs = np.linspace(0, width - crop, cols).round().astype(int)
    return [(int(y), int(x)) for y in ys for x in xs][:n]


def random_positions(height: int, width: int, crop: int, n: int, seed: int, key: str) -> list[tuple[int, int]]:
    """Top-left corners of ``n`` crops at random positions drawn from a generator seeded by
    ``seed`` and the image's id ``key``: the same image always gets the same patches, whatever
    table it is read from and in whatever order."""
    rng = np.random.default_rng([seed % 2**32, zlib.crc32(str(key).encode()), 11])
    ys = rng.integers(0, height - crop + 1, size=n)
    xs = rng.integers(0, width - crop + 1, size=n)
    return [(int(y), int(x)) for y, x in zip(ys, xs)]


class IQADataset(Dataset):
    """One split of decoded images, cropped (or whole) for training or deterministic evaluation.

    Items are dicts: ``image`` (uint8 tensor (3, c, c) when training, (P, 3, c, c) when
    evaluating with P patches; (3, H, W) / (1, 3, H, W) with ``whole_image``), ``mos`` (float32,
    0-100) and ``index`` (row in the table).

    Args:
        decoded: the decoded dataset.
        split: a split name or explicit row indices.
        train: random crops and flips (training) or deterministic patches (evaluation).
        crop_size: training crop and evaluation patch side.
        eval_patches: evaluation patches per image, averaged by the engine.
        hflip: random horizontal flips when training.
        patches_per_image: when training, each image appears this many times per epoch, each
            time with its own random crop (HyperIQA's 25 patches per image per epoch).
        patch_placement: ``grid`` or ``random`` (seeded by ``placement_seed`` and the image id)
            evaluation patches.
        placement_seed: seed of ``random`` placement.
        whole_image: whole images instead of crops (training still flips).
    """

    def __init__(
        self,
        decoded: DecodedImages,
        split: str | Sequence[int],
        *,
        train: bool,
        crop_size: int = 128,
        eval_patches: int = 1,
        hflip: bool = True,
        patches_per_image: int = 1,
        patch_placement: str = "grid",
        placement_seed: int = 0,
        whole_image: bool = False,
    ) -> None:
        self.decoded = decoded
        self.indices = decoded.split_indices(split) if isinstance(split, str) else np.asarray(split, dtype=int)
        if len(self.indices) == 0:
            raise DatasetError(f"split {split!r} is empty; splits present: {sorted(decoded.table['split'].unique())}")
        if eval_patches < 1:
            raise ValueError(f"eval_patches must be >= 1, got {eval_patches}")
        if patches_per_image < 1:
            raise ValueError(f"patches_per_image must be >= 1, got {patches_per_image}")
        if patch_placement not in ("grid", "random"):
            raise ValueError(f"patch_placement must be 'grid' or 'random', got {patch_placement!r}")
        if not whole_image:
            smallest = min(min(decoded.images[i].shape[:2]) for i in self.indices)
            if smallest < crop_size:
                raise DatasetError(f"crop_size {crop_size} is larger than the smallest image side {smallest}")
        self.train = train
        self.crop_size = crop_size
        self.eval_patches = eval_patches
        self.hflip = hflip
        self.patches_per_image = patches_per_image if train else 1
        self.patch_placement = patch_placement
        self.placement_seed = placement_seed
        self.whole_image = whole_image
        self.mos = decoded.table["mos"].to_numpy(dtype=np.float32)
        self.image_ids = decoded.table["image_id"].astype(str).to_numpy() if "image_id" in decoded.table else None

    def __len__(self) -> int:
        return len(self.indices) * self.patches_per_image

    @property
    def same_size(self) -> bool:
        """Whether every item has the same shape (whole images of mixed sizes cannot be batched)."""
        if not self.whole_image:
            return True
        return len({self.decoded.images[int(i)].shape for i in self.indices}) == 1

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.indices[i % len(self.indices)])
        image = self.decoded.images[row]
        h, w = image.shape[:2]
        c = self.crop_size
        if self.whole_image:
            if self.train and self.hflip and bool(torch.rand(()) < 0.5):
                image = image[:, ::-1]
            tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a copy: shared arrays are read-only
            if not self.train:
                tensor = tensor.unsqueeze(0)
        elif self.train:
            y = int(torch.randint(0, h - c + 1, ()).item())
            x = int(torch.randint(0, w - c + 1, ()).item())
            patch = image[y : y + c, x : x + c]
            if self.hflip and bool(torch.rand(()) < 0.5):
                patch = patch[:, ::-1]
            tensor = torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1)
        else:
            if self.patch_placement == "random":
                key = self.image_ids[row] if self.image_ids is not None else str(row)
                corners = random_positions(h, w, c, self.eval_patches, self.placement_seed, key)
            else:
                corners = grid_positions(h, w, c, self.eval_patches)
            patches = [image[y : y + c, x : x + c] for y, x in corners]
            tensor = torch.from_numpy(np.ascontiguousarray(np.stack(patches))).permute(0, 3, 1, 2)
        return {"image": tensor, "mos": torch.tensor(self.mos[row]), "index": row}
