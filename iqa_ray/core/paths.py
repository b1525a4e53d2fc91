"""Default locations of generated data and results (overridable by environment variables)."""

from __future__ import annotations

import os
from pathlib import Path

# Inside an experiment folder: the selected configuration re-trained on training and validation
# photos, the model the search hands back (a Tune experiment of one trial; iqa_ray.search.retrain).
REFIT_DIR = "refit"


def default_data_dir() -> Path:
    """Root of pre-generated datasets: ``$IQA_RAY_DATA`` or ``~/.cache/iqa_ray/datasets``."""
    return Path(os.environ.get("IQA_RAY_DATA", Path.home() / ".cache" / "iqa_ray" / "datasets")).expanduser()


def bundled_datasets_dir() -> Path:
    """Datasets that ship with the repository (``datasets/`` beside ``iqa_ray/``): ``$IQA_RAY_BUNDLED`` or that folder."""
    return Path(os.environ.get("IQA_RAY_BUNDLED", Path(__file__).resolve().parents[2] / "datasets")).expanduser()


def default_results_dir() -> Path:
    """Root of experiment results: ``$IQA_RAY_RESULTS`` or ``./results``."""
    return Path(os.environ.get("IQA_RAY_RESULTS", "results")).expanduser().resolve()


def default_encoders_dir() -> Path:
    """Cache of SSL encoders pre-trained for searches: ``$IQA_RAY_ENCODERS`` or ``<data dir>/encoders``."""
    return Path(os.environ.get("IQA_RAY_ENCODERS", default_data_dir() / "encoders")).expanduser()
