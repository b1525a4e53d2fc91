"""Tests for iqa_ray.data.distortions: behaviour on real photos, purity, determinism, validation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import skimage.data

from iqa_ray.data.distortions import blur
from iqa_ray.data.distortions.compression import JPEG2000_AVAILABLE, WEBP_AVAILABLE
from iqa_ray.data.distortions.registry import (
    DISTORTIONS,
    STRENGTH_PRESETS,
    Distortion,
    apply_distortion,
    get_distortion,
    is_grey,
    sample_levels,
)
from iqa_ray.data.labels import quality_label

EXPECTED_NAMES = {
    "gaussian_blur",
    "motion_blur",
    "gaussian_noise",
    "impulse_noise",
    "jpeg",
    "webp",
    "jpeg2000",
    "resample_nearest",
    "resample_bilinear",
    "resample_bicubic",
    "contrast",
    "brightness",
    "saturation",
    "pixelation",
    "color_quantization",
}
RANDOM_TYPES = ("gaussian_noise", "impulse_noise", "motion_blur")
LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)
SEED = 1234
SIZE = 160

# Monotonicity is checked on natural photos. Strongly periodic textures (skimage's brick wall)
# can alias with the block grid of pixelation / nearest resampling / quantisation bins, which is
# a documented limitation, so they are not used for the strict checks.
COLOUR_PHOTOS = ("astronaut", "chelsea", "coffee")
GREY_PHOTOS = ("camera",)
ALL_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "brick", "grass")

_AVAILABLE = {"jpeg2000": JPEG2000_AVAILABLE, "webp": WEBP_AVAILABLE}


def _centre_crop(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    top = (image.shape[0] - size) // 2
    left = (image.shape[1] - size) // 2
    return np.ascontiguousarray(image[top : top + size, left : left + size])


def _load(name: str) -> np.ndarray:
    return _centre_crop(getattr(skimage.data, name)())


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """160x160 crops, read-only so that any in-place write by a distortion raises."""
    out = {name: _load(name) for name in ALL_PHOTOS}
    for image in out.values():
        image.setflags(write=False)
    return out


def _skip_unavailable(name: str) -> None:
    if not _AVAILABLE.get(name, True):
        pytest.skip(f"{name} is not supported by this Pillow build")


def _label(photo: np.ndarray, name: str, level: float) -> float:
    return quality_label(photo, apply_distortion(name, photo, level, np.random.default_rng(SEED)))


def _photos_for(name: str) -> tuple[str, ...]:
    return COLOUR_PHOTOS if DISTORTIONS[name].needs_color else COLOUR_PHOTOS + GREY_PHOTOS


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_registry_has_the_fifteen_named_types() -> None:
    assert len(DISTORTIONS) >= 15
    assert set(DISTORTIONS) == EXPECTED_NAMES
    for key, distortion in DISTORTIONS.items():
        assert isinstance(distortion, Distortion)
        assert distortion.name == key
        assert callable(distortion.fn)
        assert distortion.description.strip()


def test_only_saturation_needs_colour() -> None:
    assert {name for name, d in DISTORTIONS.items() if d.needs_color} == {"saturation"}


def test_distortion_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DISTORTIONS["jpeg"].name = "other"  # type: ignore[misc]


def test_get_distortion_returns_registered_entry() -> None:
    assert get_distortion("gaussian_blur") is DISTORTIONS["gaussian_blur"]


def test_unknown_name_lists_valid_names(photos: dict[str, np.ndarray]) -> None:
    with pytest.raises(KeyError) as excinfo:
        get_distortion("gaussian_blurr")
    message = str(excinfo.value)
    assert "gaussian_blurr" in message
    for name in EXPECTED_NAMES:
        assert name in message
    with pytest.raises(KeyError, match="valid names"):
        apply_distortion("no_such_type", photos["astronaut"], 0.5, np.random.default_rng(0))


@pytest.mark.parametrize(
    ("name", "level", "expected"),
    [
        ("gaussian_blur", 1.0, "sigma=5.00 px"),
        ("resample_bicubic", 1 / 3, "scale=x2.00"),
        ("resample_nearest", 1.0, "scale=x4.00"),
        ("jpeg", 0.0, "quality=100"),
        ("webp", 1.0, "quality=0"),
        ("color_quantization", 0.0, "values_per_channel=256"),
    ],
)
def test_parameter_is_human_readable(name: str, level: float, expected: str) -> None:
    assert DISTORTIONS[name].parameter(level) == expected


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_parameter_describes_every_level_and_rejects_bad_ones(name: str) -> None:
    distortion = DISTORTIONS[name]
    texts = [distortion.parameter(level) for level in (0.0, 0.5, 1.0)]
    assert all(isinstance(text, str) and "=" in text for text in texts)
    assert texts[0] != texts[2]
    with pytest.raises(ValueError, match="level"):
        distortion.parameter(1.5)


# --------------------------------------------------------------------------------------------
# Behaviour on real photos
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_label_strictly_decreases_with_level(name: str, photos: dict[str, np.ndarray]) -> None:
    _skip_unavailable(name)
    photo_names = _photos_for(name)
    assert len(photo_names) >= 3
    for photo_name in photo_names:
        labels = [_label(photos[photo_name], name, level) for level in LEVELS]
        for (lo_level, lo_label), (hi_level, hi_label) in zip(
            zip(LEVELS, labels), zip(LEVELS[1:], labels[1:])
        ):
            assert hi_label < lo_label, (
                f"{name} on {photo_name}: label at level {hi_level} ({hi_label:.2f}) is not below "
                f"the label at level {lo_level} ({lo_label:.2f}); labels {np.round(labels, 2)}"
            )


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_levels_span_a_broad_label_range(name: str, photos: dict[str, np.ndarray]) -> None:
    _skip_unavailable(name)
    photo_names = _photos_for(name)
    low = np.mean([_label(photos[p], name, 0.1) for p in photo_names])
    high = np.mean([_label(photos[p], name, 1.0) for p in photo_names])
    assert high < 90.0, f"{name}: mean label at level 1 is {high:.1f}, too mild"
    assert low - high > 10.0, f"{name}: labels {low:.1f} (level 0.1) -> {high:.1f} (level 1) barely move"


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_level_zero_is_near_identity(name: str, photos: dict[str, np.ndarray]) -> None:
    _skip_unavailable(name)
    for photo_name, photo in photos.items():
        label = _label(photo, name, 0.0)
        assert label >= 95.0, f"{name} at level 0 on {photo_name}: label {label:.2f} < 95"


@pytest.mark.parametrize("name", ["motion_blur", "gaussian_blur", "gaussian_noise", "contrast", "brightness"])
def test_continuous_types_decrease_on_a_fine_grid(name: str, photos: dict[str, np.ndarray]) -> None:
    # Steps of 0.03 change the motion-blur length by well under a pixel at low levels, so this
    # fails if the kernel length is quantised to whole pixels.
    levels = np.round(np.arange(0.13, 1.0001, 0.03), 2)
    labels = [_label(photos["astronaut"], name, float(level)) for level in levels]
    assert all(b < a for a, b in zip(labels, labels[1:])), np.round(labels, 2)


def test_motion_blur_kernel_is_normalised_and_continuous() -> None:
    for length in (0.0, 0.3, 2.5, 7.0, 24.0):
        kernel = blur._line_kernel(length, 0.7)
        assert kernel.sum() == pytest.approx(1.0)
        assert np.all(kernel >= 0)
    assert blur._line_kernel(0.0, 1.0).max() == pytest.approx(1.0)  # a unit impulse
    # A small change of length gives a small change of kernel (no jumps at integer lengths).
    a, b = blur._line_kernel(4.99, 0.3), blur._line_kernel(5.01, 0.3)
    size = max(a.shape[0], b.shape[0])
    pad = lambda k: np.pad(k, (size - k.shape[0]) // 2)  # noqa: E731
    assert np.abs(pad(a) - pad(b)).sum() < 0.05


def test_resampling_scales_match_super_resolution_factors(photos: dict[str, np.ndarray]) -> None:
    photo = photos["astronaut"]
    # Levels 1/3, 2/3, 1 are x2, x3, x4 (and 0.7 is x3.1, 160 / 3.1 = 51.6 -> 52): nearest
    # resampling keeps round(160 / scale) distinct rows and columns, repeated to fill 160 x 160.
    for level, small in ((1 / 3, 80), (2 / 3, 53), (0.7, 52), (1.0, 40)):
        out = apply_distortion("resample_nearest", photo, level, np.random.default_rng(0))
        assert out.shape == photo.shape
        assert len(np.unique(out, axis=0)) == small
        assert len(np.unique(out.transpose(1, 0, 2), axis=0)) == small


def test_pixelation_makes_flat_blocks(photos: dict[str, np.ndarray]) -> None:
    out = apply_distortion("pixelation", photos["astronaut"], 1.0, np.random.default_rng(0))
    distinct_rows = len(np.unique(out, axis=0))
    assert distinct_rows <= SIZE // 9


def test_color_quantization_reduces_distinct_values(photos: dict[str, np.ndarray]) -> None:
    out = apply_distortion("color_quantization", photos["astronaut"], 1.0, np.random.default_rng(0))
    for channel in range(3):
        assert len(np.unique(out[..., channel])) <= 3


def test_impulse_noise_only_sets_black_or_white(photos: dict[str, np.ndarray]) -> None:
    photo = photos["coffee"]
    out = apply_distortion("impulse_noise", photo, 1.0, np.random.default_rng(SEED))
    changed = np.any(out != photo, axis=-1)
    assert 0.03 < changed.mean() < 0.06
    values = out[changed]
    assert np.all((values == 0) | (values == 255))
    assert np.all(values == values[:, :1])  # the same value in all three channels


# --------------------------------------------------------------------------------------------
# Colour
# --------------------------------------------------------------------------------------------


def test_is_grey(photos: dict[str, np.ndarray]) -> None:
    assert is_grey(photos["camera"])
    assert not is_grey(photos["astronaut"])
    almost = photos["camera"].copy()
    almost[5, 7, 2] ^= 1
    assert not is_grey(almost)


def test_saturation_is_a_no_op_on_grey(photos: dict[str, np.ndarray]) -> None:
    for photo_name in ("camera", "brick", "grass"):
        grey = photos[photo_name]
        for level in (0.3, 1.0):
            out = apply_distortion("saturation", grey, level, np.random.default_rng(0))
            assert np.array_equal(out, grey)


def test_full_desaturation_makes_a_grey_image(photos: dict[str, np.ndarray]) -> None:
    out = apply_distortion("saturation", photos["astronaut"], 1.0, np.random.default_rng(0))
    assert is_grey(out)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_needs_color_flag_is_truthful(name: str, photos: dict[str, np.ndarray]) -> None:
    _skip_unavailable(name)
    grey = photos["camera"]
    out = apply_distortion(name, grey, 0.7, np.random.default_rng(SEED))
    assert np.array_equal(out, grey) == DISTORTIONS[name].needs_color


# --------------------------------------------------------------------------------------------
# Purity and determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_pure_and_uint8(name: str, photos: dict[str, np.ndarray]) -> None:
    _skip_unavailable(name)
    photo = _load("chelsea")  # writable, unlike the fixture's
    before = photo.copy()
    for level in (0.0, 0.6):
        out = apply_distortion(name, photo, level, np.random.default_rng(SEED))
        assert np.array_equal(photo, before), f"{name} modified its input"
        assert out.dtype == np.uint8
        assert out.shape == photo.shape
        assert not np.shares_memory(out, photo)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_odd_sizes_and_views(name: str, photos: dict[str, np.ndarray]) -> None:
    _skip_unavailable(name)
    for image in (photos["coffee"][:37, :53], photos["coffee"][:7, :5], photos["coffee"][::-2, ::3]):
        before = image.copy()
        out = apply_distortion(name, image, 0.8, np.random.default_rng(SEED))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert np.array_equal(image, before)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_same_seed_same_output(name: str, photos: dict[str, np.ndarray]) -> None:
    _skip_unavailable(name)
    photo = photos["astronaut"]
    a = apply_distortion(name, photo, 0.6, np.random.default_rng(7))
    b = apply_distortion(name, photo, 0.6, np.random.default_rng(7))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_seed_matters_only_for_random_types(name: str, photos: dict[str, np.ndarray]) -> None:
    _skip_unavailable(name)
    photo = photos["astronaut"]
    a = apply_distortion(name, photo, 0.6, np.random.default_rng(1))
    b = apply_distortion(name, photo, 0.6, np.random.default_rng(2))
    assert np.array_equal(a, b) == (name not in RANDOM_TYPES)


def test_distortion_object_is_callable_with_validation(photos: dict[str, np.ndarray]) -> None:
    photo = photos["astronaut"]
    via_object = DISTORTIONS["jpeg"](photo, 0.5, np.random.default_rng(0))
    via_name = apply_distortion("jpeg", photo, 0.5, np.random.default_rng(0))
    assert np.array_equal(via_object, via_name)
    with pytest.raises(ValueError, match="level"):
        DISTORTIONS["jpeg"](photo, 2.0, np.random.default_rng(0))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [-0.1, 1.5, float("nan"), np.float32(1.01), "0.5", None, True])
def test_bad_level_raises(level: object, photos: dict[str, np.ndarray]) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"level.*\[0, 1\]"):
        apply_distortion("gaussian_blur", photos["astronaut"], level, rng)  # type: ignore[arg-type]


@pytest.mark.parametrize("level", [-0.1, 1.5])
def test_bad_level_message_names_the_value(level: float, photos: dict[str, np.ndarray]) -> None:
    with pytest.raises(ValueError) as excinfo:
        apply_distortion("jpeg", photos["astronaut"], level, np.random.default_rng(0))
    assert repr(level) in str(excinfo.value)


def test_boundary_levels_accepted(photos: dict[str, np.ndarray]) -> None:
    for level in (0, 1, 0.0, 1.0, np.float64(0.5)):
        apply_distortion("contrast", photos["astronaut"], level, np.random.default_rng(0))


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((16, 16, 3), dtype=np.float32),
        np.zeros((16, 16), dtype=np.uint8),
        np.zeros((16, 16, 4), dtype=np.uint8),
        np.zeros((16, 16, 3), dtype=np.uint16),
        np.zeros((0, 16, 3), dtype=np.uint8),
    ],
)
def test_bad_image_raises(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"uint8.*\(H, W, 3\)"):
        apply_distortion("gaussian_noise", image, 0.5, np.random.default_rng(0))


def test_non_array_image_raises() -> None:
    with pytest.raises(ValueError, match="uint8"):
        apply_distortion("jpeg", [[[0, 0, 0]]], 0.5, np.random.default_rng(0))  # type: ignore[arg-type]


def test_bad_rng_raises(photos: dict[str, np.ndarray]) -> None:
    with pytest.raises(TypeError, match="Generator"):
        apply_distortion("gaussian_noise", photos["astronaut"], 0.5, 42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Strength presets
# --------------------------------------------------------------------------------------------


def test_strength_presets() -> None:
    assert STRENGTH_PRESETS == {"light": (0.1, 0.4), "medium": (0.2, 0.6), "heavy": (0.3, 1.0)}


@pytest.mark.parametrize("strength", sorted(STRENGTH_PRESETS))
def test_sample_levels_in_range_and_deterministic(strength: str) -> None:
    low, high = STRENGTH_PRESETS[strength]
    levels = sample_levels(strength, 2000, np.random.default_rng(3))
    assert levels.shape == (2000,)
    assert np.all((levels >= low) & (levels <= high))
    # Uniform over the whole range, not bunched at one end.
    assert levels.min() < low + 0.05 * (high - low) and levels.max() > high - 0.05 * (high - low)
    assert np.array_equal(levels, sample_levels(strength, 2000, np.random.default_rng(3)))
    assert not np.array_equal(levels, sample_levels(strength, 2000, np.random.default_rng(4)))


def test_sample_levels_unknown_strength_lists_valid_ones() -> None:
    with pytest.raises(KeyError) as excinfo:
        sample_levels("extreme", 3, np.random.default_rng(0))
    message = str(excinfo.value)
    assert "extreme" in message
    assert all(name in message for name in STRENGTH_PRESETS)


def test_sample_levels_count_validation() -> None:
    assert sample_levels("light", 0, np.random.default_rng(0)).shape == (0,)
    with pytest.raises(ValueError, match="n must be"):
        sample_levels("light", -1, np.random.default_rng(0))
