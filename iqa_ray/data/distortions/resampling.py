"""Resampling distortions: down- then up-sampling with one filter (the super-resolution degradation),
and pixelation (block averages enlarged with nearest neighbour)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from iqa_ray.data.distortions.levels import pixel_block, resample_scale

__all__ = ["pixelation", "resample_bicubic", "resample_bilinear", "resample_nearest"]


def _resample(image: np.ndarray, level: float, resample: Image.Resampling) -> np.ndarray:
    scale = resample_scale(level)
    height, width = image.shape[:2]
    small = (max(1, round(width / scale)), max(1, round(height / scale)))
    if small == (width, height):
        return image.copy()
    pil = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    return np.array(pil.resize(small, resample).resize((width, height), resample), dtype=np.uint8)


def resample_nearest(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Down- then up-sample with nearest neighbour, ``scale = 1 + 3 * level``.

    Args:
        image: RGB uint8 image, shape (H, W, 3).
        level: Strength in [0, 1].
        rng: Unused; accepted for a uniform signature.

    Returns:
        The resampled image at the original size, a new uint8 array.
    """
    return _resample(image, level, Image.Resampling.NEAREST)


def resample_bilinear(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Down- then up-sample with (antialiased) bilinear filtering, ``scale = 1 + 3 * level``.

    Args:
        image: RGB uint8 image, shape (H, W, 3).
        level: Strength in [0, 1].
        rng: Unused; accepted for a uniform signature.

    Returns:
        The resampled image at the original size, a new uint8 array.
    """
    return _resample(image, level, Image.Resampling.BILINEAR)


def resample_bicubic(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Down- then up-sample with (antialiased) bicubic filtering, ``scale = 1 + 3 * level``.

    Args:
        image: RGB uint8 image, shape (H, W, 3).
        level: Strength in [0, 1].
        rng: Unused; accepted for a uniform signature.

    Returns:
        The resampled image at the original size, a new uint8 array.
    """
    return _resample(image, level, Image.Resampling.BICUBIC)


def pixelation(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Average into blocks of about ``1 + 9 * level ** 1.2`` px, then enlarge with nearest neighbour.

    The image is box-filtered down to ``round(H / b) x round(W / b)`` (PIL ``BOX``, which handles
    fractional block sizes exactly) and enlarged back to ``H x W`` with nearest neighbour.

    Args:
        image: RGB uint8 image, shape (H, W, 3).
        level: Strength in [0, 1].
        rng: Unused; accepted for a uniform signature.

    Returns:
        The pixelated image, a new uint8 array of the same shape.
    """
    block = pixel_block(level)
    height, width = image.shape[:2]
    small = (max(1, round(width / block)), max(1, round(height / block)))
    if small == (width, height):
        return image.copy()
    pil = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    down = pil.resize(small, Image.Resampling.BOX)
    return np.array(down.resize((width, height), Image.Resampling.NEAREST), dtype=np.uint8)
