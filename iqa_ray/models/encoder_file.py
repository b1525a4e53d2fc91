"""The ``iqa-ray-encoder`` file: a backbone's pre-trained weights, written by quality-aware
pre-training (:mod:`iqa_ray.ssl`) and loaded into a model's backbone for fine-tuning
(``pretrained_encoder``). Only tensors and plain data: it loads with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from iqa_ray.core.io import git_revision, load_weights_file, save_checkpoint
from iqa_ray.models.backbones import Backbone

ENCODER_FORMAT = "iqa-ray-encoder"
ENCODER_VERSION = 1
ENCODER_FILE = "encoder.pt"


class EncoderError(ValueError):
    """An encoder file is missing, not an encoder, or does not fit the backbone it is loaded into."""


def save_encoder(backbone: Backbone, path: str | os.PathLike[str], *, config: Any = None,
                 epoch: int | None = None) -> Path:
    """Write the backbone's weights as an ``iqa-ray-encoder`` file, atomically (``config``: the
    pre-training config, anything with ``to_dict()``, recorded in the file).

    The file holds only tensors and plain data, so it loads with ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    save_checkpoint(path, {
        "format": ENCODER_FORMAT, "version": ENCODER_VERSION, "backbone": backbone.name,
        "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
        "config": json.dumps(config.to_dict() if config is not None else {}),
        "epoch": -1 if epoch is None else int(epoch), "git_revision": git_revision(),
    })
    return path


def read_encoder(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load an encoder file (``weights_only=True``) and check its format.

    Args:
        path: an ``encoder.pt`` file, or a folder holding one (a run folder, a Tune checkpoint).

    Raises:
        EncoderError: missing, unreadable, or not an ``iqa-ray-encoder`` file.
    """
    path, state = load_weights_file(path, default_file=ENCODER_FILE, what="encoder file", error=EncoderError)
    if not isinstance(state, dict) or state.get("format") != ENCODER_FORMAT or "state_dict" not in state:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise EncoderError(f"{path} is not an {ENCODER_FORMAT} file (format {found!r}); write one with "
                           "`iqa-ray pretrain` or iqa_ray.models.encoder_file.save_encoder")
    return state


def load_encoder_into(backbone: Backbone, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a pre-trained encoder into ``backbone`` (in place), strictly.

    The normalisation buffers (``mean``/``std``) come with the weights, so the backbone
    normalises its input the way the encoder was trained, whatever it was built with.

    Args:
        backbone: the model's backbone (``model.backbone``).
        path: an encoder file or a folder holding ``encoder.pt``.

    Returns:
        The file's metadata: ``backbone``, ``config`` (the pre-training config), ``epoch``,
        ``git_revision``.

    Raises:
        EncoderError: a file problem, another backbone name, or missing / unexpected keys or
            different shapes (each listed).
    """
    state = read_encoder(path)
    if state["backbone"] != backbone.name:
        raise EncoderError(f"encoder {path} was pre-trained for backbone {state['backbone']!r} but the model's backbone "
                           f"is {backbone.name!r}; set backbone={state['backbone']!r} or pre-train a "
                           f"{backbone.name} encoder")
    weights, expected = state["state_dict"], backbone.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or shapes:
        def few(items: list[str]) -> str:
            return ", ".join(items[:4]) + (f", ... ({len(items)} in all)" if len(items) > 4 else "")

        parts = [f"encoder {path} does not fit backbone {backbone.name}"]
        parts += [f"{label}: {few(items)}" for label, items in
                  (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches (file vs model)", shapes))
                  if items]
        if shapes and backbone.img_size is not None:
            parts.append(f"{backbone.name} has a fixed input size: build it with the encoder's crop size "
                         f"(img_size), the model uses {backbone.img_size}")
        raise EncoderError("; ".join(parts))
    backbone.load_state_dict(weights, strict=True)
    return {"backbone": state["backbone"], "config": json.loads(state.get("config") or "{}"),
            "epoch": int(state.get("epoch", -1)), "git_revision": state.get("git_revision", "unknown")}
