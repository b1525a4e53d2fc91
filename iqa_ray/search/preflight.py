"""Pre-flight checks: refuse a search that cannot work before Ray starts or any image is decoded.

Two things used to fail late and expensively: backbone weights out of reach (``pretrained =
"offline"`` exists only for EfficientNet-Lite0, ``"hub"`` needs the Hugging Face hub, a weights
file must exist: the models layer's :func:`iqa_ray.models.weights.check_weights` refuses them) and
the decoded dataset's memory, checked here:

* **Decoded memory.** Every dataset is decoded once into ``uint8`` RGB arrays
  (:func:`iqa_ray.data.decoded.decode_table`) which the driver then puts into Ray's object store
  for the trials to share. KonIQ-10k at its native 1024x768 is 10,073 x 1024 x 768 x 3 bytes =
  23.8 GB decoded: on a 24 GiB machine the driver is killed minutes into decoding, or Ray
  spills the object to disk. :func:`estimate_decoded_bytes` computes the figure from the image
  headers alone (no pixel is decoded) and :func:`check_decoded_fits` refuses it, naming an
  ``image_size`` (or ``short_side``) that would fit.

The memory rule
---------------
The driver decodes the whole dataset (``nbytes``), then ``ray.put`` copies it into the object
store (another ``nbytes`` of shared memory). So the decoded cache must satisfy both:

* ``nbytes <= 0.8 * object store``: the object store (Ray's default: 30% of the memory
  available when Ray starts, capped at 95% of ``/dev/shm`` and 200 GB) keeps 20% for the
  trials' own results and checkpoints; beyond it Ray spills objects to local disk (slow);
* ``nbytes <= 0.3 * available memory``: ``benchmarks/decoded_memory.py`` measured the
  driver's memory peak at 2.1x to 2.9x ``nbytes`` (2,000 photos, 1024x768 and 512x384): up to
  1.9x of private memory, because decoding holds the per-image arrays while it stacks them into
  one block and the C allocator keeps most of that freed memory, plus 1x of object-store pages
  the driver writes during ``ray.put``. At 0.3 the measured peak stays under ~90% of the memory
  that was available.

With Ray's default object store the first condition is the tighter one (0.8 x 30% = 24% of
available memory); the second matters when a larger store is configured.

Every error is a :class:`~iqa_ray.core.errors.PreflightError` (a
:class:`~iqa_ray.core.errors.DatasetError`) whose message says what is wrong and what would be valid.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from iqa_ray.core.errors import DatasetError, PreflightError
from iqa_ray.data.decoded import short_side_size

__all__ = [
    "HEADER_SAMPLE",
    "MEMORY_FRACTION",
    "OBJECT_STORE_FRACTION",
    "RAY_OBJECT_STORE_PROPORTION",
    "SAMPLE_ABOVE",
    "DecodedEstimate",
    "MemoryBudget",
    "check_decoded_fits",
    "decoded_budget",
    "default_object_store_bytes",
    "estimate_decoded",
    "estimate_decoded_bytes",
    "preflight_decoded",
    "suggest_image_size",
]

# The rule (see the module docstring).
OBJECT_STORE_FRACTION = 0.8
MEMORY_FRACTION = 0.3
# Ray's default object store: this share of the memory available when Ray starts (Ray 2.x,
# ``ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION``; the same environment variable
# overrides it), capped at 95% of free /dev/shm (but not below 10 GB) and at 200 GB.
RAY_OBJECT_STORE_PROPORTION = 0.3
_RAY_OBJECT_STORE_MAX = 200 * 10**9
_RAY_SHM_FLOOR = 10**10
# Tables larger than SAMPLE_ABOVE rows have HEADER_SAMPLE headers read (seeded) and scaled up.
SAMPLE_ABOVE = 2000
HEADER_SAMPLE = 500
# The aspect ratio assumed for a suggestion when no image size is known (camera photos).
_ASSUMED_ASPECT = (4, 3)
_GB = 1e9


# --------------------------------------------------------------------------------------------
# Decoded memory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodedEstimate:
    """What decoding a table will produce, from the image headers only.

    Attributes:
        nbytes: estimated bytes of the decoded ``uint8`` RGB cache (exact when every header was
            read or ``image_size`` is set; scaled up from a sample otherwise).
        n_images: rows in the table.
        typical_size: the most common decoded (width, height) among the headers read (the
            ``image_size`` when set); ``None`` for an empty table.
        headers_read: headers actually read (0 with ``image_size``).
        sampled: whether ``nbytes`` was scaled up from a sample of headers.
    """

    nbytes: int
    n_images: int
    typical_size: tuple[int, int] | None
    headers_read: int
    sampled: bool
    sizes: tuple[tuple[int, int], ...] = field(default=(), repr=False)


def _check_resize_args(image_size: Sequence[int] | None, short_side: int | None) -> tuple[int, int] | None:
    if image_size is not None and short_side is not None:
        raise ValueError(
            f"give image_size (exact width, height) or short_side (shorter side, aspect kept), not both; "
            f"got image_size={tuple(image_size)!r} and short_side={short_side!r}"
        )
    if short_side is not None and (isinstance(short_side, bool) or not isinstance(short_side, (int, np.integer))
                                   or short_side < 1):
        raise ValueError(f"short_side must be a positive integer number of pixels or None, got {short_side!r}")
    if image_size is None:
        return None
    size = tuple(image_size)
    if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
                                 for v in size):
        raise ValueError(f"image_size must be (width, height), two positive integers, got {image_size!r}")
    return int(size[0]), int(size[1])


def _header_size(row: Mapping[str, Any]) -> tuple[int, int]:
    """(width, height) as stored, from the file header only (PIL opens lazily; no pixel decode)."""
    source = row.get("image")
    path = row.get("path")
    if isinstance(source, (bytes, bytearray, memoryview)):
        where = f"image bytes of {row.get('image_id')!r}"
        opener: Any = io.BytesIO(bytes(source))
    elif isinstance(path, (str, os.PathLike)) and str(path):
        where = str(path)
        opener = path
    else:
        raise DatasetError(f"row {row.get('image_id')!r} has neither image bytes nor a path to read its size from")
    try:
        with Image.open(opener) as im:
            return int(im.size[0]), int(im.size[1])
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(
            f"cannot read the image header of {row.get('image_id')!r} ({where}) to estimate decoded memory: "
            f"{type(exc).__name__}: {exc}; fix or remove the file (or load the dataset with on_error=\"skip\")"
        ) from exc


def _decoded_size(stored: tuple[int, int], short_side: int | None) -> tuple[int, int]:
    return stored if short_side is None else short_side_size(stored[0], stored[1], short_side)


def estimate_decoded(
    table: pd.DataFrame,
    *,
    image_size: Sequence[int] | None = None,
    short_side: int | None = None,
    seed: int = 0,
) -> DecodedEstimate:
    """Estimate the decoded cache of ``table`` without decoding it (see :func:`estimate_decoded_bytes`).

    Returns:
        A :class:`DecodedEstimate` with the bytes, the most common decoded size and how many
        headers were read; ``sizes`` holds the stored (width, height) of every header read, so
        other resize settings can be costed without reading them again.
    """
    size = _check_resize_args(image_size, short_side)
    n = len(table)
    if size is not None:
        return DecodedEstimate(nbytes=n * size[0] * size[1] * 3, n_images=n, typical_size=size if n else None,
                               headers_read=0, sampled=False)
    if n == 0:
        return DecodedEstimate(nbytes=0, n_images=0, typical_size=None, headers_read=0, sampled=False)
    if not ({"image", "path"} & set(table.columns)):
        raise DatasetError(
            f"cannot estimate decoded memory: the table needs an 'image' (encoded bytes) or 'path' column, "
            f"found {list(table.columns)}"
        )
    sampled = n > SAMPLE_ABOVE
    rows = np.arange(n)
    if sampled:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=HEADER_SAMPLE, replace=False))
    columns = [c for c in ("image_id", "image", "path") if c in table.columns]
    sub = table.iloc[rows][columns]
    stored = [_header_size(row) for row in sub.to_dict("records")]
    decoded = [_decoded_size(s, short_side) for s in stored]
    total = sum(w * h * 3 for w, h in decoded)
    nbytes = int(round(total * n / len(decoded))) if sampled else int(total)
    values, counts = np.unique(np.asarray(decoded), axis=0, return_counts=True)
    typical = tuple(int(v) for v in values[int(np.argmax(counts))])
    return DecodedEstimate(nbytes=nbytes, n_images=n, typical_size=(typical[0], typical[1]),
                           headers_read=len(stored), sampled=sampled, sizes=tuple(stored))


def estimate_decoded_bytes(
    table: pd.DataFrame,
    *,
    image_size: Sequence[int] | None = None,
    short_side: int | None = None,
) -> int:
    """Bytes the decoded ``uint8`` RGB cache of ``table`` will take, without decoding any image.

    * ``image_size=(w, h)``: exactly ``N * w * h * 3``; no file is opened.
    * otherwise each image's (width, height) is read from its header only (``PIL.Image.open``
      is lazy: no pixel is decoded), from the ``image`` column (encoded bytes) or the file at
      ``path``; with ``short_side`` each size is first scaled, aspect kept, so its shorter side
      is ``short_side`` (the rule :func:`~iqa_ray.data.decoded.decode_table` applies). The EXIF
      orientation is ignored: turning an image does not change its area.
    * tables of more than 2,000 rows: a seeded sample of 500 headers is read and the total is
      scaled up to all rows, so the figure is an estimate (exact for datasets of one size, such
      as KonIQ-10k); files outside the sample are not opened.

    Args:
        table: rows with ``image_id`` and ``image`` or ``path`` (the common table of
            :func:`iqa_ray.data.catalog.load_table`).
        image_size: exact decoded (width, height), as ``decode_table``'s ``image_size``.
        short_side: decoded shorter side, as ``decode_table``'s ``short_side``.

    Returns:
        The estimate in bytes (0 for an empty table).

    Raises:
        DatasetError: a header that had to be read cannot be (the message names the file).
        ValueError: ``image_size`` and ``short_side`` both given, or malformed.
    """
    return estimate_decoded(table, image_size=image_size, short_side=short_side).nbytes


@dataclass(frozen=True)
class MemoryBudget:
    """The largest decoded cache this machine takes, and where the figures come from.

    Attributes:
        available_memory: bytes of memory available (``psutil`` unless given).
        object_store_bytes: bytes of the Ray object store.
        object_store_default: whether ``object_store_bytes`` is Ray's default (not given).
        limit: ``min(0.8 * object store, 0.3 * available memory)``.
        binding: which of the two sets ``limit`` (``"object store"`` or ``"memory"``).
    """

    available_memory: int
    object_store_bytes: int
    object_store_default: bool
    limit: int
    binding: str


def default_object_store_bytes(available_memory: int | None = None) -> int:
    """The object store ``ray.init()`` would create here without ``object_store_memory``.

    Ray 2.x takes 30% of the memory it counts as available when it starts (total minus used,
    cgroup-aware; the ``RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION`` environment variable
    overrides the share), capped at 200 GB and, on Linux, at 95% of the free space in
    ``/dev/shm`` (a cap never below 10 GB). Without ``available_memory`` Ray's own functions give
    the figure (a mirror of them when Ray's internals moved). With ``available_memory`` given,
    the result is 30% of it capped at 200 GB (no look at this machine), so figures for another
    machine can be computed.
    """
    try:
        share = float(os.environ.get("RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION", RAY_OBJECT_STORE_PROPORTION))
    except ValueError:
        share = RAY_OBJECT_STORE_PROPORTION
    if available_memory is not None:
        return int(min(available_memory * share, _RAY_OBJECT_STORE_MAX))
    try:
        from ray._private.utils import estimate_available_memory, resolve_object_store_memory

        return int(resolve_object_store_memory(estimate_available_memory()))
    except Exception:  # noqa: BLE001 - private Ray API; fall back to the same formula
        import psutil

        memory = psutil.virtual_memory()
        cap = _RAY_OBJECT_STORE_MAX
        if os.path.isdir("/dev/shm"):
            stats = os.statvfs("/dev/shm")
            cap = min(cap, max(_RAY_SHM_FLOOR, int(stats.f_bsize * stats.f_bavail * 0.95)))
        return int(min((memory.total - memory.used) * share, cap))


def decoded_budget(*, available_memory: int | None = None, object_store_bytes: int | None = None) -> MemoryBudget:
    """The decoded-cache limit of the memory rule (see the module docstring) for this machine.

    Args:
        available_memory: bytes available; default ``psutil.virtual_memory().available``.
        object_store_bytes: the object store Ray will have (``ray start --object-store-memory``,
            or the cluster's); default Ray's own default, :func:`default_object_store_bytes`.
    """
    measured = available_memory is None
    if measured:
        import psutil

        available_memory = int(psutil.virtual_memory().available)
    default = object_store_bytes is None
    if default:
        object_store_bytes = default_object_store_bytes(None if measured else available_memory)
    store_limit = int(OBJECT_STORE_FRACTION * object_store_bytes)
    memory_limit = int(MEMORY_FRACTION * available_memory)
    binding = "object store" if store_limit <= memory_limit else "memory"
    return MemoryBudget(available_memory=int(available_memory), object_store_bytes=int(object_store_bytes),
                        object_store_default=default, limit=min(store_limit, memory_limit), binding=binding)


def _ratio_unit(size: tuple[int, int]) -> tuple[int, int] | None:
    """The smallest integer (w, h) with exactly the aspect of ``size``, if it is small enough to scale by."""
    g = math.gcd(*size)
    unit = (size[0] // g, size[1] // g)
    return unit if max(unit) <= 64 else None


def suggest_image_size(
    image_size: Sequence[int] | None, n_images: int, limit_bytes: int, *, min_side: int = 0
) -> tuple[int, int] | None:
    """The largest (width, height) with the aspect of ``image_size`` whose decoded cache fits.

    ``n_images * w * h * 3 <= limit_bytes``, never larger than ``image_size`` and never with a side
    below ``min_side`` (the crop size). The aspect is kept exactly when the size reduces to a
    small ratio (1024x768 -> multiples of 4:3), else to the nearest pixel; with no size known,
    4:3 (camera photos) is assumed.

    Returns:
        The size, or ``None`` when not even ``min_side`` on the short side fits.
    """
    if n_images <= 0:
        return tuple(image_size) if image_size is not None else None  # type: ignore[return-value]
    pixels = limit_bytes // (3 * n_images)
    size = tuple(int(v) for v in image_size) if image_size is not None else _ASSUMED_ASPECT
    unit = _ratio_unit(size)  # type: ignore[arg-type]
    if unit is not None:
        k = math.isqrt(pixels // (unit[0] * unit[1]))
        if image_size is not None:
            k = min(k, size[0] // unit[0])
        w, h = k * unit[0], k * unit[1]
    else:
        aspect = size[0] / size[1]
        h = math.isqrt(int(pixels / aspect))
        w = int(h * aspect)
        while w * h > pixels and h > 0:
            h -= 1
            w = int(h * aspect)
        w, h = min(w, size[0]), min(h, size[1])
    if w < 1 or h < 1 or min(w, h) < min_side:
        return None
    return w, h


def _gb(nbytes: float) -> str:
    return f"{nbytes / _GB:.1f} GB"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.2f} MB"


def check_decoded_fits(
    nbytes: int,
    *,
    available_memory: int | None = None,
    object_store_bytes: int | None = None,
    n_images: int,
    image_size: Sequence[int] | None,
    dataset: str,
    short_side: int | None = None,
    min_side: int = 0,
) -> None:
    """Refuse a decoded cache of ``nbytes`` that this machine cannot hold (the memory rule).

    Rule: ``nbytes <= 0.8 * object store`` and ``nbytes <= 0.3 * available memory`` (see the module
    docstring for why).

    Args:
        nbytes: the decoded size, from :func:`estimate_decoded_bytes`.
        available_memory: bytes available; default ``psutil.virtual_memory().available``.
        object_store_bytes: the Ray object store; default Ray's default (30% of available memory).
        n_images: images in the dataset.
        image_size: the decoded (width, height) of each image when known (the configured
            ``image_size``, or the typical size of a dataset decoded at its own size); ``None``
            for mixed sizes. It sets the aspect ratio of the suggested ``image_size``.
        dataset: the dataset's name, for the message.
        short_side: the configured ``short_side``, if any (named in the message).
        min_side: the smallest side a suggestion may have (the crop size).

    Raises:
        PreflightError: the cache does not fit; the message names the dataset, the images, the
            size per image, the estimate and what is available, and suggests an ``image_size``
            (aspect kept) and a ``short_side`` that would fit.
    """
    budget = decoded_budget(available_memory=available_memory, object_store_bytes=object_store_bytes)
    if nbytes <= budget.limit:
        return
    raise PreflightError(_refusal(nbytes, budget, n_images=n_images, image_size=image_size, dataset=dataset,
                                  short_side=short_side, min_side=min_side, short_side_bytes=None))


def _refusal(
    nbytes: int,
    budget: MemoryBudget,
    *,
    n_images: int,
    image_size: Sequence[int] | None,
    dataset: str,
    short_side: int | None,
    min_side: int,
    short_side_bytes: Any,
) -> str:
    per_image = nbytes / max(n_images, 1)
    if image_size is not None:
        what = f"{n_images:,} images at {image_size[0]}x{image_size[1]} ({_mb(per_image)} each)"
    else:
        what = f"{n_images:,} images of mixed sizes ({_mb(per_image)} each on average)"
    if short_side is not None:
        what += f" with short_side={short_side}"
    store = (f"{_gb(budget.object_store_bytes)} object store (Ray's default: "
             f"{RAY_OBJECT_STORE_PROPORTION:.0%} of available memory)" if budget.object_store_default
             else f"{_gb(budget.object_store_bytes)} object store")
    lines = [
        f"dataset {dataset}: {what} decode to {_gb(nbytes)} of uint8 RGB, more than this machine holds: the "
        f"decoded cache must be at most {OBJECT_STORE_FRACTION:.0%} of the {store} = "
        f"{_gb(OBJECT_STORE_FRACTION * budget.object_store_bytes)} and at most {MEMORY_FRACTION:.0%} of the "
        f"{_gb(budget.available_memory)} of available memory = {_gb(MEMORY_FRACTION * budget.available_memory)} "
        f"(decoding and putting it in the store peak at up to 2.9x the decoded size in the driver), so at most "
        f"{_gb(budget.limit)} here."
    ]
    suggestion = suggest_image_size(image_size, n_images, budget.limit, min_side=min_side)
    fixes = []
    if suggestion is not None:
        w, h = suggestion
        fixes.append(f"--set image_size=[{w},{h}] ({_gb(n_images * w * h * 3)} decoded"
                     + (", same aspect ratio)" if image_size is not None else ", assuming 4:3 photos)"))
        side = min(w, h)
        if short_side_bytes is not None:  # the largest short side whose bytes fit (they grow with it)
            lo, hi = 0, 1 << 16
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if short_side_bytes(mid) <= budget.limit else (lo, mid - 1)
            side = lo
        if side >= max(min_side, 1):
            fixes.append(f"--set short_side={side} (keeps each image's own aspect ratio"
                         + ("" if short_side_bytes is not None else "; fits for photos no wider than "
                            f"{max(w, h)}:{min(w, h)}") + ")")
    if fixes:
        lines.append("Set image_size smaller so it fits: " + " or ".join(fixes)
                     + "; or run on a machine with more memory.")
    else:
        lines.append(f"Setting image_size (or short_side) smaller does not help: even with a short side of "
                     f"{max(min_side, 1)} px the {n_images:,} images do not fit; use a machine with more memory, a "
                     "bigger object store (ray start --object-store-memory), or fewer images.")
    return " ".join(lines)


def preflight_decoded(
    table: pd.DataFrame,
    *,
    dataset: str,
    image_size: Sequence[int] | None = None,
    short_side: int | None = None,
    min_side: int = 0,
    available_memory: int | None = None,
    object_store_bytes: int | None = None,
) -> DecodedEstimate:
    """Estimate the decoded cache of ``table`` and refuse it when it does not fit: one call.

    :func:`estimate_decoded` then :func:`check_decoded_fits` with the typical decoded size, and a
    ``short_side`` suggestion checked against the headers actually read.

    Returns:
        The estimate, when it fits.

    Raises:
        PreflightError: it does not fit (see :func:`check_decoded_fits`).
        DatasetError: a header cannot be read.
    """
    estimate = estimate_decoded(table, image_size=image_size, short_side=short_side)
    budget = decoded_budget(available_memory=available_memory, object_store_bytes=object_store_bytes)
    if estimate.nbytes <= budget.limit:
        return estimate
    short_side_bytes: Callable[[int], float] | None = None
    if estimate.sizes:
        scale = estimate.n_images / len(estimate.sizes)
        sizes = estimate.sizes

        def _short_side_bytes(side: int) -> float:
            return scale * sum(w * h * 3 for w, h in (short_side_size(sw, sh, side) for sw, sh in sizes))

        short_side_bytes = _short_side_bytes

    raise PreflightError(_refusal(estimate.nbytes, budget, n_images=estimate.n_images,
                                  image_size=image_size if image_size is not None else estimate.typical_size,
                                  dataset=dataset, short_side=short_side, min_side=min_side,
                                  short_side_bytes=short_side_bytes))
