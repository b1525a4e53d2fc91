"""What a user gets for free on the same test photos: PIQE, BRISQUE and a linear probe.

* PIQE (Venkatanath et al., "Blind image quality evaluation using perception based features",
  NCC 2015) via ``pypiqe``, a port that matches MATLAB's ``piqe``.
* BRISQUE (Mittal, Moorthy, Bovik, "No-reference image quality assessment in the spatial
  domain", IEEE TIP 2012) via ``brisque`` 0.2.0 and its bundled SVR model.

Both return *lower is better* scores; :func:`baseline_scores` negates them so that, like MOS,
higher means better and SRCC against MOS is positive when the baseline works.

The strong baseline is a **linear probe on the frozen backbone** a search starts from: every
stage's globally average-pooled features of each whole image at its own size, concatenated,
standardised on the training split, and a ridge regression whose strength is chosen on the
validation split (never on test). On human-rated photos this is hard to beat (LIVE Challenge:
0.79-0.81 SRCC with ImageNet EfficientNet-Lite0), so a search that does not beat it has not earned
its compute. :func:`baseline_report` scores all three on a decoded dataset's test split.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from iqa_ray.core.metrics import all_metrics, srcc


def piqe_score(image: np.ndarray) -> float:
    """PIQE score of an RGB uint8 image (0 best, 100 worst)."""
    from pypiqe import piqe

    return float(piqe(image)[0])


@functools.lru_cache(maxsize=1)
def _brisque_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # brisque imports scipy.ndimage.filters
        from brisque import BRISQUE

    class _FlatBRISQUE(BRISQUE):
        # brisque 0.2.0 builds its 36 features as an object array of 1-element arrays and
        # float()s each one, which numpy 2 refuses; flattening them to plain floats is the fix.
        def calculate_brisque_features(self, image, kernel_size=7, sigma=7 / 6):
            features = super().calculate_brisque_features(image, kernel_size=kernel_size, sigma=sigma)
            return np.array([float(np.asarray(f, dtype=np.float64).ravel()[0]) for f in features])

    return _FlatBRISQUE(url=False)


def brisque_features(image: np.ndarray) -> np.ndarray:
    """The 36 BRISQUE features of an RGB uint8 image: 18 natural-scene statistics of the grey image's
    mean-subtracted contrast-normalised coefficients, then the same 18 at half size (bicubic), as
    ``brisque`` 0.2.0 computes them before its SVR (:func:`brisque_score` scores these)."""
    import cv2
    import skimage.color

    model = _brisque_model()
    grey = skimage.color.rgb2gray(model.remove_alpha_channel(image))
    half = cv2.resize(grey, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
    return np.concatenate([model.calculate_brisque_features(g, kernel_size=7, sigma=7 / 6) for g in (grey, half)])


def brisque_score(image: np.ndarray) -> float:
    """BRISQUE score of an RGB uint8 image (lower is better, roughly 0-100)."""
    return float(_brisque_model().calculate_image_quality_score(brisque_features(image)))


BASELINES: dict[str, Callable[[np.ndarray], float]] = {"piqe": piqe_score, "brisque": brisque_score}


FLAT = "flat image (one colour throughout)"  # why BRISQUE gives no score: its contrast normalisation divides 0 by 0
# At most this many unscored photos are named in a baseline's record (the count covers them all).
NAMED_UNSCORED = 20


def baseline_scores(name: str, images: Iterable[np.ndarray]) -> np.ndarray:
    """Quality predictions of a classical baseline, sign-flipped so that higher is better; NaN for an
    image it gives no finite score (:func:`scored_images` says why)."""
    return scored_images(name, images)[0]


def scored_images(name: str, images: Iterable[np.ndarray]) -> tuple[np.ndarray, list[str | None]]:
    """A classical baseline's sign-flipped scores (NaN where it has none) and, per image, why it has
    none (``None`` where it has one): :data:`FLAT`, ``no finite score``, or the numerical error raised.

    Raises:
        KeyError: an unknown baseline (the message lists the valid ones).
    """
    if name not in BASELINES:
        raise KeyError(f"unknown baseline {name!r}; valid: {sorted(BASELINES)}")
    fn = BASELINES[name]
    scores, reasons = [], []
    for image in images:
        reason = None
        try:
            with np.errstate(invalid="ignore", divide="ignore"):  # a flat image's 0/0: recorded below
                score = float(fn(image))
        except (ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:  # recorded as the image's reason
            score, reason = math.nan, f"{type(exc).__name__}: {exc}"
        if not math.isfinite(score):
            pixels = np.asarray(image).reshape(-1, np.asarray(image).shape[-1] if np.ndim(image) == 3 else 1)
            flat = bool(len(pixels) and np.ptp(pixels, axis=0).max() == 0)
            reason = FLAT if flat else (reason or "no finite score")
        scores.append(-score if reason is None else math.nan)
        reasons.append(reason)
    return np.asarray(scores, dtype=np.float64), reasons


# Ridge strengths tried on the validation split (features are standardised, so these are on a
# common scale whatever the backbone).
PROBE_ALPHAS: tuple[float, ...] = tuple(10.0**k for k in range(-2, 6))
_PROBE_BATCH = 16


def pooled_stage_features(images: Sequence[np.ndarray], *, backbone: str = "efficientnet_lite0",
                          pretrained: str = "offline", img_size: int | None = None,
                          device: Any = None) -> np.ndarray:
    """Every stage's global-average-pooled features of each image, concatenated: (N, sum(channels)).

    Images are taken whole, at their own size (fixed-size backbones, ViT and Swin, get them resized
    to ``img_size``), through the frozen backbone in float32.

    Args:
        images: RGB uint8 (H, W, 3) images.
        backbone: a supported backbone name.
        pretrained: its weight source (``"offline"``, ``"hub"``, a file, ``"none"``).
        img_size: input size of fixed-size backbones (default 224).
        device: where to run (default CPU).
    """
    import torch
    import torch.nn.functional as F

    from iqa_ray.models.backbones import create_backbone

    device = torch.device(device or "cpu")
    model = create_backbone(backbone, pretrained=pretrained, frozen=True, img_size=img_size).to(device).eval()
    rows: list[np.ndarray] = []
    start = 0
    with torch.no_grad():
        while start < len(images):
            # A batch of consecutive images of one size (datasets of mixed sizes go one by one).
            shape, stop = images[start].shape, start + 1
            while stop < len(images) and stop - start < _PROBE_BATCH and images[stop].shape == shape:
                stop += 1
            batch = torch.from_numpy(np.stack(images[start:stop])).to(device).permute(0, 3, 1, 2).float().div_(255.0)
            if model.img_size is not None:
                batch = F.interpolate(batch, size=(model.img_size, model.img_size), mode="bilinear",
                                      antialias=True, align_corners=False)
            stages = model(batch)
            rows.append(torch.cat([s.float().mean(dim=(2, 3)) for s in stages], dim=1).cpu().numpy())
            start = stop
    return np.concatenate(rows).astype(np.float64)


def ridge_probe(features: np.ndarray, mos: np.ndarray, train: np.ndarray, val: np.ndarray, test: np.ndarray,
                alphas: Sequence[float] = PROBE_ALPHAS, *, refit: bool = False) -> dict[str, float]:
    """Ridge regression from features to MOS: fit on ``train``, strength chosen on ``val``, scored on ``test``.

    ``refit``: once the strength is chosen, fit it again on ``train`` and ``val`` together (and
    standardise on both) before scoring the test photos: the probe's side of a model re-trained
    on training and validation photos (``train_on_val``).

    Returns:
        The test metrics (:func:`~iqa_ray.core.metrics.all_metrics`), the chosen ``alpha``, its
        validation SRCC ``val_srcc`` (of the fit on ``train`` alone) and the test count ``n``.
    """
    from sklearn.linear_model import Ridge

    def standardised(rows: np.ndarray) -> np.ndarray:
        mean, std = features[rows].mean(axis=0), features[rows].std(axis=0) + 1e-8
        return (features - mean) / std

    x = standardised(train)
    fits = {a: Ridge(alpha=a).fit(x[train], mos[train]) for a in alphas}
    val_srcc = {a: srcc(f.predict(x[val]), mos[val]) for a, f in fits.items()}
    # A NaN validation SRCC (constant predictions) never wins; ties go to the stronger ridge.
    alpha = max(alphas, key=lambda a: (np.nan_to_num(val_srcc[a], nan=-np.inf), a))
    final = fits[alpha]
    if refit:
        both = np.concatenate([train, val])
        x = standardised(both)
        final = Ridge(alpha=alpha).fit(x[both], mos[both])
    return {**all_metrics(final.predict(x[test]), mos[test]), "alpha": float(alpha),
            "val_srcc": float(val_srcc[alpha]), "n": int(len(test))}


def classical_baseline(decoded: Any, name: str) -> dict[str, Any]:
    """PIQE or BRISQUE on a decoded dataset's test split (empty without test photos).

    The photos the baseline gives no finite score (BRISQUE on a flat image) are left out of its
    metrics and listed, never turned into a NaN correlation of every photo.

    Returns:
        The metrics over the scored photos (:func:`~iqa_ray.core.metrics.all_metrics`; ``None``
        for one that is undefined, ``undefined`` saying why), ``n`` the test photos, ``scored``
        those it scored; with unscored photos, ``unscored`` (their count, the count of each reason,
        the first :data:`NAMED_UNSCORED` by image and reason) and ``note``, one line saying so.
    """
    test = decoded.split_indices("test")
    if len(test) == 0:
        return {}
    mos = decoded.table["mos"].to_numpy(dtype=np.float64)[test]
    scores, reasons = scored_images(name, [decoded.images[i] for i in test])
    ok = np.isfinite(scores)
    metrics = {k: (float(v) if math.isfinite(v) else None) for k, v in all_metrics(scores[ok], mos[ok]).items()}
    record: dict[str, Any] = {**metrics, "n": int(len(test)), "scored": int(ok.sum())}
    if metrics["srcc"] is None or metrics["plcc"] is None:
        record["undefined"] = _why_undefined(scores[ok], mos[ok])
    missing = [(str(decoded.table["image_id"].iloc[i]), r) for i, r in zip(test, reasons) if r is not None]
    if missing:
        counts = {r: sum(1 for _, m in missing if m == r) for r in dict.fromkeys(r for _, r in missing)}
        record["unscored"] = {"count": len(missing), "reasons": counts,
                              "images": [{"image": i, "reason": r} for i, r in missing[:NAMED_UNSCORED]]}
        record["note"] = (f"{len(missing)} of {len(test)} test photos gave {name.upper()} no finite score: "
                          + "; ".join(f"{c} x {r}" for r, c in counts.items()))
    return record


def _why_undefined(scores: np.ndarray, mos: np.ndarray) -> str:
    """Why a baseline's correlation over its scored photos is undefined (:mod:`iqa_ray.core.metrics`)."""
    if len(scores) < 3:
        return f"a correlation needs at least 3 scored photos, {len(scores)} were scored"
    if np.ptp(scores) == 0:
        return "it gave every scored photo the same score"
    if np.ptp(mos) == 0:
        return "every scored photo has the same MOS"
    return "the correlation is undefined"


def probe_baseline(decoded: Any, *, backbone: str = "efficientnet_lite0", pretrained: str = "offline",
                   img_size: int | None = None, device: Any = None, features: np.ndarray | None = None,
                   refit: bool = False) -> dict[str, Any]:
    """The frozen-feature linear probe on a decoded dataset: fit on train, ridge strength on val, scored on test.

    ``features``: the (N, D) probe features of every row when already computed (a search's feature
    cache, :meth:`iqa_ray.training.features.FeatureCache.stage_means`); computed here otherwise.
    ``refit``: fitted again on train and val once the strength is chosen (:func:`ridge_probe`), the
    probe's side of a model re-trained on training and validation photos.

    Returns:
        :func:`ridge_probe`'s result plus the backbone it probed; empty without a test split.
    """
    split = decoded.table["split"].to_numpy()
    test = np.flatnonzero(split == "test")
    if len(test) == 0:
        return {}
    mos = decoded.table["mos"].to_numpy(dtype=np.float64)
    if features is None:
        features = pooled_stage_features([decoded.images[i] for i in range(len(split))], backbone=backbone,
                                         pretrained=pretrained, img_size=img_size, device=device)
    probe = ridge_probe(features, mos, np.flatnonzero(split == "train"), np.flatnonzero(split == "val"), test,
                        refit=refit)
    return {**probe, "backbone": backbone, "pretrained": str(pretrained), "refit": refit,
            "features": "every stage, global average pool, whole image at its own size"}


def baseline_report(decoded: Any, *, backbone: str = "efficientnet_lite0", pretrained: str = "offline",
                    img_size: int | None = None, device: Any = None) -> dict[str, dict[str, Any]]:
    """PIQE, BRISQUE and the frozen-feature linear probe on a decoded dataset's test split.

    Args:
        decoded: a :class:`~iqa_ray.data.decoded.DecodedImages` with train / val / test rows.
        backbone, pretrained, img_size: the frozen backbone of the probe (the search's own).
        device: where the probe's backbone runs.

    Returns:
        ``{"piqe": metrics, "brisque": metrics, "linear_probe": metrics + alpha, backbone, ...}``, each
        with ``n`` test images; empty when the dataset has no test split.
    """
    if not (decoded.table["split"] == "test").any():
        return {}
    report = {name: classical_baseline(decoded, name) for name in BASELINES}
    report["linear_probe"] = probe_baseline(decoded, backbone=backbone, pretrained=pretrained, img_size=img_size,
                                            device=device)
    return report
