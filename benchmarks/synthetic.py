"""A synthetic decoded dataset for benchmarks that must not read or download anything.

Each image is a smooth random pattern plus noise whose strength sets its MOS (stronger noise =
lower score), so a model has something learnable and its scores vary from image to image. The
images are built directly as the engine's decode-once cache (:class:`DecodedImages`: one
contiguous ``uint8`` (N, H, W, 3) array and a label table), so the engine's own loaders,
crops and steps run on them exactly as on decoded photos.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from iqa_ray.data.decoded import DecodedImages


def synthetic_decoded(n_train: int, n_val: int, width: int, height: int, *, n_test: int = 0,
                      seed: int = 0) -> DecodedImages:
    """``n_train + n_val + n_test`` images of ``width`` x ``height`` with MOS in [0, 100]."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    images = np.empty((n, height, width, 3), dtype=np.uint8)
    noise = rng.uniform(0.0, 1.0, size=n)
    cell = 16
    for i in range(n):
        coarse = rng.uniform(40, 215, size=(-(-height // cell), -(-width // cell), 3))
        smooth = np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)[:height, :width]
        grain = rng.normal(0.0, 60.0 * noise[i], size=(height, width, 1))
        images[i] = np.clip(smooth + grain, 0, 255).astype(np.uint8)
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    table = pd.DataFrame({"image_id": [f"synthetic-{i}" for i in range(n)], "split": splits,
                          "mos": 100.0 * (1.0 - noise), "group": [f"g{i}" for i in range(n)]})
    return DecodedImages(images=images, table=table)
