"""Scoring a model on a loader or on a whole dataset: patch scores averaged per image, metrics.

The engine's validation and test scores, ``iqa-ray evaluate``'s cross-dataset table and the
search's one test scoring of its selected trial all go through :func:`predict`.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from iqa_ray.core.metrics import all_metrics
from iqa_ray.core.runtime import default_device
from iqa_ray.models.base import IQAModel
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.device import autocast_for, to_float
from iqa_ray.training.loaders import decode_for, eval_dataset, eval_loader, load_run_table


@torch.no_grad()
def predict(model: IQAModel, loader: DataLoader, device: torch.device,
            amp: torch.dtype | None = None, chunk: int = 64,
            memory_format: torch.memory_format | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores and MOS of every image of ``loader``; patch scores are averaged per image.

    Patches go through the model ``chunk`` at a time (a batch of 64 images with 25 patches each
    would otherwise be one 1,600-patch forward pass). ``amp`` is the backbone's autocast dtype
    (``None``: float32); scores are float32 either way.
    """
    was_training = model.training
    model.eval()
    preds, mos = [], []
    try:
        for batch in loader:
            images = batch["image"]
            b, p = images.shape[:2]
            flat = images.flatten(0, 1)
            parts = []
            for start in range(0, len(flat), chunk):
                inputs = to_float(flat[start:start + chunk], device)
                if memory_format is not None:
                    inputs = inputs.contiguous(memory_format=memory_format)
                with autocast_for(device, amp):
                    parts.append(model(inputs)["score"].float())
            scores = torch.cat(parts)
            preds.append(scores.view(b, p).mean(dim=1).cpu().numpy())
            mos.append(batch["mos"].numpy())
    finally:
        model.train(was_training)
    return np.concatenate(preds).astype(np.float64), np.concatenate(mos).astype(np.float64)


def evaluate(model: IQAModel, loader: DataLoader, device: torch.device,
             amp: torch.dtype | None = None, chunk: int = 64,
             memory_format: torch.memory_format | None = None) -> dict[str, float]:
    """SRCC, PLCC, KRCC, RMSE and logistic PLCC of ``model`` on ``loader``."""
    pred, mos = predict(model, loader, device, amp, chunk=chunk, memory_format=memory_format)
    return all_metrics(pred, mos)


def evaluate_dataset(model: IQAModel, config: TrainConfig, spec: str, *, split: str = "all",
                     device: torch.device | None = None) -> dict[str, float]:
    """Score a trained model on another dataset (cross-dataset evaluation), with the run's crops.

    Args:
        model: the trained model.
        config: the run's config (crop size, patches, label, image size are reused).
        spec: the dataset to score (any ``--dataset`` form).
        split: ``"all"`` (the usual cross-dataset protocol: the model never saw this dataset) or
            one split name.
        device: where to run.

    Returns:
        The metrics plus ``n``, the number of images scored.
    """
    device = device or default_device()
    table = load_run_table(config, spec)
    if split != "all":
        table = table[table["split"] == split].reset_index(drop=True)
    decoded = decode_for(config, table)
    rows = np.arange(len(decoded.table))
    loader = eval_loader(config, eval_dataset(config, decoded, rows))
    return {**evaluate(model, loader, device, chunk=config.data.eval_chunk), "n": int(len(rows))}


def ready_for_inference(model: IQAModel, config: TrainConfig) -> tuple[torch.memory_format, Callable[[torch.Tensor], None]]:
    """Put ``model`` in eval mode and its fastest inference form, in place: a CNN backbone in the
    ``channels_last`` layout (:func:`~iqa_ray.training.build.inference_memory_format`) and, where it
    is frozen, its BatchNorms folded into its convolutions (:func:`fold_for_inference`). The same
    scores within float32 rounding; the feature pass and the search's test scoring use it.

    Returns the memory format its inputs take and ``verify(images)``: the first call compares the
    folded backbone with the unfolded one on ``images`` (float, (B, 3, H, W); :func:`check_folded`)
    and drops the unfolded copy; later calls, and every call where nothing was folded, do nothing.
    """
    from iqa_ray.training.build import inference_memory_format

    layout = inference_memory_format(config) or torch.contiguous_format
    model.eval().to(memory_format=layout)
    unfolded = fold_for_inference(model)

    def verify(images: torch.Tensor) -> None:
        nonlocal unfolded
        if unfolded is not None:
            check_folded(model, unfolded, images.contiguous(memory_format=layout))
            unfolded = None

    return layout, verify


def fold_for_inference(model: Any) -> Any:
    """Fold the BatchNorms of ``model``'s frozen CNN backbone into its convolutions, in place
    (:func:`~iqa_ray.models.backbones.fold_batchnorm`: about 1.4x faster on CPU), and return a copy
    of the unfolded backbone for :func:`check_folded`; ``None`` where nothing was folded."""
    import copy

    from iqa_ray.models.backbones import fold_batchnorm

    backbone = model.backbone
    if not backbone.frozen or backbone.training:
        return None
    unfolded = copy.deepcopy(backbone)
    return unfolded if fold_batchnorm(backbone) else None


@torch.no_grad()
def check_folded(model: Any, unfolded: Any, image: torch.Tensor, rtol: float = 1e-4) -> None:
    """Raise ``AssertionError`` unless ``model``'s folded backbone gives ``unfolded``'s maps for
    ``image`` within ``rtol`` of each map's scale (float32 rounding): a fold that does not match a
    backbone's dataflow is caught before anything is computed with it."""
    for got, want in zip(model.backbone(image), unfolded(image), strict=True):
        scale = float(want.abs().max()) or 1.0
        worst = float((got - want).abs().max()) / scale
        if worst > rtol:
            raise AssertionError(f"folding the BatchNorms of {model.backbone.name} changed its features by "
                                 f"{worst:.1e} of their scale (allowed {rtol:g}); please report this backbone")
