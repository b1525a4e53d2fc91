"""Classical no-reference IQA baselines that run offline: PIQE and BRISQUE.

* PIQE (Venkatanath et al., "Blind image quality evaluation using perception based features",
  NCC 2015) via ``pypiqe``, a port that matches MATLAB's ``piqe``.
* BRISQUE (Mittal, Moorthy, Bovik, "No-reference image quality assessment in the spatial
  domain", IEEE TIP 2012) via ``brisque`` 0.2.0 and its bundled SVR model.

Both return *lower is better* scores; :func:`baseline_scores` negates them so that, like MOS,
higher means better and SRCC against MOS is positive when the baseline works.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Iterable

import numpy as np


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


def brisque_score(image: np.ndarray) -> float:
    """BRISQUE score of an RGB uint8 image (lower is better, roughly 0-100)."""
    return float(_brisque_model().score(image))


BASELINES: dict[str, Callable[[np.ndarray], float]] = {"piqe": piqe_score, "brisque": brisque_score}


def baseline_scores(name: str, images: Iterable[np.ndarray]) -> np.ndarray:
    """Quality predictions of a classical baseline, sign-flipped so that higher is better."""
    if name not in BASELINES:
        raise KeyError(f"unknown baseline {name!r}; valid: {sorted(BASELINES)}")
    fn = BASELINES[name]
    return -np.array([fn(im) for im in images], dtype=np.float64)
