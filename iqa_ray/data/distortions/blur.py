"""Blur distortions: an isotropic Gaussian and a linear motion blur."""

from __future__ import annotations

import math

import cv2
import numpy as np

from iqa_ray.data.distortions.checks import to_uint8
from iqa_ray.data.distortions.levels import blur_sigma, motion_length

__all__ = ["gaussian_blur", "motion_blur"]


def gaussian_blur(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Blur with an isotropic Gaussian kernel, ``sigma = 5 * level ** 1.5`` px.

    Args:
        image: RGB uint8 image, shape (H, W, 3).
        level: Strength in [0, 1].
        rng: Unused; accepted for a uniform signature.

    Returns:
        The blurred image, a new uint8 array of the same shape.
    """
    sigma = blur_sigma(level)
    if sigma <= 0:
        return image.copy()
    radius = max(1, int(math.ceil(4.0 * sigma)))
    out = cv2.GaussianBlur(
        image.astype(np.float32), (2 * radius + 1, 2 * radius + 1), sigma, sigma, cv2.BORDER_REFLECT_101
    )
    return to_uint8(out)


def _line_kernel(length: float, angle: float) -> np.ndarray:
    """A normalised, anti-aliased line kernel of ``length`` px at ``angle`` radians.

    The segment is sampled densely (8 samples per px) and each sample is spread bilinearly over
    its four neighbouring kernel cells, so the kernel changes continuously with ``length`` (a
    length of 0 is a unit impulse).
    """
    half = length / 2.0
    radius = int(math.ceil(half)) + 1
    size = 2 * radius + 1
    kernel = np.zeros((size, size), dtype=np.float64)
    n = max(2, int(math.ceil(8.0 * length)) + 1)
    t = np.linspace(-half, half, n)
    x = radius + t * math.cos(angle)
    y = radius - t * math.sin(angle)
    x0 = np.floor(x).astype(int)
    y0 = np.floor(y).astype(int)
    fx = x - x0
    fy = y - y0
    for dy, dx, w in (
        (0, 0, (1 - fx) * (1 - fy)),
        (0, 1, fx * (1 - fy)),
        (1, 0, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        np.add.at(kernel, (y0 + dy, x0 + dx), w)
    return kernel / kernel.sum()


def motion_blur(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Linear motion blur: an anti-aliased line kernel of length ``24 * level ** 1.3`` px.

    The direction is drawn uniformly in [0, 180) degrees from ``rng`` (one draw, whatever the
    level).

    Args:
        image: RGB uint8 image, shape (H, W, 3).
        level: Strength in [0, 1].
        rng: Source of the blur direction.

    Returns:
        The blurred image, a new uint8 array of the same shape.
    """
    angle = float(rng.uniform(0.0, math.pi))
    length = motion_length(level)
    if length <= 0:
        return image.copy()
    kernel = _line_kernel(length, angle).astype(np.float32)
    out = cv2.filter2D(image.astype(np.float32), -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    return to_uint8(out)
