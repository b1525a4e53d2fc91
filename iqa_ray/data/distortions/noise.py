"""Noise distortions: additive Gaussian noise and salt-and-pepper (impulse) noise."""

from __future__ import annotations

import numpy as np

from iqa_ray.data.distortions.checks import to_uint8
from iqa_ray.data.distortions.levels import impulse_fraction, noise_sigma

__all__ = ["gaussian_noise", "impulse_noise"]


def gaussian_noise(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Add i.i.d. Gaussian noise per pixel and channel, ``sigma = 30 * level ** 1.5`` (0-255 scale).

    Args:
        image: RGB uint8 image, shape (H, W, 3).
        level: Strength in [0, 1].
        rng: Source of the noise (one standard-normal draw per value, whatever the level).

    Returns:
        The noisy image, clipped to [0, 255], a new uint8 array of the same shape.
    """
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    return to_uint8(image.astype(np.float32) + np.float32(noise_sigma(level)) * noise)


def impulse_noise(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Salt-and-pepper noise: a fraction ``0.05 * level ** 1.5`` of pixels set to black or white.

    Each pixel draws one uniform number; it is hit when that number is below the fraction, so
    the hit pixels at a level are a subset of those at any higher level (for the same seed).
    Hit pixels become white or black with equal probability, in all three channels.

    Args:
        image: RGB uint8 image, shape (H, W, 3).
        level: Strength in [0, 1].
        rng: Source of the hit positions and their colours.

    Returns:
        The noisy image, a new uint8 array of the same shape.
    """
    height, width = image.shape[:2]
    hit = rng.random((height, width)) < impulse_fraction(level)
    salt = rng.random((height, width)) < 0.5
    out = image.copy()
    out[hit & salt] = 255
    out[hit & ~salt] = 0
    return out
