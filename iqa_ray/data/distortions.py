"""Synthetic image distortions, as pure functions of ``(image, level, rng)``.

Design
------
Every distortion type is a plain function ``fn(image, level, rng) -> image``:

* ``image`` is an RGB ``uint8`` array of shape ``(H, W, 3)``. It is never modified; a new
  ``uint8`` array of the same shape is returned.
* ``level`` is a float in ``[0, 1]``: 0 is the identity (or as near to it as the codec allows)
  and 1 is a very strong distortion. Levels outside ``[0, 1]`` (or NaN) raise ``ValueError``.
* ``rng`` is a ``numpy.random.Generator``. It is the only source of randomness, so the output is
  a deterministic function of the image, the level and the generator's state. Types that draw
  from it (noise values, blur angle) draw the same amount whatever the level, so one seed gives
  the same noise pattern or angle at every level and a stronger level is a stronger version of
  the same distortion.

A ``level`` is *not* comparable across types (a blur at 0.5 is not as bad as a JPEG at 0.5); the
training label is a full-reference score computed against the reference afterwards (see
:mod:`iqa_ray.data.labels`). The level->parameter mappings below were calibrated on 160x160
centre crops of scikit-image's photos so that the label (``100 * SSIM``) is 95-100 at level 0,
falls as the level grows, and ends in a broad part of the label range at level 1 (mean label at
level 1 is roughly 33-75 depending on the type; ``saturation`` is the mild exception at about
85, because removing colour leaves the structure intact). Most mappings are powers of the level
(``L ** 1.5`` and the like) so that the label falls roughly evenly instead of collapsing at the
first step, and all are continuous in the level or as fine as an integer parameter allows.

Caveats on monotonicity: the label falls strictly with level at well-separated levels (0.1, 0.3,
0.5, 0.7, 0.9) on natural photos, which the tests check. Between very close levels an integer
parameter (codec quality, number of quantisation values) can give a tie; JPEG 2000 gives ties at
small ratios on very compressible images (the lossless file already fits the budget); and grid
or bin aliasing on strongly periodic textures (a brick wall) can make ``pixelation``,
``resample_nearest`` or ``color_quantization`` briefly non-monotone in the label.

The types are registered, with a human-readable description of the parameter at a level, in the
plain dict :data:`DISTORTIONS`; :func:`apply_distortion` validates the input and dispatches by
name. On a 160x160 image a call takes at most about 20 ms (JPEG 2000, the slowest, 8-20 ms;
WebP 3-6 ms; the rest about 1 ms) using PIL, OpenCV and NumPy.

Types and level->parameter mappings (``L`` is the level)
--------------------------------------------------------

====================== ============================================================================
Type                   Parameter at level ``L``
====================== ============================================================================
``gaussian_blur``      Gaussian kernel, ``sigma = 5 * L ** 1.5`` px (0 .. 5)
``motion_blur``        anti-aliased line kernel of length ``24 * L ** 1.3`` px (0 .. 24), angle
                       uniform in ``[0, 180)`` degrees drawn from ``rng``
``gaussian_noise``     additive i.i.d. Gaussian noise per pixel and channel,
                       ``sigma = 30 * L ** 1.5`` on the 0-255 scale (0 .. 30)
``impulse_noise``      salt & pepper: a fraction ``0.05 * L ** 1.5`` of pixels (0 .. 5 %) set to
                       black or white (50/50, all three channels)
``jpeg``               PIL JPEG, ``quality = round(2 * 50 ** (1 - L))`` (100 .. 2; libjpeg's
                       quantisation tables are already at their coarsest at quality 2)
``webp``               PIL lossy WebP, ``quality = round(100 * (1 - L) ** 2)`` (100 .. 0)
``jpeg2000``           PIL JPEG 2000 (OpenJPEG, reversible 5/3 wavelet), compression ratio
                       ``300 ** L`` (1 .. 300); ratio 1 is lossless, i.e. the identity
``resample_nearest``   down- then up-sampling with PIL ``NEAREST``, ``scale = 1 + 3 * L`` (1 .. 4)
``resample_bilinear``  same with PIL ``BILINEAR`` (antialiased), ``scale = 1 + 3 * L``
``resample_bicubic``   same with PIL ``BICUBIC`` (antialiased), ``scale = 1 + 3 * L``
``contrast``           ``out = m + c * (x - m)`` with ``c = 1 - 0.85 * L`` (1 .. 0.15) and ``m``
                       the mean over all pixels and channels
``brightness``         over-exposure: ``out = clip(g * x + b)`` with gain ``g = 1 + 1.5 * L``
                       (1 .. 2.5) and offset ``b = 50 * L`` (0 .. 50)
``saturation``         ``out = Y + s * (x - Y)`` with ``Y`` the Rec. 601 luma and ``s = 1 - L``
                       (colour only: a no-op on grey images)
``pixelation``         box-average into blocks of ``1 + 9 * L ** 1.2`` px (1 .. 10), then
                       nearest-neighbour upsampling
``color_quantization`` uniform quantisation to ``round(2 ** (8 - 6.5 * L))`` values per channel
                       (256 .. 3), reconstructed at bin centres
====================== ============================================================================

The resampling types model the super-resolution degradation: at scale ``s`` an ``H x W`` image
is resized to ``round(H / s) x round(W / s)`` with the type's filter (PIL's bilinear and bicubic
filters are antialiased when downsampling) and back to exactly ``H x W`` with the same filter.
Levels 1/3, 2/3 and 1 give the usual x2, x3 and x4 factors.

Strengths: :data:`STRENGTH_PRESETS` names level ranges and :func:`sample_levels` draws levels
uniformly inside one. :func:`is_grey` lets the pre-generator skip ``needs_color`` types on grey
references, where they would produce the reference itself.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
from PIL import Image, features

__all__ = [
    "DISTORTIONS",
    "JPEG2000_AVAILABLE",
    "STRENGTH_PRESETS",
    "WEBP_AVAILABLE",
    "Distortion",
    "UnknownNameError",
    "apply_distortion",
    "get_distortion",
    "is_grey",
    "sample_levels",
]

JPEG2000_AVAILABLE: bool = bool(features.check("jpg_2000"))
"""Whether this Pillow build can encode JPEG 2000 (needs OpenJPEG)."""

WEBP_AVAILABLE: bool = bool(features.check("webp"))
"""Whether this Pillow build can encode WebP (needs libwebp)."""

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


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_level(level: float) -> float:
    """Return ``level`` as a float, or raise ``ValueError`` if it is not a number in [0, 1]."""
    if isinstance(level, (bool, np.bool_)) or not isinstance(level, (int, float, np.integer, np.floating)):
        raise ValueError(f"level must be a number in the range [0, 1], got {level!r}")
    value = float(level)
    if not (0.0 <= value <= 1.0):  # also false for NaN
        raise ValueError(f"level must be in the range [0, 1], got {value!r}")
    return value


def _check_image(image: np.ndarray) -> None:
    """Raise ``ValueError`` unless ``image`` is a non-empty uint8 array of shape (H, W, 3)."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy uint8 array of shape (H, W, 3), got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(
            f"image must be a uint8 array of shape (H, W, 3), got dtype {image.dtype} and shape {image.shape}"
        )


def _check_rng(rng: np.random.Generator) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Round and clip float values to a new uint8 array."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Level -> parameter mappings (shared by the functions and their descriptions)
# --------------------------------------------------------------------------------------------


def _blur_sigma(level: float) -> float:
    return 5.0 * level**1.5


def _motion_length(level: float) -> float:
    return 24.0 * level**1.3


def _noise_sigma(level: float) -> float:
    return 30.0 * level**1.5


def _impulse_fraction(level: float) -> float:
    return 0.05 * level**1.5


def _jpeg_quality(level: float) -> int:
    return int(round(2.0 * 50.0 ** (1.0 - level)))


def _webp_quality(level: float) -> int:
    return int(round(100.0 * (1.0 - level) ** 2))


def _j2k_rate(level: float) -> float:
    return 300.0**level


def _resample_scale(level: float) -> float:
    return 1.0 + 3.0 * level


def _contrast_factor(level: float) -> float:
    return 1.0 - 0.85 * level


def _brightness_gain_offset(level: float) -> tuple[float, float]:
    return 1.0 + 1.5 * level, 50.0 * level


def _saturation_factor(level: float) -> float:
    return 1.0 - level


def _pixel_block(level: float) -> float:
    return 1.0 + 9.0 * level**1.2


def _quant_values(level: float) -> int:
    return int(round(2.0 ** (8.0 - 6.5 * level)))


# --------------------------------------------------------------------------------------------
# Distortion functions
# --------------------------------------------------------------------------------------------


def gaussian_blur(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Blur with an isotropic Gaussian kernel, ``sigma = 5 * level ** 1.5`` px.

    Args:
        image: RGB uint8 image, shape (H, W, 3).
        level: Strength in [0, 1].
        rng: Unused; accepted for a uniform signature.

    Returns:
        The blurred image, a new uint8 array of the same shape.
    """
    sigma = _blur_sigma(level)
    if sigma <= 0:
        return image.copy()
    radius = max(1, int(math.ceil(4.0 * sigma)))
    out = cv2.GaussianBlur(
        image.astype(np.float32), (2 * radius + 1, 2 * radius + 1), sigma, sigma, cv2.BORDER_REFLECT_101
    )
    return _to_uint8(out)


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
    length = _motion_length(level)
    if length <= 0:
        return image.copy()
    kernel = _line_kernel(length, angle).astype(np.float32)
    out = cv2.filter2D(image.astype(np.float32), -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    return _to_uint8(out)


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
    return _to_uint8(image.astype(np.float32) + np.float32(_noise_sigma(level)) * noise)


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
    hit = rng.random((height, width)) < _impulse_fraction(level)
    salt = rng.random((height, width)) < 0.5
    out = image.copy()
    out[hit & salt] = 255
    out[hit & ~salt] = 0
    return out


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
    return _codec_round_trip(image, "JPEG", quality=_jpeg_quality(level))


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
    return _codec_round_trip(image, "WEBP", quality=_webp_quality(level), method=4)


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
    rate = _j2k_rate(level)
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


def _resample(image: np.ndarray, level: float, resample: Image.Resampling) -> np.ndarray:
    scale = _resample_scale(level)
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
    return _to_uint8(mean + np.float32(_contrast_factor(level)) * (values - mean))


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
    gain, offset = _brightness_gain_offset(level)
    return _to_uint8(image.astype(np.float32) * np.float32(gain) + np.float32(offset))


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
    return _to_uint8(luma + _saturation_factor(level) * (values - luma))


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
    block = _pixel_block(level)
    height, width = image.shape[:2]
    small = (max(1, round(width / block)), max(1, round(height / block)))
    if small == (width, height):
        return image.copy()
    pil = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    down = pil.resize(small, Image.Resampling.BOX)
    return np.array(down.resize((width, height), Image.Resampling.NEAREST), dtype=np.uint8)


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
    q = _quant_values(level)
    codes = np.arange(256, dtype=np.float64)
    bins = np.floor(codes * q / 256.0)
    table = np.clip(np.floor((bins + 0.5) * 256.0 / q), 0, 255).astype(np.uint8)
    return table[image]


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


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
        return self.describe(_check_level(level))

    def __call__(self, image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
        """Validate the arguments and apply the distortion (see :func:`apply_distortion`)."""
        _check_image(image)
        level = _check_level(level)
        _check_rng(rng)
        return self.fn(image, level, rng)


def _resample_describe(level: float) -> str:
    scale = _resample_scale(level)
    return f"scale=x{scale:.2f}"


DISTORTIONS: dict[str, Distortion] = {
    "gaussian_blur": Distortion(
        name="gaussian_blur",
        fn=gaussian_blur,
        needs_color=False,
        description="Isotropic Gaussian blur, sigma = 5 * level ** 1.5 px.",
        describe=lambda level: f"sigma={_blur_sigma(level):.2f} px",
    ),
    "motion_blur": Distortion(
        name="motion_blur",
        fn=motion_blur,
        needs_color=False,
        description="Linear motion blur, anti-aliased line of 24 * level ** 1.3 px at a random angle.",
        describe=lambda level: f"length={_motion_length(level):.2f} px, random angle",
    ),
    "gaussian_noise": Distortion(
        name="gaussian_noise",
        fn=gaussian_noise,
        needs_color=False,
        description="Additive Gaussian noise per pixel and channel, sigma = 30 * level ** 1.5 (0-255 scale).",
        describe=lambda level: f"sigma={_noise_sigma(level):.1f} (0-255)",
    ),
    "impulse_noise": Distortion(
        name="impulse_noise",
        fn=impulse_noise,
        needs_color=False,
        description="Salt-and-pepper noise on a fraction 0.05 * level ** 1.5 of the pixels.",
        describe=lambda level: f"fraction={_impulse_fraction(level):.3f}",
    ),
    "jpeg": Distortion(
        name="jpeg",
        fn=jpeg,
        needs_color=False,
        description="JPEG compression (PIL), quality = round(2 * 50 ** (1 - level)).",
        describe=lambda level: f"quality={_jpeg_quality(level)}",
    ),
    "webp": Distortion(
        name="webp",
        fn=webp,
        needs_color=False,
        description="Lossy WebP compression (PIL), quality = round(100 * (1 - level) ** 2).",
        describe=lambda level: f"quality={_webp_quality(level)}",
    ),
    "jpeg2000": Distortion(
        name="jpeg2000",
        fn=jpeg2000,
        needs_color=False,
        description="JPEG 2000 compression (PIL/OpenJPEG, 5/3 wavelet), compression ratio 300 ** level.",
        describe=lambda level: f"rate={_j2k_rate(level):.1f}:1",
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
        describe=lambda level: f"contrast={_contrast_factor(level):.2f}",
    ),
    "brightness": Distortion(
        name="brightness",
        fn=brightness,
        needs_color=False,
        description="Over-exposure with clipping: gain 1 + 1.5 * level, offset 50 * level.",
        describe=lambda level: "gain={:.2f}, offset={:.1f}".format(*_brightness_gain_offset(level)),
    ),
    "saturation": Distortion(
        name="saturation",
        fn=saturation,
        needs_color=True,
        description="Desaturation toward luma, saturation factor 1 - level.",
        describe=lambda level: f"saturation={_saturation_factor(level):.2f}",
    ),
    "pixelation": Distortion(
        name="pixelation",
        fn=pixelation,
        needs_color=False,
        description="Block averaging with nearest upsampling, block of 1 + 9 * level ** 1.2 px.",
        describe=lambda level: f"block={_pixel_block(level):.2f} px",
    ),
    "color_quantization": Distortion(
        name="color_quantization",
        fn=color_quantization,
        needs_color=False,
        description="Uniform quantisation to round(2 ** (8 - 6.5 * level)) values per channel.",
        describe=lambda level: f"values_per_channel={_quant_values(level)}",
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
    _check_rng(rng)
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
    _check_image(image)
    return bool(np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2]))
