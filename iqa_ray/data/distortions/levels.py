"""Level -> parameter mappings, one per distortion type, shared by the functions and the registry's
descriptions of them (the table in :mod:`iqa_ray.data.distortions` lists them)."""

from __future__ import annotations

__all__ = [
    "blur_sigma", "brightness_gain_offset", "contrast_factor", "impulse_fraction", "j2k_rate", "jpeg_quality",
    "motion_length", "noise_sigma", "pixel_block", "quant_values", "resample_scale", "saturation_factor",
    "webp_quality",
]


def blur_sigma(level: float) -> float:
    return 5.0 * level**1.5


def motion_length(level: float) -> float:
    return 24.0 * level**1.3


def noise_sigma(level: float) -> float:
    return 30.0 * level**1.5


def impulse_fraction(level: float) -> float:
    return 0.05 * level**1.5


def jpeg_quality(level: float) -> int:
    return int(round(2.0 * 50.0 ** (1.0 - level)))


def webp_quality(level: float) -> int:
    return int(round(100.0 * (1.0 - level) ** 2))


def j2k_rate(level: float) -> float:
    return 300.0**level


def resample_scale(level: float) -> float:
    return 1.0 + 3.0 * level


def contrast_factor(level: float) -> float:
    return 1.0 - 0.85 * level


def brightness_gain_offset(level: float) -> tuple[float, float]:
    return 1.0 + 1.5 * level, 50.0 * level


def saturation_factor(level: float) -> float:
    return 1.0 - level


def pixel_block(level: float) -> float:
    return 1.0 + 9.0 * level**1.2


def quant_values(level: float) -> int:
    return int(round(2.0 ** (8.0 - 6.5 * level)))

