"""The contract every distortion keeps: the arguments it accepts (checked here) and its output, a new
``uint8`` array rounded and clipped to 0-255."""

from __future__ import annotations

import numpy as np

__all__ = ["check_image", "check_level", "check_rng", "to_uint8"]


def check_level(level: float) -> float:
    """Return ``level`` as a float, or raise ``ValueError`` if it is not a number in [0, 1]."""
    if isinstance(level, (bool, np.bool_)) or not isinstance(level, (int, float, np.integer, np.floating)):
        raise ValueError(f"level must be a number in the range [0, 1], got {level!r}")
    value = float(level)
    if not (0.0 <= value <= 1.0):  # also false for NaN
        raise ValueError(f"level must be in the range [0, 1], got {value!r}")
    return value


def check_image(image: np.ndarray) -> None:
    """Raise ``ValueError`` unless ``image`` is a non-empty uint8 array of shape (H, W, 3)."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy uint8 array of shape (H, W, 3), got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(
            f"image must be a uint8 array of shape (H, W, 3), got dtype {image.dtype} and shape {image.shape}"
        )


def check_rng(rng: np.random.Generator) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Round and clip float values to a new uint8 array."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
