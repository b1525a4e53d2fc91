"""Photometric distortions: contrast, brightness (over-exposure), saturation and colour quantisation."""

from __future__ import annotations

import numpy as np

from iqa_ray.data.distortions.checks import to_uint8
from iqa_ray.data.distortions.levels import brightness_gain_offset, contrast_factor, quant_values, saturation_factor

__all__ = ["brightness", "color_quantization", "contrast", "saturation"]


def contrast(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Reduce contrast toward the image mean: ``m + c * (x - m)``, ``c = 1 - 0.85 * level``.

    The mean is taken over all pixels and channels, so colours keep their balance.

    Args:
        image: RGB uint8 image, shape (H, W, 3).
        level: Strength in [0, 1].
        rng: Unused; accepted for a uniform signature.

    Returns:
        The low-contrast image, a new uint8 array of the same shape.
    """
    values = image.astype(np.float32)
    mean = np.float32(values.mean())
    return to_uint8(mean + np.float32(contrast_factor(level)) * (values - mean))


def brightness(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Over-expose: ``clip(g * x + b)``, gain ``g = 1 + 1.5 * level``, offset ``b = 50 * level``.

    The gain and the offset both push highlights into saturation at 255, where detail is lost,
    so the damage grows with the level.

    Args:
        image: RGB uint8 image, shape (H, W, 3).
        level: Strength in [0, 1].
        rng: Unused; accepted for a uniform signature.

    Returns:
        The brightened image, a new uint8 array of the same shape.
    """
    gain, offset = brightness_gain_offset(level)
    return to_uint8(image.astype(np.float32) * np.float32(gain) + np.float32(offset))


_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def saturation(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Desaturate toward the Rec. 601 luma ``Y``: ``Y + s * (x - Y)``, ``s = 1 - level``.

    A grey image (all channels equal) is returned unchanged.

    Args:
        image: RGB uint8 image, shape (H, W, 3).
        level: Strength in [0, 1].
        rng: Unused; accepted for a uniform signature.

    Returns:
        The desaturated image, a new uint8 array of the same shape.
    """
    values = image.astype(np.float64)
    luma = (values @ _LUMA_WEIGHTS)[..., None]
    return to_uint8(luma + saturation_factor(level) * (values - luma))


def color_quantization(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Quantise each channel uniformly to ``round(2 ** (8 - 6.5 * level))`` values (256 .. 3).

    Each value falls into one of ``q`` equal bins of [0, 256) and is replaced by the bin centre
    (rounded down), so 256 bins are the identity.

    Args:
        image: RGB uint8 image, shape (H, W, 3).
        level: Strength in [0, 1].
        rng: Unused; accepted for a uniform signature.

    Returns:
        The quantised image, a new uint8 array of the same shape.
    """
    q = quant_values(level)
    codes = np.arange(256, dtype=np.float64)
    bins = np.floor(codes * q / 256.0)
    table = np.clip(np.floor((bins + 0.5) * 256.0 / q), 0, 255).astype(np.uint8)
    return table[image]
