"""Score images with a trained model: the Python API behind ``iqa-ray score``.

    >>> model = iqa_ray.load_model("results/my_search")          # doctest: +SKIP
    >>> model(["a.jpg", "b.jpg"])                                 # doctest: +SKIP
    array([61.2, 34.7])

``MODEL`` is an experiment folder (the model it handed back: its selected trial, refit, or the
ensemble of ``--ensemble K``), a trial folder (its newest checkpoint), a run folder holding
``checkpoint.pt``, a checkpoint file, or an ensemble manifest (``ensemble.json``,
:mod:`iqa_ray.evaluation.ensemble`). Scores are on the training label's
scale (MOS for real datasets, 0-100 higher is better for generated ones).

Every input goes through exactly what evaluation does to a test image: decoded upright (EXIF
orientation), converted to RGB, resized by the run's rule (``image_size`` or ``short_side``),
then the whole image or ``eval_patches`` patches placed as the run places them
(:func:`iqa_ray.training.loaders.eval_dataset`), scored through :func:`iqa_ray.training.inference.predict` in
``eval_chunk`` chunks with the run's autocast, and the patch scores averaged. So a model scores
a file here exactly as the search scored it on its test split (``tests/test_scoring.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from iqa_ray.core.errors import DatasetError
from iqa_ray.data.decoded import DecodedImages, decode_table, prepare_image
from iqa_ray.training.config import TrainConfig

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class ScoreError(ValueError):
    """A bad model path or input; the message names it and what is accepted."""


@dataclass
class ScoredFiles:
    """Scores of files, in the order given, and the files that could not be read (with why)."""

    paths: list[str]
    scores: np.ndarray
    failed: list[dict[str, str]] = field(default_factory=list)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"image": self.paths, "score": self.scores})


class IQAScorer:
    """A trained model with its preprocessing; call it on images to get their scores.

    Args:
        model: the trained network (kept weights).
        config: its run config (resize rule, patches, autocast).
        device: where to compute.
        source: where the model came from (printed in ``repr``).
    """

    def __init__(self, model: Any, config: TrainConfig, device: torch.device, source: str = "") -> None:
        from iqa_ray.training.build import memory_format
        from iqa_ray.training.device import autocast_dtype

        self.model, self.config, self.device, self.source = model.eval(), config, device, source
        self.amp = autocast_dtype(config.optim.amp, device)
        self.memory_format = memory_format(config, device)

    def __repr__(self) -> str:
        m, d = self.config.model, self.config.data
        view = "whole image" if d.whole_image else f"{d.eval_patches} patches of {d.crop_size} px ({d.patch_placement})"
        size = d.image_size or (f"short side {d.short_side}" if d.short_side else "native size")
        return (f"IQAScorer({m.family} on {m.backbone}, {view}, images at {size}, device {self.device}"
                + (f", from {self.source}" if self.source else "") + ")")

    # ------------------------------------------------------------------ inputs

    def __call__(self, images: Any) -> np.ndarray:
        """Scores (float64, one per image) of a path, a PIL image, an (H, W, 3) uint8 array, a
        (3, H, W) or (N, 3, H, W) tensor (float in [0, 1] or uint8), or a list of any of them.

        Raises:
            ScoreError: an input of another kind, or an image that cannot be read (the message
                names it; :meth:`score_files` reports unreadable files instead of stopping).
        """
        items = self._as_list(images)
        arrays = []
        for i, item in enumerate(items):
            try:
                arrays.append(self._prepare(item))
            except DatasetError as exc:
                raise ScoreError(str(exc)) from None
            except (TypeError, ValueError) as exc:
                raise ScoreError(f"input {i}: {exc}") from None
        return self._score_arrays(arrays, [str(i) for i in range(len(arrays))])

    def score_files(self, paths: Sequence[str | os.PathLike[str]], batch_size: int = 64,
                    progress: Callable[[int], None] | None = None) -> ScoredFiles:
        """Score image files ``batch_size`` at a time; unreadable files are listed, not fatal.

        ``progress(n)`` is called after each batch with the number of files it held.
        """
        kept, scores, failed = [], [], []
        d = self.config.data
        for start in range(0, len(paths), batch_size):
            chunk = [str(p) for p in paths[start:start + batch_size]]
            table = pd.DataFrame({"image_id": chunk, "path": chunk, "split": "test", "mos": np.nan})
            try:
                decoded = decode_table(table, image_size=d.image_size, short_side=d.short_side,
                                       min_size=0 if d.whole_image else d.crop_size, on_error="skip")
            except DatasetError:  # every file of the chunk failed: say which and why, per file
                decoded = None
            if decoded is None:
                failed.extend(self._reasons(chunk))
            else:
                failed.extend({"image": s["image_id"], "error": s["reason"]} for s in decoded.skipped)
                ids = decoded.table["image_id"].tolist()
                scores.append(self._score_decoded(decoded))
                kept.extend(ids)
            if progress is not None:
                progress(len(chunk))
        return ScoredFiles(paths=kept, scores=np.concatenate(scores) if scores else np.zeros(0), failed=failed)

    def _reasons(self, paths: list[str]) -> list[dict[str, str]]:
        d = self.config.data
        out = []
        for path in paths:
            table = pd.DataFrame({"image_id": [path], "path": [path], "split": "test", "mos": np.nan})
            try:
                decode_table(table, image_size=d.image_size, short_side=d.short_side,
                             min_size=0 if d.whole_image else d.crop_size, threads=1)
            except DatasetError as exc:
                out.append({"image": path, "error": str(exc)})
        return out

    @staticmethod
    def _as_list(images: Any) -> list[Any]:
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            return list(images)
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)):
            return [images]
        if isinstance(images, Iterable):
            return list(images)
        raise ScoreError(f"cannot score a {type(images).__name__}: give paths, PIL images, uint8 (H, W, 3) arrays "
                         "or (N, 3, H, W) tensors, or a list of them")

    def _prepare(self, item: Any) -> np.ndarray:
        d = self.config.data
        if isinstance(item, (str, os.PathLike)):
            table = pd.DataFrame({"image_id": [str(item)], "path": [str(item)], "split": "test", "mos": np.nan})
            return decode_table(table, image_size=d.image_size, short_side=d.short_side, threads=1).images[0]
        if isinstance(item, torch.Tensor):
            if item.dim() != 3 or item.shape[0] != 3:
                raise TypeError(f"a tensor image must be (3, H, W), got shape {tuple(item.shape)}")
            pixels = item if item.dtype == torch.uint8 else (item.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
            item = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
        elif isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
                raise TypeError(f"an array image must be uint8 (H, W, 3), got {item.dtype} {item.shape}")
            item = Image.fromarray(item)
        if not isinstance(item, Image.Image):
            raise TypeError(f"cannot score a {type(item).__name__}: give a path, a PIL image, a uint8 (H, W, 3) array "
                            "or a (3, H, W) tensor")
        return prepare_image(item, d.image_size, d.short_side)

    # ------------------------------------------------------------------ scoring

    def _score_arrays(self, arrays: list[np.ndarray], ids: list[str]) -> np.ndarray:
        d = self.config.data
        for image_id, image in zip(ids, arrays):
            if not d.whole_image and min(image.shape[:2]) < d.crop_size:
                raise ScoreError(f"image {image_id} is {image.shape[1]}x{image.shape[0]}, smaller than the model's "
                                 f"{d.crop_size} px patches")
        same = len({a.shape for a in arrays}) == 1
        images = np.stack(arrays) if same else arrays
        table = pd.DataFrame({"image_id": ids, "split": "test", "mos": np.nan})
        return self._score_decoded(DecodedImages(images=images, table=table))

    def _score_decoded(self, decoded: DecodedImages) -> np.ndarray:
        from iqa_ray.training.inference import predict
        from iqa_ray.training.loaders import eval_dataset, eval_loader

        dataset = eval_dataset(self.config, decoded, np.arange(len(decoded.table)))
        scores, _ = predict(self.model, eval_loader(self.config, dataset), self.device, self.amp,
                            chunk=self.config.data.eval_chunk, memory_format=self.memory_format)
        return scores


def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(model: str | os.PathLike[str], device: str | torch.device | None = None) -> IQAScorer:
    """The scorer of ``model`` (an experiment, trial or run folder, or a checkpoint file).

    Raises:
        ScoreError: nothing usable there; the message says what was found and what is accepted.
    """
    from iqa_ray.core.io import CheckpointError
    from iqa_ray.evaluation.cross_dataset import EvaluateError, resolve_source
    from iqa_ray.training.checkpoints import model_from_checkpoint

    try:
        source = resolve_source(model)
    except EvaluateError as exc:
        raise ScoreError(str(exc)) from None
    device = torch.device(device) if device is not None else best_device()
    if source.kind == "ensemble":  # an ensemble manifest (a search run with --ensemble K)
        from iqa_ray.evaluation.ensemble import EnsembleError, load_ensemble

        try:
            network, config, where = load_ensemble(source.checkpoint, device)
        except EnsembleError as exc:
            raise ScoreError(str(exc)) from None
        return IQAScorer(network, config, device, source=where)
    try:
        network, config = model_from_checkpoint(source.checkpoint, device=device)
    except CheckpointError as exc:
        raise ScoreError(str(exc)) from None
    where = f"{source.kind} {source.folder}" + (f", trial {source.trial}" if source.trial else "")
    return IQAScorer(network, config, device, source=where)


def image_files(inputs: Sequence[str | os.PathLike[str]]) -> tuple[list[str], list[dict[str, str]]]:
    """Image files named by ``inputs`` (files as given; folders searched recursively for image
    suffixes, sorted), and the inputs that do not exist."""
    files, missing = [], []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            files.extend(str(f) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(str(p))
        else:
            missing.append({"image": str(raw), "error": f"no such file or folder: {raw}"})
    return files, missing


__all__ = ["IQAScorer", "ScoredFiles", "ScoreError", "load_model", "image_files", "IMAGE_SUFFIXES"]
