"""Shared fixtures. Everything heavy is session-scoped and small enough for 2 CPU cores."""

from __future__ import annotations

import os

import pytest

# Keep torch/numpy from oversubscribing the 2 CI cores when tests run beside Ray workers.
os.environ.setdefault("OMP_NUM_THREADS", "2")

TINY_TYPES = ("gaussian_blur", "jpeg", "gaussian_noise", "saturation", "contrast")


@pytest.fixture(scope="session")
def tiny_config():
    """A generation config that exercises every code path in about a second."""
    from iqa_ray.data.pregenerate import PregenConfig

    return PregenConfig(
        crop_size=64, max_short_side=128, max_crops_per_photo=2, per_image=3, distortions=TINY_TYPES,
        severity_levels=3, seed=0,
    )


@pytest.fixture(scope="session")
def tiny_dataset(tiny_config, tmp_path_factory):
    """The tiny config generated once, with the local engine."""
    from iqa_ray.data.pregenerate import pregenerate

    return pregenerate(tiny_config, tmp_path_factory.mktemp("generated"), engine="local")
