"""The engine's checkpoint file: what it holds (:class:`TrainState`, the one object that is saved and
restored), loading it safely, the random generators' state it carries, and rebuilding the trained
model a checkpoint describes."""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iqa_ray.core.io import CheckpointError, git_revision, load_weights_file, save_checkpoint, written_with
from iqa_ray.core.options import ConfigError
from iqa_ray.models.base import IQAModel
from iqa_ray.training.build import build
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.schedule import Schedule

CHECKPOINT_FILE = "checkpoint.pt"


CHECKPOINT_VERSION = 1


@dataclass
class TrainState:
    """A training run at the end of an epoch: everything its checkpoint holds, and nothing else.

    :meth:`checkpoint` is the file's content and :meth:`restore` reads it back, so saving and
    resuming are one serialisation. Each tensor is stored once: the kept (best or last) weights are
    written apart from the current ones only when they differ (``best_model: None`` = the same).

    Attributes:
        model, optimizer, schedule, scaler: the run's objects, built before any state is restored.
        epoch: the last finished epoch (0-based; -1 before the first).
        history: every finished epoch's metrics.
        best_epoch: the epoch whose weights are kept (0-based; -1 while none is).
        best_val: that epoch's validation metrics.
        best_model: the kept weights (on the CPU), or ``None`` while none are kept.
        bad_epochs: epochs since the last one whose weights were kept (early stopping's count).
        kept_is_current: the last finished epoch's weights are the kept ones.
        val_ids: the validation photos' image ids, in the order the feed scores them.
        kept_val: the kept epoch's scores of those photos and their MOS (float64, the very values its
            reported validation metrics were computed from), or ``None`` while none are kept. A
            search's ensemble selection (:func:`iqa_ray.core.ensembles.caruana_select`) reads them
            from the trials' checkpoints instead of scoring every trial again.
    """

    model: IQAModel
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_val: dict[str, float] = field(default_factory=lambda: {"srcc": -math.inf})
    best_model: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0
    kept_is_current: bool = False
    val_ids: list[str] = field(default_factory=list)
    kept_val: tuple[np.ndarray, np.ndarray] | None = None

    def end_epoch(self, epoch: int, val: dict[str, float], select_epoch: str,
                  val_predictions: tuple[np.ndarray, np.ndarray] | None = None) -> bool:
        """Record that ``epoch`` finished with validation metrics ``val``; whether its weights are kept.

        ``"best"``: the epoch with the best validation SRCC so far; ``"last"``: every finite epoch
        replaces the kept weights, so the run hands back its final weights. ``val_predictions``: the
        epoch's validation scores and MOS, kept with its weights.
        """
        kept = bool(np.isfinite(val["srcc"]) and (select_epoch == "last" or val["srcc"] > self.best_val["srcc"]))
        if kept:
            self.best_epoch, self.best_val = epoch, dict(val)
            self.best_model = {k: v.detach().clone().cpu() for k, v in self.model.state_dict().items()}
            self.kept_val = (None if val_predictions is None
                             else tuple(np.asarray(v, dtype=np.float64).copy() for v in val_predictions))
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        self.epoch, self.kept_is_current = epoch, kept
        return kept

    def checkpoint(self, config: TrainConfig) -> dict[str, Any]:
        """The checkpoint file's content: this state, the config that made it and the random
        generators' state now."""
        return {
            "format": "iqa-ray", "version": CHECKPOINT_VERSION, "epoch": self.epoch,
            "config": json.dumps(config.to_dict()), "git_revision": git_revision(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "rng": rng_state(), "history": json.dumps(self.history), "best_epoch": self.best_epoch,
            "best_val": json.dumps(self.best_val), "best_model": None if self.kept_is_current else self.best_model,
            "bad_epochs": self.bad_epochs,
            "kept_val": None if self.kept_val is None else {
                "image_id": list(self.val_ids), "score": torch.from_numpy(self.kept_val[0]),
                "mos": torch.from_numpy(self.kept_val[1])},
        }

    def save(self, directory: str | os.PathLike[str], config: TrainConfig) -> Path:
        """Write :meth:`checkpoint` to ``directory``/``checkpoint.pt`` (atomically); its path."""
        target = Path(directory) / CHECKPOINT_FILE
        save_checkpoint(target, self.checkpoint(config))
        return target

    def restore(self, checkpoint: dict[str, Any], config: TrainConfig) -> None:
        """Continue from ``checkpoint`` (what :meth:`checkpoint` wrote), random generators included.

        Raises:
            CheckpointError: the checkpoint was written by a different config.
        """
        if not written_with(checkpoint, config):
            raise CheckpointError("the checkpoint was written by a different config; resume needs the same config")
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.schedule.load_state_dict(checkpoint["schedule"])
        set_rng_state(checkpoint["rng"])
        self.epoch = int(checkpoint["epoch"])
        self.history = json.loads(checkpoint["history"])
        self.best_epoch = int(checkpoint["best_epoch"])
        self.best_val = json.loads(checkpoint["best_val"])
        self.best_model = checkpoint["best_model"]
        self.kept_is_current = self.best_model is None and self.best_epoch >= 0
        if self.kept_is_current:  # the kept weights were this checkpoint's own
            self.best_model = {k: v.detach().clone().cpu() for k, v in checkpoint["model"].items()}
        self.bad_epochs = int(checkpoint["bad_epochs"])
        kept_val = checkpoint.get("kept_val")  # checkpoints written before it: none kept
        self.kept_val = None if not kept_val else (kept_val["score"].numpy().copy(), kept_val["mos"].numpy().copy())
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])


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


def kept_val_predictions(checkpoint: dict[str, Any]) -> tuple[list[str], np.ndarray, np.ndarray, int] | None:
    """The validation photos' ids, the kept epoch's scores of them, their MOS as the run read them,
    and that epoch (from 1); ``None`` for a checkpoint that kept none (or was written before them)."""
    kept_val = checkpoint.get("kept_val")
    if not kept_val:
        return None
    return (list(kept_val["image_id"]), kept_val["score"].numpy().astype(np.float64),
            kept_val["mos"].numpy().astype(np.float64), int(checkpoint["best_epoch"]) + 1)


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

