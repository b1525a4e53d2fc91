"""The distortion registry: every type by name with its description (:data:`DISTORTIONS`),
:func:`get_distortion` and :func:`apply_distortion`, which validate and dispatch, the strength presets
with :func:`sample_levels`, and :func:`is_grey`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from iqa_ray.data.distortions.blur import gaussian_blur, motion_blur
from iqa_ray.data.distortions.checks import check_image, check_level, check_rng
from iqa_ray.data.distortions.compression import jpeg, jpeg2000, webp
from iqa_ray.data.distortions.levels import (
    blur_sigma,
    brightness_gain_offset,
    contrast_factor,
    impulse_fraction,
    j2k_rate,
    jpeg_quality,
    motion_length,
    noise_sigma,
    pixel_block,
    quant_values,
    resample_scale,
    saturation_factor,
    webp_quality,
)
from iqa_ray.data.distortions.noise import gaussian_noise, impulse_noise
from iqa_ray.data.distortions.photometric import brightness, color_quantization, contrast, saturation
from iqa_ray.data.distortions.resampling import pixelation, resample_bicubic, resample_bilinear, resample_nearest

__all__ = [
    "DISTORTIONS",
    "STRENGTH_PRESETS",
    "Distortion",
    "DistortionFn",
    "UnknownNameError",
    "apply_distortion",
    "get_distortion",
    "is_grey",
    "sample_levels",
]

STRENGTH_PRESETS: dict[str, tuple[float, float]] = {
    "light": (0.1, 0.4),
    "medium": (0.2, 0.6),
    "heavy": (0.3, 1.0),
}
"""Named level ranges ``(low, high)``; :func:`sample_levels` draws uniformly inside one."""

DistortionFn = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


class UnknownNameError(KeyError, ValueError):
    """An unknown distortion type or strength preset was asked for.

    Subclasses both ``KeyError`` (a failed registry lookup) and ``ValueError`` (a bad argument).
    The message lists the valid names.
    """

    def __str__(self) -> str:
        # KeyError would otherwise show the message with quotes around it.
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Distortion:
    """One registered distortion type.

    Attributes:
        name: Registry key, e.g. ``"gaussian_blur"``.
        fn: The pure function ``fn(image, level, rng) -> image``.
        needs_color: True when the distortion is a no-op on grey images (all channels equal),
            so a pre-generator should skip it for grey references.
        description: One-line description of the distortion and its level mapping.
        describe: Maps a level in [0, 1] to the human-readable parameter it stands for.
    """

    name: str
    fn: DistortionFn
    needs_color: bool
    description: str
    describe: Callable[[float], str]

    def parameter(self, level: float) -> str:
        """The human-readable parameter at ``level``, e.g. ``"sigma=2.10 px"``.

        Args:
            level: Strength in [0, 1].

        Returns:
            A short description of the distortion parameter at that level.

        Raises:
            ValueError: ``level`` is not a number in [0, 1].
        """
        return self.describe(check_level(level))

    def __call__(self, image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
        """Validate the arguments and apply the distortion (see :func:`apply_distortion`)."""
        check_image(image)
        level = check_level(level)
        check_rng(rng)
        return self.fn(image, level, rng)


def _resample_describe(level: float) -> str:
    scale = resample_scale(level)
    return f"scale=x{scale:.2f}"


DISTORTIONS: dict[str, Distortion] = {
    "gaussian_blur": Distortion(
        name="gaussian_blur",
        fn=gaussian_blur,
        needs_color=False,
        description="Isotropic Gaussian blur, sigma = 5 * level ** 1.5 px.",
        describe=lambda level: f"sigma={blur_sigma(level):.2f} px",
    ),
    "motion_blur": Distortion(
        name="motion_blur",
        fn=motion_blur,
        needs_color=False,
        description="Linear motion blur, anti-aliased line of 24 * level ** 1.3 px at a random angle.",
        describe=lambda level: f"length={motion_length(level):.2f} px, random angle",
    ),
    "gaussian_noise": Distortion(
        name="gaussian_noise",
        fn=gaussian_noise,
        needs_color=False,
        description="Additive Gaussian noise per pixel and channel, sigma = 30 * level ** 1.5 (0-255 scale).",
        describe=lambda level: f"sigma={noise_sigma(level):.1f} (0-255)",
    ),
    "impulse_noise": Distortion(
        name="impulse_noise",
        fn=impulse_noise,
        needs_color=False,
        description="Salt-and-pepper noise on a fraction 0.05 * level ** 1.5 of the pixels.",
        describe=lambda level: f"fraction={impulse_fraction(level):.3f}",
    ),
    "jpeg": Distortion(
        name="jpeg",
        fn=jpeg,
        needs_color=False,
        description="JPEG compression (PIL), quality = round(2 * 50 ** (1 - level)).",
        describe=lambda level: f"quality={jpeg_quality(level)}",
    ),
    "webp": Distortion(
        name="webp",
        fn=webp,
        needs_color=False,
        description="Lossy WebP compression (PIL), quality = round(100 * (1 - level) ** 2).",
        describe=lambda level: f"quality={webp_quality(level)}",
    ),
    "jpeg2000": Distortion(
        name="jpeg2000",
        fn=jpeg2000,
        needs_color=False,
        description="JPEG 2000 compression (PIL/OpenJPEG, 5/3 wavelet), compression ratio 300 ** level.",
        describe=lambda level: f"rate={j2k_rate(level):.1f}:1",
    ),
    "resample_nearest": Distortion(
        name="resample_nearest",
        fn=resample_nearest,
        needs_color=False,
        description="Nearest-neighbour down/up-sampling, scale = 1 + 3 * level.",
        describe=_resample_describe,
    ),
    "resample_bilinear": Distortion(
        name="resample_bilinear",
        fn=resample_bilinear,
        needs_color=False,
        description="Antialiased bilinear down/up-sampling, scale = 1 + 3 * level.",
        describe=_resample_describe,
    ),
    "resample_bicubic": Distortion(
        name="resample_bicubic",
        fn=resample_bicubic,
        needs_color=False,
        description="Antialiased bicubic down/up-sampling, scale = 1 + 3 * level.",
        describe=_resample_describe,
    ),
    "contrast": Distortion(
        name="contrast",
        fn=contrast,
        needs_color=False,
        description="Contrast reduction toward the image mean, factor 1 - 0.85 * level.",
        describe=lambda level: f"contrast={contrast_factor(level):.2f}",
    ),
    "brightness": Distortion(
        name="brightness",
        fn=brightness,
        needs_color=False,
        description="Over-exposure with clipping: gain 1 + 1.5 * level, offset 50 * level.",
        describe=lambda level: "gain={:.2f}, offset={:.1f}".format(*brightness_gain_offset(level)),
    ),
    "saturation": Distortion(
        name="saturation",
        fn=saturation,
        needs_color=True,
        description="Desaturation toward luma, saturation factor 1 - level.",
        describe=lambda level: f"saturation={saturation_factor(level):.2f}",
    ),
    "pixelation": Distortion(
        name="pixelation",
        fn=pixelation,
        needs_color=False,
        description="Block averaging with nearest upsampling, block of 1 + 9 * level ** 1.2 px.",
        describe=lambda level: f"block={pixel_block(level):.2f} px",
    ),
    "color_quantization": Distortion(
        name="color_quantization",
        fn=color_quantization,
        needs_color=False,
        description="Uniform quantisation to round(2 ** (8 - 6.5 * level)) values per channel.",
        describe=lambda level: f"values_per_channel={quant_values(level)}",
    ),
}
"""All distortion types, by name."""


def get_distortion(name: str) -> Distortion:
    """Look up a distortion type by name.

    Args:
        name: A key of :data:`DISTORTIONS`.

    Returns:
        The registered :class:`Distortion`.

    Raises:
        UnknownNameError: ``name`` is not registered (a ``KeyError`` and a ``ValueError``); the
            message lists the valid names.
    """
    try:
        return DISTORTIONS[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(DISTORTIONS))
        raise UnknownNameError(f"unknown distortion {name!r}; valid names are: {valid}") from None


def apply_distortion(name: str, image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Validate the arguments and apply the distortion ``name`` to ``image`` at ``level``.

    Args:
        name: A key of :data:`DISTORTIONS`.
        image: RGB uint8 image, shape (H, W, 3). It is not modified.
        level: Strength in [0, 1].
        rng: The only source of randomness.

    Returns:
        The distorted image, a new uint8 array of the same shape as ``image``.

    Raises:
        UnknownNameError: ``name`` is not registered.
        ValueError: ``image`` is not a uint8 (H, W, 3) array, or ``level`` is not in [0, 1].
        TypeError: ``rng`` is not a ``numpy.random.Generator``.
    """
    return get_distortion(name)(image, level, rng)


def sample_levels(strength: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` levels uniformly in the range of a strength preset.

    Args:
        strength: A key of :data:`STRENGTH_PRESETS` (``"light"``, ``"medium"``, ``"heavy"``).
        n: How many levels to draw (>= 0).
        rng: The source of the draws.

    Returns:
        A float64 array of shape ``(n,)`` with values in the preset's ``[low, high)`` range.

    Raises:
        UnknownNameError: ``strength`` is not a preset; the message lists the valid ones.
        ValueError: ``n`` is negative or not an integer.
    """
    try:
        low, high = STRENGTH_PRESETS[strength]
    except (KeyError, TypeError):
        valid = ", ".join(STRENGTH_PRESETS)
        raise UnknownNameError(f"unknown strength {strength!r}; valid strengths are: {valid}") from None
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    check_rng(rng)
    return rng.uniform(low, high, size=int(n))


def is_grey(image: np.ndarray) -> bool:
    """Whether an RGB image is grey, i.e. its three channels are equal everywhere.

    Args:
        image: RGB uint8 image, shape (H, W, 3).

    Returns:
        True when ``image[..., 0] == image[..., 1] == image[..., 2]`` at every pixel.

    Raises:
        ValueError: ``image`` is not a uint8 (H, W, 3) array.
    """
    check_image(image)
    return bool(np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2]))
