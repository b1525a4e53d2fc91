"""Compression distortions: a round trip through a lossy codec (JPEG, WebP, JPEG 2000) with PIL."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, features

from iqa_ray.data.distortions.levels import j2k_rate, jpeg_quality, webp_quality

__all__ = ["JPEG2000_AVAILABLE", "WEBP_AVAILABLE", "jpeg", "jpeg2000", "webp"]

JPEG2000_AVAILABLE: bool = bool(features.check("jpg_2000"))
"""Whether this Pillow build can encode JPEG 2000 (needs OpenJPEG)."""

WEBP_AVAILABLE: bool = bool(features.check("webp"))
"""Whether this Pillow build can encode WebP (needs libwebp)."""


def _codec_round_trip(image: np.ndarray, fmt: str, **params: object) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(buffer, format=fmt, **params)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.array(decoded.convert("RGB"), dtype=np.uint8)


def jpeg(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """JPEG compression round trip with PIL, ``quality = round(2 * 50 ** (1 - level))`` (100 .. 2).

    Args:
        image: RGB uint8 image, shape (H, W, 3).
        level: Strength in [0, 1].
        rng: Unused; accepted for a uniform signature.

    Returns:
        The decoded image, a new uint8 array of the same shape.
    """
    return _codec_round_trip(image, "JPEG", quality=jpeg_quality(level))


def webp(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Lossy WebP compression round trip with PIL, ``quality = round(100 * (1 - level) ** 2)``.

    Args:
        image: RGB uint8 image, shape (H, W, 3).
        level: Strength in [0, 1].
        rng: Unused; accepted for a uniform signature.

    Returns:
        The decoded image, a new uint8 array of the same shape.

    Raises:
        RuntimeError: This Pillow build has no WebP support.
    """
    if not WEBP_AVAILABLE:
        raise RuntimeError("the 'webp' distortion needs Pillow built with WebP support (libwebp)")
    return _codec_round_trip(image, "WEBP", quality=webp_quality(level), method=4)


def jpeg2000(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """JPEG 2000 compression round trip with PIL/OpenJPEG, compression ratio ``300 ** level``.

    The reversible 5/3 wavelet is used, so the distortion fades continuously into lossless
    coding as the ratio approaches 1; level 0 (ratio 1, lossless) returns a copy without coding.

    Args:
        image: RGB uint8 image, shape (H, W, 3).
        level: Strength in [0, 1].
        rng: Unused; accepted for a uniform signature.

    Returns:
        The decoded image, a new uint8 array of the same shape.

    Raises:
        RuntimeError: This Pillow build has no JPEG 2000 support.
    """
    if not JPEG2000_AVAILABLE:
        raise RuntimeError("the 'jpeg2000' distortion needs Pillow built with JPEG 2000 support (OpenJPEG)")
    rate = j2k_rate(level)
    # OpenJPEG needs every resolution level to keep at least one pixel.
    resolutions = max(1, min(6, int(math.floor(math.log2(min(image.shape[:2])))) + 1))
    if rate <= 1.0:
        # A ratio of 1 is lossless coding, whose round trip is the identity.
        return image.copy()
    return _codec_round_trip(
        image,
        "JPEG2000",
        quality_mode="rates",
        quality_layers=[rate],
        irreversible=False,
        num_resolutions=resolutions,
    )
