"""The engine's checkpoint file: loading it safely, the random generators' state it carries, and
rebuilding the trained model a checkpoint describes."""

from __future__ import annotations

import json
import os
import random
from typing import Any

import numpy as np
import torch

from iqa_ray.core.io import CheckpointError, load_weights_file
from iqa_ray.core.options import ConfigError
from iqa_ray.models.base import IQAModel
from iqa_ray.training.build import build
from iqa_ray.training.config import TrainConfig

CHECKPOINT_FILE = "checkpoint.pt"


CHECKPOINT_VERSION = 1


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": json.dumps(random.getstate()),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects (``weights_only=True``).

    Raises:
        CheckpointError: missing, not a checkpoint, or containing anything but tensors and plain
            data (a tampered file with pickled code is refused, not executed).
    """
    path, state = load_weights_file(path, default_file=CHECKPOINT_FILE, what="iqa-ray checkpoint", error=CheckpointError)
    if not isinstance(state, dict) or state.get("format") != "iqa-ray" or "model" not in state:
        raise CheckpointError(f"{path} is not an iqa-ray checkpoint (missing format marker or model weights)")
    return state


def best_model_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The best-by-validation weights stored in a checkpoint."""
    return checkpoint["best_model"] if checkpoint.get("best_model") is not None else checkpoint["model"]


def model_from_checkpoint(path: str | os.PathLike[str], device: torch.device | str = "cpu",
                          best: bool = True) -> tuple[IQAModel, TrainConfig]:
    """Rebuild a trained model (best-by-validation weights by default) and its config."""
    state = load_checkpoint(path)
    saved = json.loads(state["config"])
    try:
        config = TrainConfig.from_dict(saved)
    except ConfigError:
        if not saved.get("model", {}).get("pretrained_encoder"):
            raise
        # The encoder file the run started from is gone; its weights are in the checkpoint anyway.
        config = TrainConfig.from_dict(saved, pretrained_encoder=None)
    # The weights come from the checkpoint, so the backbone is built without any download or encoder.
    blank = config.replace(pretrained="none", pretrained_encoder=None)
    model = build(blank, torch.device(device))
    model.load_state_dict(best_model_state(state) if best else state["model"])
    model.eval()
    return model, config

