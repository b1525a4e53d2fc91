"""What a pre-generated dataset is made from: :class:`PregenConfig`, whose hash names its folder."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from iqa_ray.core.options import Options, require
from iqa_ray.data.distortions.registry import DISTORTIONS, STRENGTH_PRESETS, get_distortion
from iqa_ray.data.sources import SOURCE_KINDS
from iqa_ray.data.splits import EMBEDDED_FRACTIONS, validate_fractions

__all__ = ["PregenConfig"]


@dataclass(frozen=True)
class PregenConfig(Options):
    """Everything that determines a generated dataset; its hash names the output folder.

    Attributes:
        source: one of ``embedded``, ``folder``, ``hf_disk``, ``hf``.
        source_path: folder or saved-dataset path (``folder``/``hf_disk``) or hub name (``hf``).
        hf_split: split of a Hugging Face dataset.
        image_column: image column of a Hugging Face dataset (default: the first image column).
        limit: use only the first ``limit`` references (Hugging Face sources are large).
        strength: distortion strength preset (``light``, ``medium``, ``heavy``).
        per_image: distorted versions generated per reference crop.
        crop_size: side of the square reference crops, in pixels.
        max_crops_per_photo: at most this many crops per photo (evenly spread), so a huge
            photo does not dominate the set.
        max_short_side: photos are downscaled (never upscaled) so the short side is at most
            this, keeping crops at a similar scale of content across sources.
        distortions: distortion types to draw from; empty means all registered types.
        include_references: also store each pristine crop (label 100).
        split_fractions: train/val/test share of source photos.
        seed: seed of the split, the distortion choice and the distortions themselves.
        sample: fraction of crops to generate (``--sample 0.1`` for a quick run).
        severity_levels: number of levels in the calibration grid of the severity table.
    """

    source: str = "embedded"
    source_path: str | None = None
    hf_split: str | None = None
    image_column: str | None = None
    limit: int | None = None
    strength: str = "medium"
    per_image: int = 5
    crop_size: int = 160
    max_crops_per_photo: int = 9
    max_short_side: int = 512
    distortions: tuple[str, ...] = ()
    include_references: bool = True
    split_fractions: tuple[float, float, float] = EMBEDDED_FRACTIONS
    seed: int = 0
    sample: float = 1.0
    severity_levels: int = 6

    def __post_init__(self) -> None:
        require(self.source in SOURCE_KINDS, f"unknown source {self.source!r}; valid: {', '.join(SOURCE_KINDS)}")
        require(self.source == "embedded" or bool(self.source_path),
                f"source {self.source!r} needs source_path (a folder, saved dataset or hub name)")
        require(self.strength in STRENGTH_PRESETS,
                f"unknown strength {self.strength!r}; valid: {', '.join(STRENGTH_PRESETS)}")
        require(self.per_image >= 1, f"per_image must be >= 1, got {self.per_image}")
        require(self.crop_size >= 32, f"crop_size must be >= 32 pixels, got {self.crop_size}")
        require(self.max_crops_per_photo >= 1, f"max_crops_per_photo must be >= 1, got {self.max_crops_per_photo}")
        require(self.max_short_side >= self.crop_size,
                f"max_short_side ({self.max_short_side}) must be >= crop_size ({self.crop_size})")
        require(0.0 < self.sample <= 1.0, f"sample must be in (0, 1], got {self.sample}")
        require(self.severity_levels >= 3, f"severity_levels must be >= 3, got {self.severity_levels}")
        for name in self.distortions:
            get_distortion(name)  # raises, listing the valid names
        object.__setattr__(self, "distortions", tuple(self.distortions))
        object.__setattr__(self, "split_fractions", validate_fractions(self.split_fractions))

    def distortion_names(self) -> tuple[str, ...]:
        return self.distortions or tuple(DISTORTIONS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
