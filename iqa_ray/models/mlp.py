"""MLPIQA: pooled backbone features regressed by a small MLP (the seeds' "simple baseline").

No paper of its own: this is the fine-tuned-backbone regressor that most deep NR-IQA work
compares against, e.g. KonCept512 (Hosu, Lin, Sziranyi, Saupe, "KonIQ-10k: An Ecologically Valid
Database for Deep Learning of Blind Image Quality Assessment", IEEE TIP 2020): an ImageNet
backbone, global average pooling of the last stage, and fully connected layers with dropout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from iqa_ray.core.options import Options, finite, positive_int, require
from iqa_ray.models.backbones import Backbone
from iqa_ray.models.base import IQAModel, full_precision
from iqa_ray.models.losses import RegressionLoss

__all__ = ["MLPIQA", "MLPOptions", "init_small_output", "POOLINGS", "SPREAD_POOLINGS", "BLOCK_POOLINGS",
           "gaussian_blur", "pool_stages"]

POOLINGS = ("last", "stages", "blocks", "every_block")
#: Poolings that standardise every map's mean and standard deviation (fitted on training images).
SPREAD_POOLINGS = ("stages", "blocks", "every_block")
#: Poolings that tap the backbone's block groups (:meth:`~iqa_ray.models.backbones.Backbone.use_block_taps`).
BLOCK_POOLINGS = ("blocks", "every_block")


@dataclass(frozen=True)
class MLPOptions(Options):
    """The ``mlp`` family's config keys (see :class:`MLPIQA`).

    Attributes:
        hidden_dim: width of the hidden layer.
        dropout: dropout before the output layer, in [0, 1).
        pooling: what the head regresses: ``last`` (global average pool of the last stage,
            KonCept-style), ``stages`` (every stage's mean and standard deviation over space,
            concatenated and standardised on the training images: the features of the strong linear
            probe, plus their spread), ``blocks`` (the same over every block group's output where
            the backbone has block groups: EfficientNet-Lite0's 7 instead of its 5 stages) or
            ``every_block`` (the same over every block's output: Lite0's 16 blocks).
        reference_blur: ``0`` (off) or the standard deviation in pixels of a Gaussian blur: the
            pooled features of the image blurred by it (a pseudo-reference) are subtracted from the
            image's own and the difference appended to them, so the head sees how much the image
            changes under a blur: much for a sharp photo, little for one that is blurry already
            (the pseudo-reference idea of BPRI: Min, Gu, Zhai, Liu, Yang, Chen, "Blind Quality
            Assessment Based on Pseudo-Reference Image", IEEE TMM 2018). Costs a second backbone
            pass per image.
        scales: the sizes the photo is pooled at, as factors of its own size, the first ``1.0``:
            ``(1.0, 0.5)`` appends the pooled features of the photo at half size (bilinear with
            antialiasing) to those at its own size, as CONTRIQUE does (Madhusudana, Birkbeck, Wang,
            Adsara, Bovik, "Image Quality Assessment using Contrastive Learning", IEEE TIP 2022).
            Costs a backbone pass per photo per extra scale (a quarter of one at half size).
    """

    hidden_dim: int = 512
    dropout: float = 0.3
    pooling: str = "last"
    reference_blur: float = 0.0
    scales: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        require(positive_int(self.hidden_dim), f"hidden_dim must be >= 1, got {self.hidden_dim!r}")
        require(finite(self.dropout) and 0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout!r}")
        require(self.pooling in POOLINGS, f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        require(finite(self.reference_blur) and self.reference_blur >= 0,
                f"reference_blur must be 0 (off) or a blur's standard deviation in pixels > 0, got {self.reference_blur!r}")
        scales = self.scales
        require(isinstance(scales, tuple) and len(scales) >= 1 and scales[0] == 1.0
                and all(finite(f) and 0 < f <= 1 for f in scales) and len(set(scales)) == len(scales),
                f"scales must be distinct factors of the photo's size in (0, 1], the first 1.0 (e.g. [1.0, 0.5]), "
                f"got {scales!r}")


def pool_stages(stages: list[Tensor], pooling: str) -> Tensor:
    """Global pooling of backbone feature maps into one vector per image, (B, D), float32.

    ``last``: the last stage's spatial mean (D = last channels). ``stages``: every stage's spatial
    mean and standard deviation, concatenated stage by stage (D = 2 * sum of channels): the mean is
    what the strong linear probe regresses, the spread adds how unevenly each feature fires, a
    classic quality cue (noise, blur and compression change feature statistics, not only means).
    """
    if pooling == "last":
        return stages[-1].float().mean(dim=(2, 3))
    if pooling in SPREAD_POOLINGS:
        parts = []
        for s in stages:
            flat = s.float().flatten(2)
            # population std (correction=0): defined for a 1x1 map, and what numpy's std computes
            parts += [flat.mean(dim=2), flat.std(dim=2, correction=0)]
        return torch.cat(parts, dim=1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """``images`` (B, C, H, W) blurred by a Gaussian of standard deviation ``sigma`` pixels.

    Separable, the kernel cut at 3 sigma and normalised to sum 1, edges extended (the image's
    border pixels repeated), computed in the images' dtype: a blurred constant image is the same
    constant.
    """
    if not (finite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a blur's standard deviation in pixels > 0, got {sigma!r}")
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float64)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(images.dtype)
    c = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def init_small_output(layer: nn.Linear, std: float = 1e-3) -> None:
    """Initialise a score-producing layer near zero so the first predictions sit at the label mean."""
    nn.init.normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)


class MLPIQA(IQAModel):
    """Backbone -> global pooling (:func:`pool_stages`) -> standardisation -> MLP -> score.

    Args:
        backbone: Feature extractor.
        hidden_dim: Width of the hidden layer.
        dropout: Dropout before the output layer, in [0, 1).
        loss: Regression loss; L1 by default.
        pooling: ``last``, ``stages``, ``blocks`` or ``every_block`` (see :func:`pool_stages`;
            ``blocks`` makes the backbone return every block group's output where it has block
            groups, e.g. 7 maps of EfficientNet-Lite0 instead of its 5 stages, ``every_block`` every
            block's, 16 maps of Lite0).

    The pooled features are standardised with a per-feature mean and std measured on the
    training images when training starts (:meth:`fit_feature_stats`; identity until then), buffers
    saved with the weights, so a checkpoint scores raw images on its own.

    Outputs of ``forward``: ``"score"`` (B,), ``"features"`` (B, D) pooled features.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        hidden_dim: int = MLPOptions.hidden_dim,
        dropout: float = MLPOptions.dropout,
        loss: RegressionLoss | None = None,
        pooling: str = MLPOptions.pooling,
        reference_blur: float = MLPOptions.reference_blur,
        scales: tuple[float, ...] = MLPOptions.scales,
    ) -> None:
        super().__init__(backbone, loss=loss)
        # validates (ConfigError names the key)
        MLPOptions(hidden_dim=hidden_dim, dropout=dropout, pooling=pooling, reference_blur=reference_blur,
                   scales=tuple(scales))
        self.pooling = pooling
        self.reference_blur = float(reference_blur)
        self.scales = tuple(float(f) for f in scales)
        if pooling in BLOCK_POOLINGS:
            backbone.use_block_taps(every_block=pooling == "every_block")
        in_dim = backbone.channels[-1] if pooling == "last" else 2 * sum(backbone.tap_channels)
        if self.reference_blur:
            in_dim *= 2  # the image's pooled features, then their change under the blur
        in_dim *= len(self.scales)  # the same again for the photo at each smaller size
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.head = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, 1),
        )
        init_small_output(self.head[-1])

    #: What a feature cache of this family depends on besides the backbone and input size.
    FEATURE_CACHE_OPTIONS = ("pooling", "reference_blur", "scales")

    @classmethod
    def feature_cache_key(cls, options: MLPOptions) -> tuple[Any, ...]:
        """The pooling, then the pseudo-reference blur and the extra scales where the options set them."""
        blur, scales = options.reference_blur, tuple(options.scales)
        return ((options.pooling,) + ((float(blur),) if blur else ())
                + ((("scales",) + tuple(float(f) for f in scales)) if scales != (1.0,) else ()))

    @property
    def feature_dim(self) -> int:
        return int(self.feature_mean.numel())

    def stage_mean_columns(self) -> tuple[int, ...] | None:
        """Where :meth:`pool_images` puts every stage's spatial mean: only the ``stages``, ``blocks``
        and ``every_block`` poolings hold them (per map, the means then the standard deviations; of
        the block poolings, the maps that are stages; with ``reference_blur`` or more ``scales``, in
        the first part: the photo at its own size)."""
        if self.pooling not in SPREAD_POOLINGS:
            return None
        stages = set(self.backbone.stage_taps)
        columns: list[int] = []
        start = 0
        for i, c in enumerate(self.backbone.tap_channels):
            if i in stages:
                columns.extend(range(start, start + c))
            start += 2 * c
        return tuple(columns)

    def fit_feature_stats(self, features: Tensor) -> None:
        """Standardise pooled features with the mean and std of ``features`` (training images, (N, D))."""
        features = features.float()
        if features.ndim != 2 or features.shape[1] != self.feature_dim or features.shape[0] < 2:
            raise ValueError(f"need (N >= 2, {self.feature_dim}) pooled features, got {tuple(features.shape)}")
        self.feature_mean.copy_(features.mean(dim=0).to(self.feature_mean.device))
        self.feature_std.copy_(features.std(dim=0, correction=0).clamp_min(1e-6).to(self.feature_std.device))

    @torch.no_grad()
    def on_train_start(self, feature_batches: Iterable[Tensor]) -> None:
        if self.pooling not in SPREAD_POOLINGS:
            return  # the KonCept-style head learns on raw pooled features, as before
        was_training = self.training
        self.eval()
        pooled = [self.pool_images(images) for images in feature_batches]
        self.train(was_training)
        self.fit_feature_stats(torch.cat(pooled))

    def on_train_start_pooled(self, features: Tensor) -> None:
        if self.pooling in SPREAD_POOLINGS:  # as on_train_start: the KonCept-style head keeps raw features
            self.fit_feature_stats(features)

    def forward_pooled(self, features: Tensor) -> dict[str, Tensor]:
        """The head on pooled features (what a feature cache holds): same scores as :meth:`forward`."""
        features = features.float()
        standardised = self.head((features - self.feature_mean) / self.feature_std).squeeze(1)
        return {"score": self.to_label_scale(standardised), "features": features}

    def blurred(self, images: Tensor) -> Tensor:
        """The pseudo-reference: ``images`` blurred by ``reference_blur``, in float32 under any autocast."""
        with full_precision(images.device):
            return gaussian_blur(images.float(), self.reference_blur)

    def pool_maps(self, stages: list[Tensor], blurred: list[Tensor] | None = None) -> Tensor:
        """(B, D) the head's input before standardisation: ``stages`` pooled (:func:`pool_stages`),
        then, with ``reference_blur``, minus ``blurred`` (the blurred images' maps) pooled."""
        pooled = pool_stages(stages, self.pooling)
        if not self.reference_blur:
            return pooled
        if blurred is None:
            raise ValueError(f"reference_blur={self.reference_blur}: the head needs the maps of the blurred images too")
        return torch.cat([pooled, pooled - pool_stages(blurred, self.pooling)], dim=1)

    def resized(self, images: Tensor, factor: float) -> Tensor:
        """``images`` at ``factor`` times their size (bilinear, antialiased; at least 1 px a side), in float32."""
        if factor == 1.0:
            return images
        size = tuple(max(1, round(n * factor)) for n in images.shape[-2:])
        with full_precision(images.device):
            return F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)

    def _pool_one_scale(self, images: Tensor) -> Tensor:
        blurred = self.backbone(self.blurred(images)) if self.reference_blur else None
        stages = self.backbone(images)
        with full_precision(images.device):
            return self.pool_maps([s.float() for s in stages], None if blurred is None else [b.float() for b in blurred])

    def pool_images(self, images: Tensor) -> Tensor:
        """(B, D) pooled features of images in [0, 1] (what a feature cache holds): one backbone
        pass per scale, two with ``reference_blur``; the scales' features concatenated in the order
        of ``scales``. The backbone runs in the caller's autocast (the feature pass's
        ``feature_dtype``), the pooling in float32."""
        return torch.cat([self._pool_one_scale(self.resized(images, f)) for f in self.scales], dim=1)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        if not self.reference_blur and self.scales == (1.0,):
            return super().forward(images)
        pooled = self.pool_images(images)
        with full_precision(images.device):
            return self.forward_pooled(pooled)

    def forward_head(self, stages: list[Tensor]) -> dict[str, Tensor]:
        return self.forward_pooled(self.pool_maps(stages))
