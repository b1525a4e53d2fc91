"""Process-wide run switches shared by every training loop: seeding and the default device."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % 2**31


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
