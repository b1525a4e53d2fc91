"""Reference image sources: where pristine photos come from before they are distorted.

A source lists :class:`ReferenceInfo` records (cheap metadata, picklable, so Ray workers can
receive them) and :func:`load_reference` decodes one record into an RGB ``uint8`` array inside
whichever process needs it. Four kinds are supported:

``embedded``
    Real photographs that ship inside installed packages (scikit-image's ``data`` folder and
    scikit-learn's sample images), so the default dataset needs no download. The catalogue
    below records each photo's package, loader call, size and licence; it is copied into every
    generated dataset's manifest.
``folder``
    Every image file below a folder (``.jpg .jpeg .png .bmp .tif .tiff .webp``).
``hf_disk``
    A Hugging Face dataset saved with ``Dataset.save_to_disk`` (the seeds used STL-10 and
    ImageNet this way).
``hf``
    A Hugging Face dataset loaded by name from the hub. For users with internet only; offline
    it fails at once with a message naming the offline alternatives.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from iqa_ray.core.errors import DatasetError
from iqa_ray.core.net import hub_reachable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SOURCE_KINDS = ("embedded", "folder", "hf_disk", "hf")

PUBLIC_DOMAIN = "public domain"
CC0 = "CC0 1.0"
CC_BY_2 = "CC BY 2.0"
NO_KNOWN = "no known copyright restrictions (per scikit-image)"


@dataclass(frozen=True)
class ReferenceInfo:
    """One reference photo: enough to load it anywhere and to attribute it.

    Attributes:
        key: unique, stable id (e.g. ``skimage:astronaut`` or a relative file path).
        group: content group used for splitting (the source photo).
        kind: one of :data:`SOURCE_KINDS`.
        locator: what the loader needs (a package call name, a file path, ``path::index``).
        package: the package or folder the photo comes from.
        call: the exact call that returns it.
        licence: licence of the photo.
        width: width in pixels (0 when unknown without decoding).
        height: height in pixels.
        grey: True when the photo is single-channel (replicated to RGB on load).
    """

    key: str
    group: str
    kind: str
    locator: str
    package: str
    call: str
    licence: str
    width: int = 0
    height: int = 0
    grey: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The embedded set: every real photograph bundled with scikit-image 0.26 and scikit-learn 1.9.
# Excluded on purpose: synthetic images (chessboard, color, logo, phantom, horse silhouette),
# tiny or multi-page files, `clock` (already motion-blurred, so it cannot serve as a pristine
# reference) and `motorcycle_right` (same scene as motorcycle_left).
# (name, package, call, licence, note)
_EMBEDDED_CATALOGUE: tuple[tuple[str, str, str, str, str], ...] = (
    ("astronaut", "scikit-image", "skimage.data.astronaut()", PUBLIC_DOMAIN, "NASA photograph of Eileen Collins"),
    ("brick", "scikit-image", "skimage.data.brick()", CC0, "brick wall, CC0Textures"),
    ("camera", "scikit-image", "skimage.data.camera()", CC0, "cameraman, photographer Lav Varshney"),
    ("cell", "scikit-image", "skimage.data.cell()", CC0, "quantitative phase image of a cell"),
    ("chelsea", "scikit-image", "skimage.data.chelsea()", CC0, "Chelsea the cat, photographer Stefan van der Walt"),
    ("coffee", "scikit-image", "skimage.data.coffee()", CC0, "coffee cup, photographer Rachel Michetti"),
    ("coins", "scikit-image", "skimage.data.coins()", NO_KNOWN, "Greek coins, Brooklyn Museum"),
    ("grass", "scikit-image", "skimage.data.grass()", CC0, "grass, DeviantArt linolafett"),
    ("gravel", "scikit-image", "skimage.data.gravel()", CC0, "gravel, CC0Textures"),
    ("hubble_deep_field", "scikit-image", "skimage.data.hubble_deep_field()", PUBLIC_DOMAIN, "NASA Hubble XDF"),
    ("immunohistochemistry", "scikit-image", "skimage.data.immunohistochemistry()", NO_KNOWN, "IHC stained tissue, CMMI"),
    ("moon", "scikit-image", "skimage.data.moon()", "not stated by scikit-image (BSD-3-Clause package data)", "surface of the moon"),
    ("motorcycle_left", "scikit-image", "skimage.data.stereo_motorcycle()[0]", "Middlebury 2014 stereo benchmark (Scharstein et al.), research use", "motorcycle, left view"),
    ("page", "scikit-image", "skimage.data.page()", "not stated by scikit-image (BSD-3-Clause package data)", "scanned printed page"),
    ("retina", "scikit-image", "skimage.data.retina()", CC0, "fundus photograph, Mikael Haggstrom"),
    ("rocket", "scikit-image", "skimage.data.rocket()", PUBLIC_DOMAIN, "SpaceX DSCOVR launch"),
    ("text", "scikit-image", "skimage.data.text()", PUBLIC_DOMAIN, "photographed text, Wikipedia Corner.png"),
    ("china", "scikit-learn", "sklearn.datasets.load_sample_image('china.jpg')", CC_BY_2, "Flickr danielbuechele"),
    ("flower", "scikit-learn", "sklearn.datasets.load_sample_image('flower.jpg')", CC_BY_2, "Flickr vultilion"),
)


def embedded_references() -> list[ReferenceInfo]:
    """The embedded catalogue, with sizes read from the decoded photos."""
    refs = []
    for name, package, call, licence, _note in _EMBEDDED_CATALOGUE:
        image = _load_embedded(name)
        refs.append(
            ReferenceInfo(
                key=f"{'skimage' if package == 'scikit-image' else 'sklearn'}:{name}",
                group=name,
                kind="embedded",
                locator=name,
                package=package,
                call=call,
                licence=licence,
                width=int(image.shape[1]),
                height=int(image.shape[0]),
                grey=_raw_is_grey(name),
            )
        )
    return refs


@functools.lru_cache(maxsize=None)
def _raw_embedded(name: str) -> np.ndarray:
    if name == "motorcycle_left":
        from skimage import data

        return data.stereo_motorcycle()[0]
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    from skimage import data

    known = {entry[0] for entry in _EMBEDDED_CATALOGUE}
    if name not in known:
        raise KeyError(f"unknown embedded photo {name!r}; valid: {sorted(known)}")
    return getattr(data, name)()


def _raw_is_grey(name: str) -> bool:
    return _raw_embedded(name).ndim == 2


def _load_embedded(name: str) -> np.ndarray:
    return to_rgb_uint8(_raw_embedded(name))


def to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """Convert a grey, RGB or RGBA array to contiguous RGB uint8 (grey is replicated)."""
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {array.dtype}")
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    elif not (array.ndim == 3 and array.shape[2] == 3):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {array.shape}")
    return np.ascontiguousarray(array)


def decode_image_file(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file fully into RGB uint8, raising :class:`DatasetError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise DatasetError(f"image file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as im:
            im.load()  # forces a full decode so truncated files fail here, not later
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from exc


def folder_references(root: str | os.PathLike[str]) -> tuple[list[ReferenceInfo], list[dict[str, str]]]:
    """All images below ``root``, sorted by relative path.

    Sizes come from the file header only (cheap); a file whose header cannot be read is
    returned in the second list with its path and the error instead of aborting the listing.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"reference folder not found or not a directory: {root}")
    refs: list[ReferenceInfo] = []
    failed: list[dict[str, str]] = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        rel = path.relative_to(root).as_posix()
        try:
            with Image.open(path) as im:
                width, height = im.size
                grey = im.mode in ("L", "I", "I;16", "1", "F", "LA")
        except (OSError, SyntaxError, ValueError) as exc:
            failed.append({"path": str(path), "error": f"{type(exc).__name__}: {exc}"})
            continue
        refs.append(
            ReferenceInfo(
                key=rel, group=rel, kind="folder", locator=str(path.resolve()), package=str(root.resolve()),
                call=f"PIL.Image.open({rel!r})", licence="user-provided", width=width, height=height, grey=grey,
            )
        )
    if not refs and not failed:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found below {root}")
    return refs, failed


def _image_column(features: Any, column: str | None, where: str) -> str:
    names = list(features.keys())
    if column is not None:
        if column not in names:
            raise DatasetError(f"column {column!r} not in Hugging Face dataset {where}; columns: {names}")
        return column
    from datasets import Image as HFImage

    image_cols = [n for n, f in features.items() if isinstance(f, HFImage)]
    if not image_cols:
        raise DatasetError(f"no image column in Hugging Face dataset {where}; columns: {names}; pass image_column=")
    return image_cols[0]


@functools.lru_cache(maxsize=8)
def _open_hf_disk(path: str, split: str | None) -> Any:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as exc:
        raise DatasetError(f"no Hugging Face dataset saved at {path} (expected Dataset.save_to_disk output)") from exc
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        chosen = split or ("train" if "train" in ds else splits[0])
        if chosen not in ds:
            raise DatasetError(f"split {chosen!r} not in Hugging Face dataset at {path}; splits: {splits}")
        ds = ds[chosen]
    return ds


def hf_disk_references(
    path: str | os.PathLike[str], *, split: str | None = None, image_column: str | None = None, limit: int | None = None
) -> list[ReferenceInfo]:
    """References from a Hugging Face dataset saved on disk; each row is its own group."""
    path = str(Path(path).resolve())
    ds = _open_hf_disk(path, split)
    column = _image_column(ds.features, image_column, path)
    n = len(ds) if limit is None else min(limit, len(ds))
    return [
        ReferenceInfo(
            key=f"hf_disk:{i}", group=f"hf_disk:{i}", kind="hf_disk", locator=f"{path}::{split or ''}::{column}::{i}",
            package=path, call=f"datasets.load_from_disk({path!r})[{i}][{column!r}]",
            licence="see the dataset card", width=0, height=0, grey=False,
        )
        for i in range(n)
    ]


def hf_hub_references(name: str, *, split: str = "train", image_column: str | None = None,
                      limit: int | None = None, cache_dir: str | os.PathLike[str] | None = None) -> list[ReferenceInfo]:
    """Download a Hugging Face dataset by name, save it locally, and list it like ``hf_disk``.

    Requires internet. Offline (or with ``HF_HUB_OFFLINE=1``) it fails within seconds with a
    message naming the offline options instead of hanging in retries.
    """
    reachable, reason = hub_reachable()
    if not reachable:
        raise DatasetError(
            f"cannot load Hugging Face dataset {name!r} by name: the hub is not reachable ({reason}). "
            "Offline options: --source embedded (photos shipped in pip packages), "
            "--source folder --source-path DIR (your own images), or --source hf_disk --source-path DIR "
            "(a dataset saved earlier with datasets.Dataset.save_to_disk on a machine with internet)."
        )
    import datasets

    target = Path(cache_dir or Path.home() / ".cache" / "iqa_ray" / "hf") / name.replace("/", "__") / split
    if not (target / "dataset_info.json").exists():
        ds = datasets.load_dataset(name, split=split)
        ds.save_to_disk(str(target))
    return hf_disk_references(target, image_column=image_column, limit=limit)


def load_reference(ref: ReferenceInfo) -> np.ndarray:
    """Decode a reference into an RGB uint8 array (H, W, 3).

    Raises:
        DatasetError: the file is missing, empty, truncated or not an image.
    """
    if ref.kind == "embedded":
        return _load_embedded(ref.locator)
    if ref.kind == "folder":
        return decode_image_file(ref.locator)
    if ref.kind == "hf_disk":
        path, split, column, index = ref.locator.split("::")
        row = _open_hf_disk(path, split or None)[int(index)]
        image = row[column]
        if not isinstance(image, Image.Image):
            raise DatasetError(f"row {index} of {path} column {column!r} is {type(image).__name__}, not an image")
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    raise ValueError(f"unknown reference kind {ref.kind!r}; valid: {SOURCE_KINDS}")
