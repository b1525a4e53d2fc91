"""Full-reference quality labels for synthetically distorted images.

A distortion ``level`` is not comparable across distortion types: a blur at 0.5 and a JPEG at
0.5 are not equally bad. Every distorted image therefore gets a label derived from a
full-reference measure against its pristine reference, which *is* comparable across types.

The measure is SSIM (Wang, Bovik, Sheikh, Simoncelli, "Image quality assessment: from error
visibility to structural similarity", IEEE TIP 2004) as implemented by scikit-image, with the
paper's settings: Gaussian window (sigma 1.5), population covariances, K1=0.01, K2=0.03, computed
per RGB channel and averaged so that colour distortions (saturation) register.

Scale (documented in docs/DATA.md): ``label = 100 * clip(SSIM, 0, 1)``, a 0-100 MOS-like score
where 100 is the pristine reference and higher is better, like KonIQ-10k's or SPAQ's MOS.
"""

from __future__ import annotations

# The labels a pre-generated dataset carries (columns mos_<label>); the default and why: docs/DATA.md
# ("Which label is the default").
LABELS = ("severity", "ssim")
DEFAULT_LABEL = "severity"

import numpy as np
from skimage.metrics import structural_similarity


def ssim(reference: np.ndarray, distorted: np.ndarray) -> float:
    """SSIM of two uint8 RGB images of equal shape (H, W, 3), averaged over channels."""
    if reference.shape != distorted.shape:
        raise ValueError(f"reference {reference.shape} and distorted {distorted.shape} differ in shape")
    if reference.ndim != 3 or reference.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) RGB arrays, got {reference.shape}")
    return float(
        structural_similarity(
            reference,
            distorted,
            data_range=255,
            channel_axis=2,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    )


def ssim_to_mos(value: float) -> float:
    """Map an SSIM value to the documented 0-100 MOS-like scale."""
    return float(100.0 * min(max(value, 0.0), 1.0))


def quality_label(reference: np.ndarray, distorted: np.ndarray) -> float:
    """The content-dependent label of ``distorted``: ``100 * clip(SSIM(reference, distorted), 0, 1)``."""
    return ssim_to_mos(ssim(reference, distorted))
