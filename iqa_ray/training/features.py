"""Frozen-backbone features computed once per dataset and shared by every run that trains a head.

With a frozen backbone, every epoch of every trial would push the same images through the same
weights. A :class:`FeatureCache` holds, for each decoded image, the pooled features (the family's
``pool_images``, e.g. :meth:`iqa_ray.models.mlp.MLPIQA.pool_images`) of the whole image and of its
mirror image (the one augmentation whole-image training uses; none with ``hflip = false``), so that
training a head costs milliseconds per epoch instead of a backbone pass per image. What a cache
depends on beyond the backbone, its weights and the input size is the family's to declare
(:meth:`iqa_ray.models.base.IQAModel.feature_cache_key`). A search computes one cache per dataset
before any trial starts, puts it in Ray's object store, and hands the same reference to every
trial (:mod:`iqa_ray.search.run`). The model trained on a cache is an ordinary model of its family:
its checkpoint scores raw images, with the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from iqa_ray.models.registry import FAMILIES, family

__all__ = ["FeatureCache", "cache_key", "cache_keys", "compute_features", "feature_steps", "probe_features"]

# The run's config keys a cache depends on (besides the decoded images and the family's options).
_RUN_CACHE_KEYS = ("backbone", "pretrained", "pretrained_encoder", "img_size", "crop_size", "hflip", "pretraining",
                   "image_size", "short_side", "feature_dtype")

_BATCH = 16


def cache_keys() -> tuple[str, ...]:
    """Config keys a cache depends on (besides the decoded images), which a search that shares one
    cache may not search: the run's own, then every registered family's
    (:attr:`~iqa_ray.models.base.IQAModel.FEATURE_CACHE_OPTIONS`)."""
    declared = (key for name in FAMILIES for key in family(name).model.FEATURE_CACHE_OPTIONS)
    return tuple(dict.fromkeys((*_RUN_CACHE_KEYS, *declared)))


def cache_key(config: Any) -> tuple[Any, ...]:
    """What a cache depends on besides the decoded images: backbone, its weights, input size, the
    family's part (:meth:`~iqa_ray.models.base.IQAModel.feature_cache_key`: the MLP's pooling and
    pseudo-reference blur), ``"unflipped"`` where ``hflip`` is false: such a cache holds no
    mirror images' features, and the ``feature_dtype`` where it is not float32.

    Runs whose configs share this key (and the decoded dataset) can share one cache.
    """
    m = config.model
    key = (m.backbone, str(m.pretrained), m.pretrained_encoder, m.img_size or config.data.crop_size)
    dtype = config.optim.feature_dtype
    return (key + family(m.family).model.feature_cache_key(m.options) + (() if config.data.hflip else ("unflipped",))
            + (() if dtype == "float32" else (f"feature_dtype={dtype}",)))


@dataclass
class FeatureCache:
    """Pooled features of every row of a decoded dataset.

    Attributes:
        plain: (N, D) float32 features of each whole image.
        flipped: (N, D) float32 features of each image mirrored left-right; ``None`` when the
            config's ``hflip`` is false (training never draws a mirror image).
        key: :func:`cache_key` of the config they were computed for.
        channels: the channels of each map the backbone returned (how the columns are laid out).
        stage_columns: the columns that are every feature stage's spatial mean, as the model that
            pooled them says (:meth:`~iqa_ray.models.base.IQAModel.stage_mean_columns`); ``None``
            when they hold none.
    """

    plain: np.ndarray
    flipped: np.ndarray | None
    key: tuple[Any, ...]
    channels: tuple[int, ...] = ()
    stage_columns: tuple[int, ...] | None = None

    def stage_means(self) -> np.ndarray:
        """(N, sum of the stages' channels) every stage's spatial mean of each whole image, unflipped:
        the strong linear probe's features (:func:`iqa_ray.evaluation.baselines.pooled_stage_features`).

        Only caches whose family's pooling holds them have them (:attr:`stage_columns`).
        """
        if self.stage_columns is None:
            raise ValueError(f"stage means need a cache whose pooled features hold every stage's mean (the mlp's "
                             f"'stages', 'blocks' or 'every_block' pooling); this one's key is {self.key!r}")
        return self.plain[:, np.asarray(self.stage_columns, dtype=np.int64)].astype(np.float64)

    def fits(self, config: Any, n_rows: int) -> bool:
        """Whether this cache was computed for ``config`` and holds a dataset of ``n_rows`` rows."""
        return self.key == cache_key(config) and len(self.plain) == n_rows

    def check(self, config: Any, n_rows: int) -> None:
        """Raise ``ValueError`` unless this cache :meth:`fits` ``config`` and a dataset of ``n_rows`` rows."""
        if self.key != cache_key(config):
            raise ValueError(f"feature cache computed for {self.key}, not for this run's {cache_key(config)}")
        if len(self.plain) != n_rows:
            raise ValueError(f"feature cache holds {len(self.plain)} images, the dataset {n_rows}")

    @property
    def nbytes(self) -> int:
        return int(self.plain.nbytes + (0 if self.flipped is None else self.flipped.nbytes))


def compute_features(decoded: Any, config: Any, device: torch.device | str | None = None,
                     progress: Callable[[int], Any] | None = None) -> FeatureCache:
    """The :class:`FeatureCache` of ``decoded`` for ``config``'s frozen backbone and pooling.

    The backbone is the one the run builds (same weights, including a ``pretrained_encoder``),
    run on whole images, and on their mirror images unless ``hflip`` is false; images of one size go
    through in batches of 16, others one by one, under ``inference_mode``, in the ``channels_last``
    layout for CNN backbones with their BatchNorms folded
    (:func:`~iqa_ray.training.inference.ready_for_inference`) and in the run's ``feature_dtype`` (float32 by default; the pooled features are float32 either way).
    ``progress(n)`` is called with the number of images done so far after each batch.
    """
    for step in feature_steps(decoded, config, device):
        if isinstance(step, FeatureCache):
            return step
        if progress is not None:
            progress(step)
    raise AssertionError("feature_steps ended without its cache")  # pragma: no cover


@torch.inference_mode()
def feature_steps(decoded: Any, config: Any, device: torch.device | str | None = None) -> Iterator[int | FeatureCache]:
    """:func:`compute_features` as a generator: the images done after each batch (an ``int``),
    then the :class:`FeatureCache`. A Ray streaming-generator task yields these, so the driver can
    show progress while a worker computes."""
    import torch.nn.functional as F

    from iqa_ray.training.build import build
    from iqa_ray.training.device import autocast_for, feature_autocast_dtype
    from iqa_ray.training.inference import ready_for_inference

    device = torch.device(device or "cpu")
    dtype = feature_autocast_dtype(config.optim.feature_dtype, device)
    model = build(config, device)
    layout, verify = ready_for_inference(model, config)
    images = decoded.images
    plain: list[np.ndarray] = []
    flipped: list[np.ndarray] | None = [] if config.data.hflip else None
    start = 0
    while start < len(images):
        shape, stop = images[start].shape, start + 1
        while stop < len(images) and stop - start < _BATCH and images[stop].shape == shape:
            stop += 1
        batch = torch.from_numpy(np.stack(images[start:stop])).to(device).permute(0, 3, 1, 2).float().div_(255.0)
        if model.backbone.img_size is not None:  # fixed-size backbones (ViT, Swin) see the image resized
            batch = F.interpolate(batch, size=(model.backbone.img_size,) * 2, mode="bilinear", antialias=True,
                                  align_corners=False)
        verify(batch[:1])  # the folded backbone against the unfolded one, on the first image
        with autocast_for(device, dtype):
            plain.append(model.pool_images(batch.contiguous(memory_format=layout)).cpu().numpy())
            if flipped is not None:
                flipped.append(model.pool_images(batch.flip(3).contiguous(memory_format=layout)).cpu().numpy())
        start = stop
        yield stop
    yield FeatureCache(plain=np.concatenate(plain).astype(np.float32),
                        flipped=None if flipped is None else np.concatenate(flipped).astype(np.float32),
                        key=cache_key(config),
                        channels=tuple(int(c) for c in model.backbone.tap_channels),
                        stage_columns=model.stage_mean_columns())


def probe_features(features: Any, config: Any) -> Any:
    """The probe's features (every stage's spatial mean) taken from a search's feature cache when it
    holds them (the mlp's ``stages``, ``blocks`` or ``every_block`` pooling of the same frozen
    ImageNet backbone: :attr:`FeatureCache.stage_columns`), else ``None``."""
    if features is None or features.stage_columns is None or config.model.pretrained_encoder:
        return None
    return features.stage_means()
