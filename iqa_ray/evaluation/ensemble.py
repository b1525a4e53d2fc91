"""The ensemble a search hands back, as one model: its members' scores averaged with their weights.

A search run with ``--ensemble K`` (:mod:`iqa_ray.search.retrain`) writes ``ensemble.json`` in its
experiment folder (:func:`iqa_ray.core.ensembles.manifest`: each member's trial folder and weight)
and names it as its ``model`` in ``summary.json``. :func:`load_ensemble` rebuilds each member from
its trial's newest checkpoint (kept weights) and wraps them in :class:`EnsembleNetwork`, whose
``score`` is ``sum_i w_i * score_i``; :func:`iqa_ray.evaluation.scoring.load_model` wraps it in an
:class:`~iqa_ray.evaluation.scoring.IQAScorer` like any network, so it
scores paths, PIL images, arrays and tensors, ``iqa-ray score`` scores files, and ``iqa-ray
export-model`` traces it into one TorchScript/ONNX file, as for one model.

The members must prepare a photo the same way (:func:`scoring_key`: resize rule, whole image or
patches, label): the average of the members' patch-averaged scores is then the patch average of the
averaged network's scores, so one decode and one patch grid serve every member. A search keeps
trials that prepare photos otherwise than its best trial out of the ensemble's library.

Each member runs its own backbone (a frozen backbone shared by every member is computed once per
member too: correctness first; the cost is one backbone pass per member and image).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from iqa_ray.core.ensembles import read_manifest
from iqa_ray.training.config import TrainConfig

__all__ = ["EnsembleError", "EnsembleNetwork", "check_same_scoring", "load_ensemble", "scoring_key"]


class EnsembleError(ValueError):
    """A manifest or member that cannot make an ensemble; the message names it (``load_model``
    reports it as a :class:`~iqa_ray.evaluation.scoring.ScoreError`)."""


class EnsembleNetwork(nn.Module):
    """Trained networks scored together: ``{"score": sum_i weights[i] * members[i](images)["score"]}``.

    Args:
        members: the trained networks (each returns a dict with ``"score"``, shape (B,)).
        weights: one positive weight per member, summing to 1.
    """

    def __init__(self, members: list[nn.Module], weights: list[float]) -> None:
        super().__init__()
        if not members or len(members) != len(weights):
            raise ValueError(f"an ensemble needs one weight per member, got {len(members)} members and "
                             f"{len(weights)} weights")
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.tensor([float(w) for w in weights], dtype=torch.float32))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        for i, member in enumerate(self.members):
            total = total + self.weights[i] * member(images)["score"].float()
        return {"score": total}


# What decides how a photo becomes a model's input and what its score means (IQAScorer, the exports).
_DATA_KEYS = ("image_size", "short_side", "whole_image", "crop_size", "eval_patches", "patch_placement", "label")


def scoring_key(config: TrainConfig) -> dict[str, Any]:
    """What must be equal for two models' scores of a photo to be averaged from one preparation."""
    d = config.data
    return {**{k: getattr(d, k) for k in _DATA_KEYS}, "amp": config.optim.amp}


def check_same_scoring(configs: list[TrainConfig], names: list[str]) -> None:
    """Raise :class:`EnsembleError` unless every config prepares photos like the first (the keys that differ named)."""
    first = scoring_key(configs[0])
    for config, name in zip(configs[1:], names[1:]):
        other = scoring_key(config)
        differ = sorted(k for k in first if first[k] != other[k])
        if differ:
            raise EnsembleError(f"ensemble member {name} prepares photos unlike {names[0]} ("
                             + ", ".join(f"{k}: {other[k]!r} vs {first[k]!r}" for k in differ)
                             + "); an ensemble's members must share them")


def load_ensemble(path: str | os.PathLike[str], device: torch.device) -> tuple[EnsembleNetwork, TrainConfig, str]:
    """The ensemble of the manifest at ``path`` (members from their trials' newest checkpoints, kept
    weights, in eval mode on ``device``), the config its photos are prepared by (its first member's)
    and a description of it.

    Raises:
        EnsembleError: a bad manifest, a member without a checkpoint, or members that prepare photos
            differently (each named).
    """
    from iqa_ray.core.io import CheckpointError
    from iqa_ray.evaluation.cross_dataset import latest_trial_checkpoint
    from iqa_ray.training.checkpoints import model_from_checkpoint

    path = Path(path)
    try:
        members = read_manifest(path)
    except ValueError as exc:
        raise EnsembleError(str(exc)) from None
    networks, configs = [], []
    for folder, _ in members:
        checkpoint = latest_trial_checkpoint(path.parent / folder)
        if checkpoint is None:
            raise EnsembleError(f"{path}: member {folder} left no checkpoint (no checkpoint_*/checkpoint.pt in "
                             f"{path.parent / folder})")
        try:
            network, config = model_from_checkpoint(checkpoint, device=device)
        except CheckpointError as exc:
            raise EnsembleError(f"{path}: member {folder}: {exc}") from None
        networks.append(network)
        configs.append(config)
    check_same_scoring(configs, [folder for folder, _ in members])
    ensemble = EnsembleNetwork(networks, [w for _, w in members]).to(device).eval()
    weights = ", ".join(f"{folder} {w:.3g}" for folder, w in members)
    return ensemble, configs[0], f"ensemble {path} ({len(members)} members: {weights})"
